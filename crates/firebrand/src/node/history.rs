//! Topic history, for recovery on rejoin: the last broadcasts of each recoverable topic, each
//! with its **position**, so that a client that lost its connection rejoins with the last
//! position it saw (`{"since": P}` in its join params) and gets what it missed, in order, once.
//!
//! A position names the history's life (an **epoch**: new whenever a topic's history starts
//! over) and an **offset** that grows with every broadcast of the topic. It travels as an
//! opaque string in the broadcast's `ref` slot (`[null, P, topic, event, payload]`), which
//! phoenix.js hands to `channel.on` callbacks as their second argument: 28 characters of
//! base64url starting with `A`, never a plain integer (phoenix.js takes a frame whose ref equals
//! its pending heartbeat's for the heartbeat's reply).
//!
//! **Two sources of positions.** A node alone gives them itself ([`History::append`]: a random
//! epoch per topic, offsets by one). In a cluster the engine gives them (the same on every
//! node), and each node's rings are fed with what the engine delivers ([`History::record`]):
//! they are the node's **cache** of the engine's history, so that most rejoins (a reconnect
//! storm's) are answered without asking the engine. What a ring holds is exact: every
//! broadcast of its epoch with an offset in `(base, top]`, and nothing else.
//!
//! **Why the seam has no gap and no duplicate.** A broadcast on a recoverable topic is recorded
//! and dispatched to the topic's subscribers under the topic's lock, in offset order. A join
//! takes the same lock while it subscribes, reads what came after its `since`, writes its reply
//! and queues the replay ([`History::catch_up`]). So every broadcast is either in the ring the
//! join read (and replayed, if after `since`) or dispatched after the subscription (and
//! delivered live, after the replay): never both, never neither.
//!
//! When the ring does not reach back to `since`, the join reads the engine first (without the
//! lock) and the read is merged into the ring under the lock before the answer: entries older
//! than the ring's are added in front; entries newer than the ring's top (the engine has them,
//! this node has not received them yet) are recorded and dispatched to the topic's current
//! subscribers right there, and their own arrival later is skipped as already delivered
//! (offset ≤ top). So a lagging node neither replays a broadcast and then delivers it live, nor
//! skips one for the subscribers it already had.
//!
//! **The byte budget.** Clients choose topic names, so the rings of a recoverable pattern could
//! hold `size` broadcasts of up to a frame each for as many topics as clients invent. All the
//! rings of a node share one budget in bytes ([`EndpointBuilder::history_budget`]): each entry
//! costs an estimate of what it keeps alive ([`cost`]: its payload, topic and event twice —
//! the broadcast and its encoded frame — plus a fixed overhead), and a ring that holds entries
//! costs a fixed overhead and its topic's name. Every entry recorded is also queued, in the
//! order recorded, in one FIFO of `(ring, epoch, offset)`; when the total passes the budget, the
//! FIFO's front is popped and its ring's entries up to that offset are evicted — the oldest
//! entries across all topics go first. An eviction raises the ring's base as a trim by size or
//! age does, so a `since` before it is not in the ring: on a node alone it answers
//! `recovered: false` (the broadcasts are gone), on an engine-fed node the engine is read as
//! for any position the cache does not hold. Never a wrong `recovered: true`.
//!
//! The budget is enforced after the topic's lock is released (the entries evicted are other
//! topics', and a thread never holds two rings' locks): the total may pass the budget by what
//! the appends in flight add. The byte and entry totals are atomics; the FIFO has its own
//! mutex, held for a `push_back` under the topic's lock (the map of topics already takes a
//! global mutex per broadcast) and, when over budget, for a `pop_front` per eviction. Entries
//! that leave their ring otherwise (trimmed by size or age, a restart) leave stale records in
//! the FIFO: they are skipped when popped, and purged (the FIFO rebuilt with its live,
//! distinct records) whenever it holds more than twice the live entries plus [`PURGE_SLACK`],
//! so the FIFO stays within a constant factor of what the rings hold.
//!
//! [`History::append`]: History::append
//! [`EndpointBuilder::history_budget`]: crate::EndpointBuilder::history_budget

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::pubsub::{Broadcast, Seen};

/// How much of a topic's history is kept: at most `size` broadcasts, none older than
/// `max_age`.
///
/// ```
/// use std::time::Duration;
/// let r = firebrand::cluster::Retention { size: 1000, max_age: Duration::from_secs(300) };
/// # drop(r);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// At most this many broadcasts.
    pub size: usize,
    /// None older than this.
    pub max_age: Duration,
}

/// What a join asks an engine's history for ([`HistoryEngine::read`](crate::cluster::HistoryEngine::read)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    /// The entries after this offset.
    After(u64),
    /// The last this many entries (0: only the epoch and top).
    Last(usize),
}

/// An engine's answer to a [`Query`], its messages decoded: every broadcast of the topic with
/// an offset in `(from, top]`, oldest first, with its age.
pub(crate) struct Read {
    pub(crate) epoch: u64,
    pub(crate) from: u64,
    pub(crate) top: u64,
    pub(crate) entries: Vec<(u64, Duration, Broadcast)>,
}

/// Why an engine read gave no answer ([`History::catch_up`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unread {
    /// The engine could not be asked: an error, or no answer while this node's link was
    /// silent. Whether the broadcasts are still there is unknown: a join is refused (the client
    /// retries).
    Unknown,
    /// The engine answered too slowly on a link that carries: given up, as not recovered.
    Slow,
}

/// The histories of a node's recoverable topics.
pub(crate) struct History {
    /// Topic patterns (`stream:*`, or an exact topic), their retention and, for topics whose
    /// positions come from outside ([`HistorySource`]), their source; the first match counts.
    routes: Vec<Route>,
    topics: Mutex<HashMap<Box<str>, Arc<Mutex<Ring>>>>,
    appends: AtomicU64,
    /// Whether an engine gives the positions ([`History::record`]) rather than this node
    /// ([`History::append`]).
    fed: bool,
    budget: Budget,
}

/// A pattern of recoverable topics: its retention, and its source when an external log gives
/// its topics' positions ([`HistorySource`]).
pub(crate) struct Route {
    pub(crate) pattern: Box<str>,
    pub(crate) retention: Retention,
    pub(crate) source: Option<Arc<dyn HistorySource>>,
}

impl Route {
    /// A pattern whose topics' positions this node or the cluster's engine gives.
    pub(crate) fn plain(pattern: &str, retention: Retention) -> Self {
        Route {
            pattern: pattern.into(),
            retention,
            source: None,
        }
    }
}

