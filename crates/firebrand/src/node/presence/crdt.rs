//! The replicated presence state: a delta-state observed-remove set (the structure of
//! Phoenix.Tracker's `State`), pure and without I/O.
//!
//! Every tracked presence is an element tagged with a unique **dot** `(replica, clock)`: the
//! replica that added it and that replica's counter. Each replica keeps a **causal context**: the
//! dots it has seen, compacted to a contiguous maximum per replica plus a "cloud" of the others.
//!
//! - **add**: a new dot from the local replica; the delta is `{dot → element}` with context `{dot}`.
//! - **remove**: the element is dropped; the delta is no element with context `{dot}` — "I have
//!   seen this dot and no longer hold it".
//! - **join** of two states (or a state and a delta): keep an element present on both sides, or on
//!   one side when the other has not seen its dot; drop it when the other side has seen the dot
//!   and no longer holds it. Contexts are united.
//!
//! Join is commutative, associative and idempotent, so replicas converge whatever the order,
//! duplication or delay of the deltas they exchange; and a removed dot is never resurrected: once
//! a context holds it without the element, re-delivering the old add changes nothing. Deltas are
//! themselves states, so a batch of deltas is their join.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use firebrand_protocol::RawJson;

/// Identifies one tracker incarnation (a node's run); new on every start.
pub(crate) type ReplicaId = u64;

/// A unique tag: the replica that added an element and that replica's counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Dot {
    pub(crate) replica: ReplicaId,
    pub(crate) clock: u64,
}

/// Who tracked a presence: one channel instance, unique across replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Owner {
    pub(crate) replica: ReplicaId,
    pub(crate) id: u64,
}

/// One tracked presence: `key` (e.g. a user id) on `topic`, with its meta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) topic: Arc<str>,
    pub(crate) key: Arc<str>,
    pub(crate) owner: Owner,
    /// A JSON object, without `phx_ref` (derived from the dot) and `phx_ref_prev`.
    pub(crate) meta: RawJson,
    /// The dot this entry replaced in an update (`phx_ref_prev`).
    pub(crate) prev: Option<Dot>,
}

/// The dots a replica has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Context {
    /// Per replica, every clock up to this one has been seen.
    max: HashMap<ReplicaId, u64>,
    /// Seen dots beyond their replica's contiguous maximum.
    cloud: BTreeSet<Dot>,
}

impl Context {
    pub(crate) fn contains(&self, d: Dot) -> bool {
        self.max.get(&d.replica).is_some_and(|&m| d.clock <= m) || self.cloud.contains(&d)
    }

    /// Adds one dot: O(log n), whatever the size of the context.
    fn insert(&mut self, d: Dot) {
        if !self.contains(d) {
            self.cloud.insert(d);
            self.compact(d.replica);
        }
    }

    fn merge(&mut self, other: &Context) {
        for (&r, &m) in &other.max {
            let mine = self.max.entry(r).or_insert(0);
            *mine = (*mine).max(m);
        }
        self.cloud.extend(other.cloud.iter().copied());
        let mut replicas: Vec<ReplicaId> = other.max.keys().copied().collect();
        replicas.extend(other.cloud.iter().map(|d| d.replica));
        replicas.dedup();
        for r in replicas {
            self.compact(r);
        }
    }

    /// For one replica: drops cloud dots its contiguous maximum covers, and moves the ones that
    /// extend it into `max`. Costs the dots it moves or drops, not the size of the cloud.
    fn compact(&mut self, r: ReplicaId) {
        let mut m = self.max.get(&r).copied().unwrap_or(0);
        let first = Dot {
            replica: r,
            clock: 0,
        };
        while let Some(&d) = self.cloud.range(first..).next()
            && d.replica == r
            && d.clock <= m + 1
        {
            self.cloud.remove(&d);
            m = m.max(d.clock);
        }
        if m > 0 {
            self.max.insert(r, m);
        } else {
            self.max.remove(&r);
        }
    }

    /// The replicas this context mentions.
    pub(crate) fn replicas(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.max
            .keys()
            .copied()
            .chain(self.cloud.iter().map(|d| d.replica))
    }

