//! The [`Endpoint`]: the cloneable handle to a node's sockets and PubSub.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use firebrand_protocol::Payload;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::cluster::{Adapter, Body, ClusterLink, LinkInner};
use crate::limits::Limit;
use crate::node::presence::{Diff, DiffSink, PresenceFetch, Tracker};
use crate::node::pubsub::{Broadcast, PubSub, SubId};
use crate::node::queue::{Close, Outbox};

/// A node's sockets and PubSub. Cheap to clone: keep one in your app state and broadcast from
/// anywhere (an HTTP handler, a background job).
///
/// ```
/// use firebrand::{Endpoint, Payload};
/// use serde_json::json;
///
/// let endpoint = Endpoint::new();
/// endpoint.broadcast("room:lobby", "new_msg", json!({"body": "server says hi"}));
/// endpoint.disconnect("user_socket:42"); // closes every connection of user 42 (code 1001)
/// assert_eq!(endpoint.stats().broadcasts, 2); // the disconnect is a broadcast too
/// ```
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

struct Inner {
    pubsub: PubSub,
    /// This node in its cluster, when an adapter is set.
    cluster: Option<Cluster>,
    tracker: Arc<Tracker>,
    longpoll: Arc<crate::transport::longpoll::Sessions>,
    conns: Mutex<HashMap<u64, Arc<Outbox>>>,
    next_conn: AtomicU64,
    all_closed: Notify,
    broadcasts: AtomicU64,
    deliveries: AtomicU64,
    slow_consumers: AtomicU64,
    protocol_errors: AtomicU64,
    /// Per [`Limit`], in its declaration order.
    limits: [AtomicU64; 4],
}

/// Counters of an [`Endpoint`], from [`Endpoint::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Open connections.
    pub connections: usize,
    /// Topics with at least one subscriber on this node.
    pub topics: usize,
    /// Broadcasts published on this node.
    pub broadcasts: u64,
    /// Frames queued to connections by broadcasts (fastlane deliveries).
    pub deliveries: u64,
    /// Connections closed because they could not keep up (code 1008).
    pub slow_consumers: u64,
    /// Connections closed for sending undecodable frames (code 1007).
    pub protocol_errors: u64,
    /// Messages and joins refused by the rate limits.
    pub rate_limited: u64,
    /// Messages refused for a payload over `max_payload`.
    pub payloads_too_large: u64,
    /// Messages refused for a topic over `max_topic_len`.
    pub topics_too_long: u64,
    /// Pushes refused an async reply (`max_pending_replies`).
    pub replies_refused: u64,
    /// Messages received from other nodes.
    pub cluster_received: u64,
    /// Messages the adapter could not send to other nodes (engine outage, full queue).
    pub cluster_lost: u64,
    /// Messages from other nodes dropped: undecodable or of another format version; with a
    /// cluster secret, without a valid tag or replayed; presence gossip of other nodes'
    /// presences; long-poll answers from a node that was not asked.
    pub cluster_rejected: u64,
}

