//! The Phoenix Channels wire protocol, without a runtime.
//!
//! This crate knows frames and nothing else: the [`Message`] a client sends, the [`Outbound`]
//! frames a server sends, the [`Payload`] they carry, and the three wire formats the official
//! `phoenix` JavaScript client speaks, picked per connection by the `vsn` query parameter
//! ([`Serializer::from_vsn`]):
//!
//! - **V1 JSON** (`vsn=1.0.0` or none): `{"topic","event","payload","ref"}` objects.
//! - **V2 JSON** (`vsn=2.0.0`): `[join_ref, ref, topic, event, payload]` arrays as text.
//! - **V2 binary** (`vsn=2.0.0`, binary payloads): length-prefixed frames, fields of at most
//!   255 bytes.
//!
//! Decoding never copies a payload: it is a slice of the frame's buffer. Encoding writes one
//! frame into one buffer, so a broadcast is encoded once per serializer and shared.
//!
//! ```
//! use bytes::Bytes;
//! use firebrand_protocol::{Encoded, Outbound, Payload, Serializer};
//!
//! let ser = Serializer::from_vsn(Some("2.0.0")).unwrap();
//! let msg = ser
//!     .decode_text(Bytes::from_static(br#"["1","2","room:lobby","ping",{"n":1}]"#))
//!     .unwrap();
//! let reply = Outbound::Reply {
//!     join_ref: msg.join_ref.as_deref(),
//!     r#ref: msg.r#ref.as_deref(),
//!     topic: &msg.topic,
//!     status: "ok",
//!     payload: &msg.payload,
//! };
//! assert_eq!(
//!     ser.encode(&reply).unwrap(),
//!     Encoded::Text(r#"["1","2","room:lobby","phx_reply",{"response":{"n":1},"status":"ok"}]"#.into()),
//! );
//! ```

pub mod contract;
mod message;
mod payload;
mod serializer;

pub use message::{Message, Outbound, ServerMessage, is_protocol_event};
pub use payload::{DecodeError, Payload, RawJson};
pub use serializer::{EncodeError, Encoded, FrameError, Serializer, UnsupportedVsn};

/// The code in README.md, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
