//! Topic subscriptions and broadcast dispatch on this node.
//!
//! A broadcast is encoded at most once per serializer (V1, V2) and the same bytes are queued to
//! every subscribed connection: the "fastlane". Only events a channel intercepts go through its
//! task. Dispatch never blocks: each connection's [`Outbox`] is bounded and a full one closes
//! its connection as a slow consumer.
//!
//! Subscriptions live in shards (a read-write lock each) keyed by topic, so dispatch to one topic
//! and joins on others do not contend.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use firebrand_protocol::{Outbound, Payload, Serializer};
use parking_lot::RwLock;

use crate::node::queue::{Close, Frame, Outbox, Pushed};

/// See [`crate::benching::compress_per_connection`]: broadcasts compressed by each connection
/// instead of once.
pub(crate) static COMPRESS_PER_CONNECTION: AtomicBool = AtomicBool::new(false);

const SHARDS: usize = 32;

/// A message broadcast to every subscriber of a topic.
///
/// Channels see one in [`Channel::handle_out`](crate::Channel::handle_out) (intercepted events)
/// and in [`Channel::handle_info`](crate::Channel::handle_info) (topics subscribed with
/// [`ChannelContext::subscribe`](crate::ChannelContext::subscribe)). Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Broadcast(Arc<BroadcastInner>);

#[derive(Debug)]
struct BroadcastInner {
    topic: Box<str>,
    event: Box<str>,
    payload: Payload,
    /// Its position in its topic's history, on a recoverable topic (the frame's `ref`).
    position: Option<Box<str>>,
    /// That position's epoch and offset.
    at: Option<Seen>,
    /// Its frame per serializer (V1, V2), encoded on first use: once per broadcast, however
    /// many subscribers (and replays) it has.
    frames: [OnceLock<Option<Frame>>; 2],
    /// The same frames as compressing connections get them ([`Frame::prepared`]), compressed
    /// on first use: once per broadcast, shared by every compressing subscriber (they all
    /// negotiated no context takeover for the server, so a message's compressed bytes do not
    /// depend on what the connection sent before).
    deflated: [OnceLock<Option<Frame>>; 2],
}

impl Broadcast {
    /// A broadcast of `event` with `payload` on `topic`.
    pub fn new(topic: impl Into<Box<str>>, event: impl Into<Box<str>>, payload: Payload) -> Self {
        Broadcast(Arc::new(BroadcastInner {
            topic: topic.into(),
            event: event.into(),
            payload,
            position: None,
            at: None,
            frames: Default::default(),
            deflated: Default::default(),
        }))
    }

    /// Its position in its topic's history: on a recoverable topic, the opaque string the
    /// client receives in the message's `ref` slot and rejoins with (`{"since": P}`).
    pub fn position(&self) -> Option<&str> {
        self.0.position.as_deref()
    }

    /// The same broadcast at `position` (epoch and offset `at`) in its topic's history.
    pub(crate) fn with_position(&self, position: String, at: Seen) -> Broadcast {
        let b = &self.0;
        Broadcast(Arc::new(BroadcastInner {
            topic: b.topic.clone(),
            event: b.event.clone(),
            payload: b.payload.clone(),
            position: Some(position.into()),
            at: Some(at),
            frames: Default::default(),
            deflated: Default::default(),
        }))
    }

    /// Whether it is a recorded broadcast that a client which has seen `seen` already has.
    fn seen_by(&self, seen: &Seen) -> bool {
        self.0
            .at
            .is_some_and(|at| at.epoch == seen.epoch && at.offset <= seen.offset)
    }

