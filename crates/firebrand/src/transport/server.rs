//! [`Server`]: serves an axum app over TCP like `axum::serve`, with the protections a public
//! real-time server needs.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, ToSocketAddrs};
use tower::ServiceExt;

/// The listen backlog [`Server::bind`] asks for: how many connections the kernel queues while
/// the accept loop catches up (Linux caps it at `net.core.somaxconn`, 4096 by default).
///
/// Tokio's `TcpListener::bind` asks for 1024. In a reconnect storm (every client of a drained
/// node, a deploy) that queue overflows, the kernel drops the SYNs, and each dropped client
/// retries only after a second: measured with 5k → 19k clients connecting at once, 4096 took
/// connect + join from 6.2k/s to 18.4k/s and the connect → join reply p99 from 1.02 s to 64 ms.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Serves an axum [`Router`] (with your sockets nested in it) on a TCP listener.
///
/// Like `axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())`, plus:
///
/// - **A handshake deadline.** A client must send its complete request head within
///   [`header_timeout`](Server::header_timeout) (default 10 s), or the connection is closed.
///   Without it (axum's `serve` sets none) a "slowloris" client that sends a header every few
///   seconds holds its connection, and a file descriptor, forever.
/// - **Peer addresses** in [`ConnectInfo::peer_addr`](crate::ConnectInfo::peer_addr).
/// - **Accept errors** (out of file descriptors) are logged and retried after a pause instead
///   of ending the server.
///
/// - **A large listen backlog** with [`Server::bind`] ([`LISTEN_BACKLOG`]): a reconnect storm
///   does not have its connections dropped at the listen queue.
/// - **Bursts written in batches.** Broadcasts made by HTTP requests that arrive together (a
///   publisher pipelining `POST`s) wake the subscribers' connections once the HTTP connection
///   has handled every request it has read, so each subscriber gets the burst in one write
///   rather than a write per few broadcasts ([`Stats::writes_out`](crate::Stats::writes_out)).
///   In `firebrand-bench fanout` that halves a burst's write syscalls and cuts its CPU per
///   delivery by a third.
///
/// ```no_run
/// # async fn f(app: axum::Router, endpoint: firebrand::Endpoint) -> std::io::Result<()> {
/// use std::time::Duration;
/// firebrand::Server::bind("127.0.0.1:4000")
///     .await?
///     .serve(app, async { tokio::signal::ctrl_c().await.ok(); })
///     .await?;
/// // Stopped accepting: now close the sockets gradually.
/// endpoint.drain(Duration::from_secs(10), Duration::from_secs(30)).await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    header_timeout: Duration,
}

impl Server {
    /// A server listening on `addr` with a backlog of [`LISTEN_BACKLOG`] (the first address
    /// that binds, as `TcpListener::bind` does). Prefer it to [`Server::new`] with a listener
    /// of tokio's default backlog.
    pub async fn bind(addr: impl ToSocketAddrs) -> std::io::Result<Server> {
        let mut last = None;
        for addr in tokio::net::lookup_host(addr).await? {
            let socket = match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            // As std and tokio do for listeners: a restarted server rebinds at once.
            socket.set_reuseaddr(true)?;
            match socket.bind(addr) {
                Ok(()) => return Ok(Server::new(socket.listen(LISTEN_BACKLOG)?)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
        }))
    }

    /// The address it listens on (its port, after binding port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A server accepting on `listener` (its backlog is the listener's: see [`Server::bind`]).
    pub fn new(listener: TcpListener) -> Self {
        Server {
            listener,
            header_timeout: Duration::from_secs(10),
        }
    }

    /// How long a client may take to send its request head (the WebSocket handshake, a
    /// long-poll request). Default 10 s.
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// Serves `app` until `shutdown` completes, then stops accepting and returns. Connections
    /// already upgraded to WebSocket stay open: close them with
    /// [`Endpoint::drain`](crate::Endpoint::drain).
    pub async fn serve(
        self,
        app: Router,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return Ok(()),
            };
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let header_timeout = self.header_timeout;
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                        app.clone().oneshot(req)
                    });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                // Writers woken by this connection's broadcasts are woken once it has
                // handled every request it has read: see `node::wakes`.
                if let Err(e) = crate::node::wakes::Holding::new(conn).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}
