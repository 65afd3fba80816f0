//! Presence: who is online on each topic, as Phoenix.Presence reports it.
//!
//! A channel tracks a key (a user id, say) with a meta (any JSON object) on its topic:
//! [`ChannelContext::track`](crate::ChannelContext::track). The entry lives as long as the
//! channel — a leave, a close, a crash or the connection going away untracks it. Each key can
//! have several metas at once (one per tab, per device), each with a unique `phx_ref`.
//!
//! Subscribers of the topic receive the changes as `presence_diff` broadcasts,
//! `{"joins": {key: {"metas": [...]}}, "leaves": {...}}`, exactly as Phoenix sends them, so the
//! official client's `Presence` class stays in sync. Diffs are **batched**: changes within a
//! short window (20 ms by default, [`EndpointBuilder::presence_batch`](crate::EndpointBuilder::presence_batch))
//! go out as one diff per topic, so a room where N users join at once costs N × (a few diffs),
//! not N² messages. A channel pushes the current list (`presence_state`) itself after joining
//! — Phoenix's after-join idiom:
//!
//! ```
//! # use firebrand::*;
//! # struct Room;
//! # impl Channel for Room { type Assigns = String; type Info = ();
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
//! The state is the replicated structure of Phoenix.Tracker (a delta-state observed-remove set,
//! see `crdt.rs`), kept by one tracker per endpoint. On one node nothing is replicated yet; the
//! cluster adapters will gossip its deltas.

pub(crate) mod crdt;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine;
use firebrand_protocol::{Payload, RawJson};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::pubsub::Broadcast;
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

/// Changes waiting to be broadcast for one topic.
#[derive(Default)]
struct PendingDiff {
    joins: BTreeMap<Dot, Entry>,
    leaves: BTreeMap<Dot, Entry>,
}

/// The presence tracker of one endpoint.
pub(crate) struct Tracker {
    replica: crdt::ReplicaId,
    state: Mutex<State>,
    /// Local changes not yet sent to other nodes.
    unsent: Mutex<Unsent>,
    pending: Mutex<HashMap<Arc<str>, PendingDiff>>,
    flush: Arc<Notify>,
    flusher_started: std::sync::Once,
    next_owner: AtomicU64,
    batch: Duration,
    fetch: Option<PresenceFetch>,
}

/// Publishes presence diffs; implemented by the endpoint.
pub(crate) trait DiffSink: Send + Sync + 'static {
    fn publish_diff(&self, b: Broadcast);
}

impl Tracker {
    /// A tracker for replica `replica` (the cluster node id, or a random one alone).
    pub(crate) fn new(
        replica: crdt::ReplicaId,
        batch: Duration,
        fetch: Option<PresenceFetch>,
    ) -> Self {
        Tracker {
            replica,
            state: Mutex::new(State::default()),
            unsent: Mutex::new(Unsent::default()),
            pending: Mutex::new(HashMap::new()),
            flush: Arc::new(Notify::new()),
            flusher_started: std::sync::Once::new(),
            next_owner: AtomicU64::new(1),
            batch,
            fetch,
        }
    }

