//! The HTTP entry of a socket: [`SocketBuilder`] (routes, limits, the axum router it mounts)
//! and the WebSocket upgrade.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use crate::endpoint::Endpoint;
use crate::model::channel::Channel;
use crate::model::router::Routes;
use crate::model::runner::Factory;
use crate::model::socket::Socket;
use crate::transport::accept::{Shared, SocketConfig, auth_token, query_params};
use crate::transport::origin::CheckOrigin;

impl Endpoint {
    /// Starts building a socket served by `handler`: add channel routes, then mount its
    /// router. See [`SocketBuilder`].
    pub fn socket<S: Socket>(&self, handler: S) -> SocketBuilder<S> {
        SocketBuilder::new(self.clone(), handler, ())
    }

    /// Starts building a socket whose channels read app state (a database pool, a config, a
    /// cache), as axum's handlers do with `State`: each channel type names the part it reads as
    /// its [`Channel::State`] (or [`TypedChannel::State`](crate::TypedChannel::State)), taken
    /// from `state` with [`FromRef`](crate::FromRef) when a channel starts. A channel whose
    /// part cannot be taken from `state` does not compile. The socket handler is a value of
    /// your own: give it what it needs when you make it.
    ///
    /// ```no_run
    /// use firebrand::{Channel, ConnectError, ConnectInfo, Endpoint, FromRef, JoinContext, JoinError, Joined, Payload, Socket};
    /// use std::sync::Arc;
    ///
    /// #[derive(Clone)]
    /// struct AppState { db: Db, motd: Arc<str> }
    /// #[derive(Clone)]
    /// struct Db; // a connection pool, say
    ///
    /// impl FromRef<AppState> for Db {
    ///     fn from_ref(app: &AppState) -> Db { app.db.clone() }
    /// }
    ///
    /// struct Room;
    /// impl Channel for Room {
    ///     type Assigns = ();
    ///     type State = Db; // only the pool
    ///     type Info = ();
    ///     async fn join(_: &str, _: Payload, ctx: &JoinContext<'_, (), Db>) -> Result<Joined<Self>, JoinError> {
    ///         let _db: &Db = ctx.state();
    ///         Ok(Joined::new(Room))
    ///     }
    /// }
    /// # struct UserSocket; impl Socket for UserSocket { type Assigns = (); async fn connect(&self, _: &ConnectInfo) -> Result<(), ConnectError> { Ok(()) } }
    ///
    /// let state = AppState { db: Db, motd: "hello".into() };
    /// let socket = Endpoint::new()
    ///     .socket_with_state(UserSocket, state)
    ///     .channel::<Room>("room:*")
    ///     .into_router();
    /// ```
    pub fn socket_with_state<S: Socket, St: Send + Sync + 'static>(
        &self,
        handler: S,
        state: St,
    ) -> SocketBuilder<S, St> {
        SocketBuilder::new(self.clone(), handler, state)
    }
}

/// Builds a socket: its channel routes and limits, then an axum [`Router`] to mount.
/// Made by [`Endpoint::socket`].
///
/// ```no_run
/// # use firebrand::*;
/// # struct UserSocket; impl Socket for UserSocket { type Assigns = (); async fn connect(&self, _: &ConnectInfo) -> Result<(), ConnectError> { Ok(()) } }
/// # struct Room; impl Channel for Room { type Assigns = (); type State = (); type Info = ();
/// #   async fn join(_: &str, _: Payload, _: &JoinContext<'_, ()>) -> Result<Joined<Self>, JoinError> { Ok(Joined::new(Room)) } }
/// use std::time::Duration;
///
/// let endpoint = Endpoint::new();
/// let socket = endpoint
///     .socket(UserSocket)
///     .channel::<Room>("room:*")
///     .check_origin(CheckOrigin::allow(["https://example.com"]))
///     .idle_timeout(Duration::from_secs(60))
///     .into_router();
/// // serves GET /socket/websocket
/// let app: axum::Router = axum::Router::new().nest("/socket", socket);
/// ```
pub struct SocketBuilder<S: Socket, St = ()> {
    handler: S,
    state: Arc<St>,
    routes: Routes<S::Assigns>,
    config: SocketConfig,
    endpoint: Endpoint,
}

