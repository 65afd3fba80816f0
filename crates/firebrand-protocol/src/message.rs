//! Messages: what a client sends, and what a server sends back.

use crate::payload::Payload;

/// Whether `event` is one the official client handles itself rather than handing to the app:
/// the protocol's own (`phx_reply`, `phx_close`, `phx_error`, `phx_join`, `phx_leave`, …) and
/// the internal event phoenix.js resolves a pending push with (`chan_reply_<ref>`: whoever
/// sends it on a channel answers that channel's push `<ref>`).
///
/// A server never sends such an event as a push or broadcast of the app's; firebrand refuses
/// to (see `firebrand::Endpoint::broadcast`). An app that relays a client's event name to other
/// clients relays it safely because of that rule.
///
/// ```
/// use firebrand_protocol::is_protocol_event;
///
/// assert!(is_protocol_event("chan_reply_7"));
/// assert!(is_protocol_event("phx_close"));
/// assert!(!is_protocol_event("new_msg"));
/// assert!(!is_protocol_event("presence_diff")); // the app's (Presence), not the protocol's
/// ```
pub fn is_protocol_event(event: &str) -> bool {
    event.starts_with("phx_") || event.starts_with("chan_reply_")
}

/// A message decoded from a client frame.
///
/// Refs are opaque strings that the server echoes; the official client counts `"1"`, `"2"`, ….
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The `join_ref` of the channel the client thinks it is talking to (`None` = any).
    pub join_ref: Option<String>,
    /// The message ref, echoed in its reply (`None` = the client expects no reply).
    pub r#ref: Option<String>,
    /// The topic, e.g. `room:lobby`; `phoenix` for heartbeats.
    pub topic: String,
    /// The event, e.g. `phx_join`, `heartbeat`, or an application event.
    pub event: String,
    /// The payload: any JSON value, or binary data.
    pub payload: Payload,
}

/// A frame received from a server, as a client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerMessage {
    /// A push, broadcast, `phx_close` or `phx_error`.
    Event(Message),
    /// A `phx_reply`.
    Reply {
        /// The join ref it carries.
        join_ref: Option<String>,
        /// The ref of the message it answers.
        r#ref: Option<String>,
        /// The topic.
        topic: String,
        /// `ok`, `error`, …
        status: String,
        /// The `response`.
        payload: Payload,
    },
}

/// A frame the server sends, borrowed for encoding.
///
/// | kind | `join_ref` | `ref` |
/// |---|---|---|
/// | broadcast | `None` | `None` |
/// | push | the channel's | `None` |
/// | reply | the channel's (or the request's) | the request's |
/// | `phx_close` / `phx_error` | the channel's | the channel's join ref |
#[derive(Clone, Copy, Debug)]
pub enum Outbound<'a> {
    /// Any event frame: a push, a broadcast, `phx_close`, `phx_error`.
    Event {
        /// See the table above.
        join_ref: Option<&'a str>,
        /// See the table above.
        r#ref: Option<&'a str>,
        /// The topic.
        topic: &'a str,
        /// The event name.
        event: &'a str,
        /// The payload.
        payload: &'a Payload,
    },
    /// A `phx_reply` to the message with `ref`: `{"status": status, "response": payload}`.
    Reply {
        /// See the table above.
        join_ref: Option<&'a str>,
        /// The ref of the message being answered.
        r#ref: Option<&'a str>,
        /// The topic.
        topic: &'a str,
        /// `ok`, `error`, or any other status.
        status: &'a str,
        /// The reply's `response`.
        payload: &'a Payload,
    },
}

impl<'a> Outbound<'a> {
    /// A broadcast frame: `[null, null, topic, event, payload]`.
    pub fn broadcast(topic: &'a str, event: &'a str, payload: &'a Payload) -> Self {
        Outbound::Event {
            join_ref: None,
            r#ref: None,
            topic,
            event,
            payload,
        }
    }

    /// A push to one client: `[join_ref, null, topic, event, payload]`.
    pub fn push(join_ref: &'a str, topic: &'a str, event: &'a str, payload: &'a Payload) -> Self {
        Outbound::Event {
            join_ref: Some(join_ref),
            r#ref: None,
            topic,
            event,
            payload,
        }
    }

    /// The frame's topic.
    pub fn topic(&self) -> &'a str {
        match *self {
            Outbound::Event { topic, .. } | Outbound::Reply { topic, .. } => topic,
        }
    }

    /// The frame's event (`phx_reply` for replies).
    pub fn event(&self) -> &'a str {
        match *self {
            Outbound::Event { event, .. } => event,
            Outbound::Reply { .. } => "phx_reply",
        }
    }

    /// The frame's `join_ref`.
    pub fn join_ref(&self) -> Option<&'a str> {
        match *self {
            Outbound::Event { join_ref, .. } | Outbound::Reply { join_ref, .. } => join_ref,
        }
    }

    /// The frame's `ref`.
    pub fn r#ref(&self) -> Option<&'a str> {
        match *self {
            Outbound::Event { r#ref, .. } | Outbound::Reply { r#ref, .. } => r#ref,
        }
    }

    /// The payload (for replies, the `response`).
    pub fn payload(&self) -> &'a Payload {
        match *self {
            Outbound::Event { payload, .. } | Outbound::Reply { payload, .. } => payload,
        }
    }
}
