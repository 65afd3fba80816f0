//! What every transport shares and checks before a connection opens: the socket's
//! configuration and handler ([`Shared`]), the origin and `vsn` checks, the auth token, and
//! the app's `connect` ([`Shared::accept`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo as AxumConnectInfo;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use firebrand_protocol::Serializer;

use crate::endpoint::Endpoint;
use crate::model::router::Routes;
use crate::model::socket::{ConnectError, ConnectInfo, Socket};
use crate::node::Refused;
use crate::transport::origin::CheckOrigin;

/// Limits and timeouts of a socket's connections. Set with [`SocketBuilder`]'s methods.
#[derive(Clone, Debug)]
pub(crate) struct SocketConfig {
    pub(crate) check_origin: CheckOrigin,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_channels: usize,
    pub(crate) max_frame_size: usize,
    pub(crate) outbound_limit: usize,
    pub(crate) mailbox_limit: usize,
    pub(crate) write_timeout: Duration,
    /// The long-poll poll window, when long-poll is on.
    pub(crate) longpoll: Option<Duration>,
    /// `None`: twice `max_frame_size` ([`SocketConfig::longpoll_body_limit`]).
    pub(crate) max_longpoll_body: Option<usize>,
    pub(crate) message_rate: Option<u32>,
    pub(crate) join_rate: Option<u32>,
    pub(crate) max_payload: usize,
    pub(crate) max_topic_len: usize,
    pub(crate) max_pending_replies: usize,
    /// Whether permessage-deflate is offered to WebSocket clients.
    pub(crate) compress: bool,
}

impl SocketConfig {
    /// The largest long-poll POST body read: as set, or twice the frame limit (a POST carries
    /// one frame, or a batch of the official client's queued frames).
    pub(crate) fn longpoll_body_limit(&self) -> usize {
        self.max_longpoll_body
            .unwrap_or(self.max_frame_size.saturating_mul(2))
    }
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            check_origin: CheckOrigin::default(),
            idle_timeout: Duration::from_secs(60),
            max_channels: 100,
            max_frame_size: 1 << 20,
            outbound_limit: 4 << 20,
            mailbox_limit: 1024,
            write_timeout: Duration::from_secs(10),
            longpoll: None,
            max_longpoll_body: None,
            message_rate: Some(500),
            join_rate: Some(100),
            max_payload: 256 * 1024,
            max_topic_len: 255,
            max_pending_replies: 1024,
            compress: false,
        }
    }
}

/// A socket's handler, routes and configuration, shared by all its connections.
pub(crate) struct Shared<S: Socket> {
    pub(crate) handler: S,
    pub(crate) routes: Routes<S::Assigns>,
    pub(crate) config: SocketConfig,
    pub(crate) endpoint: Endpoint,
}

/// The offered `Sec-WebSocket-Protocol` entry carrying the official client's `authToken`.
const AUTH_TOKEN_PREFIX: &str = "base64url.bearer.phx.";

pub(crate) fn auth_token(headers: &HeaderMap) -> Option<String> {
    let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let encoded = offered
        .split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix(AUTH_TOKEN_PREFIX))?;
    // phoenix.js uses btoa (standard alphabet) with the padding stripped; accept URL-safe too.
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .or_else(|_| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('='))
        })
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// A request that passed the checks and `connect`.
pub(crate) struct Accepted<A> {
    pub(crate) assigns: A,
    pub(crate) socket_id: Option<Arc<str>>,
    pub(crate) serializer: Serializer,
}

/// Why a connection request was refused.
pub(crate) enum Refusal {
    Origin,
    Vsn(firebrand_protocol::UnsupportedVsn),
    Connect(ConnectError),
    /// The endpoint is draining ([`Endpoint::drain`]): the client should try another node.
    Draining,
}

impl Refusal {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Refusal::Origin | Refusal::Vsn(_) => StatusCode::FORBIDDEN,
            Refusal::Connect(e) => e.status,
            Refusal::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Its counter.
    fn counted_as(&self) -> Refused {
        match self {
            Refusal::Origin => Refused::Origin,
            Refusal::Vsn(_) => Refused::Vsn,
            Refusal::Connect(_) => Refused::Connect,
            Refusal::Draining => Refused::Draining,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Origin => (StatusCode::FORBIDDEN, "origin not allowed").into_response(),
            Refusal::Vsn(e) => (StatusCode::FORBIDDEN, e.to_string()).into_response(),
            Refusal::Connect(e) => e.into_response(),
            Refusal::Draining => {
                (StatusCode::SERVICE_UNAVAILABLE, "the server is draining").into_response()
            }
        }
    }
}

/// A request's query params; `None` when the query string is malformed (answer 400).
pub(crate) fn query_params(uri: &Uri) -> Option<Vec<(String, String)>> {
    match uri.query() {
        None => Some(Vec::new()),
        Some(q) => serde_urlencoded::from_str(q).ok(),
    }
}

impl<S: Socket> Shared<S> {
    /// The checks every transport makes, in Phoenix's order: origin, serializer `vsn`, then
    /// [`Socket::connect`] and [`Socket::id`] (a draining endpoint refuses first). A refusal is
    /// counted.
    pub(crate) async fn accept(
        &self,
        parts: axum::http::request::Parts,
        params: Vec<(String, String)>,
        auth_token: Option<String>,
    ) -> Result<Accepted<S::Assigns>, Refusal> {
        let hub = self.endpoint.hub();
        let accepted = if hub.is_draining() {
            Err(Refusal::Draining)
        } else {
            self.check(parts, params, auth_token).await
        };
        if let Err(refusal) = &accepted {
            hub.count_refused(refusal.counted_as());
        }
        accepted
    }

    async fn check(
        &self,
        parts: axum::http::request::Parts,
        params: Vec<(String, String)>,
        auth_token: Option<String>,
    ) -> Result<Accepted<S::Assigns>, Refusal> {
        if let Some(origin) = parts.headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !self.config.check_origin.allows(origin) {
                tracing::warn!(origin, "connection refused: origin not allowed");
                return Err(Refusal::Origin);
            }
        }
        let vsn = params
            .iter()
            .find(|(k, _)| k == "vsn")
            .map(|(_, v)| v.as_str());
        let serializer = Serializer::from_vsn(vsn).map_err(|e| {
            tracing::debug!(error = %e, "connection refused");
            Refusal::Vsn(e)
        })?;
        let info = ConnectInfo {
            params,
            auth_token,
            peer_addr: parts
                .extensions
                .get::<AxumConnectInfo<SocketAddr>>()
                .map(|c| c.0),
            uri: parts.uri,
            headers: parts.headers,
        };
        let assigns = self
            .handler
            .connect(&info)
            .await
            .map_err(Refusal::Connect)?;
        let socket_id = self.handler.id(&assigns).map(Arc::<str>::from);
        Ok(Accepted {
            assigns,
            socket_id,
            serializer,
        })
    }
}
