//! Webhooks: the server tells the backend when a topic becomes occupied or vacated and when a
//! user's presence joins or leaves, so that the backend can react without polling.
//!
//! Configured by `[webhooks]` (see [`config`](crate::config)): `url`, `secret` and `events`.
//! Each event is POSTed on its own as JSON:
//!
//! ```json
//! {"event": "presence_join", "topic": "room:1", "user": "alice",
//!  "meta": {"user": "alice", "info": {}}, "node": "8f3…", "time_ms": 1764441600000}
//! ```
//!
//! `user` and `meta` are there for the presence events only; `node` is the node id as a string
//! (`null` without a cluster); `time_ms` is when the event happened (Unix milliseconds). Two
//! headers go along: `x-firebrand-timestamp` (the same `time_ms`) and `x-firebrand-signature:
//! sha256=<hex>`, the HMAC-SHA256 of the body (the exact bytes) keyed with the secret. Check
//! it, in constant time, before trusting a body; reject old `time_ms` to refuse replays.
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
//! **Delivery.** Events wait in a queue of [`QUEUE`] and one task sends them in order, each
//! request bounded by `server.backend_timeout_ms`, retried [`ATTEMPTS`] times in all with a
//! backoff (100 ms, then doubling) on a failure (unreachable, timeout, a status other than
//! 2xx). Channels never wait for it: when the queue is full the oldest event is dropped. A
//! dropped event, and one that failed every attempt, is lost: it is logged and counted in the
//! metric `firebrand_webhooks_lost_total{reason="queue_full"|"failed"}` (sent ones in
//! `firebrand_webhooks_sent_total`). Delivery is at most once; a server that stops drops what
//! is queued.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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

/// The signature header's value for `body`: `sha256=<hex HMAC-SHA256 of body>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key size");
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
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut body = json!({
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
        let headers = [
            ("x-firebrand-timestamp", next["time_ms"].to_string()),
            (
                "x-firebrand-signature",
                sign(secret.as_bytes(), body.as_bytes()),
            ),
        ];
        let mut backoff = BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match backend.post(&url, body.clone(), &headers).await {
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
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
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
