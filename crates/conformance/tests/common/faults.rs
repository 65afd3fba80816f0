//! A fault injector for the cluster tests (issue 26): a TCP proxy on 127.0.0.1:0 in front of an
//! upstream address (Redis, NATS), driven by the test through a cloneable [`Proxy`] handle.
//!
//! - [`Proxy::pass`]: forward both ways (the initial mode).
//! - [`Proxy::hold`]: a stalled network. Nothing is forwarded in either direction, the sockets
//!   stay open (no FIN, no RST), and nothing is lost: on [`Proxy::pass`] everything held is
//!   delivered, in order. The proxy holds at most one chunk per direction and connection; the
//!   rest stays in the kernel, because the proxy stops reading: the socket buffers fill and the
//!   senders block, as they would behind a stalled link.
//! - [`Proxy::drop_bytes`]: a lossy network. Everything read while in this mode is discarded;
//!   the connections stay open.
//! - [`Proxy::reset`]: every current connection is aborted, both ways (`SO_LINGER` 0, then
//!   close: the peers get an RST). New connections are accepted as before.
//!
//! New connections are always accepted (the kernel does that), but the proxy connects to the
//! upstream only in [`Mode::Pass`]: a SYN does not cross a stalled or lossy network either, and
//! is retried until it does. A chunk that the proxy had read when a hold began is delivered
//! when the hold ends (or discarded, if it ends in [`Proxy::drop_bytes`] before its forwarding
//! began). A FIN crosses the proxy as bytes do: held while held.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with the bytes it could forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Hold,
    Drop,
}

/// Counters, all since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Connections open now (accepted and not yet closed or reset).
    pub open: u64,
    /// Bytes forwarded from clients to the upstream.
    pub up: u64,
    /// Bytes forwarded from the upstream to clients.
    pub down: u64,
    /// Bytes discarded (both directions) by [`Proxy::drop_bytes`].
    pub dropped: u64,
    /// Connections aborted by [`Proxy::reset`].
    pub resets: u64,
}

struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped by [`Proxy::reset`]: each connection aborts when it changes.
    reset: watch::Sender<u64>,
    accepted: AtomicU64,
    open: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    dropped: AtomicU64,
    resets: AtomicU64,
}

/// Aborts the accept loop and resets the open connections when the last handle is dropped.
struct Guard {
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.reset.send_modify(|n| *n += 1);
    }
}

/// The proxy's handle; clones drive the same proxy. Dropping the last one stops it and resets
/// its connections.
#[derive(Clone)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
}