impl Default for Endpoint {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Configures an [`Endpoint`]. Made by [`Endpoint::builder`].
///
/// ```
/// use std::time::Duration;
/// use firebrand::Endpoint;
///
/// let endpoint = Endpoint::builder()
///     .presence_batch(Duration::from_millis(50))
///     .presence_fetch(|_topic, entries| {
///         for (user_id, entry) in entries.iter_mut() {
///             entry["user"] = serde_json::json!({"name": format!("User {user_id}")});
///         }
///     })
///     .build();
/// # drop(endpoint);
/// ```
pub struct EndpointBuilder {
    presence_batch: Duration,
    presence_fetch: Option<PresenceFetch>,
    adapter: Option<Arc<dyn Adapter>>,
    heartbeat: Duration,
    down_after: Duration,
    cluster_secret: Option<Vec<u8>>,
}

/// Forwarded long-poll bodies are refused past this size (Phoenix's default body limit) rather
/// than published whole to every node.
pub(crate) const MAX_FORWARD: usize = 8_000_000;

/// An endpoint's adapter and its side of the link.
struct Cluster {
    adapter: Arc<dyn Adapter>,
    link: ClusterLink,
    /// Other nodes: when each was last heard from.
    peers: Mutex<HashMap<u64, tokio::time::Instant>>,
    /// When a presence transfer was last asked of each node.
    asked: Mutex<HashMap<u64, tokio::time::Instant>>,
    /// Up to which generation of each node's changes this node has them all.
    seen: Mutex<HashMap<u64, u64>>,
    heartbeat: Duration,
    down_after: Duration,
    /// The thread the adapter and the gossip run on.
    runtime: ClusterRuntime,
}

/// A thread of the cluster's own, with a single-threaded Tokio runtime, for the adapter's I/O
/// and the presence gossip. Liveness must not depend on the app's runtime: a node whose
/// workers are saturated (a 10,000-user room where each join renders the whole list) still
/// sends and reads heartbeats on time, so the other nodes do not count it down and drop its
/// presences (which would flood every member with leaves and re-joins).
struct ClusterRuntime {
    handle: tokio::runtime::Handle,
    /// Dropped with the endpoint: the thread ends and its tasks with it.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ClusterRuntime {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("firebrand: cannot build the cluster's Tokio runtime");
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("firebrand-cluster".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .expect("firebrand: cannot start the cluster thread");
        ClusterRuntime {
            handle,
            _stop: stop,
        }
    }
}

impl Cluster {
    /// Forgets what is kept of nodes no longer counted as up: what was seen of their changes
    /// and when a transfer was asked of them (else both grow by one entry per node restart).
    fn prune(&self) {
        let peers = self.peers.lock();
        self.seen.lock().retain(|r, _| peers.contains_key(r));
        self.asked.lock().retain(|r, _| peers.contains_key(r));
    }

    fn send(&self, body: &Body) {
        send(&*self.adapter, &self.link, body);
    }
}

/// Encodes `body`, seals it with the cluster secret if there is one, and publishes it.
fn send(adapter: &dyn Adapter, link: &ClusterLink, body: &Body) {
    link.publish(adapter, crate::cluster::encode(link.node(), body));
}

impl EndpointBuilder {
    /// The presence batch window. A topic whose last `presence_diff` went out longer ago than
    /// this sends the next change's diff at once (one diff per change, as Phoenix does);
    /// changes that come faster are merged into one diff at the end of the window, so a room
    /// where thousands join at once costs a few diffs per window, not one per join. Default
    /// 20 ms.
    pub fn presence_batch(mut self, window: Duration) -> Self {
        self.presence_batch = window;
        self
    }

    /// Extends presence entries before they are sent, in lists and in diffs (Phoenix.Presence's
    /// `fetch/2`): `f(topic, entries)` gets `{key: {"metas": [...]}}` to add fields to.
    pub fn presence_fetch(
        mut self,
        f: impl Fn(&str, &mut serde_json::Map<String, serde_json::Value>) + Send + Sync + 'static,
    ) -> Self {
        self.presence_fetch = Some(Arc::new(f));
        self
    }

    /// Joins a cluster through `adapter` (Redis, NATS; see [`crate::cluster`]): broadcasts
    /// reach subscribers on every node. Without one, the endpoint is a single node.
    pub fn adapter(mut self, adapter: impl Adapter) -> Self {
        self.adapter = Some(Arc::new(adapter));
        self
    }

    /// How often a clustered node sends its presence changes and a heartbeat. Default 1 s.
    pub fn presence_heartbeat(mut self, period: Duration) -> Self {
        self.heartbeat = period;
        self
    }

    /// After how long without a heartbeat another node counts as down: its presences are
    /// removed here (with `presence_diff` leaves). Default 5 s. A node that stops gracefully
    /// ([`Endpoint::drain`]) says goodbye and its presences go at once.
    pub fn presence_down_after(mut self, period: Duration) -> Self {
        self.down_after = period;
        self
    }