impl<S: Socket, St: Send + Sync + 'static> SocketBuilder<S, St> {
    pub(crate) fn new(endpoint: Endpoint, handler: S, state: St) -> Self {
        SocketBuilder {
            handler,
            state: Arc::new(state),
            routes: Routes::new(),
            config: SocketConfig::default(),
            endpoint,
        }
    }

    /// Routes topics matching `pattern` to channel type `C`. `"room:*"` matches every topic
    /// starting with `"room:"`; a pattern without `*` matches one topic. The first matching
    /// route wins.
    ///
    /// # Panics
    /// If `*` is anywhere but at the end of `pattern`.
    pub fn channel<C>(mut self, pattern: &str) -> Self
    where
        C: Channel<Assigns = S::Assigns, State: FromRef<St>>,
    {
        let factory = Factory::<C, St>::new(self.state.clone());
        self.routes.add(pattern, Arc::new(factory));
        self
    }

    /// Which `Origin` headers may connect. Default: host `localhost` (see [`CheckOrigin`]).
    pub fn check_origin(mut self, check: CheckOrigin) -> Self {
        self.config.check_origin = check;
        self
    }

    /// Closes a connection (code 1001, reason `"idle timeout"`) when it has sent no frame for
    /// this long. The official client's heartbeat (every 30 s) keeps it open. Default 60 s.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// The most channels one connection may have joined; further joins get the error reply
    /// `{"reason":"too many channels joined"}`. Default 100.
    pub fn max_channels(mut self, n: usize) -> Self {
        self.config.max_channels = n;
        self
    }

    /// The largest client message (and frame) accepted, in bytes. A larger one closes the
    /// connection with code 1009 (message too big). Default 1 MiB.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config.max_frame_size = bytes;
        self
    }

    /// The most bytes queued for one client. A client that reads slower than its messages
    /// arrive fills its queue; when the next frame would pass this limit, the queue is
    /// discarded and the connection closed with code 1008 (`"slow consumer"`), a warning is
    /// logged and [`Stats::slow_consumers`](crate::Stats::slow_consumers) counts it. Other
    /// clients are not slowed. The official client reconnects and rejoins. Default 4 MiB. (The
    /// batch being written is not counted: a connection holds at most about twice this.)
    ///
    /// A long-poll session's frames waiting for its next poll count the same way: past the
    /// limit the session ends as a slow consumer and its next poll starts a new session.
    pub fn outbound_limit(mut self, bytes: usize) -> Self {
        self.config.outbound_limit = bytes;
        self
    }

    /// The most messages waiting for one channel's callbacks. Past it, a client push gets the
    /// error reply `{"reason":"channel overloaded"}` and intercepted broadcasts are dropped
    /// (with a warning). Default 1024.
    pub fn mailbox_limit(mut self, n: usize) -> Self {
        self.config.mailbox_limit = n;
        self
    }

    /// How long one batch of writes to a client may take before the connection is dropped as
    /// a slow consumer. Default 10 s.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// At most `per_second` messages from one client per second (bursts up to the same
    /// number); `None` for no limit. Messages past it get the error reply
    /// `{"reason":"rate limited"}` and are dropped. Default 500. See [`crate::limits`].
    pub fn message_rate(mut self, per_second: Option<u32>) -> Self {
        self.config.message_rate = per_second;
        self
    }

    /// At most `per_second` joins from one client per second (bursts up to the same number);
    /// `None` for no limit. Past it: error reply `{"reason":"rate limited"}`. Default 100.
    pub fn join_rate(mut self, per_second: Option<u32>) -> Self {
        self.config.join_rate = per_second;
        self
    }

    /// The largest payload accepted in one message; larger ones get the error reply
    /// `{"reason":"payload too large"}`. Default 256 KiB. (A frame over
    /// [`max_frame_size`](SocketBuilder::max_frame_size) closes the connection instead.)
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.config.max_payload = bytes;
        self
    }

    /// The longest topic accepted, in bytes; longer ones get the error reply
    /// `{"reason":"topic too long"}`. Default 255 (the V2 binary format's limit).
    pub fn max_topic_len(mut self, bytes: usize) -> Self {
        self.config.max_topic_len = bytes;
        self
    }

    /// The most async replies ([`ChannelContext::reply_later`](crate::ChannelContext::reply_later))
    /// outstanding on one connection. Past it, the push gets the error reply
    /// `{"reason":"too many pending replies"}`. Default 1024.
    pub fn max_pending_replies(mut self, n: usize) -> Self {
        self.config.max_pending_replies = n;
        self
    }

    /// Turns off the message and join rate limits, as in Phoenix, which has none.
    pub fn no_rate_limits(self) -> Self {
        self.message_rate(None).join_rate(None)
    }

    /// Also serves the long-poll transport at `/longpoll` (off by default, as in Phoenix), for
    /// clients without WebSocket and the official client's `longPollFallbackMs`. A poll waits
    /// up to `window` for frames (Phoenix: 10 s); a session not polled for 1.5 windows ends.
    pub fn longpoll(mut self, window: Duration) -> Self {
        self.config.longpoll = Some(window);
        self
    }

    /// The largest long-poll POST body read, in bytes. A larger one is answered HTTP 413
    /// (payload too large) as soon as its `content-length`, or its bytes read so far, pass the
    /// limit: it is never buffered whole. A body is read only for a live session, and must
    /// arrive within the poll window (HTTP 408 otherwise). Default: twice
    /// [`max_frame_size`](SocketBuilder::max_frame_size) (2 MiB; Phoenix reads up to 8 MB
    /// before it looks for the session).
    pub fn max_longpoll_body(mut self, bytes: usize) -> Self {
        self.config.max_longpoll_body = Some(bytes);
        self
    }

    /// Offers permessage-deflate (RFC 7692) to WebSocket clients that ask for it (every
    /// browser does), as Phoenix's `websocket: [compress: true]`. Default off, as in Phoenix.
    ///
    /// Unlike Phoenix, messages are compressed without context takeover (the server answers
    /// `server_no_context_takeover` and `client_no_context_takeover`): a broadcast is
    /// compressed once and the same bytes go to every subscriber that compresses, and an idle
    /// connection holds no compression state. Messages under 128 bytes, which deflate hardly
    /// shortens without a shared window, and those that would not shrink are sent
    /// uncompressed; control frames never are. A compressed client message is inflated to at
    /// most [`max_frame_size`](SocketBuilder::max_frame_size): one that would be larger closes
    /// the connection with 1009. [`Stats::compressed`](crate::Stats::compressed) counts the
    /// messages compressed.
    pub fn compress(mut self, on: bool) -> Self {
        self.config.compress = on;
        self
    }

    /// The axum router serving this socket's transports: `/websocket` (and `/longpoll` when
    /// enabled). Nest it under the socket's path: the official client connects to
    /// `<endpoint>/websocket`.
    pub fn into_router(self) -> Router {
        let shared = self.into_shared();
        let ws = shared.clone();
        let router = Router::new().route(
            "/websocket",
            any(move |req: Request| upgrade(ws.clone(), req)),
        );
        match shared.config.longpoll {
            None => router,
            Some(window) => {
                // Made now, so that in a cluster this node answers forwarded requests at once.
                crate::transport::longpoll::Sessions::of(&shared.endpoint);
                router.route(
                    "/longpoll",
                    any(move |req: Request| {
                        crate::transport::longpoll::handle(shared.clone(), window, req)
                    }),
                )
            }
        }
    }
}

