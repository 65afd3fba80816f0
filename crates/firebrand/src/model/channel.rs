//! The [`Channel`] trait and the values its callbacks return.

use std::borrow::Cow;
use std::future::Future;

use firebrand_protocol::{DecodeError, Payload};

use crate::model::context::{ChannelContext, JoinContext};
use crate::node::pubsub::Broadcast;
use crate::node::queue::Close;

/// A channel: the server side of one joined topic on one connection.
///
/// Each joined channel runs in its own task and owns its state (`Self`). Callbacks run one at a
/// time, in the order their messages arrived; a slow callback delays only its own channel.
/// A panic in any callback ends only this channel: the client receives `phx_error` (or, in
/// [`join`](Channel::join), the error reply `{"reason":"join crashed"}`), and the connection and
/// its other channels carry on. [`terminate`](Channel::terminate) is not called after a panic.
///
/// ```
/// use firebrand::{Channel, ChannelContext, HandleResult, JoinContext, JoinError, Joined, Payload, Reply};
///
/// struct Room { user: String }
///
/// impl Channel for Room {
///     type Assigns = String;     // what the socket's `connect` returned: the user name
///     type State = ();           // no app state (see `Endpoint::socket_with_state`)
///     type Info = ();            // messages sent to the channel with `ChannelContext::sender`
///
///     async fn join(topic: &str, _params: Payload, ctx: &JoinContext<'_, String>) -> Result<Joined<Self>, JoinError> {
///         if topic == "room:private" {
///             return Err(JoinError::reason("unauthorized"));
///         }
///         Ok(Joined::new(Room { user: ctx.assigns().clone() }))
///     }
///
///     async fn handle_in(&mut self, event: &str, payload: Payload, ctx: &mut ChannelContext<Self>) -> HandleResult {
///         match event {
///             "new_msg" => {
///                 ctx.broadcast("new_msg", payload);
///                 Ok(None)
///             }
///             "ping" => Ok(Some(Reply::ok(payload))),
///             _ => Err(Reply::error(serde_json::json!({"reason": "unknown event"}))),
///         }
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a firebrand channel",
    label = "route a type that implements `firebrand::Channel`",
    note = "implement `Channel` with `type Assigns` equal to your socket's `Socket::Assigns`"
)]
pub trait Channel: Sized + Send + 'static {
    /// The socket's assigns (what [`Socket::connect`](crate::Socket::connect) returned).
    type Assigns: Send + Sync + 'static;

    /// The part of the socket's app state this channel reads, taken from the state given to
    /// [`Endpoint::socket_with_state`](crate::Endpoint::socket_with_state) by [`FromRef`](crate::FromRef)
    /// when the channel starts, and read with [`ChannelContext::state`]. `()` for none.
    type State: Send + Sync + 'static;

    /// Messages other code sends to this channel with a [`ChannelSender`](crate::ChannelSender),
    /// received by [`handle_info`](Channel::handle_info). Use `()` when there are none.
    type Info: Send + 'static;

    /// Events whose broadcasts pass through [`handle_out`](Channel::handle_out) of every
    /// subscriber, instead of going straight to the clients. Each intercepted event costs an
    /// encode per subscriber: intercept only what needs filtering per client.
    const INTERCEPTS: &'static [&'static str] = &[];

    /// The bouncer: accepts the client into `topic` (with a reply payload and the channel's
    /// state) or refuses it. `params` are the join params sent by the client.
    ///
    /// Nothing can be pushed or broadcast yet; do that in
    /// [`after_join`](Channel::after_join).
    fn join(
        topic: &str,
        params: Payload,
        ctx: &JoinContext<'_, Self::Assigns, Self::State>,
    ) -> impl Future<Output = Result<Joined<Self>, JoinError>> + Send;

    /// Runs right after the join reply has been queued (Phoenix's `:after_join` idiom): push
    /// initial state, track presence.
    fn after_join(&mut self, ctx: &mut ChannelContext<Self>) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }

    /// Handles an event pushed by the client.
    ///
    /// `Ok(Some(reply))` and `Err(reply)` both send `reply` to the client's push; `Ok(None)`
    /// sends nothing (reply later with [`ChannelContext::reply_later`], or never). `Err` exists
    /// so that `?` turns a [`DecodeError`] into an error reply `{"reason": "invalid payload: …"}`.
    /// To stop the channel, call [`ChannelContext::stop`]; the reply, if any, is sent first.
    ///
    /// The default ignores the event and sends no reply.
    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> impl Future<Output = HandleResult> + Send {
        let _ = (payload, ctx);
        tracing::debug!(event, "unhandled event");
        async { Ok(None) }
    }

    /// Handles an intercepted broadcast (see [`INTERCEPTS`](Channel::INTERCEPTS)) for this
    /// subscriber: push it as is, change it, or drop it. The default pushes it unchanged.
    fn handle_out(
        &mut self,
        broadcast: Broadcast,
        ctx: &mut ChannelContext<Self>,
    ) -> impl Future<Output = ()> + Send {
        ctx.push(broadcast.event(), broadcast.payload().clone());
        async {}
    }

    /// Handles a message sent to the channel, or a broadcast on a topic it subscribed to.
    /// The default ignores it (and logs at debug level).
    fn handle_info(
        &mut self,
        info: Info<Self::Info>,
        ctx: &mut ChannelContext<Self>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (info, ctx);
        tracing::debug!("unhandled info message");
        async {}
    }

    /// Runs when the channel stops for any reason but a panic or a duplicate join. Pushes made
    /// here after a leave reach the wire after `phx_close`, as in Phoenix.
    fn terminate(
        &mut self,
        reason: &StopReason,
        ctx: &mut ChannelContext<Self>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (reason, ctx);
        async {}
    }
}

