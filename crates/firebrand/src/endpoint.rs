//! The [`Endpoint`]: the cloneable handle to a node's sockets and PubSub.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use firebrand_protocol::Payload;
use parking_lot::Mutex;

use crate::cluster::HistorySource;
use crate::cluster::{Adapter, Answer, Cluster, Confirm, Settings};
use crate::limits::Limit;
use crate::node::history::{History, Recorded, Retention, Route};
use crate::node::presence::PresenceFetch;
use crate::node::pubsub::{Broadcast, BroadcastError, SubId};
use crate::node::queue::Close;
use crate::node::subscription::Subscription;
use crate::node::{Hub, Refused};

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
/// assert_eq!(endpoint.stats().broadcasts, 1); // a socket id is not a topic
/// ```
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}
struct Inner {
    hub: Arc<Hub>,
    /// This node in its cluster, when an adapter is set.
    cluster: Option<Arc<Cluster>>,
    /// What transports keep per endpoint (long-poll sessions), one value per type.
    locals: Mutex<Vec<Arc<dyn Any + Send + Sync>>>,
}

/// Counters of an [`Endpoint`], from [`Endpoint::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Open connections.
    pub connections: usize,
    /// Connections opened since the start (WebSocket and long-poll).
    pub connections_opened: u64,
    /// Connection requests refused for their `Origin`.
    pub refused_origin: u64,
    /// Connection requests refused for their `vsn` (no such serializer).
    pub refused_vsn: u64,
    /// Connection requests refused by [`Socket::connect`](crate::Socket::connect).
    pub refused_connect: u64,
    /// Connection requests refused (503) because the endpoint was draining.
    pub refused_draining: u64,
    /// Channels joined (the join answered `ok`).
    pub joins: u64,
    /// Joins refused by the channel's [`join`](crate::Channel::join).
    pub joins_refused: u64,
    /// Joined channels that ended: left, closed, crashed, replaced by a new join, or their
    /// connection gone. `joins - channels_closed` are joined now.
    pub channels_closed: u64,
    /// Messages received from clients (decoded; heartbeats and joins included).
    pub messages_in: u64,
    /// Frames written to WebSocket clients (replies, pushes, broadcasts, controls).
    pub frames_out: u64,
    /// Bytes written to WebSocket clients (frames with their headers).
    pub bytes_out: u64,
    /// Writes to WebSocket clients: each writes every frame queued to its connection at the
    /// time, in one `write` call unless the client's socket buffer is full. `frames_out /
    /// writes_out` is how many frames a write carries: broadcasts that come together (a burst
    /// of pipelined `POST`s to a [`Server`](crate::Server)) reach each subscriber in one write.
    pub writes_out: u64,
    /// Messages compressed for WebSocket clients that negotiated permessage-deflate
    /// ([`SocketBuilder::compress`](crate::SocketBuilder::compress)): a broadcast once for all
    /// its compressing subscribers (per serializer), a push or reply once. Messages sent
    /// uncompressed (short ones, those that would not shrink) are not counted.
    pub compressed: u64,
    /// Presence entries tracked (this node's and, in a cluster, the other nodes').
    pub presences: usize,
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
    /// Bytes the histories of [recoverable](EndpointBuilder::history) topics hold on this node,
    /// as their [budget](EndpointBuilder::history_budget) counts them.
    pub history_bytes: u64,
    /// Stalls of the cluster engine link noticed: none of this node's own heartbeats came
    /// back within three heartbeat periods (at least 2 s), though the adapter's connection
    /// looked up. The node is not [ready](Endpoint::cluster_ready) while one lasts.
    pub cluster_stalls: u64,
    /// History entries evicted (oldest first, across topics) to keep within the
    /// [budget](EndpointBuilder::history_budget). A rejoin from before one of them answers
    /// `recovered: false` on a node alone (in a cluster, the engine is read).
    pub history_evictions: u64,
}