/// The rings' shared byte budget (see the module docs).
struct Budget {
    /// The most bytes the rings hold (as [`cost`] counts them) before the oldest entries go.
    limit: u64,
    /// What the rings hold now: the sum of their [`Ring::bytes`].
    bytes: AtomicU64,
    /// The entries the rings hold now.
    entries: AtomicU64,
    /// Entries evicted for the budget.
    evictions: AtomicU64,
    /// Every entry recorded, oldest first (some already gone from their ring: stale).
    fifo: Mutex<VecDeque<Kept>>,
    /// Whether the FIFO holds too many stale records: the next append purges it.
    purge_due: AtomicBool,
}

/// A record of the FIFO: the entry at `offset` of `ring`'s `epoch`.
struct Kept {
    ring: Arc<Mutex<Ring>>,
    epoch: u64,
    offset: u64,
}

/// What one entry is counted for, beyond its broadcast's bytes: the ring's slot, the shared
/// broadcast (its header, strings' allocations, position, frame slots) and its FIFO record.
/// With [`cost`], about what a node's RSS grows by per kept message (the history-cost bench:
/// ~910 B per 128-byte message).
const ENTRY_OVERHEAD: u64 = 512;
/// What a ring holding entries is counted for, beyond its topic's name: the map's slot, the
/// ring and its deque.
const TOPIC_OVERHEAD: u64 = 512;
/// Stale FIFO records tolerated beyond the live entries before a purge.
const PURGE_SLACK: u64 = 1024;

/// What an entry holding `b` is counted for: its payload, topic and event twice (the
/// broadcast, and the frame encoded for its subscribers and replays, kept with it), plus
/// [`ENTRY_OVERHEAD`].
fn cost(b: &Broadcast) -> u64 {
    let data = b.payload().len() + b.topic().len() + b.event().len();
    2 * data as u64 + ENTRY_OVERHEAD
}

/// Moves `total` by what a ring's count went from `before` to `after`.
fn adjust(total: &AtomicU64, before: u64, after: u64) {
    if after >= before {
        total.fetch_add(after - before, Ordering::Relaxed);
    } else {
        total.fetch_sub(before - after, Ordering::Relaxed);
    }
}

/// One topic's history: every broadcast of `epoch` with an offset in `(base, top]`.
struct Ring {
    epoch: u64,
    base: u64,
    /// The last offset recorded (and dispatched) here.
    top: u64,
    /// Whether `epoch`, `base` and `top` are known: an engine-fed ring knows nothing until its
    /// first broadcast or read.
    known: bool,
    /// `(offset, when, broadcast with its position)`, oldest first. Changed only through
    /// [`Ring::pop`], [`Ring::clear`] and [`Ring::add`], which keep `bytes` and `added`.
    entries: VecDeque<(u64, Instant, Broadcast)>,
    last_used: Instant,
    /// The [`cost`] of the entries.
    entry_bytes: u64,
    /// What the ring costs while it holds entries: its topic's name and [`TOPIC_OVERHEAD`].
    topic_bytes: u64,
    /// The offsets added since the budget last took them (for its FIFO).
    added: Vec<u64>,
    /// Forgotten (removed from the map): whoever locks it after takes the topic's new ring.
    dropped: bool,
}

/// What a join gets: the topic's current position (`None`: unknown, the engine could not be
/// read), whether its `since` was recovered (`None` without one), and the broadcasts to replay.
pub(crate) struct CatchUp {
    pub(crate) position: Option<String>,
    pub(crate) recovered: Option<bool>,
    pub(crate) replay: Vec<Broadcast>,
    /// The position the client rejoined with, when it is one of this topic's: what it has
    /// seen, which it must never be sent again (see `Target::Fastlane`).
    pub(crate) seen: Option<Seen>,
    /// Whether the join cannot be answered truthfully: the client's position is one of this
    /// topic's, this node's cache does not decide it, and the engine could not be read. The
    /// join is refused (the client retries) rather than told `recovered: false` about
    /// broadcasts that may well still be there.
    pub(crate) unavailable: bool,
}

/// Where an engine-fed broadcast sits in its topic's history, as the engine delivered it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Recorded {
    pub(crate) epoch: u64,
    pub(crate) offset: u64,
    /// The topic's previous offset, where the engine's offsets go up by one (then a gap shows).
    pub(crate) prev: Option<u64>,
}

/// Every this many appends, topics whose history is empty and unused for their `max_age` are
/// forgotten (a later broadcast starts a new epoch, or on an engine-fed node is read again).
const SWEEP_EVERY: u64 = 4096;

/// The event sent to a topic's subscribers when its history on this node has a gap (the
/// engine's delivery to this node lost broadcasts): phoenix.js treats it as the channel's
/// error and rejoins it (with `since`, so the client recovers what it missed).
const GAP_EVENT: &str = "phx_error";

/// The broadcast that tells `topic`'s subscribers to rejoin ([`GAP_EVENT`]).
fn gap(topic: &str) -> Broadcast {
    Broadcast::new(topic, GAP_EVENT, firebrand_protocol::Payload::empty())
}

impl History {
    /// The histories of a node alone (`fed` false) or of a node an engine feeds, holding at
    /// most about `budget` bytes (see the module docs).
    pub(crate) fn new(routes: Vec<Route>, fed: bool, budget: u64) -> Self {
        History {
            routes,
            topics: Mutex::default(),
            appends: AtomicU64::new(0),
            fed,
            budget: Budget {
                limit: budget,
                bytes: AtomicU64::new(0),
                entries: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
                fifo: Mutex::default(),
                purge_due: AtomicBool::new(false),
            },
        }
    }

