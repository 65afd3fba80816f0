//! Criterion benches of the hot paths: V2 encode of a broadcast and of a reply, decode of a
//! client push (`firebrand_protocol::Serializer`), topic routing, a broadcast's fan-out into the
//! connections' queues, a message's way through a channel's mailbox, a frame's way through a
//! connection's outbox to its writer and the connection's per-read idle bookkeeping
//! (`firebrand::benching`, hidden entry points).
//!
//! `cargo bench -p firebrand-bench --bench hot_paths`

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use bytes::Bytes;
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use firebrand_protocol::{Outbound, Payload, Serializer};

fn protocol(c: &mut Criterion) {
    let payload = Payload::json(&serde_json::json!({
        "t": "000000123456789",
        "p": "x".repeat(80),
    }))
    .unwrap();
    let mut g = c.benchmark_group("v2");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode broadcast 150 B", |b| {
        b.iter(|| {
            let out = Outbound::broadcast(black_box("room:fanout"), "bench", &payload);
            Serializer::V2.encode(&out).unwrap()
        })
    });
    g.bench_function("encode binary broadcast 100 B", |b| {
        let bin = Payload::binary(vec![7u8; 100]);
        b.iter(|| {
            let out = Outbound::broadcast(black_box("room:fanout"), "bench", &bin);
            Serializer::V2.encode(&out).unwrap()
        })
    });
    let ping = Payload::json(&serde_json::json!({"t": "000000123456789"})).unwrap();
    g.bench_function("encode reply (echo's ping)", |b| {
        b.iter(|| {
            let out = Outbound::Reply {
                join_ref: Some("1"),
                r#ref: Some(black_box("12345")),
                topic: "room:echo5",
                status: "ok",
                payload: &ping,
            };
            Serializer::V2.encode(&out).unwrap()
        })
    });
    let push = Bytes::from_static(
        br#"["1","2","room:lobby","new_msg",{"body":"hello there, this is a typical chat message","user":"alice"}]"#,
    );
    g.bench_function("decode_text push", |b| {
        b.iter(|| Serializer::V2.decode_text(black_box(push.clone())).unwrap())
    });
    let heartbeat = Bytes::from_static(br#"[null,"5","phoenix","heartbeat",{}]"#);
    g.bench_function("decode_text heartbeat", |b| {
        b.iter(|| {
            Serializer::V2
                .decode_text(black_box(heartbeat.clone()))
                .unwrap()
        })
    });
    g.finish();
}

fn routing(c: &mut Criterion) {
    let routes = firebrand::benching::Routes::new(&["notifications", "user:*", "game:*", "room:*"]);
    c.bench_function("route room:lobby (4th of 4 patterns)", |b| {
        b.iter(|| routes.serves(black_box("room:lobby")))
    });
}

fn fanout(c: &mut Criterion) {
    let payload = Payload::json(&serde_json::json!({"body": "x".repeat(100)})).unwrap();
    let mut g = c.benchmark_group("fanout");
    for n in [100u64, 10_000] {
        let fanout = firebrand::benching::Fanout::new(n as usize, payload.clone());
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("broadcast into {n} queues"), |b| {
            b.iter(|| assert_eq!(fanout.broadcast(), n))
        });
    }
    g.finish();
}

/// One channel's track and end, beside 1,000 and 100,000 other presences: the same cost.
fn presence(c: &mut Criterion) {
    let mut g = c.benchmark_group("presence");
    for n in [1_000, 100_000] {
        let presences = firebrand::benching::Presences::new(n);
        g.bench_function(format!("track + channel end beside {n} presences"), |b| {
            b.iter(|| presences.track_and_end())
        });
    }
    // A drain of a node holding 100,000 presences: every channel ends (the tracker's work).
    g.sample_size(10);
    g.bench_function("every channel of 100000 presences ends (a drain)", |b| {
        b.iter_batched(
            || firebrand::benching::Presences::new(100_000),
            |presences| presences.end_all(),
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// A message through a channel task's mailbox to the waiting task: one, and a burst of 64.
fn mailbox(c: &mut Criterion) {
    let mut g = c.benchmark_group("mailbox");
    let mut one = firebrand::benching::ChannelMailbox::new(1);
    g.throughput(Throughput::Elements(1));
    g.bench_function("round trip to a waiting receiver", |b| {
        b.iter(|| one.round_trip())
    });
    let mut burst = firebrand::benching::ChannelMailbox::new(64);
    g.throughput(Throughput::Elements(64));
    g.bench_function("64 sent then received", |b| {
        b.iter(|| assert_eq!(burst.batch(), 64))
    });
    g.finish();
}

/// A connection's outbox: a broadcast's frame to the waiting writer, and what an idle
/// connection's task does per wake-up and per read.
fn outbox(c: &mut Criterion) {
    let payload = Payload::json(&serde_json::json!({"body": "x".repeat(100)})).unwrap();
    let conn = firebrand::benching::Connection::new(payload);
    let mut g = c.benchmark_group("outbox");
    g.throughput(Throughput::Elements(1));
    g.bench_function(
        "broadcast frame to a waiting writer (poll_ready + take)",
        |b| b.iter(|| assert_eq!(conn.deliver(), 1)),
    );
    g.bench_function("poll_ready, nothing queued", |b| {
        b.iter(|| assert!(conn.poll_ready_idle()))
    });
    g.bench_function("poll_close, open", |b| {
        b.iter(|| assert!(conn.poll_close_open()))
    });
    g.bench_function("touch (idle deadline, per read)", |b| {
        b.iter(|| conn.touch())
    });
    g.finish();
}

criterion_group!(
    benches, protocol, routing, fanout, presence, mailbox, outbox
);
criterion_main!(benches);
