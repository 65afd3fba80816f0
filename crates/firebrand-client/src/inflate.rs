//! permessage-deflate (RFC 7692) for the client, one layer beneath tungstenite.
//!
//! tungstenite 0.29 has no extension support: it refuses every frame with RSV1 set. So the
//! client offers `permessage-deflate` itself and reads the connection through [`Inflating`],
//! which watches the server's bytes go by: it finds the end of the handshake answer, and when
//! that accepted the offer, it inflates each compressed message into one plain frame before
//! tungstenite sees it. Everything else passes through untouched: uncompressed messages,
//! control frames, and the client's own messages, which it sends uncompressed (RFC 7692 §6
//! lets an endpoint compress any message or none).
//!
//! A message is inflated to at most [`MAX_MESSAGE`] bytes (tungstenite's own limit for a
//! message): a compressed message that would inflate further — a deflate bomb — is refused
//! as soon as its output passes the limit, and the connection fails with an I/O error (the
//! client then reconnects, as after any lost connection).
//!
//! The layer sits on the TCP stream, beneath TLS, so over `wss://` it could only see
//! ciphertext: the client offers compression on `ws://` URLs only.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest message the client accepts, inflated: tungstenite's default
/// `max_message_size`, which bounds uncompressed messages the same way.
pub(crate) const MAX_MESSAGE: usize = 64 << 20;

/// What the client offers in `Sec-WebSocket-Extensions`. No parameters: it never compresses,
/// so it has nothing to ask about its own side, and it inflates with any window the server
/// chooses (a 2^15-byte window decodes every smaller one).
pub(crate) const OFFER: &str = "permessage-deflate";

/// A handshake answer longer than this without its blank line is not one this layer reads;
/// it hands the bytes on for tungstenite to refuse.
const MAX_HEAD: usize = 16 * 1024;

/// Every sync-flushed deflate block ends with these bytes, which RFC 7692 §7.2.1 removes from
/// the message and the receiver adds back (§7.2.2).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// The server's side of a client connection, inflating compressed messages when the handshake
/// negotiated permessage-deflate (see the module docs). Writes go straight to `S`.
#[derive(Debug)]
pub(crate) struct Inflating<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from `inner` and not looked at yet.
    raw: BytesMut,
    /// Bytes ready for tungstenite.
    ready: BytesMut,
    /// The largest message inflated ([`MAX_MESSAGE`]; smaller in tests).
    max: usize,
}

#[derive(Debug)]
enum Mode {
    /// Before the end of the server's handshake answer (compression was offered).
    Handshake,
    /// Compression was negotiated: reading frames.
    Frames(Box<Frames>),
    /// Handing bytes on as they come: compression not offered or not accepted, or a frame this
    /// layer does not interpret (a masked or otherwise broken one), which tungstenite then
    /// refuses with its own error.
    Through,
}

#[derive(Debug)]
struct Frames {
    inflater: Decompress,
    /// `server_no_context_takeover`: each message is inflated on its own. Otherwise the
    /// server may refer back to earlier messages, and the inflater keeps its window.
    reset: bool,
    /// Bytes of a passed-through frame's payload still to hand on.
    passing: u64,
    /// The compressed message being gathered: its opcode and its payload so far.
    message: Option<(u8, Vec<u8>)>,
}

impl<S> Inflating<S> {
    /// Reads `inner` through the layer; `offered` says whether the handshake request carries
    /// [`OFFER`] (without it, every byte passes through).
    pub(crate) fn new(inner: S, offered: bool) -> Self {
        Inflating {
            inner,
            mode: if offered {
                Mode::Handshake
            } else {
                Mode::Through
            },
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            max: MAX_MESSAGE,
        }
    }

    /// Whether the handshake negotiated compression (false until its answer has been read).
    pub(crate) fn compressing(&self) -> bool {
        matches!(self.mode, Mode::Frames(_))
    }

    /// Moves what can be moved from `raw` to `ready`.
    fn process(&mut self) -> io::Result<()> {
        if matches!(self.mode, Mode::Handshake) {
            let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                if self.raw.len() > MAX_HEAD {
                    self.mode = Mode::Through;
                    self.ready.extend_from_slice(&self.raw.split());
                }
                return Ok(());
            };
            let head = self.raw.split_to(end + 4);
            self.mode = match negotiated(&head) {
                Some(reset) => Mode::Frames(Box::new(Frames {
                    inflater: Decompress::new(false),
                    reset,
                    passing: 0,
                    message: None,
                })),
                None => Mode::Through,
            };
            self.ready.extend_from_slice(&head);
        }
        match &mut self.mode {
            Mode::Handshake => unreachable!("the handshake answer was read above"),
            Mode::Through => {
                self.ready.extend_from_slice(&self.raw.split());
                Ok(())
            }
            Mode::Frames(frames) => match frames.read(&mut self.raw, &mut self.ready, self.max)? {
                Flow::Wait => Ok(()),
                Flow::GiveUp => {
                    self.mode = Mode::Through;
                    self.ready.extend_from_slice(&self.raw.split());
                    Ok(())
                }
            },
        }
    }
}

