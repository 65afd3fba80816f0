//! The two queues a connection lives on.
//!
//! - [`Outbox`]: frames on their way to one client. Filled by the broadcaster, channel tasks
//!   and the connection itself; drained by the connection task, which writes everything queued
//!   in one batch (one flush). Bounded in bytes: a push that would pass the limit closes the
//!   connection as a slow consumer instead of growing without end.
//! - [`Mailbox`]: messages on their way to one channel task. Bounded in count.
//!
//! Both hold no allocation while empty (a `VecDeque` gives its buffer back when drained), so an
//! idle connection costs only the structs themselves.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use bytes::Bytes;
use firebrand_protocol::Encoded;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

/// Queued capacity above this many slots is released once a queue drains.
const KEEP_CAPACITY: usize = 16;

/// Accounting overhead charged per queued frame on top of its bytes, so that a flood of tiny
/// frames is bounded too.
const FRAME_OVERHEAD: usize = 64;

/// Why a connection is being closed by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Close {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

impl Close {
    pub(crate) const SLOW_CONSUMER: Close = Close {
        code: 1008,
        reason: "slow consumer",
    };
    pub(crate) const DISCONNECT: Close = Close {
        code: 1001,
        reason: "disconnect",
    };
    pub(crate) const SHUTDOWN: Close = Close {
        code: 1012,
        reason: "server restart",
    };
    pub(crate) const IDLE: Close = Close {
        code: 1001,
        reason: "idle timeout",
    };
    /// The connection has ended: nothing is queued any more.
    pub(crate) const ENDED: Close = Close {
        code: 1000,
        reason: "",
    };
}

/// Events for the connection task that are not frames.
#[derive(Debug)]
pub(crate) enum ConnEvent {
    /// The channel task `id` has ended (any way: stop, leave, crash, refused join, abort) and
    /// its subscriptions are gone.
    ChannelExited { id: u64 },
}

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// The connection is closing; the frame was dropped.
    Closed,
    /// The queue was full: the connection is now closing as a slow consumer.
    Overflow,
}

#[derive(Default)]
struct OutState {
    frames: VecDeque<Frame>,
    bytes: usize,
    events: Vec<ConnEvent>,
    close: Option<Close>,
}

/// The outbound queue of one connection. See the module docs.
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    /// The connection task, woken when something is queued (one consumer: an `AtomicWaker`
    /// and a flag cost less per connection than a `Notify` and its waiting future).
    ready: AtomicWaker,
    signaled: AtomicBool,
    limit: usize,
    /// When an idle WebSocket connection is closed: milliseconds on its node's idle clock
    /// (`u64::MAX`: never). See [`Registered::watch_idle`](crate::node::Registered::watch_idle).
    idle_deadline: AtomicU64,
    /// Whether its connection compresses messages (permessage-deflate): broadcasts then queue
    /// their prepared frame here ([`Frame::Prepared`]), made once per broadcast.
    compresses: bool,
}

/// Everything taken from an [`Outbox`] in one go.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) frames: VecDeque<Frame>,
    pub(crate) events: Vec<ConnEvent>,
    pub(crate) close: Option<Close>,
}

/// A frame queued for a client, as its transport sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A text frame: JSON written by a serializer, so valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    /// The answer to a client's ping (WebSocket only).
    Pong(Bytes),
    /// A text (`binary: false`) or binary message prepared for connections that compress
    /// (permessage-deflate, RFC 7692, no context takeover): `data` deflated (sent with RSV1
    /// set) or, when that would not make it shorter, as it is. Decided once for every
    /// connection that shares it (a broadcast's subscribers), and never compressed again. Only
    /// queued to a WebSocket connection that compresses ([`Outbox::compresses`]).
    Prepared {
        binary: bool,
        deflated: bool,
        data: Bytes,
    },
}

impl Frame {
    /// A serializer's output as a frame (no copy).
    pub(crate) fn from_encoded(encoded: Encoded) -> Frame {
        match encoded {
            Encoded::Text(s) => Frame::Text(Bytes::from(s)),
            Encoded::Binary(b) => Frame::Binary(Bytes::from(b)),
        }
    }

