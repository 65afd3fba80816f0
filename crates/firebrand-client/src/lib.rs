//! A Rust client for Phoenix Channels servers (Phoenix 1.8, firebrand, or anything speaking the
//! same protocol), behaving as the official `phoenix` JavaScript client does, on tokio.
//!
//! # The model
//!
//! - A [`Socket`] is one WebSocket connection to `<endpoint>/websocket?<params>&vsn=2.0.0`,
//!   kept open in a background task: it sends a heartbeat every 30 s and, when the connection
//!   is lost (or a heartbeat goes unanswered for an interval), reconnects after
//!   [`reconnect_after`]`(tries)` (10 ms, 50 ms, … 5 s) spread by a ±50 % jitter.
//! - A [`Channel`] is one topic on the socket. [`Channel::join`] once; from then on the channel
//!   **rejoins by itself**: at once when the socket reconnects, after [`rejoin_after`]`(tries)`
//!   (1 s, 2 s, 5 s, then 10 s) when the server's channel crashed or refused the join. The join
//!   params may be a closure ([`Socket::channel_with`]), evaluated on every rejoin.
//! - [`Channel::push`] sends an event and resolves to the reply: the `ok` response, or a
//!   [`PushError`] (an `error` reply, a timeout — 10 s unless
//!   [`Channel::push_with_timeout`] says otherwise).
//!   Pushes made while the channel is (re)joining are buffered and sent after the join.
//! - [`Channel::events`] streams what the server sends on the topic (pushes, broadcasts) and what
//!   happens to the channel (joined, errored, closed), in order. Frames left over from an earlier
//!   join of the topic (another `join_ref`) are dropped, as phoenix.js's `isMember` does.
//! - **Recovery on rejoin**: on a topic whose broadcasts carry positions (a firebrand server's
//!   recoverable topics), the channel keeps the last position it saw and sends it as `since`
//!   on every rejoin, so the server replays what was missed; [`ChannelEvent::recovered`] on
//!   the `Joined` event says whether it could.
//! - [`Presence`] turns a channel's `presence_state` / `presence_diff` events into the presence
//!   list, with the results of phoenix.js's `Presence` class.
//!
//! Payloads are [`Payload`]s: JSON (build them from `serde_json::Value`, read them with
//! [`Payload::decode`]) or binary ([`Payload::binary`], sent as V2 binary frames).
//!
//! # Example
//!
//! ```no_run
//! use firebrand_client::{ChannelEvent, Payload, Presence, Socket};
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let socket = Socket::builder("ws://localhost:4000/socket")
//!     .param("user", "alice")
//!     .auth_token("secret")
//!     .connect()?;
//!
//! // Params are computed again on each rejoin.
//! let channel = socket.channel_with("room:lobby", || json!({"last_seen": 0}));
//! let mut events = channel.events(); // subscribe before joining to see everything
//! let reply: Payload = channel.join().await?;
//! println!("joined: {reply}");
//!
//! // A push and its reply (`ok` response, or PushError).
//! let pong = channel.push("ping", json!({"n": 1})).await?;
//! assert_eq!(pong.to_value(), Some(json!({"n": 1})));
//!
//! // Events: messages, and the channel's own state changes.
//! let mut presence = Presence::new();
//! while let Some(event) = events.recv().await {
//!     presence.handle(&event);
//!     match event {
//!         ChannelEvent::Message { event, payload } if event == "new_msg" => {
//!             #[derive(serde::Deserialize)]
//!             struct NewMsg { body: String }
//!             let msg: NewMsg = payload.decode()?;
//!             println!("{}; online: {:?}", msg.body, presence.list().map(|(k, _)| k).collect::<Vec<_>>());
//!         }
//!         ChannelEvent::Errored { reason } => println!("errored ({reason:?}), rejoining"),
//!         ChannelEvent::Joined { .. } => println!("(re)joined"),
//!         ChannelEvent::Closed => break,
//!         _ => {}
//!     }
//! }
//! channel.leave().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Typed channels: one contract for the server and the client
//!
//! A channel's events can be declared once, as Rust types, in a small crate that the server
//! and its Rust clients both depend on (it needs only `firebrand-protocol` and `serde`): a
//! [`Contract`](contract::Contract) names the join params and reply, the pushes a client may
//! send (each with its reply type) and the events the server sends. The server serves it with a
//! `firebrand::TypedChannel`; the client uses it with [`Socket::typed_channel`], which gives a
//! [`TypedChannel`]: the join reply, each push's reply and each event arrive as the contract's
//! types, a push the contract does not list does not compile, and a payload that does not have
//! its type's shape (a server that changed the contract) is a [`DecodeError`] naming the type
//! and the field.
//!
//! ```no_run
//! // ---- chat-contract/src/lib.rs: the shared crate ------------------------------------
//! mod chat_contract {
//!     use firebrand_protocol::contract::{Contract, Empty, Event, Push};
//!     use serde::{Deserialize, Serialize};
//!
//!     #[derive(Serialize, Deserialize)]
//!     pub struct Nick { pub nick: String }
//!
//!     /// The client says something…
//!     #[derive(Serialize, Deserialize)]
//!     pub struct NewMsg { pub body: String }
//!     impl Push for NewMsg { const EVENT: &'static str = "new_msg"; type Reply = Empty; }
//!
//!     /// …and everyone in the room hears it, with its author.
//!     #[derive(Serialize, Deserialize)]
//!     pub struct Message { pub nick: String, pub body: String }
//!     impl Event for Message { const EVENT: &'static str = "new_msg"; }
//!
//!     pub struct Room;
//!     impl Contract for Room {
//!         type JoinParams = Nick;
//!         type JoinReply = Empty;
//!         type Pushes = (NewMsg,);
//!         type Events = (Message,);
//!         type Meta = Empty;
//!     }
//! }
//!
//! // ---- the server (firebrand) -------------------------------------------------------
//! mod server {
//!     use super::chat_contract::{Message, NewMsg, Nick, Room};
//!     use firebrand::contract::{Empty, ErrorReply};
//!     use firebrand::{Handle, JoinContext, JoinError, Joined, TypedChannel, TypedContext};
//!
//!     pub struct RoomChannel { nick: String }
//!
//!     impl TypedChannel for RoomChannel {
//!         type Contract = Room;
//!         type Assigns = ();
//!         type State = ();
//!         type Info = ();
//!         async fn join(_: &str, p: Nick, _: &JoinContext<'_, ()>) -> Result<Joined<Self, Empty>, JoinError> {
//!             Ok(Joined::with_reply(RoomChannel { nick: p.nick }, Empty))
//!         }
//!     }
//!
//!     impl Handle<NewMsg> for RoomChannel {
//!         async fn handle(&mut self, m: NewMsg, ctx: &mut TypedContext<'_, Self>) -> Result<Empty, ErrorReply> {
//!             if m.body.is_empty() {
//!                 return Err(ErrorReply::new("empty message"));
//!             }
//!             ctx.broadcast(&Message { nick: self.nick.clone(), body: m.body });
//!             Ok(Empty)
//!         }
//!     }
//! }
//!
//! // ---- the client (firebrand-client) -----------------------------------------------
//! use chat_contract::{Message, NewMsg, Nick, Room};
//! use firebrand_client::{Socket, TypedPushError};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let socket = Socket::builder("ws://localhost:4000/socket").connect()?;
//! let room = socket.typed_channel::<Room>("room:lobby", &Nick { nick: "ada".into() });
//! let mut messages = room.on::<Message, _>(); // before joining, to miss nothing
//! room.join().await?;
//!
//! room.push(&NewMsg { body: "hello".into() }).await?;
//! match room.push(&NewMsg { body: String::new() }).await {
//!     Err(TypedPushError::Reply(e)) => assert_eq!(e.reason, "empty message"),
//!     other => panic!("{other:?}"),
//! }
//! while let Some(message) = messages.recv().await {
//!     let Message { nick, body } = message?; // Err: not a `Message` (names the field)
//!     println!("{nick}: {body}");
//! }
//! # Ok(())
//! # }
//! # fn main() {}
//! ```
//!
//! The untyped [`Channel`] stays underneath ([`TypedChannel::channel`]): rejoins, buffering
//! and recovery work as below, [`Presence`] and the channel's own events (joined, errored)
//! come from it, and so does anything the contract does not cover.
//!
//! # Differences from phoenix.js
//!
//! - Reconnect and rejoin delays get a jitter (±50 % by default; [`SocketBuilder::jitter`]`(0.0)`
//!   restores the exact schedule).
//! - [`Channel::join`] resolves to the first outcome, and a timeout bounds it even while the
//!   socket cannot connect. Pushes to a channel that was left fail with [`PushError::Closed`]
//!   instead of waiting for their timeout.
//! - Dropping every clone of a [`Channel`] leaves it.
//! - Only the V2 serializer (`vsn=2.0.0`) and the WebSocket transport; no long-poll fallback.
//!   `wss://` needs a TLS feature of `tokio-tungstenite` enabled in your build.
//! - permessage-deflate is opt-in ([`SocketBuilder::compress`]; browsers always offer it) and
//!   one-way: the client inflates what the server compresses and sends its own messages
//!   uncompressed. Over `ws://` only (see there why).
//!
//! # Queues
//!
//! Commands from handles to the socket task, and [`Events`] / [`SocketEvents`] streams, are
//! unbounded: a stream that is never read holds every event in memory; drop it when done.
mod backoff;
mod channel;
mod error;
mod inflate;
mod presence;
mod socket;
mod task;
mod typed;
mod wire;

