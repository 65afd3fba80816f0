//! Presence: who is online on each topic, as Phoenix.Presence reports it.
//!
//! A channel tracks a key (a user id, say) with a meta (any JSON object) on its topic:
//! [`ChannelContext::track`](crate::ChannelContext::track). The entry lives as long as the
//! channel — a leave, a close, a crash or the connection going away untracks it. Each key can
//! have several metas at once (one per tab, per device), each with a unique `phx_ref`.
//!
//! Subscribers of the topic receive the changes as `presence_diff` broadcasts,
//! `{"joins": {key: {"metas": [...]}}, "leaves": {...}}`, exactly as Phoenix sends them, so the
//! official client's `Presence` class stays in sync: one diff per change, at once, while a
//! topic's changes come further apart than the batch window (20 ms by default,
//! [`EndpointBuilder::presence_batch`](crate::EndpointBuilder::presence_batch)). Changes that come
//! faster go out at the end of the window, changes of distinct keys merged into one diff, so a
//! room where N users join at once costs a few diffs, not N² messages. A diff never merges two
//! changes of one key, which Phoenix sends apart: a tab opened and closed within the window is a
//! join diff, then a leave diff. A change is never split either: an update (a leave and a join
//! of one key) is one diff, as Phoenix's `update` sends it, and so is a gossip round from
//! another node (Phoenix reports a merged delta at once).
//!
//! A channel pushes the current list (`presence_state`) itself after joining — Phoenix's
//! after-join idiom — and from then on its client gets the diffs of later changes only: never a
//! diff of a change the list already holds, none missed, none twice.
//!
//! ```
//! # use firebrand::*;
//! # struct Room;
//! # impl Channel for Room { type Assigns = String; type State = (); type Info = ();
//! #   async fn join(_: &str, _: Payload, _: &JoinContext<'_, String>) -> Result<Joined<Self>, JoinError> { Ok(Joined::new(Room)) }
//! async fn after_join(&mut self, ctx: &mut ChannelContext<Self>) {
//!     let user = ctx.assigns().clone();
//!     ctx.track(&user, serde_json::json!({"online_at": "1700000000"})).unwrap();
//!     let list = ctx.presence_list();
//!     ctx.push("presence_state", list);
//! }
//! # }
//! ```
//!
//! List in `after_join` as above: a channel that has not listed by the end of `after_join`
//! gets the diffs of changes made from then on.
//!
//! The state is the replicated structure of Phoenix.Tracker (a delta-state observed-remove set,
//! see `crdt.rs`), kept by one tracker per endpoint; with a cluster adapter, nodes gossip their
//! deltas.

pub(crate) mod crdt;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use firebrand_protocol::{Payload, RawJson};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::node::pubsub::{Broadcast, Sequenced};
use crdt::{Dot, Entry, Owner, State};

/// Why a presence operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceError {
    /// This channel already tracks this key (Phoenix's `{:error, {:already_tracked, ...}}`);
    /// use [`update_presence`](crate::ChannelContext::update_presence).
    AlreadyTracked,
    /// This channel does not track this key (Phoenix's `{:error, :nopresence}`).
    NoPresence,
    /// The meta is not a JSON object.
    MetaNotObject,
}

impl fmt::Display for PresenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PresenceError::AlreadyTracked => f.write_str("key already tracked by this channel"),
            PresenceError::NoPresence => f.write_str("key not tracked by this channel"),
            PresenceError::MetaNotObject => f.write_str("presence meta must be a JSON object"),
        }
    }
}

impl std::error::Error for PresenceError {}

/// Extends presence entries before they are sent (Phoenix.Presence's `fetch/2`): runs once per
/// list and once per diff, on `{key: {"metas": [...]}}` maps. Add fields next to `metas` (e.g.
/// a user's name from your database); keep `metas`.
pub type PresenceFetch = Arc<dyn Fn(&str, &mut Map<String, Value>) + Send + Sync>;

/// Local changes not yet sent to other nodes: their join, and a count of changes so far
/// (`generation`; `sent` is where the last heartbeat ended) so that receivers notice gaps.
#[derive(Default)]
struct Unsent {
    delta: State,
    sent: u64,
    generation: u64,
}

/// One element joining or leaving, as change number `seq` of the tracker.
#[derive(Clone)]
struct Change {
    seq: u64,
    dot: Dot,
    entry: Entry,
    join: bool,
}

/// A topic's changes not yet broadcast, and when its last diff went out.
///
/// The changes are cut into consecutive segments, each sent as one diff: a change whose key
/// already changed in the last segment (a join, then the leave of the same key; a user's second
/// tab) starts a new one, so a diff never merges two changes of one key, which Phoenix sends
/// apart. Changes of distinct keys share a segment (a storm's joins: a few diffs per window).
/// A change is never split: its elements (an update's leave and join, a gossip round's joins
/// and leaves) go out in one diff, as Phoenix sends them.
struct TopicDiff {
    changes: Vec<Change>,
    /// Where each segment after the first starts in `changes`, in order.
    cuts: Vec<usize>,
    /// The keys of the last segment, each with the number of the last change of it there.
    keys: HashMap<Arc<str>, u64>,
    /// When the last diff of this topic was sent (`None`: never, or long ago).
    last: Option<Instant>,
    /// When the pending changes are due (`None`: nothing pending).
    due: Option<Instant>,
}

impl TopicDiff {
    /// Appends an element of change `change.seq` (a change's elements come one after the
    /// other), starting a new segment with the change when its key changed earlier in the
    /// last one: the elements of this change already appended move along with it.
    fn push(&mut self, change: Change) {
        let seq = change.seq;
        if self
            .keys
            .get(&change.entry.key)
            .is_some_and(|&earlier| earlier != seq)
        {
            let start = self
                .changes
                .iter()
                .rposition(|c| c.seq != seq)
                .map_or(0, |i| i + 1);
            self.cuts.push(start);
            self.keys.clear();
            for c in &self.changes[start..] {
                self.keys.insert(c.entry.key.clone(), seq);
            }
        }
        self.keys.insert(change.entry.key.clone(), seq);
        self.changes.push(change);
    }

    /// Takes the pending changes, one list per segment, in order.
    fn take_segments(&mut self) -> Vec<Vec<Change>> {
        let mut changes = std::mem::take(&mut self.changes);
        let mut segments = Vec::with_capacity(self.cuts.len() + 1);
        for cut in self.cuts.drain(..).rev() {
            segments.push(changes.split_off(cut));
        }
        segments.push(changes);
        segments.reverse();
        self.keys.clear();
        segments
    }
}

/// Everything behind the tracker's lock. One lock, so that a change's number, its place in
/// the state and its place in the pending diff are taken together: a list taken at change
/// `n` holds exactly the changes numbered up to `n`.
struct Inner {
    state: State,
    /// Changes applied so far (local and remote); the number of the latest.
    seq: u64,
    pending: HashMap<Arc<str>, TopicDiff>,
    /// Local changes for the next gossip round; `None` on a node without a cluster.
    unsent: Option<Unsent>,
}