/// Whether a handshake answer accepted the offer: `Some(reset)` when it is a 101 whose
/// `Sec-WebSocket-Extensions` names permessage-deflate, `reset` being whether it said
/// `server_no_context_takeover`.
fn negotiated(head: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    if lines.next()?.split(' ').nth(1) != Some("101") {
        return None;
    }
    lines
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-extensions"))
        .flat_map(|(_, value)| value.split(','))
        .find_map(|extension| {
            let mut params = extension.split(';').map(str::trim);
            (params.next() == Some(OFFER))
                .then(|| params.any(|p| p.eq_ignore_ascii_case("server_no_context_takeover")))
        })
}

/// What [`Frames::read`] stopped at.
enum Flow {
    /// The rest of `raw` is an incomplete frame.
    Wait,
    /// A frame this layer does not interpret: hand everything on from here.
    GiveUp,
}

/// A frame header, parsed.
struct Header {
    fin: bool,
    rsv1: bool,
    /// RSV2 or RSV3 set, or a masking key: not a frame a server sends.
    odd: bool,
    opcode: u8,
    /// The header's own length.
    len: usize,
    payload: u64,
}

impl Header {
    fn parse(raw: &[u8]) -> Option<Header> {
        let (&first, &second) = (raw.first()?, raw.get(1)?);
        let (extra, payload) = match second & 0x7f {
            126 => (
                2,
                u64::from(u16::from_be_bytes(raw.get(2..4)?.try_into().ok()?)),
            ),
            127 => (8, u64::from_be_bytes(raw.get(2..10)?.try_into().ok()?)),
            n => (0, u64::from(n)),
        };
        let masked = second & 0x80 != 0;
        Some(Header {
            fin: first & 0x80 != 0,
            rsv1: first & 0x40 != 0,
            odd: first & 0x30 != 0 || masked,
            opcode: first & 0x0f,
            len: 2 + extra + if masked { 4 } else { 0 },
            payload,
        })
    }
}

impl Frames {
    /// Moves the complete frames of `raw` to `ready`, each compressed message inflated to at
    /// most `max` bytes.
    fn read(&mut self, raw: &mut BytesMut, ready: &mut BytesMut, max: usize) -> io::Result<Flow> {
        loop {
            if self.passing > 0 {
                let n = raw
                    .len()
                    .min(usize::try_from(self.passing).unwrap_or(usize::MAX));
                ready.extend_from_slice(&raw[..n]);
                raw.advance(n);
                self.passing -= n as u64;
                if self.passing > 0 {
                    return Ok(Flow::Wait);
                }
            }
            let Some(head) = Header::parse(raw) else {
                return Ok(Flow::Wait);
            };
            if head.odd {
                return Ok(Flow::GiveUp);
            }
            let compressed = match head.opcode {
                1 | 2 if head.rsv1 => {
                    if self.message.is_some() {
                        // A new message inside a fragmented one: tungstenite refuses it.
                        return Ok(Flow::GiveUp);
                    }
                    true
                }
                0 if self.message.is_some() => {
                    if head.rsv1 {
                        // RSV1 belongs on a message's first frame only (RFC 7692 §6.1).
                        return Ok(Flow::GiveUp);
                    }
                    true
                }
                // Control frames, uncompressed messages and their continuations, and anything
                // tungstenite will refuse by itself.
                _ => false,
            };
            if !compressed {
                ready.extend_from_slice(&raw[..head.len]);
                raw.advance(head.len);
                self.passing = head.payload;
                continue;
            }
            let gathered = self.message.as_ref().map_or(0, |(_, m)| m.len());
            if head.payload > (max - gathered) as u64 {
                return Err(too_big(max));
            }
            // The payload fits in memory: it is within the limit.
            let end = head.len + head.payload as usize;
            if raw.len() < end {
                return Ok(Flow::Wait);
            }
            let payload = &raw[head.len..end];
            let (opcode, data) = self
                .message
                .get_or_insert_with(|| (head.opcode, Vec::new()));
            data.extend_from_slice(payload);
            raw.advance(end);
            if head.fin {
                let (opcode, data) = (*opcode, std::mem::take(data));
                self.message = None;
                if self.reset {
                    self.inflater.reset(false);
                }
                let message = inflate(&mut self.inflater, &data, max)?;
                write_frame(ready, opcode, &message);
            }
        }
    }
}

