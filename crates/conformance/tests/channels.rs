//! Channel semantics over V2 JSON, frame by frame, as in shared/conformance/FRAMES.md.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn join_ok_reply_payload_and_refusal() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    c.send(json!(["3", "3", "room:42", "phx_join", {"some": "param"}]))
        .await;
    c.expect(ok_reply(Some("3"), "3", "room:42", json!({"joined": "42"})))
        .await;
    c.send(json!(["4", "4", "room:private", "phx_join", {}]))
        .await;
    c.expect(reply(
        Some("4"),
        "4",
        "room:private",
        "error",
        json!({"reason": "unauthorized"}),
    ))
    .await;
    // No channel exists after a refused join.
    c.send(json!(["4", "5", "room:private", "new_msg", {"body": "x"}]))
        .await;
    c.expect(unmatched("5", "room:private")).await;
}

#[tokio::test]
async fn heartbeat_and_unmatched_topics() {
    let s = start().await;
    let mut c = s.client("").await;
    c.heartbeat("1").await;
    c.send(json!([null, "2", "room:lobby", "new_msg", {"body": "not joined"}]))
        .await;
    c.expect(unmatched("2", "room:lobby")).await;
    c.send(json!(["3", "3", "room:lobby", "ping", {}])).await;
    c.expect(unmatched("3", "room:lobby")).await;
    c.send(json!(["4", "4", "nosuch:topic", "phx_join", {}]))
        .await;
    c.expect(unmatched("4", "nosuch:topic")).await;
    c.send(json!([null, "5", "phoenix", "something", {}])).await;
    c.expect(unmatched("5", "phoenix")).await;
}

#[tokio::test]
async fn ping_reply_and_broadcast_reaches_sender() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    c.send(json!(["1", "2", "room:lobby", "ping", {"n": 1, "s": "x"}]))
        .await;
    c.expect(ok_reply(
        Some("1"),
        "2",
        "room:lobby",
        json!({"n": 1, "s": "x"}),
    ))
    .await;
    c.send(json!(["1", "3", "room:lobby", "new_msg", {"body": "hello"}]))
        .await;
    c.expect(json!([null, null, "room:lobby", "new_msg", {"body": "hello"}]))
        .await;
}

#[tokio::test]
async fn broadcast_and_broadcast_from_between_clients() {
    let s = start().await;
    let mut a = s.client("").await;
    let mut b = s.client("").await;
    a.join("1", "room:bc", json!({"joined": "bc"})).await;
    b.join("7", "room:bc", json!({"joined": "bc"})).await;
    b.send(json!(["7", "8", "room:bc", "new_msg", {"body": "hi from B"}]))
        .await;
    a.expect(json!([null, null, "room:bc", "new_msg", {"body": "hi from B"}]))
        .await;
    b.expect(json!([null, null, "room:bc", "new_msg", {"body": "hi from B"}]))
        .await;

    b.send(json!(["7", "9", "room:bc", "new_msg_from", {"body": "not to me"}]))
        .await;
    a.expect(json!([null, null, "room:bc", "new_msg", {"body": "not to me"}]))
        .await;
    // B's next frame is its ping reply: it did not receive its own broadcast_from.
    b.ping_roundtrip("7", "10", "room:bc").await;
}

