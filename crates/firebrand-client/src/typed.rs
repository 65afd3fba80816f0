//! Typed channels: a [`Contract`] shared with the server, over the untyped [`Channel`].
//!
//! A [`TypedChannel`] is a [`Channel`] seen through a contract: the join params are encoded
//! from the contract's type and its reply decoded into the contract's reply type, a push is
//! one of the contract's [`Push`] types (checked by the compiler) answered with its `Reply`
//! type, and [`TypedChannel::on`] receives one of the contract's [`Event`] types. Everything
//! else (rejoins, buffering, recovery, presence) is the untyped channel's, unchanged.

use std::any::type_name;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use firebrand_protocol::Payload;
use firebrand_protocol::contract::{Contract, ErrorReply, Event, Includes, Push};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::channel::{self, Channel, ChannelEvent, Events};
use crate::error::{JoinError, LeaveError, PushError};

/// A channel on a topic of contract `C`: see [`Socket::typed_channel`](crate::Socket::typed_channel).
/// Cheap to clone; every clone is the same channel.
///
/// It is the untyped [`Channel`] underneath ([`TypedChannel::channel`]): it rejoins by itself,
/// buffers pushes made while joining, sends the last position it saw on a recoverable topic,
/// and leaves when every clone (of either) is dropped.
pub struct TypedChannel<C: Contract> {
    channel: Channel,
    /// Join params that could not be encoded: [`TypedChannel::join`] answers with this.
    params: Option<EncodeError>,
    contract: PhantomData<fn() -> C>,
}

impl<C: Contract> Clone for TypedChannel<C> {
    fn clone(&self) -> Self {
        TypedChannel {
            channel: self.channel.clone(),
            params: self.params.clone(),
            contract: PhantomData,
        }
    }
}

impl<C: Contract> fmt::Debug for TypedChannel<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedChannel")
            .field("contract", &type_name::<C>())
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

/// `value` as a JSON payload, or why it cannot be one.
fn encode<T: Serialize>(value: &T) -> Result<Payload, EncodeError> {
    Payload::json(value).map_err(|e| EncodeError {
        type_name: type_name::<T>(),
        reason: e.to_string(),
    })
}

/// `payload` decoded into `T`, or why it does not decode (with the payload).
fn decode<T: DeserializeOwned>(payload: Payload) -> Result<T, DecodeError> {
    payload.decode().map_err(|e| DecodeError {
        type_name: type_name::<T>(),
        reason: match e {
            firebrand_protocol::DecodeError::Json {
                path: Some(path),
                error,
            } => format!("{path}: {error}"),
            firebrand_protocol::DecodeError::Json { path: None, error } => error.to_string(),
            other => other.to_string(),
        },
        payload,
    })
}

/// How a non-`ok` reply reads under a contract: `error` with an [`ErrorReply`], another status
/// (outside the contract), or an `error` response that is not an [`ErrorReply`].
enum Refusal {
    Error(ErrorReply),
    Status { status: String, response: Payload },
    Decode(DecodeError),
}

fn refusal(status: String, response: Payload) -> Refusal {
    if status != "error" {
        return Refusal::Status { status, response };
    }
    match decode(response) {
        Ok(reply) => Refusal::Error(reply),
        Err(e) => Refusal::Decode(e),
    }
}

impl<C: Contract> TypedChannel<C> {
    pub(crate) fn new(channel: Channel, params: Option<EncodeError>) -> Self {
        TypedChannel {
            channel,
            params,
            contract: PhantomData,
        }
    }

    /// `C::JoinParams` as the untyped join params, or why they cannot be encoded.
    pub(crate) fn encode_params(params: &C::JoinParams) -> Result<Payload, EncodeError> {
        encode(params)
    }

    /// The topic, e.g. `room:lobby`.
    pub fn topic(&self) -> &str {
        self.channel.topic()
    }

