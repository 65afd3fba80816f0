//! Requests between nodes: a feature of one node asks the same feature of another node and
//! waits for its answer (long-poll forwarding does; reading another node's history will). The
//! cluster carries the bytes and matches answers to requests; what they mean is the feature's.
//!
//! A feature registers a [`Service`] under its id with [`Cluster::serve`]; its id is the kind
//! byte of its requests on the wire, so it must not be one of the cluster's own kinds (1–6, 8).
//! An answer counts only from the node that was asked.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{Body, Cluster, wire};

/// A feature's side of requests from other nodes.
pub(crate) trait Service: Send + Sync + 'static {
    /// Answers node `from`'s request (run on the cluster thread, as a task of its own).
    fn answer(&self, from: u64, request: Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>>;
}

/// The services this node runs, and its requests waiting for an answer.
#[derive(Default)]
pub(super) struct Requests {
    services: Mutex<HashMap<u8, Arc<dyn Service>>>,
    /// Request id → the node asked, and where its answer goes.
    waiting: Mutex<HashMap<u64, (u64, oneshot::Sender<Bytes>)>>,
    next: AtomicU64,
}

impl Cluster {
    /// Answers the requests of other nodes for service `id` with `service` (replacing any
    /// service registered under `id` before).
    ///
    /// # Panics
    /// If `id` is one of the cluster's own message kinds.
    pub(crate) fn serve(&self, id: u8, service: Arc<dyn Service>) {
        assert!(
            !wire::is_cluster_kind(id),
            "service id {id} is a cluster message kind"
        );
        self.requests.services.lock().insert(id, service);
    }

    /// Sends `request` to service `service` of node `node` and waits up to `wait` for its
    /// answer (`None`: no answer in time).
    pub(crate) async fn request(
        &self,
        node: u64,
        service: u8,
        request: Bytes,
        wait: Duration,
    ) -> Option<Bytes> {
        let r = &self.requests;
        let id = r.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        r.waiting.lock().insert(id, (node, tx));
        // Forgets the request however this ends (answered, timed out, or the caller gone).
        struct Forget<'a>(&'a Requests, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.waiting.lock().remove(&self.1);
            }
        }
        let _forget = Forget(r, id);
        self.send(&Body::Request {
            to: node,
            id,
            service,
            body: request,
        });
        tokio::time::timeout(wait, rx).await.ok()?.ok()
    }

    /// Node `from`'s request `id` for service `service`: answered by a task of its own.
    pub(super) fn answer(self: &Arc<Self>, from: u64, id: u64, service: u8, body: Bytes) {
        let Some(handler) = self.requests.services.lock().get(&service).cloned() else {
            self.link
                .reject(from, "request for a service this node does not run");
            return;
        };
        let me = Arc::downgrade(self);
        // On the cluster thread: `receive` runs on the adapter's task there.
        tokio::spawn(async move {
            let answer = handler.answer(from, body).await;
            if let Some(cluster) = me.upgrade() {
                cluster.send(&Body::Answer {
                    to: from,
                    id,
                    body: answer,
                });
            }
        });
    }

    /// Node `from`'s answer to request `id`: handed to the request waiting for it, unless
    /// that request was not asked of `from` (then it is refused; the request still waits).
    pub(super) fn answered(&self, from: u64, id: u64, body: Bytes) {
        let mut waiting = self.requests.waiting.lock();
        match waiting.get(&id) {
            Some((node, _)) if *node != from => {
                drop(waiting);
                self.link
                    .reject(from, "answer from a node the request was not asked of");
            }
            Some(_) => {
                if let Some((_, tx)) = waiting.remove(&id) {
                    let _ = tx.send(body);
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Endpoint;
    use crate::cluster::tests_only::Loopback;

    struct Echo;

    impl Service for Echo {
        fn answer(&self, from: u64, request: Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>> {
            Box::pin(async move { Bytes::from(format!("{from}:{}", request.len())) })
        }
    }

    #[tokio::test]
    async fn requests_are_answered_by_the_node_asked_only() {
        let bus = Loopback::default();
        let (a, b) = (
            Endpoint::builder().adapter(bus.clone()).build(),
            Endpoint::builder().adapter(bus.clone()).build(),
        );
        let (ca, cb) = (a.cluster().unwrap(), b.cluster().unwrap());
        cb.serve(42, Arc::new(Echo));
        let wait = Duration::from_secs(10);
        let got = ca.request(cb.node(), 42, Bytes::from_static(b"abc"), wait);
        assert_eq!(got.await, Some(Bytes::from(format!("{}:3", ca.node()))));
        // A service `a` does not run: refused there and counted, no answer.
        let none = cb.request(ca.node(), 42, Bytes::new(), Duration::from_millis(50));
        assert_eq!(none.await, None);
        assert_eq!(a.stats().cluster_rejected, 1);

        // An answer from a node that was not asked is refused; the request keeps waiting.
        let (id, rx) = {
            let (tx, rx) = oneshot::channel();
            ca.requests.waiting.lock().insert(7, (5, tx));
            (7, rx)
        };
        ca.receive(
            6,
            Body::Answer {
                to: ca.node(),
                id,
                body: Bytes::from_static(b"forged"),
            },
        );
        assert_eq!(a.stats().cluster_rejected, 2);
        ca.receive(
            5,
            Body::Answer {
                to: ca.node(),
                id,
                body: Bytes::from_static(b"real"),
            },
        );
        assert_eq!(rx.await.ok(), Some(Bytes::from_static(b"real")));
    }
}