#[tokio::test]
async fn broadcast_from_outside_any_channel() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:api", json!({"joined": "api"})).await;
    let body = r#"{"topic":"room:api","event":"announce","payload":{"x":1}}"#;
    let req = format!(
        "POST /api/broadcast HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(s.http_status(&req).await, 200);
    c.expect(json!([null, null, "room:api", "announce", {"x": 1}]))
        .await;
    let bad = "POST /api/broadcast HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\n{\"a\":";
    assert_eq!(s.http_status(bad).await, 400);
    assert_eq!(
        s.http_status("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await,
        200
    );
}

/// Broadcasts that come together (requests pipelined on one HTTP connection) reach each
/// subscriber in one write, not one write per few broadcasts: the subscribers' writers are woken
/// once the HTTP connection has handled every request it has read.
#[tokio::test]
async fn pipelined_broadcasts_reach_each_subscriber_in_one_write() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SUBSCRIBERS: u64 = 4;
    const BROADCASTS: u64 = 50;
    let s = start().await;
    let mut subs = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut c = s.client("").await;
        c.join("1", "room:burst", json!({"joined": "burst"})).await;
        subs.push(c);
    }
    let before = s.endpoint.stats();
    let mut requests = String::new();
    for i in 0..BROADCASTS {
        let body = json!({"topic": "room:burst", "event": "n", "payload": {"i": i}}).to_string();
        let close = if i + 1 == BROADCASTS {
            "connection: close\r\n"
        } else {
            ""
        };
        requests.push_str(&format!(
            "POST /api/broadcast HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n{close}\r\n{body}",
            body.len()
        ));
    }
    // All in one write: the server reads them together, as a burst from a publisher.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(requests.as_bytes()).await.unwrap();
    let mut answers = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut answers))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        answers.matches("HTTP/1.1 200 OK").count() as u64,
        BROADCASTS
    );
    for c in &mut subs {
        for i in 0..BROADCASTS {
            c.expect(json!([null, null, "room:burst", "n", {"i": i}]))
                .await;
        }
    }
    let after = s.endpoint.stats();
    assert_eq!(
        after.frames_out - before.frames_out,
        SUBSCRIBERS * BROADCASTS
    );
    // One write each; two if a subscriber's writer ran while the requests were still arriving.
    let writes = after.writes_out - before.writes_out;
    assert!(
        writes <= 2 * SUBSCRIBERS,
        "{writes} writes for {BROADCASTS} broadcasts to {SUBSCRIBERS} subscribers"
    );
}

#[tokio::test]
async fn crash_gives_phx_error_and_the_channel_can_be_rejoined() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    c.join("9", "room:other", json!({"joined": "other"})).await;
    c.send(json!(["1", "2", "room:lobby", "crash", {}])).await;
    c.expect(json!(["1", "1", "room:lobby", "phx_error", {"reason": "channel_crash"}]))
        .await;
    c.send(json!(["1", "3", "room:lobby", "ping", {}])).await;
    c.expect(unmatched("3", "room:lobby")).await;
    // The socket and its other channel live on.
    c.ping_roundtrip("9", "10", "room:other").await;
    c.join("4", "room:lobby", json!({})).await;
    c.send(json!(["4", "5", "room:lobby", "ping", {"after": "rejoin"}]))
        .await;
    c.expect(ok_reply(
        Some("4"),
        "5",
        "room:lobby",
        json!({"after": "rejoin"}),
    ))
    .await;
}

#[tokio::test]
async fn join_crash_replies_join_crashed() {
    let s = start().await;
    let mut c = s.client("").await;
    c.send(json!(["1", "1", "room:join_crash", "phx_join", {}]))
        .await;
    c.expect(reply(
        Some("1"),
        "1",
        "room:join_crash",
        "error",
        json!({"reason": "join crashed"}),
    ))
    .await;
    c.send(json!(["1", "2", "room:join_crash", "ping", {}]))
        .await;
    c.expect(unmatched("2", "room:join_crash")).await;
}

#[tokio::test]
async fn duplicate_join_with_new_join_ref() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    c.send(json!(["2", "2", "room:lobby", "phx_join", {}]))
        .await;
    c.expect(ok_reply(Some("2"), "2", "room:lobby", json!({})))
        .await;
    c.expect(json!(["1", "1", "room:lobby", "phx_close", {}]))
        .await;
    // The stale join_ref is dropped silently; the fresh one answers.
    c.send(json!(["1", "3", "room:lobby", "ping", {"stale": true}]))
        .await;
    c.send(json!(["2", "4", "room:lobby", "ping", {"fresh": true}]))
        .await;
    c.expect(ok_reply(
        Some("2"),
        "4",
        "room:lobby",
        json!({"fresh": true}),
    ))
    .await;
}