fn too_big(max: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a compressed message would inflate past the {max}-byte message limit"),
    )
}

/// Inflates one message's payload (without the tail RFC 7692 removes) to at most `max`
/// bytes, continuing `d`'s window.
fn inflate(d: &mut Decompress, data: &[u8], max: usize) -> io::Result<Vec<u8>> {
    let invalid = |e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a compressed message does not inflate: {e}"),
        )
    };
    // At most one byte past the limit is produced: that byte says the limit is passed.
    let cap = max + 1;
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).clamp(64, cap));
    for input in [data, &TAIL[..]] {
        let start = d.total_in();
        loop {
            let (was_in, was_out) = (d.total_in(), d.total_out());
            let used = (was_in - start) as usize;
            d.decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
                .map_err(|e| invalid(&e))?;
            if out.len() > max {
                return Err(too_big(max));
            }
            if out.len() == out.capacity() {
                // Full: there may be more output, even with the input all read.
                out.reserve(out.capacity().min(cap - out.len()));
                continue;
            }
            if (d.total_in() - start) as usize == input.len() {
                break;
            }
            if (d.total_in(), d.total_out()) == (was_in, was_out) {
                return Err(invalid(&"no progress with input left"));
            }
        }
    }
    Ok(out)
}

/// One final, unmasked frame carrying `payload`, as the server would have sent it uncompressed.
fn write_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.extend_from_slice(&[0x80 | opcode]);
    match payload.len() {
        n if n < 126 => out.extend_from_slice(&[n as u8]),
        n if n <= 0xffff => {
            out.extend_from_slice(&[126]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.extend_from_slice(&[127]);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

impl<S: AsyncRead + Unpin> AsyncRead for Inflating<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Through) && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream: an incomplete frame left in `raw` goes on as it is, for
                // tungstenite to find it cut short.
                this.mode = Mode::Through;
                this.ready.extend_from_slice(&this.raw.split());
                if this.ready.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.raw.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inflating<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Hands out `data` `step` bytes per read, as a socket may (for tests and fuzzing).
struct Trickle {
    data: Vec<u8>,
    step: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.step.min(this.data.len()).min(buf.remaining());
        buf.put_slice(&this.data[..n]);
        this.data.drain(..n);
        Poll::Ready(Ok(()))
    }
}

/// The bytes tungstenite would read from a server that sent `head` then `stream`, read `step`
/// bytes at a time with messages inflated to at most `max` bytes, or the error that ends the
/// connection ([`crate::fuzzing::inflate`]).
pub(crate) fn read_all(head: &[u8], stream: &[u8], step: usize, max: usize) -> io::Result<Vec<u8>> {
    let data = [head, stream].concat();
    let mut layer = Inflating::new(Trickle { data, step }, true);
    layer.max = max;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        let mut read = ReadBuf::new(&mut buf);
        // Trickle is always ready, and so is the layer above it.
        match Pin::new(&mut layer).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return Ok(out),
            Poll::Ready(Ok(())) => out.extend_from_slice(read.filled()),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => unreachable!("a Trickle is always ready"),
        }
    }
}

#[cfg(test)]
mod tests {
    use flate2::{Compress, Compression, FlushCompress};
    use tokio::io::AsyncReadExt;

    use super::*;

    const ACCEPTED: &[u8] = crate::fuzzing::ACCEPTED;
    const TAKEOVER: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
        sec-websocket-extensions: x-other, permessage-deflate;client_max_window_bits=12\r\n\r\n";
    const DECLINED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";

