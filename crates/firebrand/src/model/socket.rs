//! The [`Socket`] trait: how an app authenticates a connection and gives it assigns, and what
//! it sees of the connecting request ([`ConnectInfo`]).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;

use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

/// Authenticates connections and gives each its assigns.
///
/// ```
/// use firebrand::{ConnectError, ConnectInfo, Socket, TokenSigner};
/// use std::time::Duration;
///
/// struct UserSocket { signer: TokenSigner }
///
/// impl Socket for UserSocket {
///     type Assigns = u64; // the user id, copied into every channel's context
///
///     async fn connect(&self, info: &ConnectInfo) -> Result<u64, ConnectError> {
///         let token = info.param("token").ok_or(ConnectError::forbidden())?;
///         self.signer
///             .verify(token, Duration::from_secs(86_400))
///             .map_err(|_| ConnectError::forbidden())
///     }
///
///     fn id(&self, user_id: &u64) -> Option<String> {
///         Some(format!("user_socket:{user_id}"))
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a firebrand socket handler",
    note = "implement `firebrand::Socket` (`connect`, and optionally `id`) for it"
)]
pub trait Socket: Send + Sync + 'static {
    /// What a connection knows about its client once accepted (a user id, a session…).
    /// Every channel of the connection can read it.
    type Assigns: Send + Sync + 'static;

    /// Accepts a connection with its assigns, or refuses it with an HTTP status (the upgrade
    /// is answered with that status and no WebSocket is opened).
    fn connect(
        &self,
        info: &ConnectInfo,
    ) -> impl Future<Output = Result<Self::Assigns, ConnectError>> + Send;

    /// The socket id: every connection of one id, on every node, can be closed at once with
    /// [`Endpoint::disconnect`](crate::Endpoint::disconnect) (Phoenix's `"disconnect"`
    /// broadcast on the id). Unlike Phoenix's, it is not a topic: no channel can join it or
    /// broadcast to it. `None` (the default) for anonymous connections.
    fn id(&self, assigns: &Self::Assigns) -> Option<String> {
        let _ = assigns;
        None
    }
}

/// What a connecting client sent: query params, headers, peer address, auth token.
#[derive(Debug)]
pub struct ConnectInfo {
    pub(crate) params: Vec<(String, String)>,
    pub(crate) headers: HeaderMap,
    pub(crate) uri: Uri,
    pub(crate) peer_addr: Option<SocketAddr>,
    pub(crate) auth_token: Option<String>,
}

impl ConnectInfo {
    /// Connect info of an in-process test client.
    #[cfg(feature = "testing")]
    pub(crate) fn for_test(params: Vec<(String, String)>, auth_token: Option<String>) -> Self {
        ConnectInfo {
            params,
            headers: HeaderMap::new(),
            uri: Uri::from_static("/socket/websocket"),
            peer_addr: None,
            auth_token,
        }
    }

    /// A query parameter, e.g. the connect params of `new Socket(url, {params: {token}})`.
    /// Nested params (`a[b]=c`) appear under their full name (`"a[b]"`). `vsn` is a param too.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All query parameters, in order.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The request URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The `Origin` header, if any.
    pub fn origin(&self) -> Option<&str> {
        self.headers.get(header::ORIGIN)?.to_str().ok()
    }

    /// The `User-Agent` header, if any.
    pub fn user_agent(&self) -> Option<&str> {
        self.headers.get(header::USER_AGENT)?.to_str().ok()
    }

    /// The peer's address. Present when the app is served with
    /// `into_make_service_with_connect_info::<SocketAddr>()`.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// The token sent by the official client's `authToken` option (in
    /// `Sec-WebSocket-Protocol`), decoded.
    pub fn auth_token(&self) -> Option<&str> {
        self.auth_token.as_deref()
    }
}

/// A refused connection: the HTTP status the upgrade request gets (403 by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectError {
    pub(crate) status: StatusCode,
}

impl ConnectError {
    /// Refuses with 403 Forbidden (what Phoenix answers to `:error`).
    pub fn forbidden() -> Self {
        ConnectError {
            status: StatusCode::FORBIDDEN,
        }
    }

    /// Refuses with another status, e.g. 429 Too Many Requests.
    pub fn status(status: StatusCode) -> Self {
        ConnectError { status }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection refused with HTTP {}", self.status)
    }
}

impl std::error::Error for ConnectError {}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        self.status.into_response()
    }
}
