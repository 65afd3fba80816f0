//! The node's shared machinery, under every connection and channel: topics and their
//! subscribers ([`pubsub`]), the bounded queues between tasks ([`queue`]), the presence tracker
//! ([`presence`]), and the [`Hub`] that holds them with the connection registry and the
//! counters. Nothing here knows sockets, channels, transports or the cluster: what sits above
//! gets a [`Hub`] handed down.

pub(crate) mod history;
pub mod presence;
pub(crate) mod pubsub;
pub(crate) mod queue;
pub(crate) mod subscription;
pub(crate) mod wakes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::limits::Limit;
use history::{History, Recorded};
use presence::{Diff, DiffSink, PresenceFetch, Tracker};
use pubsub::{Broadcast, PubSub, SubId};
use queue::Outbox;

/// One node's PubSub, presence tracker, live connections and counters: what connections,
/// channel tasks and the cluster share. One per [`Endpoint`](crate::Endpoint).
pub(crate) struct Hub {
    /// This node's id: its presence replica, its long-poll tokens, its cluster messages.
    id: u64,
    pubsub: PubSub,
    /// Socket ids and the connections that carry them: a registry of its own, apart from the
    /// topics, so that no channel can join, publish to or watch a socket id
    /// ([`Hub::disconnect_local`]).
    sockets: PubSub,
    tracker: Arc<Tracker>,
    /// The histories of recoverable topics, if any topic is.
    history: Option<History>,
    /// Itself, for the presence flusher (which must not keep it alive).
    me: Weak<Hub>,
    conns: Mutex<HashMap<u64, Arc<Outbox>>>,
    next_conn: AtomicU64,
    /// Idle connections are closed by one sweep over the registry (see [`Registered::watch_idle`]).
    idle: IdleSweep,
    all_closed: Notify,
    counters: Counters,
    /// Set once the endpoint drains: new connections are refused (503).
    draining: AtomicBool,
}

/// The counters behind [`Stats`](crate::Stats) that this layer keeps.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) broadcasts: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    pub(crate) slow_consumers: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    /// Per [`Limit`], in its declaration order.
    pub(crate) limits: [AtomicU64; 4],
    /// Connection requests refused, per [`Refused`] in its declaration order.
    pub(crate) refused: [AtomicU64; 4],
    pub(crate) joins: AtomicU64,
    pub(crate) joins_refused: AtomicU64,
    /// Joined channels that ended (left, closed, crashed, replaced, their connection gone).
    pub(crate) channels_closed: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    /// Frames written to WebSocket connections, counted once per batch written.
    pub(crate) frames_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// Batches written to WebSocket connections (one `write` of everything queued each).
    pub(crate) writes_out: AtomicU64,
}

/// Why a connection request was refused (the index of its counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Its `Origin` is not allowed.
    Origin,
    /// Its `vsn` names no serializer.
    Vsn,
    /// [`Socket::connect`](crate::Socket::connect) refused it.
    Connect,
    /// The endpoint is draining.
    Draining,
}

