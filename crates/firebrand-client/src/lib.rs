//! TODO
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
