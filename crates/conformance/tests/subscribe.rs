//! Server-side subscribers (`Endpoint::subscribe`) across a cluster on the real Redis and NATS:
//! a node's Rust code receives what any node broadcasts, in order, and on a recoverable topic
//! with the position every node gives it.

use std::time::Duration;

use firebrand::{Endpoint, Subscription};
use firebrand_conformance::Config;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);

fn node(engine: &str, namespace: &str) -> Endpoint {
    let builder = firebrand_conformance::endpoint(&Config::default());
    match engine {
        "redis" => builder.adapter(
            firebrand_redis::RedisAdapter::new("redis://127.0.0.1:6379")
                .unwrap()
                .namespace(namespace),
        ),
        _ => builder.adapter(
            firebrand_nats::NatsAdapter::new("nats://127.0.0.1:4222").namespace(namespace),
        ),
    }
    .build()
}

/// The next broadcast's `n` (failing after [`WAIT`]).
async fn next_n(sub: &mut Subscription) -> (u64, Option<String>) {
    let b = tokio::time::timeout(WAIT, sub.recv())
        .await
        .unwrap()
        .unwrap();
    let n = b.payload().to_value().unwrap()["n"].as_u64().unwrap();
    (n, b.position().map(str::to_owned))
}

async fn across(engine: &str) {
    let ns = format!("subscribe-{engine}-{}", std::process::id());
    let (a, b) = (node(engine, &ns), node(engine, &ns));
    let mut sub = b.subscribe("room:jobs", 64);
    // The engine subscriptions are made in the background: probe until one crosses.
    let mut crossed = false;
    for _ in 0..100 {
        a.broadcast("room:jobs", "probe", json!({"n": 0}));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
            crossed = true;
            break;
        }
    }
    assert!(crossed, "node a's broadcasts never reached node b");
    while sub.try_recv().is_some() {}
    for n in 1..=10 {
        a.broadcast("room:jobs", "new_msg", json!({ "n": n }));
    }
    for n in 1..=10 {
        assert_eq!(next_n(&mut sub).await, (n, None));
    }

    // A recoverable topic: the history is in the engine; both nodes' subscribers see the same
    // positions.
    let (mut on_a, mut on_b) = (
        a.subscribe("stream:jobs", 256),
        b.subscribe("stream:jobs", 256),
    );
    // (The engine's history is set up in the background too: until it is, appends are lost.)
    let mut got_b = None;
    for n in 1..=100 {
        a.broadcast("stream:jobs", "new_msg", json!({ "n": n }));
        if let Ok(Ok(b)) = tokio::time::timeout(Duration::from_millis(50), on_b.recv()).await {
            let n = b.payload().to_value().unwrap()["n"].as_u64().unwrap();
            got_b = Some((n, b.position().map(str::to_owned)));
            break;
        }
    }
    let got_b = got_b.expect("a recorded broadcast reached node b");
    // Node a may have got earlier ones (its history reader may have started first): the same
    // broadcast has the same position there.
    let mut got_a = next_n(&mut on_a).await;
    while got_a.0 < got_b.0 {
        got_a = next_n(&mut on_a).await;
    }
    assert_eq!(got_a, got_b);
    assert!(got_b.1.is_some(), "a position");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_across_redis_nodes() {
    across("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_across_nats_nodes() {
    across("nats").await;
    let js =
        async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await.unwrap());
    let name = format!("FIREBRAND_subscribe-nats-{}", std::process::id());
    let _ = js.delete_stream(name).await;
}
