//! Topic history, for recovery on rejoin: the last broadcasts of each recoverable topic, each
//! with its **position**, so that a client that lost its connection rejoins with the last
//! position it saw (`{"since": P}` in its join params) and gets what it missed, in order, once.
//!
//! A position names the history's life (an **epoch**: random, new whenever a topic's history
//! starts over) and an **offset** that grows by one with every broadcast of the topic. It travels
//! as an opaque string in the broadcast's `ref` slot (`[null, P, topic, event, payload]`), which
//! phoenix.js hands to `channel.on` callbacks as their second argument: 28 characters of
//! base64url starting with `A`, never a plain integer (phoenix.js takes a frame whose ref equals
//! its pending heartbeat's for the heartbeat's reply).
//!
//! **Why the seam has no gap and no duplicate.** A broadcast on a recoverable topic takes its
//! position and is dispatched to the topic's subscribers under the topic's lock ([`append`]).
//! A join takes the same lock while it subscribes, reads what came after its `since`, writes
//! its reply and queues the replay ([`History::catch_up`]). So every broadcast is either in the
//! history the join read (and replayed, if after `since`) or dispatched after the subscription
//! (and delivered live, after the replay): never both, never neither, and live ones always come
//! after the replay because they queue behind it.
//!
//! [`append`]: History::append

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::pubsub::Broadcast;

/// How much of a topic's history is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retention {
    /// At most this many broadcasts.
    pub(crate) size: usize,
    /// None older than this.
    pub(crate) max_age: Duration,
}

/// The histories of a node's recoverable topics (in the process: a node alone).
pub(crate) struct History {
    /// Topic patterns (`stream:*`, or an exact topic) and their retention; the first match
    /// counts.
    routes: Vec<(Box<str>, Retention)>,
    topics: Mutex<HashMap<Box<str>, Arc<Mutex<Ring>>>>,
    appends: AtomicU64,
}

/// One topic's history.
struct Ring {
    epoch: u64,
    /// The last offset given (0: none yet).
    top: u64,
    /// `(offset, when, broadcast with its position)`, oldest first.
    entries: VecDeque<(u64, Instant, Broadcast)>,
    last_used: Instant,
}

/// What a join gets: the topic's current position, whether its `since` was recovered (`None`
/// without one), and the broadcasts to replay.
pub(crate) struct CatchUp {
    pub(crate) position: String,
    pub(crate) recovered: Option<bool>,
    pub(crate) replay: Vec<Broadcast>,
}

/// Every this many appends, topics whose history is empty and unused for their `max_age` are
/// forgotten (a later broadcast starts a new epoch).
const SWEEP_EVERY: u64 = 4096;

impl History {
    pub(crate) fn new(routes: Vec<(Box<str>, Retention)>) -> Self {
        History {
            routes,
            topics: Mutex::default(),
            appends: AtomicU64::new(0),
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

    fn ring(&self, topic: &str) -> Arc<Mutex<Ring>> {
        self.topics
            .lock()
            .entry(topic.into())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Ring {
                    epoch: crate::node::presence::rand_u64(),
                    top: 0,
                    entries: VecDeque::new(),
                    last_used: Instant::now(),
                }))
            })
            .clone()
    }

    /// Records `b` in its topic's history with the next position, and hands the positioned
    /// broadcast to `dispatch` under the topic's lock (so that subscribers get the topic's
    /// broadcasts in position order, and a join sees each either in the history or live).
    pub(crate) fn append(
        &self,
        b: &Broadcast,
        retention: Retention,
        dispatch: impl FnOnce(&Broadcast),
    ) {
        if self.appends.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let ring = self.ring(b.topic());
        let mut r = ring.lock();
        let now = Instant::now();
        r.trim(now, retention);
        r.top += 1;
        r.last_used = now;
        let position = Position {
            epoch: r.epoch,
            offset: r.top,
            tag: tag(b.topic()),
        };
        let positioned = b.with_position(position.encode());
        let offset = r.top;
        r.entries.push_back((offset, now, positioned.clone()));
        while r.entries.len() > retention.size {
            r.entries.pop_front();
        }
        dispatch(&positioned);
    }

    /// A join of `topic` with `since` (the position its client last saw, if it sent one): runs
    /// `f` under the topic's lock with the topic's position, whether `since` was recovered, and
    /// the broadcasts after it (without `since`: the last `recent` ones). `f` subscribes,
    /// replies and queues the replay; no broadcast of the topic is dispatched meanwhile.
    pub(crate) fn catch_up<R>(
        &self,
        topic: &str,
        retention: Retention,
        since: Option<&str>,
        recent: usize,
        f: impl FnOnce(CatchUp) -> R,
    ) -> R {
        let ring = self.ring(topic);
        let mut r = ring.lock();
        let now = Instant::now();
        r.trim(now, retention);
        r.last_used = now;
        let tag = tag(topic);
        let (recovered, replay) = match since.map(Position::decode) {
            None => {
                let skip = r.entries.len().saturating_sub(recent);
                let replay = r.entries.iter().skip(skip).map(|(_, _, b)| b.clone());
                (None, replay.collect())
            }
            Some(Some(p)) if p.tag == tag && p.epoch == r.epoch && p.offset <= r.top => {
                // Everything after `since` is still here: nothing after it was trimmed.
                let oldest = r.entries.front().map_or(r.top + 1, |(o, _, _)| *o);
                if oldest <= p.offset + 1 {
                    let replay = r
                        .entries
                        .iter()
                        .filter(|(o, _, _)| *o > p.offset)
                        .map(|(_, _, b)| b.clone())
                        .collect();
                    (Some(true), replay)
                } else {
                    (Some(false), Vec::new())
                }
            }
            Some(_) => (Some(false), Vec::new()),
        };
        let position = Position {
            epoch: r.epoch,
            offset: r.top,
            tag,
        };
        f(CatchUp {
            position: position.encode(),
            recovered,
            replay,
        })
    }

    /// Forgets topics whose history is empty and was not used for their `max_age`.
    fn sweep(&self) {
        let now = Instant::now();
        self.topics.lock().retain(|topic, ring| {
            let Some(retention) = self.retention(topic) else {
                return false;
            };
            let mut r = ring.lock();
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
        while let Some((_, at, _)) = self.entries.front() {
            if now - *at <= retention.max_age {
                break;
            }
            self.entries.pop_front();
        }
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
        History::new(vec![("stream:*".into(), retention(3))])
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

    fn catch_up(h: &History, topic: &str, since: Option<&str>) -> (Option<bool>, Vec<u64>, String) {
        h.catch_up(topic, h.retention(topic).unwrap(), since, 0, |c| {
            let ns = c
                .replay
                .iter()
                .map(|b| b.payload().to_value().unwrap()["n"].as_u64().unwrap())
                .collect();
            (c.recovered, ns, c.position)
        })
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
            h.catch_up("stream:a", retention(3), None, n, |c| {
                let ns: Vec<u64> = c
                    .replay
                    .iter()
                    .map(|b| b.payload().to_value().unwrap()["n"].as_u64().unwrap())
                    .collect();
                (c.recovered, ns)
            })
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
}