    /// The untyped channel underneath: for [`Presence`](crate::Presence), the channel's own
    /// events (joined, errored, closed) and pushes the contract does not cover.
    ///
    /// ```no_run
    /// # use firebrand_client::{Presence, Socket, contract::{Contract, Empty}};
    /// # struct Room;
    /// # impl Contract for Room { type JoinParams = Empty; type JoinReply = Empty; type Pushes = (); type Events = (); type Meta = Empty; }
    /// # async fn run(socket: Socket) {
    /// let room = socket.typed_channel::<Room>("room:lobby", &Empty);
    /// let mut events = room.channel().events();
    /// room.join().await.unwrap();
    /// let mut presence = Presence::new();
    /// while let Some(event) = events.recv().await {
    ///     presence.handle(&event);
    /// }
    /// # }
    /// ```
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Joins the channel (once): resolves to the contract's join reply, or to why not. Like
    /// [`Channel::join`], the channel keeps rejoining by itself whatever this returns, until
    /// left; rejoins send the same params (with `since` added on a recoverable topic).
    ///
    /// A reply that does not decode into `C::JoinReply` gives [`TypedJoinError::Decode`]:
    /// the server has joined the channel nonetheless.
    pub fn join(&self) -> TypedJoin<C> {
        TypedJoin {
            join: self.channel.join(),
            params: self.params.clone(),
            contract: PhantomData,
        }
    }

    /// Pushes `push`, one of the contract's pushes, with the socket's timeout: `.await` it for
    /// the push's `Reply` type or a [`TypedPushError`]. Like [`Channel::push`], the push is
    /// queued when this is called (buffered while the channel joins) and dropping the returned
    /// [`TypedPush`] ignores the reply without cancelling the push.
    ///
    /// ```no_run
    /// # use firebrand_client::{Socket, contract::{Contract, Empty, Push}};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Add { a: i64, b: i64 }
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Sum { sum: i64 }
    /// impl Push for Add { const EVENT: &'static str = "add"; type Reply = Sum; }
    ///
    /// struct Calc;
    /// impl Contract for Calc {
    ///     type JoinParams = Empty;
    ///     type JoinReply = Empty;
    ///     type Pushes = (Add,);
    ///     type Events = ();
    ///     type Meta = Empty;
    /// }
    /// # async fn run(socket: Socket) -> Result<(), Box<dyn std::error::Error>> {
    /// let calc = socket.typed_channel::<Calc>("calc:1", &Empty);
    /// calc.join().await?;
    /// let Sum { sum } = calc.push(&Add { a: 2, b: 40 }).await?;
    /// assert_eq!(sum, 42);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// A push the contract does not list does not compile (``"`Mul` is not listed in this
    /// contract"``; for a contract of one push, the compiler says ``"expected `&Add`"``):
    ///
    /// ```compile_fail,E0277
    /// # use firebrand_client::{Socket, contract::{Contract, Empty, Push}};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Add { a: i64, b: i64 }
    /// # impl Push for Add { const EVENT: &'static str = "add"; type Reply = Empty; }
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Sub { a: i64, b: i64 }
    /// # impl Push for Sub { const EVENT: &'static str = "sub"; type Reply = Empty; }
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Mul { a: i64, b: i64 }
    /// impl Push for Mul { const EVENT: &'static str = "mul"; type Reply = Empty; }
    ///
    /// struct Calc;
    /// impl Contract for Calc {
    ///     type JoinParams = Empty;
    ///     type JoinReply = Empty;
    ///     type Pushes = (Add, Sub); // no `Mul`
    ///     type Events = ();
    ///     type Meta = Empty;
    /// }
    /// # async fn run(socket: Socket) {
    /// let calc = socket.typed_channel::<Calc>("calc:1", &Empty);
    /// let _ = calc.push(&Add { a: 6, b: 7 }); // listed: fine
    /// let _ = calc.push(&Mul { a: 6, b: 7 }); // error: `Mul` is not listed in this contract
    /// # }
    /// ```
    pub fn push<P: Push, I>(&self, push: &P) -> TypedPush<P::Reply>
    where
        C::Pushes: Includes<P, I>,
    {
        self.push_with_timeout(push, self.channel.timeout())
    }

    /// [`push`](TypedChannel::push) with its own timeout, counted from this call (time spent
    /// buffered while the channel joins counts too).
    pub fn push_with_timeout<P: Push, I>(&self, push: &P, timeout: Duration) -> TypedPush<P::Reply>
    where
        C::Pushes: Includes<P, I>,
    {
        let push =
            encode(push).map(|payload| self.channel.push_with_timeout(P::EVENT, payload, timeout));
        TypedPush {
            push,
            reply: PhantomData,
        }
    }

