//! Sealing node-to-node messages with the cluster secret: HMAC-SHA256 over a counter, a time
//! and the message, and the replay window that refuses a captured message the second time.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Marks a sealed message: `AUTH_MARKER, counter u64, time u64 (ms since the Unix epoch), the
/// message, HMAC-SHA256 of all that (32 bytes)`. Not a format version, so that a node without a
/// secret says why it drops it.
pub(crate) const AUTH_MARKER: u8 = 0xA5;
pub(crate) const AUTH_HEADER: usize = 17;
const TAG_LEN: usize = 32;

/// How far a sealed message's time may be from the receiver's clock (node clocks must agree
/// within this). A message is refused once this old, and a message seen within it is refused
/// a second time, so a captured message cannot be replayed.
pub(crate) const REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// A cluster secret's key, this node's message counter, and what was received of each node
/// (for replay checks).
pub(crate) struct Auth {
    pub(crate) key: Hmac<Sha256>,
    /// Taken, with the counter, from sealing to queueing: messages are queued in counter order.
    pub(crate) order: parking_lot::Mutex<()>,
    counter: AtomicU64,
    replay: parking_lot::Mutex<std::collections::HashMap<u64, Replay>>,
}

/// What a node has seen of another's sealed messages: the highest counter, and which of the
/// 64 below it (bit `i`: `highest - 1 - i`), as in IPsec's anti-replay window. A node queues
/// its messages in counter order; the window tolerates an engine reordering a few.
struct Replay {
    highest: u64,
    below: u64,
    last: std::time::Instant,
}

pub(crate) fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl Auth {
    pub(crate) fn new(secret: &[u8]) -> Auth {
        Auth {
            key: <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key size"),
            order: parking_lot::Mutex::new(()),
            counter: AtomicU64::new(1),
            replay: parking_lot::Mutex::default(),
        }
    }

    pub(crate) fn seal(&self, message: &[u8]) -> Bytes {
        let mut buf = BytesMut::with_capacity(AUTH_HEADER + message.len() + TAG_LEN);
        buf.put_u8(AUTH_MARKER);
        buf.put_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        buf.put_u64(unix_ms());
        buf.put_slice(message);
        let mut mac = self.key.clone();
        mac.update(&buf);
        buf.put_slice(&mac.finalize().into_bytes());
        buf.freeze()
    }

    /// The message inside `sealed`, its counter and time, if the tag is right.
    pub(crate) fn open<'a>(&self, sealed: &'a [u8]) -> Result<(u64, u64, &'a [u8]), &'static str> {
        if sealed.first() != Some(&AUTH_MARKER) {
            return Err("no authentication tag (is the sender's cluster secret set?)");
        }
        if sealed.len() < AUTH_HEADER + TAG_LEN {
            return Err("sealed message too short");
        }
        let (signed, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut mac = self.key.clone();
        mac.update(signed);
        mac.verify_slice(tag)
            .map_err(|_| "wrong authentication tag (another cluster secret, or forged)")?;
        let mut header = &signed[1..AUTH_HEADER];
        Ok((header.get_u64(), header.get_u64(), &signed[AUTH_HEADER..]))
    }

    /// Whether node `node`'s message `counter` sent at `time` is fresh (and records it).
    pub(crate) fn fresh(&self, node: u64, counter: u64, time: u64) -> bool {
        let window = REPLAY_WINDOW.as_millis() as u64;
        if unix_ms().abs_diff(time) > window {
            return false;
        }
        let now = std::time::Instant::now();
        let mut replay = self.replay.lock();
        let r = replay.entry(node).or_insert(Replay {
            highest: 0,
            below: 0,
            last: now,
        });
        r.last = now;
        if counter > r.highest {
            let shift = counter - r.highest;
            r.below = match shift {
                1..=63 => (r.below << shift) | (1 << (shift - 1)),
                64 => 1 << 63,
                _ => 0,
            };
            r.highest = counter;
            return true;
        }
        let back = r.highest - counter;
        if back == 0 || back > 64 || r.below & (1 << (back - 1)) != 0 {
            return false;
        }
        r.below |= 1 << (back - 1);
        true
    }

    /// Forgets nodes not heard from for two windows: a message of theirs replayed now is older
    /// than the window and refused on its time.
    pub(crate) fn prune(&self) {
        let now = std::time::Instant::now();
        self.replay
            .lock()
            .retain(|_, r| now.duration_since(r.last) < 2 * REPLAY_WINDOW);
    }
}
