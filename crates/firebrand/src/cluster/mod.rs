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
//! Without a cluster secret, whoever can publish on the engine is trusted as a node (as Phoenix
//! trusts its distribution). With [`EndpointBuilder::cluster_secret`](crate::EndpointBuilder::cluster_secret),
//! every message is sealed with HMAC-SHA256, its sender's id, a counter and its time, and
//! messages without a valid tag, replayed or a minute off are dropped and counted.
//!
//! Adapters are chosen when the endpoint is built, behind a trait object: no type parameter
//! reaches your types.
//!
//! ```no_run
//! # fn adapter() -> impl firebrand::cluster::Adapter { firebrand::cluster::tests_only::Loopback::default() }
//! let endpoint = firebrand::Endpoint::builder().adapter(adapter()).build();
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use firebrand_protocol::{Payload, RawJson};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::node::presence::crdt::{State, WireState};
use crate::node::pubsub::Broadcast;
use crate::token::Proof;
use crate::transport::longpoll::{Answer, Request};

/// The version of the node-to-node message format written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// Carries an endpoint's messages to the other nodes of its cluster (Phoenix.PubSub's adapter).
///
/// Implementations publish on an engine every node subscribes to, and hand every message that
/// arrives to [`ClusterLink::receive`] — including the node's own, which the link drops.
pub trait Adapter: Send + Sync + 'static {
    /// Starts the adapter (subscribing, connecting in the background). Called once, when the
    /// endpoint is built, on the node's cluster thread: a single-threaded Tokio runtime of its
    /// own, which `tokio::spawn` here puts the adapter's tasks on. The engine's I/O and the
    /// heartbeats then keep time however busy the app's runtime is. Messages handed to
    /// [`ClusterLink::receive`] are dispatched on the calling task: keep it one task.
    fn start(&self, link: ClusterLink);

    /// Sends one message to every node. Must not block or wait: queue it and send it in the
    /// background. A message that cannot be sent (engine down, queue full) is dropped and
    /// counted with [`ClusterLink::count_lost`].
    fn publish(&self, message: Bytes);

    /// Resolves once the messages published so far have been handed to the engine (used on
    /// shutdown, so that the node's goodbye reaches the others). The default returns at once.
    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
}

/// The queue between [`Adapter::publish`] (which must not wait) and an adapter's publishing
/// task, with [`Adapter::flush`] support and loss counting. Adapters hold one.
pub struct PublishQueue {
    tx: tokio::sync::mpsc::Sender<Outgoing>,
    rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Outgoing>>>,
    link: parking_lot::Mutex<Option<ClusterLink>>,
}

/// What an adapter's publishing task takes from its [`PublishQueue`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Outgoing {
    /// A message to publish.
    Message(Bytes),
    /// Answer it once everything taken before it was handed to the engine.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl PublishQueue {
    /// A queue holding at most `capacity` messages; past that, messages are dropped and counted
    /// as lost.
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        PublishQueue {
            tx,
            rx: parking_lot::Mutex::new(Some(rx)),
            link: parking_lot::Mutex::new(None),
        }
    }

    /// For [`Adapter::start`]: remembers the link (to count losses) and hands over the
    /// receiving end, once (`None` on a second start).
    pub fn start(&self, link: &ClusterLink) -> Option<tokio::sync::mpsc::Receiver<Outgoing>> {
        *self.link.lock() = Some(link.clone());
        self.rx.lock().take()
    }

    /// For [`Adapter::publish`]: queues without waiting.
    pub fn push(&self, message: Bytes) {
        if self.tx.try_send(Outgoing::Message(message)).is_err()
            && let Some(link) = &*self.link.lock()
        {
            link.count_lost(1);
        }
    }

    /// For [`Adapter::flush`].
    pub async fn flush(&self) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        if self.tx.send(Outgoing::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }
}

impl fmt::Debug for PublishQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishQueue").finish_non_exhaustive()
    }
}

/// An endpoint's side of its adapter: where received messages go, and its counters.
#[derive(Clone)]
pub struct ClusterLink {
    pub(crate) inner: Arc<LinkInner>,
}

pub(crate) struct LinkInner {
    pub(crate) node: u64,
    pub(crate) deliver: Box<dyn Fn(u64, Body) + Send + Sync>,
    pub(crate) received: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) rejected: AtomicU64,
    /// With a cluster secret: how messages are sealed and checked.
    pub(crate) auth: Option<Auth>,
}

