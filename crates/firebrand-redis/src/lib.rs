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
//! **History for recovery on rejoin.** Recoverable topics
//! ([`EndpointBuilder::history`](firebrand::EndpointBuilder::history)) keep their history in
//! Redis: a stream per topic (`firebrand:<namespace>:h:{<topic>}:s`, one entry per broadcast)
//! and a hash (`…:m`: the epoch and the last offset). One Lua script appends and publishes, so
//! the offset is given atomically with the publish, goes up by one, and every node delivers
//! the same position in the same order. A lost stream (FLUSHALL, eviction, a restart without
//! persistence) loses the hash with it: the next append starts a new epoch, and an old position
//! is not recovered. Per broadcast: one `EVALSHA` (the payload and about 100 bytes) instead of
//! one `PUBLISH`; Redis keeps the payload and about 40 bytes per entry.
//!
//! **When Redis goes away** the node keeps serving its local clients: local broadcasts still
//! reach local subscribers. Broadcasts published meanwhile are **not** delivered to other nodes
//! (Redis pub/sub keeps nothing) and are counted in `Stats::cluster_lost`; a
//! [confirmed](firebrand::Endpoint::broadcast_confirmed) one says so: `Unreachable` when it was
//! never sent, `Unconfirmed` when the pipeline that carried it failed (Redis may have run it
//! before the connection went); it is confirmed once Redis answered its pipeline; messages other nodes
//! published meanwhile are lost too. The adapter logs the outage, reconnects with backoff
//! (100 ms doubling to 5 s) and resubscribes; presence resynchronises through the next
//! heartbeats (a node that missed changes asks for a transfer). Broadcasts of recoverable
//! topics published meanwhile are lost for every node (nothing is delivered without its
//! position); after resubscribing, the node's recoverable channels are told to rejoin, and
//! recover from the streams what they missed; joins whose history cannot be read meanwhile
//! answer `recovered: false`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use firebrand::BroadcastError;
use firebrand::cluster::{
    Adapter, ClusterLink, Confirm, Entries, Entry, HistoryEngine, HistoryError, Outgoing,
    PublishQueue, Query, Retention,
};
use futures_util::StreamExt;

/// How both scripts begin: the topic's epoch, made when its hash is missing (a new topic, or a
/// lost one: then its stream, if any, is dropped too), and the hash's life extended.
/// KEYS: stream, meta. ARGV[1]: a new epoch, ARGV[2]: the hash's TTL (ms).
macro_rules! epoch_prelude {
    () => {
        r"
local e = redis.call('HGET', KEYS[2], 'e')
if not e then
  e = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', e, 's', 0)
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
"
    };
}

/// Appends a broadcast to its topic's history and publishes it with its position, atomically.
/// KEYS: stream, meta. ARGV: a new epoch, meta TTL (ms), message, size, max age (ms), channel.
/// The published message is `0xB7 epoch ':' offset ':' message`.
const APPEND: &str = concat!(
    epoch_prelude!(),
    r"
local off = redis.call('HINCRBY', KEYS[2], 's', 1)
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[4], off .. '-0', 't', ms, 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[6], '\183' .. e .. ':' .. off .. ':' .. ARGV[3])
return off
"
);

/// Reads a topic's history: `{epoch, top, now s, now µs, entries}`, one snapshot. An empty
/// topic gets its epoch here. KEYS: stream, meta. ARGV: a new epoch, meta TTL (ms), the offset
/// to read after (empty: the last ones), count.
const READ: &str = concat!(
    epoch_prelude!(),
    r"
local top = redis.call('HGET', KEYS[2], 's')
local now = redis.call('TIME')
local entries
if ARGV[3] ~= '' then
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3] .. '-0', '+', 'COUNT', ARGV[4])
else
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[4])
end
return {e, top, now[1], now[2], entries}
"
);

/// Marks a recorded broadcast on the channel (not a format version, nor the sealed marker).
const RECORDED: u8 = 0xB7;

/// How long a topic's epoch outlives its last broadcast or read, beyond its `max_age`.
const META_GRACE: Duration = Duration::from_secs(3600);

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
    /// The connection history reads share (made on first use, again after an error).
    reads: Arc<tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
}

impl RedisAdapter {
    /// An adapter for the Redis server at `url` (`redis://host:port/db`), on the default
    /// namespace. Connects when the endpoint starts it.
    pub fn new(url: &str) -> redis::RedisResult<Self> {
        Ok(RedisAdapter {
            client: redis::Client::open(url)?,
            channel: "firebrand:default".into(),
            queue: PublishQueue::new(QUEUE),
            reads: Arc::default(),
        })
    }

    /// Separates clusters sharing one Redis: only nodes with the same namespace see each
    /// other's messages.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.channel = format!("firebrand:{namespace}");
        self
    }
}

/// The stream and meta keys of `topic`'s history on `channel` (a hash tag keeps both in one
/// slot of a Redis Cluster).
fn keys(channel: &str, topic: &str) -> [String; 2] {
    [
        format!("{channel}:h:{{{topic}}}:s"),
        format!("{channel}:h:{{{topic}}}:m"),
    ]
}