    /// Its frame for `serializer`, encoded once (`None`: not encodable for it, e.g. a binary
    /// payload with a position). For a connection that compresses (`compressed` is then where
    /// a compression is counted), the frame compressed once.
    fn frame(&self, serializer: Serializer, compressed: Option<&AtomicU64>) -> Option<Frame> {
        let i = match serializer {
            Serializer::V1 => 0,
            Serializer::V2 => 1,
        };
        match compressed {
            None => self.encoded(i, serializer),
            Some(_) if COMPRESS_PER_CONNECTION.load(Ordering::Relaxed) => {
                self.encoded(i, serializer)
            }
            Some(count) => self.0.deflated[i]
                .get_or_init(|| {
                    let frame = self.encoded(i, serializer)?;
                    let prepared = frame.prepared();
                    if matches!(prepared, Frame::Prepared { deflated: true, .. }) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(prepared)
                })
                .clone(),
        }
    }

    /// Its frame for `serializer` (at `i` in the cache), encoded once.
    fn encoded(&self, i: usize, serializer: Serializer) -> Option<Frame> {
        self.0.frames[i]
            .get_or_init(|| {
                let out = Outbound::Event {
                    join_ref: None,
                    r#ref: self.position(),
                    topic: self.topic(),
                    event: self.event(),
                    payload: self.payload(),
                };
                match serializer.encode(&out) {
                    Ok(encoded) => Some(Frame::from_encoded(encoded)),
                    Err(e) => {
                        tracing::debug!(topic = self.topic(), event = self.event(), error = %e,
                        "broadcast not delivered to {serializer:?} subscribers");
                        None
                    }
                }
            })
            .clone()
    }

    /// The topic it was broadcast on.
    pub fn topic(&self) -> &str {
        &self.0.topic
    }

    /// The event name.
    pub fn event(&self) -> &str {
        &self.0.event
    }

    /// The payload.
    pub fn payload(&self) -> &Payload {
        &self.0.payload
    }
}

/// Why [`Endpoint::broadcast_confirmed`](crate::Endpoint::broadcast_confirmed) cannot say the
/// cluster's engine has the broadcast. Each kind says what became of it: whether other nodes may
/// still get it. Adapters never resend, so a broadcast never reaches a node twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BroadcastError {
    /// Refused: the protocol's own events (`phx_*`, `chan_reply_*`) are not the app's to send
    /// ([`Endpoint::broadcast`](crate::Endpoint::broadcast)). Nobody got it.
    ReservedEvent,
    /// Not sent: the engine could not be reached (no connection). No other node gets it.
    Unreachable,
    /// Not sent: the adapter's queue to the engine was full. No other node gets it.
    QueueFull,
    /// Sent, but the engine's answer never came: the connection was torn down (or timed out,
    /// or the engine answered an error) after the message left, or the adapter cannot confirm.
    /// Other nodes may have got it (at most once), or not.
    Unconfirmed,
}

impl BroadcastError {
    /// A short name for the kind, for wire answers and logs: `reserved_event`, `unreachable`,
    /// `queue_full` or `unconfirmed`.
    pub fn code(&self) -> &'static str {
        match self {
            BroadcastError::ReservedEvent => "reserved_event",
            BroadcastError::Unreachable => "unreachable",
            BroadcastError::QueueFull => "queue_full",
            BroadcastError::Unconfirmed => "unconfirmed",
        }
    }

    /// Whether other nodes may have got the broadcast anyway (only when [`Unconfirmed`](BroadcastError::Unconfirmed)).
    pub fn may_have_been_delivered(&self) -> bool {
        matches!(self, BroadcastError::Unconfirmed)
    }
}

impl std::fmt::Display for BroadcastError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BroadcastError::ReservedEvent => {
                "refused: the protocol's own events (phx_*, chan_reply_*) are not the app's to send"
            }
            BroadcastError::Unreachable => {
                "the cluster's engine is unreachable: not sent, no other node gets it"
            }
            BroadcastError::QueueFull => {
                "the queue to the cluster's engine is full: not sent, no other node gets it"
            }
            BroadcastError::Unconfirmed => {
                "sent, but the cluster's engine never confirmed it (the connection failed): other nodes may have got it once, or not at all"
            }
        })
    }
}

impl std::error::Error for BroadcastError {}