    /// Authenticates the node-to-node messages with `secret` (the same on every node; 32
    /// random bytes or more): each is sealed with HMAC-SHA256, its sender's id, a counter and
    /// its time, and messages without a valid tag, replayed, or more than a minute off this
    /// node's clock are dropped and counted in [`Stats::cluster_rejected`]. Node clocks must
    /// agree within that minute.
    ///
    /// Without a secret, whoever can publish on the adapter's channel is trusted as a node (as
    /// Phoenix trusts its distribution): keep the engine private. The secret authenticates; it
    /// does not encrypt: broadcasts and presences still travel in clear.
    pub fn cluster_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.cluster_secret = Some(secret.into());
        self
    }

    /// The endpoint. With an adapter, call this inside a Tokio runtime: the adapter starts.
    pub fn build(self) -> Endpoint {
        let node = crate::node::presence::rand_u64();
        let (heartbeat, down_after) = (self.heartbeat, self.down_after);
        let adapter = self.adapter;
        let clustered = adapter.is_some();
        let auth = self
            .cluster_secret
            .as_deref()
            .map(crate::cluster::Auth::new);
        let endpoint = Endpoint {
            inner: Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| Inner {
                cluster: adapter.map(|adapter| {
                    let weak = weak.clone();
                    let link = ClusterLink {
                        inner: Arc::new(LinkInner {
                            node,
                            deliver: Box::new(move |from, body| {
                                if let Some(inner) = weak.upgrade() {
                                    inner.receive(from, body);
                                }
                            }),
                            received: AtomicU64::new(0),
                            lost: AtomicU64::new(0),
                            rejected: AtomicU64::new(0),
                            auth,
                        }),
                    };
                    Cluster {
                        adapter,
                        link,
                        peers: Mutex::default(),
                        asked: Mutex::default(),
                        seen: Mutex::default(),
                        heartbeat,
                        down_after,
                        runtime: ClusterRuntime::start(),
                    }
                }),
                pubsub: PubSub::new(),
                tracker: Arc::new(Tracker::new(
                    node,
                    self.presence_batch,
                    self.presence_fetch,
                    clustered,
                )),
                longpoll: Arc::new(crate::transport::longpoll::Sessions::new(node)),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
                all_closed: Notify::new(),
                broadcasts: AtomicU64::new(0),
                deliveries: AtomicU64::new(0),
                slow_consumers: AtomicU64::new(0),
                protocol_errors: AtomicU64::new(0),
                limits: Default::default(),
            }),
        };
        if let Some(c) = &endpoint.inner.cluster {
            let _on_cluster_thread = c.runtime.handle.enter();
            c.adapter.start(c.link.clone());
            tokio::spawn(gossip(Arc::downgrade(&endpoint.inner)));
            drop(_on_cluster_thread);
            endpoint.tracker();
        }
        endpoint
    }
}

/// How soon a node's presence changes go to the other nodes (at most this often while they
/// change; otherwise with the heartbeat).
const DELTA_PERIOD: Duration = Duration::from_millis(50);

/// A clustered node's presence gossip: its changes within [`DELTA_PERIOD`] of being made, a
/// heartbeat (with whatever changed) at least every heartbeat period, both with this node's
/// change generations; and nodes not heard from for `down_after` are forgotten.
async fn gossip(inner: std::sync::Weak<Inner>) {
    let Some(heartbeat) = inner
        .upgrade()
        .and_then(|i| i.cluster.as_ref().map(|c| c.heartbeat))
    else {
        return;
    };
    let mut tick = tokio::time::interval(DELTA_PERIOD.min(heartbeat));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = tokio::time::Instant::now();
        let due = last_sent.is_none_or(|t| now - t >= heartbeat);
        if due || inner.tracker.has_unsent() {
            inner.send_heartbeat();
            last_sent = Some(now);
        }
        inner.forget_silent_nodes(now);
    }
}

impl Inner {
    /// Sends this node's presence changes since the last heartbeat, with their generations.
    fn send_heartbeat(&self) {
        let Some(c) = &self.cluster else { return };
        let (delta, from, to) = self.tracker.take_delta();
        c.send(&Body::Heartbeat { from, to, delta });
    }

