//! [`PublishQueue`]: what every adapter needs between a publish that must not wait and the
//! engine's connection.

use std::fmt;

use bytes::Bytes;

use super::{ClusterLink, Retention};
use crate::BroadcastError;

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
    /// A message to publish whose sender waits to know whether it reached the engine
    /// ([`Adapter::publish_confirmed`](super::Adapter::publish_confirmed)): answer `confirm`.
    Confirmed {
        /// The message.
        message: Bytes,
        /// Answered once the engine has it, or with why not.
        confirm: Confirm,
    },
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
        /// With [`HistoryEngine::append_confirmed`](super::HistoryEngine::append_confirmed):
        /// answered once the engine has it, or with why not.
        confirm: Option<Confirm>,
    },
}

/// The answer an adapter owes a confirmed publish
/// ([`Adapter::publish_confirmed`](super::Adapter::publish_confirmed),
/// [`HistoryEngine::append_confirmed`](super::HistoryEngine::append_confirmed)): one per
/// message, never on the path of [`Adapter::publish`](super::Adapter::publish). Dropping it
/// unanswered answers [`BroadcastError::Unconfirmed`].
///
/// Answer [`confirmed`](Confirm::confirmed) only once the engine itself said it has the message
/// (a reply on the connection that carried it), never when it was merely written to a socket:
/// a connection torn down loses what it had in flight.
#[derive(Debug)]
pub struct Confirm(tokio::sync::oneshot::Sender<Result<(), BroadcastError>>);

/// Where a [`Confirm`]'s answer arrives.
pub(crate) type Answer = tokio::sync::oneshot::Receiver<Result<(), BroadcastError>>;

impl Confirm {
    /// A confirmation and where its answer arrives.
    pub(crate) fn new() -> (Confirm, Answer) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Confirm(tx), rx)
    }

    /// The engine has the message.
    pub fn confirmed(self) {
        let _ = self.0.send(Ok(()));
    }

    /// It has not, and why: [`BroadcastError::Unreachable`] or [`BroadcastError::QueueFull`]
    /// when the message was never sent, [`BroadcastError::Unconfirmed`] when it was sent and
    /// may have reached the engine.
    pub fn failed(self, why: BroadcastError) {
        let _ = self.0.send(Err(why));
    }

    /// [`confirmed`](Confirm::confirmed) if `ok`, else [`failed`](Confirm::failed) with `why`.
    pub fn answer(self, ok: bool, why: BroadcastError) {
        if ok {
            self.confirmed()
        } else {
            self.failed(why)
        }
    }
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
        self.send(Outgoing::Message(message));
    }

    /// For [`Adapter::publish_confirmed`](super::Adapter::publish_confirmed): queues without
    /// waiting; a full queue answers [`BroadcastError::QueueFull`] at once.
    pub fn push_confirmed(&self, message: Bytes, confirm: Confirm) {
        self.send(Outgoing::Confirmed { message, confirm });
    }

    /// For [`HistoryEngine::append`](super::HistoryEngine::append) and
    /// [`HistoryEngine::append_confirmed`](super::HistoryEngine::append_confirmed): queues
    /// without waiting, in order with the other messages.
    pub fn push_record(
        &self,
        topic: &str,
        message: Bytes,
        retention: Retention,
        confirm: Option<Confirm>,
    ) {
        self.send(Outgoing::Record {
            topic: topic.into(),
            message,
            retention,
            confirm,
        });
    }

    /// Queues `out`; when it cannot be, counts it lost and answers its confirmation.
    fn send(&self, out: Outgoing) {
        use tokio::sync::mpsc::error::TrySendError;
        let (out, why) = match self.tx.try_send(out) {
            Ok(()) => return,
            Err(TrySendError::Full(out)) => (out, BroadcastError::QueueFull),
            // The publishing task is gone: nothing more is sent.
            Err(TrySendError::Closed(out)) => (out, BroadcastError::Unreachable),
        };
        if let Some(link) = &*self.link.lock() {
            link.count_lost(1);
        }
        if let Outgoing::Confirmed { confirm, .. }
        | Outgoing::Record {
            confirm: Some(confirm),
            ..
        } = out
        {
            confirm.failed(why);
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
