//! Entry points for the criterion benches (`crates/firebrand-bench/benches/hot_paths.rs`): hot
//! paths that are not public API, so that regressions in them show. Not part of the API.

use std::sync::Arc;

use firebrand_protocol::{Payload, Serializer};

use crate::context::ChannelMsg;
use crate::pubsub::{Broadcast, Inbox, PubSub, Target};
use crate::queue::{Mailbox, Outbox};
use crate::runner::{ChannelFactory, ChannelHandle, SpawnArgs};

/// A socket's routes, to time which one serves a topic.
pub struct Routes(crate::router::Routes<()>);

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
        let mut routes = crate::router::Routes::new();
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