/// What a recoverable topic's history holds, from [`Endpoint::history`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HistoryPage {
    /// The topic's position now (the last broadcast's; `None` when the history could not be
    /// read from the cluster's engine).
    pub position: Option<String>,
    /// With `since`: whether the history still held everything after it (`false`: too old,
    /// from a lost history, not a position; then `broadcasts` is empty). Without: `None`.
    pub recovered: Option<bool>,
    /// The kept broadcasts (after `since`, if given), oldest first, each with its
    /// [`position`](Broadcast::position).
    pub broadcasts: Vec<Broadcast>,
    /// With `since`, on a clustered node: the engine had to be read to check it and could not
    /// be (then `recovered` is `None` and `broadcasts` empty): ask again later. A channel join
    /// in that case is refused with `{"reason": "history unavailable"}`.
    pub unavailable: bool,
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
    history: Vec<Route>,
    history_budget: usize,
}

impl EndpointBuilder {
    /// The default [`history_budget`](Self::history_budget): 64 MiB.
    pub const DEFAULT_HISTORY_BUDGET: usize = 64 << 20;

    /// Makes the topics matching `pattern` (`"stream:*"`, or one topic) **recoverable**: their
    /// last `size` broadcasts (none older than `max_age`) are kept, each with a position that
    /// travels in the message's `ref` slot, and a client that rejoins with the last position it
    /// saw (`{"since": P}` in its join params) gets what it missed, in order and once, before
    /// newer broadcasts. The join reply carries the topic's `"position"` and, with `since`,
    /// `"recovered"`: `true` when the history still held everything after it (replayed right
    /// after the reply), `false` when it did not (too old, from a lost history, not a position):
    /// then nothing is replayed and the client knows to reload. Binary payloads are not recorded
    /// (the V2 binary broadcast frame has no `ref` slot).
    ///
    /// The official client, unmodified: its join params may be a function, evaluated on every
    /// rejoin.
    ///
    /// ```js
    /// let last = null
    /// const ch = socket.channel("stream:news", () => (last ? {since: last} : {}))
    /// ch.on("new_msg", (msg, position) => { last = position; show(msg) })
    /// ch.join().receive("ok", ({position, recovered}) => {
    ///   if (recovered === false) reload()
    ///   if (last === null || recovered === false) last = position // resume from here
    /// })
    /// ```
    ///
    /// ```
    /// use std::time::Duration;
    /// let endpoint = firebrand::Endpoint::builder()
    ///     .history("stream:*", 1000, Duration::from_secs(300))
    ///     .build();
    /// # drop(endpoint);
    /// ```
    ///
    /// On a node alone the history lives in the process (a restart starts new epochs: old
    /// positions are then not recovered). With an [`adapter`](Self::adapter) that keeps
    /// histories (Redis, NATS JetStream: [`HistoryEngine`](crate::cluster::HistoryEngine)) it
    /// lives in the engine: a position is the same on every node, and a client recovers on any
    /// node, also after the one it was on died; configure every node alike. Each node keeps
    /// its own ring of recent broadcasts as a cache, so most rejoins do not ask the engine.
    /// With an adapter that keeps none, topics are not recoverable and `build` logs a warning.
    ///
    /// Clients choose topic names: what all the recoverable topics of a node keep is bounded
    /// by the [`history_budget`](Self::history_budget), not only by `size` and `max_age`.
    pub fn history(mut self, pattern: &str, size: usize, max_age: Duration) -> Self {
        self.history
            .push(Route::plain(pattern, Retention { size, max_age }));
        self
    }

    /// Makes the topics matching `pattern` recoverable, as [`history`](Self::history) does,
    /// with their positions and their history given by `source`: a durable log that every node
    /// reads (a database outbox: `firebrand-postgres`). The log's reader hands each entry to
    /// [`Endpoint::broadcast_from_source`]; a rejoin whose `since` this node's ring does not
    /// cover reads the source ([`HistorySource`] is the contract). `size` and `max_age` bound
    /// what a read returns and what the node's ring keeps as a cache.
    ///
    /// Positions are then the log's: the same on every node, and still valid after a restart
    /// of every node, so a client recovers what it missed across one. Broadcasts on such a
    /// topic made any other way go out without a position and are not kept.
    pub fn history_source(
        mut self,
        pattern: &str,
        size: usize,
        max_age: Duration,
        source: Arc<dyn HistorySource>,
    ) -> Self {
        self.history.push(Route {
            pattern: pattern.into(),
            retention: Retention { size, max_age },
            source: Some(source),
        });
        self
    }