    /// The bytes the rings hold now (as [`cost`] counts them), and the entries evicted for the
    /// budget so far.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let b = &self.budget;
        (
            b.bytes.load(Ordering::Relaxed),
            b.evictions.load(Ordering::Relaxed),
        )
    }

    /// The route of `topic`, if it is recoverable.
    fn route(&self, topic: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| match r.pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => topic == &*r.pattern,
            })
    }

    /// The retention of `topic`, if it is recoverable.
    pub(crate) fn retention(&self, topic: &str) -> Option<Retention> {
        self.route(topic).map(|r| r.retention)
    }

    /// The source of `topic`'s positions, if an external log gives them.
    pub(crate) fn source(&self, topic: &str) -> Option<&Arc<dyn HistorySource>> {
        self.route(topic).and_then(|r| r.source.as_ref())
    }

    /// The largest size and age among the routes the cluster's engine keeps (what it sizes its
    /// storage with).
    pub(crate) fn largest(&self) -> Option<Retention> {
        let engine = || self.routes.iter().filter(|r| r.source.is_none());
        let size = engine().map(|r| r.retention.size).max()?;
        let max_age = engine().map(|r| r.retention.max_age).max()?;
        Some(Retention { size, max_age })
    }

    /// Whether `topic`'s positions come from elsewhere (the cluster's engine, a source)
    /// rather than from this node.
    pub(crate) fn fed(&self, topic: &str) -> bool {
        self.fed || self.source(topic).is_some()
    }

    fn ring(&self, topic: &str) -> Arc<Mutex<Ring>> {
        if self.appends.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        self.topics
            .lock()
            .entry(topic.into())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Ring {
                    epoch: crate::node::presence::rand_u64(),
                    base: 0,
                    top: 0,
                    known: !self.fed(topic),
                    entries: VecDeque::new(),
                    last_used: Instant::now(),
                    entry_bytes: 0,
                    topic_bytes: topic.len() as u64 + TOPIC_OVERHEAD,
                    added: Vec::new(),
                    dropped: false,
                }))
            })
            .clone()
    }

    /// Runs `f` on `topic`'s ring under its lock, then accounts for what `f` changed and, the
    /// lock released, enforces the budget.
    fn with_ring<R>(&self, topic: &str, f: impl FnOnce(&mut Ring) -> R) -> R {
        let out = loop {
            let ring = self.ring(topic);
            let mut r = ring.lock();
            if r.dropped {
                // Forgotten by a sweep between the map and the lock: take the new one.
                continue;
            }
            let before = r.counts();
            let out = f(&mut r);
            self.settle(&ring, &mut r, before);
            break out;
        };
        self.enforce();
        out
    }

    /// Accounts for a ring's change from `before` (its bytes and entries), under its lock:
    /// the totals move, and the entries added are queued in the FIFO.
    fn settle(&self, ring: &Arc<Mutex<Ring>>, r: &mut Ring, before: (u64, u64)) {
        let b = &self.budget;
        let after = r.counts();
        adjust(&b.bytes, before.0, after.0);
        adjust(&b.entries, before.1, after.1);
        if !r.added.is_empty() {
            let mut fifo = b.fifo.lock();
            for offset in r.added.drain(..) {
                fifo.push_back(Kept {
                    ring: ring.clone(),
                    epoch: r.epoch,
                    offset,
                });
            }
            let live = b.entries.load(Ordering::Relaxed);
            if fifo.len() as u64 > 2 * live + PURGE_SLACK {
                b.purge_due.store(true, Ordering::Relaxed);
            }
        }
    }

    /// While the rings hold more than the budget, evicts the oldest entries (the FIFO's
    /// front), of any topic; purges the FIFO when it is due. Called with no ring locked.
    fn enforce(&self) {
        let b = &self.budget;
        // (Loaded first: a swap on every broadcast would contend for the flag's cache line.)
        if b.purge_due.load(Ordering::Relaxed) && b.purge_due.swap(false, Ordering::Relaxed) {
            self.purge();
        }
        while b.bytes.load(Ordering::Relaxed) > b.limit {
            let Some(kept) = b.fifo.lock().pop_front() else {
                break;
            };
            let mut r = kept.ring.lock();
            if !kept.live(&r) {
                continue;
            }
            let before = r.counts();
            let mut evicted = 0;
            while r.entries.front().is_some_and(|(o, _, _)| *o <= kept.offset) {
                r.pop();
                evicted += 1;
            }
            self.settle(&kept.ring, &mut r, before);
            b.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// Rebuilds the FIFO with its live records, each once, in order (records queued
    /// meanwhile go after them). Called with no ring locked.
    fn purge(&self) {
        let b = &self.budget;
        let old = std::mem::take(&mut *b.fifo.lock());
        let mut seen = HashSet::new();
        let mut kept = VecDeque::new();
        for k in old {
            let live = k.live(&k.ring.lock());
            if live && seen.insert((Arc::as_ptr(&k.ring) as usize, k.epoch, k.offset)) {
                kept.push_back(k);
            }
        }
        let mut fifo = b.fifo.lock();
        kept.extend(fifo.drain(..));
        *fifo = kept;
    }

    /// On a node alone: records `b` in its topic's history with the next position, and hands
    /// the positioned broadcast to `dispatch` under the topic's lock (so that subscribers get
    /// the topic's broadcasts in position order, and a join sees each either in the history or
    /// live).
    pub(crate) fn append(
        &self,
        b: &Broadcast,
        retention: Retention,
        dispatch: impl FnOnce(&Broadcast),
    ) {
        self.with_ring(b.topic(), |r| {
            let offset = r.top + 1;
            let positioned = r.push(b, offset, Instant::now(), retention);
            dispatch(&positioned);
        });
    }

    /// On an engine-fed node: records `b`, delivered by the engine at `at`, and hands it to
    /// `dispatch` with its position, under the topic's lock. A broadcast at or below the ring's
    /// top was delivered already (replayed from a read) and is skipped. A gap (an offset that is
    /// not the one after the top, where offsets go up by one) sends the topic's subscribers a
    /// `phx_error` first, so that their clients rejoin and recover what this node missed.
    pub(crate) fn record(
        &self,
        b: &Broadcast,
        at: Recorded,
        retention: Retention,
        mut dispatch: impl FnMut(&Broadcast),
    ) {
        self.with_ring(b.topic(), |r| {
            if !r.known || r.epoch != at.epoch {
                r.restart(at.epoch, at.offset.saturating_sub(1));
            } else if at.offset <= r.top {
                return;
            } else if at.prev.is_some_and(|p| p != r.top) {
                tracing::warn!(
                    topic = b.topic(),
                    from = r.top,
                    to = at.offset,
                    "history: this node missed broadcasts; the topic's channels rejoin to recover them"
                );
                dispatch(&gap(b.topic()));
                r.restart(at.epoch, at.offset - 1);
            }
            let positioned = r.push(b, at.offset, Instant::now(), retention);
            dispatch(&positioned);
        });
    }

    /// The engine's delivery to this node was interrupted (its subscription was lost): every
    /// ring forgets what it knows (the next join reads the engine), and the subscribers of
    /// every recoverable topic get a `phx_error`, so that their clients rejoin and recover.
    pub(crate) fn interrupted(&self, mut dispatch: impl FnMut(&Broadcast)) {
        let rings: Vec<_> = self
            .topics
            .lock()
            .iter()
            .map(|(t, r)| (t.clone(), r.clone()))
            .collect();
        for (topic, ring) in rings {
            let mut r = ring.lock();
            let before = r.counts();
            r.known = false;
            r.clear();
            self.settle(&ring, &mut r, before);
            dispatch(&gap(&topic));
        }
    }

    /// A join of `topic` with `since` (the position its client last saw, if it sent one): runs
    /// `f` under the topic's lock with the topic's position, whether `since` was recovered, and
    /// the broadcasts after it (without `since`: the last `recent` ones). `f` subscribes,
    /// replies and queues the replay; no broadcast of the topic is dispatched meanwhile.
    ///
    /// On an engine-fed node whose ring cannot answer, returns `Err(query)` without calling
    /// `f`: read the engine, then call again with the read (`Some(Err(why))`: it gave no
    /// answer); a second call always answers. A read is merged into the ring first (see the
    /// module docs), its broadcasts this node had not received yet going to `dispatch`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn catch_up<R>(
        &self,
        topic: &str,
        retention: Retention,
        since: Option<&str>,
        recent: usize,
        read: Option<Result<Read, Unread>>,
        dispatch: impl FnMut(&Broadcast),
        f: impl FnOnce(CatchUp) -> R,
    ) -> Result<R, Query> {
        self.with_ring(topic, |r| {
            let now = Instant::now();
            r.trim(now, retention);
            r.last_used = now;
            let tag = tag(topic);
            let asked = read.is_some() || !self.fed(topic);
            let unread = matches!(read, Some(Err(Unread::Unknown)));
            if let Some(Ok(read)) = read {
                r.absorb(read, tag, retention, now, dispatch);
            }
            let since = since.map(|s| Position::decode(s).filter(|p| p.tag == tag));

            let (recovered, replay) = match since {
                None if r.known && (asked || r.base == 0 || r.entries.len() >= recent) => {
                    let skip = r.entries.len().saturating_sub(recent);
                    let replay = r.entries.iter().skip(skip).map(|(_, _, b)| b.clone());
                    (None, replay.collect())
                }
                None if asked => (None, Vec::new()),
                None => return Err(Query::Last(recent)),
                Some(Some(p))
                    if r.known && p.epoch == r.epoch && r.base <= p.offset && p.offset <= r.top =>
                {
                    let replay = r.entries.iter().filter(|(o, _, _)| *o > p.offset);
                    (Some(true), replay.map(|(_, _, b)| b.clone()).collect())
                }
                Some(Some(p)) if !asked => {
                    // From the ring's top when the client saw more than this node has received so
                    // far: the read then brings this node up to date too.
                    let same = r.known && p.epoch == r.epoch;
                    let after = if same { p.offset.min(r.top) } else { p.offset };
                    return Err(Query::After(after));
                }
                Some(None) if !asked && !r.known => return Err(Query::Last(0)),
                // A position of this topic that the engine was asked about and could not
                // answer for: gone or not, nobody here knows.
                Some(Some(_)) if unread => (None, Vec::new()),
                Some(_) => (Some(false), Vec::new()),
            };
            let unavailable = unread && matches!(since, Some(Some(_))) && recovered.is_none();
            // What the client has seen, when this history holds it (recovered): never a
            // position this history does not reach, which a lost tail would make it skip.
            let seen = since
                .flatten()
                .filter(|_| recovered == Some(true))
                .map(|p| Seen {
                    epoch: p.epoch,
                    offset: p.offset,
                });
            let position = r.known.then(|| {
                Position {
                    epoch: r.epoch,
                    offset: r.top,
                    tag,
                }
                .encode()
            });
            Ok(f(CatchUp {
                position,
                recovered,
                replay,
                seen,
                unavailable,
            }))
        })
    }

    /// Forgets topics whose history is empty and was not used for their `max_age`.
    fn sweep(&self) {
        let now = Instant::now();
        self.topics.lock().retain(|topic, ring| {
            let Some(retention) = self.retention(topic) else {
                return false;
            };
            // A ring in use (locked by a join or a dispatch) stays.
            let Some(mut r) = ring.try_lock() else {
                return true;
            };
            let before = r.counts();
            r.trim(now, retention);
            self.settle(ring, &mut r, before);
            let keep = !r.entries.is_empty() || now - r.last_used < retention.max_age;
            r.dropped = !keep;
            keep
        });
    }

    /// Topics with a history (for tests and stats).
    #[cfg(test)]
    fn topic_count(&self) -> usize {
        self.topics.lock().len()
    }
}

