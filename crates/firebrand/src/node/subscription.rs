//! [`Subscription`]: a topic's broadcasts received by Rust code outside any channel (Phoenix's
//! `Phoenix.PubSub.subscribe/2` from any process): a background job that persists messages, a
//! webhook sender, a cache. See [`Endpoint::subscribe`](crate::Endpoint::subscribe).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use super::Hub;
use super::pubsub::{Broadcast, Inbox, SubId, Target};

/// A subscription to one topic's broadcasts, on this node and, in a cluster, on every node
/// (broadcasts from other nodes are dispatched to this node's subscribers, this one included).
/// Ends (unsubscribes) when dropped.
///
/// It holds at most its capacity of broadcasts that were not read yet. **A reader that falls
/// behind loses the oldest**, never blocks the publisher or the topic's other subscribers, and
/// learns how many it lost: the next [`recv`](Subscription::recv) answers
/// `Err(Lagged(n))`, then goes on with the oldest still held (as `tokio::sync::broadcast`).
///
/// It is a [`Stream`](futures_util::Stream) of `Result<Broadcast, Lagged>` too.
pub struct Subscription {
    queue: Arc<Queue>,
    hub: Arc<Hub>,
    topic: Box<str>,
    id: SubId,
}

/// How many broadcasts a [`Subscription`] lost because its reader fell behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged(pub u64);

impl fmt::Display for Lagged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the subscriber fell behind: {} broadcasts were dropped",
            self.0
        )
    }
}

impl std::error::Error for Lagged {}

/// What the topic's dispatch fills and the reader drains.
struct Queue {
    state: Mutex<State>,
    capacity: usize,
    waker: AtomicWaker,
    /// Unused (a subscription takes no presence cursor); the inbox contract needs one.
    cursor: AtomicU64,
}

#[derive(Default)]
struct State {
    broadcasts: VecDeque<Broadcast>,
    lost: u64,
}

impl Inbox for Queue {
    fn cursor(&self) -> &AtomicU64 {
        &self.cursor
    }

    fn intercepted(&self, broadcast: Broadcast) {
        self.info(broadcast);
    }

    fn info(&self, broadcast: Broadcast) {
        let mut st = self.state.lock();
        if st.broadcasts.len() >= self.capacity {
            st.broadcasts.pop_front();
            st.lost += 1;
        }
        st.broadcasts.push_back(broadcast);
        drop(st);
        self.waker.wake();
    }
}

impl Subscription {
    /// Subscribes to `topic` on `hub`, holding at most `capacity` unread broadcasts (at least 1).
    pub(crate) fn new(hub: &Arc<Hub>, topic: &str, capacity: usize) -> Subscription {
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            capacity: capacity.max(1),
            waker: AtomicWaker::new(),
            cursor: AtomicU64::new(0),
        });
        let id = hub
            .pubsub()
            .subscribe(topic, Target::Info(queue.clone() as Arc<dyn Inbox>));
        Subscription {
            queue,
            hub: hub.clone(),
            topic: topic.into(),
            id,
        }
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next broadcast; `Err(Lagged(n))` first if `n` were dropped since the last call
    /// because this reader fell behind.
    pub async fn recv(&mut self) -> Result<Broadcast, Lagged> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next broadcast if one is waiting (or `Err(Lagged(n))`, as [`recv`](Self::recv)).
    pub fn try_recv(&mut self) -> Option<Result<Broadcast, Lagged>> {
        let mut st = self.queue.state.lock();
        if st.lost > 0 {
            return Some(Err(Lagged(std::mem::take(&mut st.lost))));
        }
        st.broadcasts.pop_front().map(Ok)
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Broadcast, Lagged>> {
        if let Some(next) = self.try_recv() {
            return Poll::Ready(next);
        }
        self.queue.waker.register(cx.waker());
        // A broadcast queued between the check and the registration.
        match self.try_recv() {
            Some(next) => Poll::Ready(next),
            None => Poll::Pending,
        }
    }
}

impl futures_util::Stream for Subscription {
    type Item = Result<Broadcast, Lagged>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx).map(Some)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("capacity", &self.queue.capacity)
            .finish_non_exhaustive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.pubsub().unsubscribe(&self.topic, self.id);
    }
}
