//! Channels: the handle users hold, its events, and its pushes.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use firebrand_protocol::Payload;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{JoinError, LeaveError, PushError};
use crate::task::{ChanId, Command};

/// Something that happened on a channel, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelEvent {
    /// A push or broadcast from the server (including `presence_state` / `presence_diff`).
    Message {
        /// The event name, e.g. `new_msg`.
        event: String,
        /// Its payload: JSON, or binary for V2 binary frames.
        payload: Payload,
    },
    /// The channel joined, or rejoined by itself after an error: the join reply's `response`.
    Joined {
        /// The `ok` reply's response.
        response: Payload,
    },
    /// The channel is not joined any more and will rejoin by itself: right away when the
    /// socket reconnects, otherwise after the rejoin backoff.
    Errored {
        /// Why.
        reason: ErrorReason,
    },
    /// The channel closed for good (left, or closed by the server with `phx_close`). It is the
    /// last event; the stream ends after it.
    Closed,
}

impl ChannelEvent {
    /// For [`Joined`](ChannelEvent::Joined) on a recoverable topic (a server with recovery on
    /// rejoin, such as firebrand's `EndpointBuilder::history`): whether the server replayed
    /// everything missed since the last broadcast this channel saw (`Some(true)`; the replayed
    /// broadcasts follow as [`Message`](ChannelEvent::Message)s) or could not (`Some(false)`:
    /// reload what you show). `None` for other events and other joins. The client sends the
    /// last position it saw as `since` on every rejoin by itself.
    pub fn recovered(&self) -> Option<bool> {
        match self {
            ChannelEvent::Joined { response } => match response.to_value()? {
                serde_json::Value::Object(r) => r.get("recovered")?.as_bool(),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Why a channel errored. It rejoins by itself in every case.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorReason {
    /// The server's channel process failed: `phx_error` with its payload
    /// (`{"reason":"channel_crash"}` from Phoenix ≥ 1.8.10).
    Crashed(Payload),
    /// A (re)join was answered with a non-`ok` status.
    Refused {
        /// The reply's status.
        status: String,
        /// The reply's response, e.g. `{"reason":"unauthorized"}`.
        response: Payload,
    },
    /// A (re)join got no reply within the timeout.
    JoinTimeout,
    /// The connection closed or failed.
    ConnectionLost,
    /// The server did not answer a heartbeat within the heartbeat interval; the client closed
    /// the connection.
    HeartbeatTimeout,
}

/// The events of one channel: see [`Channel::events`].
///
/// The queue is unbounded: events pile up in memory while nobody calls [`Events::recv`], so
/// keep reading, or drop it.
#[derive(Debug)]
pub struct Events {
    pub(crate) rx: mpsc::UnboundedReceiver<ChannelEvent>,
}

impl Events {
    /// The next event, or `None` after [`ChannelEvent::Closed`] (or when the socket is gone).
    ///
    /// Cancel-safe: use it in `select!` without losing events.
    pub async fn recv(&mut self) -> Option<ChannelEvent> {
        self.rx.recv().await
    }

    /// The next event if one is queued now.
    pub fn try_recv(&mut self) -> Option<ChannelEvent> {
        self.rx.try_recv().ok()
    }
}

/// The join params: evaluated on every (re)join.
pub(crate) type Params = Arc<dyn Fn() -> Payload + Send + Sync>;

/// A channel on a topic. Cheap to clone; every clone is the same channel.
///
/// Create it with [`Socket::channel`](crate::Socket::channel), subscribe to its
/// [`events`](Channel::events), then [`join`](Channel::join) once: from then on it rejoins by
/// itself after errors and reconnects, until [`leave`](Channel::leave) or until every clone is
/// dropped (which leaves it too).
#[derive(Clone, Debug)]
pub struct Channel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: ChanId,
    topic: String,
    cmd: mpsc::UnboundedSender<Command>,
    timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.cmd.send(Command::Drop { id: self.id });
    }
}

impl Channel {
    pub(crate) fn new(
        id: ChanId,
        topic: String,
        cmd: mpsc::UnboundedSender<Command>,
        timeout: Duration,
    ) -> Self {
        Channel {
            inner: Arc::new(Inner {
                id,
                topic,
                cmd,
                timeout,
            }),
        }
    }

    /// The topic, e.g. `room:lobby`.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The default timeout of its joins, pushes and leaves (the socket's).
    pub(crate) fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// A new stream of this channel's events from now on (no replay). Call it before
    /// [`join`](Channel::join) to see everything. Each call gets its own stream with every
    /// event.
    pub fn events(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        self.send(Command::Subscribe {
            id: self.inner.id,
            tx,
        });
        Events { rx }
    }

    /// Joins the channel (once per channel): resolves to the `ok` reply's response, or to the
    /// first failure. Whatever it returns, the channel keeps rejoining by itself until left.
    ///
    /// The timeout (the socket's [`timeout`](crate::SocketBuilder::timeout) unless
    /// [`Join::timeout`] says otherwise) applies to every later rejoin too.
    pub fn join(&self) -> Join {
        Join {
            channel: self.clone(),
            timeout: self.inner.timeout,
        }
    }

    /// Pushes `event` with `payload` (JSON, or [`Payload::binary`] for a V2 binary frame), with
    /// the socket's [`timeout`](crate::SocketBuilder::timeout) (default 10 s).
    ///
    /// The push is queued when this is called: sent now if the channel is joined, else buffered
    /// until it (re)joins (and dropped if its timeout passes first). Awaiting the returned
    /// [`Push`] waits for the reply: the `ok` response, or a [`PushError`]. Dropping it does not
    /// cancel the push; the reply is then ignored.
    pub fn push(&self, event: impl Into<String>, payload: impl Into<Payload>) -> Push {
        self.push_with_timeout(event, payload, self.inner.timeout)
    }

    /// [`push`](Channel::push) with its own timeout, counted from this call (time spent
    /// buffered while the channel joins counts too).
    pub fn push_with_timeout(
        &self,
        event: impl Into<String>,
        payload: impl Into<Payload>,
        timeout: Duration,
    ) -> Push {
        let (tx, rx) = oneshot::channel();
        let (event, payload) = (event.into(), payload.into());
        let deadline = Instant::now() + timeout;
        let too_long =
            |field, len: usize| (payload.is_binary() && len > 255).then_some((field, len));
        let state = match too_long("event", event.len()).or(too_long("topic", self.topic().len())) {
            Some((field, len)) => Err(PushError::FieldTooLong { field, len }),
            None => {
                self.send(Command::Push {
                    id: self.inner.id,
                    event,
                    payload,
                    deadline,
                    done: tx,
                });
                Ok(rx)
            }
        };
        Push { state, deadline }
    }

    /// Leaves the channel: sends `phx_leave` and closes the channel when the server answers, or
    /// after the socket's timeout (phoenix.js closes on timeout as well). When the socket is not
    /// connected, the channel closes at once. Pushes still waiting get [`PushError::Closed`].
    pub async fn leave(&self) -> Result<(), LeaveError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Leave {
            id: self.inner.id,
            timeout: self.inner.timeout,
            done: tx,
        });
        rx.await.unwrap_or(Err(LeaveError::Closed))
    }