/// The presence tracker of one endpoint.
pub(crate) struct Tracker {
    replica: crdt::ReplicaId,
    inner: Mutex<Inner>,
    flush: Arc<Notify>,
    flusher_started: std::sync::Once,
    next_owner: AtomicU64,
    batch: Duration,
    fetch: Option<PresenceFetch>,
}

/// Publishes presence diffs; implemented by the endpoint.
pub(crate) trait DiffSink: Send + Sync + 'static {
    fn publish_diff(&self, diff: &Diff<'_>);
}

pub(crate) use crate::node::queue::NOT_LIVE;

impl Tracker {
    /// A tracker for replica `replica` (the cluster node id, or a random one alone);
    /// `gossip` when its changes go to other nodes.
    pub(crate) fn new(
        replica: crdt::ReplicaId,
        batch: Duration,
        fetch: Option<PresenceFetch>,
        gossip: bool,
    ) -> Self {
        Tracker {
            replica,
            inner: Mutex::new(Inner {
                state: State::default(),
                seq: 0,
                pending: HashMap::new(),
                unsent: gossip.then(Unsent::default),
            }),
            flush: Arc::new(Notify::new()),
            flusher_started: std::sync::Once::new(),
            next_owner: AtomicU64::new(1),
            batch,
            fetch,
        }
    }

