//! [`ClusterLink`]: an endpoint's side of its adapter — where received messages go (checked,
//! decoded, its own dropped), how messages go out (sealed), and the counters.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Adapter;
use super::auth::{AUTH_MARKER, Auth};
use super::history::unframe;
use super::queue::Confirm;
use super::wire::{Body, decode};
use crate::node::history::{Recorded, Retention};
use crate::node::pubsub::{Broadcast, SubId};

/// An endpoint's side of its adapter: where received messages go, and its counters.
#[derive(Clone)]
pub struct ClusterLink {
    pub(crate) inner: Arc<LinkInner>,
}

pub(crate) struct LinkInner {
    pub(crate) node: u64,
    pub(crate) deliver: Box<dyn Fn(Inbound) + Send + Sync>,
    pub(crate) received: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) rejected: AtomicU64,
    /// What the adapter said of the engine: [`UNREPORTED`], [`REACHABLE`] or [`UNREACHABLE`].
    pub(crate) engine: AtomicU8,
    /// With a cluster secret: how messages are sealed and checked.
    pub(crate) auth: Option<Auth>,
    /// The largest retention among the endpoint's recoverable topics, if any.
    pub(crate) retention: Option<Retention>,
    /// The engine's echo: when this node last heard one of its own messages back (or the
    /// adapter last said the engine is reachable), in milliseconds since `started` plus one
    /// (0: never, and then nothing is judged).
    pub(crate) started: Instant,
    pub(crate) echoed: AtomicU64,
    /// Whether the echo is overdue: the link is silent though it may look connected.
    pub(crate) stalled: AtomicBool,
    /// Stalls noticed.
    pub(crate) stalls: AtomicU64,
}

/// The adapter has not said whether the engine is reachable.
const UNREPORTED: u8 = 0;
const REACHABLE: u8 = 1;
const UNREACHABLE: u8 = 2;

/// What the link hands its node.
pub(crate) enum Inbound {
    /// Another node's message.
    Message { from: u64, body: Body },
    /// A broadcast of a recoverable topic, delivered by the engine with its position (`from`:
    /// the subscriber that sent it and does not get it, when it was this node's).
    Recorded {
        at: Recorded,
        from: Option<SubId>,
        broadcast: Broadcast,
    },
    /// The engine's delivery to this node was interrupted: histories may have gaps.
    Interrupted,
}

impl fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterLink")
            .field("node", &self.inner.node)
            .finish()
    }
}

impl ClusterLink {
    /// The link of node `node`: received messages go to `deliver`.
    pub(crate) fn new(
        node: u64,
        deliver: Box<dyn Fn(Inbound) + Send + Sync>,
        auth: Option<Auth>,
        retention: Option<Retention>,
    ) -> Self {
        ClusterLink {
            inner: Arc::new(LinkInner {
                node,
                deliver,
                received: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                engine: AtomicU8::new(UNREPORTED),
                auth,
                retention,
                started: Instant::now(),
                echoed: AtomicU64::new(0),
                stalled: AtomicBool::new(false),
                stalls: AtomicU64::new(0),
            }),
        }
    }

    /// The largest size and age among the endpoint's recoverable topics (`None`: it has none):
    /// what a [`HistoryEngine`](super::HistoryEngine) sizes its storage with when it starts.
    pub fn history_retention(&self) -> Option<Retention> {
        self.inner.retention
    }

