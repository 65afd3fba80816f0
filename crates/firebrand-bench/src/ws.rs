//! A lean WebSocket client: the upgrade by hand, frames parsed in place from one small buffer,
//! client frames masked with the all-zero key (valid, and no XOR work). Subscribers that only
//! count what arrives read with [`Ws::drain`]: one large read per wake-up into a per-thread
//! buffer, frames found by their length headers.

use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, ready};

use memchr::memmem;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

/// Connections per source address (the ephemeral port range is ~28k per address).
const PER_SOURCE: u64 = 10_000;
static SERIAL: AtomicU64 = AtomicU64::new(0);
const BUF: usize = 4096;
/// [`Ws::drain`]'s read size: a burst of 100 frames of 150 bytes (15 KB) in one read.
const SCRATCH: usize = 256 << 10;

thread_local! {
    /// [`Ws::drain`]'s buffer, one per thread (borrowed only inside one poll).
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// The environment variable giving a process its source range `B.C`: its addresses are
/// 127.B.C.2, 127.B.C.3, … (then 127.B.C+1.2, …). Unset: 127.0.0.x (the coordinator).
pub(crate) const SOURCE_ENV: &str = "FIREBRAND_BENCH_SOURCE";

/// RSV1 in a frame's first byte: the message is compressed (RFC 7692).
pub(crate) const RSV1: u8 = 0x40;

/// The environment variable that makes a process's clients offer permessage-deflate
/// (`--deflate`; the coordinator hands it to its workers).
pub(crate) const DEFLATE_ENV: &str = "FIREBRAND_BENCH_DEFLATE";

static DEFLATE: std::sync::LazyLock<std::sync::atomic::AtomicBool> =
    std::sync::LazyLock::new(|| std::env::var(DEFLATE_ENV).is_ok_and(|v| v == "1").into());

/// Whether clients offer permessage-deflate (`--deflate`).
pub(crate) fn offers_deflate() -> bool {
    DEFLATE.load(Ordering::Relaxed)
}

/// Makes this process's clients offer permessage-deflate.
pub(crate) fn offer_deflate() {
    DEFLATE.store(true, Ordering::Relaxed);
}

static BASE: std::sync::LazyLock<(u8, u8)> = std::sync::LazyLock::new(|| {
    std::env::var(SOURCE_ENV)
        .ok()
        .and_then(|v| {
            let (b, c) = v.split_once('.')?;
            Some((b.parse().ok()?, c.parse().ok()?))
        })
        .unwrap_or((0, 0))
});

/// The next source address: 127.B.C.2, … one per `PER_SOURCE` connections, never reused in a
/// run (so TIME_WAIT from an earlier phase does not exhaust ports). Each process of a run has
/// its own `B.C` (see [`SOURCE_ENV`]).
fn next_source() -> Ipv4Addr {
    let n = SERIAL.fetch_add(1, Ordering::Relaxed) / PER_SOURCE;
    let (b, c) = *BASE;
    Ipv4Addr::new(127, b, c.wrapping_add((n / 250) as u8), (2 + n % 250) as u8)
}

/// A TCP connection from the next source address, with `TCP_NODELAY`.
pub(crate) async fn tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(next_source().into(), 0))?;
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Appends a masked client frame (all-zero key) to `out`.
pub(crate) fn client_frame(out: &mut Vec<u8>, opcode: u8, data: &[u8]) {
    out.push(0x80 | opcode);
    let n = data.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(data);
}

/// Parses one frame header at the start of `b`: (fin+opcode byte, masked, header len, data len).
pub(crate) fn parse_header(b: &[u8]) -> Option<(u8, bool, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (len, mut hl) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([b[2], b[3]]) as usize, 4)
        }
        127 => {
            if b.len() < 10 {
                return None;
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(l) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if masked {
        hl += 4;
    }
    if b.len() < hl + len {
        return None;
    }
    Some((b[0], masked, hl, len))
}

/// One client connection.
pub(crate) struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes read from the socket after the upgrade response head.
    pub(crate) read_bytes: u64,
}

impl Ws {
    /// Connects and upgrades (`path` includes the query, e.g. `/socket/websocket?vsn=2.0.0`).
    pub(crate) async fn connect(addr: SocketAddr, path: &str) -> io::Result<Ws> {
        Self::connect_offering(addr, path, offers_deflate()).await
    }