    /// The number of presence entries tracked (this node's and the others').
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().state.len()
    }

    /// A new owner id for a channel that starts tracking.
    pub(crate) fn new_owner(&self) -> Owner {
        Owner {
            replica: self.replica,
            id: self.next_owner.fetch_add(1, Ordering::Relaxed),
        }
    }

    pub(crate) fn track(
        &self,
        owner: Owner,
        topic: &str,
        key: &str,
        meta: Value,
    ) -> Result<String, PresenceError> {
        let meta = object(meta)?;
        let mut inner = self.inner.lock();
        if inner.state.find(owner, topic, key).is_some() {
            return Err(PresenceError::AlreadyTracked);
        }
        let entry = Entry {
            topic: topic.into(),
            key: key.into(),
            owner,
            meta,
            prev: None,
        };
        let (dot, delta) = inner.state.add(self.replica, entry.clone());
        self.record(&mut inner, [delta], vec![(dot, entry)], Vec::new());
        Ok(phx_ref(dot))
    }

    pub(crate) fn update(
        &self,
        owner: Owner,
        topic: &str,
        key: &str,
        meta: Value,
    ) -> Result<String, PresenceError> {
        let meta = object(meta)?;
        let mut inner = self.inner.lock();
        let old = inner
            .state
            .find(owner, topic, key)
            .ok_or(PresenceError::NoPresence)?;
        let (left, removed) = inner.state.remove(old).ok_or(PresenceError::NoPresence)?;
        let entry = Entry {
            meta,
            prev: Some(old),
            ..left.clone()
        };
        let (dot, added) = inner.state.add(self.replica, entry.clone());
        self.record(
            &mut inner,
            [removed, added],
            vec![(dot, entry)],
            vec![(old, left)],
        );
        Ok(phx_ref(dot))
    }

    pub(crate) fn untrack(&self, owner: Owner, topic: &str, key: &str) {
        let mut inner = self.inner.lock();
        let Some(d) = inner.state.find(owner, topic, key) else {
            return;
        };
        if let Some((e, delta)) = inner.state.remove(d) {
            self.record(&mut inner, [delta], Vec::new(), vec![(d, e)]);
        }
    }

    /// Untracks everything `owner` tracked (its channel has ended): costs what it tracked,
    /// not what the node holds.
    pub(crate) fn untrack_owner(&self, owner: Owner) {
        let mut inner = self.inner.lock();
        let mut deltas = Vec::new();
        let mut leaves = Vec::new();
        for d in inner.state.owned_by(owner) {
            if let Some((e, removed)) = inner.state.remove(d) {
                deltas.push(removed);
                leaves.push((d, e));
            }
        }
        if !leaves.is_empty() {
            self.record(&mut inner, deltas, Vec::new(), leaves);
        }
    }

    /// Records one local change (made of these deltas) for the next gossip round and for the
    /// topics' diffs.
    fn record(
        &self,
        inner: &mut Inner,
        deltas: impl IntoIterator<Item = State>,
        joins: Vec<(Dot, Entry)>,
        leaves: Vec<(Dot, Entry)>,
    ) {
        if let Some(unsent) = &mut inner.unsent {
            for d in deltas {
                unsent.delta.join(&d);
            }
            unsent.generation += 1;
        }
        self.changed(inner, joins, leaves);
    }

    /// Whether this replica has changes not yet taken by [`Tracker::take_delta`].
    pub(crate) fn has_unsent(&self) -> bool {
        let inner = self.inner.lock();
        inner
            .unsent
            .as_ref()
            .is_some_and(|u| u.generation != u.sent)
    }

    /// The local changes since the last call, as a delta covering generations
    /// `(from, to]`, for the next heartbeat.
    pub(crate) fn take_delta(&self) -> (State, u64, u64) {
        let mut inner = self.inner.lock();
        let unsent = inner.unsent.get_or_insert_with(Unsent::default);
        let to = unsent.generation;
        let from = std::mem::replace(&mut unsent.sent, to);
        (std::mem::take(&mut unsent.delta), from, to)
    }

    /// This replica's part of the state and the generation it includes at least, for a node
    /// that is new or lagging.
    pub(crate) fn own_slice(&self) -> (State, u64) {
        let inner = self.inner.lock();
        let generation = inner.unsent.as_ref().map_or(0, |u| u.generation);
        (inner.state.slice(self.replica), generation)
    }

    /// Joins a delta or a slice from node `from`; its joins and leaves go out as diffs.
    ///
    /// Refused (false) when it is not only `from`'s own: a node gossips only its own
    /// elements and dots, so a message that names another replica (this one, say) or a clock
    /// that jumps more than `MAX_CLOCK_JUMP` past what is known of `from` is forged or
    /// corrupt, and joining it could remove other nodes' presences or overflow clocks.
    pub(crate) fn merge_remote(&self, from: crdt::ReplicaId, remote: &State) -> bool {
        let mut inner = self.inner.lock();
        if from == self.replica
            || !remote.only_of(from)
            || remote.context().highest(from)
                > inner
                    .state
                    .context()
                    .highest(from)
                    .saturating_add(MAX_CLOCK_JUMP)
        {
            return false;
        }
        let changes = inner.state.join(remote);
        if !changes.joins.is_empty() || !changes.leaves.is_empty() {
            self.changed(&mut inner, changes.joins, changes.leaves);
        }
        true
    }

    /// Drops everything of a replica that is gone (node down, or left).
    pub(crate) fn forget(&self, replica: crdt::ReplicaId) {
        let mut inner = self.inner.lock();
        let gone = inner.state.forget(replica);
        if !gone.is_empty() {
            tracing::info!(
                replica,
                presences = gone.len(),
                "presences of a departed node removed"
            );
            self.changed(&mut inner, Vec::new(), gone);
        }
    }

    /// The topic's presences: `{key: {"metas": [...]}}`, through the fetch hook.
    pub(crate) fn list(&self, topic: &str) -> Payload {
        let entries = self.snapshot(topic, |_| {});
        self.render(topic, entries)
    }

    /// The topic's presences for a subscriber whose cursor is `cursor`: from now on it gets
    /// the diffs of later changes only (see [`Diff`]).
    pub(crate) fn list_for(&self, topic: &str, cursor: &AtomicU64) -> Payload {
        let entries = self.snapshot(topic, |seq| {
            let c = cursor.load(Ordering::Acquire);
            if c == NOT_LIVE || c < seq {
                cursor.store(seq, Ordering::Release);
            }
        });
        self.render(topic, entries)
    }

    /// A subscriber that has not listed the topic's presences starts getting the diffs of
    /// changes made from now on.
    pub(crate) fn go_live(&self, cursor: &AtomicU64) {
        if cursor.load(Ordering::Acquire) == NOT_LIVE {
            let inner = self.inner.lock();
            let _ =
                cursor.compare_exchange(NOT_LIVE, inner.seq, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// The topic's entries (reference counts), with `at` given the number of the last change
    /// they include, under the same lock. Rendering a big room's list takes milliseconds and
    /// happens after, outside the lock.
    fn snapshot(&self, topic: &str, at: impl FnOnce(u64)) -> Vec<(Dot, Entry)> {
        let inner = self.inner.lock();
        at(inner.seq);
        inner
            .state
            .topic(topic)
            .map(|(dot, e)| (dot, e.clone()))
            .collect()
    }

    fn render(&self, topic: &str, mut entries: Vec<(Dot, Entry)>) -> Payload {
        if self.fetch.is_none()
            && let Some(rendered) = render_list(&mut entries)
        {
            return rendered;
        }
        let mut map = Map::new();
        for (dot, e) in &entries {
            push_meta(&mut map, *dot, e);
        }
        self.finish(topic, map)
    }

    /// Runs the fetch hook. It is user code: a panic leaves the entries as they are (logged),
    /// and never ends the task that sends diffs.
    fn finish(&self, topic: &str, mut map: Map<String, Value>) -> Payload {
        if let Some(fetch) = &self.fetch {
            let run = std::panic::AssertUnwindSafe(|| fetch(topic, &mut map));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!(
                    topic,
                    "presence fetch hook panicked; entries sent as tracked"
                );
            }
        }
        Payload::from(Value::Object(map))
    }

    /// Records changes (one change number) for the topics' next diffs and wakes the flusher
    /// when a topic's diff is due: at once when its last diff went out more than the batch
    /// window ago, else at the end of that window.
    fn changed(&self, inner: &mut Inner, joins: Vec<(Dot, Entry)>, leaves: Vec<(Dot, Entry)>) {
        inner.seq += 1;
        let seq = inner.seq;
        let now = Instant::now();
        let mut wake = false;
        let all = leaves
            .into_iter()
            .map(|(dot, entry)| (dot, entry, false))
            .chain(joins.into_iter().map(|(dot, entry)| (dot, entry, true)));
        for (dot, entry, join) in all {
            let topic = inner
                .pending
                .entry(entry.topic.clone())
                .or_insert_with(|| TopicDiff {
                    changes: Vec::new(),
                    cuts: Vec::new(),
                    keys: HashMap::new(),
                    last: None,
                    due: None,
                });
            if topic.due.is_none() {
                let due = match topic.last {
                    Some(last) if now < last + self.batch => last + self.batch,
                    _ => now,
                };
                topic.due = Some(due);
                wake = true;
            }
            topic.push(Change {
                seq,
                dot,
                entry,
                join,
            });
        }
        if wake {
            self.flush.notify_one();
        }
    }

    /// Starts the task that broadcasts diffs (once; needs a Tokio runtime). The task holds
    /// neither the tracker nor the endpoint, and ends when they are dropped.
    pub(crate) fn start_flusher(self: &Arc<Self>, sink: Weak<dyn DiffSink>) {
        self.flusher_started.call_once(|| {
            let tracker = Arc::downgrade(self);
            let notify = self.flush.clone();
            tokio::spawn(async move {
                let mut next = None;
                loop {
                    match next {
                        Some(at) => {
                            tokio::select! {
                                _ = notify.notified() => {}
                                _ = tokio::time::sleep_until(at) => {}
                            }
                        }
                        None => notify.notified().await,
                    }
                    let (Some(t), Some(sink)) = (tracker.upgrade(), sink.upgrade()) else {
                        return;
                    };
                    next = t
                        .flush_due(Instant::now(), &*sink)
                        .map(tokio::time::Instant::from_std);
                }
            });
        });
    }

    /// Sends the diffs due at `now`; returns when the next ones are due. Topics whose last
    /// diff is older than the window and that have nothing pending are forgotten.
    fn flush_due(&self, now: Instant, sink: &dyn DiffSink) -> Option<Instant> {
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        {
            let mut inner = self.inner.lock();
            let batch = self.batch;
            inner.pending.retain(|topic, diff| match diff.due {
                Some(at) if at <= now => {
                    due.push((topic.clone(), diff.take_segments()));
                    diff.due = None;
                    diff.last = Some(now);
                    true
                }
                Some(at) => {
                    next = Some(next.map_or(at, |n| n.min(at)));
                    true
                }
                None => diff.last.is_some_and(|last| now < last + batch),
            });
        }
        // One task sends them all, each topic's segments in order: a topic's diffs never
        // reorder.
        for (topic, segments) in due {
            for changes in segments {
                sink.publish_diff(&Diff {
                    tracker: self,
                    topic: &topic,
                    changes,
                });
            }
        }
        next
    }

    /// Sends every pending diff now (tests).
    #[cfg(test)]
    fn flush_now(&self, sink: &dyn DiffSink) {
        let far = Instant::now() + Duration::from_secs(3600);
        self.flush_due(far, sink);
    }
}

/// How far past what is known of a node its gossip may move that node's clock at once.
const MAX_CLOCK_JUMP: u64 = 1 << 32;

impl Drop for Tracker {
    fn drop(&mut self) {
        // Wakes the flusher so that it sees the tracker gone and ends.
        self.flush.notify_one();
    }
}

/// Changes of one topic sent together (a segment of [`TopicDiff`]): numbered `first..=last`,
/// no two of them of the same key.
///
/// Every subscriber of the topic has a cursor: the last change its client knows of (from
/// the `presence_state` it was sent, [`Tracker::list_for`], or from when it started getting
/// diffs, [`Tracker::go_live`]). It gets only the changes after its cursor: the whole diff
/// (encoded once for all such subscribers) when its cursor is before `first`, nothing when
/// it is at `last` or later, and a diff of the later changes, rendered for it, when the
/// cursor falls inside (it listed the presences while these changes were pending).
pub(crate) struct Diff<'a> {
    tracker: &'a Tracker,
    topic: &'a str,
    changes: Vec<Change>,
}

