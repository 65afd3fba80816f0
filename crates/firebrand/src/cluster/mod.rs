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

mod auth;
mod gossip;
mod history;
mod link;
mod queue;
mod requests;
mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;

use crate::node::Hub;
use crate::node::history::{Read, Unread};
use crate::node::pubsub::{Broadcast, SubId};
pub(crate) use history::READ_TIMEOUT;
pub use history::{
    Entries, Entry, HistoryEngine, HistoryError, HistorySource, Query, Retention, SourceEntries,
    SourceEntry,
};
pub use link::ClusterLink;
use link::Inbound;
pub(crate) use queue::Answer;
pub use queue::{Confirm, Outgoing, PublishQueue};
pub(crate) use requests::Service;
pub(crate) use wire::{Body, decode, encode};
pub use wire::{FORMAT_VERSION, MessageError};

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

    /// [`publish`](Adapter::publish) for a sender that waits to know whether the message
    /// reached the engine ([`Endpoint::broadcast_confirmed`](crate::Endpoint::broadcast_confirmed)):
    /// answer `confirm` once the engine said it has it, or with why not (see [`Confirm`]).
    /// Must not block either. Only that path pays for the answer: plain broadcasts go through
    /// [`publish`](Adapter::publish). The default publishes and answers
    /// [`BroadcastError::Unconfirmed`](crate::BroadcastError::Unconfirmed): it cannot tell.
    fn publish_confirmed(&self, message: Bytes, confirm: Confirm) {
        self.publish(message);
        confirm.failed(crate::BroadcastError::Unconfirmed);
    }

    /// Resolves once the messages published so far have been handed to the engine (used on
    /// shutdown, so that the node's goodbye reaches the others). The default returns at once.
    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }

    /// The engine's history of recoverable topics, if this adapter keeps one (see
    /// [`HistoryEngine`]). Without it, a clustered endpoint's topics are not recoverable. The
    /// default has none.
    fn history(&self) -> Option<&dyn HistoryEngine> {
        None
    }
}

/// How a clustered endpoint is set up ([`EndpointBuilder`](crate::EndpointBuilder)'s options).
pub(crate) struct Settings {
    pub(crate) heartbeat: Duration,
    pub(crate) down_after: Duration,
    pub(crate) secret: Option<Vec<u8>>,
}

/// A node's membership of its cluster: the adapter and its link, the cluster thread, presence
/// gossip ([`gossip`]) and requests between nodes ([`requests`]). Receives every message of
/// the other nodes and hands each to the part it is for.
pub(crate) struct Cluster {
    hub: Arc<Hub>,
    adapter: Arc<dyn Adapter>,
    link: ClusterLink,
    gossip: gossip::Gossip,
    requests: requests::Requests,
    /// The thread the adapter and the gossip run on.
    runtime: ClusterRuntime,
}

impl Cluster {
    /// Joins the cluster through `adapter`: starts the cluster thread, the adapter on it, and
    /// the gossip.
    pub(crate) fn start(hub: Arc<Hub>, adapter: Arc<dyn Adapter>, settings: Settings) -> Arc<Self> {
        let cluster = Arc::new_cyclic(|me: &Weak<Cluster>| {
            let me = me.clone();
            let deliver = move |inbound| {
                if let Some(cluster) = me.upgrade() {
                    cluster.inbound(inbound);
                }
            };
            Cluster {
                link: ClusterLink::new(
                    hub.id(),
                    Box::new(deliver),
                    settings.secret.as_deref().map(auth::Auth::new),
                    hub.history().and_then(|h| h.largest()),
                ),
                hub,
                adapter,
                gossip: gossip::Gossip::new(settings.heartbeat, settings.down_after),
                requests: requests::Requests::default(),
                runtime: ClusterRuntime::start(),
            }
        });
        let _on_cluster_thread = cluster.runtime.handle.enter();
        cluster.adapter.start(cluster.link.clone());
        tokio::spawn(gossip::run(Arc::downgrade(&cluster)));
        cluster
    }

