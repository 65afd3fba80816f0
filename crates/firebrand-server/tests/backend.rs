//! Calls to the backend over HTTP, against a real backend (axum on 127.0.0.1:0, in this
//! process): connects allowed and refused, a backend that is down or slow, joins allowed and
//! refused with the backend's reply, pushes rewritten and rejected.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use serde_json::{Value, json};

/// The bodies the backend received, by path.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(&'static str, Value)>>>);

impl Seen {
    fn last(&self, path: &str) -> Value {
        let seen = self.0.lock().unwrap();
        let found = seen.iter().rev().find(|(p, _)| *p == path);
        found.expect("no call").1.clone()
    }
}

async fn on_connect(State(seen): State<Seen>, Json(body): Json<Value>) -> Response {
    seen.0.lock().unwrap().push(("connect", body.clone()));
    let params = &body["params"];
    match params["token"].as_str().unwrap_or("") {
        "good" => Json(json!({
            "allow": true,
            "user": params["user"],
            "info": {"cookie": body["headers"]["cookie"]},
        }))
        .into_response(),
        "anon" => Json(json!({"allow": true})).into_response(),
        "500" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        "garbage" => "not json".into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Json(json!({"allow": true, "user": "slow"})).into_response()
        }
        _ => Json(json!({"allow": false})).into_response(),
    }
}

async fn on_join(State(seen): State<Seen>, Json(body): Json<Value>) -> Json<Value> {
    seen.0.lock().unwrap().push(("join", body.clone()));
    Json(match body["topic"].as_str().unwrap() {
        "priv:open" => {
            json!({"allow": true, "reply": {"welcome": body["user"], "params": body["params"]}})
        }
        "priv:plain" => json!({"allow": true}),
        "priv:closed" => json!({"allow": false, "reply": {"reason": "members only"}}),
        _ => json!({"allow": false}),
    })
}

async fn on_push(State(seen): State<Seen>, Json(body): Json<Value>) -> Json<Value> {
    seen.0.lock().unwrap().push(("push", body.clone()));
    Json(match body["event"].as_str().unwrap() {
        "shout" => json!({
            "action": "broadcast",
            "payload": {"text": body["payload"]["text"].as_str().unwrap().to_uppercase(), "by": body["user"]},
            "reply": {"shouted": true},
        }),
        "plain" => json!({"action": "broadcast"}),
        "spam" => json!({"action": "reject", "reply": {"reason": "spam"}}),
        _ => json!({"action": "reject"}),
    })
}

/// The backend on a free port.
async fn backend() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .route("/connect", post(on_connect))
        .route("/join", post(on_join))
        .route("/push", post(on_push))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

/// A port nothing listens on.
async fn dead_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

const TIMEOUT_MS: u64 = 500;

/// The server, calling `connect` for connects and the backend for the rest.
async fn server(name: &str, connect: &str, backend: SocketAddr) -> Server {
    let dead = dead_port().await;
    let dir = temp_dir(name);
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
backend_timeout_ms = {TIMEOUT_MS}

[auth]
connect_url = "{connect}"
connect_headers = ["cookie", "x-absent"]

[[namespace]]
prefix = "priv:"
join = "backend"
join_url = "http://{backend}/join"

[[namespace]]
prefix = "chat:"
pushes = "backend"
push_url = "http://{backend}/push"

[[namespace]]
prefix = "gone:"
join = "backend"
join_url = "http://127.0.0.1:{dead}/join"

[[namespace]]
prefix = "dead:"
pushes = "backend"
push_url = "http://127.0.0.1:{dead}/push"
"#
        ),
    )
    .unwrap();
    spawn(&["--config", path.to_str().unwrap()], &[]).await
}

async fn with_backend(name: &str) -> (Server, Seen) {
    let (addr, seen) = backend().await;
    (
        server(name, &format!("http://{addr}/connect"), addr).await,
        seen,
    )
}

fn url(server: &Server, params: &str) -> String {
    format!("{}&{params}", server.url())
}

#[tokio::test]
async fn the_backend_decides_each_connect() {
    let (server, seen) = with_backend("connect").await;
    let mut alice = connect_with(
        &url(&server, "token=good&user=alice"),
        Some("bearer-xyz"),
        &[("cookie", "sid=abc")],
    )
    .await
    .open();
    let call = seen.last("connect");
    assert_eq!(call["params"]["token"], "good");
    assert_eq!(call["params"]["user"], "alice");
    assert_eq!(call["params"]["vsn"], "2.0.0");
    // Only the configured headers, when sent.
    assert_eq!(call["headers"], json!({"cookie": "sid=abc"}));
    assert_eq!(call["auth_token"], "bearer-xyz");
    assert_eq!(
        alice.join("chat:a").await,
        ("ok".into(), json!({"user": "alice"}))
    );

    // Allowed without a user: anonymous.
    let mut anon = connect(&url(&server, "token=anon"), None).await.open();
    assert_eq!(anon.join("chat:a").await, ("ok".into(), json!({})));

    // Refused: {"allow": false}, or a status other than 2xx.
    for params in ["token=deny", "token=500", ""] {
        let status = connect(&url(&server, params), None).await.refused();
        assert_eq!(status, 403, "{params}");
    }
    // An answer that does not parse: unavailable.
    let status = connect(&url(&server, "token=garbage"), None)
        .await
        .refused();
    assert_eq!(status, 503);
}

