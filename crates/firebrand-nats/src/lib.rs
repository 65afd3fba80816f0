//! A NATS adapter for firebrand clusters (the official `async-nats` client).
//!
//! Every node publishes on one subject (`firebrand.<namespace>`) and subscribes to it: each
//! broadcast is one NATS message, whatever the number of subscribers, and presence gossip
//! travels the same way.
//!
//! ```no_run
//! # async fn f() {
//! let adapter = firebrand_nats::NatsAdapter::new("nats://127.0.0.1:4222");
//! let endpoint = firebrand::Endpoint::builder().adapter(adapter).build();
//! # }
//! ```
//!
//! **When NATS goes away** the node keeps serving its local clients. The client reconnects by
//! itself and resubscribes; what is published while it is away is buffered by the client up to
//! its limit and otherwise lost (counted in `Stats::cluster_lost`); NATS core keeps nothing for
//! subscribers that were away. Presence resynchronises through the next heartbeats.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use firebrand::cluster::{Adapter, ClusterLink, Outgoing, PublishQueue};
use futures_util::StreamExt;

/// Messages waiting to be published; past this, new ones are dropped and counted as lost.
const QUEUE: usize = 16 * 1024;

/// The NATS adapter. See the [crate docs](crate).
pub struct NatsAdapter {
    url: String,
    subject: String,
    queue: PublishQueue,
}

impl NatsAdapter {
    /// An adapter for the NATS server at `url`, on the default namespace. Connects when the
    /// endpoint starts it.
    pub fn new(url: &str) -> Self {
        NatsAdapter {
            url: url.to_owned(),
            subject: "firebrand.default".into(),
            queue: PublishQueue::new(QUEUE),
        }
    }

    /// Separates clusters sharing one NATS: only nodes with the same namespace see each
    /// other's messages.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.subject = format!("firebrand.{namespace}");
        self
    }
}

impl Adapter for NatsAdapter {
    fn start(&self, link: ClusterLink) {
        let Some(mut queue) = self.queue.start(&link) else {
            tracing::warn!("NatsAdapter started twice; the second start is ignored");
            return;
        };
        let (url, subject) = (self.url.clone(), self.subject.clone());
        tokio::spawn(async move {
            // The first connection is retried here; after it, the client reconnects by itself.
            let mut tries = 0u32;
            let client = loop {
                match async_nats::connect(url.as_str()).await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(error = %e, "nats: cannot connect; retrying");
                        let wait = (100u64 << tries.min(6)).min(5000);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        tries += 1;
                    }
                }
            };
            let mut messages = match client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "nats: subscribe failed; this node is alone");
                    return;
                }
            };
            let publisher_link = link.clone();
            tokio::spawn(async move {
                while let Some(out) = queue.recv().await {
                    match out {
                        Outgoing::Message(message) => {
                            if let Err(e) = client.publish(subject.clone(), message).await {
                                tracing::warn!(error = %e, "nats: publish failed; message lost");
                                publisher_link.count_lost(1);
                            }
                        }
                        Outgoing::Flush(done) => {
                            if let Err(e) = client.flush().await {
                                tracing::warn!(error = %e, "nats: flush failed");
                            }
                            let _ = done.send(());
                        }
                        _ => {}
                    }
                }
            });
            while let Some(msg) = messages.next().await {
                link.receive(&msg.payload);
            }
            tracing::error!("nats: subscription ended");
        });
    }

    fn publish(&self, message: Bytes) {
        self.queue.push(message);
    }

    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.queue.flush())
    }
}