impl Kept {
    /// Whether its entry is still in `ring` (locked).
    fn live(&self, ring: &Ring) -> bool {
        !ring.dropped
            && ring.known
            && ring.epoch == self.epoch
            && ring.base < self.offset
            && self.offset <= ring.top
            && !ring.entries.is_empty()
    }
}

impl Ring {
    /// What the ring counts for the budget: its bytes (its entries', and its own while it
    /// holds any) and its entries.
    fn counts(&self) -> (u64, u64) {
        let own = if self.entries.is_empty() {
            0
        } else {
            self.topic_bytes
        };
        (self.entry_bytes + own, self.entries.len() as u64)
    }

    /// Drops the oldest entry: the base moves up to it.
    fn pop(&mut self) {
        if let Some((offset, _, b)) = self.entries.pop_front() {
            self.base = offset;
            self.entry_bytes -= cost(&b);
        }
    }

    /// Drops every entry (the caller moves the base).
    fn clear(&mut self) {
        self.entries.clear();
        self.entry_bytes = 0;
    }

    /// Adds an entry at the back (newest) or the front (older than the others).
    fn add(&mut self, entry: (u64, Instant, Broadcast), front: bool) {
        self.entry_bytes += cost(&entry.2);
        self.added.push(entry.0);
        if front {
            self.entries.push_front(entry);
        } else {
            self.entries.push_back(entry);
        }
    }

    /// Drops the entries older than `max_age`.
    fn trim(&mut self, now: Instant, retention: Retention) {
        while let Some((_, at, _)) = self.entries.front() {
            if now - *at <= retention.max_age {
                break;
            }
            self.pop();
        }
    }

    /// Starts over at `epoch`, knowing nothing before `offset` (included).
    fn restart(&mut self, epoch: u64, offset: u64) {
        self.epoch = epoch;
        self.base = offset;
        self.top = offset;
        self.known = true;
        self.clear();
    }

    /// Adds `b` at `offset` (above the top) and returns it with its position.
    fn push(&mut self, b: &Broadcast, offset: u64, at: Instant, retention: Retention) -> Broadcast {
        self.trim(at, retention);
        self.last_used = at;
        let positioned = b.with_position(
            Position {
                epoch: self.epoch,
                offset,
                tag: tag(b.topic()),
            }
            .encode(),
            Seen {
                epoch: self.epoch,
                offset,
            },
        );
        self.top = offset;
        self.add((offset, at, positioned.clone()), false);
        self.keep(retention.size);
        positioned
    }

    /// Keeps the newest `size` entries.
    fn keep(&mut self, size: usize) {
        while self.entries.len() > size {
            self.pop();
        }
    }