/// Entry points for the fuzz targets (`fuzz/`): not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    /// A server's handshake answer that accepts permessage-deflate without context takeover.
    pub const ACCEPTED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n";

    /// What tungstenite reads when a server answers [`ACCEPTED`] and then sends `stream`,
    /// read `step` bytes at a time, messages inflated to at most `max` bytes: the bytes, or
    /// the error that ends the connection.
    pub fn inflate(stream: &[u8], step: usize, max: usize) -> Result<Vec<u8>, String> {
        crate::inflate::read_all(ACCEPTED, stream, step.max(1), max).map_err(|e| e.to_string())
    }
}

pub use backoff::{reconnect_after, rejoin_after};
pub use channel::{Channel, ChannelEvent, ErrorReason, Events, Join, Push};
pub use error::{ConnectError, JoinError, LeaveError, PushError};
pub use firebrand_protocol::{Payload, contract};
pub use presence::{Presence, PresenceDiff, PresenceEntry, PresenceState, sync_diff, sync_state};
pub use socket::{Socket, SocketBuilder, SocketEvent, SocketEvents};
pub use typed::{
    DecodeError, EncodeError, TypedChannel, TypedEvents, TypedJoin, TypedJoinError, TypedPush,
    TypedPushError,
};

/// The code in README.md, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
