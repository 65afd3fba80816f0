//! Webhooks against a real receiver (axum on 127.0.0.1:0, in this process): topics occupied
//! and vacated once per node, presence joins and leaves with user and meta, every body signed,
//! and a receiver that is down neither holds joins up nor goes unnoticed. Every request is
//! verified as the README tells receivers: the signature over the attempt's timestamp and the
//! body, and a unique event id (the same across the attempts of one event).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::*;
use hmac::{Hmac, Mac};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;

const SECRET: &str = "webhook-secret-for-the-tests-0123456789";
const JWT: &str = "jwt-secret-for-webhook-tests-0123456789";

/// `sha256=<hex>` of `"{timestamp}.{body}"`, as the receiver computes it.
fn signature(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// One request the receiver got.
#[derive(Debug)]
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    body: Bytes,
    /// Whether the receiver answered 2xx.
    accepted: bool,
}

impl Delivery {
    /// Verifies it as a receiver should, and decodes the event: the signature over the
    /// timestamp and the body, a timestamp within 5 minutes of now and not before the event,
    /// the id header the body's.
    fn verify(&self) -> Value {
        assert_eq!(
            self.signature,
            signature(&self.timestamp, &self.body),
            "a bad signature"
        );
        // The timestamp is signed: changed by a millisecond, or left out, it fails.
        let stamp: u64 = self.timestamp.parse().unwrap();
        assert_ne!(
            self.signature,
            signature(&(stamp + 1).to_string(), &self.body)
        );
        assert_ne!(self.signature, signature("", &self.body));
        let now = now() * 1000;
        assert!(stamp.abs_diff(now) < 5 * 60 * 1000, "{stamp} vs {now}");
        let event: Value = serde_json::from_slice(&self.body).unwrap();
        assert!(stamp >= event["time_ms"].as_u64().unwrap());
        assert_eq!(event["id"], self.id.as_str());
        assert_eq!(self.id.len(), 32, "{}", self.id);
        assert!(self.id.bytes().all(|b| b.is_ascii_hexdigit()));
        event
    }
}

#[derive(Clone)]
struct Receiver {
    tx: mpsc::UnboundedSender<Delivery>,
    /// Answer 500 to the first attempt of each event.
    fail_first: bool,
    seen: Arc<Mutex<HashSet<String>>>,
}