/// A new epoch: random, as a decimal string (Lua keeps it a string).
fn new_epoch() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish().to_string()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `(epoch, offset, message)` of a recorded broadcast as published by [`APPEND`].
fn recorded(payload: &[u8]) -> Option<(u64, u64, &[u8])> {
    let rest = payload.strip_prefix(&[RECORDED])?;
    let mut parts = rest.splitn(3, |&b| b == b':');
    let mut number = || std::str::from_utf8(parts.next()?).ok()?.parse::<u64>().ok();
    let (epoch, offset) = (number()?, number()?);
    Some((epoch, offset, parts.next()?))
}

/// The entries of a [`READ`] answer, as the contract wants them: every entry in `(from, top]`,
/// none older than `max_age`.
fn entries(value: redis::Value, newest_first: bool, max_age: Duration) -> Result<Entries, String> {
    use redis::Value;
    let text = |v: &Value| -> Result<String, String> {
        redis::from_redis_value_ref::<String>(v).map_err(|e| e.to_string())
    };
    let number =
        |v: &Value| -> Result<u64, String> { text(v)?.parse::<u64>().map_err(|e| e.to_string()) };
    let Value::Array(parts) = value else {
        return Err("unexpected answer".into());
    };
    let [epoch, top, secs, micros, list] = &parts[..] else {
        return Err("unexpected answer".into());
    };
    let (epoch, top) = (number(epoch)?, number(top)?);
    let now_ms = number(secs)? * 1000 + number(micros)? / 1000;
    let Value::Array(list) = list else {
        return Err("unexpected entries".into());
    };
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let Value::Array(item) = item else {
            return Err("unexpected entry".into());
        };
        let [id, Value::Array(fields)] = &item[..] else {
            return Err("unexpected entry".into());
        };
        let id = text(id)?;
        let offset = id.split('-').next().unwrap_or_default();
        let offset = offset.parse::<u64>().map_err(|e| e.to_string())?;
        let (mut at, mut message) = (None, None);
        for pair in fields.chunks(2) {
            match (text(&pair[0])?.as_str(), pair.get(1)) {
                ("t", Some(v)) => at = Some(number(v)?),
                ("d", Some(Value::BulkString(d))) => message = Some(Bytes::copy_from_slice(d)),
                _ => {}
            }
        }
        let (Some(at), Some(message)) = (at, message) else {
            return Err("entry without its time or message".into());
        };
        out.push(Entry {
            offset,
            age: Duration::from_millis(now_ms.saturating_sub(at)),
            message,
        });
    }
    if newest_first {
        out.reverse();
    }
    // Too old: as if gone (the stream's entries are trimmed from the front only).
    let fresh = out
        .iter()
        .position(|e| e.age <= max_age)
        .unwrap_or(out.len());
    out.drain(..fresh);
    // Every entry after `from`: the entries must run up to the top.
    let from = match (out.first(), out.last()) {
        (Some(first), Some(last)) if last.offset == top => first.offset - 1,
        _ => {
            out.clear();
            top
        }
    };
    Ok(Entries {
        epoch,
        from,
        top,
        entries: out,
    })
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
            let mut batch: Vec<Out> = Vec::new();
            let append = redis::Script::new(APPEND);
            while let Some(out) = queue.recv().await {
                // What is queued goes out as one pipeline (in order): one round trip for a
                // burst of broadcasts, however busy the node.
                let mut flushes = Vec::new();
                // The confirmations of the batch's messages: the pipeline's answer is theirs.
                let mut confirms: Vec<Confirm> = Vec::new();
                let mut next = Some(out);
                while let Some(out) = next.take() {
                    match out {
                        Outgoing::Message(m) => batch.push(Out::Publish(m)),
                        Outgoing::Confirmed { message, confirm } => {
                            batch.push(Out::Publish(message));
                            confirms.push(confirm);
                        }
                        Outgoing::Record {
                            topic,
                            message,
                            retention,
                            confirm,
                        } => {
                            batch.push(Out::Append(topic, message, retention));
                            confirms.extend(confirm);
                        }
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
                            Ok(mut c) => {
                                // The append script, loaded on every connection (a Redis that
                                // restarted forgot it).
                                let loaded: redis::RedisResult<String> = redis::cmd("SCRIPT")
                                    .arg("LOAD")
                                    .arg(APPEND)
                                    .query_async(&mut c)
                                    .await;
                                match loaded {
                                    Ok(_) => {
                                        tries = 0;
                                        conn = Some(c);
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, messages = batch.len(), "redis: cannot load the history script; messages lost");
                                        publisher_link.count_lost(batch.len() as u64);
                                        batch.clear();
                                        // Nothing of the batch was sent.
                                        for c in confirms.drain(..) {
                                            c.failed(BroadcastError::Unreachable);
                                        }
                                        tokio::time::sleep(backoff(tries)).await;
                                        tries += 1;
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, messages = batch.len(), "redis: cannot publish; messages lost");
                                publisher_link.count_lost(batch.len() as u64);
                                batch.clear();
                                for c in confirms.drain(..) {
                                    c.failed(BroadcastError::Unreachable);
                                }
                                tokio::time::sleep(backoff(tries)).await;
                                tries += 1;
                            }
                        }
                    }
                    if let Some(c) = conn.as_mut() {
                        let mut pipe = redis::pipe();
                        for out in &batch {
                            match out {
                                Out::Publish(m) => {
                                    pipe.cmd("PUBLISH").arg(&channel).arg(&m[..]).ignore();
                                }
                                Out::Append(topic, m, retention) => {
                                    let max_age = millis(retention.max_age);
                                    pipe.cmd("EVALSHA")
                                        .arg(append.get_hash())
                                        .arg(2)
                                        .arg(&keys(&channel, topic))
                                        .arg(new_epoch())
                                        .arg(max_age.saturating_add(millis(META_GRACE)))
                                        .arg(&m[..])
                                        .arg(retention.size.max(1))
                                        .arg(max_age)
                                        .arg(&channel)
                                        .ignore();
                                }
                            }
                        }
                        let sent: redis::RedisResult<()> = pipe.query_async(c).await;
                        if let Err(e) = &sent {
                            tracing::warn!(error = %e, messages = batch.len(), "redis: publish failed; messages lost");
                            publisher_link.count_lost(batch.len() as u64);
                            conn = None;
                        }
                        // Sent: on an error, Redis may have run some of the commands before
                        // the connection failed, so they are unconfirmed, not unsent.
                        for c in confirms.drain(..) {
                            c.answer(sent.is_ok(), BroadcastError::Unconfirmed);
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
            let (mut tries, mut subscribed_before) = (0, false);
            link.engine_reachable(false);
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            link.engine_reachable(true);
                            if tries > 0 {
                                tracing::info!(channel, "redis: subscribed again");
                            }
                            tries = 0;
                            if std::mem::replace(&mut subscribed_before, true) {
                                // Recorded broadcasts published meanwhile did not reach this
                                // node: its recoverable channels rejoin and recover them.
                                link.interrupted();
                            }
                            let mut messages = pubsub.on_message();
                            while let Some(msg) = messages.next().await {
                                let payload = msg.get_payload_bytes();
                                match recorded(payload) {
                                    Some((epoch, offset, message)) => link.receive_recorded(
                                        epoch,
                                        offset,
                                        offset.checked_sub(1),
                                        message,
                                    ),
                                    None => link.receive(payload),
                                }
                            }
                            link.engine_reachable(false);
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

    fn publish_confirmed(&self, message: Bytes, confirm: Confirm) {
        self.queue.push_confirmed(message, confirm);
    }

    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.queue.flush())
    }

    fn history(&self) -> Option<&dyn HistoryEngine> {
        Some(self)
    }
}

