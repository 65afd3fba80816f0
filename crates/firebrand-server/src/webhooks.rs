//! Webhooks: the server tells the backend when a topic becomes occupied or vacated and when a
//! user's presence joins or leaves, so that the backend can react without polling.
//!
//! Configured by `[webhooks]` (see [`config`](crate::config)): `url`, `secret` and `events`.
//! Each event is POSTed on its own as JSON:
//!
//! ```json
//! {"id": "5f0c9a…e1", "event": "presence_join", "topic": "room:1", "user": "alice",
//!  "meta": {"user": "alice", "info": {}}, "node": "8f3…", "time_ms": 1764441600000}
//! ```
//!
//! `id` is the event's unique id (32 hex digits: 64 random bits drawn when the server starts,
//! then a counter; unique across nodes and restarts), the same in every attempt to send it;
//! `user` and `meta` are there for the presence events only; `node` is the node id as a string
//! (`null` without a cluster); `time_ms` is when the event happened (Unix milliseconds).
//!
//! **Signature.** Three headers go along: `x-firebrand-event-id` (the body's `id`),
//! `x-firebrand-timestamp` (Unix milliseconds of *this attempt*: a retried event carries a
//! fresh one) and `x-firebrand-signature: sha256=<hex>`, the HMAC-SHA256 keyed with the secret
//! of `"{timestamp}.{body}"` (the timestamp header's digits, a dot, the body's exact bytes; see
//! [`sign`]). A receiver checks the signature in constant time, then refuses a timestamp more
//! than a few minutes from its clock (a replay of a captured request, once the window passed),
//! then drops an `id` it has already seen (a retry whose first answer was lost, or a replay
//! inside the window): keep the ids seen for at least the window. The window needs to cover
//! clock skew and one request's transit only (an attempt is abandoned after
//! `server.backend_timeout_ms`), not the time an event waits in the queue: 5 minutes is ample.
//! Do not refuse an event for an old `time_ms`: it may have waited up to [`max_event_age`]
//! (the queue full of events ahead, each failing every attempt; about 7 hours with the
//! default 2 s timeout).
//!
//! **Semantics, per node.** Each node reports its own view:
//!
//! - `topic_occupied`: the first channel of the topic joined on this node; `topic_vacated`:
//!   the last one on this node gone (left, closed, or its connection lost). In a cluster a
//!   topic is occupied somewhere as long as some node has reported it occupied more recently
//!   than vacated: keep a set of nodes per topic (keyed by `node`), and drop a node that
//!   stopped without telling (it leaves `GET /api/info`'s `nodes`).
//! - `presence_join`: the first presence of a user on a topic on this node (on a namespace
//!   with `presence = true`; anonymous connections are not tracked); `presence_leave`: its
//!   last presence there gone. The same user on two nodes gives a join from each; use
//!   `GET /api/presence` for the cluster's list.
//!
//! **Delivery.** Events wait in a queue of [`QUEUE`] and one task sends them in order (on a
//! keep-alive connection of its own, outside `server.backend_max_calls`), each request bounded
//! by `server.backend_timeout_ms`, tried [`ATTEMPTS`] times in all with a backoff (100 ms,
//! then doubling) on a failure (unreachable, timeout, a status other than 2xx). Channels never
//! wait for it: when the queue is full the oldest event is dropped. A dropped event, and one
//! that failed every attempt, is lost: it is logged and counted in the metric
//! `firebrand_webhooks_lost_total{reason="queue_full"|"failed"}` (sent ones in
//! `firebrand_webhooks_sent_total`). An attempt that timed out may still have reached the
//! receiver, so a retry can deliver an event twice: deduplicating on `id` makes delivery at
//! most once. A server that stops drops what is queued.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::Notify;

use crate::backend::{Backend, BackendUrl};

/// How many events wait at most; beyond, the oldest is dropped.
pub const QUEUE: usize = 4096;

/// Attempts per event (the first and the retries).
pub const ATTEMPTS: u32 = 3;

/// The first retry's backoff; each next one doubles it.
const BACKOFF: Duration = Duration::from_millis(100);

/// The longest an event may wait, from when it happened (`time_ms`) to its last attempt, with
/// requests bounded by `timeout`: [`QUEUE`] events (the full queue ahead of it, and itself),
/// each tried [`ATTEMPTS`] times, each attempt bounded by `timeout`, with the backoffs in
/// between. 4096 × (3 × 2 s + 0.3 s) ≈ 7.2 hours with the default timeout.
pub fn max_event_age(timeout: Duration) -> Duration {
    let backoffs: Duration = (0..ATTEMPTS - 1).map(|i| BACKOFF * 2u32.pow(i)).sum();
    (timeout * ATTEMPTS + backoffs) * QUEUE as u32
}