    /// Forgets the nodes not heard from for `down_after` before `now`, and their presences.
    fn forget_silent_nodes(&self, now: tokio::time::Instant) {
        let Some(c) = &self.cluster else { return };
        let down: Vec<u64> = {
            let mut peers = c.peers.lock();
            let down = peers
                .iter()
                .filter(|(_, last)| now - **last > c.down_after)
                .map(|(r, _)| *r)
                .collect::<Vec<_>>();
            for r in &down {
                peers.remove(r);
            }
            down
        };
        c.prune();
        c.link.prune();
        for replica in down {
            tracing::warn!(node = replica, "cluster node down: no heartbeat");
            self.tracker.forget(replica);
        }
    }

    /// Handles a message from another node.
    fn receive(&self, from: u64, body: Body) {
        let Some(c) = &self.cluster else { return };
        let me = c.link.node();
        // Any message shows its node alive: a heartbeat queued behind a burst of broadcasts
        // must not make a busy node look down.
        if let Some(last) = c.peers.lock().get_mut(&from) {
            *last = tokio::time::Instant::now();
        }
        match body {
            Body::Broadcast(b) => self.dispatch_local(&b, None),
            Body::Direct { to, broadcast } if to == me => self.dispatch_local(&broadcast, None),
            Body::Direct { .. } => {}
            Body::Heartbeat {
                from: gen_from,
                to: gen_to,
                delta,
            } => {
                let now = tokio::time::Instant::now();
                if c.peers.lock().insert(from, now).is_none() {
                    tracing::info!(node = from, "cluster node up");
                }
                if !self.tracker.merge_remote(from, &delta) {
                    c.link.reject(
                        from,
                        "presence delta of other nodes' elements, or a clock far ahead",
                    );
                    return;
                }
                let mut seen = c.seen.lock();
                let had = seen.get(&from).copied().unwrap_or(0);
                if had >= gen_from {
                    seen.insert(from, had.max(gen_to));
                } else {
                    // Missed some of its changes (new here, or messages lost during an
                    // outage): ask for its state, at most once per heartbeat period.
                    drop(seen);
                    let mut asked = c.asked.lock();
                    if asked.get(&from).is_none_or(|t| now - *t >= c.heartbeat) {
                        asked.insert(from, now);
                        drop(asked);
                        c.send(&Body::TransferRequest { to: from });
                    }
                }
            }
            Body::TransferRequest { to } if to == me => {
                let (state, generation) = self.tracker.own_slice();
                c.send(&Body::Transfer {
                    to: from,
                    generation,
                    state,
                });
            }
            Body::Transfer {
                to,
                generation,
                state,
            } if to == me => {
                if !self.tracker.merge_remote(from, &state) {
                    c.link.reject(
                        from,
                        "presence transfer of other nodes' elements, or a clock far ahead",
                    );
                    return;
                }
                let mut seen = c.seen.lock();
                let had = seen.entry(from).or_insert(0);
                *had = (*had).max(generation);
            }
            Body::TransferRequest { .. } | Body::Transfer { .. } => {}
            Body::LongPoll {
                to,
                id,
                proof,
                request,
            } if to == me => {
                let sessions = self.longpoll.clone();
                let (adapter, link) = (c.adapter.clone(), c.link.clone());
                tokio::spawn(async move {
                    // Only this node can turn the proof back into the client's token.
                    let answer = match sessions.redeem(&proof) {
                        Some(token) => sessions.answer(&token, request).await,
                        None => crate::transport::longpoll::Answer::NoSession,
                    };
                    let body = Body::LongPollAnswer {
                        to: from,
                        id,
                        answer,
                    };
                    send(&*adapter, &link, &body);
                });
            }
            Body::LongPollAnswer { to, id, answer } if to == me => {
                if !self.longpoll.answered(from, id, answer) {
                    c.link
                        .reject(from, "long-poll answer from a node it was not asked of");
                }
            }
            Body::LongPoll { .. } | Body::LongPollAnswer { .. } => {}
            Body::Goodbye => {
                c.peers.lock().remove(&from);
                c.prune();
                self.tracker.forget(from);
            }
        }
    }

