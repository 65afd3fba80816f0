//! Three firebrand-server processes in one cluster, over real Redis and over real NATS
//! (scripts/prereqs.sh starts them on their default ports), with clients on different nodes:
//! an API publish on node 1 reaches clients on nodes 2 and 3, presence lists the users of
//! every node on every node, and a disconnect asked of node 3 closes a socket on node 1.
//! Webhooks come from each node, with its node id (occupancy is per node).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const JWT: &str = "jwt-secret-for-cluster-tests-0123456789";
const KEY: &str = "cluster-test-api-key-0123456789";

fn token(sub: &str) -> String {
    let claims = json!({"sub": sub, "exp": now() + 300});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(JWT.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Polls `probe` every 25 ms until it holds (10 s at most).
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut probe: impl FnMut() -> F) {
    for _ in 0..400 {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not in time");
}

async fn info(port: u16) -> Value {
    let (status, body) = http(port, "GET", "/api/info", Some(KEY), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// A webhook receiver on a free port (the signature is checked in tests/webhooks.rs).
async fn receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/events",
            post(
                |State(tx): State<mpsc::UnboundedSender<Value>>, Json(event): Json<Value>| async move {
                    let _ = tx.send(event);
                },
            ),
        )
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/events"), rx)
}

/// Three nodes on the engine at `url` (`var`: `REDIS_URL` or `NATS_URL`), in a cluster
/// namespace of their own, sending webhooks to `hooks`, once each has heard from the other
/// two; with their node ids.
async fn three_nodes(name: &str, var: &str, url: &str, hooks: &str) -> (Vec<Server>, Vec<String>) {
    let dir = temp_dir(name);
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        "[[namespace]]\nprefix = \"room:\"\npresence = true\n",
    )
    .unwrap();
    let namespace = format!("firebrand-test-{}-{name}", std::process::id());
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            spawn(
                &["--config", path.to_str().unwrap()],
                &[
                    (var, url),
                    ("FIREBRAND_CLUSTER_NAMESPACE", &namespace),
                    ("FIREBRAND_JWT_SECRET", JWT),
                    ("FIREBRAND_API_KEY", KEY),
                    ("FIREBRAND_WEBHOOK_URL", hooks),
                    (
                        "FIREBRAND_WEBHOOK_SECRET",
                        "cluster-webhooks-secret-0123456789abcdef",
                    ),
                ],
            )
            .await,
        );
    }
    let mut ids = Vec::new();
    for node in &nodes {
        ids.push(info(node.port).await["node"].as_str().unwrap().to_owned());
    }
    for (node, id) in nodes.iter().zip(&ids) {
        let others: BTreeSet<String> = ids.iter().filter(|i| *i != id).cloned().collect();
        until("the cluster links", || async {
            let seen: BTreeSet<String> = info(node.port).await["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect();
            others.is_subset(&seen)
        })
        .await;
    }
    (nodes, ids)
}

async fn cluster_behaviour(name: &str, var: &str, url: &str) {
    let (hooks, mut events) = receiver().await;
    let (nodes, ids) = three_nodes(name, var, url, &hooks).await;
    let connect_as = |node: &Server, user: &str| format!("{}&token={}", node.url(), token(user));
    let mut alice = connect(&connect_as(&nodes[0], "alice"), None).await.open();
    let mut bob = connect(&connect_as(&nodes[1], "bob"), None).await.open();
    let mut carol = connect(&connect_as(&nodes[2], "carol"), None).await.open();
    for client in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(client.join("room:1").await.0, "ok");
    }
    // Each node reports the topic occupied (and its user joined), with its own id.
    let mut occupied = BTreeSet::new();
    let mut joined = BTreeSet::new();
    while occupied.len() < 3 || joined.len() < 3 {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("no webhook in time")
            .unwrap();
        assert_eq!(event["topic"], "room:1");
        let node = event["node"].as_str().unwrap().to_owned();
        assert!(ids.contains(&node), "{event}");
        match event["event"].as_str().unwrap() {
            "topic_occupied" => assert!(occupied.insert(node), "{event}"),
            "presence_join" => assert!(joined.insert(event["user"].to_string()), "{event}"),
            _ => panic!("{event}"),
        }
    }

    // A publish through node 1's API reaches the clients on nodes 2 and 3.
    let body = json!({"topic": "room:1", "event": "news", "payload": {"n": 1}}).to_string();
    let (status, _) = http(
        nodes[0].port,
        "POST",
        "/api/publish",
        Some(KEY),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200);
    for client in [&mut bob, &mut carol, &mut alice] {
        let frame = client.recv_event("news").await;
        assert_eq!(frame[4], json!({"n": 1}));
    }

    // Every node lists the users of every node.
    let everyone: BTreeSet<String> = ["alice", "bob", "carol"].map(String::from).into();
    for node in &nodes {
        until("presence from every node", || async {
            let (status, body) = http(
                node.port,
                "GET",
                "/api/presence?topic=room:1",
                Some(KEY),
                None,
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let keys: BTreeSet<String> = body["presences"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            keys == everyone
        })
        .await;
    }

    // A socket id is not a topic: a `disconnect` published on node 3 to the topic named like
    // alice's socket id closes nothing; alice on node 1 gets the next publish from node 3.
    for (topic, event) in [("user_socket:alice", "disconnect"), ("room:1", "news")] {
        let body = json!({"topic": topic, "event": event, "payload": {"n": 2}}).to_string();
        let (status, _) = http(
            nodes[2].port,
            "POST",
            "/api/publish",
            Some(KEY),
            Some(&body),
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(alice.recv_event("news").await[4], json!({"n": 2}));

    // A disconnect asked of node 3 closes alice's socket on node 1.
    let body = json!({"user": "alice"}).to_string();
    let (status, _) = http(
        nodes[2].port,
        "POST",
        "/api/disconnect",
        Some(KEY),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(alice.closed().await, Some(1001));
    // The others stay, and see alice leave.
    until("alice gone from the presence", || async {
        let (_, body) = http(
            nodes[1].port,
            "GET",
            "/api/presence?topic=room:1",
            Some(KEY),
            None,
        )
        .await;
        body["presences"].get("alice").is_none()
    })
    .await;
    // (recv_event fails the test after 10 s without it.)
    while bob.recv_event("presence_diff").await[4]["leaves"]
        .get("alice")
        .is_none()
    {}
}

#[tokio::test]
async fn three_nodes_over_redis() {
    cluster_behaviour("cluster-redis", "REDIS_URL", "redis://127.0.0.1:6379").await;
}

#[tokio::test]
async fn three_nodes_over_nats() {
    cluster_behaviour("cluster-nats", "NATS_URL", "nats://127.0.0.1:4222").await;
}