/// The kinds of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// The first channel of a topic on this node.
    TopicOccupied,
    /// The last channel of a topic on this node gone.
    TopicVacated,
    /// A user's first presence on a topic on this node.
    PresenceJoin,
    /// A user's last presence on a topic on this node gone.
    PresenceLeave,
}

impl Event {
    /// Every kind, the default of `webhooks.events`.
    pub const ALL: [Event; 4] = [
        Event::TopicOccupied,
        Event::TopicVacated,
        Event::PresenceJoin,
        Event::PresenceLeave,
    ];

    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Event::TopicOccupied => "topic_occupied",
            Event::TopicVacated => "topic_vacated",
            Event::PresenceJoin => "presence_join",
            Event::PresenceLeave => "presence_leave",
        }
    }
}

/// Where and how webhooks are sent (`[webhooks]`).
#[derive(Clone)]
#[non_exhaustive]
pub struct WebhookConfig {
    /// The receiver.
    pub url: BackendUrl,
    /// Signs the bodies.
    pub secret: String,
    /// The events sent.
    pub events: Vec<Event>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"..")
            .field("events", &self.events)
            .finish()
    }
}

/// Describes the webhook metrics to the installed recorder.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "firebrand_webhooks_sent_total",
        "Webhook events delivered (a 2xx answer)."
    );
    metrics::describe_counter!(
        "firebrand_webhooks_lost_total",
        "Webhook events lost: dropped from a full queue (queue_full) or failed every attempt (failed)."
    );
}

/// The signature header's value for a request with the timestamp header `timestamp` and the
/// body `body`: `sha256=<hex HMAC-SHA256 of "{timestamp}.{body}">`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key size");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Counts channels per topic and presences per (topic, user), and queues the events; cheap
/// to clone. Without webhooks configured, every method does nothing.
#[derive(Clone, Default)]
pub struct Webhooks {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    events: Vec<Event>,
    node: Option<String>,
    /// The events' ids: random bits drawn at start, then a counter.
    id_prefix: u64,
    next_id: AtomicU64,
    /// Channels per topic on this node.
    topics: Mutex<HashMap<String, usize>>,
    /// Presences per (topic, user) on this node.
    presences: Mutex<HashMap<(String, String), usize>>,
    queue: Mutex<VecDeque<Value>>,
    ready: Arc<Notify>,
}

impl Webhooks {
    /// Starts the sender task (in the current tokio runtime) for `config`; `node` is the
    /// endpoint's node id, if clustered.
    pub fn start(config: &WebhookConfig, backend: Backend, node: Option<u64>) -> Self {
        let inner = Arc::new(Inner {
            events: config.events.clone(),
            node: node.map(|n| n.to_string()),
            id_prefix: random_prefix(),
            next_id: AtomicU64::new(0),
            topics: Mutex::default(),
            presences: Mutex::default(),
            queue: Mutex::new(VecDeque::new()),
            ready: Arc::new(Notify::new()),
        });
        tokio::spawn(send_loop(
            Arc::downgrade(&inner),
            config.url.clone(),
            config.secret.clone(),
            backend,
        ));
        Webhooks { inner: Some(inner) }
    }

    /// A channel of `topic` joined: held until it is dropped (the channel gone, however).
    pub fn occupy(&self, topic: &str) -> Occupant {
        if let Some(inner) = &self.inner {
            let first = {
                let mut topics = inner.topics.lock().unwrap_or_else(PoisonError::into_inner);
                let n = topics.entry(topic.to_owned()).or_insert(0);
                *n += 1;
                *n == 1
            };
            if first {
                inner.emit(Event::TopicOccupied, topic, None);
            }
        }
        Occupant {
            hooks: self.clone(),
            topic: topic.to_owned(),
            user: None,
        }
    }
}

/// A channel's place in the counts; dropping it counts the channel out (and emits
/// `topic_vacated` / `presence_leave` when it was the last). A guard rather than `terminate`,
/// so that every end counts: a leave, a lost connection, a duplicate join, a panic (the locks
/// ignore poisoning, so a drop while unwinding cannot panic again).
pub struct Occupant {
    hooks: Webhooks,
    topic: String,
    /// The user tracked by this channel, and its meta.
    user: Option<(String, Value)>,
}

impl Occupant {
    /// This channel tracks `user`'s presence with `meta`.
    pub fn present(&mut self, user: &str, meta: &Value) {
        let Some(inner) = &self.hooks.inner else {
            return;
        };
        if self.user.is_some() {
            return;
        }
        let first = {
            let mut presences = inner
                .presences
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let n = presences
                .entry((self.topic.clone(), user.to_owned()))
                .or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            inner.emit(Event::PresenceJoin, &self.topic, Some((user, meta)));
        }
        self.user = Some((user.to_owned(), meta.clone()));
    }
}

