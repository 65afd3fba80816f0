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
//! **History for recovery on rejoin.** Recoverable topics
//! ([`EndpointBuilder::history`](firebrand::EndpointBuilder::history)) keep their history in a
//! JetStream stream (`FIREBRAND_<namespace>`, subjects `firebrand.<namespace>.h.<topic in
//! base64url>`, kept for the largest route's age, and per subject twice its size or 1024,
//! whichever is more: every node reads new entries from the stream too, so the margin keeps a
//! burst from being trimmed before a node read it; file storage). A
//! broadcast is one JetStream publish; its offset is the stream's sequence, the same on every
//! node (it grows with every topic's broadcasts, not by one per topic). Every node reads the
//! stream with an ordered consumer from one task, so it delivers a topic's broadcasts in
//! sequence order; the epoch is the stream's creation time, so a deleted and recreated stream
//! is another history. A read (a rejoin the node's own cache cannot answer) takes every kept
//! entry of the topic with an ordered consumer; it is complete when the entry at `since` is
//! still there, or when nothing after `since` can have been removed (the stream's first
//! sequence is not past it, and the topic never reached its per-subject limit). Needs a
//! nats-server with JetStream (`-js`).
//!
//! **When NATS goes away** the node keeps serving its local clients. The client reconnects by
//! itself and resubscribes; what is published while it is away is buffered by the client up to
//! its limit and otherwise lost (counted in `Stats::cluster_lost`); NATS core keeps nothing for
//! subscribers that were away. Presence resynchronises through the next heartbeats. A
//! [confirmed](firebrand::Endpoint::broadcast_confirmed) broadcast is confirmed once the server
//! answered a request sent after it on the same connection (a "no responders" answer on
//! `firebrand.<namespace>.confirm`: the server had routed the broadcast first), or, on a
//! recoverable topic, once JetStream acknowledged the append; a disconnection (or a
//! reconnection) before that answers `Unconfirmed`: what the connection had in flight may be
//! lost, and what the client still buffered is sent after the reconnection.

use std::future::Future;
use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use base64::Engine;
use bytes::Bytes;
use firebrand::BroadcastError;
use firebrand::cluster::{
    Adapter, ClusterLink, Confirm, Entries, Entry, HistoryEngine, HistoryError, Outgoing,
    PublishQueue, Query, Retention,
};
use futures_util::StreamExt;

/// Messages waiting to be published; past this, new ones are dropped and counted as lost.
const QUEUE: usize = 16 * 1024;

/// The NATS adapter. See the [crate docs](crate).
pub struct NatsAdapter {
    url: String,
    subject: String,
    namespace: String,
    queue: PublishQueue,
    /// JetStream, once connected and its history stream set up (reads wait for it).
    jetstream: tokio::sync::watch::Sender<Option<jetstream::Context>>,
}

impl NatsAdapter {
    /// An adapter for the NATS server at `url`, on the default namespace. Connects when the
    /// endpoint starts it.
    pub fn new(url: &str) -> Self {
        NatsAdapter {
            url: url.to_owned(),
            subject: "firebrand.default".into(),
            namespace: "default".into(),
            queue: PublishQueue::new(QUEUE),
            jetstream: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Separates clusters sharing one NATS: only nodes with the same namespace see each
    /// other's messages.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.subject = format!("firebrand.{namespace}");
        self.namespace = namespace.to_owned();
        self
    }
}

/// The history stream's name (stream names take no `.`, `*`, `>`, spaces or slashes).
fn stream_name(namespace: &str) -> String {
    let safe: String = namespace
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("FIREBRAND_{safe}")
}

/// `topic`'s subject in the history stream (base64url: topics may hold `.`, `*`, `>`).
fn history_subject(subject: &str, topic: &str) -> String {
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(topic);
    format!("{subject}.h.{token}")
}

/// The epoch of a stream: its creation time (the same on every node; a recreated stream is
/// another history).
fn epoch(info: &jetstream::stream::Info) -> u64 {
    info.created.unix_timestamp_nanos() as u64
}

/// How many entries the stream keeps per topic: more than the history's size, because every
/// node also reads its new entries from the stream, and an entry trimmed before a node read
/// it would be a gap there (the node's channels would rejoin). Reads return at most `size`.
fn per_subject(retention: Retention) -> usize {
    retention.size.saturating_mul(2).max(1024)
}

/// Creates the history stream, or sets its limits to `retention` (every node is configured
/// alike), and returns its state.
async fn history_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    retention: Retention,
) -> Result<jetstream::stream::Info, async_nats::Error> {
    let config = jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{subject}.h.*")],
        max_messages_per_subject: i64::try_from(per_subject(retention)).unwrap_or(i64::MAX),
        max_age: retention.max_age,
        discard: jetstream::stream::DiscardPolicy::Old,
        storage: jetstream::stream::StorageType::File,
        allow_direct: true,
        ..Default::default()
    };
    let mut stream = js.get_or_create_stream(config.clone()).await?;
    let info = stream.info().await?.clone();
    if info.config.max_messages_per_subject != config.max_messages_per_subject
        || info.config.max_age != config.max_age
    {
        return Ok(js.update_stream(config).await?);
    }
    Ok(info)
}

