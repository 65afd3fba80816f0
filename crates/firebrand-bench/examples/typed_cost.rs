//! What a typed push costs against the untyped path, in instructions (repeatable where timings
//! on a shared machine are not): `n` round trips of the same push through the channel of
//! `topic` (`typed:1` or `untyped:1`, see `benches/common/typed_channels.rs`). Run it twice
//! per topic under callgrind and take the difference, so that set-up cancels out:
//!
//! ```sh
//! cargo build --release -p firebrand-bench --example typed_cost
//! for t in typed:1 untyped:1; do for n in 1000 11000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/typed_cost $t $n 2>&1 | grep refs; done; done
//! ```
//!
//! (instructions of 11,000 − of 1,000) / 10,000 = instructions per round trip. It also prints
//! the size of each channel's `handle_in` future (what the channel's task boxes per message).

#[path = "../benches/common/typed_channels.rs"]
mod channels;

use firebrand::{Channel, ChannelContext, Payload};

/// The size of the future a channel's `handle_in` returns.
fn future_size<'a, C: Channel, F: std::future::Future>(
    _: fn(&'a mut C, &'a str, Payload, &'a mut ChannelContext<C>) -> F,
) -> usize {
    std::mem::size_of::<F>()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "typed:1".into());
    let n: usize = args.next().map_or(Ok(0), |n| n.parse()).expect("a count");
    println!(
        "handle_in futures: typed {} B, untyped {} B",
        future_size::<channels::Typed, _>(<channels::Typed as Channel>::handle_in),
        future_size::<channels::Untyped, _>(<channels::Untyped as Channel>::handle_in)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_socket, mut client) = channels::joined(&rt);
    let payload = channels::payload();
    for _ in 0..n {
        let reply = rt.block_on(client.request(&topic, "add", payload.clone()));
        assert_eq!(reply.status(), "ok", "{:?}", reply.payload());
    }
}