impl<S: Socket, St> SocketBuilder<S, St> {
    pub(crate) fn into_shared(self) -> Arc<Shared<S>> {
        Arc::new(Shared {
            handler: self.handler,
            routes: self.routes,
            config: self.config,
            endpoint: self.endpoint,
        })
    }
}

/// The WebSocket upgrade: method (400), upgrade headers (400), then [`Shared::accept`].
async fn upgrade<S: Socket>(shared: Arc<Shared<S>>, req: Request) -> Response {
    if req.method() != Method::GET {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let (mut parts, _body) = req.into_parts();
    let accept = match crate::transport::ws::accept_key(&parts.headers) {
        Ok(accept) => accept,
        Err(why) => {
            tracing::debug!(why, "invalid WebSocket upgrade");
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
    };
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        // Served by something that cannot hand over the connection (not hyper).
        return (
            StatusCode::UPGRADE_REQUIRED,
            "connection cannot be upgraded",
        )
            .into_response();
    };
    let phoenix_protocol = offers_phoenix(&parts.headers);
    let deflate = shared
        .config
        .compress
        .then(|| crate::transport::ws::negotiate_deflate(&parts.headers))
        .flatten();
    let Some(params) = query_params(&parts.uri) else {
        return (StatusCode::BAD_REQUEST, "invalid query string").into_response();
    };
    let token = auth_token(&parts.headers);
    let accepted = match shared.accept(parts, params, token).await {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    let args = crate::transport::conn::ConnArgs {
        shared: shared.clone(),
        assigns: Arc::new(accepted.assigns),
        socket_id: accepted.socket_id,
        serializer: accepted.serializer,
        deflate,
    };
    tokio::spawn(crate::transport::conn::upgraded(on_upgrade, Box::new(args)));
    let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(deflate) = deflate
        && let Ok(v) = HeaderValue::from_str(&deflate.response())
    {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
    }
    if phoenix_protocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("phoenix"),
        );
    }
    res
}

/// Whether the client offered the `phoenix` subprotocol (the official client does when it
/// sends an `authToken`); it is then the one chosen.
fn offers_phoenix(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "phoenix")
}