    /// The highest clock this context mentions for `replica`.
    pub(crate) fn highest(&self, replica: ReplicaId) -> u64 {
        let max = self.max.get(&replica).copied().unwrap_or(0);
        let cloud = self
            .cloud
            .range(
                Dot { replica, clock: 0 }..=Dot {
                    replica,
                    clock: u64::MAX,
                },
            )
            .next_back()
            .map_or(0, |d| d.clock);
        max.max(cloud)
    }

    fn next(&self, replica: ReplicaId) -> Dot {
        let clock = self.max.get(&replica).copied().unwrap_or(0) + 1;
        Dot { replica, clock }
    }
}

/// What a join changed: elements that appeared and that disappeared.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) joins: Vec<(Dot, Entry)>,
    pub(crate) leaves: Vec<(Dot, Entry)>,
}

/// A replica's presence state, or a delta of one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct State {
    values: BTreeMap<Dot, Entry>,
    context: Context,
    /// topic → dots of its elements (an index; not part of equality of meaning, kept in sync).
    by_topic: HashMap<Arc<str>, BTreeSet<Dot>>,
    /// owner → dots of its elements (an index, like `by_topic`): a channel's end untracks
    /// what it tracked without looking at anyone else's presences.
    by_owner: HashMap<Owner, Vec<Dot>>,
}

impl State {
    /// The number of entries (every node's).
    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    fn insert(&mut self, d: Dot, e: Entry) {
        self.by_topic.entry(e.topic.clone()).or_default().insert(d);
        self.by_owner.entry(e.owner).or_default().push(d);
        self.values.insert(d, e);
    }

    fn take(&mut self, d: Dot) -> Option<Entry> {
        let e = self.values.remove(&d)?;
        if let Some(dots) = self.by_topic.get_mut(&e.topic) {
            dots.remove(&d);
            if dots.is_empty() {
                self.by_topic.remove(&e.topic);
            }
        }
        if let Some(dots) = self.by_owner.get_mut(&e.owner) {
            dots.retain(|x| *x != d);
            if dots.is_empty() {
                self.by_owner.remove(&e.owner);
            }
        }
        Some(e)
    }

    /// Adds `entry` as a new element of `replica` (which must be this state's own replica).
    /// Returns its dot and the delta to send to other replicas.
    pub(crate) fn add(&mut self, replica: ReplicaId, entry: Entry) -> (Dot, State) {
        let d = self.context.next(replica);
        let mut delta = State::default();
        delta.context.insert(d);
        delta.insert(d, entry.clone());
        self.context.insert(d);
        self.insert(d, entry);
        (d, delta)
    }

    /// Adds `entry` with a given dot, as a delta of another replica would hold it (tests).
    #[cfg(test)]
    pub(crate) fn add_at(&mut self, d: Dot, entry: Entry) {
        self.context.insert(d);
        self.insert(d, entry);
    }

    /// Removes the element `d`. Returns it and the delta, or `None` when it is not held.
    pub(crate) fn remove(&mut self, d: Dot) -> Option<(Entry, State)> {
        let e = self.take(d)?;
        let mut delta = State::default();
        delta.context.insert(d);
        Some((e, delta))
    }

    /// Joins `other` (a state or a delta) into this state; returns what changed.
    pub(crate) fn join(&mut self, other: &State) -> Changes {
        let mut changes = Changes::default();
        for (&d, e) in &other.values {
            if !self.values.contains_key(&d) && !self.context.contains(d) {
                self.insert(d, e.clone());
                changes.joins.push((d, e.clone()));
            }
        }
        // The elements `other` has seen and no longer holds: looked up from its context (a
        // delta's context is its own few dots), never by scanning this state.
        let gone = |d: &Dot| !other.values.contains_key(d);
        let mut removed: Vec<Dot> = other
            .context
            .cloud
            .iter()
            .filter(|d| self.values.contains_key(d) && gone(d))
            .copied()
            .collect();
        for (&replica, &m) in &other.context.max {
            let run = Dot { replica, clock: 0 }..=Dot { replica, clock: m };
            removed.extend(self.values.range(run).map(|(d, _)| *d).filter(gone));
        }
        for d in removed {
            if let Some(e) = self.take(d) {
                changes.leaves.push((d, e));
            }
        }
        self.context.merge(&other.context);
        changes
    }