    fn send(&self, cmd: Command) {
        // When the socket task is gone, the dropped reply senders answer `Closed`.
        let _ = self.inner.cmd.send(cmd);
    }
}

/// A join in progress: `.await` it, optionally after setting [`Join::timeout`].
#[derive(Debug)]
#[must_use = "a join does nothing until awaited"]
pub struct Join {
    channel: Channel,
    timeout: Duration,
}

impl Join {
    /// The timeout of this join and of every later rejoin of the channel.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl IntoFuture for Join {
    type Output = Result<Payload, JoinError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let (tx, rx) = oneshot::channel();
        self.channel.send(Command::Join {
            id: self.channel.inner.id,
            timeout: self.timeout,
            done: tx,
        });
        // Keep the channel alive while the join is awaited.
        let channel = self.channel;
        Box::pin(async move {
            let result = rx.await.unwrap_or(Err(JoinError::Closed));
            drop(channel);
            result
        })
    }
}

/// A push's reply: `.await` it for the `ok` response or a [`PushError`].
#[derive(Debug)]
pub struct Push {
    state: Result<oneshot::Receiver<Result<Payload, PushError>>, PushError>,
    deadline: Instant,
}

impl IntoFuture for Push {
    type Output = Result<Payload, PushError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let rx = self.state?;
            match tokio::time::timeout_at(self.deadline, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(PushError::Closed),
                Err(_) => Err(PushError::Timeout),
            }
        })
    }
}