    /// A new stream of the server's events named `E::EVENT` from now on, decoded into `E` (one
    /// of the contract's events). Call it before [`join`](TypedChannel::join) to see
    /// everything. Other events are skipped; the stream ends when the channel closes.
    ///
    /// ```no_run
    /// # use firebrand_client::{Socket, contract::{Contract, Empty, Event}};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Message { user: String, body: String }
    /// impl Event for Message { const EVENT: &'static str = "new_msg"; }
    ///
    /// struct Room;
    /// impl Contract for Room {
    ///     type JoinParams = Empty;
    ///     type JoinReply = Empty;
    ///     type Pushes = ();
    ///     type Events = (Message,);
    ///     type Meta = Empty;
    /// }
    /// # async fn run(socket: Socket) {
    /// let room = socket.typed_channel::<Room>("room:lobby", &Empty);
    /// let mut messages = room.on::<Message, _>();
    /// room.join().await.unwrap();
    /// while let Some(message) = messages.recv().await {
    ///     match message {
    ///         Ok(Message { user, body }) => println!("{user}: {body}"),
    ///         Err(e) => eprintln!("{e}"), // a payload that is not a `Message`
    ///     }
    /// }
    /// # }
    /// ```
    pub fn on<E: Event, I>(&self) -> TypedEvents<E>
    where
        C::Events: Includes<E, I>,
    {
        TypedEvents {
            events: self.channel.events(),
            event: PhantomData,
        }
    }

    /// Leaves the channel: see [`Channel::leave`].
    pub async fn leave(&self) -> Result<(), LeaveError> {
        self.channel.leave().await
    }
}

/// The events named `E::EVENT` of a typed channel, decoded: see [`TypedChannel::on`].
///
/// Like [`Events`], the queue is unbounded, and holds the channel's other events too until
/// [`recv`](TypedEvents::recv) skips them: keep reading, or drop it.
pub struct TypedEvents<E: Event> {
    events: Events,
    event: PhantomData<fn() -> E>,
}

impl<E: Event> fmt::Debug for TypedEvents<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedEvents")
            .field("event", &E::EVENT)
            .finish_non_exhaustive()
    }
}

impl<E: Event> TypedEvents<E> {
    /// The next event named `E::EVENT`: `Ok` decoded, or `Err` with the payload that does not
    /// decode into `E` (the stream goes on after it). `None` once the channel is closed (or the
    /// socket is gone).
    ///
    /// Cancel-safe: use it in `select!` without losing events.
    pub async fn recv(&mut self) -> Option<Result<E, DecodeError>> {
        loop {
            if let Some(event) = Self::pick(self.events.recv().await?) {
                return Some(event);
            }
        }
    }

    /// The next event named `E::EVENT` if one is queued now.
    pub fn try_recv(&mut self) -> Option<Result<E, DecodeError>> {
        loop {
            if let Some(event) = Self::pick(self.events.try_recv()?) {
                return Some(event);
            }
        }
    }

    fn pick(event: ChannelEvent) -> Option<Result<E, DecodeError>> {
        match event {
            ChannelEvent::Message { event, payload } if event == E::EVENT => Some(decode(payload)),
            _ => None,
        }
    }
}

/// A typed join in progress: `.await` it, optionally after setting [`TypedJoin::timeout`].
#[must_use = "a join does nothing until awaited"]
pub struct TypedJoin<C: Contract> {
    join: channel::Join,
    params: Option<EncodeError>,
    contract: PhantomData<fn() -> C>,
}

impl<C: Contract> fmt::Debug for TypedJoin<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedJoin")
            .field("join", &self.join)
            .finish_non_exhaustive()
    }
}

impl<C: Contract> TypedJoin<C> {
    /// The timeout of this join and of every later rejoin of the channel (see
    /// [`Join::timeout`](crate::Join::timeout)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.join = self.join.timeout(timeout);
        self
    }
}

impl<C: Contract> IntoFuture for TypedJoin<C> {
    type Output = Result<C::JoinReply, TypedJoinError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let (join, params) = (self.join, self.params);
        Box::pin(async move {
            if let Some(e) = params {
                return Err(TypedJoinError::Encode(e));
            }
            match join.await {
                Ok(reply) => decode(reply).map_err(TypedJoinError::Decode),
                Err(JoinError::Refused { status, response }) => {
                    Err(match refusal(status, response) {
                        Refusal::Error(e) => TypedJoinError::Refused(e),
                        Refusal::Status { status, response } => {
                            TypedJoinError::Status { status, response }
                        }
                        Refusal::Decode(e) => TypedJoinError::Decode(e),
                    })
                }
                Err(JoinError::Timeout) => Err(TypedJoinError::Timeout),
                Err(JoinError::AlreadyJoined) => Err(TypedJoinError::AlreadyJoined),
                Err(JoinError::Closed) => Err(TypedJoinError::Closed),
            }
        })
    }
}

