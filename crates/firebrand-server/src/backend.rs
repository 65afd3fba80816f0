//! Calls to the backend over HTTP: the connect, join and push hooks.
//!
//! When configured (`[auth] connect_url`, a namespace's `join = "backend"` with `join_url`, or
//! `pushes = "backend"` with `push_url`), the server POSTs a JSON body to the backend and acts
//! on its JSON answer (see [`config`](crate::config) for the bodies and answers). Every call is
//! bounded by `[server] backend_timeout_ms` (default 2000 ms), connecting included. An answer
//! with a status other than 2xx is a refusal (the connect gets 403, the join the error reply
//! `{"reason":"unauthorized"}`, the push `{"reason":"rejected"}`); a backend that is down, does
//! not answer within the bound, or answers something that does not parse refuses too, with its
//! own wire form: the connect gets 503, the join and the push the error reply
//! `{"reason":"backend unavailable"}`. Nothing waits longer than the bound; why a call failed
//! is logged.
//!
//! URLs are `http://` (no TLS: the backend is expected on the same host or private network).
//! A call holds up its channel's later messages while it runs (a channel handles one message
//! at a time), and the connect of its connection; other connections and channels are not held
//! up.
//!
//! **Connections and the cap.** Calls go through one pooled HTTP/1.1 client with keep-alive:
//! a connection that answered is reused by the next call to the same host (port included),
//! but not after [`POOL_IDLE`] unused (below the keep-alive timeouts of common servers, so
//! that the backend rarely closes one under a request). At most `[server] backend_max_calls`
//! (default [`DEFAULT_MAX_CALLS`]) calls are in flight at once on a node, all URLs together,
//! and at most that many connections are open to each host: a reconnect storm of 10,000
//! clients is at most that many concurrent requests to the backend, not 10,000 connections.
//! A call beyond the cap is refused at once, never queued ([`BackendError::Busy`]: the connect
//! gets 503, the join and the push the error reply `{"reason":"backend unavailable"}`);
//! phoenix.js reconnects with a backoff, which spreads the storm. Refusals are counted in the
//! metric `firebrand_backend_calls_refused_total{call="connect"|"join"|"push"}`, logged at
//! debug level each, and warned about at most every 10 seconds. A call that times out gives up
//! its request, and its connection is not reused. Webhook requests use a client of their own (one
//! at a time, see [`webhooks`](crate::webhooks)), outside the cap.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default of `server.backend_timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);

/// The default of `server.backend_max_calls`: calls in flight at once, per node.
pub const DEFAULT_MAX_CALLS: usize = 64;

/// How long a pooled connection is kept unused before it is closed.
pub const POOL_IDLE: Duration = Duration::from_millis(1500);

/// The largest answer read from the backend.
pub const MAX_ANSWER: usize = 1 << 20;

/// At most one warning about refused calls per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A backend URL: `http://host[:port]/path`.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendUrl {
    uri: Uri,
    authority: String,
    port: u16,
    host: String,
}

impl fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Without the path and query, which may carry a secret.
        write!(f, "http://{}/…", self.authority)
    }
}

impl std::str::FromStr for BackendUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{s:?}: https is not supported; call the backend over http on a private network"
                ));
            }
            _ => return Err(format!("{s:?}: an http:// URL expected")),
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("{s:?}: no host"));
        };
        if authority.as_str().contains('@') {
            return Err(format!("{s:?}: credentials in the URL are not supported"));
        }
        Ok(BackendUrl {
            host: authority.host().trim_matches(['[', ']']).to_owned(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            uri,
        })
    }
}

/// Why a backend call did not give an answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackendError {
    /// No answer within the timeout.
    Timeout(Duration),
    /// The connection failed (refused, reset…).
    Unreachable(std::io::Error),
    /// An HTTP error.
    Http(String),
    /// A status other than 2xx: the backend refuses.
    Status(u16),
    /// An answer that is not the expected JSON.
    Invalid(String),
    /// Not called: `server.backend_max_calls` calls were in flight already.
    Busy(usize),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Timeout(t) => write!(f, "no answer within {} ms", t.as_millis()),
            BackendError::Unreachable(e) => write!(f, "unreachable: {e}"),
            BackendError::Http(e) => write!(f, "HTTP error: {e}"),
            BackendError::Status(s) => write!(f, "answered HTTP {s}"),
            BackendError::Invalid(e) => write!(f, "invalid answer: {e}"),
            BackendError::Busy(cap) => write!(
                f,
                "not called: {cap} calls in flight already (server.backend_max_calls)"
            ),
        }
    }
}

impl std::error::Error for BackendError {}

impl BackendError {
    /// Whether the backend answered, refusing (a status other than 2xx), rather than being
    /// unavailable.
    pub fn is_refusal(&self) -> bool {
        matches!(self, BackendError::Status(_))
    }
}

/// Describes the backend metrics to the installed recorder.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "firebrand_backend_calls_refused_total",
        "Backend calls refused at once, not made, because server.backend_max_calls were in flight (call: connect, join, push)."
    );
}

/// Makes backend calls through a pooled keep-alive client, each bounded by a timeout, at
/// most `max_calls` at once; cheap to clone (the clones share the pool and the cap).
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    timeout: Duration,
    max_calls: usize,
    calls: Arc<Semaphore>,
    client: Client<Connector, Full<Bytes>>,
    /// Calls refused since the start, and when the last warning about them was logged (in
    /// milliseconds since `started`, plus one; 0: never).
    refused: AtomicU64,
    warned: AtomicU64,
    started: Instant,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("timeout", &self.inner.timeout)
            .field("max_calls", &self.inner.max_calls)
            .finish()
    }
}