    /// The payload's length.
    pub(crate) fn len(&self) -> usize {
        match self {
            Frame::Text(b) | Frame::Binary(b) | Frame::Pong(b) => b.len(),
            Frame::Prepared { data, .. } => data.len(),
        }
    }

    /// The frame as a compressing connection sends it ([`Frame::Prepared`]): a text or binary
    /// message deflated when that makes it shorter (see [`crate::deflate::compress`]). Other
    /// frames are returned as they are.
    pub(crate) fn prepared(&self) -> Frame {
        let (binary, data) = match self {
            Frame::Text(b) => (false, b),
            Frame::Binary(b) => (true, b),
            Frame::Pong(_) | Frame::Prepared { .. } => return self.clone(),
        };
        match crate::deflate::compress(data) {
            Some(z) => Frame::Prepared {
                binary,
                deflated: true,
                data: z.into(),
            },
            None => Frame::Prepared {
                binary,
                deflated: false,
                data: data.clone(),
            },
        }
    }
}

impl Outbox {
    /// An outbox that holds at most `limit` bytes of queued frames.
    pub(crate) fn new(limit: usize) -> Self {
        Outbox::with_compression(limit, false)
    }

    /// An outbox that holds at most `limit` bytes of queued frames, for a connection that
    /// compresses messages when `compresses` is true.
    pub(crate) fn with_compression(limit: usize, compresses: bool) -> Self {
        Outbox {
            compresses,
            state: Mutex::new(OutState::default()),
            ready: AtomicWaker::new(),
            signaled: AtomicBool::new(false),
            limit,
            idle_deadline: AtomicU64::new(u64::MAX),
        }
    }

    /// Queues a frame. Never blocks; see [`Pushed`] for the outcomes.
    pub(crate) fn push(&self, frame: Frame) -> Pushed {
        self.push_inner(frame, true)
    }

    /// Queues a frame replayed from a topic's history, outside the byte limit: the frame is
    /// shared with the history (it costs the queue a handle, not its bytes), and a client that
    /// rejoins after a slow-consumer close would otherwise be closed again by the replay of
    /// what it missed, over and over. Live frames queued behind it are counted as usual.
    pub(crate) fn push_replayed(&self, frame: Frame) -> Pushed {
        self.push_inner(frame, false)
    }

    /// Queues `frame`; `counted`: against the byte limit (as [`Mailbox`]'s `push_inner`).
    #[inline]
    fn push_inner(&self, frame: Frame, counted: bool) -> Pushed {
        let cost = if counted {
            frame.len() + FRAME_OVERHEAD
        } else {
            0
        };
        let mut st = self.state.lock();
        if st.close.is_some() {
            return Pushed::Closed;
        }
        if counted && st.bytes + cost > self.limit && !st.frames.is_empty() {
            st.close = Some(Close::SLOW_CONSUMER);
            st.frames = VecDeque::new();
            st.bytes = 0;
            drop(st);
            self.signal();
            return Pushed::Overflow;
        }
        let was_empty = st.frames.is_empty();
        st.bytes += cost;
        st.frames.push_back(frame);
        drop(st);
        if was_empty {
            self.signal();
        }
        Pushed::Queued
    }

    /// Queues an event for the connection task. Events are never dropped while it runs.
    pub(crate) fn event(&self, event: ConnEvent) {
        self.state.lock().events.push(event);
        self.signal();
    }

    /// Asks the connection to close with `close` after the frames already queued.
    /// The first request wins.
    pub(crate) fn close(&self, close: Close) {
        let mut st = self.state.lock();
        if st.close.is_none() {
            st.close = Some(close);
        }
        drop(st);
        self.signal();
    }

    /// The requested close, if any.
    pub(crate) fn close_requested(&self) -> Option<Close> {
        self.state.lock().close.clone()
    }

    /// The requested close, once there is one; until then the connection task is woken when
    /// one is (as by [`Outbox::poll_ready`], whose waker this shares: a writer blocked on a slow
    /// client polls this beside its write).
    pub(crate) fn poll_close(&self, cx: &mut std::task::Context<'_>) -> Poll<Close> {
        self.ready.register(cx.waker());
        match self.close_requested() {
            Some(close) => Poll::Ready(close),
            None => Poll::Pending,
        }
    }