/// A typed push's reply: `.await` it for the push's `Reply` type or a [`TypedPushError`].
pub struct TypedPush<R> {
    push: Result<channel::Push, EncodeError>,
    reply: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for TypedPush<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedPush")
            .field("push", &self.push)
            .field("reply", &type_name::<R>())
            .finish()
    }
}

impl<R: DeserializeOwned + Send + 'static> IntoFuture for TypedPush<R> {
    type Output = Result<R, TypedPushError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            match self.push.map_err(TypedPushError::Encode)?.await {
                Ok(reply) => decode(reply).map_err(TypedPushError::Decode),
                Err(PushError::Reply { status, response }) => {
                    Err(match refusal(status, response) {
                        Refusal::Error(e) => TypedPushError::Reply(e),
                        Refusal::Status { status, response } => {
                            TypedPushError::Status { status, response }
                        }
                        Refusal::Decode(e) => TypedPushError::Decode(e),
                    })
                }
                Err(PushError::Timeout) => Err(TypedPushError::Timeout),
                Err(PushError::NotJoined) => Err(TypedPushError::NotJoined),
                Err(PushError::Closed) => Err(TypedPushError::Closed),
                Err(PushError::FieldTooLong { .. }) => {
                    unreachable!("only binary pushes have field limits; a typed push is JSON")
                }
            }
        })
    }
}

/// A payload that does not decode into the type the contract gives it: a reply, an error reply
/// or an event from a server that does not keep the contract (another version of it, or an
/// untyped channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    type_name: &'static str,
    reason: String,
    payload: Payload,
}

impl DecodeError {
    /// The type the payload should have decoded into, e.g. `my_contract::Sum`.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// Why it did not, in serde's words (naming the field), e.g. ``missing field `sum` at line 1
    /// column 9``.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The payload as it came.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "payload does not decode into `{}`: {}",
            self.type_name, self.reason
        )
    }
}

/// A value that serde cannot write as JSON (a map with non-string keys, a failing
/// `Serialize`): nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError {
    type_name: &'static str,
    reason: String,
}

impl EncodeError {
    /// The type of the value, e.g. `my_contract::NewMsg`.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// Why, in serde's words.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` cannot be encoded as JSON: {}",
            self.type_name, self.reason
        )
    }
}

/// Why a [`TypedJoin`] did not give the contract's join reply.
///
/// After `Refused`, `Status` and `Timeout` the channel keeps trying to join, as
/// [`JoinError`] says; after `Decode` it is joined.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TypedJoinError {
    /// The server refused the join (status `error`) with `{"reason": …}`.
    Refused(ErrorReply),
    /// The server refused the join with a status other than `error` (outside any contract):
    /// the reply as it came.
    Status {
        /// The reply's status.
        status: String,
        /// The reply's response.
        response: Payload,
    },
    /// The join reply does not decode into the contract's `JoinReply` (the channel is joined),
    /// or a refusal is not an [`ErrorReply`].
    Decode(DecodeError),
    /// The join params cannot be encoded as JSON; the join was not sent.
    Encode(EncodeError),
    /// No reply within the join timeout: [`JoinError::Timeout`].
    Timeout,
    /// `join` was already called on this channel: [`JoinError::AlreadyJoined`].
    AlreadyJoined,
    /// The channel was left or closed before the join completed: [`JoinError::Closed`].
    Closed,
}

/// Why a [`TypedPush`] did not give the push's `Reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TypedPushError {
    /// The server answered `error` with `{"reason": …}` (a typed server's handler returned
    /// `Err(ErrorReply)`, or the push did not decode there).
    Reply(ErrorReply),
    /// The server answered with a status other than `ok` or `error` (outside any contract):
    /// the reply as it came.
    Status {
        /// The reply's status.
        status: String,
        /// The reply's response.
        response: Payload,
    },
    /// The `ok` reply does not decode into the push's `Reply` type, or an `error` reply is not
    /// an [`ErrorReply`].
    Decode(DecodeError),
    /// The push cannot be encoded as JSON; it was not sent.
    Encode(EncodeError),
    /// No reply within the push timeout: [`PushError::Timeout`]. The push may still reach the
    /// server.
    Timeout,
    /// `push` was called before `join`: [`PushError::NotJoined`].
    NotJoined,
    /// The channel was left or closed before a reply came: [`PushError::Closed`].
    Closed,
}