    /// The most bytes the histories of all [recoverable](Self::history) topics hold on this
    /// node together. Default [`DEFAULT_HISTORY_BUDGET`](Self::DEFAULT_HISTORY_BUDGET),
    /// 64 MiB.
    ///
    /// An entry is counted for twice its payload, topic and event (the broadcast, and the frame
    /// encoded for subscribers and replays) plus 512 bytes, and a topic holding entries for its
    /// name plus 512 bytes: about what the process's memory grows by. When a broadcast would
    /// take the total past the budget, the **oldest entries across all topics** are evicted
    /// first (counted in [`Stats::history_evictions`]; the total is
    /// [`Stats::history_bytes`]). An evicted entry is gone from its topic's history as if
    /// trimmed by `size` or `max_age`: a client rejoining from before it gets
    /// `recovered: false` on a node alone, never a wrong `true`; on a clustered node the ring
    /// is only a cache of the engine's history, so such a rejoin reads the engine and still
    /// recovers what the engine keeps.
    ///
    /// Without a budget, topics named by clients (one client joining `stream:1`, `stream:2`, …
    /// and broadcasting on them) could pin `size` frames of up to 1 MiB each, per topic, for
    /// `max_age`. 64 MiB keeps, say, 25 topics' full rings of 1,000 messages of 1 KiB, or
    /// 80,000 messages of 128 bytes, while bounding what a node spends on its histories.
    ///
    /// ```
    /// use std::time::Duration;
    /// let endpoint = firebrand::Endpoint::builder()
    ///     .history("stream:*", 1000, Duration::from_secs(300))
    ///     .history_budget(256 << 20) // 256 MiB
    ///     .build();
    /// # drop(endpoint);
    /// ```
    pub fn history_budget(mut self, bytes: usize) -> Self {
        self.history_budget = bytes;
        self
    }

    /// The presence batch window. A topic whose last `presence_diff` went out longer ago than
    /// this sends the next change's diff at once (one diff per change, as Phoenix does);
    /// changes that come faster go out at the end of the window, those of distinct keys merged
    /// into one diff, so a room where thousands join at once costs a few diffs per window, not
    /// one per join. Two changes of one key (a join and its leave) are never merged: they go
    /// out as two diffs, in order, as Phoenix sends them. Default 20 ms.
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

