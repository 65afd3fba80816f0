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
//! Each call opens its own connection (HTTP/1.1, `connection: close`). A call holds up its
//! channel's later messages while it runs (a channel handles one message at a time), and the
//! connect of its connection; other connections and channels are not held up.

use std::fmt;
use std::time::Duration;

use axum::http::{Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The default of `server.backend_timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);

/// The largest answer read from the backend.
pub const MAX_ANSWER: usize = 1 << 20;

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
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Timeout(t) => write!(f, "no answer within {} ms", t.as_millis()),
            BackendError::Unreachable(e) => write!(f, "unreachable: {e}"),
            BackendError::Http(e) => write!(f, "HTTP error: {e}"),
            BackendError::Status(s) => write!(f, "answered HTTP {s}"),
            BackendError::Invalid(e) => write!(f, "invalid answer: {e}"),
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

/// Makes backend calls, each bounded by a timeout.
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    timeout: Duration,
}

impl Backend {
    /// Calls bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Backend { timeout }
    }

    /// The bound on each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POSTs `body` to `url`; the answer, decoded.
    pub async fn call<T: DeserializeOwned>(
        &self,
        url: &BackendUrl,
        body: &Value,
    ) -> Result<T, BackendError> {
        let bytes = self.post(url, body.to_string(), &[]).await?;
        serde_json::from_slice(&bytes).map_err(|e| BackendError::Invalid(e.to_string()))
    }

    /// POSTs the JSON `body` to `url` with the extra `headers`; the answer's body (a status
    /// other than 2xx is an error). Bounded by the timeout, like [`call`](Backend::call).
    pub async fn post(
        &self,
        url: &BackendUrl,
        body: String,
        headers: &[(&'static str, String)],
    ) -> Result<Bytes, BackendError> {
        tokio::time::timeout(self.timeout, post(url, body, self.timeout, headers))
            .await
            .map_err(|_| BackendError::Timeout(self.timeout))?
    }
}

async fn post(
    url: &BackendUrl,
    body: String,
    bound: Duration,
    headers: &[(&'static str, String)],
) -> Result<Bytes, BackendError> {
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(BackendError::Unreachable)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BackendError::Http(e.to_string()))?;
    // Drives the connection until it ends, or the bound passes (a call that timed out leaves
    // its connection to a slow backend behind).
    tokio::spawn(async move {
        let _ = tokio::time::timeout(bound, conn).await;
    });
    let path = url
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut request = Request::post(path);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request
        .header(header::HOST, &url.authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "firebrand-server")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| BackendError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| BackendError::Http(e.to_string()))?;
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