impl Sequenced for Diff<'_> {
    fn topic(&self) -> &str {
        self.topic
    }

    fn first(&self) -> u64 {
        self.changes.first().map_or(0, |c| c.seq)
    }

    fn last(&self) -> u64 {
        self.changes.last().map_or(0, |c| c.seq)
    }

    /// The `presence_diff` of the changes after `cursor`; `None` when nothing is left.
    ///
    /// No two changes here are of one key, so each element (a dot, of one key) joins or
    /// leaves once: the diff lists each as its change says.
    fn since(&self, cursor: u64) -> Option<Broadcast> {
        let (mut joins, mut leaves) = (Vec::new(), Vec::new());
        for c in self.changes.iter().filter(|c| c.seq > cursor) {
            let side = if c.join { &mut joins } else { &mut leaves };
            side.push((c.dot, &c.entry));
        }
        if joins.is_empty() && leaves.is_empty() {
            return None;
        }
        // Metas of one key in dot order, as in a list.
        joins.sort_unstable_by_key(|(dot, _)| *dot);
        leaves.sort_unstable_by_key(|(dot, _)| *dot);
        let t = self.tracker;
        let fast = t
            .fetch
            .is_none()
            .then(|| render_diff(&mut joins, &mut leaves));
        let payload = match fast.flatten() {
            Some(payload) => payload,
            None => {
                let side = |entries: &[(Dot, &Entry)]| {
                    let mut map = Map::new();
                    for (dot, e) in entries {
                        push_meta(&mut map, *dot, e);
                    }
                    t.finish(self.topic, map).to_value().unwrap_or_default()
                };
                let (joins, leaves) = (side(&joins), side(&leaves));
                Payload::from(serde_json::json!({"joins": joins, "leaves": leaves}))
            }
        };
        Some(Broadcast::new(self.topic, "presence_diff", payload))
    }
}

/// Appends `e`'s meta (with `phx_ref`, and `phx_ref_prev` after an update) under its key.
/// A topic's list written straight as JSON text, as [`push_meta`] and `serde_json` would write
/// it (keys sorted, metas in dot order), without building a `Value` per meta: a 10,000-user
/// room's `presence_state` is rendered for every join, so this is the hot path of a presence
/// storm. `None` for a meta that is not a plain object without `phx_ref` keys (then the
/// general path writes it).
fn render_list(entries: &mut [(Dot, Entry)]) -> Option<Payload> {
    let mut refs: Vec<(Dot, &Entry)> = entries.iter().map(|(d, e)| (*d, e)).collect();
    let mut out = String::with_capacity(entries.len() * 96 + 2);
    write_entries(&mut out, &mut refs)?;
    RawJson::parse(out).ok().map(Payload::Json)
}

