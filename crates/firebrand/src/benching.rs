//! Entry points for the criterion benches (`crates/firebrand-bench/benches/hot_paths.rs`): hot
//! paths that are not public API, so that regressions in them show. Not part of the API: hidden from the docs, and may change in any release.

use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use firebrand_protocol::{Payload, Serializer};

use crate::model::context::ChannelMsg;
use crate::model::runner::{ChannelFactory, ChannelHandle, SpawnArgs};
use crate::node::pubsub::{Broadcast, Inbox, PubSub, Target};
use crate::node::queue::{Delivered, Mailbox, Outbox};
use crate::node::{Hub, Registered};

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

/// Subscribes the connection of `outbox` to `"room:bench"` as a joined channel is: V2, on the
/// fast lane (broadcasts go straight to its outbox), no intercepted events.
fn subscribe(pubsub: &PubSub, outbox: &Arc<Outbox>) {
    let inbox: Arc<dyn Inbox> = Arc::new(Mailbox::<ChannelMsg<()>>::new(16));
    let target = Target::Fastlane {
        outbox: outbox.clone(),
        serializer: Serializer::V2,
        intercepts: &[],
        inbox,
        seen: None,
    };
    pubsub.subscribe("room:bench", target);
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
            subscribe(&pubsub, outbox);
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

/// A channel task's mailbox (the default limit, 1,024 messages) and the task waiting on it, to
/// time a message's way to the task: queued (as by its connection), the task woken, received.
/// The task is polled by hand with a no-op waker: no runtime, no scheduling counted.
pub struct ChannelMailbox {
    mailbox: Mailbox<ChannelMsg<()>>,
    /// The messages in flight: each goes through the mailbox and comes back here.
    msgs: Vec<ChannelMsg<()>>,
}

impl ChannelMailbox {
    /// An empty mailbox, and `n` client pushes (`"new_msg"`, a small JSON payload) to send.
    pub fn new(n: usize) -> Self {
        let payload = Payload::json(&serde_json::json!({"body": "hello there"})).unwrap();
        let msgs = (0..n)
            .map(|i| ChannelMsg::In {
                event: "new_msg".to_owned(),
                payload: payload.clone(),
                r#ref: Some(i.to_string()),
            })
            .collect();
        ChannelMailbox {
            mailbox: Mailbox::new(1024),
            msgs,
        }
    }

    /// The task waits (its `recv` polled to `Pending`), one message is queued, and the task,
    /// polled again, receives it.
    pub fn round_trip(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let msg = self.msgs.pop().expect("a message to send");
        let mut recv = pin!(self.mailbox.recv());
        assert!(recv.as_mut().poll(&mut cx).is_pending());
        assert!(matches!(self.mailbox.push(msg), Delivered::Queued));
        let Poll::Ready(msg) = recv.as_mut().poll(&mut cx) else {
            panic!("the message was queued")
        };
        self.msgs.push(msg);
    }

    /// The task waits, every message is queued (a burst), then the task receives them all, one
    /// `recv` each as its loop does; returns how many it received.
    pub fn batch(&mut self) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(pin!(self.mailbox.recv()).poll(&mut cx).is_pending());
        let n = self.msgs.len();
        for msg in self.msgs.drain(..) {
            assert!(matches!(self.mailbox.push(msg), Delivered::Queued));
        }
        for _ in 0..n {
            let Poll::Ready(msg) = pin!(self.mailbox.recv()).poll(&mut cx) else {
                panic!("a message is queued")
            };
            self.msgs.push(msg);
        }
        n
    }
}

/// One connection registered with its node and subscribed (V2, fast lane) to `"room:bench"`,
/// to time what its task does per batch written and per read, without a socket. Its task is
/// polled by hand with a no-op waker.
pub struct Connection {
    hub: Arc<Hub>,
    outbox: Arc<Outbox>,
    registered: Registered,
    broadcast: Broadcast,
}

impl Connection {
    /// The connection (an outbox of 4 MiB), and a broadcast of `payload` to its topic.
    pub fn new(payload: Payload) -> Self {
        let hub = Hub::new(1, Duration::ZERO, None, false, None);
        let outbox = Arc::new(Outbox::new(4 << 20));
        let registered = hub.register(outbox.clone());
        subscribe(hub.pubsub(), &outbox);
        Connection {
            hub,
            outbox,
            registered,
            broadcast: Broadcast::new("room:bench", "new_msg", payload),
        }
    }

    /// The task waits (`poll_ready` is `Pending`), the broadcast is dispatched (its frame,
    /// encoded once, queued and the task woken), then the task's `poll_ready` is `Ready` and its
    /// writer takes the batch; returns the frames taken.
    pub fn deliver(&self) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(self.outbox.poll_ready(&mut cx).is_pending());
        assert_eq!(self.hub.pubsub().dispatch(&self.broadcast, None), 1);
        assert!(self.outbox.poll_ready(&mut cx).is_ready());
        self.outbox.take().frames.len()
    }

    /// The idle task's wait on its outbox, nothing queued: `poll_ready` is `Pending`.
    pub fn poll_ready_idle(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.outbox.poll_ready(&mut cx).is_pending()
    }

    /// The check for a close beside a blocked write, none requested: `poll_close` on an open
    /// outbox is `Pending`.
    pub fn poll_close_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.outbox.poll_close(&mut cx).is_pending()
    }

    /// What every read costs the idle timeout: the deadline moves (`Registered::touch`).
    pub fn touch(&self) {
        self.registered.touch(&self.outbox, Duration::from_secs(60));
    }
}

/// Phoenix's way of compressing, for the benchmark that compares it with firebrand's
/// (`firebrand-bench fanout --deflate`): when on, each compressing connection keeps a deflate
/// context of its own from message to message (context takeover: the handshake is answered
/// without `server_no_context_takeover` unless the client asked for it), and a broadcast is
/// compressed by each subscriber's connection as it writes it instead of once for all.
/// Process-wide; off by default; read when a connection is accepted and when a broadcast is
/// queued, so set it before serving.
pub fn compress_per_connection(on: bool) {
    crate::node::pubsub::COMPRESS_PER_CONNECTION.store(on, std::sync::atomic::Ordering::Relaxed);
}
