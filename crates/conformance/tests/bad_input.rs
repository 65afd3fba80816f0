//! Bad input has a defined outcome that touches only the offending connection.

mod common;

use std::time::Duration;

use common::*;
use firebrand_conformance::Config;
use serde_json::json;
use tokio::io::AsyncReadExt;

/// A well-behaved client joined to `room:witness`, to show others are unaffected.
async fn witness(s: &Server) -> Client {
    let mut w = s.client("").await;
    w.join("1", "room:witness", json!({"joined": "witness"}))
        .await;
    w
}

#[tokio::test]
async fn malformed_json_closes_with_1007() {
    let s = start().await;
    let mut w = witness(&s).await;
    for bad in [
        "this is not json",
        r#"["1","2","room:lobby"]"#,
        r#"{"topic":"x"}"#,
        r#"[1,2,3,4,5]"#,
    ] {
        let mut c = s.client("").await;
        c.send_text(bad).await;
        let reason = c.expect_close(1007).await;
        assert!(reason.starts_with("malformed frame"), "{bad}: {reason}");
    }
    w.ping_roundtrip("1", "2", "room:witness").await;
    assert_eq!(s.endpoint.stats().protocol_errors, 4);
}

#[tokio::test]
async fn unknown_binary_kind_and_binary_on_v1_close_with_1007() {
    let s = start().await;
    let mut w = witness(&s).await;
    let mut c = s.client("").await;
    c.send_binary(vec![7, 0, 0, 0, 0]).await;
    assert_eq!(c.expect_close(1007).await, "unknown binary frame kind 7");
    let mut v1 = Client::connect(&s.url("vsn=1.0.0")).await;
    v1.send_binary(vec![0, 0, 0, 0, 0]).await;
    assert_eq!(v1.expect_close(1007).await, "binary frames need vsn=2.0.0");
    w.ping_roundtrip("1", "2", "room:witness").await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let s = start().await;
    let mut w = witness(&s).await;
    let mut raw = Raw::connect(&s, "vsn=2.0.0").await;
    raw.send_frame(
        true,
        1,
        b"[\"1\",\"1\",\"room:\xff\",\"phx_join\",{}]",
        true,
    )
    .await;
    raw.expect_close(1007).await;
    w.ping_roundtrip("1", "2", "room:witness").await;
}