/// A `presence_diff` payload written straight as JSON text, like [`render_list`]: a diff is
/// rendered once per flush, and once more for each subscriber that listed the topic while its
/// changes were pending (a storm's joiners), so this is a hot path too.
fn render_diff(joins: &mut [(Dot, &Entry)], leaves: &mut [(Dot, &Entry)]) -> Option<Payload> {
    let mut out = String::with_capacity((joins.len() + leaves.len()) * 96 + 24);
    out.push_str(r#"{"joins":"#);
    write_entries(&mut out, joins)?;
    out.push_str(r#","leaves":"#);
    write_entries(&mut out, leaves)?;
    out.push('}');
    RawJson::parse(out).ok().map(Payload::Json)
}

/// Writes `{key: {"metas": [...]}}` as `serde_json` would write what [`push_meta`] builds
/// (keys sorted, metas in dot order). `None` for a meta that is not a plain object without
/// `phx_ref` keys (then the general path writes it).
fn write_entries(out: &mut String, entries: &mut [(Dot, &Entry)]) -> Option<()> {
    // Stable: metas of one key stay in dot order.
    entries.sort_by(|a, b| a.1.key.cmp(&b.1.key));
    out.push('{');
    let mut i = 0;
    while i < entries.len() {
        let key = &entries[i].1.key;
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(&**key).ok()?);
        out.push_str(r#":{"metas":["#);
        let mut first = true;
        while i < entries.len() && entries[i].1.key == *key {
            let (dot, e) = entries[i];
            let inner = e
                .meta
                .as_str()
                .trim()
                .strip_prefix('{')?
                .strip_suffix('}')?
                .trim();
            if inner.contains("\"phx_ref") {
                return None;
            }
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(r#"{"phx_ref":""#);
            out.push_str(&phx_ref(dot));
            out.push('"');
            if let Some(prev) = e.prev {
                out.push_str(r#","phx_ref_prev":""#);
                out.push_str(&phx_ref(prev));
                out.push('"');
            }
            if !inner.is_empty() {
                out.push(',');
                out.push_str(inner);
            }
            out.push('}');
            i += 1;
        }
        out.push_str("]}");
    }
    out.push('}');
    Some(())
}

fn push_meta(map: &mut Map<String, Value>, dot: Dot, e: &Entry) {
    let mut meta: Map<String, Value> =
        serde_json::from_slice(e.meta.as_bytes()).unwrap_or_default();
    meta.insert("phx_ref".into(), Value::String(phx_ref(dot)));
    if let Some(prev) = e.prev {
        meta.insert("phx_ref_prev".into(), Value::String(phx_ref(prev)));
    }
    let slot = map
        .entry(e.key.to_string())
        .or_insert_with(|| serde_json::json!({"metas": []}));
    if let Some(Value::Array(metas)) = slot.get_mut("metas") {
        metas.push(Value::Object(meta));
    }
}

fn object(meta: Value) -> Result<RawJson, PresenceError> {
    match meta {
        Value::Object(_) => {
            Ok(RawJson::parse(meta.to_string()).map_err(|_| PresenceError::MetaNotObject)?)
        }
        _ => Err(PresenceError::MetaNotObject),
    }
}

/// A meta's `phx_ref`: 16 URL-safe characters (12 bytes), unique per dot, like Phoenix's.
fn phx_ref(d: Dot) -> String {
    let mut bytes = [0u8; 12];
    bytes[..6].copy_from_slice(&d.replica.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&d.clock.to_be_bytes()[2..]);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// 32 random bytes, for keys of this process (see [`rand_u64`]).
pub(crate) fn random_bytes() -> [u8; 32] {
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&rand_u64().to_le_bytes());
    }
    out
}

/// A random u64 (no RNG dependency: each std `RandomState` is randomly keyed).
pub(crate) fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    RandomState::new().hash_one(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Mutex<Vec<(String, Value)>>);

    /// A diff never holds two changes of one key (Phoenix sends them apart).
    fn assert_one_change_per_key(diff: &Diff<'_>) {
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for c in &diff.changes {
            let seq = *seen.entry(&c.entry.key).or_insert(c.seq);
            assert_eq!(seq, c.seq, "two changes of {:?} in one diff", c.entry.key);
        }
    }

    impl DiffSink for Collect {
        fn publish_diff(&self, diff: &Diff<'_>) {
            assert_one_change_per_key(diff);
            if let Some(b) = diff.since(0) {
                self.0
                    .lock()
                    .push((b.topic().to_owned(), b.payload().to_value().unwrap()));
            }
        }
    }

    fn refs(v: &Value, side: &str, key: &str) -> Vec<String> {
        v[side][key]["metas"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|x| x["phx_ref"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn lists_written_as_text_equal_the_general_path() {
        let t = Tracker::new(1, Duration::ZERO, None, false);
        let owners: Vec<Owner> = (0..4).map(|_| t.new_owner()).collect();
        let topic = "room:list";
        t.track(
            owners[0],
            topic,
            "zoe",
            serde_json::json!({"n": 1, "s": "a\"b"}),
        )
        .unwrap();
        t.track(owners[1], topic, "al\"ice", serde_json::json!({}))
            .unwrap();
        t.track(
            owners[2],
            topic,
            "zoe",
            serde_json::json!({"device": "phone"}),
        )
        .unwrap();
        t.track(
            owners[3],
            topic,
            "bob",
            serde_json::json!({"v": [1, {"x": null}]}),
        )
        .unwrap();
        t.update(owners[3], topic, "bob", serde_json::json!({"v": 2}))
            .unwrap();
        let mut entries: Vec<(Dot, Entry)> = t
            .inner
            .lock()
            .state
            .topic(topic)
            .map(|(d, e)| (d, e.clone()))
            .collect();
        let fast = render_list(&mut entries).unwrap().to_value().unwrap();
        let mut map = Map::new();
        for (dot, e) in &entries {
            push_meta(&mut map, *dot, e);
        }
        assert_eq!(fast, Value::Object(map));
        // A diff written as text equals the general path too.
        let mut joins: Vec<(Dot, &Entry)> = entries.iter().map(|(d, e)| (*d, e)).collect();
        let mut leaves: Vec<(Dot, &Entry)> = joins[..2].to_vec();
        let mut general_leaves = Map::new();
        for (dot, e) in &leaves {
            push_meta(&mut general_leaves, *dot, e);
        }
        let diff = render_diff(&mut joins, &mut leaves)
            .unwrap()
            .to_value()
            .unwrap();
        assert_eq!(
            diff,
            serde_json::json!({"joins": fast.clone(), "leaves": Value::Object(general_leaves)})
        );
        assert_eq!(fast["zoe"]["metas"].as_array().unwrap().len(), 2);
        assert!(fast["bob"]["metas"][0]["phx_ref_prev"].is_string());
        assert_eq!(t.list(topic).to_value().unwrap(), fast);
    }

    #[test]
    fn track_update_untrack_and_their_diffs() {
        let t = Tracker::new(1, Duration::ZERO, None, false);
        let sink = Collect(Mutex::new(Vec::new()));
        let (a, b) = (t.new_owner(), t.new_owner());
        let r1 = t
            .track(a, "room:1", "alice", serde_json::json!({"n": 1}))
            .unwrap();
        assert_eq!(r1.len(), 16);
        assert_eq!(
            t.track(a, "room:1", "alice", serde_json::json!({})),
            Err(PresenceError::AlreadyTracked)
        );
        let r2 = t
            .track(b, "room:1", "alice", serde_json::json!({"n": 2}))
            .unwrap();
        assert_eq!(
            t.track(b, "room:1", "bob", serde_json::json!(1)),
            Err(PresenceError::MetaNotObject)
        );
        t.flush_now(&sink);
        // Two changes of one key: two diffs, as Phoenix sends them.
        let diffs = std::mem::take(&mut *sink.0.lock());
        assert_eq!(diffs.len(), 2);
        assert_eq!(
            refs(&diffs[0].1, "joins", "alice"),
            std::slice::from_ref(&r1)
        );
        assert_eq!(refs(&diffs[1].1, "joins", "alice"), [r2]);

        // An update is one diff with a join (carrying phx_ref_prev) and a leave.
        let r3 = t
            .update(a, "room:1", "alice", serde_json::json!({"n": 3}))
            .unwrap();
        assert_eq!(
            t.update(a, "room:1", "nobody", serde_json::json!({})),
            Err(PresenceError::NoPresence)
        );
        t.flush_now(&sink);
        let diff = sink.0.lock().pop().unwrap().1;
        assert_eq!(refs(&diff, "joins", "alice"), [r3]);
        assert_eq!(
            diff["joins"]["alice"]["metas"][0]["phx_ref_prev"],
            r1.as_str()
        );
        assert_eq!(diff["joins"]["alice"]["metas"][0]["n"], 3);
        assert_eq!(refs(&diff, "leaves", "alice"), [r1]);

        let list = t.list("room:1").to_value().unwrap();
        assert_eq!(refs(&list, "", "alice").len(), 0);
        let metas = list["alice"]["metas"].as_array().unwrap();
        assert_eq!(metas.len(), 2);

        t.untrack_owner(a);
        t.untrack(b, "room:1", "alice");
        t.flush_now(&sink);
        let diffs = std::mem::take(&mut *sink.0.lock());
        assert_eq!(diffs.len(), 2);
        assert_eq!(refs(&diffs[0].1, "leaves", "alice").len(), 1);
        assert_eq!(refs(&diffs[1].1, "leaves", "alice").len(), 1);
        assert_eq!(t.list("room:1").to_value().unwrap(), serde_json::json!({}));
    }

    /// The diffs collected so far: (joins, leaves) as `key:phx_ref` lists.
    fn sides(sink: &Collect) -> Vec<(Vec<String>, Vec<String>)> {
        let side = |v: &Value| -> Vec<String> {
            let mut out = Vec::new();
            for (key, entry) in v.as_object().unwrap() {
                for m in entry["metas"].as_array().unwrap() {
                    out.push(format!("{key}:{}", m["phx_ref"].as_str().unwrap()));
                }
            }
            out
        };
        std::mem::take(&mut *sink.0.lock())
            .iter()
            .map(|(_, d)| (side(&d["joins"]), side(&d["leaves"])))
            .collect()
    }

    /// A tab opened and closed within the batch window of a quiet topic: a join diff, then a
    /// leave diff, as Phoenix sends them (never one diff with the key on both sides).
    #[test]
    fn a_join_then_a_leave_within_the_window_are_two_diffs_in_order() {
        let batch = Duration::from_millis(20);
        let t = Tracker::new(1, batch, None, false);
        let sink = Collect(Mutex::new(Vec::new()));
        // A diff just went out: the next changes wait for the end of the window.
        t.track(t.new_owner(), "room:1", "bob", serde_json::json!({}))
            .unwrap();
        let start = Instant::now();
        assert_eq!(t.flush_due(start, &sink), None);
        assert_eq!(sides(&sink).len(), 1);
        let a = t.new_owner();
        let r = t
            .track(a, "room:1", "alice", serde_json::json!({}))
            .unwrap();
        t.untrack_owner(a);
        let due = t.flush_due(start, &sink).expect("held for the window");
        assert!(sides(&sink).is_empty());
        t.flush_due(due, &sink);
        let alice = format!("alice:{r}");
        assert_eq!(
            sides(&sink),
            [(vec![alice.clone()], vec![]), (vec![], vec![alice])]
        );
    }

    /// A second tab of one user leaves right after joining: its join and its leave are diffs
    /// of their own, and so is the first tab's join before them.
    #[test]
    fn a_second_tab_leaving_within_the_window_is_a_diff_of_its_own() {
        let t = Tracker::new(1, Duration::ZERO, None, false);
        let sink = Collect(Mutex::new(Vec::new()));
        let (tab1, tab2) = (t.new_owner(), t.new_owner());
        let r1 = t
            .track(tab1, "room:1", "alice", serde_json::json!({}))
            .unwrap();
        let r2 = t
            .track(tab2, "room:1", "alice", serde_json::json!({}))
            .unwrap();
        t.untrack(tab2, "room:1", "alice");
        t.flush_now(&sink);
        let (a1, a2) = (format!("alice:{r1}"), format!("alice:{r2}"));
        assert_eq!(
            sides(&sink),
            [
                (vec![a1], vec![]),
                (vec![a2.clone()], vec![]),
                (vec![], vec![a2])
            ]
        );
    }

    /// Changes of distinct keys within the window are merged (a storm costs a few diffs, not
    /// one per change); a later change of a key already in the diff starts the next one, which
    /// again takes the changes of distinct keys after it.
    #[test]
    fn changes_of_distinct_keys_within_the_window_are_merged() {
        const N: usize = 50;
        let t = Tracker::new(1, Duration::ZERO, None, false);
        let sink = Collect(Mutex::new(Vec::new()));
        let owners: Vec<Owner> = (0..N).map(|_| t.new_owner()).collect();
        for (i, o) in owners.iter().enumerate() {
            t.track(*o, "room:1", &format!("u{i}"), serde_json::json!({}))
                .unwrap();
        }
        // A change on another topic does not cut this topic's diff.
        t.track(owners[0], "room:2", "u0", serde_json::json!({}))
            .unwrap();
        t.untrack(owners[0], "room:1", "u0");
        t.untrack(owners[1], "room:1", "u1");
        t.track(t.new_owner(), "room:1", "late", serde_json::json!({}))
            .unwrap();
        t.flush_now(&sink);
        let diffs = std::mem::take(&mut *sink.0.lock());
        let room1: Vec<&Value> = diffs
            .iter()
            .filter(|(topic, _)| topic == "room:1")
            .map(|(_, d)| d)
            .collect();
        assert_eq!(room1.len(), 2);
        assert_eq!(room1[0]["joins"].as_object().unwrap().len(), N);
        assert_eq!(room1[0]["leaves"], serde_json::json!({}));
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&room1[1]["joins"]), ["late"]);
        assert_eq!(keys(&room1[1]["leaves"]), ["u0", "u1"]);
    }

    /// An update is one change (a leave and a join of one key): one diff with both, as
    /// Phoenix's `update` sends it, even right after the track it updates.
    #[test]
    fn an_update_is_one_diff_even_within_the_window() {
        let t = Tracker::new(1, Duration::ZERO, None, false);
        let sink = Collect(Mutex::new(Vec::new()));
        let a = t.new_owner();
        let r1 = t
            .track(a, "room:1", "alice", serde_json::json!({}))
            .unwrap();
        let r2 = t
            .update(a, "room:1", "alice", serde_json::json!({"away": true}))
            .unwrap();
        t.track(t.new_owner(), "room:1", "bob", serde_json::json!({}))
            .unwrap();
        t.flush_now(&sink);
        let (a1, a2) = (format!("alice:{r1}"), format!("alice:{r2}"));
        let diffs = sides(&sink);
        assert_eq!(diffs.len(), 2);
        assert_eq!(diffs[0], (vec![a1.clone()], vec![]));
        // Bob's join, of another key, joins the update's diff.
        assert_eq!(diffs[1].1, [a1]);
        assert_eq!(diffs[1].0.len(), 2);
        assert!(diffs[1].0.contains(&a2));
    }

    /// A gossip round from another node is one change: one diff with all its joins and
    /// leaves (Phoenix reports a merged delta at once), cut from a local change of its keys.
    #[test]
    fn a_gossip_round_is_one_diff_apart_from_changes_of_its_keys() {
        let here = Tracker::new(1, Duration::ZERO, None, true);
        let two = Tracker::new(2, Duration::ZERO, None, true);
        let sink = Collect(Mutex::new(Vec::new()));
        let local = here
            .track(here.new_owner(), "room:g", "alice", serde_json::json!({}))
            .unwrap();
        let tab1 = two.new_owner();
        let r1 = two
            .track(tab1, "room:g", "alice", serde_json::json!({}))
            .unwrap();
        let rb = two
            .track(two.new_owner(), "room:g", "bob", serde_json::json!({}))
            .unwrap();
        assert!(here.merge_remote(2, &two.take_delta().0));
        // Node 2's alice closes a tab and opens another between two rounds.
        two.untrack_owner(tab1);
        let r2 = two
            .track(two.new_owner(), "room:g", "alice", serde_json::json!({}))
            .unwrap();
        assert!(here.merge_remote(2, &two.take_delta().0));
        here.flush_now(&sink);
        let mut diffs = sides(&sink);
        for (joins, leaves) in &mut diffs {
            joins.sort();
            leaves.sort();
        }
        let (a1, a2) = (format!("alice:{r1}"), format!("alice:{r2}"));
        assert_eq!(
            diffs,
            [
                (vec![format!("alice:{local}")], vec![]),
                (vec![a1.clone(), format!("bob:{rb}")], vec![]),
                (vec![a2], vec![a1]),
            ]
        );
    }

    /// A subscriber of the real PubSub: its outbox and its cursor.
    fn subscriber(
        hub: &Hub,
        topic: &str,
    ) -> (
        Arc<crate::node::queue::Outbox>,
        Arc<crate::node::queue::Mailbox<crate::model::context::ChannelMsg<()>>>,
    ) {
        use crate::node::pubsub::{Inbox, Target};
        let outbox = Arc::new(crate::node::queue::Outbox::new(1 << 20));
        let mailbox = Arc::new(crate::node::queue::Mailbox::new(16));
        let inbox: Arc<dyn Inbox> = mailbox.clone();
        hub.0.subscribe(
            topic,
            Target::Fastlane {
                outbox: outbox.clone(),
                serializer: firebrand_protocol::Serializer::V2,
                intercepts: &[],
                inbox,
                seen: None,
            },
        );
        (outbox, mailbox)
    }

    /// The `presence_diff` payloads queued to a subscriber.
    fn received(outbox: &crate::node::queue::Outbox) -> Vec<Value> {
        use crate::node::queue::Frame;
        outbox
            .take()
            .frames
            .into_iter()
            .map(|frame| {
                let Frame::Text(text) = frame else {
                    panic!("text frames only")
                };
                let msg: Value = serde_json::from_slice(&text).unwrap();
                assert_eq!(msg[3], "presence_diff");
                msg[4].clone()
            })
            .collect()
    }

    /// Cut into several diffs, the changes still reach each subscriber after its list only:
    /// never a diff of a change its list holds, none missed, none twice, in order.
    #[test]
    fn each_subscriber_gets_the_diffs_after_its_list_only() {
        let topic = "room:c";
        let t = Tracker::new(1, Duration::ZERO, None, false);
        let hub = Hub(crate::node::pubsub::PubSub::new());
        let before = subscriber(&hub, topic);
        t.list_for(topic, &before.1.cursor);
        let a = t.new_owner();
        t.track(a, topic, "alice", serde_json::json!({})).unwrap();
        t.track(t.new_owner(), topic, "bob", serde_json::json!({}))
            .unwrap();
        // Lists while alice's and bob's joins are pending: holds both.
        let between = subscriber(&hub, topic);
        let state = t.list_for(topic, &between.1.cursor).to_value().unwrap();
        assert_eq!(state.as_object().unwrap().len(), 2);
        t.track(t.new_owner(), topic, "carol", serde_json::json!({}))
            .unwrap();
        t.untrack_owner(a);
        // Lists after every change: gets nothing.
        let after = subscriber(&hub, topic);
        t.list_for(topic, &after.1.cursor);
        t.flush_now(&hub);
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        let all = received(&before.0);
        assert_eq!(all.len(), 2, "{all:?}");
        // Carol's join, of another key, joins the first diff; alice's leave starts the next.
        assert_eq!(keys(&all[0]["joins"]), ["alice", "bob", "carol"]);
        assert_eq!(keys(&all[1]["joins"]), Vec::<String>::new());
        assert_eq!(keys(&all[1]["leaves"]), ["alice"]);
        // Its list holds the first diff's first two changes: it gets the rest.
        let got = received(&between.0);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(keys(&got[0]["joins"]), ["carol"]);
        assert_eq!(keys(&got[0]["leaves"]), Vec::<String>::new());
        assert_eq!(got[1], all[1]);
        assert!(received(&after.0).is_empty());
    }

    #[test]
    fn fetch_extends_lists_and_diffs() {
        let fetch: PresenceFetch = Arc::new(|topic, map| {
            for (key, entry) in map.iter_mut() {
                entry["user"] = serde_json::json!({"name": key.to_uppercase(), "topic": topic});
            }
        });
        let t = Tracker::new(1, Duration::ZERO, Some(fetch), false);
        let sink = Collect(Mutex::new(Vec::new()));
        t.track(t.new_owner(), "room:1", "ann", serde_json::json!({}))
            .unwrap();
        assert_eq!(
            t.list("room:1").to_value().unwrap()["ann"]["user"]["name"],
            "ANN"
        );
        t.flush_now(&sink);
        assert_eq!(
            sink.0.lock()[0].1["joins"]["ann"]["user"]["topic"],
            "room:1"
        );
    }

    /// The fetch hook is user code: a panic in it is logged and the diff goes out as tracked;
    /// the flusher (a node-wide task) keeps sending diffs.
    #[tokio::test]
    async fn a_panicking_fetch_hook_does_not_stop_diffs() {
        let fetch: PresenceFetch = Arc::new(|_, map| {
            if map.contains_key("boom") {
                panic!("fetch hook failed");
            }
        });
        let t = Arc::new(Tracker::new(1, Duration::ZERO, Some(fetch), false));
        let sink: Arc<Collect> = Arc::new(Collect(Mutex::new(Vec::new())));
        let weak: Weak<dyn DiffSink> = Arc::downgrade(&sink) as _;
        t.start_flusher(weak);
        t.track(t.new_owner(), "room:f", "boom", serde_json::json!({}))
            .unwrap();
        t.track(t.new_owner(), "room:f", "fine", serde_json::json!({}))
            .unwrap();
        // Both diffs arrive: the flusher survived the panic of the first one.
        let both = async {
            loop {
                let keys: Vec<String> = sink
                    .0
                    .lock()
                    .iter()
                    .flat_map(|(_, d)| {
                        d["joins"]
                            .as_object()
                            .unwrap()
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                    })
                    .collect();
                if keys.len() == 2 {
                    return keys;
                }
                tokio::task::yield_now().await;
            }
        };
        let keys = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("the diff after the panic never came");
        assert_eq!(keys, ["boom", "fine"]);
    }

    /// A node gossips only its own elements and dots: anything else is refused whole.
    #[test]
    fn gossip_naming_other_replicas_or_jumping_clocks_is_refused() {
        let here = Tracker::new(1, Duration::ZERO, None, true);
        let mine = here.new_owner();
        here.track(mine, "room:g", "local", serde_json::json!({}))
            .unwrap();
        // Node 2's honest delta is taken.
        let two = Tracker::new(2, Duration::ZERO, None, true);
        two.track(two.new_owner(), "room:g", "remote", serde_json::json!({}))
            .unwrap();
        let (delta, _, _) = two.take_delta();
        assert!(here.merge_remote(2, &delta));
        // Node 1's own slice, replayed by someone claiming to be node 2: it names replica 1
        // (this one), whose presences it could remove.
        let (own, _) = here.own_slice();
        assert!(!here.merge_remote(2, &own));
        // A message claiming to come from this node itself.
        assert!(!here.merge_remote(1, &delta));
        // A clock far past anything node 2 has sent: refused (it would overflow clocks).
        let mut far = crdt::State::default();
        let entry = crdt::Entry {
            topic: "room:g".into(),
            key: "forged".into(),
            owner: Owner { replica: 2, id: 1 },
            meta: RawJson::parse("{}".to_owned()).unwrap(),
            prev: None,
        };
        far.add_at(
            Dot {
                replica: 2,
                clock: u64::MAX,
            },
            entry,
        );
        assert!(!here.merge_remote(2, &far));
        let list = here.list("room:g").to_value().unwrap();
        let mut keys: Vec<&String> = list.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["local", "remote"]);
    }

    /// What the official client does with `presence_state` and `presence_diff` (phoenix.js
    /// `Presence.syncState` / `syncDiff`), keyed by `phx_ref`, failing on a change seen twice:
    /// a join of a meta it holds, or a leave of one it does not.
    #[derive(Default)]
    struct ClientView {
        metas: std::collections::BTreeSet<(String, String)>,
        /// Diffs received before the first state, applied after it (phoenix.js pendingDiffs).
        pending: Vec<Value>,
        synced: bool,
    }

    impl ClientView {
        fn metas_of(v: &Value) -> Vec<(String, String)> {
            let mut out = Vec::new();
            for (key, entry) in v.as_object().unwrap() {
                for m in entry["metas"].as_array().unwrap() {
                    out.push((key.clone(), m["phx_ref"].as_str().unwrap().to_owned()));
                }
            }
            out
        }

        fn state(&mut self, state: &Value) {
            self.metas = Self::metas_of(state).into_iter().collect();
            self.synced = true;
            for diff in std::mem::take(&mut self.pending) {
                self.diff(&diff).unwrap();
            }
        }

        fn diff(&mut self, diff: &Value) -> Result<(), String> {
            if !self.synced {
                self.pending.push(diff.clone());
                return Ok(());
            }
            let leaves = Self::metas_of(&diff["leaves"]);
            for m in Self::metas_of(&diff["joins"]) {
                // A meta that comes and goes within one diff is announced as both.
                if !self.metas.insert(m.clone()) {
                    return Err(format!("join of {m:?}, already known"));
                }
            }
            for m in leaves {
                if !self.metas.remove(&m) {
                    return Err(format!("leave of {m:?}, not known"));
                }
            }
            Ok(())
        }
    }

    /// The real PubSub as the sink: diffs reach subscribers through `dispatch_sequenced`.
    struct Hub(crate::node::pubsub::PubSub);

    impl DiffSink for Hub {
        fn publish_diff(&self, diff: &Diff<'_>) {
            assert_one_change_per_key(diff);
            self.0.dispatch_sequenced(diff);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Track(usize, usize),
        Update(usize),
        Untrack(usize),
        /// A new subscriber: 0 lists at once, 1 starts without a list, 2 lists later.
        Subscribe(u8),
        List(usize),
        Flush,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0usize..6, 0usize..3).prop_map(|(o, k)| Op::Track(o, k)),
            2 => (0usize..6).prop_map(Op::Update),
            3 => (0usize..6).prop_map(Op::Untrack),
            2 => (0u8..3).prop_map(Op::Subscribe),
            1 => (0usize..8).prop_map(Op::List),
            3 => Just(Op::Flush),
        ]
    }

    proptest::proptest! {
        /// Any interleaving of changes, joins and flushes: each subscriber's `presence_state`
        /// plus the diffs it got equals the tracker's state, and no change reaches it twice.
        #[test]
        fn state_plus_diffs_equals_the_tracker(ops in proptest::collection::vec(op(), 1..60)) {
            use crate::model::context::ChannelMsg;
            use crate::node::pubsub::{Inbox, Target};
            use crate::node::queue::{Frame, Mailbox, Outbox};
            use firebrand_protocol::Serializer;

            let topic = "room:p";
            let t = Tracker::new(1, Duration::ZERO, None, false);
            let hub = Hub(crate::node::pubsub::PubSub::new());
            let owners: Vec<Owner> = (0..6).map(|_| t.new_owner()).collect();
            struct Sub {
                outbox: Arc<Outbox>,
                mailbox: Arc<Mailbox<ChannelMsg<()>>>,
                view: ClientView,
                lists_later: bool,
            }
            let mut subs: Vec<Sub> = Vec::new();
            let receive = |sub: &mut Sub| -> Result<(), String> {
                for frame in sub.outbox.take().frames {
                    let Frame::Text(text) = frame else { panic!("text frames only") };
                    let msg: Value = serde_json::from_slice(&text).unwrap();
                    assert_eq!(msg[3], "presence_diff");
                    sub.view.diff(&msg[4])?;
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Track(o, k) => {
                        let _ = t.track(owners[o], topic, &format!("user{k}"), serde_json::json!({"o": o}));
                        // Another topic's changes never reach these subscribers.
                        let _ = t.track(owners[o], "room:other", "x", serde_json::json!({}));
                    }
                    Op::Update(o) => {
                        for k in 0..3 {
                            let _ = t.update(owners[o], topic, &format!("user{k}"), serde_json::json!({"u": o}));
                        }
                    }
                    Op::Untrack(o) => t.untrack_owner(owners[o]),
                    Op::Subscribe(mode) => {
                        let outbox = Arc::new(Outbox::new(1 << 20));
                        let mailbox = Arc::new(Mailbox::<ChannelMsg<()>>::new(16));
                        let inbox: Arc<dyn Inbox> = mailbox.clone();
                        hub.0.subscribe(topic, Target::Fastlane {
                            outbox: outbox.clone(),
                            serializer: Serializer::V2,
                            intercepts: &[],
                            inbox,
                            seen: None,
                        });
                        let mut sub = Sub { outbox, mailbox, view: ClientView::default(), lists_later: mode == 2 };
                        match mode {
                            0 => {
                                let state = t.list_for(topic, &sub.mailbox.cursor).to_value().unwrap();
                                sub.view.state(&state);
                            }
                            1 => {
                                t.go_live(&sub.mailbox.cursor);
                                // It knows what was there when it went live.
                                sub.view.state(&t.list(topic).to_value().unwrap());
                            }
                            _ => {}
                        }
                        subs.push(sub);
                    }
                    Op::List(i) => {
                        if let Some(sub) = subs.get_mut(i).filter(|s| s.lists_later) {
                            receive(sub).map_err(proptest::test_runner::TestCaseError::fail)?;
                            let state = t.list_for(topic, &sub.mailbox.cursor).to_value().unwrap();
                            sub.view.state(&state);
                            sub.lists_later = false;
                        }
                    }
                    Op::Flush => t.flush_now(&hub),
                }
                for sub in &mut subs {
                    receive(sub).map_err(proptest::test_runner::TestCaseError::fail)?;
                }
            }
            t.flush_now(&hub);
            let truth: std::collections::BTreeSet<_> =
                ClientView::metas_of(&t.list(topic).to_value().unwrap()).into_iter().collect();
            for sub in &mut subs {
                receive(sub).map_err(proptest::test_runner::TestCaseError::fail)?;
                if sub.view.synced {
                    proptest::prop_assert_eq!(&sub.view.metas, &truth);
                } else {
                    // Never listed: it got no diff at all.
                    proptest::prop_assert!(sub.view.pending.is_empty());
                }
            }
        }
    }
}