    /// [`Ws::connect`], offering permessage-deflate or not whatever `--deflate` says.
    pub(crate) async fn connect_offering(
        addr: SocketAddr,
        path: &str,
        deflate: bool,
    ) -> io::Result<Ws> {
        let mut stream = tcp(addr).await?;
        // The offer browsers make.
        let extensions = if deflate {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extensions}\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut ws = Ws {
            stream,
            buf: vec![0; BUF],
            start: 0,
            end: 0,
            read_bytes: 0,
        };
        loop {
            if let Some(pos) = memmem::find(&ws.buf[..ws.end], b"\r\n\r\n") {
                if !ws.buf.starts_with(b"HTTP/1.1 101") {
                    let head = String::from_utf8_lossy(&ws.buf[..pos]).into_owned();
                    return Err(invalid(format!("upgrade refused: {head}")));
                }
                ws.start = pos + 4;
                ws.read_bytes = (ws.end - ws.start) as u64;
                return Ok(ws);
            }
            if ws.end == ws.buf.len() {
                return Err(invalid("response head too large"));
            }
            let n = ws.stream.read(&mut ws.buf[ws.end..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            ws.end += n;
        }
    }

    /// Sends bytes already framed (e.g. several frames at once).
    pub(crate) async fn send_raw(&mut self, frames: &[u8]) -> io::Result<()> {
        self.stream.write_all(frames).await
    }

    /// Sends one text frame.
    pub(crate) async fn send_text(&mut self, text: &[u8]) -> io::Result<()> {
        let mut f = Vec::with_capacity(text.len() + 14);
        client_frame(&mut f, 0x1, text);
        self.stream.write_all(&f).await
    }

    /// Reads more bytes into the buffer; `Ok(false)` at end of stream. Cancel-safe.
    pub(crate) async fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() || self.start > self.buf.len() / 2 {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        self.read_bytes += n as u64;
        Ok(n > 0)
    }

    /// Reads once (at most 256 KiB, into the thread's buffer, when the socket is readable) and
    /// hands `f` each complete frame: (opcode, data), the opcode with [`RSV1`] set on a
    /// compressed message (permessage-deflate); frames already buffered come first. A
    /// partial frame stays in the connection's own buffer for the next call. `Ok(false)` at end
    /// of stream. Cancel-safe (each poll reads and parses whole, or does nothing).
    ///
    /// A read shorter than the buffer tells Tokio the socket is drained, so a wake-up costs one
    /// `recvfrom`, however many frames it brings.
    pub(crate) async fn drain(&mut self, mut f: impl FnMut(u8, &[u8])) -> io::Result<bool> {
        while let Some((op, r)) = self.next_bits() {
            f(op, &self.buf[r]);
        }
        std::future::poll_fn(|cx| {
            SCRATCH_BUF.with_borrow_mut(|s| {
                let carry = self.end - self.start;
                if s.len() < carry + BUF {
                    s.resize((carry + BUF).next_power_of_two(), 0);
                }
                s[..carry].copy_from_slice(&self.buf[self.start..self.end]);
                let mut rb = ReadBuf::new(&mut s[carry..]);
                ready!(Pin::new(&mut self.stream).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(false));
                }
                self.read_bytes += n as u64;
                let end = carry + n;
                let mut at = 0;
                while let Some((b0, _masked, hl, len)) = parse_header(&s[at..end]) {
                    f(b0 & (RSV1 | 0x0f), &s[at + hl..at + hl + len]);
                    at += hl + len;
                }
                let rest = end - at;
                if self.buf.len() < rest {
                    self.buf.resize(rest.next_power_of_two(), 0);
                }
                self.buf[..rest].copy_from_slice(&s[at..end]);
                self.start = 0;
                self.end = rest;
                Poll::Ready(Ok(true))
            })
        })
        .await
    }

    /// Gives back a buffer grown by a large frame once everything buffered was consumed.
    pub(crate) fn shrink(&mut self) {
        if self.start == self.end && self.buf.len() > 4 * BUF {
            self.buf = vec![0; BUF];
            self.start = 0;
            self.end = 0;
        }
    }

    /// The next complete frame already buffered: (opcode, range of its data).
    pub(crate) fn next_frame(&mut self) -> Option<(u8, Range<usize>)> {
        self.next_bits().map(|(bits, r)| (bits & 0x0f, r))
    }

    /// [`Ws::next_frame`] with RSV1 kept beside the opcode (a compressed message).
    fn next_bits(&mut self) -> Option<(u8, Range<usize>)> {
        let (b0, _masked, hl, len) = parse_header(&self.buf[self.start..self.end])?;
        let s = self.start + hl;
        self.start = s + len;
        Some((b0 & (RSV1 | 0x0f), s..s + len))
    }

    /// The bytes of a frame returned by [`Ws::next_frame`].
    pub(crate) fn data(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// Reads until a text frame satisfying `pred` arrives; errors on close or end of stream.
    pub(crate) async fn until(&mut self, mut pred: impl FnMut(&[u8]) -> bool) -> io::Result<()> {
        loop {
            while let Some((op, r)) = self.next_frame() {
                if op == 8 {
                    return Err(invalid("closed by server"));
                }
                if op == 1 && pred(self.data(r)) {
                    return Ok(());
                }
            }
            if !self.fill().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Connects with `vsn=2.0.0` and joins `topic` (join ref and ref `"1"`), waiting for an ok
    /// reply.
    pub(crate) async fn connect_join(addr: SocketAddr, topic: &str) -> io::Result<Ws> {
        let mut ws = Ws::connect(addr, "/socket/websocket?vsn=2.0.0").await?;
        let join = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
        ws.send_text(join.as_bytes()).await?;
        let mut ok = false;
        ws.until(|d| {
            if d.starts_with(br#"["1","1","#) && memmem::find(d, b"phx_reply").is_some() {
                ok = memmem::find(d, br#""status":"ok""#).is_some();
                true
            } else {
                false
            }
        })
        .await?;
        if !ok {
            return Err(invalid(format!("join {topic} refused")));
        }
        Ok(ws)
    }
}

/// The bench's timestamp in a frame: `"t":"<15 digits>"` (ns since the bench started), or
/// `"t": "…"` as PostgreSQL writes a `jsonb` payload back (the outbox scenario).
pub(crate) fn stamp(d: &[u8]) -> Option<u64> {
    static FINDER: std::sync::LazyLock<memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memmem::Finder::new(br#""t":"#));
    let mut i = FINDER.find(d)? + 4;
    if d.get(i) == Some(&b' ') {
        i += 1;
    }
    if d.get(i) != Some(&b'"') {
        return None;
    }
    let digits = d.get(i + 1..i + 16)?;
    let mut v = 0u64;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(c - b'0');
    }
    Some(v)
}