    /// Delivers `b` to this node's subscribers (except `from`) and counts it.
    fn dispatch_local(&self, b: &Broadcast, from: Option<SubId>) {
        let delivered = self.pubsub.dispatch(b, from);
        self.broadcasts.fetch_add(1, Ordering::Relaxed);
        self.deliveries.fetch_add(delivered, Ordering::Relaxed);
    }
}

impl DiffSink for Inner {
    fn publish_diff(&self, diff: &Diff<'_>) {
        // Each node broadcasts its own view's diffs to its local subscribers.
        let delivered = self.pubsub.dispatch_sequenced(diff);
        self.broadcasts.fetch_add(1, Ordering::Relaxed);
        self.deliveries.fetch_add(delivered, Ordering::Relaxed);
    }
}

impl Endpoint {
    /// A new endpoint with the in-process PubSub and default settings.
    pub fn new() -> Self {
        Endpoint::builder().build()
    }

    /// Configures a new endpoint.
    pub fn builder() -> EndpointBuilder {
        EndpointBuilder {
            presence_batch: Duration::from_millis(20),
            presence_fetch: None,
            adapter: None,
            heartbeat: Duration::from_secs(1),
            down_after: Duration::from_secs(5),
            cluster_secret: None,
        }
    }

    /// The presences on `topic`: `{key: {"metas": [...]}}`, as `presence_state` carries them.
    pub fn presence_list(&self, topic: &str) -> Payload {
        self.inner.tracker.list(topic)
    }

    /// The presence tracker, its diff flusher started.
    pub(crate) fn tracker(&self) -> &Arc<Tracker> {
        let weak: std::sync::Weak<dyn DiffSink> = Arc::downgrade(&self.inner) as _;
        self.inner.tracker.start_flusher(weak);
        &self.inner.tracker
    }

