//! Channel contracts: a channel's events declared once, as Rust types, and shared by the
//! server, the Rust client and (generated) the TypeScript of a page.
//!
//! A contract names, for one kind of topic:
//!
//! - the **pushes** a client may send ([`Push`]): each a payload type with its event name and
//!   the type of its `ok` reply;
//! - the **events** the server sends ([`Event`]): pushes to one client and broadcasts;
//! - the join params and the join reply;
//! - the presence meta (what `track` records for each presence).
//!
//! Error replies (a refused join, a push that fails, a payload that does not decode) are always
//! [`ErrorReply`] (`{"reason": "…"}`), as in Phoenix's idiom.
//!
//! ```
//! use firebrand_protocol::contract::{Contract, Empty, Event, Push};
//! use serde::{Deserialize, Serialize};
//!
//! /// The client sends a message…
//! #[derive(Serialize, Deserialize)]
//! pub struct NewMsg { pub body: String }
//! impl Push for NewMsg {
//!     const EVENT: &'static str = "new_msg";
//!     type Reply = Empty;
//! }
//!
//! /// …and every subscriber gets it with its author.
//! #[derive(Serialize, Deserialize)]
//! pub struct Message { pub user: String, pub body: String }
//! impl Event for Message {
//!     const EVENT: &'static str = "new_msg";
//! }
//!
//! pub struct Room;
//! impl Contract for Room {
//!     type JoinParams = Empty;
//!     type JoinReply = Empty;
//!     type Pushes = (NewMsg,);
//!     type Events = (Message,);
//!     type Meta = Empty;
//! }
//! ```
//!
//! Pushes and events are listed as tuples (of up to 16 types). The server's typed channels
//! (`firebrand::TypedChannel`) answer exactly the pushes listed and can send only the events
//! listed; the Rust client's typed channels push only the listed pushes and receive the listed
//! events; with the `typescript` feature, `contract::typescript` writes
//! the same contract as TypeScript types for the official `phoenix` client.

use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An event a client pushes: the payload's type, its event name, and the type of the `ok`
/// reply's response.
///
/// ```
/// # use firebrand_protocol::contract::Push;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Ping { n: u32 }
/// impl Push for Ping {
///     const EVENT: &'static str = "ping";
///     type Reply = Ping; // the server answers with the same shape
/// }
/// ```
pub trait Push: Serialize + DeserializeOwned + Send + 'static {
    /// The event name on the wire.
    const EVENT: &'static str;
    /// The response of an `ok` reply ([`Empty`] for `{}`).
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

/// An event the server sends to clients (a push to one client or a broadcast): the payload's
/// type and its event name.
///
/// ```
/// # use firebrand_protocol::contract::Event;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct UserLeft { user: String }
/// impl Event for UserLeft {
///     const EVENT: &'static str = "user_left";
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + 'static {
    /// The event name on the wire.
    const EVENT: &'static str;
}

/// The contract of one kind of channel: what a client may push, what the server sends, what a
/// join carries and what presence records. A marker type implements it (see the
/// [module](self) for an example); the server's channel and the clients name it.
pub trait Contract: Send + Sync + 'static {
    /// The join params (`socket.channel(topic, params)`); [`Empty`] for none. On a recoverable
    /// topic a rejoin adds `since` (the last position seen) to them: declare it
    /// (`since: Option<String>`) or let serde ignore it — `#[serde(deny_unknown_fields)]` would
    /// refuse every recovering rejoin.
    type JoinParams: Serialize + DeserializeOwned + Send + 'static;
    /// The `ok` reply to a join; [`Empty`] for `{}`.
    type JoinReply: Serialize + DeserializeOwned + Send + 'static;
    /// The events a client may push, as a tuple of [`Push`] types.
    type Pushes: PushList;
    /// The events the server sends, as a tuple of [`Event`] types.
    type Events: EventList;
    /// What presence records for each presence of the topic (a meta); [`Empty`] when the
    /// channel tracks no presence.
    type Meta: Serialize + DeserializeOwned + Send + 'static;
}

/// The response of every error reply of a typed channel: `{"reason": "…"}`.
///
/// A payload that does not decode gets `"invalid payload: …"` naming the field; an event the
/// contract does not list gets `"unknown event \"…\""`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct ErrorReply {
    /// Why, in words.
    pub reason: String,
}

impl ErrorReply {
    /// `{"reason": reason}`.
    pub fn new(reason: impl Into<String>) -> Self {
        ErrorReply {
            reason: reason.into(),
        }
    }
}

/// The payload `{}`: no params, an empty reply. Decodes from any JSON object (its fields are
/// ignored, as Phoenix ignores what a channel does not read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Empty;

