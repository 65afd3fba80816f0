//! Broadcast from the database: a PostgreSQL **outbox** for firebrand.
//!
//! A backend inserts its messages into a table **in the same transaction as its data**; each
//! committed row becomes `[null, P, topic, event, payload]` on every subscriber of the topic,
//! on every node — once. A rolled-back row is never sent. The table (created by the consumer
//! when missing):
//!
//! ```sql
//! CREATE TABLE firebrand_outbox (
//!   id         bigserial   PRIMARY KEY,
//!   topic      text        NOT NULL,
//!   event      text        NOT NULL,
//!   payload    jsonb       NOT NULL DEFAULT '{}',
//!   created_at timestamptz NOT NULL DEFAULT now()
//! );
//! -- in the backend's transaction:
//! INSERT INTO firebrand_outbox (topic, event, payload) VALUES ('orders:42', 'shipped', '{"by": "ups"}');
//! ```
//!
//! ```no_run
//! use std::time::Duration;
//! # async fn f() {
//! let outbox = firebrand_postgres::Outbox::new("postgres://app@127.0.0.1/app")
//!     .table("firebrand_outbox");
//! let endpoint = firebrand::Endpoint::builder()
//!     // `orders:*` is recoverable, its positions and history the table's.
//!     .history_source("orders:*", 1000, Duration::from_secs(300), outbox.source())
//!     .build();
//! let running = outbox.start(&endpoint);
//! // Serve once the consumer has started: a client joining before could miss the rows
//! // committed until then (see `Running::started`).
//! running.started().await;
//! // … serve the endpoint; `running.stats()` for metrics, `running.is_connected()` for /ready.
//! # drop(running);
//! # }
//! ```
//!
//! **How it stays exactly once and ordered** (docs/design/outbox.md): at its commit, each
//! inserting transaction gives its rows a `seq` under a transaction-scoped advisory lock (a
//! deferred constraint trigger the consumer installs), so `seq` order is commit order and a
//! reader of `seq > cursor` never skips a row that commits late. The position of a row is
//! `(the table's epoch, seq)`: fixed in the database, the same on every node and across
//! restarts. Every node reads the table on its own and hands each row to its
//! [`Endpoint`] ([`Endpoint::broadcast_from_source`]); a client that
//! rejoins with `since` after a restart reads what it missed from the table. Rows on topics
//! not routed to the outbox's history go out as local broadcasts, without a position.
//!
//! **Bad rows** (an empty topic, a reserved event per [`firebrand::is_protocol_event`], a
//! payload over [`Outbox::max_payload`]) are not sent: they are copied with their reason into
//! `<table>_set_aside`, logged and counted, and the rows after them go on.
//!
//! [`Endpoint::broadcast_from_source`]: firebrand::Endpoint::broadcast_from_source
//! [`Endpoint`]: firebrand::Endpoint

mod source;
mod sql;
mod tail;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use firebrand::Endpoint;
use firebrand::cluster::HistorySource;

use crate::source::Source;
use crate::sql::Names;

/// An outbox consumer, configured: start it against an [`Endpoint`] with
/// [`start`](Outbox::start).
#[derive(Clone)]
pub struct Outbox {
    url: String,
    names: Names,
    poll: Duration,
    batch: usize,
    max_payload: usize,
    retention: Duration,
    source: Arc<Source>,
}

impl Outbox {
    /// The default largest payload sent: 1 MiB (firebrand's default frame limit).
    pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