#[tokio::test]
async fn duplicate_join_with_same_join_ref() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    c.send(json!(["1", "2", "room:lobby", "phx_join", {}]))
        .await;
    c.expect(ok_reply(Some("1"), "2", "room:lobby", json!({})))
        .await;
    c.expect(json!(["1", "1", "room:lobby", "phx_close", {}]))
        .await;
    c.ping_roundtrip("1", "3", "room:lobby").await;
}

#[tokio::test]
async fn leave_then_unmatched_and_leave_of_unjoined_topic() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    c.send(json!(["1", "2", "room:lobby", "phx_leave", {}]))
        .await;
    c.expect(ok_reply(Some("1"), "2", "room:lobby", json!({})))
        .await;
    c.expect(json!(["1", "1", "room:lobby", "phx_close", {}]))
        .await;
    c.send(json!(["1", "3", "room:lobby", "ping", {}])).await;
    c.expect(unmatched("3", "room:lobby")).await;
    c.send(json!(["9", "4", "room:never", "phx_leave", {}]))
        .await;
    c.expect(ok_reply(Some("9"), "4", "room:never", json!({})))
        .await;
}

#[tokio::test]
async fn stale_leave_after_rejoin_is_ignored() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    c.send(json!(["2", "2", "room:lobby", "phx_join", {}]))
        .await;
    c.expect(ok_reply(Some("2"), "2", "room:lobby", json!({})))
        .await;
    c.expect(json!(["1", "1", "room:lobby", "phx_close", {}]))
        .await;
    c.send(json!(["1", "3", "room:lobby", "phx_leave", {}]))
        .await;
    c.send(json!(["2", "4", "room:lobby", "ping", {"still": "joined"}]))
        .await;
    c.expect(ok_reply(
        Some("2"),
        "4",
        "room:lobby",
        json!({"still": "joined"}),
    ))
    .await;
}

#[tokio::test]
async fn join_with_null_join_ref_uses_its_ref() {
    let s = start().await;
    let mut c = s.client("").await;
    c.send(json!([null, "5", "room:7", "phx_join", {}])).await;
    c.expect(ok_reply(None, "5", "room:7", json!({"joined": "7"})))
        .await;
    c.send(json!([null, "6", "room:7", "ping", {"a": 1}])).await;
    c.expect(ok_reply(Some("5"), "6", "room:7", json!({"a": 1})))
        .await;
    c.send(json!(["5", "7", "room:7", "crash", {}])).await;
    c.expect(json!(["5", "5", "room:7", "phx_error", {"reason": "channel_crash"}]))
        .await;
}

#[tokio::test]
async fn replies_pushes_and_stop() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:r", json!({"joined": "r"})).await;
    c.send(json!(["1", "2", "room:r", "error_reply", {}])).await;
    c.expect(reply(
        Some("1"),
        "2",
        "room:r",
        "error",
        json!({"reason": "requested"}),
    ))
    .await;
    c.send(json!(["1", "3", "room:r", "push_me", {"k": "v"}]))
        .await;
    c.expect(json!(["1", null, "room:r", "pushed", {"k": "v"}]))
        .await;
    c.expect(ok_reply(Some("1"), "3", "room:r", json!({})))
        .await;
    c.send(json!(["1", "4", "room:r", "async_reply", {"later": true}]))
        .await;
    c.expect(ok_reply(Some("1"), "4", "room:r", json!({"later": true})))
        .await;
    c.send(json!(["1", "5", "room:r", "unknown_event", {}]))
        .await;
    c.send(json!(["1", "6", "room:r", "stop", {}])).await;
    c.expect(ok_reply(Some("1"), "6", "room:r", json!({})))
        .await;
    c.expect(json!(["1", "1", "room:r", "phx_close", {}])).await;
    c.send(json!(["1", "7", "room:r", "ping", {}])).await;
    c.expect(unmatched("7", "room:r")).await;
}