impl Drop for Occupant {
    fn drop(&mut self) {
        let Some(inner) = &self.hooks.inner else {
            return;
        };
        if let Some((user, meta)) = self.user.take() {
            let key = (self.topic.clone(), user);
            let last = {
                let mut presences = inner
                    .presences
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match presences.get_mut(&key) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        false
                    }
                    _ => {
                        presences.remove(&key);
                        true
                    }
                }
            };
            if last {
                inner.emit(Event::PresenceLeave, &self.topic, Some((&key.1, &meta)));
            }
        }
        let last = {
            let mut topics = inner.topics.lock().unwrap_or_else(PoisonError::into_inner);
            match topics.get_mut(&self.topic) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    topics.remove(&self.topic);
                    true
                }
            }
        };
        if last {
            inner.emit(Event::TopicVacated, &self.topic, None);
        }
    }
}

impl Inner {
    /// Queues the event (if configured), dropping the oldest when the queue is full.
    fn emit(&self, event: Event, topic: &str, user: Option<(&str, &Value)>) {
        if !self.events.contains(&event) {
            return;
        }
        let time_ms = now_ms();
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut body = json!({
            "id": format!("{:016x}{n:016x}", self.id_prefix),
            "event": event.name(),
            "topic": topic,
            "node": self.node,
            "time_ms": time_ms,
        });
        if let Some((user, meta)) = user {
            body["user"] = json!(user);
            body["meta"] = meta.clone();
        }
        let dropped = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            let dropped = (queue.len() >= QUEUE).then(|| queue.pop_front()).flatten();
            queue.push_back(body);
            dropped
        };
        if let Some(old) = dropped {
            metrics::counter!("firebrand_webhooks_lost_total", "reason" => "queue_full")
                .increment(1);
            tracing::warn!(event = %old["event"], topic = %old["topic"], "webhook lost: the queue is full");
        }
        self.ready.notify_one();
    }
}

/// Unix milliseconds now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 64 random bits (from the OS; should it fail, the time and the process id, unique enough
/// across restarts).
fn random_prefix() -> u64 {
    let mut bytes = [0; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(e) => {
            tracing::warn!(error = %e, "no random bits for the webhook ids: using the time");
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// Sends the queued events one by one until the [`Webhooks`] are all dropped.
async fn send_loop(
    inner: std::sync::Weak<Inner>,
    url: BackendUrl,
    secret: String,
    backend: Backend,
) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let next = inner
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            match next {
                Some(next) => next,
                None => {
                    // `notify_one` stores a permit: an event queued since the check wakes us.
                    let ready = inner.ready.clone();
                    drop(inner);
                    // Wakes at least every second, to notice that the server is gone.
                    let _ = tokio::time::timeout(Duration::from_secs(1), ready.notified()).await;
                    continue;
                }
            }
        };
        let body = next.to_string();
        let id = next["id"].as_str().unwrap_or_default().to_owned();
        let mut backoff = BACKOFF;
        for attempt in 1..=ATTEMPTS {
            // Each attempt signed with its own time: a retry is as fresh as a first attempt.
            let timestamp = now_ms().to_string();
            let headers = [
                ("x-firebrand-event-id", id.clone()),
                (
                    "x-firebrand-signature",
                    sign(secret.as_bytes(), &timestamp, body.as_bytes()),
                ),
                ("x-firebrand-timestamp", timestamp),
            ];
            match backend.post("webhook", &url, body.clone(), &headers).await {
                Ok(_) => {
                    metrics::counter!("firebrand_webhooks_sent_total").increment(1);
                    break;
                }
                Err(e) if attempt == ATTEMPTS => {
                    metrics::counter!("firebrand_webhooks_lost_total", "reason" => "failed")
                        .increment(1);
                    tracing::warn!(event = %next["event"], topic = %next["topic"], error = %e, attempts = ATTEMPTS, "webhook lost");
                }
                Err(e) => {
                    tracing::debug!(event = %next["event"], error = %e, attempt, "webhook failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256_of_timestamp_dot_body() {
        let mac = |msg: &[u8]| {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
            mac.update(msg);
            mac.finalize().into_bytes()
        };
        // The RFC's vector checks the HMAC itself.
        let rfc: String = mac(b"what do ya want for nothing?")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            rfc,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let expected: String = mac(b"1764441600000.{\"a\":1}")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            sign(b"Jefe", "1764441600000", br#"{"a":1}"#),
            format!("sha256={expected}")
        );
        assert_ne!(
            sign(b"Jefe", "1764441600001", br#"{"a":1}"#),
            sign(b"Jefe", "1764441600000", br#"{"a":1}"#)
        );
    }

    #[test]
    fn the_longest_wait_is_the_full_queue_failing() {
        assert_eq!(
            max_event_age(Duration::from_secs(2)),
            Duration::from_millis(4096 * 6300)
        );
    }

    #[test]
    fn events_parse_by_name() {
        for event in Event::ALL {
            let parsed: Event = serde_json::from_value(json!(event.name())).unwrap();
            assert_eq!(parsed, event);
        }
    }
}