impl Serialize for Empty {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        s.serialize_map(Some(0))?.end()
    }
}

impl<'de> Deserialize<'de> for Empty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AnyObject;
        impl<'de> Visitor<'de> for AnyObject {
            type Value = Empty;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Empty, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Empty)
            }
        }
        d.deserialize_map(AnyObject)
    }
}

/// A tuple of [`Push`] types: the pushes of a [`Contract`].
pub trait PushList: 'static {
    /// The event names, in order.
    fn events() -> Vec<&'static str>;
}

/// A tuple of [`Event`] types: the events of a [`Contract`].
pub trait EventList: 'static {
    /// The event names, in order.
    fn events() -> Vec<&'static str>;
}

/// `T` is one of the types of this tuple, at position `I` (a marker type the compiler infers:
/// never name it). What keeps a typed channel from sending an event its contract does not
/// list.
#[diagnostic::on_unimplemented(
    message = "`{T}` is not listed in this contract",
    label = "not an event (or push) of the channel's contract",
    note = "add `{T}` to the contract's `Events` (or `Pushes`) tuple"
)]
pub trait Includes<T, I> {}

/// Positions in a tuple, for [`Includes`].
#[doc(hidden)]
pub mod at {
    macro_rules! positions {
        ($($p:ident)+) => { $(
            #[doc(hidden)]
            #[derive(Debug)]
            pub enum $p {}
        )+ };
    }
    positions!(P0 P1 P2 P3 P4 P5 P6 P7 P8 P9 P10 P11 P12 P13 P14 P15);
}

macro_rules! lists {
    ($( ($($t:ident $p:ident),+) )+) => { $(
        impl<$($t: Push),+> PushList for ($($t,)+) {
            fn events() -> Vec<&'static str> {
                vec![$($t::EVENT),+]
            }
        }
        impl<$($t: Event),+> EventList for ($($t,)+) {
            fn events() -> Vec<&'static str> {
                vec![$($t::EVENT),+]
            }
        }
        lists!(@includes [$($t),+] $($t $p),+);
    )+ };
    (@includes $all:tt $($t:ident $p:ident),+) => { $(
        lists!(@one $all $t $p);
    )+ };
    (@one [$($all:ident),+] $t:ident $p:ident) => {
        impl<$($all),+> Includes<$t, at::$p> for ($($all,)+) {}
    };
}

lists! {
    (A P0)
    (A P0, B P1)
    (A P0, B P1, C P2)
    (A P0, B P1, C P2, D P3)
    (A P0, B P1, C P2, D P3, E P4)
    (A P0, B P1, C P2, D P3, E P4, F P5)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7, I P8)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7, I P8, J P9)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7, I P8, J P9, K P10)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7, I P8, J P9, K P10, L P11)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7, I P8, J P9, K P10, L P11, M P12)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7, I P8, J P9, K P10, L P11, M P12, N P13)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7, I P8, J P9, K P10, L P11, M P12, N P13, O P14)
    (A P0, B P1, C P2, D P3, E P4, F P5, G P6, H P7, I P8, J P9, K P10, L P11, M P12, N P13, O P14, Q P15)
}

/// `()`: a contract with no pushes (or no events).
impl PushList for () {
    fn events() -> Vec<&'static str> {
        Vec::new()
    }
}

impl EventList for () {
    fn events() -> Vec<&'static str> {
        Vec::new()
    }
}

#[cfg(feature = "typescript")]
mod typescript;
#[cfg(feature = "typescript")]
pub use typescript::{Described, RUNTIME_JS, TsEvents, TsPushes, Writer, contract, typescript};

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct A;
    impl Event for A {
        const EVENT: &'static str = "a";
    }
    #[derive(Serialize, Deserialize)]
    struct B;
    impl Event for B {
        const EVENT: &'static str = "b";
    }

    fn listed<L: Includes<T, I>, T, I>() {}

    #[test]
    fn lists_name_their_events_and_include_their_types() {
        assert_eq!(<(A, B) as EventList>::events(), ["a", "b"]);
        listed::<(A, B), A, _>();
        listed::<(A, B), B, _>();
        listed::<(B,), B, _>();
    }

    #[test]
    fn empty_is_an_object_and_takes_any_object() {
        assert_eq!(serde_json::to_string(&Empty).unwrap(), "{}");
        let e: Empty = serde_json::from_str(r#"{"ignored": [1, {"x": 2}]}"#).unwrap();
        assert_eq!(e, Empty);
        assert!(serde_json::from_str::<Empty>("[]").is_err());
        assert!(serde_json::from_str::<Empty>("null").is_err());
    }
}
