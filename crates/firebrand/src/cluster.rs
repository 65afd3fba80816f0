//! Clustering: the contract between an endpoint and the engine (Redis, NATS) that carries its
//! node-to-node traffic.
//!
//! Local delivery always stays in-process. An [`Adapter`] only carries what other nodes need:
//! **one engine message per broadcast** — never one per subscriber — which each receiving node
//! decodes once and dispatches to its own subscribers, encoding the frame once per serializer
//! there. A node ignores its own messages when the engine echoes them back, so nothing is
//! delivered twice.
//!
//! Node-to-node messages start with a format version byte ([`FORMAT_VERSION`]): a node drops
//! (and counts) messages of a version it does not know, so mixed-version clusters fail loudly
//! in the logs rather than garbling frames.
//!
//! Adapters are chosen when the endpoint is built, behind a trait object: no type parameter
//! reaches your types.
//!
//! ```no_run
//! # fn adapter() -> impl firebrand::cluster::Adapter { firebrand::cluster::tests_only::Loopback::default() }
//! let endpoint = firebrand::Endpoint::builder().adapter(adapter()).build();
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use firebrand_protocol::{Payload, RawJson};

use crate::pubsub::Broadcast;

/// The version of the node-to-node message format written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// Carries an endpoint's messages to the other nodes of its cluster (Phoenix.PubSub's adapter).
///
/// Implementations publish on an engine every node subscribes to, and hand every message that
/// arrives to [`ClusterLink::receive`] — including the node's own, which the link drops.
pub trait Adapter: Send + Sync + 'static {
    /// Starts the adapter (subscribing, connecting in the background). Called once, from
    /// within a Tokio runtime, when the endpoint is built.
    fn start(&self, link: ClusterLink);

    /// Sends one message to every node. Must not block or wait: queue it and send it in the
    /// background. A message that cannot be sent (engine down, queue full) is dropped and
    /// counted with [`ClusterLink::count_lost`].
    fn publish(&self, message: Bytes);
}

/// An endpoint's side of its adapter: where received messages go, and its counters.
#[derive(Clone)]
pub struct ClusterLink {
    pub(crate) inner: Arc<LinkInner>,
}

pub(crate) struct LinkInner {
    pub(crate) node: u64,
    pub(crate) deliver: Box<dyn Fn(Broadcast) + Send + Sync>,
    pub(crate) received: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) rejected: AtomicU64,
}

impl fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterLink")
            .field("node", &self.inner.node)
            .finish()
    }
}

impl ClusterLink {
    /// This node's id (random, new on every start).
    pub fn node(&self) -> u64 {
        self.inner.node
    }

    /// Hands a message from the engine to the endpoint. Messages from this node are ignored;
    /// undecodable ones (or of an unknown format version) are logged and counted.
    pub fn receive(&self, message: &[u8]) {
        match decode(message) {
            Ok(msg) if msg.node == self.inner.node => {}
            Ok(msg) => {
                self.inner.received.fetch_add(1, Ordering::Relaxed);
                (self.inner.deliver)(msg.broadcast);
            }
            Err(e) => {
                self.inner.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cluster message dropped");
            }
        }
    }

    /// Counts messages the adapter could not send (the outage's loss, for metrics).
    pub fn count_lost(&self, n: u64) {
        self.inner.lost.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why a node-to-node message could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// Written by a build with another format version.
    UnknownVersion(u8),
    /// Shorter than its header says, or with invalid text.
    Malformed,
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::UnknownVersion(v) => {
                write!(
                    f,
                    "node-to-node format version {v}; this node reads {FORMAT_VERSION}"
                )
            }
            MessageError::Malformed => f.write_str("malformed node-to-node message"),
        }
    }
}

impl std::error::Error for MessageError {}

const KIND_BROADCAST: u8 = 1;
const PAYLOAD_JSON: u8 = 0;
const PAYLOAD_BINARY: u8 = 1;

pub(crate) struct NodeMessage {
    pub(crate) node: u64,
    pub(crate) broadcast: Broadcast,
}

