//! Exact frame layouts of the three serializers (PROTOCOL.md §1.4–1.6): V1 JSON objects, V2
//! JSON arrays and V2 binary frames, as in shared/conformance/FRAMES.md.

mod common;

use common::*;
use serde_json::{Value, json};

/// A V1 (`vsn=1.0.0`) client.
async fn v1_client(s: &Server) -> Client {
    Client::connect(&s.url("vsn=1.0.0")).await
}

/// The next frame of a V1 client: a JSON object with exactly the keys topic, event, payload
/// and ref (V1 never sends `join_ref`).
async fn recv_v1(c: &mut Client) -> Value {
    let v = c.recv_json().await;
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("V1 frame is not an object: {v}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["event", "payload", "ref", "topic"], "V1 frame {v}");
    v
}

/// Asserts that the next V1 frame is exactly `expected`.
async fn expect_v1(c: &mut Client, expected: Value) {
    assert_eq!(recv_v1(c).await, expected);
}

fn v1_reply(r: &str, topic: &str, status: &str, response: Value) -> Value {
    json!({
        "event": "phx_reply",
        "payload": {"response": response, "status": status},
        "ref": r,
        "topic": topic
    })
}

/// A V1 heartbeat round trip: proves that nothing was queued before its reply.
async fn v1_heartbeat(c: &mut Client, r: &str) {
    c.send(json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": r}))
        .await;
    expect_v1(c, v1_reply(r, "phoenix", "ok", json!({}))).await;
}

/// The next frame, which must be binary.
async fn recv_binary(c: &mut Client) -> Vec<u8> {
    match c.recv().await {
        Frame::Binary(b) => b,
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

// ---- V1 JSON -------------------------------------------------------------------------------

/// FRAMES.md "protocol vsn=1.0.0", frame for frame.
#[tokio::test]
async fn v1_transcript() {
    let s = start().await;
    let mut c = v1_client(&s).await;
    c.send_text(r#"{"topic":"room:lobby","event":"phx_join","payload":{},"ref":"1"}"#)
        .await;
    expect_v1(&mut c, v1_reply("1", "room:lobby", "ok", json!({}))).await;
    c.send_text(r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"2"}"#)
        .await;
    expect_v1(&mut c, v1_reply("2", "phoenix", "ok", json!({}))).await;
    c.send_text(r#"{"topic":"room:lobby","event":"ping","payload":{"v":1},"ref":"3"}"#)
        .await;
    expect_v1(&mut c, v1_reply("3", "room:lobby", "ok", json!({"v": 1}))).await;
    c.send_text(r#"{"topic":"room:private","event":"phx_join","payload":{},"ref":"4"}"#)
        .await;
    expect_v1(
        &mut c,
        v1_reply(
            "4",
            "room:private",
            "error",
            json!({"reason": "unauthorized"}),
        ),
    )
    .await;
}

/// `join_ref` is accepted on input but never sent, not even in frames that carry one in V2
/// (replies, pushes, `phx_close`, `phx_error`).
#[tokio::test]
async fn v1_frames_never_carry_join_ref() {
    let s = start().await;
    let mut c = v1_client(&s).await;
    c.send(json!({"topic": "room:v1", "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"}))
        .await;
    expect_v1(
        &mut c,
        v1_reply("1", "room:v1", "ok", json!({"joined": "v1"})),
    )
    .await;
    c.send(json!({"topic": "room:v1", "event": "ping", "payload": {"a": 1}, "ref": "2", "join_ref": "1"}))
        .await;
    expect_v1(&mut c, v1_reply("2", "room:v1", "ok", json!({"a": 1}))).await;
    // A push: ref null.
    c.send(json!({"topic": "room:v1", "event": "push_me", "payload": {"p": true}, "ref": "3"}))
        .await;
    expect_v1(
        &mut c,
        json!({"event": "pushed", "payload": {"p": true}, "ref": null, "topic": "room:v1"}),
    )
    .await;
    expect_v1(&mut c, v1_reply("3", "room:v1", "ok", json!({}))).await;
    // Unmatched topic.
    c.send(json!({"topic": "room:nope", "event": "ping", "payload": {}, "ref": "4"}))
        .await;
    expect_v1(
        &mut c,
        v1_reply(
            "4",
            "room:nope",
            "error",
            json!({"reason": "unmatched topic"}),
        ),
    )
    .await;
    // phx_error after a crash: its ref is the join ref.
    c.send(json!({"topic": "room:v1", "event": "crash", "payload": {}, "ref": "5"}))
        .await;
    expect_v1(
        &mut c,
        json!({"event": "phx_error", "payload": {"reason": "channel_crash"}, "ref": "1", "topic": "room:v1"}),
    )
    .await;
    // phx_close after a leave.
    c.send(json!({"topic": "room:v1b", "event": "phx_join", "payload": {}, "ref": "6"}))
        .await;
    expect_v1(
        &mut c,
        v1_reply("6", "room:v1b", "ok", json!({"joined": "v1b"})),
    )
    .await;
    c.send(json!({"topic": "room:v1b", "event": "phx_leave", "payload": {}, "ref": "7"}))
        .await;
    expect_v1(&mut c, v1_reply("7", "room:v1b", "ok", json!({}))).await;
    expect_v1(
        &mut c,
        json!({"event": "phx_close", "payload": {}, "ref": "6", "topic": "room:v1b"}),
    )
    .await;
}

#[tokio::test]
async fn v1_broadcast_has_null_ref() {
    let s = start().await;
    let mut c = v1_client(&s).await;
    c.send(json!({"topic": "room:v1bc", "event": "phx_join", "payload": {}, "ref": "1"}))
        .await;
    expect_v1(
        &mut c,
        v1_reply("1", "room:v1bc", "ok", json!({"joined": "v1bc"})),
    )
    .await;
    c.send(
        json!({"topic": "room:v1bc", "event": "new_msg", "payload": {"body": "hello"}, "ref": "2"}),
    )
    .await;
    expect_v1(
        &mut c,
        json!({"event": "new_msg", "payload": {"body": "hello"}, "ref": null, "topic": "room:v1bc"}),
    )
    .await;
}

// ---- V2 binary -----------------------------------------------------------------------------

/// FRAMES.md "binary push (V2 binary frame) => binary reply", byte for byte: a binary `ping`
/// is echoed as a kind-1 reply, a binary `new_msg` is broadcast as a kind-2 frame.
#[tokio::test]
async fn v2_binary_transcript() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    let push: &[u8] = b"\x00\x01\x01\x0a\x04\x31\x32room:lobbyping\xde\xad\xbe\xef";
    assert_eq!(push.len(), 25);
    c.send_binary(push.to_vec()).await;
    let reply: &[u8] = b"\x01\x01\x01\x0a\x02\x31\x32room:lobbyok\xde\xad\xbe\xef";
    assert_eq!(reply.len(), 23);
    assert_eq!(recv_binary(&mut c).await, reply);
    let push: &[u8] = b"\x00\x01\x01\x0a\x07\x31\x33room:lobbynew_msgbin!";
    assert_eq!(push.len(), 28);
    c.send_binary(push.to_vec()).await;
    let broadcast: &[u8] = b"\x02\x0a\x07room:lobbynew_msgbin!";
    assert_eq!(broadcast.len(), 24);
    assert_eq!(recv_binary(&mut c).await, broadcast);
}

/// `binary_echo` replies with the same bytes in a kind-1 frame:
/// `kind, jr_len, ref_len, topic_len, status_len, jr, ref, topic, status, data`.
#[tokio::test]
async fn v2_binary_echo_reply_bytes() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:lobby", json!({})).await;
    // kind 0, jr "1", ref "2", topic "room:lobby" (10), event "binary_echo" (11).
    let push = [
        &[0x00, 0x01, 0x01, 0x0a, 0x0b][..],
        b"1",
        b"2",
        b"room:lobby",
        b"binary_echo",
        &[0xde, 0xad, 0xbe, 0xef],
    ]
    .concat();
    assert_eq!(push.len(), 5 + 1 + 1 + 10 + 11 + 4);
    c.send_binary(push).await;
    let reply = [
        &[0x01, 0x01, 0x01, 0x0a, 0x02][..],
        b"1",
        b"2",
        b"room:lobby",
        b"ok",
        &[0xde, 0xad, 0xbe, 0xef],
    ]
    .concat();
    assert_eq!(recv_binary(&mut c).await, reply);
    // Empty data and every byte value survive as they are.
    let data: Vec<u8> = (0..=255).collect();
    for (r, data) in [("3", Vec::new()), ("4", data)] {
        let push = [
            &[0x00, 0x01, 0x01, 0x0a, 0x0b][..],
            b"1",
            r.as_bytes(),
            b"room:lobby",
            b"binary_echo",
            &data,
        ]
        .concat();
        c.send_binary(push).await;
        let reply = [
            &[0x01, 0x01, 0x01, 0x0a, 0x02][..],
            b"1",
            r.as_bytes(),
            b"room:lobby",
            b"ok",
            &data,
        ]
        .concat();
        assert_eq!(recv_binary(&mut c).await, reply);
    }
    // The JSON side of the connection is unaffected.
    c.ping_roundtrip("1", "5", "room:lobby").await;
}

/// `binary_broadcast` reaches every V2 subscriber, the sender included, as a kind-2 frame
/// (`kind, topic_len, event_len, topic, event, data`); a V1 subscriber gets nothing.
#[tokio::test]
async fn v2_binary_broadcast_bytes_and_v1_subscribers_skip_it() {
    let s = start().await;
    let mut a = s.client("").await;
    let mut b = s.client("").await;
    let mut old = v1_client(&s).await;
    a.join("1", "room:bin", json!({"joined": "bin"})).await;
    b.join("5", "room:bin", json!({"joined": "bin"})).await;
    old.send(json!({"topic": "room:bin", "event": "phx_join", "payload": {}, "ref": "1"}))
        .await;
    expect_v1(
        &mut old,
        v1_reply("1", "room:bin", "ok", json!({"joined": "bin"})),
    )
    .await;

    // kind 0, jr "1", ref "2", topic "room:bin" (8), event "binary_broadcast" (16).
    let push = [
        &[0x00, 0x01, 0x01, 0x08, 0x10][..],
        b"1",
        b"2",
        b"room:bin",
        b"binary_broadcast",
        b"\x00bin\xff",
    ]
    .concat();
    a.send_binary(push).await;
    let broadcast = [
        &[0x02, 0x08, 0x10][..],
        b"room:bin",
        b"binary_broadcast",
        b"\x00bin\xff",
    ]
    .concat();
    assert_eq!(recv_binary(&mut b).await, broadcast);
    assert_eq!(recv_binary(&mut a).await, broadcast);

    // A JSON broadcast sent after it is the V1 client's next frame: it got no binary one.
    a.send(json!(["1", "3", "room:bin", "new_msg", {"body": "after"}]))
        .await;
    expect_v1(
        &mut old,
        json!({"event": "new_msg", "payload": {"body": "after"}, "ref": null, "topic": "room:bin"}),
    )
    .await;
    a.expect(json!([null, null, "room:bin", "new_msg", {"body": "after"}]))
        .await;
    b.expect(json!([null, null, "room:bin", "new_msg", {"body": "after"}]))
        .await;
    // And the V1 connection is still healthy.
    v1_heartbeat(&mut old, "2").await;
}

// ---- Mixed serializers on one topic ---------------------------------------------------------

/// One broadcast, each subscriber in its own format, whichever serializer sent it.
#[tokio::test]
async fn mixed_room_each_client_in_its_own_format() {
    let s = start().await;
    let mut v2 = s.client("").await;
    let mut v1 = v1_client(&s).await;
    v2.join("1", "room:mixed", json!({"joined": "mixed"})).await;
    v1.send(json!({"topic": "room:mixed", "event": "phx_join", "payload": {}, "ref": "1"}))
        .await;
    expect_v1(
        &mut v1,
        v1_reply("1", "room:mixed", "ok", json!({"joined": "mixed"})),
    )
    .await;

    v2.send(json!(["1", "2", "room:mixed", "new_msg", {"body": "from v2"}]))
        .await;
    v2.expect(json!([null, null, "room:mixed", "new_msg", {"body": "from v2"}]))
        .await;
    expect_v1(
        &mut v1,
        json!({"event": "new_msg", "payload": {"body": "from v2"}, "ref": null, "topic": "room:mixed"}),
    )
    .await;

    v1.send(json!({"topic": "room:mixed", "event": "new_msg", "payload": {"body": "from v1"}, "ref": "2"}))
        .await;
    expect_v1(
        &mut v1,
        json!({"event": "new_msg", "payload": {"body": "from v1"}, "ref": null, "topic": "room:mixed"}),
    )
    .await;
    v2.expect(json!([null, null, "room:mixed", "new_msg", {"body": "from v1"}]))
        .await;

    // A broadcast from outside any channel, too.
    let body = r#"{"topic":"room:mixed","event":"announce","payload":{"x":1}}"#;
    let req = format!(
        "POST /api/broadcast HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(s.http_status(&req).await, 200);
    v2.expect(json!([null, null, "room:mixed", "announce", {"x": 1}]))
        .await;
    expect_v1(
        &mut v1,
        json!({"event": "announce", "payload": {"x": 1}, "ref": null, "topic": "room:mixed"}),
    )
    .await;
}
