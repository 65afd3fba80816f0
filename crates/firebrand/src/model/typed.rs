//! Typed channels: a [`Contract`] (the events of a channel as Rust types) served by a
//! [`TypedChannel`], one [`Handle`] implementation per push.
//!
//! A typed channel is a [`Channel`]: routed, run and isolated the same way, with the same wire.
//! What changes is the code: a push's payload arrives decoded into its type (or the client gets
//! an error reply naming what did not decode), the handler returns the push's reply type, and
//! the [`TypedContext`] only sends events its contract lists — checked by the compiler.

use std::future::Future;

use firebrand_protocol::contract::{Contract, ErrorReply, Event, Includes, Push, PushList};
use firebrand_protocol::{DecodeError, Payload};

use crate::endpoint::Endpoint;
use crate::model::channel::{Channel, HandleResult, Info, JoinError, Joined, Reply, StopReason};
use crate::model::context::{ChannelContext, ChannelSender, JoinContext};
use crate::node::presence::PresenceError;
use crate::node::pubsub::Broadcast;

/// The join params of typed channel `C`'s contract.
pub type JoinParams<C> = <<C as TypedChannel>::Contract as Contract>::JoinParams;
/// The join reply of typed channel `C`'s contract.
pub type JoinReply<C> = <<C as TypedChannel>::Contract as Contract>::JoinReply;
type Events<C> = <<C as TypedChannel>::Contract as Contract>::Events;
type Meta<C> = <<C as TypedChannel>::Contract as Contract>::Meta;

/// A channel that serves a [`Contract`]: the join takes the contract's params and answers its
/// reply type, every push the contract lists is handled by an implementation of [`Handle`],
/// and the [`TypedContext`] sends only the contract's events.
///
/// ```
/// use firebrand::contract::{Contract, Empty, ErrorReply, Event, Push};
/// use firebrand::{Handle, JoinContext, JoinError, Joined, TypedChannel, TypedContext};
/// use serde::{Deserialize, Serialize};
///
/// // The contract (in a crate of its own, shared with clients).
/// #[derive(Serialize, Deserialize)]
/// pub struct NewMsg { pub body: String }
/// impl Push for NewMsg { const EVENT: &'static str = "new_msg"; type Reply = Empty; }
///
/// #[derive(Serialize, Deserialize)]
/// pub struct Message { pub user: String, pub body: String }
/// impl Event for Message { const EVENT: &'static str = "new_msg"; }
///
/// pub struct RoomContract;
/// impl Contract for RoomContract {
///     type JoinParams = Empty;
///     type JoinReply = Empty;
///     type Pushes = (NewMsg,);
///     type Events = (Message,);
///     type Meta = Empty;
/// }
///
/// // The server's channel.
/// struct Room;
///
/// impl TypedChannel for Room {
///     type Contract = RoomContract;
///     type Assigns = String; // the user name, from the socket's `connect`
///     type State = ();
///     type Info = ();
///
///     async fn join(topic: &str, _: Empty, _: &JoinContext<'_, String>) -> Result<Joined<Self, Empty>, JoinError> {
///         match topic {
///             "room:private" => Err(JoinError::reason("unauthorized")),
///             _ => Ok(Joined::with_reply(Room, Empty)),
///         }
///     }
/// }
///
/// impl Handle<NewMsg> for Room {
///     async fn handle(&mut self, msg: NewMsg, ctx: &mut TypedContext<'_, Self>) -> Result<Empty, ErrorReply> {
///         if msg.body.is_empty() {
///             return Err(ErrorReply::new("empty message"));
///         }
///         ctx.broadcast(&Message { user: ctx.assigns().clone(), body: msg.body });
///         Ok(Empty)
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a typed firebrand channel",
    note = "implement `firebrand::TypedChannel` (and `firebrand::Handle<P>` for each push `P` of its contract)"
)]
pub trait TypedChannel: Sized + Send + 'static {
    /// The contract this channel serves. Every push it lists needs a [`Handle`] implementation.
    type Contract: Contract<Pushes: Dispatch<Self>>;

    /// The socket's assigns (what [`Socket::connect`](crate::Socket::connect) returned).
    type Assigns: Send + Sync + 'static;

    /// The part of the socket's app state this channel reads (see
    /// [`Endpoint::socket_with_state`](crate::Endpoint::socket_with_state)); `()` for none.
    type State: Send + Sync + 'static;

    /// Messages sent to the channel with a [`ChannelSender`]; `()` for none.
    type Info: Send + 'static;

    /// Events whose broadcasts pass through [`handle_out`](TypedChannel::handle_out) of every
    /// subscriber (see [`Channel::INTERCEPTS`]).
    const INTERCEPTS: &'static [&'static str] = &[];

    /// The bouncer: accepts the client into `topic` with the contract's join reply, or refuses
    /// it. Params that do not decode are refused before this runs, with
    /// `{"reason": "invalid payload: …"}`.
    fn join(
        topic: &str,
        params: JoinParams<Self>,
        ctx: &JoinContext<'_, Self::Assigns, Self::State>,
    ) -> impl Future<Output = Result<Joined<Self, JoinReply<Self>>, JoinError>> + Send;

    /// Runs right after the join reply (see [`Channel::after_join`]).
    fn after_join(&mut self, ctx: &mut TypedContext<'_, Self>) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }

    /// Handles an intercepted broadcast for this subscriber. The default forwards it.
    fn handle_out(
        &mut self,
        broadcast: Broadcast,
        ctx: &mut TypedContext<'_, Self>,
    ) -> impl Future<Output = ()> + Send {
        ctx.forward(&broadcast);
        async {}
    }

    /// Handles a message sent to the channel, or a broadcast of a subscribed topic.
    fn handle_info(
        &mut self,
        info: Info<Self::Info>,
        ctx: &mut TypedContext<'_, Self>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (info, ctx);
        async {}
    }

    /// Runs when the channel stops (see [`Channel::terminate`]).
    fn terminate(
        &mut self,
        reason: &StopReason,
        ctx: &mut TypedContext<'_, Self>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (reason, ctx);
        async {}
    }
}

