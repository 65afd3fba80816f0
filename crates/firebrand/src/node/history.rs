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
//! [`History::append`]: History::append

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::pubsub::Broadcast;

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

/// The histories of a node's recoverable topics.
pub(crate) struct History {
    /// Topic patterns (`stream:*`, or an exact topic) and their retention; the first match
    /// counts.
    routes: Vec<(Box<str>, Retention)>,
    topics: Mutex<HashMap<Box<str>, Arc<Mutex<Ring>>>>,
    appends: AtomicU64,
    /// Whether an engine gives the positions ([`History::record`]) rather than this node
    /// ([`History::append`]).
    fed: bool,
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
    /// `(offset, when, broadcast with its position)`, oldest first.
    entries: VecDeque<(u64, Instant, Broadcast)>,
    last_used: Instant,
}

/// What a join gets: the topic's current position (`None`: unknown, the engine could not be
/// read), whether its `since` was recovered (`None` without one), and the broadcasts to replay.
pub(crate) struct CatchUp {
    pub(crate) position: Option<String>,
    pub(crate) recovered: Option<bool>,
    pub(crate) replay: Vec<Broadcast>,
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
    /// The histories of a node alone (`fed` false) or of a node an engine feeds.
    pub(crate) fn new(routes: Vec<(Box<str>, Retention)>, fed: bool) -> Self {
        History {
            routes,
            topics: Mutex::default(),
            appends: AtomicU64::new(0),
            fed,
        }
    }

    /// The retention of `topic`, if it is recoverable.
    pub(crate) fn retention(&self, topic: &str) -> Option<Retention> {
        self.routes.iter().find_map(|(pattern, r)| {
            let matches = match pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => topic == &**pattern,
            };
            matches.then_some(*r)
        })
    }

    /// The largest size and age among the routes (what an engine sizes its storage with).
    pub(crate) fn largest(&self) -> Option<Retention> {
        let size = self.routes.iter().map(|(_, r)| r.size).max()?;
        let max_age = self.routes.iter().map(|(_, r)| r.max_age).max()?;
        Some(Retention { size, max_age })
    }

    /// Whether an engine gives the positions.
    pub(crate) fn fed(&self) -> bool {
        self.fed
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
                    known: !self.fed,
                    entries: VecDeque::new(),
                    last_used: Instant::now(),
                }))
            })
            .clone()
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
        let ring = self.ring(b.topic());
        let mut r = ring.lock();
        let offset = r.top + 1;
        let positioned = r.push(b, offset, Instant::now(), retention);
        dispatch(&positioned);
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
        let ring = self.ring(b.topic());
        let mut r = ring.lock();
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
            r.known = false;
            r.entries.clear();
            dispatch(&gap(&topic));
        }
    }

    /// A join of `topic` with `since` (the position its client last saw, if it sent one): runs
    /// `f` under the topic's lock with the topic's position, whether `since` was recovered, and
    /// the broadcasts after it (without `since`: the last `recent` ones). `f` subscribes,
    /// replies and queues the replay; no broadcast of the topic is dispatched meanwhile.
    ///
    /// On an engine-fed node whose ring cannot answer, returns `Err(query)` without calling
    /// `f`: read the engine, then call again with the read (`Some(None)`: the engine could not
    /// be read); a second call always answers. A read is merged into the ring first (see the
    /// module docs), its broadcasts this node had not received yet going to `dispatch`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn catch_up<R>(
        &self,
        topic: &str,
        retention: Retention,
        since: Option<&str>,
        recent: usize,
        read: Option<Option<Read>>,
        dispatch: impl FnMut(&Broadcast),
        f: impl FnOnce(CatchUp) -> R,
    ) -> Result<R, Query> {
        let ring = self.ring(topic);
        let mut r = ring.lock();
        let now = Instant::now();
        r.trim(now, retention);
        r.last_used = now;
        let tag = tag(topic);
        let asked = read.is_some() || !self.fed;
        if let Some(Some(read)) = read {
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
            Some(_) => (Some(false), Vec::new()),
        };
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
        }))
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
            r.trim(now, retention);
            !r.entries.is_empty() || now - r.last_used < retention.max_age
        });
    }

    /// Topics with a history (for tests and stats).
    #[cfg(test)]
    fn topic_count(&self) -> usize {
        self.topics.lock().len()
    }
}

impl Ring {
    /// Drops the entries older than `max_age`.
    fn trim(&mut self, now: Instant, retention: Retention) {
        while let Some((offset, at, _)) = self.entries.front() {
            if now - *at <= retention.max_age {
                break;
            }
            self.base = *offset;
            self.entries.pop_front();
        }
    }

    /// Starts over at `epoch`, knowing nothing before `offset` (included).
    fn restart(&mut self, epoch: u64, offset: u64) {
        self.epoch = epoch;
        self.base = offset;
        self.top = offset;
        self.known = true;
        self.entries.clear();
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
        );
        self.top = offset;
        self.entries.push_back((offset, at, positioned.clone()));
        self.keep(retention.size);
        positioned
    }

    /// Keeps the newest `size` entries.
    fn keep(&mut self, size: usize) {
        while self.entries.len() > size {
            if let Some((offset, _, _)) = self.entries.pop_front() {
                self.base = offset;
            }
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
        let positioned =
            |b: &Broadcast, offset| b.with_position(Position { epoch, offset, tag }.encode());
        if read.from < self.base && read.top >= self.base {
            let older = read
                .entries
                .iter()
                .filter(|(o, _, _)| *o <= self.base)
                .rev()
                .map(|(o, age, b)| (*o, at(*age), positioned(b, *o)))
                .collect::<Vec<_>>();
            for entry in older {
                self.entries.push_front(entry);
            }
            self.base = read.from;
        }
        for (offset, age, b) in read.entries {
            if offset > self.top {
                let b = positioned(&b, offset);
                self.top = offset;
                self.entries.push_back((offset, at(age), b.clone()));
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
        History::new(vec![("stream:*".into(), retention(3))], false)
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
                h: History::new(vec![("stream:*".into(), retention(3))], true),
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
            read: Option<Option<Read>>,
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
        assert_eq!(f.join(Some(&at(2)), Some(None)), Ok((Some(false), vec![])));
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
            f.join(Some(&at(2)), Some(Some(read(2, 5)))),
            Ok((Some(true), vec![3, 4, 5]))
        );
        assert_eq!(f.join(Some(&at(2)), None), Ok((Some(true), vec![3, 4, 5])));
        assert_eq!(f.dispatched.len(), 2, "nothing dispatched twice");
    }

    #[test]
    fn a_lagging_node_catches_up_from_the_read_and_skips_the_late_arrivals() {
        let mut f = Fed::new();
        f.record(1, Some(0));
        // A client saw 3 on another node: this one has 1 only. The read (after 1) brings 2 and
        // 3, dispatched to this node's subscribers now; their own arrival later is skipped.
        assert_eq!(f.join(Some(&at(3)), None), Err(Query::After(1)));
        assert_eq!(
            f.join(Some(&at(3)), Some(Some(read(1, 3)))),
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
}