#[tokio::test]
async fn decode_failure_in_a_handler_is_an_error_reply() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:d", json!({"joined": "d"})).await;
    c.send(json!(["1", "2", "room:d", "sleep", {"ms": "soon"}]))
        .await;
    let got = c.recv_json().await;
    assert_eq!(got[4]["status"], "error");
    let reason = got[4]["response"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("invalid payload: ms: invalid type"),
        "{reason}"
    );
    c.ping_roundtrip("1", "3", "room:d").await;
}

#[tokio::test]
async fn intercepted_shout_is_filtered_per_subscriber() {
    let s = start().await;
    let mut alice = s.client("user=alice").await;
    let mut anon = s.client("").await;
    alice
        .join("1", "room:shout", json!({"joined": "shout"}))
        .await;
    anon.join("1", "room:shout", json!({"joined": "shout"}))
        .await;
    anon.send(json!(["1", "2", "room:shout", "shout", {"msg": "hey"}]))
        .await;
    alice
        .expect(json!(["1", null, "room:shout", "shout", {"msg": "hey", "to": "alice"}]))
        .await;
    anon.expect(json!(["1", null, "room:shout", "shout", {"msg": "hey", "to": null}]))
        .await;
}

#[tokio::test]
async fn disconnect_closes_every_socket_of_the_user() {
    let s = start().await;
    let mut a1 = s.client("user=dana").await;
    let mut a2 = s.client("user=dana").await;
    let mut other = s.client("user=erin").await;
    a1.join("1", "room:dc", json!({"joined": "dc"})).await;
    a2.join("1", "room:dc2", json!({"joined": "dc2"})).await;
    other.join("1", "room:dc", json!({"joined": "dc"})).await;
    a1.send(json!(["1", "2", "room:dc", "disconnect_me", {}]))
        .await;
    a1.expect_close(1001).await;
    a2.expect_close(1001).await;
    other.ping_roundtrip("1", "3", "room:dc").await;
}

#[tokio::test]
async fn too_many_channels() {
    let s = start().await;
    let mut c = s.client("").await;
    for i in 0..100 {
        let (r, topic) = (i.to_string(), format!("room:{i}"));
        c.join(&r, &topic, json!({"joined": i.to_string()})).await;
    }
    c.send(json!(["x", "x", "room:one-more", "phx_join", {}]))
        .await;
    c.expect(reply(
        Some("x"),
        "x",
        "room:one-more",
        "error",
        json!({"reason": "too many channels joined"}),
    ))
    .await;
    // Rejoining an existing topic replaces its channel and is not refused.
    c.send(json!(["y", "y", "room:5", "phx_join", {}])).await;
    c.expect(ok_reply(Some("y"), "y", "room:5", json!({"joined": "5"})))
        .await;
    c.expect(json!(["5", "5", "room:5", "phx_close", {}])).await;
}

#[tokio::test]
async fn slow_join_and_slow_handler_block_nothing_else() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:fast", json!({"joined": "fast"})).await;
    // The join sleeps 500 ms and the handler 2 s: answers on other topics come first.
    c.send(json!(["2", "2", "room:slow_join", "phx_join", {}]))
        .await;
    c.send(json!(["1", "3", "room:fast", "sleep", {"ms": 2000}]))
        .await;
    c.join("4", "room:other", json!({"joined": "other"})).await;
    c.ping_roundtrip("4", "5", "room:other").await;
    c.heartbeat("6").await;
    c.expect(ok_reply(Some("2"), "2", "room:slow_join", json!({})))
        .await;
    c.expect(ok_reply(Some("1"), "3", "room:fast", json!({})))
        .await;
}

#[tokio::test]
async fn pushes_queued_behind_a_slow_join_are_handled_after_it() {
    let s = start().await;
    let mut c = s.client("").await;
    c.send(json!(["1", "1", "room:slow_join", "phx_join", {}]))
        .await;
    c.send(json!(["1", "2", "room:slow_join", "ping", {"queued": true}]))
        .await;
    c.expect(ok_reply(Some("1"), "1", "room:slow_join", json!({})))
        .await;
    c.expect(ok_reply(
        Some("1"),
        "2",
        "room:slow_join",
        json!({"queued": true}),
    ))
    .await;
}
