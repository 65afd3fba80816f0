//! The socket: one WebSocket connection (reconnected as needed) carrying many channels.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use firebrand_protocol::Payload;
use firebrand_protocol::contract::Contract;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::backoff::{self, Schedule};
use crate::channel::{Channel, Params};
use crate::error::ConnectError;
use crate::task::{Command, Config, Task};
use crate::typed::TypedChannel;
use crate::wire;

/// Something that happened to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocketEvent {
    /// The WebSocket opened (first connect or reconnect).
    Open,
    /// The WebSocket closed. Unless [`Socket::disconnect`] was called, a reconnect is scheduled.
    Closed {
        /// The close code, when a close frame was sent or received (`1000` with reason
        /// `"heartbeat timeout"` when the client gave up on the server).
        code: Option<u16>,
        /// The close reason (may be empty).
        reason: String,
    },
    /// A connection attempt failed (refused, HTTP error status, handshake error). A reconnect
    /// is scheduled.
    Error {
        /// The HTTP status when the server answered the upgrade with one (e.g. 403).
        status: Option<u16>,
        /// What went wrong.
        message: String,
    },
}

/// The socket's events: see [`Socket::events`].
///
/// Unbounded, like [`Events`](crate::Events): keep reading or drop it.
#[derive(Debug)]
pub struct SocketEvents {
    rx: mpsc::UnboundedReceiver<SocketEvent>,
}

impl SocketEvents {
    /// The next event, or `None` once the socket is gone. Cancel-safe.
    pub async fn recv(&mut self) -> Option<SocketEvent> {
        self.rx.recv().await
    }
}

/// Configures a [`Socket`]; [`connect`](SocketBuilder::connect) starts it.
pub struct SocketBuilder {
    endpoint: String,
    params: Vec<(String, String)>,
    auth_token: Option<String>,
    timeout: Duration,
    heartbeat: Duration,
    reconnect_after: Schedule,
    rejoin_after: Schedule,
    jitter: f64,
    compress: bool,
}

impl std::fmt::Debug for SocketBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketBuilder")
            .field("endpoint", &self.endpoint)
            .field("params", &self.params)
            .field("timeout", &self.timeout)
            .field("heartbeat", &self.heartbeat)
            .field("jitter", &self.jitter)
            .field("compress", &self.compress)
            .finish_non_exhaustive()
    }
}

impl SocketBuilder {
    /// Adds a connect param (sent in the query string; Phoenix's `connect/3` params).
    pub fn param(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((key.into(), value.into()));
        self
    }

    /// Sends `token` as phoenix.js's `authToken` does: in `Sec-WebSocket-Protocol` as
    /// `phoenix, base64url.bearer.phx.<base64>`. The server must answer with the `phoenix`
    /// subprotocol (Phoenix and firebrand do).
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// The default timeout of joins, pushes and leaves (default 10 s, phoenix.js's `timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often to send a heartbeat, and how long to wait for its reply before closing the
    /// connection and reconnecting (default 30 s).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// The delay before reconnect attempt `tries` (1, 2, …; reset when a connection opens).
    /// Default: [`reconnect_after`](crate::reconnect_after), phoenix.js's schedule.
    pub fn reconnect_after(mut self, f: impl Fn(u32) -> Duration + Send + Sync + 'static) -> Self {
        self.reconnect_after = Arc::new(f);
        self
    }

    /// The delay before rejoin attempt `tries` of an errored channel while connected.
    /// Default: [`rejoin_after`](crate::rejoin_after), phoenix.js's schedule.
    pub fn rejoin_after(mut self, f: impl Fn(u32) -> Duration + Send + Sync + 'static) -> Self {
        self.rejoin_after = Arc::new(f);
        self
    }