    /// The endpoint. With an adapter, call this inside a Tokio runtime: the adapter starts
    /// (on a thread of the cluster's own; see [`crate::cluster::Adapter::start`]).
    pub fn build(self) -> Endpoint {
        let engine = self.adapter.as_ref().map(|a| a.history().is_some());
        let budget = self.history_budget as u64;
        let routes = self.history.len();
        let history = match (self.history.is_empty(), engine) {
            (true, _) => None,
            (false, None) => Some(History::new(self.history, false, budget)),
            (false, Some(true)) => Some(History::new(self.history, true, budget)),
            (false, Some(false)) => {
                // Only the topics whose positions come from a source stay recoverable.
                let sourced: Vec<_> = self
                    .history
                    .into_iter()
                    .filter(|r| r.source.is_some())
                    .collect();
                if sourced.len() < routes {
                    tracing::warn!(
                        "this cluster adapter keeps no history: its topics are not recoverable"
                    );
                }
                (!sourced.is_empty()).then(|| History::new(sourced, true, budget))
            }
        };
        let hub = Hub::new(
            crate::node::presence::rand_u64(),
            self.presence_batch,
            self.presence_fetch,
            self.adapter.is_some(),
            history,
        );
        let cluster = self.adapter.map(|adapter| {
            // The diff flusher runs on the app's runtime: start it here, not on the cluster's.
            hub.tracker();
            let settings = Settings {
                heartbeat: self.heartbeat,
                down_after: self.down_after,
                secret: self.cluster_secret,
            };
            Cluster::start(hub.clone(), adapter, settings)
        });
        Endpoint {
            inner: Arc::new(Inner {
                hub,
                cluster,
                locals: Mutex::default(),
            }),
        }
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
            history: Vec::new(),
            history_budget: EndpointBuilder::DEFAULT_HISTORY_BUDGET,
        }
    }

    /// The presences on `topic`: `{key: {"metas": [...]}}`, as `presence_state` carries them.
    pub fn presence_list(&self, topic: &str) -> Payload {
        self.inner.hub.tracker().list(topic)
    }

    /// The topics joined by channels on this node, each with the number of channels joined
    /// to it (in no particular order). Subscriptions made with [`subscribe`](Self::subscribe)
    /// or [`ChannelContext::subscribe`](crate::ChannelContext::subscribe) are not counted.
    ///
    /// ```
    /// let endpoint = firebrand::Endpoint::new();
    /// assert!(endpoint.topics().is_empty()); // nobody has joined anything yet
    /// ```
    pub fn topics(&self) -> Vec<(String, usize)> {
        self.inner.hub.pubsub().channel_counts()
    }

    /// The broadcasts a [recoverable](EndpointBuilder::history) topic's history holds (after
    /// position `since`, if given): what a client rejoining with `since` would be replayed.
    /// `None` when `topic` is not recoverable. On a clustered node whose cache does not reach
    /// back, the engine is read (within its read timeout).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use serde_json::json;
    ///
    /// let endpoint = firebrand::Endpoint::builder()
    ///     .history("stream:*", 100, Duration::from_secs(60))
    ///     .build();
    /// endpoint.broadcast("stream:news", "new_msg", json!({"n": 1}));
    /// let page = endpoint.history("stream:news", None).await.unwrap();
    /// assert_eq!(page.broadcasts.len(), 1);
    /// let seen = page.broadcasts[0].position().unwrap().to_owned();
    ///
    /// endpoint.broadcast("stream:news", "new_msg", json!({"n": 2}));
    /// let page = endpoint.history("stream:news", Some(&seen)).await.unwrap();
    /// assert_eq!(page.recovered, Some(true));
    /// assert_eq!(page.broadcasts[0].payload().to_value(), Some(json!({"n": 2})));
    /// assert!(endpoint.history("room:lobby", None).await.is_none()); // not recoverable
    /// # }
    /// ```
    pub async fn history(&self, topic: &str, since: Option<&str>) -> Option<HistoryPage> {
        let history = self.inner.hub.history()?;
        let retention = history.retention(topic)?;
        let page = self
            .catch_up(history, topic, retention, since, retention.size, |c| {
                HistoryPage {
                    position: c.position,
                    recovered: c.recovered,
                    unavailable: c.unavailable,
                    broadcasts: c.replay,
                }
            })
            .await;
        Some(page)
    }

    /// [`History::catch_up`] of a recoverable topic, for a join or a history read: when this
    /// node's cache cannot answer, the cluster's engine is read (within its read timeout) and
    /// the catch-up tried again with the read; broadcasts the read holds that this node had
    /// not received yet go to its subscribers.
    pub(crate) async fn catch_up<R>(
        &self,
        history: &History,
        topic: &str,
        retention: Retention,
        since: Option<&str>,
        recent: usize,
        mut f: impl FnMut(crate::node::history::CatchUp) -> R,
    ) -> R {
        use crate::node::history::Unread;
        let mut read = None;
        loop {
            let dispatch = |b: &Broadcast| {
                self.inner.hub.pubsub().dispatch(b, None);
            };
            let caught_up =
                history.catch_up(topic, retention, since, recent, read, dispatch, &mut f);
            read = Some(match (caught_up, &self.inner.cluster) {
                (Ok(done), _) => return done,
                (Err(query), _) if history.source(topic).is_some() => {
                    let source = history.source(topic).cloned();
                    read_source(source, topic, query, retention).await
                }
                (Err(query), Some(cluster)) => {
                    match cluster.read_history(topic, query, retention).await {
                        // Timed out, though the link carried by the end: a slow engine, or a
                        // link that healed during the read. Asked once more, the second is
                        // the answer (`recovered: false` if slow again).
                        Err(Unread::Slow) => cluster.read_history(topic, query, retention).await,
                        answer => answer,
                    }
                }
                (Err(_), None) => Err(Unread::Unknown),
            });
        }
    }

    /// Delivers to this node's subscribers of `topic` a broadcast that a
    /// [`HistorySource`] recorded at `offset` of its history's `epoch` (what a source's reader
    /// on every node calls for each entry, in offset order per topic). On a topic routed to a
    /// source ([`EndpointBuilder::history_source`]) it goes out with its position, recorded in
    /// this node's ring, unless the ring already holds that offset (delivered before: handing
    /// an entry twice is harmless). On any other topic it goes out as a
    /// [`local_broadcast`](Self::local_broadcast), without a position. The protocol's own
    /// events are refused as in [`broadcast`](Self::broadcast).
    pub fn broadcast_from_source(
        &self,
        topic: &str,
        event: &str,
        payload: impl Into<Payload>,
        epoch: u64,
        offset: u64,
    ) {
        if refused_event(topic, event) {
            return;
        }
        let b = Broadcast::new(topic, event, payload.into());
        let hub = &self.inner.hub;
        if self.sourced(topic).is_some() {
            let at = Recorded {
                epoch,
                offset,
                prev: None,
            };
            hub.record(&b, at, None);
        } else {
            hub.dispatch_unrecorded(&b, None);
        }
    }

    /// The source of `topic`'s positions, if it is routed to one.
    fn sourced(&self, topic: &str) -> Option<&Arc<dyn HistorySource>> {
        self.inner.hub.history().and_then(|h| h.source(topic))
    }

    /// Broadcasts `event` with `payload` to every subscriber of `topic` (Phoenix's
    /// `Endpoint.broadcast`). Never blocks: each subscriber's frame is queued.
    ///
    /// The protocol's own events ([`is_protocol_event`](crate::is_protocol_event): `phx_*`,
    /// and `chan_reply_*`, which phoenix.js takes as the reply to a pending push) are not the
    /// app's to send: such a broadcast is dropped and logged, here and in every other way to
    /// broadcast or push (a channel's `broadcast*` and `push`, `local_broadcast`,
    /// `direct_broadcast`). So a channel that relays a client's event name cannot be made to
    /// answer or close other clients' channels. `presence_state` and `presence_diff` stay the
    /// app's (a channel pushes `presence_state` itself); refuse them from clients in the
    /// channel if its clients must not send them (firebrand-server does).
    pub fn broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) {
        self.publish(Broadcast::new(topic, event, payload.into()), None);
    }

    /// [`broadcast`](Endpoint::broadcast), and a future that says whether the cluster's engine
    /// has it: for a publisher that must not have a broadcast silently lost to other nodes (an
    /// API that answers its caller, say). The broadcast is made when this is called, as
    /// [`broadcast`](Endpoint::broadcast) makes it (this node's subscribers get it at once; on
    /// a recoverable topic, when the engine hands it back with its position); the future only
    /// waits for the answer.
    ///
    /// The future resolves `Ok(())` once the engine said it has the message (Redis answered
    /// the command that published it; NATS answered a round trip sent after it on the same
    /// connection, or JetStream acknowledged the append) — at once without a cluster. Then
    /// every node subscribed to the engine gets it, once. `Err` says what became of it
    /// ([`BroadcastError`]): refused (a protocol event), never sent (engine unreachable, queue
    /// full: no other node gets it), or sent but unconfirmed (the connection was torn down
    /// with it in flight: other nodes may have got it, at most once). It never resolves while
    /// the engine link is stalled (bytes held, connection up): the message waits in the
    /// connection and is delivered when the link carries again, or fails if the connection is
    /// torn down first. Bound the wait with a timeout. Dropping the future does not undo the
    /// broadcast; it is cancel-safe.
    ///
    /// [`broadcast`](Endpoint::broadcast) costs nothing of this: use it where nobody waits.
    ///
    /// ```
    /// # async fn f() {
    /// use std::time::Duration;
    /// let endpoint = firebrand::Endpoint::new();
    /// let sent = endpoint.broadcast_confirmed("room:lobby", "new_msg", serde_json::json!({"body": "hi"}));
    /// match tokio::time::timeout(Duration::from_secs(5), sent).await {
    ///     Ok(Ok(())) => {}                  // every node gets it
    ///     Ok(Err(e)) => eprintln!("{e}"),   // see e.may_have_been_delivered()
    ///     Err(_) => {}                      // queued behind a stalled link
    /// }
    /// # }
    /// ```
    pub fn broadcast_confirmed(
        &self,
        topic: &str,
        event: &str,
        payload: impl Into<Payload>,
    ) -> impl Future<Output = Result<(), BroadcastError>> + Send + 'static {
        let answer = self.publish_with(Broadcast::new(topic, event, payload.into()), None, true);
        async move {
            match answer {
                Err(e) => Err(e),
                Ok(None) => Ok(()),
                // An answer dropped unanswered (the adapter stopped): not confirmed.
                Ok(Some(answer)) => answer.await.unwrap_or(Err(BroadcastError::Unconfirmed)),
            }
        }
    }

    /// Receives `topic`'s broadcasts in Rust code outside any channel (Phoenix's
    /// `Phoenix.PubSub.subscribe/2`): from channels, from [`broadcast`](Endpoint::broadcast),
    /// and in a cluster from every node. At most `capacity` unread broadcasts are held: a
    /// reader that falls behind loses the oldest and is told how many (see [`Subscription`]);
    /// it never slows the publisher or the topic's clients. Dropping it unsubscribes.
    ///
    /// ```
    /// # async fn f() {
    /// let endpoint = firebrand::Endpoint::new();
    /// let mut messages = endpoint.subscribe("room:lobby", 1024);
    /// tokio::spawn(async move {
    ///     while let Ok(b) = messages.recv().await {
    ///         println!("{} on {}: {:?}", b.event(), b.topic(), b.payload().to_value());
    ///     }
    /// });
    /// endpoint.broadcast("room:lobby", "new_msg", serde_json::json!({"body": "hi"}));
    /// # }
    /// ```
    ///
    /// On a [recoverable](EndpointBuilder::history) topic each broadcast carries its
    /// [`position`](Broadcast::position).
    pub fn subscribe(&self, topic: &str, capacity: usize) -> Subscription {
        Subscription::new(&self.inner.hub, topic, capacity)
    }

    /// Broadcasts to the subscribers of `topic` on this node only (Phoenix's
    /// `local_broadcast`).
    pub fn local_broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) {
        if refused_event(topic, event) {
            return;
        }
        self.inner
            .hub
            .dispatch_local(&Broadcast::new(topic, event, payload.into()), None);
    }

    /// This node's id in its cluster (`None` without an adapter).
    pub fn node(&self) -> Option<u64> {
        self.inner.cluster.as_ref().map(|c| c.node())
    }

    /// The other nodes heard from within the down period.
    pub fn nodes(&self) -> Vec<u64> {
        self.inner
            .cluster
            .as_ref()
            .map_or(Vec::new(), |c| c.nodes())
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
        if refused_event(topic, event) {
            return;
        }
        let broadcast = Broadcast::new(topic, event, payload.into());
        match &self.inner.cluster {
            Some(c) if node != c.node() => c.direct(node, broadcast),
            _ => self.inner.hub.dispatch_local(&broadcast, None),
        }
    }

    /// Closes every connection whose [`Socket::id`](crate::Socket::id) is `socket_id`, on every
    /// node, with code 1001: what Phoenix does with a `"disconnect"` broadcast on the socket
    /// id. Their channels terminate with [`StopReason::Closed`](crate::StopReason::Closed) and
    /// get no `phx_close`.
    ///
    /// Unlike Phoenix, a socket id is not a topic: it lives in a registry of its own, so no
    /// channel can join it (to watch another user's disconnects), and no broadcast on a topic
    /// of the same name — a client's push relayed by a channel, say — closes anything. This
    /// method is the only way in.
    pub fn disconnect(&self, socket_id: &str) {
        if let Some(c) = &self.inner.cluster {
            c.disconnect(socket_id);
        }
        self.inner.hub.disconnect_local(socket_id);
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> Stats {
        let hub = &self.inner.hub;
        let c = hub.counters();
        let limit = |l: Limit| c.limits[l as usize].load(Ordering::Relaxed);
        let (cluster_received, cluster_lost, cluster_rejected) = self
            .inner
            .cluster
            .as_ref()
            .map_or((0, 0, 0), |c| c.link().counts());
        let refused = |r: Refused| c.refused[r as usize].load(Ordering::Relaxed);
        let (history_bytes, history_evictions) = hub.history().map_or((0, 0), |h| h.usage());
        Stats {
            connections: hub.connection_count(),
            connections_opened: hub.connections_opened(),
            refused_origin: refused(Refused::Origin),
            refused_vsn: refused(Refused::Vsn),
            refused_connect: refused(Refused::Connect),
            refused_draining: refused(Refused::Draining),
            joins: c.joins.load(Ordering::Relaxed),
            joins_refused: c.joins_refused.load(Ordering::Relaxed),
            channels_closed: c.channels_closed.load(Ordering::Relaxed),
            messages_in: c.messages_in.load(Ordering::Relaxed),
            frames_out: c.frames_out.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            writes_out: c.writes_out.load(Ordering::Relaxed),
            compressed: hub.compressed(),
            presences: hub.presence_count(),
            topics: hub.pubsub().topic_count(),
            broadcasts: c.broadcasts.load(Ordering::Relaxed),
            deliveries: c.deliveries.load(Ordering::Relaxed),
            slow_consumers: c.slow_consumers.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            rate_limited: limit(Limit::Rate),
            payloads_too_large: limit(Limit::Payload),
            topics_too_long: limit(Limit::Topic),
            replies_refused: limit(Limit::PendingReplies),
            cluster_received,
            cluster_lost,
            cluster_rejected,
            cluster_stalls: self.inner.cluster.as_ref().map_or(0, |c| c.link().stalls()),
            history_bytes,
            history_evictions,
        }
    }

    /// Whether the endpoint drains ([`drain`](Endpoint::drain) or
    /// [`shutdown`](Endpoint::shutdown) was called): it refuses new connections with 503, and
    /// a readiness probe should answer "not ready".
    pub fn is_draining(&self) -> bool {
        self.inner.hub.is_draining()
    }

    /// Whether the cluster's engine is reachable, as its adapter last said
    /// ([`ClusterLink::engine_reachable`](crate::cluster::ClusterLink::engine_reachable)):
    /// true without a cluster, and with an adapter that does not say; and its link is not
    /// silent: a link that stops carrying without closing (which the engine's client does not
    /// notice for as long as TCP retries) is noticed when none of this node's own heartbeats
    /// come back for three heartbeat periods, at least 2 s ([`Stats::cluster_stalls`]). For a
    /// readiness probe: a node cut off from its engine neither sends to nor hears from the
    /// other nodes.
    pub fn cluster_ready(&self) -> bool {
        self.inner
            .cluster
            .as_ref()
            .is_none_or(|c| c.link().is_engine_reachable())
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
    /// From the start, [`is_draining`](Endpoint::is_draining) is true and new connection
    /// requests are refused with 503 (the client retries, reaching another node behind a load
    /// balancer), so the listener may stay open meanwhile — for a readiness probe to answer
    /// "not ready".
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
        let hub = &self.inner.hub;
        hub.start_draining();
        let conns = hub.connections();
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
                let notified = hub.all_closed();
                let conns = hub.connections();
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
            let _ = tokio::time::timeout_at(start + deadline, c.leave()).await;
        }
        hub.connection_count()
    }
    /// The node's PubSub, tracker, connections and counters.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.inner.hub
    }

    /// This node's membership of its cluster, if it has an adapter.
    pub(crate) fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.inner.cluster.as_ref()
    }

    /// Broadcasts `b` on every node, to every subscriber but `from`.
    pub(crate) fn publish(&self, b: Broadcast, from: Option<SubId>) {
        let _ = self.publish_with(b, from, false);
    }

    /// [`publish`](Endpoint::publish); with `confirm`, also where the engine's answer arrives
    /// (`None`: nothing to wait for, without a cluster).
    fn publish_with(
        &self,
        b: Broadcast,
        from: Option<SubId>,
        confirm: bool,
    ) -> Result<Option<Answer>, BroadcastError> {
        if refused_event(b.topic(), b.event()) {
            return Err(BroadcastError::ReservedEvent);
        }
        let Some(c) = &self.inner.cluster else {
            self.inner.hub.dispatch_local(&b, from);
            return Ok(None);
        };
        let (confirm, answer) = if confirm {
            let (confirm, answer) = Confirm::new();
            (Some(confirm), Some(answer))
        } else {
            (None, None)
        };
        // Topics whose history comes from a source (a database outbox) are not recorded in
        // the engine: their positions are the source's.
        let engine = c.records() && self.sourced(b.topic()).is_none();
        if let Some(retention) = self.inner.hub.recorded(&b).filter(|_| engine) {
            // Delivered here too when the engine hands it back with its position.
            c.append(&b, from, retention, confirm);
            return Ok(answer);
        }
        // One engine message per broadcast; other nodes deliver to their own subscribers.
        c.broadcast(&b, confirm);
        self.inner.hub.dispatch_local(&b, from);
        Ok(answer)
    }

    /// Broadcasts `b` on every node, to every subscriber but `from`, without recording it in a
    /// recoverable topic's history (no position; never replayed).
    pub(crate) fn publish_unrecorded(&self, b: Broadcast, from: Option<SubId>) {
        if refused_event(b.topic(), b.event()) {
            return;
        }
        if let Some(c) = &self.inner.cluster {
            c.broadcast(&b, None);
        }
        self.inner.hub.dispatch_unrecorded(&b, from);
    }

    /// The endpoint's value of type `T`, made by `make` on first use (what a transport keeps
    /// per endpoint, without the endpoint knowing its type).
    pub(crate) fn local<T: Send + Sync + 'static>(&self, make: impl FnOnce() -> T) -> Arc<T> {
        let mut locals = self.inner.locals.lock();
        if let Some(found) = locals.iter().find_map(|v| v.clone().downcast::<T>().ok()) {
            return found;
        }
        let value = Arc::new(make());
        locals.push(value.clone());
        value
    }
}