/// Handles push `P` of a typed channel's contract: the payload arrives decoded, and the handler
/// answers with the push's reply type (`ok`) or an [`ErrorReply`] (`error`).
///
/// See [`TypedChannel`] for an example.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not handle the push `{P}` its contract lists",
    label = "missing `impl Handle<{P}> for {Self}`",
    note = "implement `firebrand::Handle<{P}>` for `{Self}`, or remove `{P}` from the contract's `Pushes`"
)]
pub trait Handle<P: Push>: TypedChannel {
    /// Handles one push. Returning `Err` answers the push with status `error`.
    fn handle(
        &mut self,
        push: P,
        ctx: &mut TypedContext<'_, Self>,
    ) -> impl Future<Output = Result<P::Reply, ErrorReply>> + Send;
}

/// Routes a push to the [`Handle`] implementation of its event: implemented for the tuples of
/// [`Push`] types whose every member the channel handles. Never implemented by hand.
#[doc(hidden)]
pub trait Dispatch<C: TypedChannel>: PushList {
    /// The channel's `handle_in` itself (no future around it: a message's future is as small
    /// as the handler's allows, see `Channel::handle_in` below).
    fn dispatch(
        channel: &mut C,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<C>,
    ) -> impl Future<Output = HandleResult> + Send;
}

/// Serializes a reply or event payload; `None` (logged) where serde cannot.
fn encode<T: serde::Serialize>(value: &T, what: &str) -> Option<Payload> {
    match Payload::json(value) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(error = %e, what, "payload not serializable as JSON; not sent");
            None
        }
    }
}

/// A push handler's result as the reply to send.
fn reply<P: Push>(result: Result<P::Reply, ErrorReply>) -> HandleResult {
    let (status, payload) = match result {
        Ok(reply) => ("ok", encode(&reply, P::EVENT)),
        Err(e) => ("error", encode(&e, P::EVENT)),
    };
    let payload =
        payload.ok_or_else(|| Reply::error(serde_json::json!({"reason": "reply not encoded"})))?;
    if status == "ok" {
        Ok(Some(Reply::ok(payload)))
    } else {
        Err(Reply::error(payload))
    }
}

fn unknown_event(event: &str) -> Reply {
    Reply::error(serde_json::json!({ "reason": format!("unknown event {event:?}") }))
}

impl<C: TypedChannel> Dispatch<C> for () {
    async fn dispatch(
        _: &mut C,
        event: &str,
        _: Payload,
        _: &mut ChannelContext<C>,
    ) -> HandleResult {
        Err(unknown_event(event))
    }
}