    /// Messages received from other nodes, lost on the way out, and refused.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        let i = &self.inner;
        (
            i.received.load(Ordering::Relaxed),
            i.lost.load(Ordering::Relaxed),
            i.rejected.load(Ordering::Relaxed),
        )
    }

    /// Tells the endpoint whether the engine is reachable now (its connection up, this node
    /// subscribed), for readiness probes: [`Endpoint::cluster_ready`](crate::Endpoint::cluster_ready).
    /// An adapter that never calls it is taken as reachable.
    pub fn engine_reachable(&self, reachable: bool) {
        let state = if reachable { REACHABLE } else { UNREACHABLE };
        if reachable {
            // From now on this node's own messages come back (the silence check counts from
            // here).
            self.heard_echo();
        }
        self.inner.engine.store(state, Ordering::Relaxed);
    }

    /// Whether the engine is reachable, as far as the adapter said, and its link is not
    /// silent ([`check_echo`](ClusterLink::check_echo)).
    pub(crate) fn is_engine_reachable(&self) -> bool {
        self.inner.engine.load(Ordering::Relaxed) != UNREACHABLE
            && !self.inner.stalled.load(Ordering::Relaxed)
    }

    /// Stalls of the engine link noticed so far.
    pub(crate) fn stalls(&self) -> u64 {
        self.inner.stalls.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64 + 1
    }

    /// A mark for [`echoed_after`](ClusterLink::echoed_after): now.
    pub(crate) fn echo_mark(&self) -> u64 {
        self.now_ms()
    }

    /// Whether one of this node's own messages came back since `mark` (its link carried).
    pub(crate) fn echoed_after(&self, mark: u64) -> bool {
        self.inner.echoed.load(Ordering::Relaxed) > mark
    }

    /// This node heard one of its own messages back from the engine: its link carries.
    fn heard_echo(&self) {
        let i = &self.inner;
        let now = self.now_ms();
        let last = i.echoed.swap(now, Ordering::Relaxed);
        if i.stalled.swap(false, Ordering::Relaxed) {
            let silent = Duration::from_millis(now.saturating_sub(last));
            tracing::warn!(
                silent_ms = silent.as_millis() as u64,
                "cluster engine link carries again"
            );
        }
    }

    /// Notices a silent link: a link that stops carrying bytes without closing (a dead
    /// switch, a paused VM) looks connected to the engine's client for as long as TCP keeps
    /// retrying. Every node hears its own heartbeats back (engines deliver a message to every
    /// subscriber, its sender's node too); when none came back for `after`, the link is
    /// counted stalled until one does: the node is not ready
    /// ([`Endpoint::cluster_ready`](crate::Endpoint::cluster_ready)), and it is logged and
    /// counted. Judged from the adapter's first report of a reachable engine, or the first
    /// echo heard (an adapter that reports nothing and an engine that never echoes are not
    /// judged).
    pub(crate) fn check_echo(&self, after: Duration) {
        let i = &self.inner;
        let last = i.echoed.load(Ordering::Relaxed);
        // An outage the adapter reported is not a silent link (its reconnection restarts the
        // count).
        let reported = i.engine.load(Ordering::Relaxed) == UNREACHABLE;
        if last == 0 || reported || i.stalled.load(Ordering::Relaxed) {
            return;
        }
        let silent = Duration::from_millis(self.now_ms().saturating_sub(last));
        if silent > after && !i.stalled.swap(true, Ordering::Relaxed) {
            if i.echoed.load(Ordering::Relaxed) != last {
                // An echo came meanwhile (received off this thread): not silent after all.
                i.stalled.store(false, Ordering::Relaxed);
                return;
            }
            i.stalls.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                silent_ms = silent.as_millis() as u64,
                "cluster engine link silent: none of this node's messages came back; not ready until they do"
            );
        }
    }

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
            Ok(msg) if msg.node == self.inner.node => self.heard_echo(),
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
                (self.inner.deliver)(Inbound::Message {
                    from: msg.node,
                    body: msg.body,
                });
            }
            Err(e) => {
                self.inner.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cluster message dropped");
            }
        }
    }

    /// Hands a broadcast of a recoverable topic to the endpoint, as a
    /// [`HistoryEngine`](super::HistoryEngine) delivers it: the `message` it was given to
    /// append, at `offset` in `epoch`, and `prev`, the topic's previous offset where offsets go
    /// up by one. This node's own broadcasts come back this way too: they are dispatched here
    /// like the others. Messages that cannot be opened are logged and counted.
    pub fn receive_recorded(&self, epoch: u64, offset: u64, prev: Option<u64>, message: &[u8]) {
        match self.open_recorded(message) {
            Ok((node, from, broadcast)) => {
                if node != self.inner.node {
                    self.inner.received.fetch_add(1, Ordering::Relaxed);
                }
                let from = from.filter(|_| node == self.inner.node);
                (self.inner.deliver)(Inbound::Recorded {
                    at: Recorded {
                        epoch,
                        offset,
                        prev,
                    },
                    from,
                    broadcast,
                });
            }
            Err(why) => self.refuse(why),
        }
    }

    /// Tells the endpoint that the engine's delivery to this node was interrupted and may have
    /// lost recorded broadcasts (call it once delivery is back): its histories forget what they
    /// knew, and its recoverable channels are told to rejoin (and recover from the engine).
    pub fn interrupted(&self) {
        (self.inner.deliver)(Inbound::Interrupted);
    }

    /// The node, skipped subscriber and broadcast of a recorded message (checked with the
    /// cluster secret, if there is one; not for freshness, as history is old by design).
    pub(crate) fn open_recorded(
        &self,
        message: &[u8],
    ) -> Result<(u64, Option<SubId>, Broadcast), &'static str> {
        let message = match &self.inner.auth {
            None if message.first() == Some(&AUTH_MARKER) => {
                return Err("sealed with a cluster secret, and this node has none");
            }
            None => message,
            Some(auth) => auth.open(message)?.2,
        };
        let (from, message) = unframe(message).ok_or("recorded message too short")?;
        match decode(message) {
            Ok(msg) => match msg.body {
                Body::Broadcast(b) => Ok((msg.node, from, b)),
                _ => Err("recorded message is not a broadcast"),
            },
            Err(_) => Err("malformed recorded message"),
        }
    }

    /// `message`, sealed with the cluster secret if there is one.
    pub(crate) fn seal(&self, message: Bytes) -> Bytes {
        match &self.inner.auth {
            Some(auth) => auth.seal(&message),
            None => message,
        }
    }

    /// Publishes `message` through `adapter`, sealed with the cluster secret if there is one;
    /// with `confirm`, through [`Adapter::publish_confirmed`].
    pub(crate) fn publish(&self, adapter: &dyn Adapter, message: Bytes, confirm: Option<Confirm>) {
        let publish = |message| match confirm {
            None => adapter.publish(message),
            Some(c) => adapter.publish_confirmed(message, c),
        };
        match &self.inner.auth {
            Some(auth) => {
                // Publishing does not wait: this lock is held for the time of one HMAC.
                let _order = auth.order.lock();
                publish(auth.seal(&message));
            }
            None => publish(message),
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

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use hmac::Mac;

    use super::*;
    use crate::cluster::auth::{AUTH_HEADER, REPLAY_WINDOW, unix_ms};
    use crate::cluster::wire::encode;

    /// A link of node `node` with `secret`, and the messages it delivers.
    fn link(node: u64, secret: Option<&[u8]>) -> (ClusterLink, Arc<parking_lot::Mutex<Vec<u64>>>) {
        let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = got.clone();
        let deliver = Box::new(move |inbound| {
            if let Inbound::Message { from, .. } = inbound {
                sink.lock().push(from)
            }
        });
        let link = ClusterLink::new(node, deliver, secret.map(Auth::new), None);
        (link, got)
    }

    #[test]
    fn a_link_whose_own_messages_stop_coming_back_is_stalled_until_they_do() {
        let (link, _) = link(1, None);
        let silent = Duration::ZERO;
        // Not judged before the engine was reported reachable or echoed.
        std::thread::sleep(Duration::from_millis(2));
        link.check_echo(silent);
        assert!(link.is_engine_reachable());
        link.engine_reachable(true);
        std::thread::sleep(Duration::from_millis(2));
        link.check_echo(Duration::from_secs(60));
        assert!(link.is_engine_reachable(), "within the bound");
        link.check_echo(silent);
        link.check_echo(silent);
        assert!(!link.is_engine_reachable());
        assert_eq!(link.stalls(), 1, "one stall, however often checked");
        // Its own heartbeat comes back: it carries again.
        let own = encode(1, &Body::TransferRequest { to: 2 });
        let mark = link.echo_mark();
        std::thread::sleep(Duration::from_millis(2));
        assert!(!link.echoed_after(mark));
        link.receive(&own);
        assert!(link.echoed_after(mark));
        assert!(link.is_engine_reachable());
        assert_eq!(link.stalls(), 1);
        // An outage the adapter reports is not counted as a silent link.
        link.engine_reachable(false);
        std::thread::sleep(Duration::from_millis(2));
        link.check_echo(silent);
        assert_eq!(link.stalls(), 1);
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
