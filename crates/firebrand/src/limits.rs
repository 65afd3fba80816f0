//! Per-connection limits on what a client may send, and their bookkeeping.
//!
//! Every limit has one outcome the client sees — an error reply `{"reason": …}` to the offending
//! message — plus a log line and a counter in [`Stats`](crate::Stats). Nothing else on the
//! connection, and nothing on other connections, is affected.
//!
//! | limit | default | reply reason |
//! |---|---|---|
//! | messages per second ([`SocketBuilder::message_rate`](crate::SocketBuilder::message_rate)) | 500/s, bursts of 500 | `rate limited` |
//! | joins per second ([`SocketBuilder::join_rate`](crate::SocketBuilder::join_rate)) | 100/s, bursts of 100 | `rate limited` |
//! | payload bytes ([`SocketBuilder::max_payload`](crate::SocketBuilder::max_payload)) | 256 KiB | `payload too large` |
//! | topic bytes ([`SocketBuilder::max_topic_len`](crate::SocketBuilder::max_topic_len)) | 255 | `topic too long` |
//! | pending async replies ([`SocketBuilder::max_pending_replies`](crate::SocketBuilder::max_pending_replies)) | 1024 | `too many pending replies` |

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A token bucket: `rate` tokens per second, holding at most `rate`. Twelve bytes, as every
/// connection has two: the clock is the caller's, in milliseconds (wrapping after 49 days,
/// which only an idle timeout that long would notice, as a bucket refilled less).
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: u32,
    tokens: f32,
    last_ms: u32,
}

impl Bucket {
    pub(crate) fn new(per_second: u32, now_ms: u32) -> Self {
        let rate = per_second.max(1);
        Bucket {
            rate,
            tokens: rate as f32,
            last_ms: now_ms,
        }
    }

    /// Takes a token if one is available at `now_ms`.
    pub(crate) fn take(&mut self, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.last_ms);
        self.last_ms = now_ms;
        let rate = self.rate as f32;
        self.tokens = (self.tokens + elapsed as f32 * rate / 1000.0).min(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Which limit a message hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    Rate,
    Payload,
    Topic,
    PendingReplies,
}

impl Limit {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Limit::Rate => "rate limited",
            Limit::Payload => "payload too large",
            Limit::Topic => "topic too long",
            Limit::PendingReplies => "too many pending replies",
        }
    }
}

/// Async replies outstanding on one connection ([`ReplyRef`](crate::ReplyRef)s alive).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    count: AtomicUsize,
}

/// One outstanding async reply; dropping the last clone of its `ReplyRef` releases it.
#[derive(Debug)]
pub(crate) struct PendingSlot(Arc<Pending>);

impl Pending {
    /// Reserves a slot unless `max` are taken.
    pub(crate) fn reserve(self: &Arc<Self>, max: usize) -> Option<PendingSlot> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| PendingSlot(self.clone()))
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_its_rate() {
        let mut b = Bucket::new(10, 1_000);
        assert_eq!((0..20).filter(|_| b.take(1_000)).count(), 10);
        assert_eq!((0..20).filter(|_| b.take(1_500)).count(), 5);
        // Across the clock's wrap.
        let mut b = Bucket::new(10, u32::MAX - 99);
        assert_eq!((0..20).filter(|_| b.take(u32::MAX - 99)).count(), 10);
        assert_eq!((0..20).filter(|_| b.take(400)).count(), 5);
    }

    #[test]
    fn pending_slots_are_bounded_and_released() {
        let p = Arc::new(Pending::default());
        let a = p.reserve(2).unwrap();
        let _b = p.reserve(2).unwrap();
        assert!(p.reserve(2).is_none());
        drop(a);
        assert!(p.reserve(2).is_some());
    }
}
