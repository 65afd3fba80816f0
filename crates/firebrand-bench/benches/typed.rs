//! What a typed channel costs against the untyped path, in one sitting: the same push (`add`,
//! two numbers, answered with their sum) through the in-process test client, handled once by a
//! `TypedChannel` (`Handle<Add>`: decoded by the dispatch, the reply encoded from its type) and
//! once by a `Channel` that matches the event string, decodes with `payload.decode()?` and
//! encodes the reply with `Payload::json`. Everything else on the way (the client's frame, the
//! connection, the channel's mailbox, the reply frame) is the same code.
//!
//! `cargo bench -p firebrand-bench --bench typed`; the same in instructions, which do not drift
//! with the machine's load: `examples/typed_cost.rs`.

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

#[path = "common/typed_channels.rs"]
mod channels;

use criterion::{Criterion, criterion_group, criterion_main};

fn typed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_socket, mut client) = channels::joined(&rt);
    let payload = channels::payload();
    let mut g = c.benchmark_group("push add, reply sum (round trip)");
    // Interleaved in one sitting: the ratio is what counts, not the absolute time.
    for topic in ["typed:1", "untyped:1"] {
        g.bench_function(topic.trim_end_matches(":1"), |b| {
            b.iter(|| {
                let reply = rt.block_on(client.request(topic, "add", payload.clone()));
                assert_eq!(reply.status(), "ok", "{:?}", reply.payload());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, typed);
criterion_main!(benches);
