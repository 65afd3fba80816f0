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
//!
//! # Queues
//!
//! Commands from handles to the socket task, and [`Events`] / [`SocketEvents`] streams, are
//! unbounded: a stream that is never read holds every event in memory; drop it when done.
mod backoff;
mod channel;
mod error;
mod presence;
mod socket;
mod task;
mod wire;

pub use backoff::{reconnect_after, rejoin_after};
pub use channel::{Channel, ChannelEvent, ErrorReason, Events, Join, Push};
pub use error::{ConnectError, JoinError, LeaveError, PushError};
pub use firebrand_protocol::Payload;
pub use presence::{Presence, PresenceDiff, PresenceEntry, PresenceState, sync_diff, sync_state};
pub use socket::{Socket, SocketBuilder, SocketEvent, SocketEvents};
