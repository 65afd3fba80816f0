//! The chat demo's contract: what a page and the server say to each other in a room
//! (`room:<name>`), declared once as Rust types.
//!
//! The server (`examples/chat`) serves it with a `firebrand::TypedChannel`; the page's types are
//! generated from it ([`typescript`]) into `examples/chat/assets/contract.d.ts`, and the test of
//! this crate fails when that file is stale (`FIREBRAND_BLESS=1 cargo test -p
//! firebrand-chat-contract` writes it again). `tests/types/run.sh` type-checks the page against
//! it with `tsc --strict`.
//!
//! The doc comments below become JSDoc in the TypeScript: what a page author reads in the editor.

use firebrand_protocol::contract::{self, Contract, Empty, Event, Push};
use serde::{Deserialize, Serialize};
use ts_rs::TS;

/// The join params of a room: `{}` for a newcomer, `{since}` for a page that rejoins after
/// losing its connection (the client re-reads them on every rejoin).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct JoinParams {
    /// The position of the last message the page showed (the second argument of its `new_msg`
    /// callback): the server replays what came after it, before newer messages, each once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub since: Option<String>,
}

/// The `ok` reply to a join. Rooms are recoverable topics: the server adds the room's position,
/// and `recovered` when the join had `since`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct JoinReply {
    /// The room's latest position (`null` while it has no message): where a newcomer resumes
    /// from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional = nullable)]
    pub position: Option<String>,
    /// Only with `since`: `true` when every message after it follows the reply, `false` when
    /// the room's history no longer reaches back that far (a server restart, a long absence):
    /// messages were missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub recovered: Option<bool>,
}

/// A message the page sends to its room. Replied to with `{}` once everyone in the room has
/// been sent it; an error reply says why not (an empty or too long message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct NewMsg {
    /// The text: 1 to 1000 characters once trimmed.
    pub body: String,
}

impl Push for NewMsg {
    const EVENT: &'static str = "new_msg";
    type Reply = Empty;
}

/// A message of the room, sent to everyone in it (its sender included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct Message {
    /// Who sent it.
    pub user: String,
    /// The text, trimmed.
    pub body: String,
    /// When the server received it, in milliseconds since the Unix epoch.
    #[ts(type = "number")]
    pub at: u64,
}

impl Event for Message {
    const EVENT: &'static str = "new_msg";
}

/// What presence records for each open tab of a user in the room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct Meta {
    /// When the tab joined, in seconds since the Unix epoch (a decimal string).
    pub online_at: String,
}

/// The contract of a chat room.
#[derive(Debug)]
pub struct RoomContract;

impl Contract for RoomContract {
    type JoinParams = JoinParams;
    type JoinReply = JoinReply;
    type Pushes = (NewMsg,);
    type Events = (Message,);
    type Meta = Meta;
}

/// The contract as TypeScript declarations (the content of `examples/chat/assets/contract.d.ts`):
/// the payload types above and `RoomContract`, for the page's `typedChannel<RoomContract>()`.
pub fn typescript() -> String {
    contract::typescript(&[contract::contract::<RoomContract>("RoomContract")])
}