    /// Whether its connection compresses messages: see [`Frame::Prepared`].
    pub(crate) fn compresses(&self) -> bool {
        self.compresses
    }

    pub(crate) fn idle_deadline(&self) -> u64 {
        self.idle_deadline.load(Ordering::Relaxed)
    }

    pub(crate) fn set_idle_deadline(&self, ms: u64) {
        self.idle_deadline.store(ms, Ordering::Relaxed);
    }

    /// Wakes the connection task, or holds its wake-up while the task queueing has more to
    /// queue ([`super::wakes`]).
    fn signal(&self) {
        self.signaled.store(true, Ordering::Release);
        super::wakes::wake(&self.ready);
    }

    /// Waits until something was queued since the last [`Outbox::take`]. Cancel-safe. One
    /// task waits on an outbox: its connection's.
    pub(crate) fn ready(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_ready(cx))
    }

    /// [`Outbox::ready`] as a poll.
    pub(crate) fn poll_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.ready.register(cx.waker());
        if self.signaled.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Takes the events and the requested close, leaving the frames queued, and counted
    /// against the limit, for [`Outbox::take_frames`]. The long-poll transport keeps a
    /// session's frames here until the client polls, so a client that stops polling is a slow
    /// consumer like a WebSocket client that stops reading. After this, [`Outbox::ready`]
    /// wakes for the next event or close, and for the next frame once the queue was emptied.
    pub(crate) fn take_events(&self) -> (Vec<ConnEvent>, Option<Close>) {
        let mut st = self.state.lock();
        (std::mem::take(&mut st.events), st.close.clone())
    }

    /// Takes the queued frames, leaving events and the close to [`Outbox::take_events`].
    pub(crate) fn take_frames(&self) -> VecDeque<Frame> {
        let mut st = self.state.lock();
        st.bytes = 0;
        std::mem::take(&mut st.frames)
    }

    /// Takes everything queued.
    pub(crate) fn take(&self) -> Batch {
        let mut st = self.state.lock();
        st.bytes = 0;
        let frames = std::mem::take(&mut st.frames);
        Batch {
            frames,
            events: std::mem::take(&mut st.events),
            close: st.close.clone(),
        }
    }
}

/// What [`Mailbox::push`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivered<T> {
    Queued,
    /// The receiver is gone; the message is handed back.
    Closed(T),
    /// The mailbox holds its limit; the message is handed back.
    Full(T),
}

struct MailState<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// A subscriber's presence cursor before it has seen the topic's presences: it gets no diff.
pub(crate) const NOT_LIVE: u64 = u64::MAX;

/// A bounded multi-producer, single-consumer queue of messages for one channel task.
pub(crate) struct Mailbox<T> {
    state: Mutex<MailState<T>>,
    /// The receiving task (one receiver).
    waker: AtomicWaker,
    limit: usize,
    /// The channel's presence cursor ([`Inbox::cursor`](crate::node::pubsub::Inbox::cursor)): kept
    /// here, in the allocation the channel and its subscription share anyway.
    pub(crate) cursor: std::sync::atomic::AtomicU64,
}

impl<T> Mailbox<T> {
    pub(crate) fn new(limit: usize) -> Self {
        Mailbox {
            state: Mutex::new(MailState {
                items: VecDeque::new(),
                closed: false,
            }),
            waker: AtomicWaker::new(),
            limit,
            cursor: std::sync::atomic::AtomicU64::new(NOT_LIVE),
        }
    }

    /// Queues a message unless the mailbox is closed or full. Never blocks.
    pub(crate) fn push(&self, item: T) -> Delivered<T> {
        self.push_inner(item, false)
    }

    /// Queues a message even past the limit (control messages that must not be lost).
    pub(crate) fn push_always(&self, item: T) -> Delivered<T> {
        self.push_inner(item, true)
    }