    /// This node's id.
    pub(crate) fn node(&self) -> u64 {
        self.link.node()
    }

    pub(crate) fn link(&self) -> &ClusterLink {
        &self.link
    }

    /// Encodes `body`, seals it with the cluster secret if there is one, and publishes it.
    fn send(&self, body: &Body) {
        self.send_with(body, None);
    }

    /// [`send`](Cluster::send), answering `confirm`, if given, once the engine has it.
    fn send_with(&self, body: &Body, confirm: Option<Confirm>) {
        self.link
            .publish(&*self.adapter, encode(self.link.node(), body), confirm);
    }

    /// Sends `b` to the subscribers of every other node: one engine message, whatever their
    /// number (answering `confirm`, if given, once the engine has it).
    pub(crate) fn broadcast(&self, b: &Broadcast, confirm: Option<Confirm>) {
        self.send_with(&Body::Broadcast(b.clone()), confirm);
    }

    /// Whether broadcasts of recoverable topics go through the engine's history.
    pub(crate) fn records(&self) -> bool {
        self.adapter.history().is_some()
    }

    /// Appends `b` to its topic's history in the engine, which delivers it with its position to
    /// every node, this one too (where subscriber `from` does not get it). `confirm`, if given,
    /// is answered once the engine has recorded it.
    pub(crate) fn append(
        &self,
        b: &Broadcast,
        from: Option<SubId>,
        retention: Retention,
        confirm: Option<Confirm>,
    ) {
        if let Some(engine) = self.adapter.history() {
            let message = encode(self.link.node(), &Body::Broadcast(b.clone()));
            let message = self.link.seal(history::frame(from, &message));
            match confirm {
                None => engine.append(b.topic(), message, retention),
                Some(c) => engine.append_confirmed(b.topic(), message, retention, c),
            }
        }
    }

    /// Reads `topic`'s history in the engine (on the cluster thread, within
    /// [`history::READ_TIMEOUT`]). When it gives no answer, says why: the engine could not be
    /// asked (an error, or no answer while this node's link heard none of its own messages
    /// back: cut off, or silent), or it was slow on a link that carries.
    pub(crate) async fn read_history(
        &self,
        topic: &str,
        query: Query,
        retention: Retention,
    ) -> Result<Read, Unread> {
        let Some(engine) = self.adapter.history() else {
            return Err(Unread::Unknown);
        };
        let read = engine.read(topic, query, retention);
        let mark = self.link.echo_mark();
        let read = self
            .runtime
            .handle
            .spawn(async move { tokio::time::timeout(history::READ_TIMEOUT, read).await });
        let entries = match read.await {
            Ok(Ok(Ok(entries))) => entries,
            Ok(Ok(Err(e))) => {
                tracing::warn!(topic, error = %e, "history read failed");
                return Err(Unread::Unknown);
            }
            Ok(Err(_)) | Err(_) if self.link.echoed_after(mark) => {
                tracing::warn!(topic, "history read timed out (the engine is slow)");
                return Err(Unread::Slow);
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(topic, "history read timed out (the engine link is silent)");
                return Err(Unread::Unknown);
            }
        };
        // An engine's claim never reaches past its top (a forged `since` must not make this
        // node skip what comes next).
        let from = entries.from.min(entries.top);
        let mut read = Read {
            epoch: entries.epoch,
            from,
            top: entries.top,
            entries: Vec::with_capacity(entries.entries.len()),
        };
        let within = |e: &Entry| e.offset > from && e.offset <= entries.top;
        for entry in entries.entries.into_iter().filter(within) {
            match self.link.open_recorded(&entry.message) {
                Ok((_, _, b)) => read.entries.push((entry.offset, entry.age, b)),
                Err(why) => {
                    // What follows it is still every entry after it.
                    self.link.reject(0, why);
                    read.from = entry.offset;
                    read.entries.clear();
                }
            }
        }
        Ok(read)
    }