/// Passes each request on, accepted (200) unless it is the first attempt of an event and the
/// receiver fails those.
async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap())
            .to_owned()
    };
    let id = header("x-firebrand-event-id");
    let accepted = !r.fail_first || !r.seen.lock().unwrap().insert(id.clone());
    let _ = r.tx.send(Delivery {
        id,
        timestamp: header("x-firebrand-timestamp"),
        signature: header("x-firebrand-signature"),
        body,
        accepted,
    });
    if accepted {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

/// The receiver on a free port; the requests it got, in order.
async fn receiver_failing_first(fail_first: bool) -> (String, mpsc::UnboundedReceiver<Delivery>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Receiver {
        tx,
        fail_first,
        seen: Arc::default(),
    };
    let app = Router::new()
        .route("/events", post(receive))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/events"), rx)
}

async fn receiver() -> (String, mpsc::UnboundedReceiver<Delivery>) {
    receiver_failing_first(false).await
}

/// The next request, as it came.
async fn next_delivery(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no webhook in time")
        .unwrap()
}

/// The next event, verified.
async fn next(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> Value {
    next_delivery(rx).await.verify()
}

fn token(sub: &str) -> String {
    let claims = json!({"sub": sub, "exp": now() + 300, "info": {"name": sub}});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(JWT.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn topics_occupied_once_and_vacated_when_the_last_leaves() {
    let (url, mut rx) = receiver().await;
    let server = spawn(
        &[],
        &[
            ("FIREBRAND_WEBHOOK_URL", &url),
            ("FIREBRAND_WEBHOOK_SECRET", SECRET),
        ],
    )
    .await;
    let mut a = connect(&server.url(), None).await.open();
    let mut b = connect(&server.url(), None).await.open();
    assert_eq!(a.join("room:1").await.0, "ok");
    let occupied = next(&mut rx).await;
    assert_eq!(occupied["event"], "topic_occupied");
    assert_eq!(occupied["topic"], "room:1");
    assert_eq!(occupied["node"], Value::Null);
    assert!(occupied["time_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(occupied.get("user").is_none());

    // The second subscriber sends nothing: the next event is the sentinel's (one sender, in
    // order).
    assert_eq!(b.join("room:1").await.0, "ok");
    assert_eq!(b.join("room:sentinel").await.0, "ok");
    let sentinel = next(&mut rx).await;
    assert_eq!(
        (&sentinel["event"], &sentinel["topic"]),
        (&json!("topic_occupied"), &json!("room:sentinel"))
    );

    // One leaves, then the other's connection goes: vacated once.
    let r = a.send(Some("1"), "room:1", "phx_leave", json!({})).await;
    assert_eq!(a.reply(&r).await.0, "ok");
    drop(b);
    let mut vacated = Vec::new();
    while vacated.len() < 2 {
        let event = next(&mut rx).await;
        assert_eq!(event["event"], "topic_vacated", "{event}");
        vacated.push(event["topic"].as_str().unwrap().to_owned());
    }
    vacated.sort();
    assert_eq!(vacated, ["room:1", "room:sentinel"]);
    // Occupied again after being vacated.
    assert_eq!(a.join("room:1").await.0, "ok");
    assert_eq!(next(&mut rx).await["event"], "topic_occupied");
}

#[tokio::test]
async fn presence_joins_and_leaves_with_user_and_meta() {
    let (url, mut rx) = receiver().await;
    let dir = temp_dir("webhooks-presence");
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        format!(
            "[auth]\njwt_hs256_secret = \"{JWT}\"\n\n[webhooks]\nurl = \"{url}\"\n\
             secret = \"{SECRET}\"\nevents = [\"presence_join\", \"presence_leave\"]\n\n\
             [[namespace]]\nprefix = \"room:\"\npresence = true\n"
        ),
    )
    .unwrap();
    let server = spawn(&["--config", path.to_str().unwrap()], &[]).await;
    let url = |user: &str| format!("{}&token={}", server.url(), token(user));
    let mut alice1 = connect(&url("alice"), None).await.open();
    let mut alice2 = connect(&url("alice"), None).await.open();
    let mut bob = connect(&url("bob"), None).await.open();

    assert_eq!(alice1.join("room:1").await.0, "ok");
    let join = next(&mut rx).await;
    assert_eq!(join["event"], "presence_join");
    assert_eq!(join["topic"], "room:1");
    assert_eq!(join["user"], "alice");
    assert_eq!(
        join["meta"],
        json!({"user": "alice", "info": {"name": "alice"}})
    );
    // Alice's second socket is not a new presence; Bob's is.
    assert_eq!(alice2.join("room:1").await.0, "ok");
    alice2.recv_event("presence_state").await;
    assert_eq!(bob.join("room:1").await.0, "ok");
    let join = next(&mut rx).await;
    assert_eq!(
        (&join["event"], &join["user"]),
        (&json!("presence_join"), &json!("bob"))
    );

    // Alice leaves when her last socket goes.
    drop(alice1);
    let r = bob.send(Some("1"), "room:1", "phx_leave", json!({})).await;
    assert_eq!(bob.reply(&r).await.0, "ok");
    let leave = next(&mut rx).await;
    assert_eq!(
        (&leave["event"], &leave["user"]),
        (&json!("presence_leave"), &json!("bob"))
    );
    drop(alice2);
    let leave = next(&mut rx).await;
    assert_eq!(leave["event"], "presence_leave");
    assert_eq!(leave["user"], "alice");
    assert_eq!(leave["meta"]["info"], json!({"name": "alice"}));
}

#[tokio::test]
async fn a_receiver_that_is_down_holds_nothing_up_and_the_loss_is_counted() {
    let dead = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{dead}/events");
    let server = spawn(
        &[],
        &[
            ("FIREBRAND_WEBHOOK_URL", &url),
            ("FIREBRAND_WEBHOOK_SECRET", SECRET),
            ("FIREBRAND_BACKEND_TIMEOUT_MS", "200"),
        ],
    )
    .await;
    let mut client = connect(&server.url(), None).await.open();
    let started = std::time::Instant::now();
    for i in 0..20 {
        assert_eq!(client.join(&format!("room:{i}")).await.0, "ok");
    }
    assert!(started.elapsed() < Duration::from_secs(2), "joins held up");
    let mut lost = 0.0;
    for _ in 0..200 {
        let (_, text) = http(server.port, "GET", "/metrics", None, None).await;
        let text = text.as_str().unwrap().to_owned();
        lost = text
            .lines()
            .find(|l| l.starts_with("firebrand_webhooks_lost_total{reason=\"failed\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0);
        if lost >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lost >= 1.0, "no loss counted");
}

#[tokio::test]
async fn each_event_has_a_unique_id_and_each_attempt_a_fresh_signed_timestamp() {
    let mut ids = HashSet::new();
    for _restart in 0..2 {
        // A receiver each: the first server's vacated events do not mix in.
        let (url, mut rx) = receiver_failing_first(true).await;
        let envs = [
            ("FIREBRAND_WEBHOOK_URL", url.as_str()),
            ("FIREBRAND_WEBHOOK_SECRET", SECRET),
        ];
        let server = spawn(&[], &envs).await;
        let mut client = connect(&server.url(), None).await.open();
        for topic in ["room:1", "room:2"] {
            assert_eq!(client.join(topic).await.0, "ok");
            // Refused, then retried after the backoff: the same event, id and body, with a
            // later timestamp, signed anew.
            let first = next_delivery(&mut rx).await;
            assert!(!first.accepted);
            let event = first.verify();
            assert_eq!(event["topic"], topic);
            let retry = next_delivery(&mut rx).await;
            assert!(retry.accepted);
            assert_eq!(retry.verify(), event);
            assert_eq!((&retry.id, &retry.body), (&first.id, &first.body));
            let (t1, t2): (u64, u64) = (
                first.timestamp.parse().unwrap(),
                retry.timestamp.parse().unwrap(),
            );
            assert!(t2 >= t1 + 100, "{t1} then {t2}: not the attempt's time");
            assert_ne!(retry.signature, first.signature);
            // Unique: across events, and across servers (a restart, another node).
            assert!(ids.insert(first.id), "a repeated id");
        }
    }
    assert_eq!(ids.len(), 4);
}