    /// Spreads each reconnect and rejoin delay uniformly over `delay × [1 - jitter, 1 + jitter]`
    /// so clients cut off together do not come back together (default `0.5`, i.e. ±50 %;
    /// `0.0` is phoenix.js's exact schedule). Clamped to `0.0..=1.0`.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// Offers permessage-deflate (RFC 7692) when connecting (default off). A server that
    /// compresses — firebrand with `compress`, Phoenix with `websocket: [compress: true]` —
    /// then sends its larger messages deflated, and this client inflates them, each to at most
    /// 64 MiB (a message that would inflate further fails the connection, which is then
    /// reconnected). The client's own messages go uncompressed, as RFC 7692 allows. A server
    /// that does not compress just declines the offer.
    ///
    /// Over `ws://` only for now: tungstenite has no extension support, so the client inflates
    /// beneath it, on the TCP stream, where `wss://` carries ciphertext. Over `wss://` the
    /// offer is not made and the connection is uncompressed.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), firebrand_client::ConnectError> {
    /// let socket = firebrand_client::Socket::builder("ws://127.0.0.1:4000/socket")
    ///     .compress(true)
    ///     .connect()?;
    /// # Ok(()) }
    /// ```
    pub fn compress(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    /// Starts the socket: it connects in the background, and reconnects whenever the connection
    /// is lost, until [`Socket::disconnect`] or until the socket and all its channels are
    /// dropped. Fails only on a malformed URL.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn connect(self) -> Result<Socket, ConnectError> {
        let url = wire::websocket_url(&self.endpoint, &self.params);
        url.as_str()
            .into_client_request()
            .map_err(|e| ConnectError::InvalidUrl(e.to_string()))?;
        let protocols = match &self.auth_token {
            Some(token) => Some(
                HeaderValue::from_str(&wire::auth_protocols(token))
                    .map_err(|e| ConnectError::InvalidHeader(e.to_string()))?,
            ),
            None => None,
        };
        let (cmd, rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let config = Config {
            url,
            protocols,
            timeout: self.timeout,
            heartbeat: self.heartbeat,
            reconnect_after: self.reconnect_after,
            rejoin_after: self.rejoin_after,
            jitter: self.jitter,
            compress: self.compress,
            connected: connected.clone(),
        };
        tokio::spawn(Task::new(config, rx).run());
        Ok(Socket {
            inner: Arc::new(SocketInner {
                cmd,
                timeout: self.timeout,
                next_id: AtomicU64::new(1),
                connected,
            }),
        })
    }
}

/// A connection to a Phoenix Channels server, kept open: heartbeats, reconnects with backoff
/// and jitter, and the channels on it. Cheap to clone.
///
/// The connection lives in a background task that ends when the socket and all its channels are
/// dropped.
#[derive(Clone, Debug)]
pub struct Socket {
    inner: Arc<SocketInner>,
}

#[derive(Debug)]
struct SocketInner {
    cmd: mpsc::UnboundedSender<Command>,
    timeout: Duration,
    next_id: AtomicU64,
    connected: Arc<AtomicBool>,
}

impl Socket {
    /// Starts configuring a socket for `endpoint`, the socket's mount URL such as
    /// `ws://localhost:4000/socket`: the client connects to
    /// `<endpoint>/websocket?<params>&vsn=2.0.0`.
    pub fn builder(endpoint: impl Into<String>) -> SocketBuilder {
        SocketBuilder {
            endpoint: endpoint.into(),
            params: Vec::new(),
            auth_token: None,
            timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(30),
            reconnect_after: Arc::new(backoff::reconnect_after),
            rejoin_after: Arc::new(backoff::rejoin_after),
            jitter: 0.5,
            compress: false,
        }
    }

    /// A channel on `topic` with fixed join params (e.g. `json!({})`).
    pub fn channel(&self, topic: impl Into<String>, params: impl Into<Payload>) -> Channel {
        let params = params.into();
        self.channel_with(topic, move || params.clone())
    }

    /// A channel on `topic` whose join params are computed by `params` on every join and
    /// rejoin (phoenix.js's params closure), e.g. to send the last message id seen.
    pub fn channel_with<P: Into<Payload>>(
        &self,
        topic: impl Into<String>,
        params: impl Fn() -> P + Send + Sync + 'static,
    ) -> Channel {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let topic = topic.into();
        let params: Params = Arc::new(move || params().into());
        let _ = self.inner.cmd.send(Command::NewChannel {
            id,
            topic: topic.clone(),
            params,
        });
        Channel::new(id, topic, self.inner.cmd.clone(), self.inner.timeout)
    }

    /// A channel on `topic` of contract `C`, with the contract's join params (encoded once,
    /// here; a recoverable topic's rejoins add `since` to them by themselves): typed joins,
    /// pushes and events over the untyped [`Channel`] (see [`TypedChannel`]).
    ///
    /// Params that cannot be encoded as JSON (a map with non-string keys) make
    /// [`TypedChannel::join`] fail with [`TypedJoinError::Encode`](crate::TypedJoinError::Encode).
    ///
    /// ```no_run
    /// # use firebrand_client::{Socket, contract::{Contract, Empty}};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Nick { nick: String }
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Welcome { motd: String }
    ///
    /// struct Room;
    /// impl Contract for Room {
    ///     type JoinParams = Nick;
    ///     type JoinReply = Welcome;
    ///     type Pushes = ();
    ///     type Events = ();
    ///     type Meta = Empty;
    /// }
    /// # async fn run(socket: Socket) -> Result<(), Box<dyn std::error::Error>> {
    /// let room = socket.typed_channel::<Room>("room:lobby", &Nick { nick: "ada".into() });
    /// let Welcome { motd } = room.join().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn typed_channel<C: Contract>(
        &self,
        topic: impl Into<String>,
        params: &C::JoinParams,
    ) -> TypedChannel<C> {
        match TypedChannel::<C>::encode_params(params) {
            Ok(params) => TypedChannel::new(self.channel(topic, params), None),
            Err(e) => TypedChannel::new(self.channel(topic, Payload::empty()), Some(e)),
        }
    }

    /// A new stream of the socket's events from now on; it starts with
    /// [`SocketEvent::Open`] when the socket is connected at the time.
    pub fn events(&self) -> SocketEvents {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.inner.cmd.send(Command::SubscribeSocket { tx });
        SocketEvents { rx }
    }

    /// Whether the WebSocket is open right now.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Closes the connection (code 1000) and stops reconnecting. Channels error, and rejoin
    /// after [`Socket::connect`].
    pub fn disconnect(&self) {
        let _ = self.inner.cmd.send(Command::Disconnect);
    }

    /// Connects again after [`Socket::disconnect`] (does nothing while connected or connecting).
    pub fn connect(&self) {
        let _ = self.inner.cmd.send(Command::Connect);
    }
}