    /// Broadcasts `event` with `payload` to every subscriber of `topic` (Phoenix's
    /// `Endpoint.broadcast`). Never blocks: each subscriber's frame is queued.
    pub fn broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) {
        self.publish(Broadcast::new(topic, event, payload.into()), None);
    }

    /// Broadcasts to the subscribers of `topic` on this node only (Phoenix's
    /// `local_broadcast`).
    pub fn local_broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) {
        self.inner
            .dispatch_local(&Broadcast::new(topic, event, payload.into()), None);
    }

    /// This node's id in its cluster (`None` without an adapter).
    pub fn node(&self) -> Option<u64> {
        self.inner.cluster.as_ref().map(|c| c.link.node())
    }

    /// The other nodes heard from within the down period.
    pub fn nodes(&self) -> Vec<u64> {
        let Some(c) = &self.inner.cluster else {
            return Vec::new();
        };
        c.peers.lock().keys().copied().collect()
    }

    /// Broadcasts to the subscribers of `topic` on node `node` only (Phoenix.PubSub's
    /// `direct_broadcast`); on this node's id it is a [`local_broadcast`](Endpoint::local_broadcast).
    pub fn direct_broadcast(
        &self,
        node: u64,
        topic: &str,
        event: &str,
        payload: impl Into<Payload>,
    ) {
        let broadcast = Broadcast::new(topic, event, payload.into());
        match &self.inner.cluster {
            Some(c) if node != c.link.node() => c.send(&Body::Direct {
                to: node,
                broadcast,
            }),
            _ => self.inner.dispatch_local(&broadcast, None),
        }
    }

    /// Closes every connection whose [`Socket::id`] is `socket_id`, with code 1001: the
    /// `"disconnect"` broadcast of Phoenix. Their channels terminate with
    /// [`StopReason::Closed`](crate::StopReason::Closed) and get no `phx_close`.
    pub fn disconnect(&self, socket_id: &str) {
        self.broadcast(socket_id, "disconnect", Payload::empty());
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        let cluster = |f: fn(&LinkInner) -> &AtomicU64| {
            i.cluster
                .as_ref()
                .map_or(0, |c| f(&c.link.inner).load(Ordering::Relaxed))
        };
        Stats {
            connections: i.conns.lock().len(),
            topics: i.pubsub.topic_count(),
            broadcasts: i.broadcasts.load(Ordering::Relaxed),
            deliveries: i.deliveries.load(Ordering::Relaxed),
            slow_consumers: i.slow_consumers.load(Ordering::Relaxed),
            protocol_errors: i.protocol_errors.load(Ordering::Relaxed),
            rate_limited: i.limits[Limit::Rate as usize].load(Ordering::Relaxed),
            payloads_too_large: i.limits[Limit::Payload as usize].load(Ordering::Relaxed),
            topics_too_long: i.limits[Limit::Topic as usize].load(Ordering::Relaxed),
            replies_refused: i.limits[Limit::PendingReplies as usize].load(Ordering::Relaxed),
            cluster_received: cluster(|l| &l.received),
            cluster_lost: cluster(|l| &l.lost),
            cluster_rejected: cluster(|l| &l.rejected),
        }
    }

    /// Closes every connection now with code 1012 and waits up to `deadline` for them to be
    /// gone: [`drain`](Endpoint::drain) with no spreading. Returns the number still open.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        self.drain(Duration::ZERO, deadline).await
    }

    /// Drains the node for a restart: closes its connections with code 1012 (service restart)
    /// in batches spread evenly over `period` — so that clients reconnect (to other nodes
    /// behind a load balancer) a few at a time, not all at once — then waits until they are all
    /// gone or `deadline` (from the start) has passed. Their channels terminate with
    /// [`StopReason::Shutdown`](crate::StopReason::Shutdown) and their presences leave.
    /// Returns the number of connections still open at the end.
    ///
    /// Stop accepting connections first (e.g. axum's `with_graceful_shutdown`); connections
    /// that arrive meanwhile are closed at the end of the period.
    ///
    /// ```no_run
    /// # async fn f(endpoint: firebrand::Endpoint) {
    /// use std::time::Duration;
    /// let still_open = endpoint.drain(Duration::from_secs(10), Duration::from_secs(30)).await;
    /// # }
    /// ```
    pub async fn drain(&self, period: Duration, deadline: Duration) -> usize {
        const TICK: Duration = Duration::from_millis(50);
        let start = tokio::time::Instant::now();
        let conns: Vec<_> = self.inner.conns.lock().values().cloned().collect();
        let ticks = (period.as_millis() / TICK.as_millis()).max(1) as usize;
        let per_tick = conns.len().div_ceil(ticks).max(1);
        for (i, batch) in conns.chunks(per_tick).enumerate() {
            tokio::time::sleep_until(start + TICK * i as u32).await;
            for outbox in batch {
                outbox.close(Close::SHUTDOWN);
            }
        }
        let wait = async {
            loop {
                let notified = self.inner.all_closed.notified();
                let conns: Vec<_> = self.inner.conns.lock().values().cloned().collect();
                if conns.is_empty() {
                    return;
                }
                for outbox in conns {
                    outbox.close(Close::SHUTDOWN);
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout_at(start + deadline, wait).await;
        if let Some(c) = &self.inner.cluster {
            // Other nodes drop this node's presences now rather than after `down_after`.
            c.send(&Body::Goodbye);
            let _ = tokio::time::timeout_at(start + deadline, c.adapter.flush()).await;
        }
        self.inner.conns.lock().len()
    }

    /// This node's long-poll sessions.
    pub(crate) fn longpoll(&self) -> &Arc<crate::transport::longpoll::Sessions> {
        &self.inner.longpoll
    }

    /// Sends a long-poll request to the node holding its session and waits up to `wait` for
    /// the answer (`None`: no answer in time, or no cluster).
    pub(crate) async fn forward_longpoll(
        &self,
        node: u64,
        token: &str,
        request: crate::transport::longpoll::Request,
        wait: Duration,
    ) -> Option<crate::transport::longpoll::Answer> {
        let c = self.inner.cluster.as_ref()?;
        if let crate::transport::longpoll::Request::Post { body, .. } = &request
            && body.len() > MAX_FORWARD
        {
            return Some(crate::transport::longpoll::Answer::Reply {
                http: 413,
                body: "long-poll body too large to forward to its session's node".into(),
            });
        }
        // The token stays here: the session's node gets its data and a digest of its signature.
        let Some(proof) = crate::token::Proof::of(token) else {
            return Some(crate::transport::longpoll::Answer::NoSession);
        };
        let sessions = &self.inner.longpoll;
        let (id, answer) = sessions.expect_answer(node);
        // Forgets the request however this ends (answered, timed out, or the client gone).
        struct Forget<'a>(&'a crate::transport::longpoll::Sessions, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.forget_forward(self.1);
            }
        }
        let _forget = Forget(sessions, id);
        c.send(&Body::LongPoll {
            to: node,
            id,
            proof,
            request,
        });
        let answer = tokio::time::timeout(wait, answer).await.ok()?.ok();
        if answer.is_none() {
            tracing::warn!(
                node,
                "long-poll request forwarded to another node: no answer"
            );
        }
        answer
    }

    pub(crate) fn pubsub(&self) -> &PubSub {
        &self.inner.pubsub
    }

    pub(crate) fn publish(&self, b: Broadcast, from: Option<SubId>) {
        if let Some(c) = &self.inner.cluster {
            // One engine message per broadcast; other nodes deliver to their own subscribers.
            c.send(&Body::Broadcast(b.clone()));
        }
        self.inner.dispatch_local(&b, from);
    }

    pub(crate) fn count_slow_consumer(&self) {
        self.inner.slow_consumers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_limit(&self, limit: Limit) {
        self.inner.limits[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_protocol_error(&self) {
        self.inner.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Registers a live connection until the guard drops.
    pub(crate) fn register(&self, outbox: Arc<Outbox>) -> Registered {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        self.inner.conns.lock().insert(id, outbox);
        Registered {
            endpoint: self.clone(),
            id,
        }
    }
}

/// A connection's registration with its endpoint; dropping it unregisters.
pub(crate) struct Registered {
    endpoint: Endpoint,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut conns = self.endpoint.inner.conns.lock();
        conns.remove(&self.id);
        if conns.is_empty() {
            self.endpoint.inner.all_closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests_only::Loopback;
    use crate::node::presence::crdt::State;
    use crate::transport::longpoll::{Answer, Request};
    use bytes::Bytes;

    fn clustered() -> Endpoint {
        Endpoint::builder().adapter(Loopback::default()).build()
    }

    /// Keeps what an endpoint publishes.
    #[derive(Clone, Default)]
    struct Record(Arc<Mutex<Vec<Bytes>>>);

    impl Adapter for Record {
        fn start(&self, _: ClusterLink) {}

        fn publish(&self, message: Bytes) {
            self.0.lock().push(message);
        }
    }

    #[tokio::test]
    async fn departed_nodes_leave_nothing_behind() {
        let e = clustered();
        let (inner, c) = (&e.inner, e.inner.cluster.as_ref().unwrap());
        let me = c.link.node();
        // Ten nodes (or restarts) with changes this node missed: each is asked for its state.
        for peer in 1..=10 {
            let delta = State::default();
            inner.receive(
                peer,
                Body::Heartbeat {
                    from: 3,
                    to: 4,
                    delta,
                },
            );
            let state = State::default();
            inner.receive(
                peer,
                Body::Transfer {
                    to: me,
                    generation: 4,
                    state,
                },
            );
        }
        let sizes = || {
            (
                c.peers.lock().len(),
                c.asked.lock().len(),
                c.seen.lock().len(),
            )
        };
        assert_eq!(sizes(), (10, 10, 10));
        for peer in 1..=5 {
            inner.receive(peer, Body::Goodbye);
        }
        assert_eq!(sizes(), (5, 5, 5));
        // The others go silent: once they count as down, nothing of them is left.
        inner.forget_silent_nodes(tokio::time::Instant::now() + c.down_after + c.heartbeat);
        assert_eq!(sizes(), (0, 0, 0));
    }

    /// A node whose app runtime is saturated (here: its only thread blocked) keeps its
    /// heartbeats going: the others never count it down.
    #[test]
    fn a_saturated_node_is_not_counted_down() {
        let bus = Loopback::default();
        let node = || {
            Endpoint::builder()
                .adapter(bus.clone())
                .presence_heartbeat(Duration::from_millis(20))
                .presence_down_after(Duration::from_millis(200))
        };
        let busy = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = busy.block_on(async { node().build() });
        let (a_id, watcher_rt) = (a.node().unwrap(), tokio::runtime::Runtime::new().unwrap());
        let b = watcher_rt.block_on(async { node().build() });
        // Heartbeats are the event, and no hook announces them: look until `b` has heard `a`.
        let start = std::time::Instant::now();
        while !b.nodes().contains(&a_id) {
            assert!(start.elapsed() < Duration::from_secs(5), "b never heard a");
            std::thread::sleep(Duration::from_millis(5));
        }
        busy.block_on(async {
            // Five times the down period without yielding to `a`'s runtime.
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(1) {
                assert!(b.nodes().contains(&a_id), "a counted down while busy");
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }

    #[tokio::test]
    async fn long_poll_answers_count_only_from_the_node_asked() {
        let e = clustered();
        let me = e.node().unwrap();
        let (id, mut rx) = e.inner.longpoll.expect_answer(5);
        let answer = || Answer::Reply {
            http: 200,
            body: "{}".into(),
        };
        e.inner.receive(
            6,
            Body::LongPollAnswer {
                to: me,
                id,
                answer: answer(),
            },
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(e.stats().cluster_rejected, 1);
        e.inner.receive(
            5,
            Body::LongPollAnswer {
                to: me,
                id,
                answer: answer(),
            },
        );
        assert_eq!(rx.try_recv().ok(), Some(answer()));
    }

    #[tokio::test(start_paused = true)]
    async fn forwarding_keeps_the_token_and_refuses_huge_bodies() {
        let bus = Record::default();
        let e = Endpoint::builder().adapter(bus.clone()).build();
        let wait = Duration::from_millis(10);
        let poll = e.forward_longpoll(5, "eyJkYXRhIjoxfQ.SIGNATURE", Request::Poll, wait);
        assert_eq!(poll.await, None);
        // Format 1, kind 7: the forwarded request (the others are heartbeats).
        let sent = bus
            .0
            .lock()
            .iter()
            .find(|m| m[..2] == [1, 7])
            .cloned()
            .unwrap();
        assert!(sent.windows(9).all(|w| w != b"SIGNATURE"));
        assert!(sent.windows(14).any(|w| w == b"eyJkYXRhIjoxfQ"));

        let post = |len| Request::Post {
            body: Bytes::from(vec![b'x'; len]),
            ndjson: false,
        };
        let huge = e
            .forward_longpoll(5, "a.b", post(MAX_FORWARD + 1), wait)
            .await;
        assert!(
            matches!(huge, Some(Answer::Reply { http: 413, .. })),
            "{huge:?}"
        );
        assert!(bus.0.lock().iter().all(|m| m.len() < MAX_FORWARD));
        assert_eq!(
            e.forward_longpoll(5, "a.b", post(MAX_FORWARD), wait).await,
            None
        );
        assert!(bus.0.lock().iter().any(|m| m.len() > MAX_FORWARD));
    }

    #[tokio::test]
    async fn nodes_hear_only_nodes_with_their_secret() {
        let bus = Loopback::default();
        let with = |secret: Option<&str>| {
            let b = Endpoint::builder().adapter(bus.clone());
            match secret {
                Some(s) => b.cluster_secret(s),
                None => b,
            }
            .build()
        };
        let (a, b, other, open) = (
            with(Some("s")),
            with(Some("s")),
            with(Some("t")),
            with(None),
        );
        a.broadcast("t", "e", serde_json::json!({}));
        open.broadcast("t", "e", serde_json::json!({}));
        let counts = |e: &Endpoint| (e.stats().cluster_received, e.stats().cluster_rejected);
        assert_eq!(counts(&b), (1, 1));
        assert_eq!(counts(&other), (0, 2));
        assert_eq!(counts(&open), (0, 1));
        assert_eq!(counts(&a), (0, 1));
    }
}