macro_rules! dispatch {
    ($( ($($t:ident),+) )+) => { $(
        impl<Ch: TypedChannel $(+ Handle<$t>)+, $($t: Push),+> Dispatch<Ch> for ($($t,)+) {
            async fn dispatch(
                channel: &mut Ch,
                event: &str,
                payload: Payload,
                ctx: &mut ChannelContext<Ch>,
            ) -> HandleResult {
                $(
                    if event == $t::EVENT {
                        let push: $t = payload.decode()?;
                        drop(payload);
                        let mut ctx = TypedContext { inner: ctx };
                        return reply::<$t>(
                            <Ch as Handle<$t>>::handle(channel, push, &mut ctx).await,
                        );
                    }
                )+
                Err(unknown_event(event))
            }
        }
    )+ };
}

dispatch! {
    (A)
    (A, B)
    (A, B, C)
    (A, B, C, D)
    (A, B, C, D, E)
    (A, B, C, D, E, F)
    (A, B, C, D, E, F, G)
    (A, B, C, D, E, F, G, H)
    (A, B, C, D, E, F, G, H, I)
    (A, B, C, D, E, F, G, H, I, J)
    (A, B, C, D, E, F, G, H, I, J, K)
    (A, B, C, D, E, F, G, H, I, J, K, L)
    (A, B, C, D, E, F, G, H, I, J, K, L, M)
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N)
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N, O)
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, Q)
}

/// Every typed channel is a [`Channel`]: the untyped callbacks decode, dispatch and encode.
impl<T: TypedChannel> Channel for T {
    type Assigns = T::Assigns;
    type State = T::State;
    type Info = T::Info;
    const INTERCEPTS: &'static [&'static str] = T::INTERCEPTS;

    async fn join(
        topic: &str,
        params: Payload,
        ctx: &JoinContext<'_, Self::Assigns, Self::State>,
    ) -> Result<Joined<Self>, JoinError> {
        let params: JoinParams<T> = params.decode().map_err(|e: DecodeError| {
            JoinError::new(serde_json::json!({ "reason": e.to_string() }))
        })?;
        let joined = T::join(topic, params, ctx).await?;
        let reply = encode(&joined.reply, "join reply").unwrap_or_else(Payload::empty);
        Ok(Joined {
            channel: joined.channel,
            reply,
            recent: joined.recent,
        })
    }

    async fn after_join(&mut self, ctx: &mut ChannelContext<Self>) {
        T::after_join(self, &mut TypedContext { inner: ctx }).await;
    }

    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> impl Future<Output = HandleResult> + Send {
        <<T::Contract as Contract>::Pushes as Dispatch<T>>::dispatch(self, event, payload, ctx)
    }

    async fn handle_out(&mut self, broadcast: Broadcast, ctx: &mut ChannelContext<Self>) {
        T::handle_out(self, broadcast, &mut TypedContext { inner: ctx }).await;
    }

    async fn handle_info(&mut self, info: Info<Self::Info>, ctx: &mut ChannelContext<Self>) {
        T::handle_info(self, info, &mut TypedContext { inner: ctx }).await;
    }

    async fn terminate(&mut self, reason: &StopReason, ctx: &mut ChannelContext<Self>) {
        T::terminate(self, reason, &mut TypedContext { inner: ctx }).await;
    }
}

/// What a typed channel's callbacks can do: everything a [`ChannelContext`] does, with events
/// checked against the contract — a handler cannot send an event its contract does not list
/// (the compiler says ``"`X` is not listed in this contract"``):
///
/// ```compile_fail
/// # use firebrand::contract::{Contract, Empty, ErrorReply, Event, Push};
/// # use firebrand::{Handle, JoinContext, JoinError, Joined, TypedChannel, TypedContext};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
/// # impl Push for Ping { const EVENT: &'static str = "ping"; type Reply = Empty; }
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Pong;
/// # impl Event for Pong { const EVENT: &'static str = "pong"; }
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Secret;
/// impl Event for Secret { const EVENT: &'static str = "secret"; }
///
/// struct PingContract;
/// impl Contract for PingContract {
///     type JoinParams = Empty;
///     type JoinReply = Empty;
///     type Pushes = (Ping,);
///     type Events = (Pong,); // no `Secret`
///     type Meta = Empty;
/// }
/// # struct Pinger;
/// # impl TypedChannel for Pinger {
/// #     type Contract = PingContract; type Assigns = (); type State = (); type Info = ();
/// #     async fn join(_: &str, _: Empty, _: &JoinContext<'_, ()>) -> Result<Joined<Self, Empty>, JoinError> { Ok(Joined::with_reply(Pinger, Empty)) }
/// # }
/// impl Handle<Ping> for Pinger {
///     async fn handle(&mut self, _: Ping, ctx: &mut TypedContext<'_, Self>) -> Result<Empty, ErrorReply> {
///         ctx.push(&Pong);   // listed: fine
///         ctx.push(&Secret); // error: `Secret` is not listed in this contract
///         Ok(Empty)
///     }
/// }
/// ```
pub struct TypedContext<'a, C: TypedChannel> {
    inner: &'a mut ChannelContext<C>,
}