/// What the publishing task sends.
enum Out {
    Publish(Bytes),
    Append(Box<str>, Bytes, Retention),
}

impl HistoryEngine for RedisAdapter {
    fn append(&self, topic: &str, message: Bytes, retention: Retention) {
        self.queue.push_record(topic, message, retention, None);
    }

    fn append_confirmed(
        &self,
        topic: &str,
        message: Bytes,
        retention: Retention,
        confirm: Confirm,
    ) {
        self.queue
            .push_record(topic, message, retention, Some(confirm));
    }

    fn read(
        &self,
        topic: &str,
        query: Query,
        retention: Retention,
    ) -> Pin<Box<dyn Future<Output = Result<Entries, HistoryError>> + Send + 'static>> {
        let (client, reads) = (self.client.clone(), self.reads.clone());
        let [stream, meta] = keys(&self.channel, topic);
        let error = |e: redis::RedisError| HistoryError(format!("redis: {e}"));
        Box::pin(async move {
            let mut shared = reads.lock().await;
            let mut conn = match shared.take() {
                Some(c) => c,
                None => client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(error)?,
            };
            drop(shared);
            let (after, count) = match query {
                Query::After(offset) => (offset.to_string(), retention.size),
                Query::Last(n) => (String::new(), n.min(retention.size)),
            };
            let meta_ttl = millis(retention.max_age).saturating_add(millis(META_GRACE));
            let answer: redis::RedisResult<redis::Value> = redis::Script::new(READ)
                .key(&stream)
                .key(&meta)
                .arg(new_epoch())
                .arg(meta_ttl)
                .arg(after)
                .arg(count.max(1))
                .invoke_async(&mut conn)
                .await;
            let answer = answer.map_err(error)?;
            *reads.lock().await = Some(conn);
            let mut read = entries(answer, matches!(query, Query::Last(_)), retention.max_age)
                .map_err(|e| HistoryError(format!("redis: {e}")))?;
            if let Query::Last(n) = query {
                // `count` was at least 1: keep the last `n` (none for `Last(0)`).
                let drop = read.entries.len().saturating_sub(n);
                read.entries.drain(..drop);
                read.from = read.entries.first().map_or(read.top, |e| e.offset - 1);
            }
            Ok(read)
        })
    }
}

/// The code in README.md, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
