//! Per-connection limits: each has an error reply, a counter, and no effect on anyone else.

mod common;

use common::*;
use firebrand_conformance::Config;
use serde_json::{Value, json};

fn limited() -> Config {
    Config {
        message_rate: Some(50),
        join_rate: Some(5),
        ..Config::default()
    }
}

fn reason(frame: &Value) -> Option<&str> {
    (frame[4]["status"] == "error")
        .then(|| frame[4]["response"]["reason"].as_str())
        .flatten()
}

#[tokio::test]
async fn message_and_join_rates() {
    let s = start_with(limited()).await;
    let mut w = s.client("").await;
    w.join("1", "room:witness", json!({"joined": "witness"}))
        .await;
    let mut flood = s.client("").await;
    for i in 0..200 {
        flood
            .send(json!([null, i.to_string(), "phoenix", "heartbeat", {}]))
            .await;
    }
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..200 {
        match reason(&flood.recv_json().await) {
            None => ok += 1,
            Some(r) => {
                assert_eq!(r, "rate limited");
                refused += 1;
            }
        }
    }
    // A burst of 50 passes (plus whatever refilled meanwhile); the rest is refused.
    assert!((50..150).contains(&ok), "{ok} passed");
    assert_eq!(ok + refused, 200);
    assert!(s.endpoint.stats().rate_limited >= refused as u64);
    w.ping_roundtrip("1", "2", "room:witness").await;

    let mut joiner = s.client("").await;
    for i in 0..20 {
        joiner
            .send(json!([
                i.to_string(),
                i.to_string(),
                format!("room:j{i}"),
                "phx_join",
                {}
            ]))
            .await;
    }
    let mut refused_joins = 0;
    for _ in 0..20 {
        if reason(&joiner.recv_json().await) == Some("rate limited") {
            refused_joins += 1;
        }
    }
    assert!(refused_joins >= 10, "{refused_joins} joins refused");
}

#[tokio::test]
async fn payload_and_topic_size() {
    let s = start().await;
    let mut c = s.client("").await;
    c.join("1", "room:sizes", json!({"joined": "sizes"})).await;
    let big = "x".repeat(300 * 1024);
    c.send(json!(["1", "2", "room:sizes", "ping", {"big": big}]))
        .await;
    c.expect(reply(
        Some("1"),
        "2",
        "room:sizes",
        "error",
        json!({"reason": "payload too large"}),
    ))
    .await;
    let topic = format!("room:{}", "t".repeat(300));
    c.send(json!(["3", "3", topic, "phx_join", {}])).await;
    c.expect(reply(
        Some("3"),
        "3",
        &topic,
        "error",
        json!({"reason": "topic too long"}),
    ))
    .await;
    c.ping_roundtrip("1", "4", "room:sizes").await;
    let stats = s.endpoint.stats();
    assert_eq!((stats.payloads_too_large, stats.topics_too_long), (1, 1));
}
