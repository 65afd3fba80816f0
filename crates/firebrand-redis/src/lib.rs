//! A Redis pub/sub adapter for firebrand clusters.
//!
//! Every node publishes on one Redis channel (`firebrand:<namespace>`) and subscribes to it:
//! each broadcast is one Redis message, whatever the number of subscribers, and presence
//! gossip travels the same way.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let adapter = firebrand_redis::RedisAdapter::new("redis://127.0.0.1:6379")?;
//! let endpoint = firebrand::Endpoint::builder().adapter(adapter).build();
//! # Ok(()) }
//! ```
//!
//! **When Redis goes away** the node keeps serving its local clients: local broadcasts still
//! reach local subscribers. Broadcasts published meanwhile are **not** delivered to other nodes
//! (Redis pub/sub keeps nothing) and are counted in `Stats::cluster_lost`; messages other nodes
//! published meanwhile are lost too. The adapter logs the outage, reconnects with backoff
//! (100 ms doubling to 5 s) and resubscribes; presence resynchronises through the next
//! heartbeats (a node that missed changes asks for a transfer).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use firebrand::cluster::{Adapter, ClusterLink, Outgoing, PublishQueue};
use futures_util::StreamExt;

/// Messages waiting to be published; past this, new ones are dropped and counted as lost.
const QUEUE: usize = 16 * 1024;

/// The Redis adapter. See the [crate docs](crate).
pub struct RedisAdapter {
    client: redis::Client,
    channel: String,
    queue: PublishQueue,
}

impl RedisAdapter {
    /// An adapter for the Redis server at `url` (`redis://host:port/db`), on the default
    /// namespace. Connects when the endpoint starts it.
    pub fn new(url: &str) -> redis::RedisResult<Self> {
        Ok(RedisAdapter {
            client: redis::Client::open(url)?,
            channel: "firebrand:default".into(),
            queue: PublishQueue::new(QUEUE),
        })
    }

    /// Separates clusters sharing one Redis: only nodes with the same namespace see each
    /// other's messages.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.channel = format!("firebrand:{namespace}");
        self
    }
}

fn backoff(tries: u32) -> Duration {
    Duration::from_millis((100u64 << tries.min(6)).min(5000))
}

impl Adapter for RedisAdapter {
    fn start(&self, link: ClusterLink) {
        let Some(mut queue) = self.queue.start(&link) else {
            tracing::warn!("RedisAdapter started twice; the second start is ignored");
            return;
        };
        let (client, channel) = (self.client.clone(), self.channel.clone());
        let publisher_link = link.clone();
        tokio::spawn(async move {
            let mut conn = None;
            let mut tries = 0;
            while let Some(out) = queue.recv().await {
                let message = match out {
                    Outgoing::Message(m) => m,
                    Outgoing::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                    _ => continue,
                };
                if conn.is_none() {
                    match client.get_multiplexed_async_connection().await {
                        Ok(c) => {
                            tries = 0;
                            conn = Some(c);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "redis: cannot publish; message lost");
                            publisher_link.count_lost(1);
                            tokio::time::sleep(backoff(tries)).await;
                            tries += 1;
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(&message[..])
                    .query_async(c)
                    .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "redis: publish failed; message lost");
                    publisher_link.count_lost(1);
                    conn = None;
                }
            }
        });
        let (client, channel) = (self.client.clone(), self.channel.clone());
        tokio::spawn(async move {
            let mut tries = 0;
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            if tries > 0 {
                                tracing::info!(channel, "redis: subscribed again");
                            }
                            tries = 0;
                            let mut messages = pubsub.on_message();
                            while let Some(msg) = messages.next().await {
                                link.receive(msg.get_payload_bytes());
                            }
                            tracing::warn!(channel, "redis: subscription lost; reconnecting");
                        }
                        Err(e) => tracing::warn!(error = %e, "redis: subscribe failed"),
                    },
                    Err(e) => tracing::warn!(error = %e, "redis: cannot connect; retrying"),
                }
                tokio::time::sleep(backoff(tries)).await;
                tries += 1;
            }
        });
    }

    fn publish(&self, message: Bytes) {
        self.queue.push(message);
    }

    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.queue.flush())
    }
}
