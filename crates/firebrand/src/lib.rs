//! # firebrand: Phoenix Channels for Rust
//!
//! firebrand serves [Phoenix Channels](https://hexdocs.pm/phoenix/channels.html) from an axum
//! app, wire-compatible with the official `phoenix` JavaScript client (and any Phoenix client):
//! persistent WebSocket connections, topics joined as channels, replies, pushes and broadcasts.
//!
//! ## The pieces
//!
//! - A **socket** is one client connection. Your [`Socket`] authenticates it in
//!   [`connect`](Socket::connect) (from query params, headers or the client's `authToken`)
//!   and returns its assigns — typed state every channel of the connection can read.
//! - A client **joins** topics like `room:lobby`. Each joined topic is a **channel**, running in
//!   its own task. Its **contract** ([`contract`]) says, as Rust types, what a client may push
//!   (and the replies), what the server sends, what a join carries and what presence records;
//!   a [`TypedChannel`] serves it, with one [`Handle`] implementation per push. The same
//!   contract types serve `firebrand-client` and, generated, the TypeScript of your page.
//! - [`join`](TypedChannel::join) is the bouncer; [`handle_out`](TypedChannel::handle_out)
//!   filters intercepted broadcasts per subscriber; [`handle_info`](TypedChannel::handle_info)
//!   receives messages; [`terminate`](TypedChannel::terminate) runs at the end.
//! - The [`Endpoint`] is the handle to it all: broadcast to a topic from anywhere, disconnect a
//!   user, read [`Stats`], shut down. App state (a database pool, a config) is given to the
//!   socket with [`Endpoint::socket_with_state`] and read by each channel as the part it names
//!   ([`FromRef`], as in axum).
//! - For what no contract can say (a generic gateway, event names made at run time), a
//!   [`Channel`] takes events as strings and payloads as [`Payload`]s; every typed channel is
//!   one underneath.
//!
//! ## A complete server
//!
//! ```no_run
//! use firebrand::contract::{Contract, Empty, ErrorReply, Event, Push};
//! use firebrand::{
//!     ConnectError, ConnectInfo, Endpoint, Handle, JoinContext, JoinError, Joined, Socket,
//!     TypedChannel, TypedContext,
//! };
//! use serde::{Deserialize, Serialize};
//!
//! // The contract: in a crate of its own, shared with a Rust client; with ts-rs derives, the
//! // page's TypeScript is generated from it (`contract::typescript`, feature `typescript`).
//!
//! /// A client sends a message (and gets `{}` back)…
//! #[derive(Serialize, Deserialize)]
//! pub struct NewMsg { pub body: String }
//! impl Push for NewMsg {
//!     const EVENT: &'static str = "new_msg";
//!     type Reply = Empty;
//! }
//!
//! /// …and everyone in the room gets it with its author.
//! #[derive(Serialize, Deserialize)]
//! pub struct Message { pub user: Option<String>, pub body: String }
//! impl Event for Message {
//!     const EVENT: &'static str = "new_msg";
//! }
//!
//! pub struct RoomContract;
//! impl Contract for RoomContract {
//!     type JoinParams = Empty;
//!     type JoinReply = Empty;
//!     type Pushes = (NewMsg,);
//!     type Events = (Message,);
//!     type Meta = Empty;
//! }
//!
//! /// Accepts everyone; the assigns are the `user` connect param.
//! struct UserSocket;
//!
//! impl Socket for UserSocket {
//!     type Assigns = Option<String>;
//!
//!     async fn connect(&self, info: &ConnectInfo) -> Result<Self::Assigns, ConnectError> {
//!         Ok(info.param("user").map(str::to_owned))
//!     }
//! }
//!
//! /// One chat room per topic `room:<name>`.
//! struct Room;
//!
//! impl TypedChannel for Room {
//!     type Contract = RoomContract;
//!     type Assigns = Option<String>;
//!     type State = ();
//!     type Info = ();
//!
//!     async fn join(topic: &str, _: Empty, _: &JoinContext<'_, Option<String>>) -> Result<Joined<Self, Empty>, JoinError> {
//!         match topic {
//!             "room:private" => Err(JoinError::reason("unauthorized")),
//!             _ => Ok(Joined::with_reply(Room, Empty)),
//!         }
//!     }
//! }
//!
//! impl Handle<NewMsg> for Room {
//!     // A payload of the wrong shape never gets here: the client gets an error reply naming
//!     // the field. An event the contract does not list gets `unknown event`.
//!     async fn handle(&mut self, msg: NewMsg, ctx: &mut TypedContext<'_, Self>) -> Result<Empty, ErrorReply> {
//!         if msg.body.is_empty() {
//!             return Err(ErrorReply::new("empty message"));
//!         }
//!         // Only events of the contract compile here; encoded once for every subscriber.
//!         ctx.broadcast(&Message { user: ctx.assigns().clone(), body: msg.body });
//!         Ok(Empty)
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() {
//!     let endpoint = Endpoint::new();
//!     let socket = endpoint.socket(UserSocket).channel::<Room>("room:*").into_router();
//!     let app = axum::Router::new().nest("/socket", socket);
//!     // Like axum::serve, with a handshake deadline and a listen backlog for reconnect storms.
//!     let server = firebrand::Server::bind("127.0.0.1:4000").await.unwrap();
//!     server.serve(app, std::future::pending()).await.unwrap();
//! }
//! ```
//!
//! And in the browser, the official client (typed by the generated TypeScript, or as is):
//!
//! ```js
//! import {Socket} from "phoenix"
//! const socket = new Socket("/socket", {params: {user: "alice"}})
//! socket.connect()
//! const room = socket.channel("room:lobby")
//! room.on("new_msg", msg => console.log(msg.user, msg.body))
//! room.join().receive("ok", () => room.push("new_msg", {body: "hi"}))
//! ```
//!
//! ## The untyped API
//!
//! The same room as a [`Channel`]: events are strings, payloads decoded where handled.
//!
//! ```
//! use firebrand::{Channel, ChannelContext, HandleResult, JoinContext, JoinError, Joined, Payload, Reply};
//! # #[derive(serde::Deserialize)] struct NewMsg { body: String }
//!
//! struct Room;
//!
//! impl Channel for Room {
//!     type Assigns = Option<String>;
//!     type State = ();
//!     type Info = ();
//!
//!     async fn join(_: &str, _: Payload, _: &JoinContext<'_, Option<String>>) -> Result<Joined<Self>, JoinError> {
//!         Ok(Joined::new(Room))
//!     }
//!
//!     async fn handle_in(&mut self, event: &str, payload: Payload, ctx: &mut ChannelContext<Self>) -> HandleResult {
//!         match event {
//!             "new_msg" => {
//!                 let msg: NewMsg = payload.decode()?; // a wrong shape: an error reply
//!                 let user = ctx.assigns().clone();
//!                 ctx.broadcast("new_msg", serde_json::json!({"body": msg.body, "user": user}));
//!                 Ok(Some(Reply::ok(serde_json::json!({}))))
//!             }
//!             _ => Ok(None),
//!         }
//!     }
//! }
//! ```
//!
//! ## Semantics worth knowing
//!
//! - **Wire compatibility.** Frames, refs, `phx_reply`/`phx_close`/`phx_error`, duplicate
//!   joins, stale `join_ref`s and heartbeats behave as in Phoenix 1.8. Serializers are picked by
//!   the `vsn` param: V1 JSON, V2 JSON and V2 binary (binary payloads: [`Payload::Binary`]).
//! - **Isolation.** A panic in a channel callback ends only that channel (`phx_error`, and the
//!   official client rejoins). A slow callback delays only its own channel: joins run in the
//!   channel's task, so unlike Phoenix a slow `join` does not block the connection's other
//!   traffic.
//! - **Broadcasts** are encoded once per serializer and the same bytes queued to every
//!   subscriber; only [intercepted](Channel::INTERCEPTS) events pass through channel tasks.
//! - **Recovery on rejoin.** Topics made recoverable with
//!   [`EndpointBuilder::history`] keep their last broadcasts, each with a position in the
//!   frame's `ref` slot; a client that rejoins with `{"since": P}` gets what it missed, in
//!   order and once, and the reply says whether it was `recovered`. In a cluster the history
//!   lives in the engine (Redis streams, NATS JetStream), so a client recovers on any node.
//!   All the topics' histories of a node share a byte budget
//!   ([`EndpointBuilder::history_budget`]), the oldest entries evicted first.
//! - **Server-side subscribers.** [`Endpoint::subscribe`] gives Rust code outside any channel
//!   a topic's broadcasts from every node (a job that persists messages, a webhook sender),
//!   bounded: a reader that falls behind loses the oldest and is told ([`Lagged`]).
//! - **Bounded memory.** Each connection's outbound queue is bounded in bytes; a client that
//!   cannot keep up is disconnected with code 1008 (see [`SocketBuilder::outbound_limit`]),
//!   a long-poll session that stops polling is ended the same way, and long-poll POST bodies
//!   are bounded ([`SocketBuilder::max_longpoll_body`]).
//!   Each channel's mailbox is bounded in messages ([`SocketBuilder::mailbox_limit`]).
//! - **Bad input** closes only the offending connection, with a close code naming the
//!   problem: 1007 undecodable frame, 1009 frame too big, 1002 WebSocket protocol error.

// Entry points for the benches and fuzz targets, not API: hidden, and free to change in any
// release.
#[doc(hidden)]
pub mod autobahn;
#[doc(hidden)]
pub mod benching;
pub mod cluster;
mod deflate;
mod endpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
#[cfg(feature = "metrics")]
pub mod metrics;
mod model;
mod node;
mod token;
mod transport;

pub use axum::extract::FromRef;
pub use endpoint::{Endpoint, EndpointBuilder, HistoryPage, Stats};
#[doc(inline)]
pub use firebrand_protocol::contract;
#[doc(inline)]
pub use firebrand_protocol::{DecodeError, Payload, RawJson, is_protocol_event};
pub use model::channel::{Channel, HandleResult, Info, JoinError, Joined, Reply, StopReason};
pub use model::context::{ChannelContext, ChannelSender, JoinContext, ReplyRef, SendError};
pub use model::socket::{ConnectError, ConnectInfo, Socket};
pub use model::typed::{Handle, JoinParams, JoinReply, TypedChannel, TypedContext};
pub use node::presence;
pub use node::presence::PresenceError;
pub use node::pubsub::{Broadcast, BroadcastError};
pub use node::subscription::{Lagged, Subscription};
pub use token::{TokenError, TokenSigner};
pub use transport::http::SocketBuilder;
pub use transport::origin::CheckOrigin;
pub use transport::server::{LISTEN_BACKLOG, Server};
#[cfg(feature = "testing")]
pub use transport::testing;

/// The code in README.md, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