    /// Closes the connections of socket id `id` on every other node.
    pub(crate) fn disconnect(&self, id: &str) {
        self.send(&Body::Disconnect(id.to_owned()));
    }

    /// Sends `b` to the subscribers of node `to` only.
    pub(crate) fn direct(&self, to: u64, b: Broadcast) {
        self.send(&Body::Direct { to, broadcast: b });
    }

    /// Tells the other nodes this one is leaving (they drop its presences now rather than
    /// after `down_after`), and waits until the adapter has handed it to the engine.
    pub(crate) async fn leave(&self) {
        self.send(&Body::Goodbye);
        self.adapter.flush().await;
    }

    /// Handles what the engine delivered.
    fn inbound(self: &Arc<Self>, inbound: Inbound) {
        match inbound {
            Inbound::Message { from, body } => self.receive(from, body),
            Inbound::Recorded {
                at,
                from,
                broadcast,
            } => self.hub.record(&broadcast, at, from),
            Inbound::Interrupted => self.hub.interrupted(),
        }
    }

    /// Handles a message from another node.
    fn receive(self: &Arc<Self>, from: u64, body: Body) {
        let me = self.link.node();
        // Any message shows its node alive: a heartbeat queued behind a burst of broadcasts
        // must not make a busy node look down.
        self.gossip.heard(from);
        match body {
            Body::Broadcast(b) => self.hub.dispatch_local(&b, None),
            Body::Direct { to, broadcast } if to == me => self.hub.dispatch_local(&broadcast, None),
            Body::Request { to, .. } | Body::Answer { to, .. } | Body::Direct { to, .. }
                if to != me => {}
            Body::Request {
                id, service, body, ..
            } => self.answer(from, id, service, body),
            Body::Answer { id, body, .. } => self.answered(from, id, body),
            Body::Direct { .. } => {}
            Body::Disconnect(id) => self.hub.disconnect_local(&id),
            presence => self.on_gossip(from, presence),
        }
    }
}

/// A thread of the cluster's own, with a single-threaded Tokio runtime, for the adapter's I/O
/// and the presence gossip. Liveness must not depend on the app's runtime: a node whose
/// workers are saturated (a 10,000-user room where each join renders the whole list) still
/// sends and reads heartbeats on time, so the other nodes do not count it down and drop its
/// presences (which would flood every member with leaves and re-joins).
struct ClusterRuntime {
    handle: tokio::runtime::Handle,
    /// Dropped with the cluster: the thread ends and its tasks with it.
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

/// An in-process adapter for examples and tests: every endpoint sharing one `Loopback` is a
/// node of the same cluster.
#[doc(hidden)]
pub mod tests_only {
    use std::sync::Arc;

    use bytes::Bytes;
    use parking_lot::Mutex;

    use super::{Adapter, ClusterLink, Confirm};

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

        /// Delivered before it returns: confirmed.
        fn publish_confirmed(&self, message: Bytes, confirm: Confirm) {
            self.publish(message);
            confirm.confirmed();
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{Adapter, ClusterLink, Confirm, Outgoing, PublishQueue};
    use crate::cluster::tests_only::Loopback;
    use crate::{BroadcastError, Endpoint};

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
        let counts = |e: &Endpoint| (e.stats().cluster_received, e.stats().cluster_lost);
        let rejected = |e: &Endpoint| e.stats().cluster_rejected;
        assert_eq!((counts(&b).0, rejected(&b)), (1, 1));
        assert_eq!((counts(&other).0, rejected(&other)), (0, 2));
        assert_eq!((counts(&open).0, rejected(&open)), (0, 1));
        assert_eq!((counts(&a).0, rejected(&a)), (0, 1));
    }

    /// An adapter whose engine is never reached: its task answers every confirmation
    /// `Unreachable`, or (`read: false`) never takes anything from its queue.
    struct Failing {
        queue: PublishQueue,
        read: bool,
        /// The unread queue's receiving end, kept open.
        unread: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Outgoing>>>,
    }