/// What [`Channel::handle_in`] returns. See there.
pub type HandleResult = Result<Option<Reply>, Reply>;

/// A message for [`Channel::handle_info`].
#[derive(Debug)]
pub enum Info<M> {
    /// A broadcast on a topic subscribed with [`ChannelContext::subscribe`].
    Broadcast(Broadcast),
    /// A message sent with a [`ChannelSender`](crate::ChannelSender).
    Message(M),
}

/// A reply to a client push: `phx_reply` with a status and a response payload.
///
/// ```
/// use firebrand::Reply;
/// use serde_json::json;
///
/// let ok = Reply::ok(json!({"id": 1}));
/// let err = Reply::error(json!({"reason": "not allowed"}));
/// let pending = Reply::new("pending", json!({}));
/// assert_eq!(err.status(), "error");
/// # let _ = (ok, pending);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    status: Cow<'static, str>,
    payload: Payload,
}

impl Reply {
    /// A reply with any status.
    pub fn new(status: impl Into<Cow<'static, str>>, payload: impl Into<Payload>) -> Self {
        Reply {
            status: status.into(),
            payload: payload.into(),
        }
    }

    /// Status `ok`.
    pub fn ok(payload: impl Into<Payload>) -> Self {
        Reply::new("ok", payload)
    }

    /// Status `error`.
    pub fn error(payload: impl Into<Payload>) -> Self {
        Reply::new("error", payload)
    }

    /// The status.
    pub fn status(&self) -> &str {
        &self.status
    }

    /// The response payload.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }
}

impl From<DecodeError> for Reply {
    /// An error reply `{"reason": "invalid payload: …"}`.
    fn from(e: DecodeError) -> Self {
        Reply::error(serde_json::json!({ "reason": e.to_string() }))
    }
}

/// A successful join: the channel's state and the reply (a payload, default `{}`; for a
/// [`TypedChannel`](crate::TypedChannel), its contract's join reply type).
pub struct Joined<C, R = Payload> {
    pub(crate) channel: C,
    pub(crate) reply: R,
    pub(crate) recent: usize,
}

impl<C, R> Joined<C, R> {
    /// Joined, replying `reply`: a typed channel's join reply.
    pub fn with_reply(channel: C, reply: R) -> Self {
        Joined {
            channel,
            reply,
            recent: 0,
        }
    }

    /// On a [recoverable](crate::EndpointBuilder::history) topic, a join without `since` (a
    /// newcomer) gets the topic's last `n` broadcasts (at most what the history holds) right
    /// after its reply, with their positions, before any newer one: a chat room's recent
    /// messages. A join with `since` gets what it missed instead.
    pub fn recent(mut self, n: usize) -> Self {
        self.recent = n;
        self
    }
}

impl<C> Joined<C> {
    /// Joined, replying `{}`.
    pub fn new(channel: C) -> Self {
        Joined {
            channel,
            reply: Payload::empty(),
            recent: 0,
        }
    }

    /// Sets the join reply's payload.
    pub fn reply(mut self, payload: impl Into<Payload>) -> Self {
        self.reply = payload.into();
        self
    }
}

/// A refused join: the client gets an error reply with this payload, and no channel exists.
#[derive(Clone, Debug)]
pub struct JoinError {
    pub(crate) payload: Payload,
}

impl JoinError {
    /// Refuses with any payload.
    pub fn new(payload: impl Into<Payload>) -> Self {
        JoinError {
            payload: payload.into(),
        }
    }

    /// Refuses with `{"reason": reason}`, the usual shape.
    pub fn reason(reason: &str) -> Self {
        JoinError::new(serde_json::json!({ "reason": reason }))
    }
}

/// Why a channel stopped, as [`Channel::terminate`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// Stopped by the channel as finished: the client gets `phx_close`.
    Normal,
    /// Stopped by the channel or the server going down: the client gets `phx_close`.
    Shutdown,
    /// The client left (`phx_leave`).
    Left,
    /// The connection closed.
    Closed,
    /// Stopped by the channel with an error: the client gets `phx_error`
    /// `{"reason":"channel_crash"}` and the official client rejoins.
    Error(String),
}

impl StopReason {
    /// How a connection's channels see its close: `Shutdown` when the server drains.
    pub(crate) fn of(close: &Close) -> Self {
        if *close == Close::SHUTDOWN {
            StopReason::Shutdown
        } else {
            StopReason::Closed
        }
    }
}