#[tokio::test]
async fn unmasked_client_frame_closes_with_1002() {
    let s = start().await;
    let mut w = witness(&s).await;
    let mut raw = Raw::connect(&s, "vsn=2.0.0").await;
    raw.send_frame(true, 1, br#"[null,"1","phoenix","heartbeat",{}]"#, false)
        .await;
    raw.expect_close(1002).await;
    w.ping_roundtrip("1", "2", "room:witness").await;
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let s = start().await;
    let mut w = witness(&s).await;
    let mut raw = Raw::connect(&s, "vsn=2.0.0").await;
    // The header announces 2 MiB (over the 1 MiB default): refused before the body is read.
    let big = format!(
        r#"["1","1","room:lobby","ping",{{"x":"{}"}}]"#,
        "a".repeat(2 << 20)
    );
    raw.send_frame(true, 1, big.as_bytes(), true).await;
    raw.expect_close(1009).await;
    w.ping_roundtrip("1", "2", "room:witness").await;
}

#[tokio::test]
async fn fragmented_message_over_the_limit_closes_with_1009() {
    let s = start().await;
    let mut raw = Raw::connect(&s, "vsn=2.0.0").await;
    let chunk = vec![b'a'; 512 * 1024];
    raw.send_frame(false, 1, &chunk, true).await;
    raw.send_frame(false, 0, &chunk, true).await;
    raw.send_frame(true, 0, &chunk, true).await;
    raw.expect_close(1009).await;
}

#[tokio::test]
async fn a_flood_of_joins_gets_100_channels_and_clear_refusals() {
    let s = start().await;
    let mut w = witness(&s).await;
    let mut c = s.client("").await;
    const JOINS: usize = 2_000;
    for i in 0..JOINS {
        let r = i.to_string();
        c.send(json!([r, r, format!("room:flood{i}"), "phx_join", {}]))
            .await;
    }
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..JOINS {
        let frame = c.recv_json().await;
        assert_eq!(frame[3], "phx_reply");
        match frame[4]["status"].as_str() {
            Some("ok") => ok += 1,
            Some("error") => {
                assert_eq!(
                    frame[4]["response"],
                    json!({"reason": "too many channels joined"})
                );
                refused += 1;
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!((ok, refused), (100, JOINS - 100));
    c.heartbeat("h").await;
    w.ping_roundtrip("1", "2", "room:witness").await;
}

#[tokio::test]
async fn events_for_10000_distinct_topics_cost_nothing_lasting() {
    let s = start().await;
    let mut w = witness(&s).await;
    let mut c = s.client("").await;
    const TOPICS: usize = 10_000;
    for i in 0..TOPICS {
        let r = i.to_string();
        c.send(json!([null, r, format!("room:t{i}"), "new_msg", {"body": "x"}]))
            .await;
    }
    for i in 0..TOPICS {
        c.expect(unmatched(&i.to_string(), &format!("room:t{i}")))
            .await;
    }
    // Only the witness's topic has subscribers: nothing was kept per stray topic.
    assert_eq!(s.endpoint.stats().topics, 1);
    w.ping_roundtrip("1", "2", "room:witness").await;
}

#[tokio::test]
async fn idle_connections_are_closed_and_heartbeats_keep_them_open() {
    let s = start_with(Config {
        idle_timeout: Duration::from_millis(300),
        ..Config::default()
    })
    .await;
    let mut c = s.client("").await;
    let opened = tokio::time::Instant::now();
    // Heartbeats every 100 ms keep the connection open well past the timeout.
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.heartbeat(&i.to_string()).await;
    }
    assert!(opened.elapsed() > Duration::from_millis(600));
    assert_eq!(c.expect_close(1001).await, "idle timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_others_keep_up() {
    let s = start_with(Config {
        outbound_limit: 256 * 1024,
        ..Config::default()
    })
    .await;
    let mut good = s.client("").await;
    good.join("1", "room:firehose", json!({"joined": "firehose"}))
        .await;
    let mut slow = Raw::connect(&s, "vsn=2.0.0").await;
    slow.send_text(r#"["1","1","room:firehose","phx_join",{}]"#)
        .await;
    // The slow client's join reply proves it is subscribed; it never reads again after it.
    let (_, reply) = slow.read_frame().await;
    assert!(
        String::from_utf8(reply)
            .unwrap()
            .contains(r#""status":"ok""#)
    );

    let body = "x".repeat(1000);
    let mut sent = 0u64;
    // Bounded: at most 200,000 messages (200 MB) before the test gives up.
    for round in 0..(200_000 / 50) {
        for i in 0..50 {
            s.endpoint.broadcast(
                "room:firehose",
                "tick",
                json!({"n": round * 50 + i, "body": body}),
            );
        }
        sent += 50;
        // The good client reads everything, in order.
        for i in 0..50 {
            let f = good.recv_json().await;
            assert_eq!(f[4]["n"], round * 50 + i);
        }
        if s.endpoint.stats().slow_consumers == 1 {
            break;
        }
    }
    assert_eq!(
        s.endpoint.stats().slow_consumers,
        1,
        "slow client never detected after {sent} messages"
    );
    slow.drain_until_eof().await;
    good.ping_roundtrip("1", "2", "room:firehose").await;
    assert_eq!(s.endpoint.stats().connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshakes_are_cut_at_the_header_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start().await;
    let mut w = witness(&s).await;
    // 200 clients that start a request head and never finish it.
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .unwrap();
        slow.push(tcp);
    }
    // Others are unaffected meanwhile.
    w.ping_roundtrip("1", "2", "room:witness").await;
    let late = s.client("").await;
    drop(late);
    // Each slow connection is closed by the server once the deadline passes.
    for mut tcp in slow {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(HEADER_TIMEOUT + WAIT, tcp.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => continue, // a 408 response, then the close
                Err(_) => panic!("slowloris connection still open after the header deadline"),
            }
        }
    }
    w.ping_roundtrip("1", "3", "room:witness").await;
}

#[tokio::test]
async fn a_ping_flood_is_answered_and_harms_no_one() {
    let s = start().await;
    let mut w = witness(&s).await;
    let mut raw = Raw::connect(&s, "vsn=2.0.0").await;
    for i in 0..5_000u32 {
        raw.send_frame(true, 9, &i.to_be_bytes(), true).await;
    }
    raw.send_text(r#"[null,"hb","phoenix","heartbeat",{}]"#)
        .await;
    // Pongs (opcode 10) may come first; the heartbeat reply arrives.
    loop {
        let (op, payload) = raw.read_frame().await;
        if op == 1 {
            assert!(String::from_utf8(payload).unwrap().contains(r#""hb""#));
            break;
        }
        assert_eq!(op, 10, "only pongs before the reply");
    }
    w.ping_roundtrip("1", "2", "room:witness").await;
}

/// Sends a close frame with `payload` on a new connection; asserts the server answers with
/// `answer` (a close frame with that code) and then closes the TCP connection.
async fn close_answered_with(s: &Server, payload: &[u8], answer: u16) {
    let mut raw = Raw::connect(s, "vsn=2.0.0").await;
    raw.send_close(payload).await;
    assert_eq!(
        raw.read_close().await,
        Some(answer),
        "answer to {payload:?}"
    );
    raw.drain_until_eof().await;
}

#[tokio::test]
async fn a_close_with_a_valid_code_is_echoed() {
    let s = start().await;
    for code in [
        1000, 1001, 1002, 1003, 1007, 1010, 1011, 1012, 1014, 3000, 4999,
    ] {
        let mut payload = u16::to_be_bytes(code).to_vec();
        payload.extend_from_slice("au revoir, d\u{e9}j\u{e0}".as_bytes());
        close_answered_with(&s, &payload, code).await;
    }
    // An empty close frame is answered with 1000.
    close_answered_with(&s, b"", 1000).await;
}

#[tokio::test]
async fn a_close_with_a_code_that_may_not_be_sent_gets_1002() {
    let s = start().await;
    let mut w = witness(&s).await;
    // RFC 6455 §7.4: unassigned (0–999, 1016–2999, 5000 and up), reserved (1004), and never
    // on the wire (1005 no status, 1006 abnormal closure, 1015 TLS failure).
    for code in [
        0,
        999,
        1004,
        1005,
        1006,
        1015,
        1016,
        2000,
        2999,
        5000,
        u16::MAX,
    ] {
        close_answered_with(&s, &code.to_be_bytes(), 1002).await;
    }
    w.ping_roundtrip("1", "2", "room:witness").await;
}

#[tokio::test]
async fn a_close_with_a_1_byte_payload_gets_1002() {
    let s = start().await;
    close_answered_with(&s, &[0x03], 1002).await;
}

#[tokio::test]
async fn a_close_reason_that_is_not_utf8_gets_1007() {
    let s = start().await;
    close_answered_with(&s, &[0x03, 0xE8, b'o', b'k', 0xFF], 1007).await;
}

#[tokio::test]
async fn a_close_between_the_fragments_of_a_message_is_handled() {
    let s = start().await;
    let mut raw = Raw::connect(&s, "vsn=2.0.0").await;
    // Control frames may come between fragments (RFC 6455 §5.4): a ping is answered, and a
    // close closes, the unfinished message is dropped.
    raw.send_frame(false, 1, br#"[null,"1","phoe"#, true).await;
    raw.send_frame(true, 9, b"p", true).await;
    assert_eq!(raw.read_frame().await, (10, b"p".to_vec()));
    raw.send_close(&1001u16.to_be_bytes()).await;
    assert_eq!(raw.read_close().await, Some(1001));
    raw.drain_until_eof().await;
}

/// A client that stops reading in the middle of a big frame, then a close (a `disconnect` of
/// its socket id, or a drain): once the client reads again it gets whole frames and then the
/// close frame, never a close frame written into the middle of another frame.
#[tokio::test]
async fn a_close_while_a_write_is_blocked_waits_for_the_frame() {
    for (how, code) in [("disconnect", 1001u16), ("shutdown", 1012)] {
        // Room for the big frame besides the presence frames that a user's join brings.
        let s = start_with(Config {
            outbound_limit: 64 << 20,
            ..Config::default()
        })
        .await;
        // A small receive buffer: the server's write blocks after a few hundred kilobytes.
        let mut raw = Raw::connect_with_recv_buffer(&s, "vsn=2.0.0&user=slow", 4096).await;
        raw.send_text(r#"["1","1","room:big","phx_join",{}]"#).await;
        let (_, reply) = raw.read_frame().await;
        assert!(
            String::from_utf8(reply)
                .unwrap()
                .contains(r#""status":"ok""#)
        );

        // 16 MiB: more than the kernel buffers, so the write stays blocked in its middle.
        let body = "x".repeat(16 << 20);
        s.endpoint
            .broadcast("room:big", "big", json!({ "body": body }));
        let len = loop {
            let (op, len) = raw.read_frame_header().await;
            assert_eq!(op, 1);
            if len > body.len() {
                break len;
            }
            // A presence frame.
            let mut skip = vec![0; len];
            raw.tcp.read_exact(&mut skip).await.unwrap();
        };

        // The server is now writing the frame and the client reads nothing.
        match how {
            "disconnect" => s.endpoint.disconnect("user_socket:slow"),
            _ => {
                let endpoint = s.endpoint.clone();
                tokio::spawn(async move { endpoint.shutdown(WAIT).await });
            }
        }

        let mut payload = vec![0; len];
        tokio::time::timeout(WAIT, raw.tcp.read_exact(&mut payload))
            .await
            .expect("the frame's payload")
            .unwrap_or_else(|e| panic!("{how}: the frame was cut: {e}"));
        let frame: serde_json::Value = serde_json::from_slice(&payload)
            .unwrap_or_else(|e| panic!("{how}: the frame was not kept whole: {e}"));
        assert_eq!(frame[3], "big");
        assert_eq!(frame[4]["body"].as_str().map(str::len), Some(body.len()));
        // Whole frames (presence frames queued meanwhile), then the close frame.
        loop {
            let (op, payload) = raw.read_frame().await;
            if op == 8 {
                assert_eq!(payload[..2], code.to_be_bytes(), "{how}");
                break;
            }
            assert_eq!(op, 1, "{how}");
            let frame: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert!(
                frame[3].as_str().unwrap().starts_with("presence_"),
                "{frame}"
            );
        }
        raw.send_close(&code.to_be_bytes()).await;
        raw.drain_until_eof().await;
    }
}