    async fn through(data: &[u8], step: usize, max: usize) -> io::Result<Vec<u8>> {
        read_all(&[], data, step, max)
    }

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_frame(&mut out, first & 0x0f, payload);
        out[0] = first;
        out.to_vec()
    }

    /// `data` deflated as RFC 7692 sends it, continuing `c`'s window.
    fn deflate(c: &mut Compress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - TAIL.len());
        out
    }

    fn json(n: usize) -> Vec<u8> {
        let items: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"user":"user{i}","online_at":"2026-12-07T14:{:02}:00Z"}}"#,
                    i % 60
                )
            })
            .collect();
        format!("[{}]", items.join(",")).into_bytes()
    }

    #[tokio::test]
    async fn compressed_messages_come_out_as_plain_frames_however_the_bytes_arrive() {
        let (one, two) = (json(40), json(300));
        let mut c = Compress::new(Compression::default(), false);
        let small = deflate(&mut c, &one);
        c.reset();
        let big = deflate(&mut c, &two);
        assert!(big.len() > 300, "three fragments of at least 100 bytes");
        let (a, b) = big.split_at(100);
        let (b, rest) = b.split_at(100);

        let mut input = ACCEPTED.to_vec();
        let mut expected = ACCEPTED.to_vec();
        // A compressed text message in one frame.
        input.extend(frame(0xc1, &small));
        expected.extend(frame(0x81, &one));
        // A ping.
        input.extend(frame(0x89, b"hi"));
        expected.extend(frame(0x89, b"hi"));
        // A compressed binary message in three frames, a ping between them: the ping comes
        // first, then the whole message.
        input.extend(frame(0x42, a));
        input.extend(frame(0x00, b));
        input.extend(frame(0x89, b"mid"));
        input.extend(frame(0x80, rest));
        expected.extend(frame(0x89, b"mid"));
        expected.extend(frame(0x82, &two));
        // Uncompressed messages, one of them fragmented, pass as they are.
        let plain = [
            frame(0x01, b"abc"),
            frame(0x80, b"def"),
            frame(0x82, &[7; 300]),
        ]
        .concat();
        input.extend(&plain);
        expected.extend(&plain);
        // A close frame.
        input.extend(frame(0x88, &[0x03, 0xe8]));
        expected.extend(frame(0x88, &[0x03, 0xe8]));

        for step in [1, 2, 3, 7, 64, 101, 4096, input.len()] {
            let out = through(&input, step, MAX_MESSAGE).await.unwrap();
            assert!(out == expected, "reading {step} bytes at a time");
        }
    }

    #[tokio::test]
    async fn a_kept_context_is_kept() {
        // Without server_no_context_takeover the second message may refer to the first.
        let mut c = Compress::new(Compression::default(), false);
        let first = deflate(&mut c, &json(50));
        let second = deflate(&mut c, &json(50));
        assert!(
            second.len() < first.len() / 4,
            "the second refers to the first"
        );
        let input = [TAKEOVER.to_vec(), frame(0xc1, &first), frame(0xc1, &second)].concat();
        let expected = [
            TAKEOVER.to_vec(),
            frame(0x81, &json(50)),
            frame(0x81, &json(50)),
        ]
        .concat();
        assert!(through(&input, 5, MAX_MESSAGE).await.unwrap() == expected);

        // Inflated on its own, the second message is missing the window it refers to.
        let reset = [ACCEPTED.to_vec(), frame(0xc1, &first), frame(0xc1, &second)].concat();
        let err = through(&reset, 5, MAX_MESSAGE).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn without_an_accepted_offer_every_byte_passes() {
        let mut c = Compress::new(Compression::default(), false);
        let rsv1 = frame(0xc1, &deflate(&mut c, &json(5)));
        for head in [
            DECLINED,
            b"HTTP/1.1 403 Forbidden\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        ] {
            let input = [head, &rsv1].concat();
            assert_eq!(through(&input, 3, MAX_MESSAGE).await.unwrap(), input);
        }
        let mut layer = Inflating::new(&rsv1[..], false);
        let mut out = Vec::new();
        layer.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, rsv1);
        assert!(!layer.compressing());
    }

    #[tokio::test]
    async fn a_deflate_bomb_is_refused_at_the_limit() {
        let mut c = Compress::new(Compression::default(), false);
        let bomb = deflate(&mut c, &vec![b'a'; 1 << 20]);
        assert!(
            bomb.len() < 2048,
            "1 MiB of one letter deflates to {}",
            bomb.len()
        );
        let input = [ACCEPTED.to_vec(), frame(0xc1, &bomb)].concat();
        let err = through(&input, 4096, 64 * 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("65536-byte"), "{err}");
        // Just under the limit, the same message inflates.
        let out = through(&input, 4096, 1 << 20).await.unwrap();
        assert!(out.ends_with(&[b'a'; 1024]));
        // A compressed frame larger than the limit is refused before it is gathered.
        let err = through(&input, 4096, 500).await.unwrap_err();
        assert!(err.to_string().contains("500-byte"), "{err}");
    }

    #[tokio::test]
    async fn frames_a_server_does_not_send_are_left_to_tungstenite() {
        // A masked frame: handed on as it is, and everything after it.
        let masked = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        let mut c = Compress::new(Compression::default(), false);
        let rsv1 = frame(0xc1, &deflate(&mut c, &json(5)));
        let input = [ACCEPTED, &masked[..], &rsv1].concat();
        assert_eq!(through(&input, 2, MAX_MESSAGE).await.unwrap(), input);
        // Garbage instead of deflate data.
        let input = [ACCEPTED.to_vec(), frame(0xc1, &[0xff; 40])].concat();
        assert!(through(&input, 7, MAX_MESSAGE).await.is_err());
    }
}