impl<C: TypedChannel> TypedContext<'_, C> {
    /// The channel's topic.
    pub fn topic(&self) -> &str {
        self.inner.topic()
    }

    /// The socket's assigns.
    pub fn assigns(&self) -> &C::Assigns {
        self.inner.assigns()
    }

    /// This channel's part of the socket's app state.
    pub fn state(&self) -> &C::State {
        self.inner.state()
    }

    /// The endpoint (to broadcast on other topics, untyped).
    pub fn endpoint(&self) -> &Endpoint {
        self.inner.endpoint()
    }

    /// See [`ChannelContext::recovered`].
    pub fn recovered(&self) -> Option<bool> {
        self.inner.recovered()
    }

    /// Pushes `event` to this client only.
    pub fn push<E: Event, I>(&self, event: &E)
    where
        Events<C>: Includes<E, I>,
    {
        if let Some(p) = encode(event, E::EVENT) {
            self.inner.push(E::EVENT, p);
        }
    }

    /// Broadcasts `event` to every subscriber of this topic, this client included: encoded
    /// once for all of them.
    pub fn broadcast<E: Event, I>(&self, event: &E)
    where
        Events<C>: Includes<E, I>,
    {
        if let Some(p) = encode(event, E::EVENT) {
            self.inner.broadcast(E::EVENT, p);
        }
    }

    /// Broadcasts `event` to every subscriber of this topic but this one.
    pub fn broadcast_from<E: Event, I>(&self, event: &E)
    where
        Events<C>: Includes<E, I>,
    {
        if let Some(p) = encode(event, E::EVENT) {
            self.inner.broadcast_from(E::EVENT, p);
        }
    }

    /// See [`ChannelContext::broadcast_unrecorded`].
    pub fn broadcast_unrecorded<E: Event, I>(&self, event: &E)
    where
        Events<C>: Includes<E, I>,
    {
        if let Some(p) = encode(event, E::EVENT) {
            self.inner.broadcast_unrecorded(E::EVENT, p);
        }
    }

    /// Pushes an intercepted broadcast to this client as it is (for
    /// [`TypedChannel::handle_out`]; only broadcasts of this topic's contract are intercepted).
    pub fn forward(&self, broadcast: &Broadcast) {
        self.inner
            .push(broadcast.event(), broadcast.payload().clone());
    }

    /// Tracks `key` with the contract's presence meta (see [`ChannelContext::track`]).
    pub fn track(&mut self, key: &str, meta: &Meta<C>) -> Result<String, PresenceError> {
        let meta = serde_json::to_value(meta).map_err(|_| PresenceError::MetaNotObject)?;
        self.inner.track(key, meta)
    }

    /// Replaces the meta tracked for `key` (see [`ChannelContext::update_presence`]).
    pub fn update_presence(&mut self, key: &str, meta: &Meta<C>) -> Result<String, PresenceError> {
        let meta = serde_json::to_value(meta).map_err(|_| PresenceError::MetaNotObject)?;
        self.inner.update_presence(key, meta)
    }

    /// Stops tracking `key`.
    pub fn untrack(&mut self, key: &str) {
        self.inner.untrack(key);
    }

    /// Pushes `presence_state` (the topic's presences, each with its metas of the contract's
    /// meta type) to this client; later changes follow as `presence_diff`. The official
    /// client's `Presence` reads both. Call it in `after_join`.
    pub fn push_presence_state(&self) {
        let list = self.inner.presence_list();
        self.inner.push("presence_state", list);
    }

    /// See [`ChannelContext::subscribe`].
    pub fn subscribe(&mut self, topic: &str) {
        self.inner.subscribe(topic);
    }

    /// See [`ChannelContext::unsubscribe`].
    pub fn unsubscribe(&mut self, topic: &str) {
        self.inner.unsubscribe(topic);
    }

    /// See [`ChannelContext::sender`].
    pub fn sender(&self) -> ChannelSender<C::Info> {
        self.inner.sender()
    }

    /// See [`ChannelContext::stop`].
    pub fn stop(&mut self, reason: StopReason) {
        self.inner.stop(reason);
    }
}

impl From<ErrorReply> for JoinError {
    /// Refuses a join with `{"reason": …}`.
    fn from(e: ErrorReply) -> Self {
        JoinError::reason(&e.reason)
    }
}