/// Delivers the history stream's new entries to `link`, in sequence order, from this task; on
/// a jump in the sequence (entries removed before this node got them) or a recreated stream,
/// tells the link its delivery was interrupted.
async fn deliver_history(
    js: jetstream::Context,
    name: String,
    mut info: jetstream::stream::Info,
    link: ClusterLink,
    reconnected: Arc<tokio::sync::Notify>,
) {
    let mut next = info.state.last_sequence + 1;
    loop {
        let consumer = async {
            let stream = js.get_stream(&name).await?;
            let consumer = stream
                // A pull consumer: a push consumer's subscription is made after the server
                // starts pushing, and what it pushed first would wait for a heartbeat's resync.
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    ..Default::default()
                })
                .await?;
            Ok::<_, async_nats::Error>(consumer.messages().await?)
        };
        match consumer.await {
            Ok(mut messages) => {
                let e = epoch(&info);
                loop {
                    let message = tokio::select! {
                        m = messages.next() => m,
                        () = reconnected.notified() => break,
                    };
                    let Some(Ok(message)) = message else {
                        break;
                    };
                    let Ok(seq) = message.info().map(|i| i.stream_sequence) else {
                        continue;
                    };
                    if seq > next {
                        link.interrupted();
                    }
                    next = seq + 1;
                    link.receive_recorded(e, seq, None, &message.payload);
                }
                tracing::warn!("nats: history delivery ended; resuming");
            }
            Err(e) => tracing::warn!(error = %e, "nats: cannot read the history stream; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(mut stream) = js.get_stream(&name).await
            && let Ok(now) = stream.info().await
            && epoch(now) != epoch(&info)
        {
            // Another stream under the same name: another history.
            info = now.clone();
            next = info.state.last_sequence + 1;
            link.interrupted();
        }
    }
}

