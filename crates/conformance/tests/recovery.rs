//! Recovery on rejoin (APP.md, "StreamChannel"), frame by frame: broadcasts on stream topics
//! carry their position in the ref slot; a join with `since` gets what it missed, in order and
//! once, then live broadcasts; `recovered: false` when the history no longer reaches back.
//!
//! Every case runs on a node alone (the history in the process) and on a node of a cluster
//! whose history is in the engine (the real Redis and NATS of this machine).

mod common;

use std::time::Duration;

use common::*;
use firebrand_conformance::Config;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug)]
enum Engine {
    Alone,
    Redis,
    Nats,
}

/// A case on an engine: the engine, and the case's name (its cluster's namespace).
type On = (Engine, &'static str);

/// The conformance app with `config`, on a node alone or of a cluster of its own on `engine`.
async fn start_on(on: On, config: Config) -> Server {
    start_budgeted(
        on,
        config,
        firebrand::EndpointBuilder::DEFAULT_HISTORY_BUDGET,
    )
    .await
}

/// [`start_on`], the node's histories within `budget` bytes.
async fn start_budgeted((engine, case): On, config: Config, budget: usize) -> Server {
    // Warnings (a failed read, a lost append) show in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let builder = firebrand_conformance::endpoint(&config).history_budget(budget);
    let namespace = format!("recovery-{case}-{}", std::process::id());
    let builder = match engine {
        Engine::Alone => builder,
        Engine::Redis => builder.adapter(
            firebrand_redis::RedisAdapter::new("redis://127.0.0.1:6379")
                .unwrap()
                .namespace(&namespace),
        ),
        Engine::Nats => builder.adapter(
            firebrand_nats::NatsAdapter::new("nats://127.0.0.1:4222").namespace(&namespace),
        ),
    };
    start_endpoint(&config, builder.build()).await
}

/// Deletes the JetStream stream of case `case` (NATS keeps streams on disk).
async fn delete_stream(case: &str) {
    let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let name = format!("FIREBRAND_recovery-{case}-{}", std::process::id());
    js.delete_stream(name).await.unwrap();
}

/// Each case as a test on every engine.
macro_rules! on_every_engine {
    ($($case:ident),* $(,)?) => {
        mod alone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::$case((super::Engine::Alone, stringify!($case))).await
            })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::$case((super::Engine::Redis, stringify!($case))).await
            })*
        }
        mod nats {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::$case((super::Engine::Nats, stringify!($case))).await;
                super::delete_stream(stringify!($case)).await;
            })*
        }
    };
}

on_every_engine!(
    broadcasts_carry_positions_and_a_rejoin_gets_what_it_missed_in_order_once,
    a_position_the_history_no_longer_reaches_is_not_recovered,
    v1_clients_get_the_position_as_ref_and_binary_broadcasts_are_not_recorded,
    rejoins_racing_a_publisher_see_every_message_once_in_order,
    only_new_msg_and_api_broadcasts_are_recorded,
    past_the_history_budget_the_oldest_go_first_and_are_not_recovered_alone,
);

/// Joins `topic` with `params`; returns the reply's response.
async fn join(c: &mut Client, jr: &str, topic: &str, params: Value) -> Value {
    c.send(json!([jr, jr, topic, "phx_join", params])).await;
    let f = c.recv_json().await;
    assert_eq!(
        (&f[3], &f[4]["status"]),
        (&json!("phx_reply"), &json!("ok")),
        "{f}"
    );
    f[4]["response"].clone()
}

