//! Entry points for the criterion benches (`crates/firebrand-bench/benches/hot_paths.rs`): hot
//! paths that are not public API, so that regressions in them show. Not part of the API.

use std::sync::Arc;

use firebrand_protocol::{Payload, Serializer};

use crate::model::context::ChannelMsg;
use crate::model::runner::{ChannelFactory, ChannelHandle, SpawnArgs};
use crate::node::pubsub::{Broadcast, Inbox, PubSub, Target};
use crate::node::queue::{Mailbox, Outbox};

/// A socket's routes, to time which one serves a topic.
pub struct Routes(crate::model::router::Routes<()>);

/// Stands in for a channel type: routes are only looked up here, never joined.
struct Unjoined;

impl ChannelFactory<()> for Unjoined {
    fn spawn(&self, _: SpawnArgs<()>) -> ChannelHandle {
        unreachable!("benching::Routes only looks routes up")
    }
}

impl Routes {
    /// Routes with `patterns` (`"room:*"`, `"notifications"`), first match wins.
    pub fn new(patterns: &[&str]) -> Self {
        let mut routes = crate::model::router::Routes::new();
        for p in patterns {
            routes.add(p, Arc::new(Unjoined));
        }
        Routes(routes)
    }

    /// Whether a route serves `topic`.
    pub fn serves(&self, topic: &str) -> bool {
        self.0.find(topic).is_some()
    }
}

/// `n` connections joined to one topic, to time a broadcast's fan-out into their queues.
pub struct Fanout {
    pubsub: PubSub,
    outboxes: Vec<Arc<Outbox>>,
    broadcast: Broadcast,
}

impl Fanout {
    /// `n` V2 subscribers of `"room:bench"`, and a broadcast of `payload` to them.
    pub fn new(n: usize, payload: Payload) -> Self {
        let pubsub = PubSub::new();
        let outboxes: Vec<Arc<Outbox>> = (0..n).map(|_| Arc::new(Outbox::new(4 << 20))).collect();
        for outbox in &outboxes {
            let inbox: Arc<dyn Inbox> = Arc::new(Mailbox::<ChannelMsg<()>>::new(16));
            let target = Target::Fastlane {
                outbox: outbox.clone(),
                serializer: Serializer::V2,
                intercepts: &[],
                inbox,
            };
            pubsub.subscribe("room:bench", target);
        }
        Fanout {
            pubsub,
            outboxes,
            broadcast: Broadcast::new("room:bench", "new_msg", payload),
        }
    }

    /// Dispatches the broadcast (encoded once, queued to every connection), then empties the
    /// queues as the connections' writers would; returns the frames queued.
    pub fn broadcast(&self) -> u64 {
        let queued = self.pubsub.dispatch(&self.broadcast, None);
        for outbox in &self.outboxes {
            drop(outbox.take());
        }
        queued
    }
}

/// A node's presence tracker holding `n` presences (100 per topic, one per channel), to time
/// one channel's track and end: its cost must not grow with `n` (issue: every ending channel
/// once scanned all of the node's presences under the tracker's lock).
pub struct Presences {
    tracker: crate::node::presence::Tracker,
    owners: Vec<crate::node::presence::crdt::Owner>,
}

impl Presences {
    /// A tracker (alone, no cluster) holding `n` presences.
    pub fn new(n: usize) -> Self {
        let tracker =
            crate::node::presence::Tracker::new(1, std::time::Duration::ZERO, None, false);
        let mut owners = Vec::with_capacity(n);
        for i in 0..n {
            let owner = tracker.new_owner();
            let meta = serde_json::json!({"online_at": "1700000000"});
            let _ = tracker.track(owner, &format!("room:{}", i / 100), &format!("u{i}"), meta);
            owners.push(owner);
        }
        Presences { tracker, owners }
    }

    /// One more channel tracks a user on a busy topic, then ends (untracks all it tracked).
    pub fn track_and_end(&self) {
        let owner = self.tracker.new_owner();
        let meta = serde_json::json!({"online_at": "1700000000"});
        let _ = self.tracker.track(owner, "room:0", "visitor", meta);
        self.tracker.untrack_owner(owner);
    }

    /// Every channel ends, as in a drain of the node: the tracker's part of it.
    pub fn end_all(self) {
        for owner in self.owners {
            self.tracker.untrack_owner(owner);
        }
    }
}