/// When an operation that a latency histogram measures started (nothing without the `metrics`
/// feature).
#[derive(Clone, Copy)]
pub(crate) struct Started(#[cfg(feature = "metrics")] std::time::Instant);

impl Started {
    #[inline]
    pub(crate) fn now() -> Self {
        Started(
            #[cfg(feature = "metrics")]
            std::time::Instant::now(),
        )
    }

    /// Records the time since the start in the histogram `name` of the `metrics` facade.
    #[inline]
    #[allow(unused_variables)]
    fn record(self, name: &'static str) {
        #[cfg(feature = "metrics")]
        ::metrics::histogram!(name).record(self.0.elapsed());
    }
}

impl Hub {
    /// The hub of node `id`; `gossip` when its presence changes go to other nodes.
    pub(crate) fn new(
        id: u64,
        presence_batch: Duration,
        presence_fetch: Option<PresenceFetch>,
        gossip: bool,
        history: Option<History>,
    ) -> Arc<Hub> {
        Arc::new_cyclic(|me| Hub {
            id,
            pubsub: PubSub::new(),
            sockets: PubSub::new(),
            tracker: Arc::new(Tracker::new(id, presence_batch, presence_fetch, gossip)),
            history,
            me: me.clone(),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            idle: IdleSweep::new(),
            all_closed: Notify::new(),
            counters: Counters::default(),
            draining: AtomicBool::new(false),
        })
    }

    /// This node's id (random, new on every start).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn pubsub(&self) -> &PubSub {
        &self.pubsub
    }

    /// Registers `outbox` as a connection of socket id `id`; returns what
    /// [`leave_socket`](Hub::leave_socket) takes.
    pub(crate) fn join_socket(&self, id: &str, outbox: Arc<Outbox>) -> SubId {
        self.sockets.subscribe(id, pubsub::Target::Socket(outbox))
    }

    /// Forgets a connection of socket id `id`.
    pub(crate) fn leave_socket(&self, id: &str, sub: SubId) {
        self.sockets.unsubscribe(id, sub);
    }

    /// Closes this node's connections of socket id `id` (code 1001). Socket ids are not
    /// topics: nothing a client sends, and no broadcast, reaches them; only
    /// [`Endpoint::disconnect`](crate::Endpoint::disconnect) does, on every node.
    pub(crate) fn disconnect_local(&self, id: &str) {
        let disconnect = Broadcast::new(id, "disconnect", firebrand_protocol::Payload::empty());
        self.sockets.dispatch(&disconnect, None);
    }

    /// The presence tracker, its diff flusher started (which needs a Tokio runtime).
    pub(crate) fn tracker(&self) -> &Arc<Tracker> {
        let sink: Weak<dyn DiffSink> = self.me.clone();
        self.tracker.start_flusher(sink);
        &self.tracker
    }

    /// The presence entries tracked.
    pub(crate) fn presence_count(&self) -> usize {
        self.tracker.len()
    }

    /// The histories of recoverable topics.
    pub(crate) fn history(&self) -> Option<&History> {
        self.history.as_ref()
    }

    /// The retention of `b`'s topic if `b` is recorded in its history: the topic is
    /// recoverable and the payload is not binary (the V2 binary broadcast frame has no slot
    /// for a position).
    pub(crate) fn recorded(&self, b: &Broadcast) -> Option<history::Retention> {
        self.history
            .as_ref()
            .filter(|_| !matches!(b.payload(), firebrand_protocol::Payload::Binary(_)))
            .and_then(|h| h.retention(b.topic()))
    }

    /// Delivers `b` to this node's subscribers (except `from`) and counts it. On a recoverable
    /// topic of a node alone it is recorded first, and delivered with its position. (On a
    /// clustered node the engine gives positions: [`Hub::record`]; what is dispatched here
    /// only, a `local_broadcast`, goes out without one.)
    pub(crate) fn dispatch_local(&self, b: &Broadcast, from: Option<SubId>) {
        let recorded = self
            .history
            .as_ref()
            .filter(|h| !h.fed(b.topic()))
            .and_then(|h| Some((h, self.recorded(b)?)));
        match recorded {
            Some((history, retention)) => {
                let (started, mut delivered) = (Started::now(), 0);
                history.append(b, retention, |b| delivered = self.pubsub.dispatch(b, from));
                self.count_broadcast(delivered, started);
            }
            None => self.dispatch_unrecorded(b, from),
        }
    }

    /// Delivers `b` to this node's subscribers (except `from`) as it is, recoverable topic or
    /// not, and counts it.
    pub(crate) fn dispatch_unrecorded(&self, b: &Broadcast, from: Option<SubId>) {
        let started = Started::now();
        let delivered = self.pubsub.dispatch(b, from);
        self.count_broadcast(delivered, started);
    }

    /// Counts a broadcast queued to `delivered` subscribers, whose fan-out began at `started`.
    fn count_broadcast(&self, delivered: u64, started: Started) {
        started.record("firebrand_broadcast_queue_seconds");
        self.counters.broadcasts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .deliveries
            .fetch_add(delivered, Ordering::Relaxed);
    }

    /// Delivers `b`, which the engine recorded at `at`, to this node's subscribers (except
    /// `from`) with its position, and counts it.
    pub(crate) fn record(&self, b: &Broadcast, at: Recorded, from: Option<SubId>) {
        let (Some(history), Some(retention)) = (&self.history, self.recorded(b)) else {
            // Not recoverable here (nodes configured differently): delivered as it is.
            return self.dispatch_local(b, from);
        };
        let (started, mut delivered) = (Started::now(), 0);
        history.record(b, at, retention, |b| {
            // A gap's `phx_error` (no position) goes to every subscriber, the publisher's too:
            // its client must rejoin as well.
            let from = from.filter(|_| b.position().is_some());
            delivered += self.pubsub.dispatch(b, from)
        });
        self.count_broadcast(delivered, started);
    }

    /// The engine's delivery to this node was interrupted: see [`History::interrupted`].
    pub(crate) fn interrupted(&self) {
        if let Some(history) = &self.history {
            history.interrupted(|b| {
                self.pubsub.dispatch(b, None);
            });
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(crate) fn count_slow_consumer(&self) {
        self.counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_limit(&self, limit: Limit) {
        self.counters.limits[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A channel joined; its join began at `started`.
    pub(crate) fn count_join(&self, started: Started) {
        started.record("firebrand_join_seconds");
        self.counters.joins.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_join_refused(&self) {
        self.counters.joins_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A joined channel ended.
    pub(crate) fn count_channel_closed(&self) {
        self.counters
            .channels_closed
            .fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn count_message_in(&self) {
        self.counters.messages_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch of `frames` frames, `bytes` long, was written to a connection.
    #[inline]
    pub(crate) fn count_written(&self, frames: usize, bytes: usize) {
        let c = &self.counters;
        c.frames_out.fetch_add(frames as u64, Ordering::Relaxed);
        c.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
        c.writes_out.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` pushes or replies were compressed for a connection (broadcasts count theirs in
    /// the PubSub).
    pub(crate) fn count_compressed(&self, n: u64) {
        self.pubsub.compressed.fetch_add(n, Ordering::Relaxed);
    }

    /// Messages compressed with permessage-deflate.
    pub(crate) fn compressed(&self) -> u64 {
        self.pubsub.compressed.load(Ordering::Relaxed)
    }

    pub(crate) fn count_refused(&self, why: Refused) {
        self.counters.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the node as draining: from now on connections are refused.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn count_protocol_error(&self) {
        self.counters
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Registers a live connection until the guard drops.
    pub(crate) fn register(self: &Arc<Self>, outbox: Arc<Outbox>) -> Registered {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().insert(id, outbox);
        Registered {
            hub: self.clone(),
            id,
        }
    }

    /// The live connections' outboxes.
    pub(crate) fn connections(&self) -> Vec<Arc<Outbox>> {
        self.conns.lock().values().cloned().collect()
    }

    /// Connections registered since the start.
    pub(crate) fn connections_opened(&self) -> u64 {
        self.next_conn.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.conns.lock().len()
    }

    /// Resolves once no connection is left (re-check the registry after arming it).
    pub(crate) fn all_closed(&self) -> tokio::sync::futures::Notified<'_> {
        self.all_closed.notified()
    }
}

impl DiffSink for Hub {
    fn publish_diff(&self, diff: &Diff<'_>) {
        // Each node broadcasts its own view's diffs to its local subscribers.
        let started = Started::now();
        self.count_broadcast(self.pubsub.dispatch_sequenced(diff), started);
    }
}

/// A connection's registration with its node; dropping it unregisters.
pub(crate) struct Registered {
    hub: Arc<Hub>,
    id: u64,
}

impl Registered {
    /// The node the connection is registered with.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Closes the connection ([`Close::IDLE`](queue::Close::IDLE), through its outbox) once
    /// [`Registered::touch`] has not been called for `timeout`; it is first called now.
    pub(crate) fn watch_idle(&self, outbox: &Outbox, timeout: Duration) {
        self.hub.idle.watch(&self.hub, timeout);
        self.touch(outbox, timeout);
    }

    /// Milliseconds on the node's clock (tokio's: paused in tests).
    pub(crate) fn now_ms(&self) -> u64 {
        self.hub.idle.now_ms()
    }

    /// The client was heard from: the idle deadline moves to `timeout` from now.
    #[inline]
    pub(crate) fn touch(&self, outbox: &Outbox, timeout: Duration) {
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        outbox.set_idle_deadline(self.hub.idle.now_ms().saturating_add(timeout));
    }
}

/// The idle timeout of every WebSocket connection of a node, kept by one task: each connection
/// stores its deadline (milliseconds on this clock) in its outbox when it reads, and the sweep
/// closes those past it. A timer per connection would cost each idle connection 128 bytes
/// more (tokio's `Sleep` in the connection task) and a timer reset per read; the sweep costs
/// one pass over the registry every eighth of the shortest timeout (10 ms to 1 s), so a
/// connection closes up to that much after its timeout.
struct IdleSweep {
    /// The clock's zero.
    epoch: tokio::time::Instant,
    /// Milliseconds between passes; `u64::MAX` until a connection is watched.
    period_ms: AtomicU64,
    /// Whether the sweeping task runs (it clears this when it ends, e.g. with its runtime).
    running: Arc<std::sync::atomic::AtomicBool>,
}

impl IdleSweep {
    fn new() -> Self {
        IdleSweep {
            epoch: tokio::time::Instant::now(),
            period_ms: AtomicU64::new(u64::MAX),
            running: Arc::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Makes the sweep run at least as often as `timeout` needs; starts it if it is not running.
    fn watch(&self, hub: &Arc<Hub>, timeout: Duration) {
        let period = (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        self.period_ms
            .fetch_min(period.as_millis() as u64, Ordering::Relaxed);
        if !self.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(Self::sweep(Arc::downgrade(hub), self.running.clone()));
        }
    }

    /// Until the hub is gone: every period, closes the connections past their deadline.
    async fn sweep(hub: Weak<Hub>, running: Arc<std::sync::atomic::AtomicBool>) {
        /// Clears `running` however the task ends (a runtime shutting down drops it).
        struct Running(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _running = Running(running);
        loop {
            let Some(period) = hub
                .upgrade()
                .map(|h| h.idle.period_ms.load(Ordering::Relaxed))
            else {
                return;
            };
            tokio::time::sleep(Duration::from_millis(period)).await;
            let Some(hub) = hub.upgrade() else { return };
            let now = hub.idle.now_ms();
            for outbox in hub.conns.lock().values() {
                if outbox.idle_deadline() <= now {
                    outbox.close(queue::Close::IDLE);
                }
            }
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut conns = self.hub.conns.lock();
        conns.remove(&self.id);
        if conns.is_empty() {
            self.hub.all_closed.notify_waiters();
        }
    }
}
