//! Presence gossip between nodes: each node sends its presence changes (a delta of the CRDT
//! state) within [`DELTA_PERIOD`] of making them, and a heartbeat at least every heartbeat
//! period, both numbered by change generation; a node that notices a gap asks for the sender's
//! whole slice (a transfer); a node not heard from for `down_after` is forgotten with its
//! presences; a node that drains says goodbye.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{Body, Cluster};

/// How soon a node's presence changes go to the other nodes (at most this often while they
/// change; otherwise with the heartbeat).
const DELTA_PERIOD: Duration = Duration::from_millis(50);

/// What a node knows of the others.
pub(super) struct Gossip {
    /// Other nodes: when each was last heard from.
    peers: Mutex<HashMap<u64, Instant>>,
    /// When a presence transfer was last asked of each node.
    asked: Mutex<HashMap<u64, Instant>>,
    /// Up to which generation of each node's changes this node has them all.
    seen: Mutex<HashMap<u64, u64>>,
    heartbeat: Duration,
    down_after: Duration,
}

impl Gossip {
    pub(super) fn new(heartbeat: Duration, down_after: Duration) -> Self {
        Gossip {
            peers: Mutex::default(),
            asked: Mutex::default(),
            seen: Mutex::default(),
            heartbeat,
            down_after,
        }
    }

    /// Node `from` (already known) is alive.
    pub(super) fn heard(&self, from: u64) {
        if let Some(last) = self.peers.lock().get_mut(&from) {
            *last = Instant::now();
        }
    }

    /// Forgets what is kept of nodes no longer counted as up: what was seen of their changes
    /// and when a transfer was asked of them (else both grow by one entry per node restart).
    fn prune(&self) {
        let peers = self.peers.lock();
        self.seen.lock().retain(|r, _| peers.contains_key(r));
        self.asked.lock().retain(|r, _| peers.contains_key(r));
    }

    /// The other nodes heard from within the down period.
    pub(super) fn nodes(&self) -> Vec<u64> {
        self.peers.lock().keys().copied().collect()
    }
}

/// The gossip task, on the cluster thread: sends this node's changes and heartbeats, and
/// forgets the nodes gone silent. Ends with the cluster.
pub(super) async fn run(cluster: Weak<Cluster>) {
    let Some(heartbeat) = cluster.upgrade().map(|c| c.gossip.heartbeat) else {
        return;
    };
    let mut tick = tokio::time::interval(DELTA_PERIOD.min(heartbeat));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let now = Instant::now();
        let due = last_sent.is_none_or(|t| now - t >= heartbeat);
        if due || cluster.hub.tracker().has_unsent() {
            cluster.send_heartbeat();
            last_sent = Some(now);
        }
        cluster.forget_silent_nodes(now);
        cluster.link().check_echo(stall_after(heartbeat));
    }
}

/// How long without hearing its own heartbeats back a node counts its engine link stalled:
/// three heartbeat periods, and at least 2 s (a busy engine is not a stalled one).
pub(crate) fn stall_after(heartbeat: Duration) -> Duration {
    (heartbeat * 3).max(Duration::from_secs(2))
}

impl Cluster {
    /// The other nodes heard from within the down period.
    pub(crate) fn nodes(&self) -> Vec<u64> {
        self.gossip.nodes()
    }

    /// Sends this node's presence changes since the last heartbeat, with their generations.
    fn send_heartbeat(&self) {
        let (delta, from, to) = self.hub.tracker().take_delta();
        self.send(&Body::Heartbeat { from, to, delta });
    }

    /// Forgets the nodes not heard from for `down_after` before `now`, and their presences.
    pub(super) fn forget_silent_nodes(&self, now: Instant) {
        let g = &self.gossip;
        let down: Vec<u64> = {
            let mut peers = g.peers.lock();
            let down = peers
                .iter()
                .filter(|(_, last)| now - **last > g.down_after)
                .map(|(r, _)| *r)
                .collect::<Vec<_>>();
            for r in &down {
                peers.remove(r);
            }
            down
        };
        g.prune();
        self.link.prune();
        for replica in down {
            tracing::warn!(node = replica, "cluster node down: no heartbeat");
            self.hub.tracker().forget(replica);
        }
    }