/// `version, kind, node u64, topic (u16 len), event (u16 len), payload kind, payload`.
pub(crate) fn encode(node: u64, b: &Broadcast) -> Bytes {
    let (kind, data): (u8, &[u8]) = match b.payload() {
        Payload::Json(raw) => (PAYLOAD_JSON, raw.as_bytes()),
        Payload::Binary(bytes) => (PAYLOAD_BINARY, bytes),
    };
    let mut buf = BytesMut::with_capacity(16 + b.topic().len() + b.event().len() + data.len());
    buf.put_u8(FORMAT_VERSION);
    buf.put_u8(KIND_BROADCAST);
    buf.put_u64(node);
    for s in [b.topic(), b.event()] {
        // Topics and events over 64 KiB are refused long before (max_topic_len).
        let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        buf.put_u16(s.len() as u16);
        buf.put_slice(s);
    }
    buf.put_u8(kind);
    buf.put_slice(data);
    buf.freeze()
}

pub(crate) fn decode(mut m: &[u8]) -> Result<NodeMessage, MessageError> {
    let need = |m: &[u8], n: usize| {
        if m.len() < n {
            Err(MessageError::Malformed)
        } else {
            Ok(())
        }
    };
    need(m, 1)?;
    let version = m.get_u8();
    if version != FORMAT_VERSION {
        return Err(MessageError::UnknownVersion(version));
    }
    need(m, 9)?;
    if m.get_u8() != KIND_BROADCAST {
        return Err(MessageError::Malformed);
    }
    let node = m.get_u64();
    let mut text = || -> Result<String, MessageError> {
        need(m, 2)?;
        let len = usize::from(m.get_u16());
        need(m, len)?;
        let s = std::str::from_utf8(&m[..len])
            .map_err(|_| MessageError::Malformed)?
            .to_owned();
        m.advance(len);
        Ok(s)
    };
    let topic = text()?;
    let event = text()?;
    need(m, 1)?;
    let payload = match m.get_u8() {
        PAYLOAD_JSON => {
            Payload::Json(RawJson::parse(m.to_vec()).map_err(|_| MessageError::Malformed)?)
        }
        PAYLOAD_BINARY => Payload::binary(m.to_vec()),
        _ => return Err(MessageError::Malformed),
    };
    Ok(NodeMessage {
        node,
        broadcast: Broadcast::new(topic, event, payload),
    })
}

/// An in-process adapter for examples and tests: every endpoint sharing one `Loopback` is a
/// node of the same cluster.
#[doc(hidden)]
pub mod tests_only {
    use super::*;
    use parking_lot::Mutex;

    /// Connects the endpoints built with clones of it.
    #[derive(Clone, Default)]
    pub struct Loopback {
        links: Arc<Mutex<Vec<ClusterLink>>>,
    }

    impl Adapter for Loopback {
        fn start(&self, link: ClusterLink) {
            self.links.lock().push(link);
        }

        fn publish(&self, message: Bytes) {
            for link in self.links.lock().iter() {
                link.receive(&message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_versions_are_checked() {
        let b = Broadcast::new(
            "room:1",
            "new_msg",
            Payload::from(serde_json::json!({"a": 1})),
        );
        let m = decode(&encode(7, &b)).unwrap();
        assert_eq!(
            (m.node, m.broadcast.topic(), m.broadcast.event()),
            (7, "room:1", "new_msg")
        );
        assert_eq!(m.broadcast.payload(), b.payload());
        let bin = Broadcast::new("t", "e", Payload::binary(vec![0, 255]));
        assert_eq!(
            decode(&encode(1, &bin)).unwrap().broadcast.payload(),
            bin.payload()
        );
        let mut future = encode(1, &b).to_vec();
        future[0] = 2;
        assert_eq!(decode(&future).err(), Some(MessageError::UnknownVersion(2)));
        for cut in 0..encode(1, &b).len() - 8 {
            assert!(decode(&encode(1, &b)[..cut]).is_err(), "cut at {cut}");
        }
    }
}