    fn push_inner(&self, item: T, always: bool) -> Delivered<T> {
        let mut st = self.state.lock();
        if st.closed {
            return Delivered::Closed(item);
        }
        if !always && st.items.len() >= self.limit {
            return Delivered::Full(item);
        }
        st.items.push_back(item);
        drop(st);
        self.waker.wake();
        Delivered::Queued
    }

    /// Takes the next message, waiting for one. Cancel-safe. Only one task may receive.
    pub(crate) fn recv(&self) -> impl Future<Output = T> + '_ {
        std::future::poll_fn(|cx| {
            if let Some(item) = self.try_recv() {
                return Poll::Ready(item);
            }
            // Registered, then checked again: a push in between wakes us.
            self.waker.register(cx.waker());
            match self.try_recv() {
                Some(item) => Poll::Ready(item),
                None => Poll::Pending,
            }
        })
    }

    pub(crate) fn try_recv(&self) -> Option<T> {
        let mut st = self.state.lock();
        let item = st.items.pop_front();
        if st.items.is_empty() && st.items.capacity() > KEEP_CAPACITY {
            st.items = VecDeque::new();
        }
        item
    }

    /// Refuses further messages and returns those still queued.
    pub(crate) fn close(&self) -> VecDeque<T> {
        let mut st = self.state.lock();
        st.closed = true;
        std::mem::take(&mut st.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Frame {
        Frame::Text("x".repeat(n).into())
    }

    #[test]
    fn outbox_overflow_closes_as_slow_consumer_and_frees_frames() {
        let out = Outbox::new(1000);
        // 500 bytes + 64 overhead each: the second would pass 1000.
        assert_eq!(out.push(text(500)), Pushed::Queued);
        assert_eq!(out.push(text(500)), Pushed::Overflow);
        assert_eq!(out.push(text(1)), Pushed::Closed);
        let batch = out.take();
        assert!(batch.frames.is_empty());
        assert_eq!(batch.close, Some(Close::SLOW_CONSUMER));
    }

    #[test]
    fn outbox_accepts_one_frame_larger_than_the_limit_when_empty() {
        let out = Outbox::new(100);
        assert_eq!(out.push(text(500)), Pushed::Queued);
        assert_eq!(out.take().frames.len(), 1);
        assert_eq!(out.push(text(10)), Pushed::Queued);
    }

    #[test]
    fn frames_left_queued_count_against_the_limit() {
        let out = Outbox::new(1000);
        assert_eq!(out.push(text(500)), Pushed::Queued);
        out.event(ConnEvent::ChannelExited { id: 1 });
        let (events, close) = out.take_events();
        assert_eq!((events.len(), close), (1, None));
        assert_eq!(out.push(text(500)), Pushed::Overflow);
        assert!(out.take_frames().is_empty());
        assert_eq!(out.take_events().1, Some(Close::SLOW_CONSUMER));
    }

    #[test]
    fn outbox_first_close_wins() {
        let out = Outbox::new(100);
        out.close(Close::DISCONNECT);
        out.close(Close::SHUTDOWN);
        assert_eq!(out.take().close, Some(Close::DISCONNECT));
        assert_eq!(out.close_requested(), Some(Close::DISCONNECT));
    }

    #[tokio::test]
    async fn mailbox_is_bounded_and_hands_back_after_close() {
        let mb = Mailbox::new(2);
        assert_eq!(mb.push(1), Delivered::Queued);
        assert_eq!(mb.push(2), Delivered::Queued);
        assert_eq!(mb.push(3), Delivered::Full(3));
        assert_eq!(mb.push_always(4), Delivered::Queued);
        assert_eq!(mb.recv().await, 1);
        assert_eq!(mb.close(), VecDeque::from([2, 4]));
        assert_eq!(mb.push(5), Delivered::Closed(5));
    }

    #[tokio::test]
    async fn mailbox_wakes_a_waiting_receiver() {
        let mb = std::sync::Arc::new(Mailbox::new(8));
        let rx = tokio::spawn({
            let mb = mb.clone();
            async move { mb.recv().await }
        });
        tokio::task::yield_now().await;
        mb.push(7);
        assert_eq!(rx.await.unwrap(), 7);
    }
}