/// Marks a sealed message: `AUTH_MARKER, counter u64, time u64 (ms since the Unix epoch), the
/// message, HMAC-SHA256 of all that (32 bytes)`. Not a format version, so that a node without a
/// secret says why it drops it.
const AUTH_MARKER: u8 = 0xA5;
const AUTH_HEADER: usize = 17;
const TAG_LEN: usize = 32;

/// How far a sealed message's time may be from the receiver's clock (node clocks must agree
/// within this). A message is refused once this old, and a message seen within it is refused
/// a second time, so a captured message cannot be replayed.
pub(crate) const REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// A cluster secret's key, this node's message counter, and what was received of each node
/// (for replay checks).
pub(crate) struct Auth {
    key: Hmac<Sha256>,
    /// Taken, with the counter, from sealing to queueing: messages are queued in counter order.
    order: parking_lot::Mutex<()>,
    counter: AtomicU64,
    replay: parking_lot::Mutex<std::collections::HashMap<u64, Replay>>,
}

/// What a node has seen of another's sealed messages: the highest counter, and which of the
/// 64 below it (bit `i`: `highest - 1 - i`), as in IPsec's anti-replay window. A node queues
/// its messages in counter order; the window tolerates an engine reordering a few.
struct Replay {
    highest: u64,
    below: u64,
    last: std::time::Instant,
}

fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl Auth {
    pub(crate) fn new(secret: &[u8]) -> Auth {
        Auth {
            key: <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key size"),
            order: parking_lot::Mutex::new(()),
            counter: AtomicU64::new(1),
            replay: parking_lot::Mutex::default(),
        }
    }

    fn seal(&self, message: &[u8]) -> Bytes {
        let mut buf = BytesMut::with_capacity(AUTH_HEADER + message.len() + TAG_LEN);
        buf.put_u8(AUTH_MARKER);
        buf.put_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        buf.put_u64(unix_ms());
        buf.put_slice(message);
        let mut mac = self.key.clone();
        mac.update(&buf);
        buf.put_slice(&mac.finalize().into_bytes());
        buf.freeze()
    }

    /// The message inside `sealed`, its counter and time, if the tag is right.
    fn open<'a>(&self, sealed: &'a [u8]) -> Result<(u64, u64, &'a [u8]), &'static str> {
        if sealed.first() != Some(&AUTH_MARKER) {
            return Err("no authentication tag (is the sender's cluster secret set?)");
        }
        if sealed.len() < AUTH_HEADER + TAG_LEN {
            return Err("sealed message too short");
        }
        let (signed, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut mac = self.key.clone();
        mac.update(signed);
        mac.verify_slice(tag)
            .map_err(|_| "wrong authentication tag (another cluster secret, or forged)")?;
        let mut header = &signed[1..AUTH_HEADER];
        Ok((header.get_u64(), header.get_u64(), &signed[AUTH_HEADER..]))
    }

    /// Whether node `node`'s message `counter` sent at `time` is fresh (and records it).
    fn fresh(&self, node: u64, counter: u64, time: u64) -> bool {
        let window = REPLAY_WINDOW.as_millis() as u64;
        if unix_ms().abs_diff(time) > window {
            return false;
        }
        let now = std::time::Instant::now();
        let mut replay = self.replay.lock();
        let r = replay.entry(node).or_insert(Replay {
            highest: 0,
            below: 0,
            last: now,
        });
        r.last = now;
        if counter > r.highest {
            let shift = counter - r.highest;
            r.below = match shift {
                1..=63 => (r.below << shift) | (1 << (shift - 1)),
                64 => 1 << 63,
                _ => 0,
            };
            r.highest = counter;
            return true;
        }
        let back = r.highest - counter;
        if back == 0 || back > 64 || r.below & (1 << (back - 1)) != 0 {
            return false;
        }
        r.below |= 1 << (back - 1);
        true
    }

    /// Forgets nodes not heard from for two windows: a message of theirs replayed now is older
    /// than the window and refused on its time.
    fn prune(&self) {
        let now = std::time::Instant::now();
        self.replay
            .lock()
            .retain(|_, r| now.duration_since(r.last) < 2 * REPLAY_WINDOW);
    }
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
    /// undecodable ones (or of an unknown format version), and with a cluster secret those
    /// without a valid tag or seen before, are logged and counted.
    pub fn receive(&self, message: &[u8]) {
        let (opened, message) = match &self.inner.auth {
            None if message.first() == Some(&AUTH_MARKER) => {
                return self.refuse("sealed with a cluster secret, and this node has none");
            }
            None => (None, message),
            Some(auth) => match auth.open(message) {
                Ok((counter, time, message)) => (Some((auth, counter, time)), message),
                Err(why) => return self.refuse(why),
            },
        };
        match decode(message) {
            Ok(msg) if msg.node == self.inner.node => {}
            Ok(msg)
                if opened
                    .is_some_and(|(auth, counter, time)| !auth.fresh(msg.node, counter, time)) =>
            {
                self.reject(
                    msg.node,
                    "replayed, or stamped more than a minute off this node's clock",
                );
            }
            Ok(msg) => {
                self.inner.received.fetch_add(1, Ordering::Relaxed);
                (self.inner.deliver)(msg.node, msg.body);
            }
            Err(e) => {
                self.inner.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cluster message dropped");
            }
        }
    }

    /// Publishes `message` through `adapter`, sealed with the cluster secret if there is one.
    pub(crate) fn publish(&self, adapter: &dyn Adapter, message: Bytes) {
        match &self.inner.auth {
            Some(auth) => {
                // Publishing does not wait: this lock is held for the time of one HMAC.
                let _order = auth.order.lock();
                adapter.publish(auth.seal(&message));
            }
            None => adapter.publish(message),
        }
    }

    /// Forgets replay state no longer needed (called with the heartbeat).
    pub(crate) fn prune(&self) {
        if let Some(auth) = &self.inner.auth {
            auth.prune();
        }
    }

    fn refuse(&self, why: &str) {
        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("cluster message dropped: {why}");
    }

    /// Counts a message of node `from` that was read but refused (forged or corrupt).
    pub(crate) fn reject(&self, from: u64, what: &str) {
        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = from, "cluster message refused: {what}");
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
const KIND_HEARTBEAT: u8 = 2;
const KIND_TRANSFER_REQUEST: u8 = 3;
const KIND_TRANSFER: u8 = 4;
const KIND_GOODBYE: u8 = 5;
const KIND_DIRECT: u8 = 6;
const KIND_LONGPOLL: u8 = 7;
const KIND_LONGPOLL_ANSWER: u8 = 8;
const LONGPOLL_POLL: u8 = 0;
const LONGPOLL_POST: u8 = 1;
const LONGPOLL_POST_NDJSON: u8 = 2;
const ANSWER_NO_SESSION: u8 = 0;
const ANSWER_REPLY: u8 = 1;
const PAYLOAD_JSON: u8 = 0;
const PAYLOAD_BINARY: u8 = 1;

/// What a node-to-node message carries.
pub(crate) enum Body {
    /// A broadcast for this node's subscribers.
    Broadcast(Broadcast),
    /// A broadcast for the subscribers of node `to` only.
    Direct { to: u64, broadcast: Broadcast },
    /// A node is alive: its presence changes of generations `(from, to]` (so that a node that
    /// missed some notices the gap and asks for a transfer).
    Heartbeat { from: u64, to: u64, delta: State },
    /// Asks node `to` for its presence state.
    TransferRequest { to: u64 },
    /// Node's presence state as of generation `generation` (at least), for node `to`.
    Transfer {
        to: u64,
        generation: u64,
        state: State,
    },
    /// The node is shutting down: forget its presences now.
    Goodbye,
    /// A long-poll request that reached this node for a session of node `to`; answer `id`.
    /// It carries the client's session token as a [`Proof`], never the token itself.
    LongPoll {
        to: u64,
        id: u64,
        proof: Proof,
        request: Request,
    },
    /// Node `to`'s forwarded long-poll request `id`, answered.
    LongPollAnswer { to: u64, id: u64, answer: Answer },
}

pub(crate) struct NodeMessage {
    pub(crate) node: u64,
    pub(crate) body: Body,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct PresenceBody {
    #[serde(default)]
    from: u64,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    to: u64,
    #[serde(default)]
    state: WireState,
}

/// `version, kind, node u64`, then for broadcasts `topic (u16 len), event (u16 len), payload
/// kind, payload`, and for presence messages a JSON body.
pub(crate) fn encode(node: u64, body: &Body) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u8(FORMAT_VERSION);
    let presence = |kind, p: PresenceBody| (kind, Some(p));
    let (kind, json) = match body {
        Body::Broadcast(_) => (KIND_BROADCAST, None),
        Body::Direct { .. } => (KIND_DIRECT, None),
        Body::LongPoll {
            to,
            id,
            proof,
            request,
        } => {
            buf.put_u8(KIND_LONGPOLL);
            buf.put_u64(node);
            buf.put_u64(*to);
            buf.put_u64(*id);
            let (op, body): (u8, &[u8]) = match request {
                Request::Poll => (LONGPOLL_POLL, b""),
                Request::Post {
                    body,
                    ndjson: false,
                } => (LONGPOLL_POST, body),
                Request::Post { body, ndjson: true } => (LONGPOLL_POST_NDJSON, body),
            };
            buf.put_u8(op);
            // Tokens are short; a longer one is no token of ours and is cut, failing to verify.
            let data = &proof.body.as_bytes()[..proof.body.len().min(u16::MAX as usize)];
            buf.put_u16(data.len() as u16);
            buf.put_slice(data);
            buf.put_slice(&proof.digest);
            buf.put_slice(body);
            return buf.freeze();
        }
        Body::LongPollAnswer { to, id, answer } => {
            buf.put_u8(KIND_LONGPOLL_ANSWER);
            buf.put_u64(node);
            buf.put_u64(*to);
            buf.put_u64(*id);
            match answer {
                Answer::NoSession => buf.put_u8(ANSWER_NO_SESSION),
                Answer::Reply { http, body } => {
                    buf.put_u8(ANSWER_REPLY);
                    buf.put_u16(*http);
                    buf.put_slice(body.as_bytes());
                }
            }
            return buf.freeze();
        }
        Body::Heartbeat { from, to, delta } => presence(
            KIND_HEARTBEAT,
            PresenceBody {
                from: *from,
                generation: *to,
                state: delta.to_wire(),
                ..Default::default()
            },
        ),
        Body::TransferRequest { to } => presence(
            KIND_TRANSFER_REQUEST,
            PresenceBody {
                to: *to,
                ..Default::default()
            },
        ),
        Body::Transfer {
            to,
            generation,
            state,
        } => presence(
            KIND_TRANSFER,
            PresenceBody {
                to: *to,
                generation: *generation,
                state: state.to_wire(),
                ..Default::default()
            },
        ),
        Body::Goodbye => presence(KIND_GOODBYE, PresenceBody::default()),
    };
    buf.put_u8(kind);
    buf.put_u64(node);
    if let Some(json) = json {
        // Serializing plain data with string keys cannot fail.
        buf.put_slice(&serde_json::to_vec(&json).unwrap_or_default());
        return buf.freeze();
    }
    let b = match body {
        Body::Direct { to, broadcast } => {
            buf.put_u64(*to);
            broadcast
        }
        Body::Broadcast(b) => b,
        _ => unreachable!("other bodies returned above"),
    };
    let (kind, data): (u8, &[u8]) = match b.payload() {
        Payload::Json(raw) => (PAYLOAD_JSON, raw.as_bytes()),
        Payload::Binary(bytes) => (PAYLOAD_BINARY, bytes),
    };
    buf.reserve(b.topic().len() + b.event().len() + data.len());
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
    let kind = m.get_u8();
    let node = m.get_u64();
    if kind == KIND_LONGPOLL || kind == KIND_LONGPOLL_ANSWER {
        return decode_longpoll(node, kind, m);
    }
    let direct_to = if kind == KIND_DIRECT {
        need(m, 8)?;
        Some(m.get_u64())
    } else {
        None
    };
    if kind != KIND_BROADCAST && kind != KIND_DIRECT {
        let p: PresenceBody = serde_json::from_slice(m).map_err(|_| MessageError::Malformed)?;
        let state = || State::from_wire(p.state).ok_or(MessageError::Malformed);
        let body = match kind {
            KIND_HEARTBEAT => Body::Heartbeat {
                from: p.from,
                to: p.generation,
                delta: state()?,
            },
            KIND_TRANSFER_REQUEST => Body::TransferRequest { to: p.to },
            KIND_TRANSFER => Body::Transfer {
                to: p.to,
                generation: p.generation,
                state: state()?,
            },
            KIND_GOODBYE => Body::Goodbye,
            _ => return Err(MessageError::Malformed),
        };
        return Ok(NodeMessage { node, body });
    }
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
    let broadcast = Broadcast::new(topic, event, payload);
    let body = match direct_to {
        Some(to) => Body::Direct { to, broadcast },
        None => Body::Broadcast(broadcast),
    };
    Ok(NodeMessage { node, body })
}

fn decode_longpoll(node: u64, kind: u8, mut m: &[u8]) -> Result<NodeMessage, MessageError> {
    if m.len() < 17 {
        return Err(MessageError::Malformed);
    }
    let to = m.get_u64();
    let id = m.get_u64();
    let tag = m.get_u8();
    let body = if kind == KIND_LONGPOLL {
        if m.len() < 2 {
            return Err(MessageError::Malformed);
        }
        let len = usize::from(m.get_u16());
        if m.len() < len {
            return Err(MessageError::Malformed);
        }
        let data = std::str::from_utf8(&m[..len])
            .map_err(|_| MessageError::Malformed)?
            .to_owned();
        m.advance(len);
        if m.len() < 32 {
            return Err(MessageError::Malformed);
        }
        let mut digest = [0; 32];
        m.copy_to_slice(&mut digest);
        let proof = Proof { body: data, digest };
        let body = Bytes::copy_from_slice(m);
        let request = match tag {
            LONGPOLL_POLL => Request::Poll,
            LONGPOLL_POST => Request::Post {
                body,
                ndjson: false,
            },
            LONGPOLL_POST_NDJSON => Request::Post { body, ndjson: true },
            _ => return Err(MessageError::Malformed),
        };
        Body::LongPoll {
            to,
            id,
            proof,
            request,
        }
    } else {
        let answer = match tag {
            ANSWER_NO_SESSION => Answer::NoSession,
            ANSWER_REPLY if m.len() >= 2 => {
                let http = m.get_u16();
                let body = String::from_utf8(m.to_vec()).map_err(|_| MessageError::Malformed)?;
                Answer::Reply { http, body }
            }
            _ => return Err(MessageError::Malformed),
        };
        Body::LongPollAnswer { to, id, answer }
    };
    Ok(NodeMessage { node, body })
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

    fn broadcast_of(m: NodeMessage) -> Broadcast {
        match m.body {
            Body::Broadcast(b) => b,
            _ => panic!("not a broadcast"),
        }
    }

    #[test]
    fn messages_round_trip_and_versions_are_checked() {
        let b = Broadcast::new(
            "room:1",
            "new_msg",
            Payload::from(serde_json::json!({"a": 1})),
        );
        let msg = encode(7, &Body::Broadcast(b.clone()));
        let m = decode(&msg).unwrap();
        assert_eq!(m.node, 7);
        let got = broadcast_of(m);
        assert_eq!(
            (got.topic(), got.event(), got.payload()),
            ("room:1", "new_msg", b.payload())
        );
        let bin = Broadcast::new("t", "e", Payload::binary(vec![0, 255]));
        let got = broadcast_of(decode(&encode(1, &Body::Broadcast(bin.clone()))).unwrap());
        assert_eq!(got.payload(), bin.payload());
        let mut future = msg.to_vec();
        future[0] = 2;
        assert_eq!(decode(&future).err(), Some(MessageError::UnknownVersion(2)));
        for cut in 0..msg.len() - 8 {
            assert!(decode(&msg[..cut]).is_err(), "cut at {cut}");
        }
        let hb = decode(&encode(
            3,
            &Body::Heartbeat {
                from: 4,
                to: 9,
                delta: State::default(),
            },
        ))
        .unwrap();
        assert!(matches!(hb.body, Body::Heartbeat { from: 4, to: 9, .. }));
        let req = decode(&encode(3, &Body::TransferRequest { to: 4 })).unwrap();
        assert!(matches!(req.body, Body::TransferRequest { to: 4 }));
        assert!(matches!(
            decode(&encode(3, &Body::Goodbye)).unwrap().body,
            Body::Goodbye
        ));
        let direct = decode(&encode(
            3,
            &Body::Direct {
                to: 5,
                broadcast: b,
            },
        ))
        .unwrap();
        assert!(
            matches!(direct.body, Body::Direct { to: 5, ref broadcast } if broadcast.event() == "new_msg")
        );
        for request in [
            Request::Poll,
            Request::Post {
                body: Bytes::from_static(b"[1]\n[2]"),
                ndjson: true,
            },
            Request::Post {
                body: Bytes::from_static(b"[1]"),
                ndjson: false,
            },
        ] {
            let proof = Proof::of("tok.en").unwrap();
            let body = Body::LongPoll {
                to: 5,
                id: 9,
                proof: proof.clone(),
                request: request.clone(),
            };
            let msg = encode(3, &body);
            assert!(!msg.windows(2).any(|w| w == b"en"), "the signature travels");
            let got = decode(&msg).unwrap();
            assert!(
                matches!(got.body, Body::LongPoll { to: 5, id: 9, proof: ref p, request: ref r } if *p == proof && *r == request)
            );
            for cut in 0..19 + 3 + 32 {
                assert!(decode(&msg[..cut]).is_err(), "cut at {cut}");
            }
        }
        for answer in [
            Answer::NoSession,
            Answer::Reply {
                http: 200,
                body: r#"{"status":204}"#.into(),
            },
        ] {
            let body = Body::LongPollAnswer {
                to: 3,
                id: 9,
                answer: answer.clone(),
            };
            let got = decode(&encode(5, &body)).unwrap();
            assert!(
                matches!(got.body, Body::LongPollAnswer { to: 3, id: 9, answer: ref a } if *a == answer)
            );
        }
    }

    /// A link of node `node` with `secret`, and the messages it delivers.
    fn link(node: u64, secret: Option<&[u8]>) -> (ClusterLink, Arc<parking_lot::Mutex<Vec<u64>>>) {
        let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = got.clone();
        let link = ClusterLink {
            inner: Arc::new(LinkInner {
                node,
                deliver: Box::new(move |from, _| sink.lock().push(from)),
                received: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                auth: secret.map(Auth::new),
            }),
        };
        (link, got)
    }

    #[test]
    fn with_a_secret_only_sealed_fresh_messages_pass() {
        let sealed = |link: &ClusterLink, m: Bytes| link.inner.auth.as_ref().unwrap().seal(&m);
        let (a, _) = link(1, Some(b"secret"));
        let (b, got) = link(2, Some(b"secret"));
        let (open, open_got) = link(3, None);
        let goodbye = || encode(1, &Body::Goodbye);
        let sealed_bye = sealed(&a, goodbye());
        b.receive(&sealed_bye);
        assert_eq!(*got.lock(), [1]);
        // A replay, a forged or unsealed message, another secret's: all refused and counted.
        b.receive(&sealed_bye);
        b.receive(&goodbye());
        let mut tampered = sealed_bye.to_vec();
        tampered[AUTH_HEADER + 2] ^= 1;
        b.receive(&tampered);
        let (other, _) = link(1, Some(b"other secret"));
        b.receive(&sealed(&other, goodbye()));
        b.receive(&sealed_bye[..sealed_bye.len() - 1]);
        assert_eq!(*got.lock(), [1]);
        assert_eq!(b.inner.rejected.load(Ordering::Relaxed), 5);
        // Reordered messages within the window pass once each; far behind, they are refused.
        let (m1, m2, m3) = (
            sealed(&a, goodbye()),
            sealed(&a, goodbye()),
            sealed(&a, goodbye()),
        );
        for m in [&m3, &m1, &m2, &m1] {
            b.receive(m);
        }
        assert_eq!(got.lock().len(), 4);
        let old = sealed(&a, goodbye());
        for _ in 0..65 {
            b.receive(&sealed(&a, goodbye()));
        }
        b.receive(&old);
        assert_eq!(got.lock().len(), 4 + 65);
        assert_eq!(b.inner.rejected.load(Ordering::Relaxed), 7);
        // A message stamped outside the window is refused, however new its counter.
        let auth = a.inner.auth.as_ref().unwrap();
        let mut stale = BytesMut::new();
        stale.put_u8(AUTH_MARKER);
        stale.put_u64(1 << 40);
        stale.put_u64(unix_ms() - REPLAY_WINDOW.as_millis() as u64 - 1000);
        stale.put_slice(&goodbye());
        let mut mac = auth.key.clone();
        mac.update(&stale);
        stale.put_slice(&mac.finalize().into_bytes());
        b.receive(&stale);
        assert_eq!(b.inner.rejected.load(Ordering::Relaxed), 8);
        // Without a secret: unsealed messages pass as before, sealed ones are refused.
        open.receive(&goodbye());
        open.receive(&sealed_bye);
        assert_eq!(*open_got.lock(), [1]);
        assert_eq!(open.inner.rejected.load(Ordering::Relaxed), 1);
    }
}
