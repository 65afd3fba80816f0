//! A Redis pub/sub adapter for firebrand clusters.
//!
//! Every node publishes its broadcasts on one Redis channel (`firebrand:<namespace>`) and
//! subscribes to it; each broadcast is one Redis message, whatever the number of subscribers.
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
//! (100 ms doubling to 5 s) and resubscribes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use firebrand::cluster::{Adapter, ClusterLink};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// Messages waiting to be published; past this, new ones are dropped and counted as lost.
const QUEUE: usize = 16 * 1024;

/// The Redis adapter. See the [crate docs](crate).
pub struct RedisAdapter {
    client: redis::Client,
    channel: String,
    queue: mpsc::Sender<Bytes>,
    pending: Mutex<Option<mpsc::Receiver<Bytes>>>,
    link: Arc<Mutex<Option<ClusterLink>>>,
}

impl RedisAdapter {
    /// An adapter for the Redis server at `url` (`redis://host:port/db`), on the default
    /// namespace. Connects when the endpoint starts it.
    pub fn new(url: &str) -> redis::RedisResult<Self> {
        let (queue, pending) = mpsc::channel(QUEUE);
        Ok(RedisAdapter {
            client: redis::Client::open(url)?,
            channel: "firebrand:default".into(),
            queue,
            pending: Mutex::new(Some(pending)),
            link: Arc::default(),
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
        *self.link.lock() = Some(link.clone());
        let Some(mut pending) = self.pending.lock().take() else {
            tracing::warn!("RedisAdapter started twice; the second start is ignored");
            return;
        };
        let (client, channel) = (self.client.clone(), self.channel.clone());
        let publisher_link = link.clone();
        tokio::spawn(async move {
            let mut conn = None;
            let mut tries = 0;
            while let Some(message) = pending.recv().await {
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
        if self.queue.try_send(message).is_err()
            && let Some(link) = &*self.link.lock()
        {
            link.count_lost(1);
        }
    }
}