    /// A new owner id for a channel that starts tracking.
    pub(crate) fn new_owner(&self) -> Owner {
        Owner {
            replica: self.replica,
            id: self.next_owner.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn find(state: &State, owner: Owner, topic: &str, key: &str) -> Option<Dot> {
        state
            .topic(topic)
            .find(|(_, e)| e.owner == owner && &*e.key == key)
            .map(|(d, _)| d)
    }

    pub(crate) fn track(
        &self,
        owner: Owner,
        topic: &str,
        key: &str,
        meta: Value,
    ) -> Result<String, PresenceError> {
        let meta = object(meta)?;
        let mut state = self.state.lock();
        if Self::find(&state, owner, topic, key).is_some() {
            return Err(PresenceError::AlreadyTracked);
        }
        let entry = Entry {
            topic: topic.into(),
            key: key.into(),
            owner,
            meta,
            prev: None,
        };
        let (dot, delta) = state.add(self.replica, entry.clone());
        drop(state);
        self.record([delta]);
        self.changed(vec![(dot, entry)], Vec::new());
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
        let mut state = self.state.lock();
        let old = Self::find(&state, owner, topic, key).ok_or(PresenceError::NoPresence)?;
        let (left, removed) = state.remove(old).ok_or(PresenceError::NoPresence)?;
        let entry = Entry {
            meta,
            prev: Some(old),
            ..left.clone()
        };
        let (dot, added) = state.add(self.replica, entry.clone());
        drop(state);
        self.record([removed, added]);
        self.changed(vec![(dot, entry)], vec![(old, left)]);
        Ok(phx_ref(dot))
    }

    pub(crate) fn untrack(&self, owner: Owner, topic: &str, key: &str) {
        let mut state = self.state.lock();
        let removed = Self::find(&state, owner, topic, key)
            .and_then(|d| state.remove(d).map(|(e, delta)| (d, e, delta)));
        drop(state);
        if let Some((d, e, delta)) = removed {
            self.record([delta]);
            self.changed(Vec::new(), vec![(d, e)]);
        }
    }

    /// Untracks everything `owner` tracked (its channel has ended).
    pub(crate) fn untrack_owner(&self, owner: Owner) {
        let mut state = self.state.lock();
        let mut deltas = Vec::new();
        let leaves: Vec<_> = state
            .owned_by(owner)
            .into_iter()
            .filter_map(|d| {
                let (e, removed) = state.remove(d)?;
                deltas.push(removed);
                Some((d, e))
            })
            .collect();
        drop(state);
        if !leaves.is_empty() {
            self.record(deltas);
            self.changed(Vec::new(), leaves);
        }
    }

    /// Records one local change (made of these deltas) for the next heartbeat.
    fn record(&self, deltas: impl IntoIterator<Item = State>) {
        let mut unsent = self.unsent.lock();
        for d in deltas {
            unsent.delta.join(&d);
        }
        unsent.generation += 1;
    }

    /// The local changes since the last call, as a delta covering generations
    /// `(from, to]`, for the next heartbeat.
    /// Whether this replica has changes not yet taken by [`Tracker::take_delta`].
    pub(crate) fn has_unsent(&self) -> bool {
        let unsent = self.unsent.lock();
        unsent.generation != unsent.sent
    }

    pub(crate) fn take_delta(&self) -> (State, u64, u64) {
        let mut unsent = self.unsent.lock();
        let to = unsent.generation;
        let from = std::mem::replace(&mut unsent.sent, to);
        (std::mem::take(&mut unsent.delta), from, to)
    }

    /// This replica's part of the state and the generation it includes at least, for a node
    /// that is new or lagging.
    pub(crate) fn own_slice(&self) -> (State, u64) {
        let generation = self.unsent.lock().generation;
        (self.state.lock().slice(self.replica), generation)
    }

    /// Joins a delta or a slice from another node; its joins and leaves go out as diffs.
    pub(crate) fn merge_remote(&self, remote: &State) {
        let changes = self.state.lock().join(remote);
        if !changes.joins.is_empty() || !changes.leaves.is_empty() {
            self.changed(changes.joins, changes.leaves);
        }
    }

    /// Drops everything of a replica that is gone (node down, or left).
    pub(crate) fn forget(&self, replica: crdt::ReplicaId) {
        let gone = self.state.lock().forget(replica);
        if !gone.is_empty() {
            tracing::info!(
                replica,
                presences = gone.len(),
                "presences of a departed node removed"
            );
            self.changed(Vec::new(), gone);
        }
    }

    /// The topic's presences: `{key: {"metas": [...]}}`, through the fetch hook.
    ///
    /// The state lock is held only to copy the topic's entries (reference counts): rendering a
    /// big room's list takes milliseconds, and every join and gossip message needs the lock.
    pub(crate) fn list(&self, topic: &str) -> Payload {
        let mut entries: Vec<(Dot, Entry)> = self
            .state
            .lock()
            .topic(topic)
            .map(|(dot, e)| (dot, e.clone()))
            .collect();
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

    fn finish(&self, topic: &str, mut map: Map<String, Value>) -> Payload {
        if let Some(fetch) = &self.fetch {
            fetch(topic, &mut map);
        }
        Payload::from(Value::Object(map))
    }

    /// Records changes for the next batched diff and wakes the flusher.
    fn changed(&self, joins: Vec<(Dot, Entry)>, leaves: Vec<(Dot, Entry)>) {
        let mut pending = self.pending.lock();
        for (d, e) in joins {
            pending
                .entry(e.topic.clone())
                .or_default()
                .joins
                .insert(d, e);
        }
        // A presence that comes and goes within one batch is announced as both a join and a
        // leave: a client may have received it in a `presence_state` meanwhile, and clients
        // apply joins before leaves, so the net effect is right either way.
        for (d, e) in leaves {
            pending
                .entry(e.topic.clone())
                .or_default()
                .leaves
                .insert(d, e);
        }
        drop(pending);
        self.flush.notify_one();
    }

    /// Starts the task that broadcasts batched diffs (once; needs a Tokio runtime). The task
    /// holds neither the tracker nor the endpoint, and ends when they are dropped.
    pub(crate) fn start_flusher(self: &Arc<Self>, sink: Weak<dyn DiffSink>) {
        self.flusher_started.call_once(|| {
            let tracker = Arc::downgrade(self);
            let notify = self.flush.clone();
            tokio::spawn(async move {
                loop {
                    notify.notified().await;
                    let Some(batch) = tracker.upgrade().map(|t| t.batch) else {
                        return;
                    };
                    tokio::time::sleep(batch).await;
                    let (Some(t), Some(sink)) = (tracker.upgrade(), sink.upgrade()) else {
                        return;
                    };
                    t.flush_now(&*sink);
                }
            });
        });
    }

    fn flush_now(&self, sink: &dyn DiffSink) {
        let pending = std::mem::take(&mut *self.pending.lock());
        for (topic, diff) in pending {
            if diff.joins.is_empty() && diff.leaves.is_empty() {
                continue;
            }
            let mut joins = Map::new();
            for (d, e) in &diff.joins {
                push_meta(&mut joins, *d, e);
            }
            let mut leaves = Map::new();
            for (d, e) in &diff.leaves {
                push_meta(&mut leaves, *d, e);
            }
            let joins = self.finish(&topic, joins).to_value().unwrap_or_default();
            let leaves = self.finish(&topic, leaves).to_value().unwrap_or_default();
            let payload = Payload::from(serde_json::json!({"joins": joins, "leaves": leaves}));
            sink.publish_diff(Broadcast::new(&*topic, "presence_diff", payload));
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Wakes the flusher so that it sees the tracker gone and ends.
        self.flush.notify_one();
    }
}

/// Appends `e`'s meta (with `phx_ref`, and `phx_ref_prev` after an update) under its key.
/// A topic's list written straight as JSON text, as [`push_meta`] and `serde_json` would write
/// it (keys sorted, metas in dot order), without building a `Value` per meta: a 10,000-user
/// room's `presence_state` is rendered for every join, so this is the hot path of a presence
/// storm. `None` for a meta that is not a plain object without `phx_ref` keys (then the
/// general path writes it).
fn render_list(entries: &mut [(Dot, Entry)]) -> Option<Payload> {
    // Stable: metas of one key stay in dot order.
    entries.sort_by(|a, b| a.1.key.cmp(&b.1.key));
    let mut out = String::with_capacity(entries.len() * 96 + 2);
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
            let (dot, e) = &entries[i];
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
            out.push_str(&phx_ref(*dot));
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
    RawJson::parse(out).ok().map(Payload::Json)
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

    impl DiffSink for Collect {
        fn publish_diff(&self, b: Broadcast) {
            self.0
                .lock()
                .push((b.topic().to_owned(), b.payload().to_value().unwrap()));
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
        let t = Tracker::new(1, Duration::ZERO, None);
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
            .state
            .lock()
            .topic(topic)
            .map(|(d, e)| (d, e.clone()))
            .collect();
        let fast = render_list(&mut entries).unwrap().to_value().unwrap();
        let mut map = Map::new();
        for (dot, e) in &entries {
            push_meta(&mut map, *dot, e);
        }
        assert_eq!(fast, Value::Object(map));
        assert_eq!(fast["zoe"]["metas"].as_array().unwrap().len(), 2);
        assert!(fast["bob"]["metas"][0]["phx_ref_prev"].is_string());
        assert_eq!(t.list(topic).to_value().unwrap(), fast);
    }

    #[test]
    fn track_update_untrack_and_their_diffs() {
        let t = Tracker::new(1, Duration::ZERO, None);
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
        let diffs = std::mem::take(&mut *sink.0.lock());
        assert_eq!(diffs.len(), 1);
        assert_eq!(
            refs(&diffs[0].1, "joins", "alice"),
            [r1.clone(), r2.clone()]
        );

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
        let diff = sink.0.lock().pop().unwrap().1;
        assert_eq!(refs(&diff, "leaves", "alice").len(), 2);
        assert_eq!(t.list("room:1").to_value().unwrap(), serde_json::json!({}));
    }

    /// A presence that comes and goes within one batch is still announced as both, since a
    /// client may have seen it in a presence_state meanwhile (otherwise it would keep a ghost).
    #[test]
    fn a_presence_that_comes_and_goes_within_a_batch_is_announced_as_both() {
        let t = Tracker::new(1, Duration::ZERO, None);
        let sink = Collect(Mutex::new(Vec::new()));
        let a = t.new_owner();
        let r = t
            .track(a, "room:1", "alice", serde_json::json!({}))
            .unwrap();
        t.untrack_owner(a);
        t.flush_now(&sink);
        let diffs = sink.0.lock();
        assert_eq!(diffs.len(), 1);
        assert_eq!(
            refs(&diffs[0].1, "joins", "alice"),
            std::slice::from_ref(&r)
        );
        assert_eq!(refs(&diffs[0].1, "leaves", "alice"), [r]);
    }

    #[test]
    fn fetch_extends_lists_and_diffs() {
        let fetch: PresenceFetch = Arc::new(|topic, map| {
            for (key, entry) in map.iter_mut() {
                entry["user"] = serde_json::json!({"name": key.to_uppercase(), "topic": topic});
            }
        });
        let t = Tracker::new(1, Duration::ZERO, Some(fetch));
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
}