    impl Failing {
        fn new(capacity: usize, read: bool) -> Self {
            Failing {
                queue: PublishQueue::new(capacity),
                read,
                unread: Default::default(),
            }
        }
    }

    impl Adapter for Failing {
        fn start(&self, link: ClusterLink) {
            let mut queue = self.queue.start(&link).unwrap();
            if !self.read {
                // Kept open, never read: the queue fills.
                *self.unread.lock() = Some(queue);
                return;
            }
            tokio::spawn(async move {
                while let Some(out) = queue.recv().await {
                    if let Outgoing::Confirmed { confirm, .. } = out {
                        link.count_lost(1);
                        confirm.failed(BroadcastError::Unreachable);
                    }
                }
            });
        }

        fn publish(&self, message: Bytes) {
            self.queue.push(message);
        }

        fn publish_confirmed(&self, message: Bytes, confirm: Confirm) {
            self.queue.push_confirmed(message, confirm);
        }
    }

    /// An adapter that cannot confirm (the trait's default).
    struct Silent;

    impl Adapter for Silent {
        fn start(&self, _: ClusterLink) {}
        fn publish(&self, _: Bytes) {}
    }

    #[tokio::test]
    async fn a_confirmed_broadcast_says_what_became_of_it() {
        let payload = || serde_json::json!({});
        // Alone: nothing to wait for. A protocol event: refused, as `broadcast` drops it.
        let alone = Endpoint::new();
        assert_eq!(alone.broadcast_confirmed("t", "e", payload()).await, Ok(()));
        let refused = alone.broadcast_confirmed("t", "phx_reply", payload()).await;
        assert_eq!(refused, Err(BroadcastError::ReservedEvent));

        // Delivered to the other node before it returns: confirmed.
        let bus = Loopback::default();
        let (a, b) = (
            Endpoint::builder().adapter(bus.clone()).build(),
            Endpoint::builder().adapter(bus.clone()).build(),
        );
        let mut on_b = b.subscribe("t", 4);
        assert_eq!(a.broadcast_confirmed("t", "e", payload()).await, Ok(()));
        assert_eq!(on_b.recv().await.unwrap().event(), "e");

        // The adapter's task says it failed; this node's subscribers got it all the same.
        let failing = Endpoint::builder().adapter(Failing::new(16, true)).build();
        let mut here = failing.subscribe("t", 4);
        let lost = failing.broadcast_confirmed("t", "e", payload()).await;
        assert_eq!(lost, Err(BroadcastError::Unreachable));
        assert!(!lost.unwrap_err().may_have_been_delivered());
        assert_eq!(here.recv().await.unwrap().event(), "e");
        assert!(failing.stats().cluster_lost >= 1);

        // A full queue answers at once.
        let full = Endpoint::builder().adapter(Failing::new(1, false)).build();
        let _first = full.broadcast_confirmed("t", "e", payload());
        let second = full.broadcast_confirmed("t", "e", payload()).await;
        assert_eq!(second, Err(BroadcastError::QueueFull));
        assert!(full.stats().cluster_lost >= 1);

        // An adapter that cannot tell.
        let silent = Endpoint::builder().adapter(Silent).build();
        let unknown = silent.broadcast_confirmed("t", "e", payload()).await;
        assert_eq!(unknown, Err(BroadcastError::Unconfirmed));
        assert!(unknown.unwrap_err().may_have_been_delivered());
    }

    #[tokio::test]
    async fn cluster_ready_follows_what_the_adapter_says() {
        assert!(Endpoint::new().cluster_ready());
        let bus = Loopback::default();
        let endpoint = Endpoint::builder().adapter(bus.clone()).build();
        // An adapter that says nothing is taken as connected.
        assert!(endpoint.cluster_ready());
        let link = endpoint.cluster().unwrap().link().clone();
        link.engine_reachable(false);
        assert!(!endpoint.cluster_ready());
        link.engine_reachable(true);
        assert!(endpoint.cluster_ready());
    }
}