    /// Handles node `from`'s heartbeat, transfer request, transfer or goodbye.
    pub(super) fn on_gossip(&self, from: u64, body: Body) {
        let (g, me, tracker) = (&self.gossip, self.link.node(), self.hub.tracker());
        match body {
            Body::Heartbeat {
                from: gen_from,
                to: gen_to,
                delta,
            } => {
                let now = Instant::now();
                if g.peers.lock().insert(from, now).is_none() {
                    tracing::info!(node = from, "cluster node up");
                }
                if !tracker.merge_remote(from, &delta) {
                    self.link.reject(
                        from,
                        "presence delta of other nodes' elements, or a clock far ahead",
                    );
                    return;
                }
                let mut seen = g.seen.lock();
                let had = seen.get(&from).copied().unwrap_or(0);
                if had >= gen_from {
                    seen.insert(from, had.max(gen_to));
                } else {
                    // Missed some of its changes (new here, or messages lost during an
                    // outage): ask for its state, at most once per heartbeat period.
                    drop(seen);
                    let mut asked = g.asked.lock();
                    if asked.get(&from).is_none_or(|t| now - *t >= g.heartbeat) {
                        asked.insert(from, now);
                        drop(asked);
                        self.send(&Body::TransferRequest { to: from });
                    }
                }
            }
            Body::TransferRequest { to } if to == me => {
                let (state, generation) = tracker.own_slice();
                self.send(&Body::Transfer {
                    to: from,
                    generation,
                    state,
                });
            }
            Body::Transfer {
                to,
                generation,
                state,
            } if to == me => {
                if !tracker.merge_remote(from, &state) {
                    self.link.reject(
                        from,
                        "presence transfer of other nodes' elements, or a clock far ahead",
                    );
                    return;
                }
                let mut seen = g.seen.lock();
                let had = seen.entry(from).or_insert(0);
                *had = (*had).max(generation);
            }
            Body::Goodbye => {
                g.peers.lock().remove(&from);
                g.prune();
                tracker.forget(from);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::Endpoint;
    use crate::cluster::tests_only::Loopback;
    use crate::node::presence::crdt::State;

    #[tokio::test]
    async fn departed_nodes_leave_nothing_behind() {
        let e = Endpoint::builder().adapter(Loopback::default()).build();
        let c: &Arc<Cluster> = e.cluster().unwrap();
        let (g, me) = (&c.gossip, c.node());
        // Ten nodes (or restarts) with changes this node missed: each is asked for its state.
        for peer in 1..=10 {
            let delta = State::default();
            c.receive(
                peer,
                Body::Heartbeat {
                    from: 3,
                    to: 4,
                    delta,
                },
            );
            let state = State::default();
            c.receive(
                peer,
                Body::Transfer {
                    to: me,
                    generation: 4,
                    state,
                },
            );
        }
        let sizes = || {
            (
                g.peers.lock().len(),
                g.asked.lock().len(),
                g.seen.lock().len(),
            )
        };
        assert_eq!(sizes(), (10, 10, 10));
        for peer in 1..=5 {
            c.receive(peer, Body::Goodbye);
        }
        assert_eq!(sizes(), (5, 5, 5));
        // The others go silent: once they count as down, nothing of them is left.
        c.forget_silent_nodes(Instant::now() + g.down_after + g.heartbeat);
        assert_eq!(sizes(), (0, 0, 0));
    }

    /// A node whose app runtime is saturated (here: its only thread blocked) keeps its
    /// heartbeats going: the others never count it down.
    #[test]
    fn a_saturated_node_is_not_counted_down() {
        let bus = Loopback::default();
        let node = || {
            Endpoint::builder()
                .adapter(bus.clone())
                .presence_heartbeat(Duration::from_millis(20))
                .presence_down_after(Duration::from_millis(200))
        };
        let busy = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = busy.block_on(async { node().build() });
        let (a_id, watcher_rt) = (a.node().unwrap(), tokio::runtime::Runtime::new().unwrap());
        let b = watcher_rt.block_on(async { node().build() });
        // Heartbeats are the event, and no hook announces them: look until `b` has heard `a`.
        let start = std::time::Instant::now();
        while !b.nodes().contains(&a_id) {
            assert!(start.elapsed() < Duration::from_secs(5), "b never heard a");
            std::thread::sleep(Duration::from_millis(5));
        }
        busy.block_on(async {
            // Five times the down period without yielding to `a`'s runtime.
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(1) {
                assert!(b.nodes().contains(&a_id), "a counted down while busy");
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
}
