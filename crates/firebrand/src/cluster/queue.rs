//! [`PublishQueue`]: what every adapter needs between a publish that must not wait and the
//! engine's connection.

use std::fmt;

use bytes::Bytes;

use super::{ClusterLink, Retention};

/// The queue between [`Adapter::publish`](super::Adapter::publish) (which must not wait) and an adapter's publishing
/// task, with [`Adapter::flush`](super::Adapter::flush) support and loss counting. Adapters hold one.
pub struct PublishQueue {
    tx: tokio::sync::mpsc::Sender<Outgoing>,
    rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Outgoing>>>,
    link: parking_lot::Mutex<Option<ClusterLink>>,
}

/// What an adapter's publishing task takes from its [`PublishQueue`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Outgoing {
    /// A message to publish.
    Message(Bytes),
    /// Answer it once everything taken before it was handed to the engine.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// A message to append to `topic`'s history ([`HistoryEngine::append`](super::HistoryEngine::append)).
    Record {
        /// The topic.
        topic: Box<str>,
        /// The message.
        message: Bytes,
        /// How much of the topic's history to keep.
        retention: Retention,
    },
}

impl PublishQueue {
    /// A queue holding at most `capacity` messages; past that, messages are dropped and counted
    /// as lost.
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        PublishQueue {
            tx,
            rx: parking_lot::Mutex::new(Some(rx)),
            link: parking_lot::Mutex::new(None),
        }
    }

    /// For [`Adapter::start`](super::Adapter::start): remembers the link (to count losses) and hands over the
    /// receiving end, once (`None` on a second start).
    pub fn start(&self, link: &ClusterLink) -> Option<tokio::sync::mpsc::Receiver<Outgoing>> {
        *self.link.lock() = Some(link.clone());
        self.rx.lock().take()
    }

    /// For [`Adapter::publish`](super::Adapter::publish): queues without waiting.
    pub fn push(&self, message: Bytes) {
        if self.tx.try_send(Outgoing::Message(message)).is_err()
            && let Some(link) = &*self.link.lock()
        {
            link.count_lost(1);
        }
    }

    /// For [`HistoryEngine::append`](super::HistoryEngine::append): queues without waiting,
    /// in order with the other messages.
    pub fn push_record(&self, topic: &str, message: Bytes, retention: Retention) {
        let record = Outgoing::Record {
            topic: topic.into(),
            message,
            retention,
        };
        if self.tx.try_send(record).is_err()
            && let Some(link) = &*self.link.lock()
        {
            link.count_lost(1);
        }
    }

    /// For [`Adapter::flush`](super::Adapter::flush).
    pub async fn flush(&self) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        if self.tx.send(Outgoing::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }
}

impl fmt::Debug for PublishQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishQueue").finish_non_exhaustive()
    }
}
