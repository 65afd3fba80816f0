//! Join, leave and rejoin boundaries: a broadcast reaches a client exactly once across a
//! duplicate join or a leave followed at once by a join (phoenix.js's `leaveOpenTopic`), and
//! channels still ending count against `max_channels`.
//!
//! The conformance app's contract (APP.md) has no slow `terminate` nor a join held until the test
//! says so, so these tests serve a test-only channel of their own: `gated:*`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use firebrand::{
    Channel, ChannelContext, ConnectError, ConnectInfo, Endpoint, HandleResult, JoinContext,
    JoinError, Joined, Payload, Reply, Socket, StopReason,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// What the test holds back: each permit lets one held callback go on.
struct Gates {
    /// Joins of `gated:slow_join*` wait for a permit.
    join: Semaphore,
    /// `terminate` of `gated:slow_leave*` after a leave waits for a permit.
    terminate: Semaphore,
}

struct GatedSocket(Arc<Gates>);

impl Socket for GatedSocket {
    type Assigns = Arc<Gates>;

    async fn connect(&self, _info: &ConnectInfo) -> Result<Self::Assigns, ConnectError> {
        Ok(self.0.clone())
    }
}

/// `gated:*`: joins with `{}`; `new_msg` broadcasts (sender included), `ping` replies with
/// its payload, `busy` pushes `busy_started` and then keeps its thread busy for `ms` (a
/// CPU-bound callback: the task cannot be aborted meanwhile) before replying.
struct GatedChannel;

#[derive(Deserialize)]
struct Busy {
    ms: u64,
}

impl Channel for GatedChannel {
    type Assigns = Arc<Gates>;
    type State = ();
    type Info = ();

    async fn join(
        topic: &str,
        _params: Payload,
        ctx: &JoinContext<'_, Self::Assigns>,
    ) -> Result<Joined<Self>, JoinError> {
        if topic.starts_with("gated:slow_join") {
            ctx.assigns().join.acquire().await.unwrap().forget();
        }
        Ok(Joined::new(GatedChannel))
    }

    async fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        match event {
            "new_msg" => ctx.broadcast("new_msg", payload),
            "ping" => return Ok(Some(Reply::ok(payload))),
            "busy" => {
                let Busy { ms } = payload.decode()?;
                ctx.push("busy_started", json!({}));
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(ms)));
                return Ok(Some(Reply::ok(json!({}))));
            }
            _ => {}
        }
        Ok(None)
    }

    async fn terminate(&mut self, reason: &StopReason, ctx: &mut ChannelContext<Self>) {
        if matches!(reason, StopReason::Left) && ctx.topic().starts_with("gated:slow_leave") {
            ctx.assigns().terminate.acquire().await.unwrap().forget();
        }
    }
}

/// A server of `gated:*` with at most `max_channels` per connection, and its gates.
async fn start_gated(max_channels: usize) -> (Server, Arc<Gates>) {
    let gates = Arc::new(Gates {
        join: Semaphore::new(0),
        terminate: Semaphore::new(0),
    });
    let endpoint = Endpoint::new();
    let socket = endpoint
        .socket(GatedSocket(gates.clone()))
        .channel::<GatedChannel>("gated:*")
        .max_channels(max_channels)
        .into_router();
    let router = axum::Router::new().nest("/socket", socket);
    (serve(router, endpoint).await, gates)
}

/// Receives frames into `seen` until one equal to `until` arrives.
async fn recv_until(c: &mut Client, seen: &mut Vec<Value>, until: &Value) {
    while !seen.contains(until) {
        seen.push(c.recv_json().await);
    }
}

fn count(seen: &[Value], frame: &Value) -> usize {
    seen.iter().filter(|f| *f == frame).count()
}

fn phx_close(jr: &str, topic: &str) -> Value {
    json!([jr, jr, topic, "phx_close", {}])
}