impl Backend {
    /// Calls bounded by `timeout`, at most `max_calls` (at least 1) at once. Needs no runtime
    /// to be made, but its calls run in a tokio runtime.
    pub fn new(timeout: Duration, max_calls: usize) -> Self {
        let max_calls = max_calls.max(1);
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let connector = Connector {
            http,
            cap: max_calls,
            wait: timeout,
            hosts: Arc::default(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(max_calls)
            .build(connector);
        Backend {
            inner: Arc::new(Inner {
                timeout,
                max_calls,
                calls: Arc::new(Semaphore::new(max_calls)),
                client,
                refused: AtomicU64::new(0),
                warned: AtomicU64::new(0),
                started: Instant::now(),
            }),
        }
    }

    /// The bound on each call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The most calls in flight at once.
    pub fn max_calls(&self) -> usize {
        self.inner.max_calls
    }

    /// POSTs `body` to `url`; the answer, decoded. `call` names the call in the metrics
    /// (`"connect"`, `"join"`, `"push"`).
    pub async fn call<T: DeserializeOwned>(
        &self,
        call: &'static str,
        url: &BackendUrl,
        body: &Value,
    ) -> Result<T, BackendError> {
        let bytes = self.post(call, url, body.to_string(), &[]).await?;
        serde_json::from_slice(&bytes).map_err(|e| BackendError::Invalid(e.to_string()))
    }

    /// POSTs the JSON `body` to `url` with the extra `headers`; the answer's body (a status
    /// other than 2xx is an error). Bounded by the timeout and refused beyond the cap, like
    /// [`call`](Backend::call).
    pub async fn post(
        &self,
        call: &'static str,
        url: &BackendUrl,
        body: String,
        headers: &[(&'static str, String)],
    ) -> Result<Bytes, BackendError> {
        let Ok(_permit) = self.inner.calls.clone().try_acquire_owned() else {
            self.refused(call);
            return Err(BackendError::Busy(self.inner.max_calls));
        };
        let timeout = self.inner.timeout;
        tokio::time::timeout(timeout, self.send(url, body, headers))
            .await
            .map_err(|_| BackendError::Timeout(timeout))?
    }

    /// Counts a refused call; warns at most every [`WARN_EVERY`] (a storm must not flood the
    /// logs).
    fn refused(&self, call: &'static str) {
        metrics::counter!("firebrand_backend_calls_refused_total", "call" => call).increment(1);
        let inner = &*self.inner;
        let total = inner.refused.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(call, "backend call refused: too many in flight");
        let now = inner.started.elapsed().as_millis() as u64 + 1;
        let last = inner.warned.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && inner
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                max_calls = inner.max_calls,
                refused_since_start = total,
                "backend calls refused: server.backend_max_calls in flight already (next warning in 10 s at the earliest)"
            );
        }
    }

    async fn send(
        &self,
        url: &BackendUrl,
        body: String,
        headers: &[(&'static str, String)],
    ) -> Result<Bytes, BackendError> {
        let mut request = Request::post(url.uri.clone());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .header(header::HOST, &url.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "firebrand-server")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| BackendError::Http(e.to_string()))?;
        let response = self.inner.client.request(request).await.map_err(|e| {
            // The cause's text ("connection refused"…) rather than the client's summary.
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            if e.is_connect() {
                BackendError::Unreachable(std::io::Error::other(cause.to_string()))
            } else {
                BackendError::Http(cause.to_string())
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(BackendError::Status(status.as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| BackendError::Http(e.to_string()))?;
        Ok(body.to_bytes())
    }
}

/// Opens the pool's connections: at most `cap` open at once to each host (waiting up to
/// `wait` for one to close), so that the pool never holds more than the cap of connections to
/// a host, whatever the timing of calls ending and connections returning to it.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    cap: usize,
    wait: Duration,
    /// The open connections' permits, per host.
    hosts: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = Capped;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Capped, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri.authority().map_or("", |a| a.as_str()).to_owned();
        let slots = self
            .hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(host)
            .or_insert_with(|| Arc::new(Semaphore::new(self.cap)))
            .clone();
        let mut http = self.http.clone();
        let wait = self.wait;
        Box::pin(async move {
            let permit = tokio::time::timeout(wait, slots.acquire_owned())
                .await
                .map_err(|_| "no connection to the backend closed in time")??;
            std::future::poll_fn(|cx| http.poll_ready(cx)).await?;
            let io = http.call(uri).await?;
            Ok(Capped {
                io,
                _permit: permit,
            })
        })
    }
}

/// A connection, holding its place among its host's until it is dropped (closed).
struct Capped {
    io: TokioIo<tokio::net::TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl Connection for Capped {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: BackendUrl = "http://127.0.0.1:8080/hooks/connect?x=1".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8080));
        assert_eq!(
            u.uri.path_and_query().unwrap().as_str(),
            "/hooks/connect?x=1"
        );
        let u: BackendUrl = "http://backend/c".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("backend", 80));
        let u: BackendUrl = "http://[::1]:9/c".parse().unwrap();
        assert_eq!(u.host, "::1");
        assert!(format!("{u:?}").contains("[::1]:9"));
        for bad in ["https://x/c", "ftp://x/c", "/c", "x:1", "http://u:p@x/c"] {
            assert!(bad.parse::<BackendUrl>().is_err(), "{bad}");
        }
    }
}
