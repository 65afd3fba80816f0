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

/// At most this many messages go out in one pipeline.
const MAX_PIPELINE: usize = 256;

/// How long a publish waits for Redis's answer before the connection is given up.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

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
            // A long response timeout: the 500 ms default fires when this node is busy (the
            // reply is there, the task is not polled), and a message Redis did publish would
            // be counted lost and its connection dropped. A dead Redis closes the connection.
            let config =
                redis::AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
            let mut conn = None;
            let mut tries = 0;
            let mut batch: Vec<Bytes> = Vec::new();
            while let Some(out) = queue.recv().await {
                // What is queued goes out as one pipeline (in order): one round trip for a
                // burst of broadcasts, however busy the node.
                let mut flushes = Vec::new();
                let mut next = Some(out);
                while let Some(out) = next.take() {
                    match out {
                        Outgoing::Message(m) => batch.push(m),
                        Outgoing::Flush(done) => flushes.push(done),
                        _ => {}
                    }
                    if batch.len() < MAX_PIPELINE {
                        next = queue.try_recv().ok();
                    }
                }
                if !batch.is_empty() {
                    if conn.is_none() {
                        match client
                            .get_multiplexed_async_connection_with_config(&config)
                            .await
                        {
                            Ok(c) => {
                                tries = 0;
                                conn = Some(c);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, messages = batch.len(), "redis: cannot publish; messages lost");
                                publisher_link.count_lost(batch.len() as u64);
                                batch.clear();
                                tokio::time::sleep(backoff(tries)).await;
                                tries += 1;
                            }
                        }
                    }
                    if let Some(c) = conn.as_mut() {
                        let mut pipe = redis::pipe();
                        for m in &batch {
                            pipe.cmd("PUBLISH").arg(&channel).arg(&m[..]).ignore();
                        }
                        let sent: redis::RedisResult<()> = pipe.query_async(c).await;
                        if let Err(e) = sent {
                            tracing::warn!(error = %e, messages = batch.len(), "redis: publish failed; messages lost");
                            publisher_link.count_lost(batch.len() as u64);
                            conn = None;
                        }
                        batch.clear();
                    }
                }
                for done in flushes {
                    let _ = done.send(());
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