/// A broadcast made of numbered changes, of which each subscriber gets only those after its
/// cursor ([`Inbox::cursor`]): presence diffs. Subscribers whose cursor is before
/// [`first`](Sequenced::first) share one encoding of the whole.
pub(crate) trait Sequenced {
    fn topic(&self) -> &str;
    /// The first change's number.
    fn first(&self) -> u64;
    /// The last change's number.
    fn last(&self) -> u64;
    /// The broadcast of the changes after `cursor`, if any is left.
    fn since(&self, cursor: u64) -> Option<Broadcast>;
}

/// A channel task's end of a subscription: where intercepted and extra-topic broadcasts go.
pub(crate) trait Inbox: Send + Sync {
    /// The last change of a [`Sequenced`] broadcast on the channel's topic that its client
    /// already knows of.
    fn cursor(&self) -> &AtomicU64;
    /// An intercepted event of the channel's own topic, for `handle_out`.
    fn intercepted(&self, broadcast: Broadcast);
    /// A broadcast on a topic the channel subscribed to, for `handle_info`.
    fn info(&self, broadcast: Broadcast);
}

/// A position in a recoverable topic's history: its epoch and offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) epoch: u64,
    pub(crate) offset: u64,
}

/// Where a subscription delivers.
pub(crate) enum Target {
    /// A joined channel: frames go straight to the connection, intercepts to the channel task.
    Fastlane {
        outbox: Arc<Outbox>,
        serializer: Serializer,
        intercepts: &'static [&'static str],
        inbox: Arc<dyn Inbox>,
        /// The position its client rejoined with: a recorded broadcast at or before it is
        /// never delivered to it, however late this node receives it (a node whose engine
        /// feed lags or stalled behind the node the client saw it on). Boxed: most channels
        /// have none.
        seen: Option<Box<Seen>>,
    },
    /// An extra topic a channel subscribed to: everything goes to `handle_info`.
    Info(Arc<dyn Inbox>),
    /// A connection carrying a socket id, in the hub's registry of socket ids (never in the
    /// topics'): the `"disconnect"` event closes it.
    Socket(Arc<Outbox>),
}

impl Target {
    /// A joined channel's delivery: an intercepted event to its task, anything else as the
    /// frame encoded for its serializer (once per broadcast) to its connection.
    /// Returns the frames queued (0 or 1).
    fn fastlane(
        &self,
        b: &Broadcast,
        intercepted: &mut Intercepted,
        compressed: &AtomicU64,
    ) -> u64 {
        self.deliver(b, intercepted, compressed, Outbox::push)
    }

    /// Replays `b` (from its topic's history) to a channel that is joining: as
    /// [`fastlane`](Target::fastlane) does, outside its connection's byte limit
    /// ([`Outbox::push_replayed`]).
    /// `pubsub` counts a compression.
    pub(crate) fn replay(&self, b: &Broadcast, pubsub: &PubSub) {
        self.deliver(
            b,
            &mut Intercepted::default(),
            &pubsub.compressed,
            Outbox::push_replayed,
        );
    }

    fn deliver(
        &self,
        b: &Broadcast,
        intercepted: &mut Intercepted,
        compressed: &AtomicU64,
        push: impl Fn(&Outbox, Frame) -> Pushed,
    ) -> u64 {
        let Target::Fastlane {
            outbox,
            serializer,
            intercepts,
            inbox,
            seen,
        } = self
        else {
            return 0;
        };
        if seen.as_deref().is_some_and(|seen| b.seen_by(seen)) {
            0
        } else if intercepted.check(intercepts, b.event()) {
            inbox.intercepted(b.clone());
            0
        } else if let Some(frame) = b.frame(*serializer, outbox.compresses().then_some(compressed))
            && push(outbox, frame) == Pushed::Queued
        {
            1
        } else {
            0
        }
    }
}

/// Whether one broadcast's event is intercepted, remembered per intercept list: a topic's
/// subscribers mostly share their channel type's list, so the event is compared with it once
/// per dispatch rather than once per subscriber (that string comparison was 5% of a burst's
/// CPU, profiled with perf).
#[derive(Default)]
struct Intercepted(Option<(&'static [&'static str], bool)>);