impl Adapter for NatsAdapter {
    fn start(&self, link: ClusterLink) {
        let Some(mut queue) = self.queue.start(&link) else {
            tracing::warn!("NatsAdapter started twice; the second start is ignored");
            return;
        };
        let (url, subject) = (self.url.clone(), self.subject.clone());
        let (name, shared) = (stream_name(&self.namespace), self.jetstream.clone());
        tokio::spawn(async move {
            // The first connection is retried here; after it, the client reconnects by itself.
            let mut tries = 0u32;
            // Every reconnection: the history's reader starts a new consumer (the old one may
            // be gone with a restarted server, and would be noticed only after heartbeats).
            let reconnected = Arc::new(tokio::sync::Notify::new());
            // Bumped on every disconnection: a confirmation waiting then is not given (what
            // the connection had in flight may be lost).
            let disconnections = Arc::new(tokio::sync::watch::Sender::new(0u64));
            link.engine_reachable(false);
            let client = loop {
                let (notify, status) = (reconnected.clone(), link.clone());
                let dropped = disconnections.clone();
                let options = async_nats::ConnectOptions::new().event_callback(move |event| {
                    let (notify, status, dropped) =
                        (notify.clone(), status.clone(), dropped.clone());
                    async move {
                        match event {
                            async_nats::Event::Connected => {
                                status.engine_reachable(true);
                                notify.notify_one();
                            }
                            async_nats::Event::Disconnected => {
                                dropped.send_modify(|n| *n += 1);
                                status.engine_reachable(false);
                            }
                            _ => {}
                        }
                    }
                });
                match options.connect(url.as_str()).await {
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
                Ok(s) => {
                    link.engine_reachable(true);
                    s
                }
                Err(e) => {
                    tracing::error!(error = %e, "nats: subscribe failed; this node is alone");
                    return;
                }
            };
            let js = jetstream::new(client.clone());
            let ready = shared.subscribe();
            if let Some(retention) = link.history_retention() {
                // The stream, and this node reading it, before this node appends anything
                // (until then appends are lost, as while NATS is away); the rest of the
                // cluster's traffic does not wait for it.
                let (js, name, subject, link) =
                    (js.clone(), name.clone(), subject.clone(), link.clone());
                tokio::spawn(async move {
                    let mut tries = 0u32;
                    loop {
                        match history_stream(&js, &name, &subject, retention).await {
                            Ok(info) => {
                                tracing::debug!(stream = name, "nats: history stream ready");
                                tokio::spawn(deliver_history(
                                    js.clone(),
                                    name,
                                    info,
                                    link,
                                    reconnected,
                                ));
                                shared.send_replace(Some(js));
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "nats: cannot set up the history stream (is JetStream on? nats-server -js); retrying");
                                let wait = (1000u64 << tries.min(5)).min(30_000);
                                tokio::time::sleep(Duration::from_millis(wait)).await;
                                tries += 1;
                            }
                        }
                    }
                });
            }
            let publisher_link = link.clone();
            let confirming = Confirming {
                client: client.clone(),
                subject: format!("{subject}.confirm"),
                disconnections: disconnections.subscribe(),
            };
            tokio::spawn(async move {
                while let Some(out) = queue.recv().await {
                    match out {
                        Outgoing::Record { confirm, .. } if ready.borrow().is_none() => {
                            tracing::warn!(
                                "nats: the history stream is not set up; broadcast lost"
                            );
                            publisher_link.count_lost(1);
                            if let Some(c) = confirm {
                                c.failed(BroadcastError::Unreachable);
                            }
                        }
                        Outgoing::Record {
                            topic,
                            message,
                            confirm,
                            ..
                        } => {
                            let subject = history_subject(&subject, &topic);
                            // Before the message leaves: a disconnection from now on may lose it.
                            let watch = confirm.map(|c| (c, confirming.watch()));
                            match js.publish(subject, message).await {
                                Ok(ack) => {
                                    // Acks are awaited aside: the next publish does not wait.
                                    let link = publisher_link.clone();
                                    tokio::spawn(async move {
                                        let acked = match watch {
                                            None => ack.await,
                                            Some((confirm, watch)) => {
                                                watch.acked(ack.into_future(), confirm).await
                                            }
                                        };
                                        if let Err(e) = acked {
                                            tracing::warn!(error = %e, "nats: history append failed; broadcast lost");
                                            link.count_lost(1);
                                        }
                                    });
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "nats: history append failed; broadcast lost");
                                    publisher_link.count_lost(1);
                                    if let Some((c, _)) = watch {
                                        c.failed(BroadcastError::Unconfirmed);
                                    }
                                }
                            }
                        }
                        Outgoing::Message(message) => {
                            if let Err(e) = client.publish(subject.clone(), message).await {
                                tracing::warn!(error = %e, "nats: publish failed; message lost");
                                publisher_link.count_lost(1);
                            }
                        }
                        Outgoing::Confirmed { message, confirm } => {
                            let watch = confirming.watch();
                            match client.publish(subject.clone(), message).await {
                                Ok(()) => {
                                    tokio::spawn(watch.round_trip(confirm));
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "nats: publish failed; message lost");
                                    publisher_link.count_lost(1);
                                    // Not handed to the client: never sent.
                                    confirm.failed(BroadcastError::Unreachable);
                                }
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

/// How the publishing task confirms messages ([`Adapter::publish_confirmed`]): a NATS client
/// says a publish is done once it is queued, not once the server has it.
struct Confirming {
    client: async_nats::Client,
    /// Where the round trips go: a subject nobody subscribes to, answered at once by the
    /// server with "no responders".
    subject: String,
    disconnections: tokio::sync::watch::Receiver<u64>,
}

/// One message's confirmation, begun before it was handed to the client.
struct Watch {
    client: async_nats::Client,
    subject: String,
    /// Changes on a disconnection after the message was handed over.
    disconnections: tokio::sync::watch::Receiver<u64>,
    /// The client's connections so far (a reconnection changes it).
    connects: u64,
}

impl Confirming {
    /// Starts watching for a message about to be handed to the client.
    fn watch(&self) -> Watch {
        let mut disconnections = self.disconnections.clone();
        disconnections.mark_unchanged();
        Watch {
            client: self.client.clone(),
            subject: self.subject.clone(),
            disconnections,
            connects: self.client.statistics().connects.load(Ordering::Relaxed),
        }
    }
}

impl Watch {
    /// Confirms a core message: a request sent after it on the same connection is answered
    /// (NATS handles a connection's messages in order, so the server had routed the message
    /// to every subscriber before it answered), and no disconnection came in between.
    async fn round_trip(mut self, confirm: Confirm) {
        let answered = tokio::select! {
            r = self.client.request(self.subject.clone(), Bytes::new()) => match r {
                Ok(_) => true,
                Err(e) => e.kind() == async_nats::client::RequestErrorKind::NoResponders,
            },
            _ = self.disconnections.changed() => false,
        };
        let same = self.client.statistics().connects.load(Ordering::Relaxed) == self.connects;
        confirm.answer(answered && same, BroadcastError::Unconfirmed);
    }

    /// Confirms a history append by its JetStream acknowledgement (the stream has it), unless
    /// a disconnection comes first (it may still be stored: unconfirmed). Returns the ack, for
    /// the loss count.
    async fn acked<T, E>(
        mut self,
        ack: impl Future<Output = Result<T, E>>,
        confirm: Confirm,
    ) -> Result<T, E> {
        tokio::pin!(ack);
        tokio::select! {
            r = &mut ack => {
                confirm.answer(r.is_ok(), BroadcastError::Unconfirmed);
                r
            }
            _ = self.disconnections.changed() => {
                confirm.failed(BroadcastError::Unconfirmed);
                ack.await
            }
        }
    }
}

impl HistoryEngine for NatsAdapter {
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
        let mut connected = self.jetstream.subscribe();
        let name = stream_name(&self.namespace);
        let subject = history_subject(&self.subject, topic);
        Box::pin(async move {
            // (The join gives up on the read after its timeout.)
            let js = connected
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|js| js.clone())
                .ok_or_else(|| HistoryError("nats: the adapter stopped".into()))?;
            read(&js, &name, subject, query, retention)
                .await
                .map_err(|e| HistoryError(format!("nats: {e}")))
        })
    }
}

/// Reads every kept entry of `subject` (see the crate docs for when it is complete).
async fn read(
    js: &jetstream::Context,
    name: &str,
    subject: String,
    query: Query,
    retention: Retention,
) -> Result<Entries, async_nats::Error> {
    let mut stream = js.get_stream(name).await?;
    // Before the entries: a topic with none has the stream's last sequence as its top, and
    // anything appended after this is above it.
    let before = stream.info().await?.clone();
    // The subject's last entry now: the read goes on until it (not until the consumer says
    // nothing is pending: after a link stalled and healed, an ordered consumer was seen to
    // report 0 pending after the first of ten entries, and the read then claimed a top far
    // below the topic's).
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Some(m.sequence),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => None,
        Err(e) => return Err(e.into()),
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut all: Vec<Entry> = Vec::new();
    if let Some(last) = last {
        let mut messages = consumer.messages().await?;
        let now = time::OffsetDateTime::now_utc();
        while all.last().is_none_or(|e| e.offset < last) {
            let Some(message) = messages.next().await else {
                // A partial read must not pass for the topic's whole history.
                return Err("nats: the read ended before the topic's last entry".into());
            };
            let message = message?;
            let info = message.info()?;
            let age = (now - info.published).max(time::Duration::ZERO);
            all.push(Entry {
                offset: info.stream_sequence,
                age: Duration::try_from(age).unwrap_or_default(),
                message: message.payload.clone(),
            });
        }
    }
    // After the entries: nothing after `since` was removed by age if the stream still starts
    // at or before it.
    let after = stream.info().await?.clone();
    let top = all.last().map_or(before.state.last_sequence, |e| e.offset);
    let limit = usize::try_from(after.config.max_messages_per_subject).unwrap_or(usize::MAX);
    let count = all.len();
    // This route's own retention: none older than its age, at most its size.
    let fresh = all
        .iter()
        .position(|e| e.age <= retention.max_age)
        .unwrap_or(all.len());
    let mut dropped: Vec<u64> = all.drain(..fresh).map(|e| e.offset).collect();
    let keep = match query {
        Query::After(_) => retention.size,
        Query::Last(n) => n.min(retention.size),
    };
    let over = all.len().saturating_sub(keep);
    dropped.extend(all.drain(..over).map(|e| e.offset));
    let from = match query {
        Query::After(since) => {
            let at_since = dropped.contains(&since) || all.iter().any(|e| e.offset == since);
            let untouched = after.state.first_sequence <= since + 1 && count < limit;
            let complete =
                since <= top && (at_since || untouched) && dropped.iter().all(|&o| o <= since);
            if complete {
                all.retain(|e| e.offset > since);
                since
            } else {
                all.first().map_or(top, |e| e.offset - 1)
            }
        }
        Query::Last(_) => all.first().map_or(top, |e| e.offset - 1),
    };
    Ok(Entries {
        epoch: epoch(&after),
        from,
        top,
        entries: all,
    })
}

/// The code in README.md, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