/// `phx_leave` then `phx_join` at once while the old channel's `terminate` is still running:
/// the new join waits for the old channel to be gone, so no broadcast reaches both.
#[tokio::test]
async fn leave_then_join_while_terminate_runs_delivers_once() {
    let topic = "gated:slow_leave";
    let (s, gates) = start_gated(100).await;
    let mut a = s.client("").await;
    let mut b = s.client("").await;
    a.join("1", topic, json!({})).await;
    b.join("1", topic, json!({})).await;

    a.send(json!(["1", "2", topic, "phx_leave", {}])).await;
    a.send(json!(["3", "3", topic, "phx_join", {}])).await;
    // The heartbeat's reply proves the connection has handled the join too.
    a.send(json!([null, "4", "phoenix", "heartbeat", {}])).await;
    let mut seen = Vec::new();
    for frame in [
        ok_reply(Some("1"), "2", topic, json!({})),
        phx_close("1", topic),
        ok_reply(None, "4", "phoenix", json!({})),
    ] {
        recv_until(&mut a, &mut seen, &frame).await;
    }

    // A's old channel is in `terminate`, held by the gate, and still subscribed.
    let first = json!([null, null, topic, "new_msg", {"n": 1}]);
    b.send(json!(["1", "5", topic, "new_msg", {"n": 1}])).await;
    b.expect(first.clone()).await;
    gates.terminate.add_permits(1);
    recv_until(
        &mut a,
        &mut seen,
        &ok_reply(Some("3"), "3", topic, json!({})),
    )
    .await;

    // Joined again: the next broadcast comes through the new channel alone.
    let second = json!([null, null, topic, "new_msg", {"n": 2}]);
    b.send(json!(["1", "6", topic, "new_msg", {"n": 2}])).await;
    b.expect(second.clone()).await;
    a.send(json!(["3", "7", topic, "ping", {}])).await;
    recv_until(
        &mut a,
        &mut seen,
        &ok_reply(Some("3"), "7", topic, json!({})),
    )
    .await;

    assert_eq!(count(&seen, &first), 1, "{seen:#?}");
    assert_eq!(count(&seen, &second), 1, "{seen:#?}");
}

/// A duplicate join replaces a channel busy in a callback (it can be aborted only once the
/// callback returns): the new channel joins only after the old one is gone, so a broadcast
/// after the new join's reply arrives once. Each round widens the race the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_join_of_a_busy_channel_delivers_once() {
    let topic = "gated:busy";
    let (s, _gates) = start_gated(100).await;
    let mut a = s.client("").await;
    let mut b = s.client("").await;
    b.join("b", topic, json!({})).await;
    a.join("0", topic, json!({})).await;
    for i in 1..=50 {
        let (old, new) = ((i - 1).to_string(), i.to_string());
        a.send(json!([old, "busy", topic, "busy", {"ms": 20}]))
            .await;
        let mut seen = Vec::new();
        let started = json!([old, null, topic, "busy_started", {}]);
        recv_until(&mut a, &mut seen, &started).await;

        a.send(json!([new, new, topic, "phx_join", {}])).await;
        recv_until(
            &mut a,
            &mut seen,
            &ok_reply(Some(&new), &new, topic, json!({})),
        )
        .await;
        let msg = json!([null, null, topic, "new_msg", {"n": i}]);
        b.send(json!(["b", "m", topic, "new_msg", {"n": i}])).await;
        b.expect(msg.clone()).await;
        a.send(json!([new, "p", topic, "ping", {}])).await;
        recv_until(
            &mut a,
            &mut seen,
            &ok_reply(Some(&new), "p", topic, json!({})),
        )
        .await;
        assert_eq!(count(&seen, &msg), 1, "round {i}: {seen:#?}");
    }
}

/// Join-and-leave loops while joins are slow: channels whose task has not ended yet still
/// count against `max_channels`, so they cannot pile up past it.
///
/// On this single-threaded runtime a channel that ends after a leave queues its `phx_close`
/// and its exit in one go, so once the client sees `phx_close` the connection has counted the
/// channel out.
#[tokio::test]
async fn ending_channels_count_against_max_channels() {
    let (s, gates) = start_gated(2).await;
    let mut a = s.client("").await;
    for (jr, topic) in [("1", "gated:slow_join:a"), ("3", "gated:slow_join:b")] {
        a.send(json!([jr, jr, topic, "phx_join", {}])).await;
        a.send(json!([jr, "leave", topic, "phx_leave", {}])).await;
    }
    // Both joins are held: their tasks are alive, left or not.
    a.send(json!(["5", "5", "gated:c", "phx_join", {}])).await;
    a.expect(reply(
        Some("5"),
        "5",
        "gated:c",
        "error",
        json!({"reason": "too many channels joined"}),
    ))
    .await;

    gates.join.add_permits(2);
    let mut seen = Vec::new();
    for (jr, topic) in [("1", "gated:slow_join:a"), ("3", "gated:slow_join:b")] {
        recv_until(&mut a, &mut seen, &phx_close(jr, topic)).await;
    }
    a.join("6", "gated:c", json!({})).await;
}