    /// The elements of one topic, in dot order.
    pub(crate) fn topic(&self, topic: &str) -> impl Iterator<Item = (Dot, &Entry)> {
        self.by_topic
            .get(topic)
            .into_iter()
            .flatten()
            .filter_map(|d| self.values.get(d).map(|e| (*d, e)))
    }

    /// The elements tracked by `owner`.
    pub(crate) fn owned_by(&self, owner: Owner) -> Vec<Dot> {
        self.by_owner.get(&owner).cloned().unwrap_or_default()
    }

    /// The element `owner` tracks for `key` on `topic`.
    pub(crate) fn find(&self, owner: Owner, topic: &str, key: &str) -> Option<Dot> {
        let dots = self.by_owner.get(&owner)?;
        dots.iter().copied().find(|d| {
            self.values
                .get(d)
                .is_some_and(|e| &*e.topic == topic && &*e.key == key)
        })
    }

    /// The context of this state (the dots it has seen).
    pub(crate) fn context(&self) -> &Context {
        &self.context
    }

    /// Whether every element and every dot of this state is `replica`'s.
    pub(crate) fn only_of(&self, replica: ReplicaId) -> bool {
        self.values.keys().all(|d| d.replica == replica)
            && self.context.replicas().all(|r| r == replica)
    }

    /// The highest contiguous clock seen of `replica`.
    #[cfg(test)]
    fn clock(&self, replica: ReplicaId) -> u64 {
        self.context.max.get(&replica).copied().unwrap_or(0)
    }

    /// What this state knows of `replica`: its elements and its part of the context — itself
    /// a valid state, to join anywhere (the transfer to a new or lagging node).
    pub(crate) fn slice(&self, replica: ReplicaId) -> State {
        let mut out = State::default();
        let run = Dot { replica, clock: 0 }..=Dot {
            replica,
            clock: u64::MAX,
        };
        for (d, e) in self.values.range(run) {
            out.insert(*d, e.clone());
        }
        if let Some(&m) = self.context.max.get(&replica) {
            out.context.max.insert(replica, m);
        }
        out.context.cloud = self
            .context
            .cloud
            .iter()
            .filter(|d| d.replica == replica)
            .copied()
            .collect();
        out
    }

    /// Forgets `replica` entirely (it is gone): its elements, returned, and its context, so
    /// that if it comes back its state is accepted anew.
    pub(crate) fn forget(&mut self, replica: ReplicaId) -> Vec<(Dot, Entry)> {
        let run = Dot { replica, clock: 0 }..=Dot {
            replica,
            clock: u64::MAX,
        };
        let dots: Vec<Dot> = self.values.range(run).map(|(d, _)| *d).collect();
        let gone = dots
            .into_iter()
            .filter_map(|d| self.take(d).map(|e| (d, e)))
            .collect();
        self.context.max.remove(&replica);
        self.context.cloud.retain(|d| d.replica != replica);
        gone
    }

    /// The serializable form, for node-to-node messages.
    pub(crate) fn to_wire(&self) -> WireState {
        WireState {
            values: self
                .values
                .iter()
                .map(|(d, e)| WireEntry {
                    dot: (d.replica, d.clock),
                    topic: e.topic.to_string(),
                    key: e.key.to_string(),
                    owner: (e.owner.replica, e.owner.id),
                    meta: e.meta.as_str().to_owned(),
                    prev: e.prev.map(|p| (p.replica, p.clock)),
                })
                .collect(),
            max: self.context.max.iter().map(|(r, m)| (*r, *m)).collect(),
            cloud: self
                .context
                .cloud
                .iter()
                .map(|d| (d.replica, d.clock))
                .collect(),
        }
    }