/// Publishes `new_msg {n}` on `topic` with `POST /api/broadcast`.
async fn publish(server: &Server, topic: &str, n: u64) {
    let body = json!({"topic": topic, "event": "new_msg", "payload": {"n": n}}).to_string();
    let request = format!(
        "POST /api/broadcast HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(server.http_status(&request).await, 200);
}

/// Receives `count` broadcasts of `new_msg`: `(n, position)` each.
async fn received(c: &mut Client, count: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < count {
        let f = c.recv_json().await;
        if f[3] == "new_msg" {
            assert_eq!(f[0], Value::Null, "a broadcast: {f}");
            let position = f[1]
                .as_str()
                .expect("a position in the ref slot")
                .to_owned();
            got.push((f[4]["n"].as_u64().unwrap(), position));
        }
    }
    got
}

async fn broadcasts_carry_positions_and_a_rejoin_gets_what_it_missed_in_order_once(engine: On) {
    let server = start_on(engine, Config::default()).await;
    let mut watcher = server.client("vsn=2.0.0").await;
    let start_position = join(&mut watcher, "1", "stream:a", json!({})).await["position"].clone();
    assert!(start_position.is_string());

    for n in 1..=3 {
        publish(&server, "stream:a", n).await;
    }
    let seen = received(&mut watcher, 3).await;
    assert_eq!(seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3]);
    for (_, p) in &seen {
        assert!(
            p.parse::<f64>().is_err(),
            "a position is never a number: {p}"
        );
    }
    let positions: std::collections::BTreeSet<_> = seen.iter().map(|(_, p)| p).collect();
    assert_eq!(positions.len(), 3);

    // A client that saw only the first rejoins (on a new connection, as after a drop) while
    // more come: it gets 2 and 3 right after the reply, then the live ones, each once.
    let mut back = server.client("vsn=2.0.0").await;
    publish(&server, "stream:a", 4).await;
    // (In a cluster the broadcast is dispatched once the engine hands it back.)
    let fourth = received(&mut watcher, 1).await;
    let reply = join(&mut back, "5", "stream:a", json!({"since": seen[0].1})).await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(reply["joined"], "a");
    publish(&server, "stream:a", 5).await;
    let got = received(&mut back, 4).await;
    assert_eq!(
        got.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    assert_eq!(got[..2], seen[1..]);
    // The reply's position is the 4th's: the last one replayed.
    assert_eq!(reply["position"], json!(got[2].1));

    // The watcher saw the same positions live.
    let live = received(&mut watcher, 1).await;
    assert_eq!([fourth, live].concat(), got[2..]);
    back.ping_roundtrip("5", "6", "stream:a").await;

    // From the empty history's position: everything.
    let mut all = server.client("vsn=2.0.0").await;
    let reply = join(&mut all, "1", "stream:a", json!({"since": start_position})).await;
    assert_eq!(reply["recovered"], true);
    let replayed = received(&mut all, 5).await;
    assert_eq!(
        replayed.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
}

async fn a_position_the_history_no_longer_reaches_is_not_recovered(engine: On) {
    let config = Config {
        stream_history: 2,
        ..Config::default()
    };
    let server = start_on(engine, config).await;
    let mut watcher = server.client("vsn=2.0.0").await;
    join(&mut watcher, "1", "stream:b", json!({})).await;
    for n in 1..=4 {
        publish(&server, "stream:b", n).await;
    }
    let seen = received(&mut watcher, 4).await;
    let mut other = server.client("vsn=2.0.0").await;
    join(&mut other, "1", "stream:other", json!({})).await;
    publish(&server, "stream:other", 1).await;
    let other_position = received(&mut other, 1).await[0].1.clone();

    // Kept: the last two. From the 2nd, nothing is missing; from the 1st, the 2nd is.
    let mut c = server.client("vsn=2.0.0").await;
    assert_eq!(
        join(&mut c, "1", "stream:b", json!({"since": seen[1].1})).await["recovered"],
        true
    );
    assert_eq!(received(&mut c, 2).await, seen[2..]);
    for since in [
        json!(seen[0].1),
        json!(other_position),
        json!("garbage"),
        json!(42),
        json!(null),
        json!({"a": 1}),
    ] {
        let mut c = server.client("vsn=2.0.0").await;
        let reply = join(&mut c, "1", "stream:b", json!({ "since": since })).await;
        assert_eq!(reply["recovered"], false, "since {since}");
        assert_eq!(reply["position"], json!(seen[3].1));
        // Nothing replayed: the next frame is the ping's reply.
        c.ping_roundtrip("1", "2", "stream:b").await;
    }
    // Room topics have no history: no position, no `recovered`.
    let mut room = server.client("vsn=2.0.0").await;
    let reply = join(&mut room, "1", "room:x", json!({"since": seen[3].1})).await;
    assert_eq!(reply, json!({"joined": "x"}));
}

async fn v1_clients_get_the_position_as_ref_and_binary_broadcasts_are_not_recorded(engine: On) {
    let server = start_on(engine, Config::default()).await;
    let mut v1 = server.client("vsn=1.0.0").await;
    v1.send(json!({"topic": "stream:c", "event": "phx_join", "payload": {}, "ref": "1"}))
        .await;
    let reply = v1.recv_json().await;
    assert_eq!(reply["payload"]["status"], "ok");
    let start_position = reply["payload"]["response"]["position"].clone();
    publish(&server, "stream:c", 1).await;
    let f = v1.recv_json().await;
    assert_eq!(f["event"], "new_msg");
    let position = f["ref"].as_str().expect("the position as ref").to_owned();

    // A binary broadcast goes out as usual (a binary frame, no ref) and is not recorded.
    let mut v2 = server.client("vsn=2.0.0").await;
    join(&mut v2, "1", "stream:c", json!({})).await;
    // kind 0 (push), jr "1", ref "2", topic "stream:c" (8), event "binary_broadcast" (16).
    let push = [
        &[0x00, 0x01, 0x01, 0x08, 0x10][..],
        b"1",
        b"2",
        b"stream:c",
        b"binary_broadcast",
        b"\x01\x02",
    ]
    .concat();
    v2.send_binary(push).await;
    match v2.recv().await {
        Frame::Binary(b) => assert_eq!(b[0], 2, "a binary broadcast frame"),
        f => panic!("{f:?}"),
    }
    let mut back = server.client("vsn=2.0.0").await;
    let reply = join(&mut back, "1", "stream:c", json!({"since": start_position})).await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(reply["position"], json!(position));
    let replayed = received(&mut back, 1).await;
    assert_eq!(replayed, [(1, position)]);
    back.ping_roundtrip("1", "2", "stream:c").await;
}

/// Publishers and rejoining clients at once: every rejoin sees a run of consecutive messages
/// from its `since` on, with none missing, none twice, none out of order.
async fn rejoins_racing_a_publisher_see_every_message_once_in_order(engine: On) {
    let server = start_on(engine, Config::default()).await;
    let mut first = server.client("vsn=2.0.0").await;
    join(&mut first, "1", "stream:race", json!({})).await;
    let url = server.url("vsn=2.0.0");
    let publisher = tokio::spawn(async move {
        let mut p = Client::connect(&url).await;
        join(&mut p, "1", "stream:race", json!({})).await;
        for n in 1..=400u64 {
            p.send(json!(["1", null, "stream:race", "new_msg", {"n": n}]))
                .await;
        }
        p
    });
    let seen = received(&mut first, 400).await;
    assert_eq!(
        seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>()
    );
    drop(publisher.await.unwrap());

    // Now rejoin from every 40th position while a second publisher runs.
    let url = server.url("vsn=2.0.0");
    let publisher = tokio::spawn(async move {
        let mut p = Client::connect(&url).await;
        join(&mut p, "1", "stream:race", json!({})).await;
        for n in 401..=800u64 {
            p.send(json!(["1", null, "stream:race", "new_msg", {"n": n}]))
                .await;
            if n % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        p
    });
    let mut joins = Vec::new();
    for i in (0..400).step_by(40) {
        let (url, since, from) = (server.url("vsn=2.0.0"), seen[i].1.clone(), seen[i].0);
        joins.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            let reply = join(&mut c, "1", "stream:race", json!({ "since": since })).await;
            assert_eq!(reply["recovered"], true);
            let got = received(&mut c, (800 - from) as usize).await;
            let ns: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
            assert_eq!(ns, (from + 1..=800).collect::<Vec<_>>());
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    drop(publisher.await.unwrap());
}

/// APP.md: on stream topics `new_msg` pushes and API broadcasts are recorded; other events
/// (`new_msg_from`, the intercepted `shout`) go out without a position and are not replayed.
async fn only_new_msg_and_api_broadcasts_are_recorded(engine: On) {
    let server = start_on(engine, Config::default()).await;
    let topic = "stream:unrecorded";
    let mut watcher = server.client("vsn=2.0.0").await;
    let start = join(&mut watcher, "1", topic, json!({})).await["position"].clone();
    let mut sender = server.client("vsn=2.0.0").await;
    join(&mut sender, "1", topic, json!({})).await;
    sender
        .send(json!(["1", null, topic, "new_msg_from", {"n": 1}]))
        .await;
    watcher
        .expect(json!([null, null, topic, "new_msg", {"n": 1}]))
        .await;
    sender
        .send(json!(["1", null, topic, "shout", {"n": 2}]))
        .await;
    watcher
        .expect(json!(["1", null, topic, "shout", {"n": 2, "to": null}]))
        .await;
    sender
        .send(json!(["1", null, topic, "new_msg", {"n": 3}]))
        .await;
    let third = received(&mut watcher, 1).await;
    assert_eq!(third[0].0, 3);
    // From the start: only the recorded one.
    let mut back = server.client("vsn=2.0.0").await;
    let reply = join(&mut back, "1", topic, json!({ "since": start })).await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(received(&mut back, 1).await, third);
    back.ping_roundtrip("1", "2", topic).await;
}

async fn past_the_history_budget_the_oldest_go_first_and_are_not_recovered_alone(engine: On) {
    // About five entries of these (each counted 2 × (payload, topic, event) + 512 bytes; a
    // topic holding any, its name + 512).
    const BUDGET: usize = 4000;
    let server = start_budgeted(engine, Config::default(), BUDGET).await;
    let mut watcher = server.client("vsn=2.0.0").await;
    let start = join(&mut watcher, "1", "stream:old", json!({})).await["position"].clone();
    join(&mut watcher, "2", "stream:new", json!({})).await;
    for n in 1..=2 {
        publish(&server, "stream:old", n).await;
    }
    let old = received(&mut watcher, 2).await;
    // Another topic fills the budget: the oldest entries, stream:old's, are evicted.
    for n in 1..=4 {
        publish(&server, "stream:new", n).await;
    }
    received(&mut watcher, 4).await;
    // The budget is enforced right after a broadcast is dispatched (outside its topic's lock):
    // the last one may have reached the watcher just before.
    let mut stats = server.endpoint.stats();
    for _ in 0..400 {
        if stats.history_evictions >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        stats = server.endpoint.stats();
    }
    assert!(stats.history_evictions >= 1, "{stats:?}");
    assert!(stats.history_bytes <= BUDGET as u64, "{stats:?}");

    let mut back = server.client("vsn=2.0.0").await;
    let reply = join(&mut back, "1", "stream:old", json!({"since": start})).await;
    assert_eq!(reply["position"], json!(old[1].1));
    match engine.0 {
        // The first is gone from this node: not recovered, nothing replayed.
        Engine::Alone => {
            assert_eq!(reply["recovered"], false);
            back.ping_roundtrip("1", "2", "stream:old").await;
        }
        // The ring is only the node's cache: the engine still has them.
        Engine::Redis | Engine::Nats => {
            assert_eq!(reply["recovered"], true);
            assert_eq!(received(&mut back, 2).await, old);
        }
    }
    // The newest are kept.
    let kept = server
        .endpoint
        .history("stream:new", None)
        .await
        .unwrap()
        .broadcasts;
    assert!(kept.len() >= 2, "{}", kept.len());
}