impl fmt::Display for TypedJoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypedJoinError::Refused(e) => write!(f, "join refused: {}", e.reason),
            TypedJoinError::Status { status, response } => {
                write!(f, "join refused with status {status:?}: {response}")
            }
            TypedJoinError::Decode(e) => write!(f, "join reply: {e}"),
            TypedJoinError::Encode(e) => write!(f, "join params: {e}"),
            TypedJoinError::Timeout => JoinError::Timeout.fmt(f),
            TypedJoinError::AlreadyJoined => JoinError::AlreadyJoined.fmt(f),
            TypedJoinError::Closed => JoinError::Closed.fmt(f),
        }
    }
}

impl fmt::Display for TypedPushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypedPushError::Reply(e) => write!(f, "server replied with an error: {}", e.reason),
            TypedPushError::Status { status, response } => {
                write!(f, "server replied with status {status:?}: {response}")
            }
            TypedPushError::Decode(e) => write!(f, "reply: {e}"),
            TypedPushError::Encode(e) => write!(f, "push: {e}"),
            TypedPushError::Timeout => PushError::Timeout.fmt(f),
            TypedPushError::NotJoined => PushError::NotJoined.fmt(f),
            TypedPushError::Closed => PushError::Closed.fmt(f),
        }
    }
}

impl std::error::Error for DecodeError {}
impl std::error::Error for EncodeError {}

impl std::error::Error for TypedJoinError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TypedJoinError::Decode(e) => Some(e),
            TypedJoinError::Encode(e) => Some(e),
            _ => None,
        }
    }
}

impl std::error::Error for TypedPushError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TypedPushError::Decode(e) => Some(e),
            TypedPushError::Encode(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Sum {
        sum: i64,
    }

    #[test]
    fn a_payload_that_does_not_decode_names_its_type_and_field() {
        let payload = Payload::from(json!({"total": 3}));
        let e = decode::<Sum>(payload.clone()).unwrap_err();
        assert!(e.type_name().ends_with("Sum"), "{}", e.type_name());
        assert!(e.reason().contains("missing field `sum`"), "{}", e.reason());
        assert_eq!(e.payload(), &payload);
        assert!(e.to_string().contains("Sum`: missing field `sum`"), "{e}");

        let e = decode::<Sum>(Payload::binary(vec![1])).unwrap_err();
        assert_eq!(e.reason(), "invalid payload: expected JSON, got binary");
    }

    #[test]
    fn refusals_read_as_error_replies_other_statuses_or_mismatches() {
        let r = refusal("error".into(), json!({"reason": "no"}).into());
        assert!(matches!(r, Refusal::Error(e) if e.reason == "no"));
        let r = refusal("shutdown".into(), json!({"reason": "no"}).into());
        assert!(matches!(r, Refusal::Status { status, .. } if status == "shutdown"));
        let r = refusal("error".into(), json!({"why": "no"}).into());
        assert!(matches!(r, Refusal::Decode(e) if e.reason().contains("missing field `reason`")));
    }

    #[test]
    fn a_map_with_non_string_keys_does_not_encode() {
        let map = std::collections::HashMap::from([((1, 2), 3)]);
        let e = encode(&map).unwrap_err();
        assert!(e.type_name().contains("HashMap"), "{e}");
        assert!(e.to_string().contains("cannot be encoded as JSON"), "{e}");
    }

    #[test]
    fn handles_and_errors_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        struct Room;
        impl Contract for Room {
            type JoinParams = firebrand_protocol::contract::Empty;
            type JoinReply = firebrand_protocol::contract::Empty;
            type Pushes = ();
            type Events = ();
            type Meta = firebrand_protocol::contract::Empty;
        }
        send_sync::<TypedChannel<Room>>();
        send_sync::<TypedJoinError>();
        send_sync::<TypedPushError>();
        fn send<T: Send>() {}
        send::<TypedJoin<Room>>();
        send::<TypedPush<Sum>>();
    }
}
