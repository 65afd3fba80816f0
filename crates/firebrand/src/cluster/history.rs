//! The history part of the adapter contract: [`HistoryEngine`] (its docs are the contract), and
//! how a recorded broadcast is framed.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::queue::Confirm;
pub use crate::node::history::{
    HistoryError, HistorySource, Query, Retention, SourceEntries, SourceEntry,
};
use crate::node::pubsub::SubId;

/// An engine's history of recoverable topics: the part of an [`Adapter`](super::Adapter) that
/// keeps them ([`Adapter::history`](super::Adapter::history)), so that a position means the
/// same on every node and a client recovers on any node, also after the node it was on died.
///
/// **What a node does with it.** On a recoverable topic ([`EndpointBuilder::history`]) a
/// broadcast is not dispatched locally: it is handed to [`HistoryEngine::append`], and every
/// node (the publisher's too) dispatches it when the engine delivers it back with its position
/// through [`ClusterLink::receive_recorded`]. Each node keeps a ring of the broadcasts it
/// dispatched (a cache of the engine's history): a rejoin whose `since` the ring covers is
/// answered without the engine; others [`read`](HistoryEngine::read) it.
///
/// **The contract** an engine must meet (Redis: `firebrand-redis`; NATS JetStream:
/// `firebrand-nats`; a third engine meets the same points):
///
/// 1. **Positions.** `append` gives each entry an offset, atomically with storing it: offsets
///    of one topic strictly increase within an epoch. Where they go up by one, deliver with
///    `prev = Some(offset - 1)`, and a node that missed entries notices the gap itself.
/// 2. **Epochs.** The epoch (a u64, random or derived from the store's identity) changes
///    whenever entries may have been lost other than from the front: a flushed or restarted
///    store, a deleted stream, an evicted key. A position of another epoch is never recovered.
/// 3. **Delivery.** Every node gets every entry of a topic through
///    [`ClusterLink::receive_recorded`], in offset order per topic, from one task. When the
///    delivery to this node was interrupted and entries may be lost (a subscription dropped),
///    call [`ClusterLink::interrupted`] once it is back: the node's rings forget what they knew
///    and its recoverable channels are told to rejoin.
/// 4. **Reads.** [`read`](HistoryEngine::read) is one snapshot: the epoch, the top offset, and
///    every entry of the topic with an offset in `(from, top]`, oldest first, where `from` is
///    the answer's own claim of completeness (for `After(s)`: `s` when nothing after `s` is
///    missing, higher otherwise; for `Last(n)`: the offset before the first entry returned).
///    A read of an empty topic fixes its epoch, so that the position a join replies with stays
///    valid after the first append.
/// 5. **Retention** trims only from the front: at least `size` entries are kept, and entries
///    older than `max_age` are not returned (an engine may keep them longer).
/// 6. **Failure.** `append` never waits; what cannot be appended is lost for every node (this
///    one too: nothing is delivered without a position) and counted with
///    [`ClusterLink::count_lost`]. A read that fails answers `Err`; the join then says
///    `recovered: false` and replays nothing. Nothing panics.
///
/// The message an engine stores and delivers is opaque to it: the node-to-node encoding of the
/// broadcast, sealed with the cluster secret if there is one. Its position is outside the seal:
/// whoever can write to the engine can forge positions (the same trust as for the messages of
/// an engine without a secret).
///
/// [`EndpointBuilder::history`]: crate::EndpointBuilder::history
/// [`ClusterLink::receive_recorded`]: super::ClusterLink::receive_recorded
/// [`ClusterLink::interrupted`]: super::ClusterLink::interrupted
/// [`ClusterLink::count_lost`]: super::ClusterLink::count_lost
pub trait HistoryEngine: Send + Sync + 'static {
    /// Appends `message` to `topic`'s history as its next entry (at most `retention.size`
    /// kept, none older than `retention.max_age`), and delivers it with its position to every
    /// node. Must not wait: queue it.
    fn append(&self, topic: &str, message: Bytes, retention: Retention);

    /// [`append`](HistoryEngine::append), answering `confirm` once the engine has recorded it,
    /// or with why not (see [`Confirm`]). Must not wait either. The default appends and answers
    /// [`BroadcastError::Unconfirmed`](crate::BroadcastError::Unconfirmed): it cannot tell.
    fn append_confirmed(
        &self,
        topic: &str,
        message: Bytes,
        retention: Retention,
        confirm: Confirm,
    ) {
        self.append(topic, message, retention);
        confirm.failed(crate::BroadcastError::Unconfirmed);
    }

    /// Reads `topic`'s history: one snapshot (see the contract, point 4).
    fn read(
        &self,
        topic: &str,
        query: Query,
        retention: Retention,
    ) -> Pin<Box<dyn Future<Output = Result<Entries, HistoryError>> + Send + 'static>>;
}

/// A topic's history as an engine read it: every entry with an offset in `(from, top]`,
/// oldest first.
#[derive(Debug, Default)]
pub struct Entries {
    /// The history's epoch.
    pub epoch: u64,
    /// The entries are every entry after this offset (up to `top`).
    pub from: u64,
    /// The topic's last offset (0: none yet in this epoch).
    pub top: u64,
    /// The entries, oldest first.
    pub entries: Vec<Entry>,
}

/// One entry of a topic's history.
#[derive(Debug)]
pub struct Entry {
    /// Its offset.
    pub offset: u64,
    /// How long ago it was appended.
    pub age: Duration,
    /// The message [`HistoryEngine::append`] was given.
    pub message: Bytes,
}

/// A recorded broadcast's bytes before sealing: `flag u8` (1: sent by a subscriber, who does
/// not get it), `subscriber u64`, then the node message.
pub(crate) fn frame(from: Option<SubId>, node_message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(9 + node_message.len());
    buf.put_u8(u8::from(from.is_some()));
    buf.put_u64(from.unwrap_or_default());
    buf.put_slice(node_message);
    buf.freeze()
}

/// The subscriber a recorded broadcast skips, and its node message.
pub(crate) fn unframe(mut framed: &[u8]) -> Option<(Option<SubId>, &[u8])> {
    if framed.len() < 9 {
        return None;
    }
    let flag = framed.get_u8();
    let from = framed.get_u64();
    Some(((flag == 1).then_some(from), framed))
}

/// How long a join waits for a history read before it answers `recovered: false`.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(2);