#[tokio::test]
async fn a_slow_backend_refuses_within_the_timeout() {
    let (server, _) = with_backend("slow").await;
    let start = Instant::now();
    let status = connect(&url(&server, "token=slow"), None).await.refused();
    let took = start.elapsed();
    assert_eq!(status, 503);
    assert!(took >= Duration::from_millis(TIMEOUT_MS - 50), "{took:?}");
    assert!(took < Duration::from_millis(TIMEOUT_MS + 1500), "{took:?}");
    // The server is not held up meanwhile.
    let mut ok = connect(&url(&server, "token=good&user=bob"), None)
        .await
        .open();
    assert_eq!(ok.join("chat:a").await.0, "ok");
}

#[tokio::test]
async fn a_backend_that_is_down_refuses_at_once() {
    let (addr, _) = backend().await;
    let dead = dead_port().await;
    let server = server("down", &format!("http://127.0.0.1:{dead}/connect"), addr).await;
    let start = Instant::now();
    let status = connect(&url(&server, "token=good&user=alice"), None)
        .await
        .refused();
    assert_eq!(status, 503);
    assert!(
        start.elapsed() < Duration::from_millis(TIMEOUT_MS),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn the_backend_decides_each_join_and_its_reply() {
    let (server, seen) = with_backend("join").await;
    let mut alice = connect(&url(&server, "token=good&user=alice"), None)
        .await
        .open();
    assert_eq!(
        alice.join_with("priv:open", json!({"code": 7})).await,
        (
            "ok".into(),
            json!({"welcome": "alice", "params": {"code": 7}})
        )
    );
    assert_eq!(
        seen.last("join"),
        json!({"user": "alice", "topic": "priv:open", "params": {"code": 7}})
    );
    assert_eq!(
        alice.join("priv:plain").await,
        ("ok".into(), json!({"user": "alice"}))
    );
    assert_eq!(
        alice.join("priv:closed").await,
        ("error".into(), json!({"reason": "members only"}))
    );
    assert_eq!(
        alice.join("priv:other").await,
        ("error".into(), json!({"reason": "unauthorized"}))
    );
    let start = Instant::now();
    assert_eq!(
        alice.join("gone:x").await,
        ("error".into(), json!({"reason": "backend unavailable"}))
    );
    assert!(start.elapsed() < Duration::from_millis(TIMEOUT_MS));
}

#[tokio::test]
async fn the_backend_rewrites_or_rejects_pushes() {
    let (server, seen) = with_backend("push").await;
    let mut alice = connect(&url(&server, "token=good&user=alice"), None)
        .await
        .open();
    let mut bob = connect(&url(&server, "token=good&user=bob"), None)
        .await
        .open();
    assert_eq!(alice.join("chat:room").await.0, "ok");
    assert_eq!(bob.join("chat:room").await.0, "ok");
    // Each client's first join: its join ref is "1".
    let jr = "1";

    let r = alice
        .send(Some(jr), "chat:room", "shout", json!({"text": "hi"}))
        .await;
    assert_eq!(
        alice.reply(&r).await,
        ("ok".into(), json!({"shouted": true}))
    );
    assert_eq!(
        seen.last("push"),
        json!({"user": "alice", "topic": "chat:room", "event": "shout", "payload": {"text": "hi"}})
    );
    let got = bob.recv_event("shout").await;
    assert_eq!(got[4], json!({"text": "HI", "by": "alice"}));

    let r = alice
        .send(Some(jr), "chat:room", "plain", json!({"n": 1}))
        .await;
    assert_eq!(alice.reply(&r).await, ("ok".into(), json!({})));
    assert_eq!(bob.recv_event("plain").await[4], json!({"n": 1}));

    let r = alice.send(Some(jr), "chat:room", "spam", json!({})).await;
    assert_eq!(
        alice.reply(&r).await,
        ("error".into(), json!({"reason": "spam"}))
    );
    let r = alice.send(Some(jr), "chat:room", "other", json!({})).await;
    assert_eq!(
        alice.reply(&r).await,
        ("error".into(), json!({"reason": "rejected"}))
    );
    // Reserved events never reach the backend.
    let before = seen.0.lock().unwrap().len();
    let r = alice
        .send(Some(jr), "chat:room", "presence_diff", json!({}))
        .await;
    assert_eq!(
        alice.reply(&r).await,
        ("error".into(), json!({"reason": "reserved event"}))
    );
    assert_eq!(seen.0.lock().unwrap().len(), before);
    // Nothing rejected reached bob, and the sender never gets its own broadcasts: the next
    // accepted push from each is the other's next frame.
    accepted_push_is_next_frame(&mut alice, &mut bob, jr, 2).await;
    accepted_push_is_next_frame(&mut bob, &mut alice, jr, 3).await;

    // A backend that is down: the push is refused at once.
    let mut carol = connect(&url(&server, "token=good&user=carol"), None)
        .await
        .open();
    assert_eq!(carol.join("dead:x").await.0, "ok");
    let start = Instant::now();
    let r = carol
        .send(Some(jr), "dead:x", "shout", json!({"text": "hi"}))
        .await;
    assert_eq!(
        carol.reply(&r).await,
        ("error".into(), json!({"reason": "backend unavailable"}))
    );
    assert!(start.elapsed() < Duration::from_millis(TIMEOUT_MS));
}

/// `from` pushes `plain {"n": n}` on `chat:room` (broadcast by the backend, replied `ok`), and it
/// is the next frame `to` receives.
async fn accepted_push_is_next_frame(from: &mut Client, to: &mut Client, jr: &str, n: u64) {
    let r = from
        .send(Some(jr), "chat:room", "plain", json!({ "n": n }))
        .await;
    assert_eq!(from.reply(&r).await, ("ok".into(), json!({})));
    assert_eq!(
        to.recv().await,
        json!([null, null, "chat:room", "plain", { "n": n }])
    );
}