    /// Merges an engine's read into the ring: adopted by a ring that knows nothing; in the
    /// same epoch, entries older than the ring's are added in front (where the read reaches
    /// the ring), and entries newer than its top are recorded and go to `dispatch` (this node
    /// had not received them yet; their own arrival is then skipped). A read of another epoch,
    /// or that starts after the ring's top, is not merged.
    fn absorb(
        &mut self,
        read: Read,
        tag: u32,
        retention: Retention,
        now: Instant,
        mut dispatch: impl FnMut(&Broadcast),
    ) {
        if !self.known {
            self.restart(read.epoch, read.from);
        } else if self.epoch != read.epoch || read.from > self.top {
            return;
        }
        let epoch = self.epoch;
        let at = |age: Duration| now.checked_sub(age).unwrap_or(now);
        let positioned = |b: &Broadcast, offset| {
            b.with_position(
                Position { epoch, offset, tag }.encode(),
                Seen { epoch, offset },
            )
        };
        if read.from < self.base && read.top >= self.base {
            let older = read
                .entries
                .iter()
                .filter(|(o, _, _)| *o <= self.base)
                .rev()
                .map(|(o, age, b)| (*o, at(*age), positioned(b, *o)))
                .collect::<Vec<_>>();
            for entry in older {
                self.add(entry, true);
            }
            self.base = read.from;
        }
        for (offset, age, b) in read.entries {
            if offset > self.top {
                let b = positioned(&b, offset);
                self.top = offset;
                self.add((offset, at(age), b.clone()), false);
                dispatch(&b);
            }
        }
        self.keep(retention.size);
        self.trim(now, retention);
    }
}

/// A position: the history's epoch, the broadcast's offset in it, and a tag of its topic (so a
/// position of another topic is never taken for one of this topic's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    epoch: u64,
    offset: u64,
    tag: u32,
}

/// The format's version: the first byte, which makes every position start with `A`.
const VERSION: u8 = 1;
const LEN: usize = 21;