impl Proxy {
    /// A proxy on 127.0.0.1:0 to `upstream`, in [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            mode: watch::Sender::new(Mode::Pass),
            reset: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Proxy {
            addr,
            _guard: Arc::new(Guard {
                shared: shared.clone(),
                accept,
            }),
            shared,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Forward both ways; ends a hold (delivering what was held, in order) or a drop.
    pub fn pass(&self) {
        self.shared.mode.send_replace(Mode::Pass);
    }

    /// Stop forwarding both ways, keeping the bytes and the connections (no FIN, no RST).
    pub fn hold(&self) {
        self.shared.mode.send_replace(Mode::Hold);
    }

    /// Discard the bytes both ways, keeping the connections.
    pub fn drop_bytes(&self) {
        self.shared.mode.send_replace(Mode::Drop);
    }

    /// Abort every current connection with an RST to both of its peers. The mode is unchanged.
    pub fn reset(&self) {
        self.shared.reset.send_modify(|n| *n += 1);
    }

    pub fn counters(&self) -> Counters {
        let s = &self.shared;
        Counters {
            accepted: s.accepted.load(Ordering::SeqCst),
            open: s.open.load(Ordering::SeqCst),
            up: s.up.load(Ordering::SeqCst),
            down: s.down.load(Ordering::SeqCst),
            dropped: s.dropped.load(Ordering::SeqCst),
            resets: s.resets.load(Ordering::SeqCst),
        }
    }

    /// Waits until `done(counters)` holds; fails the test after `within`. (The counters change
    /// as the proxy's tasks move bytes; this checks them every 5 ms.)
    pub async fn until(&self, within: Duration, done: impl Fn(&Counters) -> bool) -> Counters {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let c = self.counters();
            if done(&c) {
                return c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "proxy counters never reached the expected state: {c:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        // Subscribed now: a reset from here on aborts this connection.
        let reset = shared.reset.subscribe();
        tokio::spawn(async move {
            connection(client, &shared, reset).await;
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One client connection: connects to the upstream once passing, then pumps both ways until
/// both are closed, one fails (the other peer is then reset too) or the proxy resets it.
async fn connection(mut client: TcpStream, shared: &Shared, mut reset: watch::Receiver<u64>) {
    let _ = client.set_nodelay(true);
    let upstream = tokio::select! {
        _ = reset.changed() => {
            shared.resets.fetch_add(1, Ordering::SeqCst);
            None
        }
        upstream = connect_upstream(shared) => upstream,
    };
    let Some(mut upstream) = upstream else {
        abort(&client);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let abort_both = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let up = pump(&mut cr, &mut uw, shared, &shared.up);
        let down = pump(&mut ur, &mut cw, shared, &shared.down);
        tokio::select! {
            _ = reset.changed() => {
                shared.resets.fetch_add(1, Ordering::SeqCst);
                true
            }
            // One side failed (reset by its peer, say): pass it on to the other.
            r = async { tokio::try_join!(up, down) } => r.is_err(),
        }
    };
    if abort_both {
        abort(&client);
        abort(&upstream);
    }
    // Dropped here: closed, with an RST where aborted.
}

/// Connects to the upstream once the mode is [`Mode::Pass`] (a SYN retried until the network
/// carries it). `None` if the upstream refuses: the client is then reset, as a refused connect.
async fn connect_upstream(shared: &Shared) -> Option<TcpStream> {
    let mut mode = shared.mode.subscribe();
    mode.wait_for(|m| *m == Mode::Pass).await.ok()?;
    TcpStream::connect(shared.upstream).await.ok()
}

/// SO_LINGER 0: closing the socket (when it is dropped) sends an RST, not a FIN.
fn abort(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// Forwards `src` to `dst` as the mode says, counting into `count`; on EOF, shuts `dst`'s write
/// side (a FIN forwarded) and returns. An error ends the connection (the caller resets it).
async fn pump(
    src: &mut tokio::net::tcp::ReadHalf<'_>,
    dst: &mut tokio::net::tcp::WriteHalf<'_>,
    shared: &Shared,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let gone = || std::io::Error::other("the proxy stopped");
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While held, the bytes wait in the kernel: read nothing.
        mode.wait_for(|m| *m != Mode::Hold)
            .await
            .map_err(|_| gone())?;
        let n = tokio::select! {
            biased;
            changed = mode.changed() => {
                changed.map_err(|_| gone())?;
                continue;
            }
            // Cancel-safe: a read that loses this race consumed nothing.
            n = src.read(&mut buf) => n?,
        };
        // Read just as a hold began: deliver it when the hold ends.
        let now = *mode
            .wait_for(|m| *m != Mode::Hold)
            .await
            .map_err(|_| gone())?;
        if n == 0 {
            dst.shutdown().await?;
            return Ok(());
        }
        if now == Mode::Drop {
            shared.dropped.fetch_add(n as u64, Ordering::SeqCst);
            continue;
        }
        // Forward the chunk; a hold that begins meanwhile stops it where it is.
        let mut off = 0;
        while off < n {
            tokio::select! {
                biased;
                changed = mode.changed() => {
                    changed.map_err(|_| gone())?;
                    mode.wait_for(|m| *m != Mode::Hold).await.map_err(|_| gone())?;
                }
                // Cancel-safe: a write that loses this race wrote nothing.
                w = dst.write(&buf[off..n]) => {
                    let w = w?;
                    if w == 0 {
                        return Err(std::io::ErrorKind::WriteZero.into());
                    }
                    off += w;
                    count.fetch_add(w as u64, Ordering::SeqCst);
                }
            }
        }
    }
}
