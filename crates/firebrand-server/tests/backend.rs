//! Calls to the backend over HTTP, against a real backend (axum on 127.0.0.1:0, in this
//! process): connects allowed and refused, a backend that is down or slow, joins allowed and
//! refused with the backend's reply, pushes rewritten and rejected; and, against a raw TCP
//! backend counting its connections, a reconnect storm held to `backend_max_calls`
//! connections, the excess refused at once, and connections reused.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// A raw HTTP/1.1 backend on a TCP listener, counting the TCP connections it is sent: open now,
/// the most open at once, accepted in all, and the requests. It answers every request (a
/// connect, join or push alike) with `{"allow": true, "user": "u", "action": "broadcast"}`,
/// after `SLOW` when the body holds `"slow"`, and keeps the connection open for the next one.
#[derive(Clone, Default)]
struct Counting {
    open: Arc<AtomicUsize>,
    most_open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

const SLOW: Duration = Duration::from_millis(1500);

impl Counting {
    async fn start() -> (SocketAddr, Counting) {
        let counts = Counting::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = counts.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                c.accepted.fetch_add(1, Ordering::SeqCst);
                let now = c.open.fetch_add(1, Ordering::SeqCst) + 1;
                c.most_open.fetch_max(now, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let _ = c.serve(stream).await;
                    c.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr, counts)
    }

    /// Answers the requests of one connection until it closes.
    async fn serve(&self, stream: tokio::net::TcpStream) -> std::io::Result<()> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let mut stream = BufReader::new(stream);
        loop {
            let mut length = 0;
            loop {
                let mut line = String::new();
                if stream.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                let line = line.trim_end().to_ascii_lowercase();
                if line.is_empty() {
                    break;
                }
                if let Some(v) = line.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            stream.read_exact(&mut body).await?;
            self.requests.fetch_add(1, Ordering::SeqCst);
            if String::from_utf8_lossy(&body).contains("\"slow\"") {
                tokio::time::sleep(SLOW).await;
            }
            let answer = r#"{"allow": true, "user": "u", "action": "broadcast"}"#;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            );
            stream.get_mut().write_all(response.as_bytes()).await?;
        }
    }

    fn get(n: &AtomicUsize) -> usize {
        n.load(Ordering::SeqCst)
    }
}

/// The value of the counter `line_start` (a metric name with its labels) at `/metrics`.
async fn metric(port: u16, line_start: &str) -> f64 {
    let (_, text) = http(port, "GET", "/metrics", None, None).await;
    text.as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_reconnect_storm_never_opens_more_than_the_cap_of_backend_connections() {
    const CAP: usize = 8;
    const CLIENTS: usize = 200;
    let (addr, counts) = Counting::start().await;
    let dir = temp_dir("storm");
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nbackend_timeout_ms = 5000\nbackend_max_calls = {CAP}\n\n\
             [auth]\nconnect_url = \"http://{addr}/connect\"\n"
        ),
    )
    .unwrap();
    let server = spawn(&["--config", path.to_str().unwrap()], &[]).await;

    // Every client at once; the backend takes SLOW to answer each.
    let url = url(&server, "token=slow");
    let storm: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let outcome = connect(&url, None).await;
                (outcome, start.elapsed())
            })
        })
        .collect();
    let mut opened = Vec::new();
    let mut refused = 0;
    for task in storm {
        match task.await.unwrap() {
            (Connect::Open(client), took) => {
                assert!(took >= SLOW - Duration::from_millis(50), "{took:?}");
                opened.push(client);
            }
            (Connect::Refused(status), took) => {
                assert_eq!(status, 503);
                // At once: not queued behind the calls in flight.
                assert!(
                    took < SLOW - Duration::from_millis(300),
                    "refused after {took:?}"
                );
                refused += 1;
            }
        }
    }
    let most = Counting::get(&counts.most_open);
    assert!(most <= CAP, "{most} connections to the backend at once");
    assert!(opened.len() >= CAP, "only {} opened", opened.len());
    assert!(refused >= CLIENTS / 2, "only {refused} refused");
    assert_eq!(opened.len(), Counting::get(&counts.requests));
    assert_eq!(
        metric(
            server.port,
            "firebrand_backend_calls_refused_total{call=\"connect\"}"
        )
        .await,
        refused as f64
    );

    // One call at a time: the connections are reused, not one per call.
    let before = Counting::get(&counts.accepted);
    let fast = format!("{}&token=fast", server.url());
    for _ in 0..20 {
        opened.push(Box::new(connect(&fast, None).await.open()));
    }
    let new = Counting::get(&counts.accepted) - before;
    assert!(new <= 1, "{new} new connections for 20 sequential calls");
    assert!(Counting::get(&counts.most_open) <= CAP);
}

#[tokio::test]
async fn joins_and_pushes_beyond_the_cap_are_refused_at_once() {
    let (addr, counts) = Counting::start().await;
    let dir = temp_dir("cap-joins");
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nbackend_timeout_ms = 5000\nbackend_max_calls = 1\n\n\
             [[namespace]]\nprefix = \"priv:\"\njoin = \"backend\"\njoin_url = \"http://{addr}/join\"\n\n\
             [[namespace]]\nprefix = \"chat:\"\npushes = \"backend\"\npush_url = \"http://{addr}/push\"\n"
        ),
    )
    .unwrap();
    let server = spawn(&["--config", path.to_str().unwrap()], &[]).await;
    let mut a = connect(&server.url(), None).await.open();
    let mut b = connect(&server.url(), None).await.open();
    assert_eq!(a.join("chat:x").await.0, "ok");
    assert_eq!(b.join("chat:x").await.0, "ok");
    // A's push holds the only call for SLOW.
    let slow = a
        .send(Some("1"), "chat:x", "say", json!({"t": "slow"}))
        .await;
    while Counting::get(&counts.requests) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    assert_eq!(
        b.join("priv:1").await,
        ("error".into(), json!({"reason": "backend unavailable"}))
    );
    let r = b
        .send(Some("1"), "chat:x", "say", json!({"t": "fast"}))
        .await;
    assert_eq!(
        b.reply(&r).await,
        ("error".into(), json!({"reason": "backend unavailable"}))
    );
    assert!(start.elapsed() < SLOW / 2, "{:?}", start.elapsed());
    assert_eq!(a.reply(&slow).await.0, "ok");
    // The call done, the next one passes.
    assert_eq!(b.join("priv:1").await.0, "ok");
    assert_eq!(
        metric(
            server.port,
            "firebrand_backend_calls_refused_total{call=\"join\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            server.port,
            "firebrand_backend_calls_refused_total{call=\"push\"}"
        )
        .await,
        1.0
    );
}