impl Position {
    fn encode(&self) -> String {
        let mut bytes = [0u8; LEN];
        bytes[0] = VERSION;
        bytes[1..9].copy_from_slice(&self.epoch.to_be_bytes());
        bytes[9..17].copy_from_slice(&self.offset.to_be_bytes());
        bytes[17..21].copy_from_slice(&self.tag.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The position `s` names, if it is one (28 characters of base64url, this version).
    fn decode(s: &str) -> Option<Position> {
        if s.len() != 28 {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        let bytes: [u8; LEN] = bytes.try_into().ok()?;
        if bytes[0] != VERSION {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        Some(Position {
            epoch: u64_at(1),
            offset: u64_at(9),
            tag: u32::from_be_bytes(bytes[17..21].try_into().unwrap_or_default()),
        })
    }
}

/// The topic's tag: FNV-1a, the same on every node and every run.
fn tag(topic: &str) -> u32 {
    topic.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Why a history could not be read. The join it was for says `recovered: false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryError(pub String);

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "history unavailable: {}", self.0)
    }
}

impl std::error::Error for HistoryError {}

/// A durable log outside the cluster that gives the positions of some recoverable topics and
/// keeps their history: a database outbox (`firebrand-postgres`), which every node reads on its
/// own. Routed with [`EndpointBuilder::history_source`].
///
/// **What a node does with it.** A topic routed to a source is recoverable, and its positions
/// come only from the source: the log's reader on each node hands every entry to
/// [`Endpoint::broadcast_from_source`] with its epoch and offset, and the node records it in
/// its ring (a cache, as for an engine) and dispatches it under the topic's lock. A rejoin
/// whose `since` the ring does not cover [`read`](HistorySource::read)s the source. Broadcasts
/// on such a topic made any other way (a channel's, [`Endpoint::broadcast`]) go out without a
/// position and are not kept: publish through the log to record them.
///
/// **The contract** is the [`HistoryEngine`](crate::cluster::HistoryEngine)'s points 1 (offsets strictly increase per topic
/// within an epoch; they need not go up by one), 2 (epochs), 4 (reads) and 5 (retention), with
/// these for delivery: every node's reader hands the entries of a topic in offset order, and
/// handing one twice is harmless (an offset at or below the ring's top is skipped). A read
/// that fails answers `Err`: the join is refused with `{"reason": "history unavailable"}`, and
/// the client retries.
///
/// [`EndpointBuilder::history_source`]: crate::EndpointBuilder::history_source
/// [`Endpoint::broadcast_from_source`]: crate::Endpoint::broadcast_from_source
/// [`Endpoint::broadcast`]: crate::Endpoint::broadcast
pub trait HistorySource: Send + Sync + 'static {
    /// Reads `topic`'s history: one snapshot (the [`HistoryEngine`](crate::cluster::HistoryEngine) contract, point 4).
    fn read(
        &self,
        topic: &str,
        query: Query,
        retention: Retention,
    ) -> Pin<Box<dyn Future<Output = Result<SourceEntries, HistoryError>> + Send + 'static>>;
}

/// A topic's history as a [`HistorySource`] read it: every entry with an offset in
/// `(from, top]`, oldest first.
#[derive(Debug, Default)]
pub struct SourceEntries {
    /// The history's epoch.
    pub epoch: u64,
    /// The entries are every entry after this offset (up to `top`).
    pub from: u64,
    /// The topic's last offset (at least `from`).
    pub top: u64,
    /// The entries, oldest first.
    pub entries: Vec<SourceEntry>,
}

/// One entry of a [`HistorySource`]'s history.
#[derive(Debug)]
pub struct SourceEntry {
    /// Its offset.
    pub offset: u64,
    /// How long ago it was recorded.
    pub age: Duration,
    /// Its event.
    pub event: String,
    /// Its payload.
    pub payload: firebrand_protocol::Payload,
}

#[cfg(test)]
mod tests {
    use super::*;
    use firebrand_protocol::Payload;

    fn retention(size: usize) -> Retention {
        Retention {
            size,
            max_age: Duration::from_secs(300),
        }
    }

    fn history() -> History {
        History::new(
            vec![Route::plain("stream:*", retention(3))],
            false,
            u64::MAX,
        )
    }

    fn publish(h: &History, topic: &str, n: u64) -> String {
        let b = Broadcast::new(
            topic,
            "new_msg",
            Payload::from(serde_json::json!({ "n": n })),
        );
        let mut got = None;
        h.append(&b, h.retention(topic).unwrap(), |p| {
            got = p.position().map(str::to_owned)
        });
        got.unwrap()
    }

    fn numbers(bs: &[Broadcast]) -> Vec<u64> {
        bs.iter()
            .map(|b| b.payload().to_value().unwrap()["n"].as_u64().unwrap())
            .collect()
    }

    fn catch_up(h: &History, topic: &str, since: Option<&str>) -> (Option<bool>, Vec<u64>, String) {
        let retention = h.retention(topic).unwrap();
        h.catch_up(
            topic,
            retention,
            since,
            0,
            None,
            |_| {},
            |c| (c.recovered, numbers(&c.replay), c.position.unwrap()),
        )
        .unwrap()
    }

    #[test]
    fn positions_are_opaque_and_round_trip() {
        let p = Position {
            epoch: 0x9f3c_2a1b_7d4e_5f60,
            offset: 42,
            tag: tag("stream:x"),
        };
        let s = p.encode();
        assert_eq!(s.len(), 28);
        assert!(s.starts_with('A'));
        assert!(s.parse::<i128>().is_err());
        assert_eq!(Position::decode(&s), Some(p));
        for bad in [
            "",
            "42",
            "A",
            &s[..27],
            &format!("{s}A"),
            "B".repeat(28).as_str(),
        ] {
            assert_eq!(Position::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_join_gets_what_came_after_its_position_or_is_told_it_cannot() {
        let h = history();
        assert!(h.retention("stream:a").is_some() && h.retention("room:a").is_none());
        let (recovered, replay, empty) = catch_up(&h, "stream:a", None);
        assert_eq!((recovered, replay), (None, vec![]));
        let p1 = publish(&h, "stream:a", 1);
        publish(&h, "stream:a", 2);
        let p3 = publish(&h, "stream:a", 3);
        // From the empty history's position, from the first, from the top.
        assert_eq!(catch_up(&h, "stream:a", Some(&empty)).0, Some(true));
        assert_eq!(catch_up(&h, "stream:a", Some(&empty)).1, [1, 2, 3]);
        assert_eq!(catch_up(&h, "stream:a", Some(&p1)).1, [2, 3]);
        let (recovered, replay, top) = catch_up(&h, "stream:a", Some(&p3));
        assert_eq!((recovered, replay, top), (Some(true), vec![], p3.clone()));
        // Size 3: once the 4th comes, the 1st is gone and the empty position is too old.
        publish(&h, "stream:a", 4);
        assert_eq!(
            catch_up(&h, "stream:a", Some(&empty)),
            (Some(false), vec![], catch_up(&h, "stream:a", None).2)
        );
        assert_eq!(catch_up(&h, "stream:a", Some(&p1)).1, [2, 3, 4]);
        // Another topic's position, garbage, a position from the future: not recovered.
        let other = publish(&h, "stream:b", 1);
        for since in [other.as_str(), "garbage", "42"] {
            assert_eq!(
                catch_up(&h, "stream:a", Some(since)).0,
                Some(false),
                "{since}"
            );
        }
        let future = Position::decode(&p3)
            .map(|p| Position { offset: 99, ..p })
            .unwrap();
        assert_eq!(
            catch_up(&h, "stream:a", Some(&future.encode())).0,
            Some(false)
        );
    }

    #[test]
    fn a_newcomer_gets_the_recent_ones_it_asks_for() {
        let h = history();
        for n in 1..=4 {
            publish(&h, "stream:a", n);
        }
        let recent = |n| {
            h.catch_up(
                "stream:a",
                retention(3),
                None,
                n,
                None,
                |_| {},
                |c| (c.recovered, numbers(&c.replay)),
            )
            .unwrap()
        };
        assert_eq!(recent(0), (None, vec![]));
        assert_eq!(recent(2), (None, vec![3, 4]));
        assert_eq!(recent(10), (None, vec![2, 3, 4]));
    }

    #[tokio::test(start_paused = true)]
    async fn old_broadcasts_and_idle_topics_are_forgotten() {
        let h = history();
        let p1 = publish(&h, "stream:a", 1);
        tokio::time::advance(Duration::from_secs(200)).await;
        publish(&h, "stream:a", 2);
        tokio::time::advance(Duration::from_secs(200)).await;
        // The 1st is older than 300 s: from p1, the 2nd is still there, so nothing is missing.
        assert_eq!(
            catch_up(&h, "stream:a", Some(&p1)),
            (Some(true), vec![2], catch_up(&h, "stream:a", None).2)
        );
        let (_, _, top) = catch_up(&h, "stream:a", None);
        tokio::time::advance(Duration::from_secs(301)).await;
        // Empty and unused for max_age: the sweep forgets the topic; its next life is another
        // epoch, so an old position is not recovered.
        h.sweep();
        assert_eq!(h.topic_count(), 0);
        assert_eq!(catch_up(&h, "stream:a", Some(&top)).0, Some(false));
    }

    /// An engine-fed node's history: what it dispatched, and what it answers joins.
    struct Fed {
        h: History,
        dispatched: Vec<(String, Option<u64>)>,
    }

    impl Fed {
        fn new() -> Self {
            Fed {
                h: History::new(vec![Route::plain("stream:*", retention(3))], true, u64::MAX),
                dispatched: Vec::new(),
            }
        }

        fn record(&mut self, n: u64, prev: Option<u64>) {
            let b = Broadcast::new(
                "stream:a",
                "new_msg",
                Payload::from(serde_json::json!({ "n": n })),
            );
            let at = Recorded {
                epoch: 7,
                offset: n,
                prev,
            };
            let sink = &mut self.dispatched;
            self.h.record(&b, at, retention(3), |b| {
                let n = b.payload().to_value().and_then(|v| v["n"].as_u64());
                sink.push((b.event().to_owned(), n));
            });
        }

        fn join(
            &mut self,
            since: Option<&str>,
            read: Option<Result<Read, Unread>>,
        ) -> Result<(Option<bool>, Vec<u64>), Query> {
            let sink = &mut self.dispatched;
            self.h.catch_up(
                "stream:a",
                retention(3),
                since,
                0,
                read,
                |b| {
                    sink.push((
                        b.event().to_owned(),
                        b.payload().to_value().and_then(|v| v["n"].as_u64()),
                    ));
                },
                |c| (c.recovered, numbers(&c.replay)),
            )
        }
    }

    fn read(from: u64, top: u64) -> Read {
        let entries = (from + 1..=top)
            .map(|n| {
                (
                    n,
                    Duration::ZERO,
                    Broadcast::new(
                        "stream:a",
                        "new_msg",
                        Payload::from(serde_json::json!({ "n": n })),
                    ),
                )
            })
            .collect();
        Read {
            epoch: 7,
            from,
            top,
            entries,
        }
    }

    fn at(offset: u64) -> String {
        Position {
            epoch: 7,
            offset,
            tag: tag("stream:a"),
        }
        .encode()
    }

    #[test]
    fn an_engine_fed_ring_asks_the_engine_only_for_what_it_cannot_answer() {
        let mut f = Fed::new();
        // Knows nothing yet: a join asks the engine; a failed read answers "not recovered".
        assert_eq!(f.join(None, None), Err(Query::Last(0)));
        assert_eq!(f.join(Some(&at(2)), None), Err(Query::After(2)));
        // (`None`: unavailable, the join is refused; see the test after this one.)
        assert_eq!(
            f.join(Some(&at(2)), Some(Err(Unread::Unknown))),
            Ok((None, vec![]))
        );
        // Delivered 4 and 5 by the engine (the first one starts the ring: it knows nothing
        // before it).
        for n in 4..=5 {
            f.record(n, Some(n - 1));
        }
        // From 4 the ring answers alone; from before its first, the engine is read, and the
        // read is merged in front.
        assert_eq!(f.join(Some(&at(4)), None), Ok((Some(true), vec![5])));
        assert_eq!(f.join(Some(&at(2)), None), Err(Query::After(2)));
        assert_eq!(
            f.join(Some(&at(2)), Some(Ok(read(2, 5)))),
            Ok((Some(true), vec![3, 4, 5]))
        );
        assert_eq!(f.join(Some(&at(2)), None), Ok((Some(true), vec![3, 4, 5])));
        assert_eq!(f.dispatched.len(), 2, "nothing dispatched twice");
    }

    #[test]
    fn a_position_the_engine_could_not_be_asked_about_is_unavailable_not_lost() {
        let mut f = Fed::new();
        for n in 4..=5 {
            f.record(n, Some(n - 1));
        }
        let ask = |since: &str, read: Option<Result<Read, Unread>>| {
            f.h.catch_up(
                "stream:a",
                retention(3),
                Some(since),
                0,
                read,
                |_| {},
                |c| (c.recovered, c.unavailable, c.seen),
            )
        };
        let seen = |offset| Some(Seen { epoch: 7, offset });
        // Ahead of this node (a client saw 9 elsewhere), or behind its cache: the engine must
        // say, and cannot: unavailable, not `recovered: false`.
        for offset in [9, 2] {
            assert_eq!(ask(&at(offset), None), Err(Query::After(offset.min(5))));
            assert_eq!(
                ask(&at(offset), Some(Err(Unread::Unknown))),
                Ok((None, true, None))
            );
        }
        // What the cache decides needs no engine.
        assert_eq!(
            ask(&at(4), Some(Err(Unread::Unknown))),
            Ok((Some(true), false, seen(4)))
        );
        // Slow on a link that carries: given up, as not recovered (not refused for ever).
        assert_eq!(
            ask(&at(9), Some(Err(Unread::Slow))),
            Ok((Some(false), false, None))
        );
        // Not a position of this topic: not recovered, whatever the engine.
        assert_eq!(
            ask("garbage", Some(Err(Unread::Unknown))),
            Ok((Some(false), false, None))
        );
        // The engine answered and no longer has it: truly gone.
        let mut gone = read(3, 5);
        gone.entries.clear();
        // (And what it has seen is not kept: this history does not hold it.)
        assert_eq!(ask(&at(1), Some(Ok(gone))), Ok((Some(false), false, None)));
    }

    #[test]
    fn a_lagging_node_catches_up_from_the_read_and_skips_the_late_arrivals() {
        let mut f = Fed::new();
        f.record(1, Some(0));
        // A client saw 3 on another node: this one has 1 only. The read (after 1) brings 2 and
        // 3, dispatched to this node's subscribers now; their own arrival later is skipped.
        assert_eq!(f.join(Some(&at(3)), None), Err(Query::After(1)));
        assert_eq!(
            f.join(Some(&at(3)), Some(Ok(read(1, 3)))),
            Ok((Some(true), vec![]))
        );
        f.record(2, Some(1));
        f.record(3, Some(2));
        f.record(4, Some(3));
        let ns: Vec<_> = f.dispatched.iter().map(|(_, n)| n.unwrap()).collect();
        assert_eq!(ns, [1, 2, 3, 4]);
    }

    #[test]
    fn a_gap_in_the_engines_delivery_tells_the_subscribers_to_rejoin() {
        let mut f = Fed::new();
        f.record(1, Some(0));
        f.record(3, Some(2));
        let events: Vec<_> = f.dispatched.iter().map(|(e, n)| (e.as_str(), *n)).collect();
        assert_eq!(
            events,
            [
                ("new_msg", Some(1)),
                (GAP_EVENT, None),
                ("new_msg", Some(3))
            ]
        );
        // The ring starts over at 3: from 1 (before the gap) it cannot answer alone.
        assert_eq!(f.join(Some(&at(1)), None), Err(Query::After(1)));
        assert_eq!(f.join(Some(&at(3)), None), Ok((Some(true), vec![])));
        // Interrupted: it forgets, and every topic's subscribers are told.
        f.dispatched.clear();
        let sink = &mut f.dispatched;
        f.h.interrupted(|b| sink.push((b.event().to_owned(), None)));
        assert_eq!(f.dispatched, [(GAP_EVENT.to_owned(), None)]);
        assert_eq!(f.join(Some(&at(3)), None), Err(Query::After(3)));
    }

    /// A node alone's history of `stream:*` (size `size`) within `budget` bytes.
    fn budgeted(size: usize, budget: u64) -> History {
        History::new(
            vec![Route::plain("stream:*", retention(size))],
            false,
            budget,
        )
    }

    /// What one entry of `publish(_, topic, n)` (n < 10) and one ring holding entries count.
    fn costs(topic: &str) -> (u64, u64) {
        let b = Broadcast::new(
            topic,
            "new_msg",
            Payload::from(serde_json::json!({ "n": 1 })),
        );
        (cost(&b), topic.len() as u64 + TOPIC_OVERHEAD)
    }

    fn fifo_len(h: &History) -> u64 {
        h.budget.fifo.lock().len() as u64
    }

    fn live_entries(h: &History) -> u64 {
        h.budget.entries.load(Ordering::Relaxed)
    }

    #[test]
    fn past_the_budget_the_oldest_entries_go_first_across_topics() {
        let (entry, ring) = costs("stream:a");
        // Two rings of two entries each, exactly.
        let h = budgeted(10, 2 * ring + 4 * entry);
        let (_, _, b0) = catch_up(&h, "stream:b", None);
        let a1 = publish(&h, "stream:a", 1);
        let a2 = publish(&h, "stream:a", 2);
        publish(&h, "stream:b", 1);
        publish(&h, "stream:b", 2);
        assert_eq!(
            h.usage(),
            (2 * ring + 4 * entry, 0),
            "at the budget, not past it"
        );
        // Past it: the oldest of all (a1, then a2) go, though b's are newer and b grows.
        publish(&h, "stream:a", 3);
        assert_eq!(h.usage(), (2 * ring + 4 * entry, 1));
        publish(&h, "stream:b", 3);
        assert_eq!(h.usage(), (2 * ring + 4 * entry, 2));
        // From before an evicted entry: not recovered, nothing replayed (a node alone: gone).
        assert_eq!(catch_up(&h, "stream:a", Some(&a1)).0, Some(false));
        assert_eq!(catch_up(&h, "stream:a", Some(&a1)).1, Vec::<u64>::new());
        // From the evicted front itself, everything after it is still there.
        assert_eq!(catch_up(&h, "stream:a", Some(&a2)).0, Some(true));
        assert_eq!(catch_up(&h, "stream:a", Some(&a2)).1, [3]);
        assert_eq!(catch_up(&h, "stream:b", Some(&b0)).1, [1, 2, 3]);
        // Then b's first (older than a's last), b's second, and a's last: its ring, empty,
        // costs nothing; a position at its top missed nothing and is still recovered.
        let a3 = catch_up(&h, "stream:a", None).2;
        publish(&h, "stream:b", 4);
        assert_eq!(h.usage(), (2 * ring + 4 * entry, 3));
        assert_eq!(catch_up(&h, "stream:b", Some(&b0)).0, Some(false));
        publish(&h, "stream:b", 5);
        publish(&h, "stream:b", 6);
        assert_eq!(h.usage(), (ring + 4 * entry, 5));
        assert_eq!(
            catch_up(&h, "stream:a", Some(&a3)),
            (Some(true), vec![], a3.clone())
        );
        assert_eq!(catch_up(&h, "stream:a", Some(&a2)).0, Some(false));
        assert_eq!(catch_up(&h, "stream:b", Some(&b0)).1, Vec::<u64>::new());
        let b2 = Position::decode(&b0)
            .map(|p| Position { offset: 2, ..p })
            .unwrap();
        assert_eq!(catch_up(&h, "stream:b", Some(&b2.encode())).1, [3, 4, 5, 6]);
    }

    #[test]
    fn a_budget_below_one_entry_keeps_nothing_and_never_says_recovered_wrongly() {
        let h = budgeted(10, 0);
        let p1 = publish(&h, "stream:a", 1);
        let p2 = publish(&h, "stream:a", 2);
        assert_eq!(h.usage(), (0, 2));
        assert_eq!(catch_up(&h, "stream:a", Some(&p1)).0, Some(false));
        assert_eq!(catch_up(&h, "stream:a", Some(&p2)).0, Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_total_goes_back_down_when_entries_are_trimmed_or_expire() {
        let (entry, ring) = costs("stream:a");
        let h = budgeted(3, u64::MAX);
        for n in 1..=9 {
            publish(&h, "stream:a", n);
            publish(&h, "stream:b", n);
        }
        // Size 3: three entries per ring are counted, not nine.
        assert_eq!(h.usage(), (2 * ring + 6 * entry, 0));
        assert_eq!(live_entries(&h), 6);
        // Expired: a join trims its topic's ring; the sweep the others and forgets them.
        tokio::time::advance(Duration::from_secs(301)).await;
        catch_up(&h, "stream:a", None);
        assert_eq!(h.usage(), (ring + 3 * entry, 0));
        tokio::time::advance(Duration::from_secs(301)).await;
        h.sweep();
        assert_eq!(
            (h.usage(), live_entries(&h), h.topic_count()),
            ((0, 0), 0, 0)
        );
        // An engine-fed node forgets its rings when interrupted.
        let mut f = Fed::new();
        for n in 1..=2 {
            f.record(n, Some(n - 1));
        }
        assert_eq!(f.h.usage().0, ring + 2 * entry);
        f.h.interrupted(|_| {});
        assert_eq!(f.h.usage(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fifo_sheds_the_records_of_trimmed_entries() {
        // Never over budget, so nothing is popped for it: entries trimmed by size and age
        // would leave their records behind for ever without the purge.
        let h = budgeted(3, u64::MAX);
        let bound = |h: &History| 2 * live_entries(h) + PURGE_SLACK + 1;
        for n in 0..20_000u64 {
            publish(&h, &format!("stream:{}", n % 7), n % 10);
            assert!(fifo_len(&h) <= bound(&h), "{} records at {n}", fifo_len(&h));
        }
        for n in 0..5_000u64 {
            tokio::time::advance(Duration::from_millis(100)).await;
            publish(&h, &format!("stream:t{n}"), n % 10);
            assert!(fifo_len(&h) <= bound(&h), "{} records at {n}", fifo_len(&h));
        }
        // What is left after a purge is each live entry's record, once.
        h.purge();
        assert_eq!(fifo_len(&h), live_entries(&h));
    }

    #[test]
    fn on_an_engine_fed_node_an_evicted_front_is_read_from_the_engine() {
        let (entry, ring) = costs("stream:a");
        let mut f = Fed::new();
        f.h = History::new(
            vec![Route::plain("stream:*", retention(3))],
            true,
            ring + 2 * entry,
        );
        for n in 1..=3 {
            f.record(n, Some(n - 1));
        }
        // The ring (a cache) holds 2 and 3; the engine still has 1: a join from 0 reads it.
        assert_eq!(f.h.usage(), (ring + 2 * entry, 1));
        assert_eq!(f.join(Some(&at(1)), None), Ok((Some(true), vec![2, 3])));
        assert_eq!(f.join(Some(&at(0)), None), Err(Query::After(0)));
        assert_eq!(
            f.join(Some(&at(0)), Some(Ok(read(0, 3)))),
            Ok((Some(true), vec![1, 2, 3]))
        );
        // The read's entries count too: back within the budget after the answer, the oldest
        // record (2) evicting what is older in its ring (the 1 just read) with it.
        assert_eq!(f.h.usage(), (ring + entry, 3));
        assert_eq!(f.join(Some(&at(0)), None), Err(Query::After(0)));
        // A failed read: unavailable (the join is refused), never a wrong true.
        assert_eq!(
            f.join(Some(&at(0)), Some(Err(Unread::Unknown))),
            Ok((None, vec![]))
        );
    }

    #[test]
    fn concurrent_appends_keep_the_count_exact_and_the_rings_within_the_budget() {
        let (entry, ring) = costs("stream:0");
        let budget = 5 * ring + 40 * entry;
        let h = Arc::new(budgeted(8, budget));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for n in 0..5_000u64 {
                        let topic = format!("stream:{}", (n * 7 + t) % 9);
                        publish(&h, &topic, n % 10);
                        if n % 97 == 0 {
                            catch_up(&h, &topic, None);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let rings: Vec<_> = h.topics.lock().values().cloned().collect();
        let (mut bytes, mut entries) = (0, 0);
        for ring in rings {
            let r = ring.lock();
            let (b, e) = r.counts();
            let offsets: Vec<_> = r.entries.iter().map(|(o, _, _)| *o).collect();
            let exact: Vec<_> = (r.base + 1..=r.top).collect();
            assert_eq!(offsets, exact, "every offset in (base, top], nothing else");
            let costs: u64 = r.entries.iter().map(|(_, _, b)| cost(b)).sum();
            assert_eq!(costs, r.entry_bytes);
            (bytes, entries) = (bytes + b, entries + e);
        }
        assert_eq!((h.usage().0, live_entries(&h)), (bytes, entries));
        assert!(bytes <= budget, "{bytes} > {budget}");
        assert!(h.usage().1 > 0);
        assert!(fifo_len(&h) <= 2 * entries + PURGE_SLACK + 1);
    }
}