impl Intercepted {
    fn check(&mut self, list: &'static [&'static str], event: &str) -> bool {
        match self.0 {
            Some((seen, hit)) if std::ptr::eq(seen, list) => hit,
            _ => {
                let hit = list.contains(&event);
                self.0 = Some((list, hit));
                hit
            }
        }
    }
}

struct Subscriber {
    id: u64,
    target: Target,
}

/// Identifies one subscription; `broadcast_from` skips it.
pub(crate) type SubId = u64;

/// One shard of the registry: topic → subscribers.
type Shard = RwLock<HashMap<Box<str>, Vec<Subscriber>>>;

/// The subscription registry of one node.
pub(crate) struct PubSub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    next_id: AtomicU64,
    /// Messages compressed for compressing connections: a broadcast's frame once per
    /// serializer, a push or reply once ([`Hub::count_compressed`](crate::node::Hub)).
    pub(crate) compressed: AtomicU64,
}

impl PubSub {
    pub(crate) fn new() -> Self {
        PubSub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            next_id: AtomicU64::new(1),
            compressed: AtomicU64::new(0),
        }
    }

    fn shard(&self, topic: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(topic) as usize % SHARDS]
    }

    /// Subscribes `target` to `topic`; returns the id to unsubscribe with.
    pub(crate) fn subscribe(&self, topic: &str, target: Target) -> SubId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.shard(topic)
            .write()
            .entry(topic.into())
            .or_default()
            .push(Subscriber { id, target });
        id
    }

    /// Removes one subscription. Removing an unknown one does nothing.
    pub(crate) fn unsubscribe(&self, topic: &str, id: SubId) {
        let mut shard = self.shard(topic).write();
        if let Some(subs) = shard.get_mut(topic) {
            if let Some(i) = subs.iter().position(|s| s.id == id) {
                subs.swap_remove(i);
            }
            if subs.is_empty() {
                shard.remove(topic);
            }
        }
    }

    /// Number of topics with at least one subscriber.
    pub(crate) fn topic_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Each topic with joined channels on this node, and how many (extra-topic subscriptions
    /// and socket ids are not counted).
    pub(crate) fn channel_counts(&self) -> Vec<(String, usize)> {
        let mut topics = Vec::new();
        for shard in self.shards.iter() {
            for (topic, subs) in shard.read().iter() {
                let joined = subs
                    .iter()
                    .filter(|s| matches!(s.target, Target::Fastlane { .. }))
                    .count();
                if joined > 0 {
                    topics.push((topic.to_string(), joined));
                }
            }
        }
        topics
    }

    /// Delivers `b` to every local subscriber of its topic except `from`.
    /// Returns the number of frames queued to connections.
    pub(crate) fn dispatch(&self, b: &Broadcast, from: Option<SubId>) -> u64 {
        let (mut delivered, mut intercepted) = (0, Intercepted::default());
        let shard = self.shard(b.topic()).read();
        let Some(subs) = shard.get(b.topic()) else {
            return delivered;
        };
        for sub in subs {
            if Some(sub.id) == from {
                continue;
            }
            match &sub.target {
                Target::Fastlane { .. } => {
                    delivered += sub.target.fastlane(b, &mut intercepted, &self.compressed)
                }
                Target::Info(inbox) => inbox.info(b.clone()),
                Target::Socket(outbox) => {
                    if b.event() == "disconnect" {
                        outbox.close(Close::DISCONNECT);
                    }
                }
            }
        }
        delivered
    }

    /// Delivers a [`Sequenced`] broadcast to every joined channel of its topic, each getting
    /// the changes after its cursor (and every extra-topic subscriber the whole).
    /// Returns the number of frames queued to connections.
    pub(crate) fn dispatch_sequenced(&self, s: &dyn Sequenced) -> u64 {
        let (first, last) = (s.first(), s.last());
        let mut whole: Option<Option<Broadcast>> = None;
        let mut tails: HashMap<u64, Option<Broadcast>> = HashMap::new();
        let mut delivered = 0;
        let shard = self.shard(s.topic()).read();
        let Some(subs) = shard.get(s.topic()) else {
            return delivered;
        };
        for sub in subs {
            match &sub.target {
                Target::Fastlane { inbox, .. } => {
                    let cursor = inbox.cursor().load(Ordering::Acquire);
                    if cursor >= last {
                        continue;
                    }
                    let b = if cursor < first {
                        whole.get_or_insert_with(|| s.since(0))
                    } else {
                        tails.entry(cursor).or_insert_with(|| s.since(cursor))
                    };
                    if let Some(b) = b {
                        delivered +=
                            sub.target
                                .fastlane(b, &mut Intercepted::default(), &self.compressed);
                    }
                }
                Target::Info(inbox) => {
                    if let Some(b) = whole.get_or_insert_with(|| s.since(0)) {
                        inbox.info(b.clone());
                    }
                }
                Target::Socket(_) => {}
            }
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::context::ChannelMsg;
    use crate::node::queue::Mailbox;

    #[test]
    fn a_subscriber_never_gets_a_recorded_broadcast_it_has_seen() {
        let pubsub = PubSub::new();
        let subscribe = |seen: Option<Seen>| {
            let outbox = Arc::new(Outbox::new(1 << 20));
            let inbox: Arc<dyn Inbox> = Arc::new(Mailbox::<ChannelMsg<()>>::new(16));
            let target = Target::Fastlane {
                outbox: outbox.clone(),
                serializer: Serializer::V2,
                intercepts: &[],
                inbox,
                seen: seen.map(Box::new),
            };
            pubsub.subscribe("stream:a", target);
            outbox
        };
        // One client rejoined with the position (epoch 7, offset 5), seen on another node;
        // the other joined afresh.
        let rejoined = subscribe(Some(Seen {
            epoch: 7,
            offset: 5,
        }));
        let fresh = subscribe(None);
        let at = |epoch, offset| {
            Broadcast::new(
                "stream:a",
                "new_msg",
                Payload::from(serde_json::json!({"n": offset})),
            )
            .with_position(format!("A{epoch}.{offset}"), Seen { epoch, offset })
        };
        // This node's feed lagged: 4, 5 and 6 of epoch 7 arrive now; then the history starts
        // over (epoch 8) at 1; an unrecorded broadcast goes to all.
        for b in [at(7, 4), at(7, 5), at(7, 6), at(8, 1)] {
            pubsub.dispatch(&b, None);
        }
        pubsub.dispatch(
            &Broadcast::new("stream:a", "typing", Payload::empty()),
            None,
        );
        let refs = |outbox: &Outbox| -> Vec<String> {
            outbox
                .take_frames()
                .into_iter()
                .map(|f| match f {
                    Frame::Text(t) => {
                        let v: serde_json::Value = serde_json::from_slice(&t).unwrap();
                        v[1].as_str().unwrap_or("-").to_owned()
                    }
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(refs(&rejoined), ["A7.6", "A8.1", "-"]);
        assert_eq!(refs(&fresh), ["A7.4", "A7.5", "A7.6", "A8.1", "-"]);
    }

    #[test]
    fn the_intercept_check_is_remembered_per_list_only() {
        static SHOUT: &[&str] = &["shout"];
        static OTHER: &[&str] = &["shout"];
        static NONE: &[&str] = &[];
        let mut memo = Intercepted::default();
        assert!(memo.check(SHOUT, "shout"));
        assert!(memo.check(SHOUT, "shout"));
        assert!(!memo.check(NONE, "shout"), "another list is checked anew");
        assert!(memo.check(OTHER, "shout"));
        let mut memo = Intercepted::default();
        assert!(!memo.check(SHOUT, "bench"));
        assert!(!memo.check(SHOUT, "bench"));
    }
}
