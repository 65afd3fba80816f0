//! Three conformance nodes as separate processes, clustered through the real Redis and NATS
//! servers on this machine (REDIS_URL / NATS_URL; `.ci/run` starts them where absent).

mod common;

use std::process::Stdio;

use common::cluster::*;
use common::*;
use serde_json::{Value, json};

const REDIS: &str = "redis://127.0.0.1:6379";
const NATS: &str = "nats://127.0.0.1:4222";
/// Starts a node joined to the cluster `namespace` on `engine` (REDIS_URL or NATS_URL).
async fn node(engine: (&str, &str), namespace: &str) -> Node {
    node_with(engine, namespace, &[]).await
}

async fn node_with(engine: (&str, &str), namespace: &str, envs: &[(&str, &str)]) -> Node {
    let mut all = vec![(engine.0, engine.1), ("CLUSTER_NAMESPACE", namespace)];
    all.extend_from_slice(envs);
    node_env(&all).await
}

async fn three_nodes(engine: (&str, &str)) {
    let ns = format!("test-{}", std::process::id());
    let ns = format!("{ns}-{}", engine.0);
    let (n1, n2, n3) = (
        node(engine, &ns).await,
        node(engine, &ns).await,
        node(engine, &ns).await,
    );
    let topic = "room:cluster";
    let mut a = n1.client("user=alice").await;
    let mut b = n2.client("user=bob").await;
    let mut c = n3.client("").await;
    a.join("1", topic, json!({"joined": "cluster"})).await;
    b.join("1", topic, json!({"joined": "cluster"})).await;
    c.join("1", topic, json!({"joined": "cluster"})).await;
    let (mut p1, mut p2, mut p3) = (n1.probe().await, n2.probe().await, n3.probe().await);
    for (from, to) in [(&n2, &mut p1), (&n3, &mut p2), (&n1, &mut p3)] {
        await_link(from, to).await;
    }

    // A channel broadcast on node 2 reaches every node once. Order holds per origin node (as in
    // Phoenix), so a later marker from node 2 proves no second copy is coming.
    b.send(json!(["1", "2", topic, "new_msg", {"body": "hi"}]))
        .await;
    let hi = json!([null, null, topic, "new_msg", {"body": "hi"}]);
    b.expect(hi.clone()).await;
    n2.broadcast(topic, "marker", json!({})).await;
    let marker = json!([null, null, topic, "marker", {}]);
    for client in [&mut a, &mut c] {
        client.expect(hi.clone()).await;
        client.expect(marker.clone()).await;
    }
    b.expect(marker).await;

    // broadcast_from on node 1: the others get it, the sender does not. (The ping's reply
    // proves the broadcast was published before the marker, from the same node.)
    a.send(json!(["1", "3", topic, "new_msg_from", {"body": "not alice"}]))
        .await;
    a.ping_roundtrip("1", "3b", topic).await;
    n1.broadcast(topic, "marker", json!({"n": 1})).await;
    let from = json!([null, null, topic, "new_msg", {"body": "not alice"}]);
    let marker = json!([null, null, topic, "marker", {"n": 1}]);
    for client in [&mut b, &mut c] {
        client.expect(from.clone()).await;
        client.expect(marker.clone()).await;
    }
    a.expect(marker).await;

    // Intercepted events are filtered by each subscriber on its own node.
    c.send(json!(["1", "4", topic, "shout", {"m": 1}])).await;
    a.expect(json!(["1", null, topic, "shout", {"m": 1, "to": "alice"}]))
        .await;
    b.expect(json!(["1", null, topic, "shout", {"m": 1, "to": "bob"}]))
        .await;
    c.expect(json!(["1", null, topic, "shout", {"m": 1, "to": null}]))
        .await;

    // The disconnect broadcast to a socket id closes that user's sockets on every node.
    let mut bob_elsewhere = n3.client("user=bob").await;
    bob_elsewhere.heartbeat("h").await;
    a.send(json!(["1", "5", topic, "ping", {}])).await;
    a.expect(ok_reply(Some("1"), "5", topic, json!({}))).await;
    n1.broadcast("user_socket:bob", "disconnect", json!({}))
        .await;
    b.expect_close(1001).await;
    bob_elsewhere.expect_close(1001).await;
    drop((n1, n2, n3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_redis() {
    three_nodes(("REDIS_URL", REDIS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_nats() {
    three_nodes(("NATS_URL", NATS)).await;
}

async fn presence_across_nodes(engine: (&str, &str)) {
    let ns = format!("presence-{}-{}", std::process::id(), engine.0);
    let fast = [
        ("PRESENCE_HEARTBEAT_MS", "200"),
        ("PRESENCE_DOWN_MS", "1500"),
    ];
    let (n1, n2, n3) = (
        node_with(engine, &ns, &fast).await,
        node_with(engine, &ns, &fast).await,
        node_with(engine, &ns, &fast).await,
    );
    let topic = "room:everywhere";
    let mut watcher = n1.presence_client("user=watcher").await;
    watcher.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut alice = n2.presence_client("user=alice").await;
    alice.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut carl = n3.presence_client("user=carl").await;
    carl.send(json!(["1", "1", topic, "phx_join", {}])).await;

    // Presences tracked on nodes 2 and 3 reach node 1's subscribers.
    let mut view = serde_json::Map::new();
    presence_until(&mut watcher, &mut view, |v| {
        v.contains_key("alice") && v.contains_key("carl")
    })
    .await;
    // A newcomer on node 1 gets them all in its presence_state.
    let mut late = n1.presence_client("user=late").await;
    late.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut late_view = serde_json::Map::new();
    presence_until(&mut late, &mut late_view, |v| {
        ["watcher", "alice", "carl", "late"]
            .iter()
            .all(|k| v.contains_key(*k))
    })
    .await;

    // SIGKILL node 3: its presences leave the others once it is missed for PRESENCE_DOWN_MS.
    n3.signal("-KILL");
    presence_until(&mut watcher, &mut view, |v| !v.contains_key("carl")).await;
    assert!(view.contains_key("alice"));
    drop((n1, n2, n3, alice, carl));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_across_redis_nodes_and_a_killed_node() {
    presence_across_nodes(("REDIS_URL", REDIS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_across_nats_nodes_and_a_killed_node() {
    presence_across_nodes(("NATS_URL", NATS)).await;
}

/// Two nodes on Redis; on `topic`, a watcher on node 1 whose view holds dana, joined on node 2.
struct Watched {
    n1: Node,
    n2: Node,
    watcher: Client,
    view: serde_json::Map<String, Value>,
    dana: Client,
}

async fn watched_pair(ns: &str, env: &[(&str, &str)], topic: &str) -> Watched {
    let engine = ("REDIS_URL", REDIS);
    let (n1, n2) = (
        node_with(engine, ns, env).await,
        node_with(engine, ns, env).await,
    );
    let mut watcher = n1.presence_client("user=watcher").await;
    watcher.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut dana = n2.presence_client("user=dana").await;
    dana.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut view = serde_json::Map::new();
    presence_until(&mut watcher, &mut view, |v| v.contains_key("dana")).await;
    Watched {
        n1,
        n2,
        watcher,
        view,
        dana,
    }
}

/// A node that stops gracefully says goodbye: its presences leave the others at once, long
/// before they would notice it missing (PRESENCE_DOWN_MS is 60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_removes_presences_at_once() {
    let ns = format!("goodbye-{}", std::process::id());
    let slow = [
        ("PRESENCE_HEARTBEAT_MS", "200"),
        ("PRESENCE_DOWN_MS", "60000"),
        ("DRAIN_MS", "0"),
    ];
    let Watched {
        n1,
        n2,
        mut watcher,
        mut view,
        dana,
    } = watched_pair(&ns, &slow, "room:goodbye").await;
    n2.signal("-TERM");
    presence_until(&mut watcher, &mut view, |v| !v.contains_key("dana")).await;
    drop((n1, n2, dana));
}

/// A private Redis on a free port, keeping nothing on disk.
fn private_redis() -> Engine {
    Engine::new("redis-server", |port| {
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(String::from)
        .to_vec()
    })
}

/// Debian's nats-server, or the one on the PATH.
fn nats_bin() -> &'static str {
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// A private engine server for an outage test, on a free port.
struct Engine {
    cmd: &'static str,
    args: Vec<String>,
    port: u16,
    child: Option<std::process::Child>,
}

impl Engine {
    fn new(cmd: &'static str, args: impl Fn(u16) -> Vec<String>) -> Engine {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut e = Engine {
            cmd,
            args: args(port),
            port,
            child: None,
        };
        e.start();
        e
    }

    fn start(&mut self) {
        let child = std::process::Command::new(self.cmd)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.cmd));
        self.child = Some(child);
        // Wait until it accepts connections.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{} did not start", self.cmd);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The engine dies and comes back: nodes keep serving local clients meanwhile, then reconnect
/// and resubscribe by themselves.
async fn engine_outage(var: &str, url: impl Fn(u16) -> String, mut engine: Engine) {
    let ns = format!("outage-{}-{var}", std::process::id());
    let env = (var, url(engine.port));
    // Nodes never count each other down here: only resynchronisation can remove a presence.
    let slow_down = [
        ("PRESENCE_HEARTBEAT_MS", "200"),
        ("PRESENCE_DOWN_MS", "60000"),
    ];
    let (n1, n2) = (
        node_with((env.0, &env.1), &ns, &slow_down).await,
        node_with((env.0, &env.1), &ns, &slow_down).await,
    );
    let topic = "room:outage";
    let mut a = n1.client("").await;
    let mut b = n2.client("").await;
    a.join("1", topic, json!({"joined": "outage"})).await;
    b.join("1", topic, json!({"joined": "outage"})).await;
    let mut probe = n1.probe().await;
    await_link(&n2, &mut probe).await;
    let mut watcher = n1.presence_client("user=watcher").await;
    watcher.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut leaver = n2.presence_client("user=leaver").await;
    leaver.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut view = serde_json::Map::new();
    presence_until(&mut watcher, &mut view, |v| v.contains_key("leaver")).await;

    engine.kill();
    // A user leaves during the outage: the removal cannot reach node 1 now.
    drop(leaver);
    // Local delivery goes on during the outage.
    b.send(json!(["1", "2", topic, "new_msg", {"body": "local"}]))
        .await;
    b.expect(json!([null, null, topic, "new_msg", {"body": "local"}]))
        .await;
    b.ping_roundtrip("1", "3", topic).await;

    engine.start();
    // The nodes reconnect and resubscribe: messages cross again.
    let mut probe2 = n2.probe().await;
    await_link(&n2, &mut probe).await;
    await_link(&n1, &mut probe2).await;
    // Node 1 notices the gap in node 2's changes, asks for its state, and drops the ghost.
    presence_until(&mut watcher, &mut view, |v| !v.contains_key("leaver")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart() {
    let redis = private_redis();
    engine_outage(
        "REDIS_URL",
        |port| format!("redis://127.0.0.1:{port}"),
        redis,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart() {
    let nats = Engine::new(nats_bin(), |port| {
        ["-a", "127.0.0.1", "-p", &port.to_string()]
            .map(String::from)
            .to_vec()
    });
    engine_outage("NATS_URL", |port| format!("nats://127.0.0.1:{port}"), nats).await;
}

/// SIGSTOP looks like a partition from the other nodes: the stopped node's presences leave;
/// after SIGCONT they come back, once, with the same refs (no duplicates, no ghosts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_leaves_and_comes_back_without_duplicates() {
    let ns = format!("netsplit-{}", std::process::id());
    let fast = [
        ("PRESENCE_HEARTBEAT_MS", "200"),
        ("PRESENCE_DOWN_MS", "1500"),
    ];
    let engine = ("REDIS_URL", REDIS);
    let (n1, n2) = (
        node_with(engine, &ns, &fast).await,
        node_with(engine, &ns, &fast).await,
    );
    let topic = "room:split";
    let mut watcher = n1.presence_client("user=watcher").await;
    watcher.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut erin = n2.presence_client("user=erin").await;
    erin.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut view = serde_json::Map::new();
    presence_until(&mut watcher, &mut view, |v| v.contains_key("erin")).await;
    let before = view["erin"].clone();

    n2.signal("-STOP");
    presence_until(&mut watcher, &mut view, |v| !v.contains_key("erin")).await;
    n2.signal("-CONT");
    presence_until(&mut watcher, &mut view, |v| v.contains_key("erin")).await;
    assert_eq!(view["erin"]["metas"].as_array().unwrap().len(), 1);
    assert_eq!(
        view["erin"]["metas"][0]["phx_ref"],
        before["metas"][0]["phx_ref"]
    );
    // And node 2 agrees: a newcomer there sees both.
    let mut late = n2.presence_client("user=late").await;
    late.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let mut late_view = serde_json::Map::new();
    presence_until(&mut late, &mut late_view, |v| {
        ["watcher", "erin", "late"]
            .iter()
            .all(|k| v.contains_key(*k))
    })
    .await;
    assert_eq!(late_view["watcher"]["metas"].as_array().unwrap().len(), 1);
    drop((n1, n2, erin));
}

/// One HTTP/1.1 request on its own connection to `port`; returns the JSON body.
async fn http_json(port: u16, method: &str, target: &str, token: &str, body: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/x-ndjson\r\n\
         x-phoenix-longpoll-token: {token}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

const LP: &str = "/socket/longpoll?vsn=2.0.0";

/// Polls `node` until a message with event `event` arrives; returns it.
async fn poll_until_event(node: &Node, token: &str, event: &str) -> Value {
    loop {
        let v = http_json(node.port, "GET", LP, token, "").await;
        assert!(v["status"] == 200 || v["status"] == 204, "{v}");
        for m in v["messages"].as_array().unwrap() {
            let m: Value = serde_json::from_str(m.as_str().unwrap()).unwrap();
            if m[3] == event {
                return m;
            }
        }
    }
}

/// A long-poll session lives on the node that started it; polls and posts landing on the
/// other nodes (no sticky sessions) reach it through the cluster, as in Phoenix.
async fn long_poll_across_nodes(engine: (&str, &str)) {
    let ns = format!("longpoll-{}-{}", std::process::id(), engine.0);
    let env = [
        ("PRESENCE_HEARTBEAT_MS", "200"),
        ("PRESENCE_DOWN_MS", "1000"),
        ("LONGPOLL_WINDOW_MS", "2000"),
    ];
    let (n1, n2, n3) = (
        node_with(engine, &ns, &env).await,
        node_with(engine, &ns, &env).await,
        node_with(engine, &ns, &env).await,
    );
    // Every node has heard from every other one once each sees the others' presences.
    let topic = "room:lp";
    let mut watchers = Vec::new();
    for (i, n) in [&n1, &n2, &n3].into_iter().enumerate() {
        let mut c = n.presence_client(&format!("user=w{i}")).await;
        c.send(json!(["1", "1", topic, "phx_join", {}])).await;
        watchers.push(c);
    }
    for c in &mut watchers {
        let mut view = serde_json::Map::new();
        presence_until(c, &mut view, |v| v.len() == 3).await;
    }

    // The session starts on node 1; it joins through node 2 and is polled through node 3.
    let start = http_json(n1.port, "GET", LP, "", "").await;
    assert_eq!(start["status"], 410, "{start}");
    let token = start["token"].as_str().unwrap().to_owned();
    let join = json!(["1", "1", topic, "phx_join", {}]).to_string();
    let posted = http_json(n2.port, "POST", LP, &token, &join).await;
    assert_eq!(posted, json!({"status": 200}));
    let reply = poll_until_event(&n3, &token, "phx_reply").await;
    assert_eq!(
        reply,
        json!(["1", "1", topic, "phx_reply", {"status": "ok", "response": {"joined": "lp"}}])
    );
    // A push through node 3 answered through node 2; a broadcast from node 2 polled on node 1.
    let ping = json!(["1", "2", topic, "ping", {"via": 3}]).to_string();
    assert_eq!(
        http_json(n3.port, "POST", LP, &token, &ping).await,
        json!({"status": 200})
    );
    let pong = poll_until_event(&n2, &token, "phx_reply").await;
    assert_eq!(pong[4], json!({"status": "ok", "response": {"via": 3}}));
    n2.broadcast(topic, "news", json!({"n": 1})).await;
    let news = poll_until_event(&n1, &token, "news").await;
    assert_eq!(news, json!([null, null, topic, "news", {"n": 1}]));

    // A forged token naming node 1 is refused there: a post gets 410, a poll a new session
    // on the node it reached.
    let (data, _sig) = token.split_once('.').unwrap();
    let forged = format!("{data}.AAAA");
    assert_eq!(
        http_json(n2.port, "POST", LP, &forged, &ping).await,
        json!({"status": 410})
    );
    let fresh = http_json(n2.port, "GET", LP, &forged, "").await;
    assert_eq!(fresh["status"], 410, "{fresh}");
    assert_ne!(fresh["token"], start["token"]);
    // The real session is untouched.
    n3.broadcast(topic, "news", json!({"n": 2})).await;
    assert_eq!(
        poll_until_event(&n2, &token, "news").await[4],
        json!({"n": 2})
    );

    // Node 1 dies with the session: a poll elsewhere starts a new session there (410 and a
    // token), at once if node 1 is known to be down, after the window otherwise.
    n1.signal("-KILL");
    let again = http_json(n3.port, "GET", LP, &token, "").await;
    assert_eq!(again["status"], 410, "{again}");
    let new_token = again["token"].as_str().unwrap();
    assert_ne!(new_token, token);
    let posted = http_json(n3.port, "POST", LP, new_token, &join).await;
    assert_eq!(posted, json!({"status": 200}));
    assert_eq!(poll_until_event(&n3, new_token, "phx_reply").await, reply);
    drop((n1, n2, n3, watchers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_requests_reach_their_session_from_any_redis_node() {
    long_poll_across_nodes(("REDIS_URL", REDIS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_requests_reach_their_session_from_any_nats_node() {
    long_poll_across_nodes(("NATS_URL", NATS)).await;
}

/// Publishes `message` on the Redis channel of cluster `namespace`, as anyone who can reach
/// the engine can (RESP by hand); waits for Redis's answer, so later messages come after it.
async fn redis_publish(namespace: &str, message: &[u8]) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let channel = format!("firebrand:{namespace}");
    let mut req = b"*3\r\n$7\r\nPUBLISH\r\n".to_vec();
    for arg in [channel.as_bytes(), message] {
        req.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        req.extend_from_slice(arg);
        req.extend_from_slice(b"\r\n");
    }
    let addr = REDIS.trim_start_matches("redis://");
    let mut tcp = tokio::io::BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    tcp.get_mut().write_all(&req).await.unwrap();
    let mut answer = String::new();
    tcp.read_line(&mut answer).await.unwrap();
    assert!(answer.starts_with(':'), "{answer:?}");
}

/// A node's id in its cluster, read from a long-poll session token it signs (`[tag, node, id]`).
async fn node_id(node: &Node) -> u64 {
    use base64::Engine;
    let start = http_json(node.port, "GET", LP, "", "").await;
    let token = start["token"].as_str().unwrap();
    let data = token.split_once('.').unwrap().0;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(data)
        .unwrap();
    serde_json::from_slice::<Value>(&json).unwrap()["d"][1]
        .as_u64()
        .unwrap()
}

/// A node-to-node message as firebrand's format 1 writes it: version, kind, node, JSON body.
fn node_message(kind: u8, node: u64, body: Value) -> Vec<u8> {
    let mut m = vec![1, kind];
    m.extend_from_slice(&node.to_be_bytes());
    m.extend_from_slice(body.to_string().as_bytes());
    m
}

/// A presence heartbeat of `node` carrying one presence `key` at `dot`, of `owner`'s replica.
fn forged_presence(node: u64, topic: &str, key: &str, dot: (u64, u64), owner: u64) -> Vec<u8> {
    let entry = json!({"dot": [dot.0, dot.1], "topic": topic, "key": key,
        "owner": [owner, 1], "meta": "{\"phx_ref\":\"forged\"}", "prev": null});
    let state = json!({"values": [entry], "max": [[dot.0, dot.1]], "cloud": []});
    node_message(2, node, json!({"from": 0, "generation": 1, "state": state}))
}

/// Forged messages published on the cluster's Redis channel: presence gossip naming another
/// node's presences, or a clock far ahead, is refused by the tracker; a goodbye in the name of
/// node 2 and a presence from a node that does not exist are taken as genuine without a
/// cluster secret (the bus is trusted), and refused with one. Returns whether node 2's
/// presence vanished from node 1 and whether the invented one appeared.
async fn forged_messages(secret: Option<&str>) -> (bool, bool) {
    let ns = format!("forged-{}-{}", std::process::id(), secret.is_some());
    let mut env = vec![
        ("PRESENCE_HEARTBEAT_MS", "200"),
        ("PRESENCE_DOWN_MS", "60000"),
    ];
    env.extend(secret.map(|s| ("CLUSTER_SECRET", s)));
    let topic = "room:forged";
    let Watched {
        n1,
        n2,
        mut watcher,
        mut view,
        dana,
    } = watched_pair(&ns, &env, topic).await;

    let n2_id = node_id(&n2).await;
    let forger = 0x5EED_u64;
    // Another node's presences, and node 2's own clock pushed to its end.
    redis_publish(
        &ns,
        &forged_presence(forger, topic, "mallory", (n2_id, 9), n2_id),
    )
    .await;
    let far = (n2_id, u64::MAX);
    redis_publish(&ns, &forged_presence(n2_id, topic, "mallory", far, n2_id)).await;
    // A presence of the forger's own, and node 2's goodbye.
    redis_publish(
        &ns,
        &forged_presence(forger, topic, "ghost", (forger, 1), forger),
    )
    .await;
    redis_publish(&ns, &node_message(5, n2_id, json!({}))).await;

    // Node 2's next change reaches node 1 after all of them.
    let mut later = n2.presence_client("user=later").await;
    later.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let vanished = std::cell::Cell::new(false);
    presence_until(&mut watcher, &mut view, |v| {
        vanished.set(vanished.get() || !v.contains_key("dana"));
        v.contains_key("later")
    })
    .await;
    assert!(!view.contains_key("mallory"), "{view:?}");
    let ghost = view.contains_key("ghost");
    drop((n1, n2, dana, later));
    (vanished.get(), ghost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cluster_secret_the_bus_is_trusted_but_presence_gossip_is_checked() {
    assert_eq!(forged_messages(None).await, (true, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_secret_forged_messages_are_dropped() {
    assert_eq!(
        forged_messages(Some("a shared cluster secret")).await,
        (false, false)
    );
}

/// Recovery across a cluster whose history is in the engine: positions are the same on every
/// node; a client whose node was SIGKILLed rejoins another with the last position it saw and
/// gets what it missed, once, in order; a node started later (which never saw those
/// broadcasts) recovers them from the engine.
async fn recovery_across_nodes(engine: (&str, &str)) {
    let ns = format!("recovery-{}-{}", std::process::id(), engine.0);
    let secret = [("CLUSTER_SECRET", "a-long-enough-cluster-secret-for-tests")];
    let (n1, n2) = (
        node_with(engine, &ns, &secret).await,
        node_with(engine, &ns, &secret).await,
    );
    let topic = "stream:everywhere";
    let (mut a, mut b) = (n1.client("").await, n2.client("").await);
    let start = join_stream(&mut a, "1", topic, json!({})).await["position"].clone();
    assert!(start.is_string(), "{start}");
    join_stream(&mut b, "1", topic, json!({})).await;
    // The engine subscriptions are made in the background: wait until both nodes hear.
    let mut probe = n2.probe().await;
    await_link(&n1, &mut probe).await;
    let mut probe = n1.probe().await;
    await_link(&n2, &mut probe).await;

    // Broadcasts from alternating nodes, each published once the one before was delivered (a
    // broadcast is queued, not awaited: only causally ordered ones have a defined order).
    let mut seen_b = Vec::new();
    for n in 1..=5 {
        let node = if n % 2 == 0 { &n2 } else { &n1 };
        node.broadcast(topic, "new_msg", json!({ "n": n })).await;
        seen_b.extend(stream_messages(&mut b, 1).await);
    }
    let seen_a = stream_messages(&mut a, 5).await;
    // One order and the same positions on every node, whichever node published.
    assert_eq!(seen_a, seen_b);
    assert_eq!(
        seen_a.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );

    // Client `a` saw up to 2 when its node died; it rejoins on node 2 after a 6th.
    n1.signal("-KILL");
    drop(a);
    n2.broadcast(topic, "new_msg", json!({ "n": 6 })).await;
    let sixth = stream_messages(&mut b, 1).await;
    let mut back = n2.client("").await;
    let reply = join_stream(&mut back, "1", topic, json!({ "since": seen_a[1].1 })).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    n2.broadcast(topic, "new_msg", json!({ "n": 7 })).await;
    let got = stream_messages(&mut back, 5).await;
    let seventh = stream_messages(&mut b, 1).await;
    assert_eq!(got, [&seen_a[2..], &sixth[..], &seventh[..]].concat());

    // A node started now never saw any of it: it reads the engine.
    let n3 = node_with(engine, &ns, &secret).await;
    let mut late = n3.client("").await;
    let reply = join_stream(&mut late, "1", topic, json!({ "since": start })).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["position"], json!(seventh[0].1));
    let replayed = stream_messages(&mut late, 7).await;
    assert_eq!(replayed, [&seen_a[..], &sixth[..], &seventh[..]].concat());
    // And goes live: the 8th once, after the replay.
    let mut probe = n3.probe().await;
    await_link(&n2, &mut probe).await;
    n2.broadcast(topic, "new_msg", json!({ "n": 8 })).await;
    let eighth = stream_messages(&mut b, 1).await;
    assert_eq!(stream_messages(&mut late, 1).await, eighth);
    late.ping_roundtrip("1", "2", topic).await;
    // A position of another topic is not recovered.
    let other_life = {
        let mut c = n3.client("").await;
        join_stream(&mut c, "1", "stream:elsewhere", json!({})).await["position"].clone()
    };
    let mut c = n3.client("").await;
    let reply = join_stream(&mut c, "1", topic, json!({ "since": other_life })).await;
    assert_eq!(reply["recovered"], false, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_across_redis_nodes_and_a_killed_node() {
    recovery_across_nodes(("REDIS_URL", REDIS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_across_nats_nodes_and_a_killed_node() {
    recovery_across_nodes(("NATS_URL", NATS)).await;
    // NATS keeps streams on disk: this test's goes.
    let js = async_nats::jetstream::new(async_nats::connect(NATS).await.unwrap());
    let name = format!("FIREBRAND_recovery-{}-NATS_URL", std::process::id());
    js.delete_stream(name).await.unwrap();
}

/// Recovery while the engine is down and after it restarts: a join that needs the engine's
/// history while it is unreachable is refused, `{"reason": "history unavailable"}` (never
/// `true` with something missing, nor `false` about broadcasts the engine may still have: the
/// client retries) and the connection lives on; after the restart, broadcasts carry positions again;
/// a position from before is recovered only if the engine kept its history (`keeps`: NATS with
/// its file store) and otherwise answered `recovered: false` (Redis without persistence: a new
/// epoch). A node that lost its subscription tells its recoverable channels to rejoin.
async fn recovery_through_an_outage(
    var: &str,
    url: impl Fn(u16) -> String,
    mut engine: Engine,
    keeps: bool,
) {
    let ns = format!("recovery-outage-{}-{var}", std::process::id());
    let env = (var, url(engine.port));
    let engine_env = (env.0, env.1.as_str());
    let (n1, n2) = (node(engine_env, &ns).await, node(engine_env, &ns).await);
    let topic = "stream:outage";
    let mut s1 = n1.client("").await;
    join_stream(&mut s1, "1", topic, json!({})).await;
    let mut probe = n1.probe().await;
    await_link(&n2, &mut probe).await;
    n2.broadcast(topic, "new_msg", json!({"n": 1})).await;
    let first = stream_messages(&mut s1, 1).await;

    engine.kill();
    // A node that never saw the topic must read the engine: it cannot.
    let n3 = node(engine_env, &ns).await;
    let mut c = n3.client("").await;
    c.send(json!(["1", "1", topic, "phx_join", {"since": first[0].1}]))
        .await;
    c.expect(json!(["1", "1", topic, "phx_reply", {"status": "error", "response": {"reason": "history unavailable"}}]))
        .await;
    c.heartbeat("h").await;
    drop(c);

    engine.start();
    let mut probe3 = n3.probe().await;
    await_link(&n2, &mut probe3).await;
    await_link(&n2, &mut probe).await;
    if var == "REDIS_URL" {
        // Node 1's subscription was lost: its stream channel is told to rejoin.
        loop {
            let f = s1.recv_json().await;
            if f[3] == "phx_error" {
                assert_eq!(f, json!([null, null, topic, "phx_error", {}]));
                break;
            }
        }
    }
    let mut c = n3.client("").await;
    let reply = join_stream(&mut c, "1", topic, json!({ "since": first[0].1 })).await;
    assert_eq!(reply["recovered"], keeps, "{reply}");
    // Broadcasts carry positions again, on every node.
    n2.broadcast(topic, "new_msg", json!({"n": 3})).await;
    let third = stream_messages(&mut c, 1).await;
    assert_eq!(third[0].0, 3);
    assert_eq!(stream_messages(&mut s1, 1).await, third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_through_a_redis_restart() {
    let redis = private_redis();
    let url = |port| format!("redis://127.0.0.1:{port}");
    recovery_through_an_outage("REDIS_URL", url, redis, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_through_a_nats_restart() {
    let store = std::env::temp_dir().join(format!("firebrand-js-{}", std::process::id()));
    let store_arg = store.display().to_string();
    let nats = Engine::new(nats_bin(), |port| {
        [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            &store_arg,
        ]
        .map(String::from)
        .to_vec()
    });
    let url = |port| format!("nats://127.0.0.1:{port}");
    recovery_through_an_outage("NATS_URL", url, nats, true).await;
    let _ = std::fs::remove_dir_all(store);
}
