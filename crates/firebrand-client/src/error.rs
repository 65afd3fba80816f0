//! One error enum per operation.

use std::fmt;

use firebrand_protocol::Payload;

/// Why [`Channel::join`](crate::Channel::join) failed.
///
/// After `Refused` and `Timeout` the channel keeps trying to join, with the rejoin backoff, as
/// the official client does; [`Channel::leave`](crate::Channel::leave) (or dropping every
/// handle of the channel) stops it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JoinError {
    /// The server answered the join with a non-`ok` status (e.g. `{"reason":"unauthorized"}`).
    Refused {
        /// The reply's status, usually `error`.
        status: String,
        /// The reply's `response`.
        response: Payload,
    },
    /// No reply within the join timeout (or the socket was not connected by then). The client
    /// has sent `phx_leave` for the attempt, like phoenix.js.
    Timeout,
    /// `join` was already called on this channel; a channel joins once and then rejoins by itself.
    AlreadyJoined,
    /// The channel was left or closed (or the socket dropped) before the join completed.
    Closed,
}

/// Why a [`Push`](crate::Push) got no `ok` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushError {
    /// The server replied with a status other than `ok` (the Elixir side's
    /// `{:reply, {:error, map}, socket}` gives `status == "error"`).
    Reply {
        /// The reply's status.
        status: String,
        /// The reply's `response`.
        response: Payload,
    },
    /// No reply within the push timeout, counted from the call to `push` (time spent buffered
    /// while the channel joins counts too). The push may still reach the server.
    Timeout,
    /// `push` was called before [`Channel::join`](crate::Channel::join).
    NotJoined,
    /// The channel was left or closed (or the socket dropped) before a reply came.
    Closed,
    /// A binary push whose topic, event or refs are longer than the V2 binary frame's 255 bytes.
    FieldTooLong {
        /// Which field: `topic`, `event`, `join_ref` or `ref`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
}

/// Why [`Channel::leave`](crate::Channel::leave) did not get its `ok` reply. The channel is
/// closed on the client either way.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaveError {
    /// No reply within the timeout; the channel is closed locally (as phoenix.js does).
    Timeout,
    /// The channel was already closed (left, closed by the server, or the socket dropped).
    Closed,
}

/// Why [`SocketBuilder::connect`](crate::SocketBuilder::connect) could not start a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectError {
    /// The endpoint URL (with its params) is not a valid `ws://` or `wss://` URL.
    InvalidUrl(String),
    /// The auth token cannot go in an HTTP header (it is sent base64-encoded, so this means the
    /// header as a whole was rejected).
    InvalidHeader(String),
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Refused { status, response } => {
                write!(f, "join refused with status {status:?}: {response}")
            }
            JoinError::Timeout => f.write_str("join timed out"),
            JoinError::AlreadyJoined => f.write_str("join was already called on this channel"),
            JoinError::Closed => f.write_str("channel closed before the join completed"),
        }
    }
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Reply { status, response } => {
                write!(f, "server replied with status {status:?}: {response}")
            }
            PushError::Timeout => f.write_str("push timed out"),
            PushError::NotJoined => f.write_str("push before join"),
            PushError::Closed => f.write_str("channel closed before a reply"),
            PushError::FieldTooLong { field, len } => {
                write!(f, "binary frame {field} is {len} bytes; at most 255")
            }
        }
    }
}

impl fmt::Display for LeaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaveError::Timeout => f.write_str("leave timed out; channel closed locally"),
            LeaveError::Closed => f.write_str("channel already closed"),
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::InvalidUrl(e) => write!(f, "invalid endpoint URL: {e}"),
            ConnectError::InvalidHeader(e) => write!(f, "invalid auth token header: {e}"),
        }
    }
}

impl std::error::Error for JoinError {}
impl std::error::Error for PushError {}
impl std::error::Error for LeaveError {}
impl std::error::Error for ConnectError {}