    /// Rebuilds a state from its wire form; `None` when a meta is not valid JSON.
    pub(crate) fn from_wire(w: WireState) -> Option<State> {
        let dot = |(replica, clock)| Dot { replica, clock };
        let mut s = State::default();
        for e in w.values {
            let entry = Entry {
                topic: e.topic.into(),
                key: e.key.into(),
                owner: Owner {
                    replica: e.owner.0,
                    id: e.owner.1,
                },
                meta: RawJson::parse(e.meta.into_bytes()).ok()?,
                prev: e.prev.map(dot),
            };
            s.insert(dot(e.dot), entry);
        }
        s.context.max = w.max.into_iter().filter(|(_, m)| *m > 0).collect();
        s.context.cloud = w.cloud.into_iter().map(dot).collect();
        Some(s)
    }

    #[cfg(test)]
    fn dots(&self) -> BTreeSet<Dot> {
        self.values.keys().copied().collect()
    }
}

/// A [`State`] as node-to-node messages carry it (JSON).
#[derive(serde::Serialize, serde::Deserialize, Debug, Default)]
pub(crate) struct WireState {
    values: Vec<WireEntry>,
    max: Vec<(ReplicaId, u64)>,
    cloud: Vec<(ReplicaId, u64)>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct WireEntry {
    dot: (ReplicaId, u64),
    topic: String,
    key: String,
    owner: (ReplicaId, u64),
    meta: String,
    prev: Option<(ReplicaId, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wire_form_round_trips_and_slices_join_anywhere() {
        let mut a = State::default();
        let (d1, _) = a.add(1, entry(1, 1));
        a.add(1, entry(1, 2));
        let mut b = State::default();
        b.add(2, entry(2, 3));
        b.join(&a.slice(1));
        let back = State::from_wire(
            serde_json::from_str(&serde_json::to_string(&b.to_wire()).unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(back, b);
        assert_eq!(b.slice(1).dots(), a.dots());
        assert_eq!(b.clock(1), 2);
        let gone = b.forget(1);
        assert_eq!(gone.len(), 2);
        assert_eq!(b.clock(1), 0);
        // Forgotten, the replica's state is accepted again when it comes back.
        assert_eq!(b.join(&a.slice(1)).joins.len(), 2);
        assert!(b.dots().contains(&d1));
    }

    fn entry(replica: ReplicaId, n: u64) -> Entry {
        Entry {
            topic: "room:lobby".into(),
            key: format!("user{}", n % 3).into(),
            owner: Owner { replica, id: n },
            meta: RawJson::parse(format!("{{\"n\":{n}}}")).unwrap(),
            prev: None,
        }
    }

    #[test]
    fn add_remove_join() {
        let (mut a, mut b) = (State::default(), State::default());
        let (d1, delta1) = a.add(1, entry(1, 1));
        let ch = b.join(&delta1);
        assert_eq!(ch.joins.len(), 1);
        let (_, rm) = a.remove(d1).unwrap();
        // The old add arriving again after the remove does not resurrect it.
        let ch = b.join(&rm);
        assert_eq!(ch.leaves.len(), 1);
        assert!(b.join(&delta1).joins.is_empty());
        assert!(!b.dots().contains(&d1));
        assert_eq!(a.dots(), b.dots());
    }

    #[test]
    fn context_compacts_out_of_order_dots() {
        let mut c = Context::default();
        for clock in [3, 1, 2, 5] {
            c.insert(Dot { replica: 9, clock });
        }
        assert_eq!(c.max.get(&9), Some(&3));
        assert_eq!(c.cloud.len(), 1);
        assert!(c.contains(Dot {
            replica: 9,
            clock: 5
        }));
        assert!(!c.contains(Dot {
            replica: 9,
            clock: 4
        }));
    }

    /// An operation in a generated history.
    #[derive(Clone, Debug)]
    enum Op {
        /// Replica `r` tracks something.
        Add(usize),
        /// Replica `r` removes the `i`-th element it holds (modulo), if any.
        Remove(usize, usize),
        /// Replica `to` receives delta number `i` (modulo) produced so far: any order, any
        /// number of times.
        Deliver(usize, usize),
        /// Replica `to` receives the whole state of replica `from`.
        Sync(usize, usize),
    }

    const REPLICAS: usize = 3;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..REPLICAS).prop_map(Op::Add),
            (0..REPLICAS, any::<usize>()).prop_map(|(r, i)| Op::Remove(r, i)),
            (0..REPLICAS, any::<usize>()).prop_map(|(r, i)| Op::Deliver(r, i)),
            (0..REPLICAS, 0..REPLICAS).prop_map(|(a, b)| Op::Sync(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the interleaving of operations, deliveries (reordered, duplicated,
        /// delayed) and full-state syncs, once every delta reaches every replica all replicas
        /// hold the same elements: every add that was never removed, and no removed one.
        #[test]
        fn replicas_converge_and_removes_stay_removed(
            ops in proptest::collection::vec(op(), 0..120),
            final_order in any::<u64>(),
        ) {
            let mut states: Vec<State> = vec![State::default(); REPLICAS];
            // Per replica, the dots it held and then saw removed: it must never hold them again.
            let mut lost: Vec<BTreeSet<Dot>> = vec![BTreeSet::new(); REPLICAS];
            let mut deltas: Vec<State> = Vec::new();
            let mut added = BTreeSet::new();
            let mut removed = BTreeSet::new();
            let mut n = 0;
            for op in ops {
                match op {
                    Op::Add(r) => {
                        n += 1;
                        let (d, delta) = states[r].add(r as u64 + 1, entry(r as u64 + 1, n));
                        added.insert(d);
                        deltas.push(delta);
                    }
                    Op::Remove(r, i) => {
                        let dots: Vec<Dot> = states[r].dots().into_iter().collect();
                        if !dots.is_empty() {
                            let d = dots[i % dots.len()];
                            let (_, delta) = states[r].remove(d).unwrap();
                            removed.insert(d);
                            lost[r].insert(d);
                            deltas.push(delta);
                        }
                    }
                    Op::Deliver(to, i) => {
                        if !deltas.is_empty() {
                            let delta = deltas[i % deltas.len()].clone();
                            let changes = states[to].join(&delta);
                            lost[to].extend(changes.leaves.iter().map(|(d, _)| *d));
                        }
                    }
                    Op::Sync(from, to) => {
                        let whole = states[from].clone();
                        let changes = states[to].join(&whole);
                        lost[to].extend(changes.leaves.iter().map(|(d, _)| *d));
                    }
                }
                for (s, lost) in states.iter().zip(&lost) {
                    for d in s.dots() {
                        prop_assert!(added.contains(&d));
                        prop_assert!(!lost.contains(&d), "{:?} resurrected", d);
                    }
                }
            }
            // Final delivery of every delta to every replica, each in its own scrambled order
            // (a permutation: 7919 is a prime larger than the number of deltas).
            let len = deltas.len().max(1) as u64;
            for (r, s) in states.iter_mut().enumerate() {
                for k in 0..deltas.len() as u64 {
                    let i = (k * 7919 + final_order % len + r as u64) % len;
                    s.join(&deltas[i as usize]);
                }
            }
            let expected: BTreeSet<Dot> = added.difference(&removed).copied().collect();
            for s in &states {
                prop_assert_eq!(&s.dots(), &expected);
                prop_assert_eq!(&s.context, &states[0].context);
            }
        }

        /// Joining a batch (the join of several deltas) equals joining them one by one.
        #[test]
        fn joining_a_batch_equals_joining_each(adds in 1usize..20, removes in proptest::collection::vec(any::<usize>(), 0..10)) {
            let mut origin = State::default();
            let mut deltas = Vec::new();
            for i in 0..adds {
                deltas.push(origin.add(1, entry(1, i as u64)).1);
            }
            for i in removes {
                let dots: Vec<Dot> = origin.dots().into_iter().collect();
                if let Some(&d) = dots.get(i % dots.len().max(1)) {
                    deltas.push(origin.remove(d).unwrap().1);
                }
            }
            let mut batch = State::default();
            let mut one_by_one = State::default();
            for d in &deltas {
                batch.join(d);
                one_by_one.join(d);
            }
            let mut via_batch = State::default();
            via_batch.join(&batch);
            prop_assert_eq!(via_batch.dots(), one_by_one.dots());
            prop_assert_eq!(via_batch.dots(), origin.dots());
        }
    }
}