/// Reads a [`HistorySource`] for a join (within the engines' read timeout): its answer as a
/// [`Read`](crate::node::history::Read), or unknown (the join is refused; the client retries).
async fn read_source(
    source: Option<Arc<dyn HistorySource>>,
    topic: &str,
    query: crate::cluster::Query,
    retention: Retention,
) -> Result<crate::node::history::Read, crate::node::history::Unread> {
    use crate::node::history::{Read, Unread};
    let Some(source) = source else {
        return Err(Unread::Unknown);
    };
    let read = source.read(topic, query, retention);
    let answer = match tokio::time::timeout(crate::cluster::READ_TIMEOUT, read).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            tracing::warn!(topic, error = %e, "history source read failed");
            return Err(Unread::Unknown);
        }
        Err(_) => {
            tracing::warn!(topic, "history source read timed out");
            return Err(Unread::Unknown);
        }
    };
    // A source's claim never reaches past its top (a forged `since` must not make this node
    // skip what comes next), nor its entries outside (from, top].
    let (top, from) = (answer.top, answer.from.min(answer.top));
    let entries = answer
        .entries
        .into_iter()
        .filter(|e| from < e.offset && e.offset <= top)
        .map(|e| (e.offset, e.age, Broadcast::new(topic, e.event, e.payload)))
        .collect();
    Ok(Read {
        epoch: answer.epoch,
        from,
        top,
        entries,
    })
}

/// Whether the app's broadcast or push of `event` is refused: the protocol's own events are
/// not the app's to send ([`Endpoint::broadcast`]). Logged, as the app's bug it is.
pub(crate) fn refused_event(topic: &str, event: &str) -> bool {
    let refused = firebrand_protocol::is_protocol_event(event);
    if refused {
        tracing::warn!(
            topic,
            event,
            "dropped: the protocol's own events (phx_*, chan_reply_*) are not the app's to send"
        );
    }
    refused
}