    /// An outbox on the database at `url` (`postgres://user@host:port/db`; no TLS), table
    /// `firebrand_outbox`.
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        let names = Names::new(None, "firebrand_outbox");
        Outbox {
            source: Arc::new(Source::new(url.clone(), names.clone())),
            url,
            names,
            poll: Duration::from_secs(1),
            batch: 1000,
            max_payload: Self::DEFAULT_MAX_PAYLOAD,
            retention: Duration::from_secs(300),
        }
    }

    /// The table's name (in the connection's `search_path`). Default `firebrand_outbox`.
    pub fn table(self, name: &str) -> Self {
        self.named(None, name)
    }

    /// The table's schema and name.
    pub fn schema_table(self, schema: &str, name: &str) -> Self {
        self.named(Some(schema), name)
    }

    fn named(mut self, schema: Option<&str>, name: &str) -> Self {
        self.names = Names::new(schema, name);
        self.source = Arc::new(Source::new(self.url.clone(), self.names.clone()));
        self
    }

    /// How often the table is read without a wake-up (a `NOTIFY` is lost across a reconnect).
    /// Default 1 s.
    pub fn poll(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// The most rows read at once. Default 1000.
    pub fn batch(mut self, rows: usize) -> Self {
        self.batch = rows.max(1);
        self
    }

    /// The largest payload (its JSON text, in bytes) sent; a larger row is set aside. Default
    /// [`DEFAULT_MAX_PAYLOAD`](Self::DEFAULT_MAX_PAYLOAD).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How long rows are kept after their insert, as the outbox topics' history (then deleted).
    /// Default 300 s; at least the `max_age` given to
    /// [`history_source`](firebrand::EndpointBuilder::history_source). Expired rows are deleted
    /// every 10 s (every half of `age` when that is shorter), at the consumer's next read; a
    /// rejoin from a position before them is answered `recovered: false`.
    pub fn retention(mut self, age: Duration) -> Self {
        self.retention = age;
        self
    }

    /// The table as the history of the topics routed to it: give it to
    /// [`EndpointBuilder::history_source`](firebrand::EndpointBuilder::history_source).
    pub fn source(&self) -> Arc<dyn HistorySource> {
        Arc::new(source::Shared(self.source.clone()))
    }

    /// Starts consuming on the current Tokio runtime: installs what the table needs
    /// (idempotently), then hands every row committed from now on to `endpoint`. Connects
    /// again whenever the connection is lost (and until the first connection succeeds),
    /// resuming after the last row it handed. Stops when the returned handle is dropped.
    pub fn start(self, endpoint: &Endpoint) -> Running {
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(tail::run(self, endpoint.clone(), shared.clone()));
        Running { shared, task }
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("table", &self.names.plain)
            .field("poll", &self.poll)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// A running outbox consumer: its stats and state. Dropping it stops the consumer.
#[derive(Debug)]
pub struct Running {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// The consumer's counters.
    pub fn stats(&self) -> OutboxStats {
        let s = &self.shared;
        OutboxStats {
            delivered: s.delivered.load(Ordering::Relaxed),
            set_aside: s.set_aside.load(Ordering::Relaxed),
            lag_rows: s.lag_rows.load(Ordering::Relaxed),
            lag_seconds: s.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            cursor: s.cursor.load(Ordering::Relaxed),
        }
    }

    /// Whether the consumer is connected and its table installed (for a readiness probe).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Waits until the consumer is connected and its table installed (cancel-safe): rows
    /// committed from then on are delivered live.
    pub async fn connected(&self) {
        let mut ready = self.shared.ready.subscribe();
        let _ = ready.wait_for(|up| *up).await;
    }

    /// Waits until the consumer has connected once (cancel-safe); returns at once after that,
    /// whether connected now or not.
    ///
    /// From then on no committed row is missed: the consumer's cursor is fixed, and kept
    /// across reconnections. Before, a subscriber would miss the rows committed between its
    /// join and the consumer's start (the consumer starts after the rows already in the table,
    /// which are history), and a rejoin's read of the table those committed between the read
    /// and that start: a server that serves before its outbox is reachable holds the joins of
    /// the outbox's topics until this returns.
    pub async fn started(&self) {
        let mut started = self.shared.started.subscribe();
        let _ = started.wait_for(|s| *s).await;
    }

    /// Why it is not connected, when it is not: the last error.
    pub fn last_error(&self) -> Option<String> {
        self.shared.error.lock().ok().and_then(|e| e.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counters of a running outbox consumer ([`Running::stats`]), of this node.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Rows handed to the endpoint.
    pub delivered: u64,
    /// Rows set aside (not sent): empty topic, reserved event, payload too large.
    pub set_aside: u64,
    /// Rows committed and not yet handed, at the last read (an estimate from `seq`: values
    /// of rolled-back transactions count).
    pub lag_rows: u64,
    /// How long ago the oldest row not yet handed was inserted, at the last read (0 when
    /// caught up).
    pub lag_seconds: f64,
    /// The last `seq` handed (or passed, at start).
    pub cursor: u64,
}

/// What the consumer's task and its handle share.
#[derive(Debug, Default)]
struct Shared {
    delivered: AtomicU64,
    set_aside: AtomicU64,
    lag_rows: AtomicU64,
    lag_ms: AtomicU64,
    cursor: AtomicU64,
    connected: AtomicBool,
    /// `connected`, to wait on.
    ready: tokio::sync::watch::Sender<bool>,
    /// Whether it has been connected once.
    started: tokio::sync::watch::Sender<bool>,
    error: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.ready.send_replace(up);
        if up {
            self.started.send_replace(true);
        }
    }
}

/// The code in README.md, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
