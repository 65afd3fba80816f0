//! The WebSocket protocol (RFC 6455), server side, written for many mostly idle connections.
//!
//! A connection holds **no read buffer while idle**: bytes are read into a buffer on the
//! stack of the read call and decoded on the spot; only the tail of a frame that has not fully
//! arrived (or a fragmented message being assembled) is kept on the heap, and freed once
//! complete. Writes collect the queued frames into one buffer that is freed after the write.
//! (tungstenite, used before, keeps a read buffer and its codec state per connection: 7.2 KB of
//! RSS per idle joined connection, against 1.96 KB now; see ARCHITECTURE.md.)
//!
//! The handshake is checked by [`accept_key`]; frames are decoded by [`Reader`] and encoded
//! by [`encode_frame`] / [`close_frame`].
//!
//! **permessage-deflate** (RFC 7692), when the socket turns it on, is negotiated by
//! [`negotiate_deflate`] always without context takeover in either direction: the server
//! answers every accepted offer with `server_no_context_takeover` and
//! `client_no_context_takeover` (§7.1.1.1 and §7.1.1.2 let a server add both whatever the
//! client offered). So each message is compressed and inflated on its own
//! ([`crate::deflate`]): a compressing connection holds no compression state while idle (an
//! inflate window kept for a client's context takeover would be 32 KB, a compressor's 260 KB,
//! per connection), and a broadcast is compressed once for all its subscribers.

use axum::http::{HeaderMap, header};
use base64::Engine;
use bytes::Bytes;
use sha1::{Digest, Sha1};

use crate::deflate::InflateError;
use crate::node::queue::Frame;

/// Why a client's frames end its connection, and the close code it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WsError {
    /// A frame or message over the size limit: 1009.
    TooBig,
    /// A text message, or a close frame's reason, that is not UTF-8: 1007.
    InvalidUtf8,
    /// A violation of RFC 6455 (unmasked frame, reserved bits or opcodes, bad control frame,
    /// broken fragmentation): 1002.
    Protocol(&'static str),
}

impl WsError {
    /// The close code and reason the client gets.
    pub(crate) fn close(&self) -> (u16, &'static str) {
        match self {
            WsError::TooBig => (1009, "message too big"),
            WsError::InvalidUtf8 => (1007, "invalid UTF-8"),
            WsError::Protocol(why) => (1002, why),
        }
    }
}

/// A complete message (or control frame) from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A text message, valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    /// A ping: answer with a pong carrying the same bytes.
    Ping(Bytes),
    Pong,
    /// The client closes: `Ok` with its status code if it gave one (echoed in the answer), or
    /// `Err` when its close frame is invalid (answered with the error's code: 1002 for a
    /// 1-byte payload or a code that may not be sent, 1007 for a reason that is not UTF-8).
    Close(Result<Option<u16>, WsError>),
}

/// Whether `code` may appear in a close frame (RFC 6455 §7.4): the codes defined for use
/// (1000–1003, 1007–1014) and those for libraries and applications (3000–4999). 1004 is
/// reserved, 1005, 1006 and 1015 are never sent, the rest are unassigned.
pub(crate) fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// permessage-deflate as negotiated with one client: see [`negotiate_deflate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deflate {
    /// Whether the server compresses its messages. Not when the client limited the server's
    /// window to fewer than 15 bits (`server_max_window_bits`): the compressed frames shared
    /// by a broadcast's subscribers use the full window, so its messages go uncompressed,
    /// which RFC 7692 always allows (§6).
    pub(crate) compress: bool,
    /// The `server_max_window_bits` the client offered, echoed in the response (§7.1.2.1).
    server_max_window_bits: Option<u8>,
    /// The server keeps its compression context from message to message ([`crate::deflate::
    /// Kept`]): only in the benchmark's per-connection mode, and only when the client did not
    /// offer `server_no_context_takeover`.
    pub(crate) kept: bool,
}

impl Deflate {
    /// The `Sec-WebSocket-Extensions` response.
    pub(crate) fn response(&self) -> String {
        let mut r = String::from(if self.kept {
            "permessage-deflate; client_no_context_takeover"
        } else {
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        });
        if let Some(bits) = self.server_max_window_bits {
            r.push_str(&format!("; server_max_window_bits={bits}"));
        }
        r
    }
}

/// The first acceptable permessage-deflate offer of a request's `Sec-WebSocket-Extensions`
/// headers (RFC 7692 §5, §7.1), if any. An offer is declined, and the next one looked at,
/// when it has an unknown or repeated parameter, a value where none belongs, or a window size
/// that is not 8–15 written plainly (no sign, no leading zero; quoted or not). Every valid
/// offer can be honoured: `client_max_window_bits` (with or without a value) needs nothing,
/// as client messages are inflated with a full window; `server_max_window_bits` below 15
/// turns the server's compression off ([`Deflate::compress`]); the no-context-takeover
/// parameters are what the server answers anyway.
pub(crate) fn negotiate_deflate(headers: &HeaderMap) -> Option<Deflate> {
    headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(deflate_offer)
}

/// One offered extension: `Some` when it is an acceptable permessage-deflate offer.
fn deflate_offer(ext: &str) -> Option<Deflate> {
    let mut parts = ext.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_max_window_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (param, None),
        };
        // A quoted value is the same value (RFC 7692 §7.1: a token or a quoted string).
        let value = value.map(|v| {
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        });
        let known = [
            "server_no_context_takeover",
            "client_no_context_takeover",
            "server_max_window_bits",
            "client_max_window_bits",
        ];
        let i = known.iter().position(|k| k.eq_ignore_ascii_case(name))?;
        if std::mem::replace(&mut seen[i], true) {
            return None;
        }
        match (i, value) {
            (0 | 1, None) => {}
            (2, Some(v)) => server_max_window_bits = Some(window_bits(v)?),
            (3, None) => {}
            (3, Some(v)) => {
                window_bits(v)?;
            }
            _ => return None,
        }
    }
    Some(Deflate {
        compress: server_max_window_bits.is_none_or(|b| b == 15),
        server_max_window_bits,
        kept: !seen[0]
            && crate::node::pubsub::COMPRESS_PER_CONNECTION
                .load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// A window size parameter's value: 8–15, digits only, no leading zero (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// The value of `Sec-WebSocket-Accept` for a valid upgrade request, or why it is not one
/// (the client gets 400).
pub(crate) fn accept_key(headers: &HeaderMap) -> Result<String, &'static str> {
    let has_token = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err("Connection header did not include 'upgrade'");
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err("`Upgrade` header did not include 'websocket'");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("`Sec-WebSocket-Version` header did not include '13'");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("`Sec-WebSocket-Key` header missing")?;
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    Ok(base64::engine::general_purpose::STANDARD.encode(sha.finalize()))
}

/// RSV1: set on the (first) frame of a compressed message (RFC 7692 §6).
const RSV1: u8 = 0x40;

/// Appends a queued frame as a WebSocket frame. On a connection that compresses (`compress`),
/// a text or binary message (a push or a reply) is deflated when that makes it shorter
/// ([`crate::deflate::compress`]), or with the connection's own context when it keeps one
/// (`kept`, the benchmark's per-connection mode); a [`Frame::Prepared`] one was decided
/// before it was queued. Returns whether this call compressed the message.
pub(crate) fn encode_queued(
    frame: &Frame,
    out: &mut Vec<u8>,
    compress: bool,
    kept: Option<&mut crate::deflate::Kept>,
) -> bool {
    let (op, data) = match frame {
        Frame::Text(b) => (OP_TEXT, b),
        Frame::Binary(b) => (OP_BINARY, b),
        Frame::Pong(b) => (OP_PONG, b),
        Frame::Prepared {
            binary,
            deflated,
            data,
        } => {
            let op = if *binary { OP_BINARY } else { OP_TEXT };
            encode(out, if *deflated { RSV1 | op } else { op }, data);
            return false;
        }
    };
    if compress
        && op != OP_PONG
        && let Some(z) = match kept {
            Some(kept) => kept.compress(data),
            None => crate::deflate::compress(data),
        }
    {
        encode(out, RSV1 | op, &z);
        return true;
    }
    encode_frame(out, op, data);
    false
}

/// Appends a server frame (final, unmasked) to `out`.
pub(crate) fn encode_frame(out: &mut Vec<u8>, opcode: u8, data: &[u8]) {
    encode(out, opcode, data);
}

/// Appends a final unmasked frame whose first byte, besides FIN, is `bits` (RSV1, opcode).
fn encode(out: &mut Vec<u8>, bits: u8, data: &[u8]) {
    out.push(0x80 | bits);
    let n = data.len();
    if n < 126 {
        out.push(n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(data);
}

/// A close frame with `code` and `reason` (cut to the 123 bytes a close frame allows).
/// `code` must be one that may be sent ([`close_code_allowed`]).
pub(crate) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    debug_assert!(
        close_code_allowed(code),
        "close code {code} may not be sent"
    );
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut data = code.to_be_bytes().to_vec();
    data.extend_from_slice(&reason.as_bytes()[..end]);
    let mut out = Vec::with_capacity(data.len() + 2);
    encode_frame(&mut out, OP_CLOSE, &data);
    out
}

/// Decodes a client's byte stream into [`Incoming`] messages, holding only what is incomplete.
#[derive(Debug)]
pub(crate) struct Reader {
    /// The start of a frame whose end has not arrived yet (empty between frames).
    partial: Vec<u8>,
    /// The fragments so far of a message sent in several frames, and its opcode.
    message: Vec<u8>,
    message_op: Option<u8>,
    /// Whether that message is compressed (its first frame had RSV1).
    message_compressed: bool,
    /// Whether permessage-deflate was negotiated: RSV1 then marks a compressed message.
    inflate: bool,
    max_size: usize,
}

/// A frame header: fin, RSV1, opcode, mask key, header length, payload length.
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
    payload_len: usize,
}

impl Header {
    /// Parses the header at the start of `b` (`None`: incomplete), checking what can be
    /// checked before the payload arrives, so an oversized frame is refused before it is read.
    /// `inflate`: RSV1 may mark the first frame of a compressed message.
    fn parse(b: &[u8], max_size: usize, inflate: bool) -> Result<Option<Header>, WsError> {
        let [b0, b1, ..] = *b else { return Ok(None) };
        let rsv1 = b0 & RSV1 != 0;
        // RSV1 only on a data message's first frame (RFC 7692 §6.1), never on a
        // continuation or control frame.
        let rsv1_allowed = inflate && matches!(b0 & 0x0F, OP_TEXT | OP_BINARY);
        if b0 & 0x30 != 0 || (rsv1 && !rsv1_allowed) {
            return Err(WsError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(WsError::Protocol("unmasked client frame"));
        }
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
        let (payload_len, len_bytes) = match b1 & 0x7F {
            126 => (2, 2),
            127 => (0, 8),
            n => (usize::from(n), 0),
        };
        let control = opcode >= OP_CLOSE;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            _ => return Err(WsError::Protocol("reserved opcode")),
        }
        if control && (!fin || len_bytes != 0) {
            return Err(WsError::Protocol("fragmented or oversized control frame"));
        }
        let len = 2 + len_bytes + 4;
        if b.len() < len {
            return Ok(None);
        }
        let payload_len = match len_bytes {
            0 => payload_len,
            2 => usize::from(u16::from_be_bytes([b[2], b[3]])),
            _ => {
                let n = u64::from_be_bytes(b[2..10].try_into().unwrap_or_default());
                usize::try_from(n).unwrap_or(usize::MAX)
            }
        };
        if payload_len > max_size {
            return Err(WsError::TooBig);
        }
        let mut mask = [0; 4];
        mask.copy_from_slice(&b[len - 4..len]);
        Ok(Some(Header {
            fin,
            rsv1,
            opcode,
            mask,
            len,
            payload_len,
        }))
    }
}

/// Appends `data` unmasked with `mask` to `out`.
fn unmask_into(out: &mut Vec<u8>, data: &[u8], mask: [u8; 4]) {
    let start = out.len();
    out.extend_from_slice(data);
    let word = u32::from_ne_bytes(mask);
    let mut chunks = out[start..].chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

impl Reader {
    /// A reader refusing frames and messages over `max_size` bytes.
    pub(crate) fn new(max_size: usize) -> Self {
        Reader {
            partial: Vec::new(),
            message: Vec::new(),
            message_op: None,
            message_compressed: false,
            inflate: false,
            max_size,
        }
    }

    /// A reader for a connection that negotiated permessage-deflate: messages whose first
    /// frame has RSV1 are inflated (each on its own: the client was told
    /// `client_no_context_takeover`), to at most `max_size` bytes: a message that would
    /// inflate to more is refused (1009) once that much is inflated.
    pub(crate) fn inflating(max_size: usize) -> Self {
        Reader {
            inflate: true,
            ..Reader::new(max_size)
        }
    }

    /// Decodes the bytes just read, handing each complete message to `on`; keeps an
    /// incomplete tail for the next call. Stops at the first error.
    /// Bytes to decode before the first read (fed with the next [`Reader::feed`]).
    pub(crate) fn preload(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
    }

    /// Whether [`Reader::preload`] left bytes to decode.
    pub(crate) fn preloaded(&self) -> bool {
        !self.partial.is_empty()
    }

    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        mut on: impl FnMut(Incoming),
    ) -> Result<(), WsError> {
        if self.partial.is_empty() {
            let used = self.frames(data, &mut on)?;
            self.partial.extend_from_slice(&data[used..]);
        } else {
            let mut partial = std::mem::take(&mut self.partial);
            partial.extend_from_slice(data);
            let used = self.frames(&partial, &mut on)?;
            partial.drain(..used);
            // Keep the allocation only while a frame is incomplete.
            if !partial.is_empty() {
                self.partial = partial;
            }
        }
        Ok(())
    }

    /// Decodes the complete frames at the start of `b`; returns how many bytes they took.
    fn frames(&mut self, b: &[u8], on: &mut impl FnMut(Incoming)) -> Result<usize, WsError> {
        let mut used = 0;
        while let Some(h) = Header::parse(&b[used..], self.max_size, self.inflate)? {
            let end = used + h.len + h.payload_len;
            if b.len() < end {
                break;
            }
            let payload = &b[used + h.len..end];
            used = end;
            self.frame(&h, payload, on)?;
        }
        Ok(used)
    }

    fn frame(
        &mut self,
        h: &Header,
        payload: &[u8],
        on: &mut impl FnMut(Incoming),
    ) -> Result<(), WsError> {
        let unmasked = || {
            let mut v = Vec::with_capacity(payload.len());
            unmask_into(&mut v, payload, h.mask);
            v
        };
        match h.opcode {
            OP_PING => on(Incoming::Ping(unmasked().into())),
            OP_PONG => on(Incoming::Pong),
            OP_CLOSE => on(Incoming::Close(close_payload(&unmasked()))),
            OP_TEXT | OP_BINARY if self.message_op.is_some() => {
                return Err(WsError::Protocol("new message inside a fragmented message"));
            }
            OP_TEXT | OP_BINARY if h.fin => {
                on(complete(h.opcode, self.inflated(h.rsv1, unmasked())?)?);
            }
            OP_TEXT | OP_BINARY => {
                self.message_op = Some(h.opcode);
                self.message_compressed = h.rsv1;
                unmask_into(&mut self.message, payload, h.mask);
            }
            _ => {
                let Some(op) = self.message_op else {
                    return Err(WsError::Protocol("continuation frame without a message"));
                };
                if self.message.len() + payload.len() > self.max_size {
                    return Err(WsError::TooBig);
                }
                unmask_into(&mut self.message, payload, h.mask);
                if h.fin {
                    self.message_op = None;
                    let message = std::mem::take(&mut self.message);
                    on(complete(
                        op,
                        self.inflated(self.message_compressed, message)?,
                    )?);
                }
            }
        }
        Ok(())
    }

    /// A message's data, inflated if it is `compressed`.
    fn inflated(&self, compressed: bool, data: Vec<u8>) -> Result<Vec<u8>, WsError> {
        if !compressed {
            return Ok(data);
        }
        crate::deflate::inflate(&data, self.max_size).map_err(|e| match e {
            InflateError::TooBig => WsError::TooBig,
            InflateError::Invalid => WsError::Protocol("invalid compressed data"),
        })
    }
}

/// The code of a close frame's payload, checked (RFC 6455 §5.5.1, §7.4).
fn close_payload(data: &[u8]) -> Result<Option<u16>, WsError> {
    let (code, reason) = match *data {
        [] => return Ok(None),
        [_] => return Err(WsError::Protocol("close frame with a 1-byte payload")),
        [a, b, ref reason @ ..] => (u16::from_be_bytes([a, b]), reason),
    };
    if !close_code_allowed(code) {
        return Err(WsError::Protocol("invalid close code"));
    }
    if std::str::from_utf8(reason).is_err() {
        return Err(WsError::InvalidUtf8);
    }
    Ok(Some(code))
}

fn complete(opcode: u8, data: Vec<u8>) -> Result<Incoming, WsError> {
    if opcode == OP_TEXT {
        if std::str::from_utf8(&data).is_err() {
            return Err(WsError::InvalidUtf8);
        }
        Ok(Incoming::Text(data.into()))
    } else {
        Ok(Incoming::Binary(data.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(fin: bool, opcode: u8, data: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![(u8::from(fin) << 7) | opcode];
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
        out.extend_from_slice(&mask);
        out.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn feed_all(r: &mut Reader, bytes: &[u8], step: usize) -> Result<Vec<Incoming>, WsError> {
        let mut got = Vec::new();
        for chunk in bytes.chunks(step) {
            r.feed(chunk, |m| got.push(m))?;
        }
        Ok(got)
    }

    #[test]
    fn frames_decode_whatever_the_read_boundaries() {
        let big = "x".repeat(70_000);
        let mut stream = client(true, OP_TEXT, b"[\"1\"]");
        stream.extend(client(true, OP_PING, b"hi"));
        stream.extend(client(false, OP_BINARY, &[1, 2]));
        stream.extend(client(true, OP_PONG, b""));
        stream.extend(client(true, OP_CONTINUATION, &[3]));
        stream.extend(client(true, OP_TEXT, big.as_bytes()));
        stream.extend(client(true, OP_TEXT, "h\u{e9}".repeat(100).as_bytes()));
        stream.extend(client(true, OP_CLOSE, &1000u16.to_be_bytes()));
        let expected = vec![
            Incoming::Text(Bytes::from_static(b"[\"1\"]")),
            Incoming::Ping(Bytes::from_static(b"hi")),
            Incoming::Pong,
            Incoming::Binary(Bytes::from_static(&[1, 2, 3])),
            Incoming::Text(Bytes::from(big.clone())),
            Incoming::Text(Bytes::from("h\u{e9}".repeat(100))),
            Incoming::Close(Ok(Some(1000))),
        ];
        for step in [1, 3, 7, 4096, stream.len()] {
            let mut r = Reader::new(1 << 20);
            assert_eq!(
                feed_all(&mut r, &stream, step).unwrap(),
                expected,
                "step {step}"
            );
            assert!(r.partial.is_empty() && r.message.is_empty());
            assert_eq!(r.partial.capacity(), 0, "nothing held between frames");
        }
    }

    #[test]
    fn violations_have_their_close_codes() {
        let cases: Vec<(Vec<u8>, WsError)> = vec![
            (
                vec![0x81, 0x02, b'h', b'i'],
                WsError::Protocol("unmasked client frame"),
            ),
            (
                {
                    let mut f = client(true, OP_TEXT, b"x");
                    f[0] |= 0x40;
                    f
                },
                WsError::Protocol("reserved bits set"),
            ),
            (client(true, 0x3, b""), WsError::Protocol("reserved opcode")),
            (
                client(false, OP_PING, b""),
                WsError::Protocol("fragmented or oversized control frame"),
            ),
            (
                client(true, OP_PING, &[0; 126]),
                WsError::Protocol("fragmented or oversized control frame"),
            ),
            (
                client(true, OP_CONTINUATION, b"x"),
                WsError::Protocol("continuation frame without a message"),
            ),
            (
                {
                    let mut f = client(false, OP_TEXT, b"a");
                    f.extend(client(true, OP_TEXT, b"b"));
                    f
                },
                WsError::Protocol("new message inside a fragmented message"),
            ),
            (client(true, OP_TEXT, &[0xff, 0xfe]), WsError::InvalidUtf8),
            (client(true, OP_BINARY, &[0; 101]), WsError::TooBig),
            (
                {
                    let mut f = client(false, OP_BINARY, &[0; 60]);
                    f.extend(client(true, OP_CONTINUATION, &[0; 60]));
                    f
                },
                WsError::TooBig,
            ),
        ];
        for (bytes, err) in cases {
            let mut r = Reader::new(100);
            assert_eq!(feed_all(&mut r, &bytes, bytes.len()), Err(err.clone()));
            let mut r = Reader::new(100);
            assert_eq!(feed_all(&mut r, &bytes, 1), Err(err));
        }
    }

    #[test]
    fn close_frames_are_checked() {
        let close = |payload: &[u8]| {
            let mut r = Reader::new(100);
            let mut got = feed_all(&mut r, &client(true, OP_CLOSE, payload), 1).unwrap();
            assert_eq!(got.len(), 1);
            match got.pop() {
                Some(Incoming::Close(c)) => c,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(close(b""), Ok(None));
        for code in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            let mut p = u16::to_be_bytes(code).to_vec();
            p.extend_from_slice("bye \u{e9}".as_bytes());
            assert_eq!(close(&p), Ok(Some(code)), "{code}");
        }
        let invalid = WsError::Protocol("invalid close code");
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            assert_eq!(close(&code.to_be_bytes()), Err(invalid.clone()), "{code}");
        }
        assert_eq!(
            close(&[3]),
            Err(WsError::Protocol("close frame with a 1-byte payload"))
        );
        assert_eq!(close(&[0x03, 0xE8, 0xFF]), Err(WsError::InvalidUtf8));
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header() {
        let mut r = Reader::new(1 << 20);
        // Only the header of a 1 GiB frame: refused before any payload is held.
        let header = [0x82, 0xFF, 0, 0, 0, 0, 0x40, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(r.feed(&header, |_| {}), Err(WsError::TooBig));
    }

    #[test]
    fn server_frames_and_the_handshake() {
        let mut out = Vec::new();
        encode_frame(&mut out, OP_TEXT, b"hi");
        assert_eq!(out, [0x81, 2, b'h', b'i']);
        out.clear();
        encode_frame(&mut out, OP_BINARY, &[0; 300]);
        assert_eq!(&out[..4], &[0x82, 126, 1, 44]);
        let close = close_frame(1012, &"é".repeat(100));
        assert_eq!(&close[..4], &[0x88, 124, 0x03, 0xF4]);
        assert_eq!(close.len(), 2 + 2 + 122);

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        assert!(accept_key(&h).is_err());
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        // RFC 6455 §1.3's example.
        assert_eq!(accept_key(&h).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        h.insert(header::SEC_WEBSOCKET_VERSION, "8".parse().unwrap());
        assert!(accept_key(&h).is_err());
    }

    fn offer(values: &[&str]) -> Option<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::SEC_WEBSOCKET_EXTENSIONS, v.parse().unwrap());
        }
        negotiate_deflate(&h).map(|d| d.response())
    }

    #[test]
    fn a_kept_context_is_answered_without_server_no_context_takeover() {
        // The benchmark's per-connection mode (a process-wide switch, not flipped in tests).
        let kept = Deflate {
            compress: true,
            server_max_window_bits: None,
            kept: true,
        };
        assert_eq!(
            kept.response(),
            "permessage-deflate; client_no_context_takeover"
        );
    }

    #[test]
    fn deflate_offers_and_their_responses() {
        let plain = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        let with_bits = |b: u8| format!("{plain}; server_max_window_bits={b}");
        let cases: Vec<(Vec<&str>, Option<String>)> = vec![
            (vec![], None),
            (vec!["x-webkit-deflate-frame"], None),
            // Without parameters; case-insensitive name.
            (vec!["permessage-deflate"], Some(plain.into())),
            (vec!["Permessage-Deflate"], Some(plain.into())),
            // What browsers and Node's ws send.
            (
                vec!["permessage-deflate; client_max_window_bits"],
                Some(plain.into()),
            ),
            (
                vec!["permessage-deflate; client_max_window_bits=10"],
                Some(plain.into()),
            ),
            (
                vec!["permessage-deflate; client_max_window_bits=\"15\""],
                Some(plain.into()),
            ),
            (
                vec!["permessage-deflate; client_no_context_takeover; server_no_context_takeover"],
                Some(plain.into()),
            ),
            (
                vec!["permessage-deflate; server_max_window_bits=15"],
                Some(with_bits(15)),
            ),
            (
                vec!["permessage-deflate; server_max_window_bits=10"],
                Some(with_bits(10)),
            ),
            (
                vec!["permessage-deflate;server_max_window_bits=8"],
                Some(with_bits(8)),
            ),
            // Invalid offers are declined...
            (vec!["permessage-deflate; server_max_window_bits"], None),
            (vec!["permessage-deflate; server_max_window_bits=16"], None),
            (vec!["permessage-deflate; server_max_window_bits=7"], None),
            (vec!["permessage-deflate; server_max_window_bits=010"], None),
            (vec!["permessage-deflate; client_max_window_bits=+9"], None),
            (
                vec!["permessage-deflate; server_no_context_takeover=1"],
                None,
            ),
            (
                vec!["permessage-deflate; client_no_context_takeover; client_no_context_takeover"],
                None,
            ),
            (vec!["permessage-deflate; unknown_param"], None),
            // ...and the next one taken: in one header or several.
            (
                vec![
                    "permessage-deflate; mystery, permessage-deflate; server_max_window_bits=12, permessage-deflate",
                ],
                Some(with_bits(12)),
            ),
            (
                vec![
                    "x-other; a=1",
                    "permessage-deflate; server_max_window_bits=99",
                    "permessage-deflate; client_max_window_bits",
                ],
                Some(plain.into()),
            ),
        ];
        for (values, expected) in cases {
            assert_eq!(offer(&values), expected, "{values:?}");
        }
        let d = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v.parse().unwrap());
            negotiate_deflate(&h).unwrap()
        };
        // The server compresses unless its window is limited below 15 bits.
        assert!(d("permessage-deflate").compress);
        assert!(d("permessage-deflate; server_max_window_bits=15").compress);
        assert!(!d("permessage-deflate; server_max_window_bits=14").compress);
    }

    /// A masked client frame with RSV1 set.
    fn compressed(fin: bool, opcode: u8, data: &[u8]) -> Vec<u8> {
        let mut f = client(fin, opcode, data);
        f[0] |= RSV1;
        f
    }

    fn json(n: usize) -> String {
        let mut s = String::from("[null,\"1\",\"room:lobby\",\"new_msg\",{\"body\":\"");
        while s.len() < n {
            s.push_str("hello ");
        }
        s + "\"}]"
    }

    #[test]
    fn compressed_messages_are_inflated_and_rsv1_is_checked() {
        let text = json(2000);
        let z = crate::deflate::compress(text.as_bytes()).unwrap();
        let (a, b) = z.split_at(z.len() / 2);
        let mut stream = compressed(true, OP_TEXT, &z);
        // Fragmented: RSV1 on the first frame only, control frames in between.
        stream.extend(compressed(false, OP_BINARY, a));
        stream.extend(client(true, OP_PING, b"p"));
        stream.extend(client(true, OP_CONTINUATION, b));
        // An uncompressed message on the same connection.
        stream.extend(client(true, OP_TEXT, b"plain"));
        let expected = vec![
            Incoming::Text(Bytes::from(text.clone())),
            Incoming::Ping(Bytes::from_static(b"p")),
            Incoming::Binary(Bytes::from(text.clone())),
            Incoming::Text(Bytes::from_static(b"plain")),
        ];
        for step in [1, 5, stream.len()] {
            let mut r = Reader::inflating(1 << 20);
            assert_eq!(
                feed_all(&mut r, &stream, step).unwrap(),
                expected,
                "step {step}"
            );
            assert_eq!(r.partial.capacity() + r.message.capacity(), 0);
        }
        let refused: Vec<(Vec<u8>, WsError)> = vec![
            // RSV1 without the extension negotiated.
            (
                compressed(true, OP_TEXT, &z),
                WsError::Protocol("reserved bits set"),
            ),
            // With it: never on a control frame or a continuation frame.
            (
                compressed(true, OP_PING, b""),
                WsError::Protocol("reserved bits set"),
            ),
            (
                {
                    let mut f = client(false, OP_TEXT, a);
                    f.extend(compressed(true, OP_CONTINUATION, b));
                    f
                },
                WsError::Protocol("reserved bits set"),
            ),
            // RSV2 and RSV3 stay reserved.
            (
                {
                    let mut f = client(true, OP_TEXT, b"x");
                    f[0] |= 0x20;
                    f
                },
                WsError::Protocol("reserved bits set"),
            ),
            (
                compressed(true, OP_TEXT, &[0xff, 0xff]),
                WsError::Protocol("invalid compressed data"),
            ),
            // Inflated text is checked for UTF-8 too.
            (
                compressed(
                    true,
                    OP_TEXT,
                    &crate::deflate::compress(&[0xff; 200]).unwrap(),
                ),
                WsError::InvalidUtf8,
            ),
        ];
        for (i, (bytes, err)) in refused.into_iter().enumerate() {
            let mut r = if i == 0 {
                Reader::new(1 << 20)
            } else {
                Reader::inflating(1 << 20)
            };
            assert_eq!(feed_all(&mut r, &bytes, bytes.len()), Err(err), "case {i}");
        }
    }

    #[test]
    fn a_deflate_bomb_closes_with_1009() {
        // 8 MB of spaces deflate to about 8 KB: far under the 1 MiB frame limit, far over it
        // once inflated. Refused once the limit is passed, whole or fragmented.
        let bomb = crate::deflate::compress(&vec![b' '; 8 << 20]).unwrap();
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        let mut r = Reader::inflating(1 << 20);
        let got = feed_all(&mut r, &compressed(true, OP_TEXT, &bomb), 1 << 16);
        assert_eq!(got, Err(WsError::TooBig));
        assert_eq!(WsError::TooBig.close().0, 1009);
        let (a, b) = bomb.split_at(1000);
        let mut stream = compressed(false, OP_BINARY, a);
        stream.extend(client(true, OP_CONTINUATION, b));
        let mut r = Reader::inflating(1 << 20);
        assert_eq!(feed_all(&mut r, &stream, 4096), Err(WsError::TooBig));
        // Exactly at the limit is fine.
        let exact = crate::deflate::compress(&vec![b' '; 1 << 20]).unwrap();
        let mut r = Reader::inflating(1 << 20);
        let got = feed_all(&mut r, &compressed(true, OP_TEXT, &exact), 1 << 16).unwrap();
        assert_eq!(got, vec![Incoming::Text(Bytes::from(vec![b' '; 1 << 20]))]);
    }

    #[test]
    fn client_messages_are_inflated_without_context_takeover() {
        // Each message stands alone: the same message twice inflates twice...
        let text = json(500);
        let z = crate::deflate::compress(text.as_bytes()).unwrap();
        let mut stream = compressed(true, OP_TEXT, &z);
        stream.extend(compressed(true, OP_TEXT, &z));
        let mut r = Reader::inflating(1 << 20);
        let got = feed_all(&mut r, &stream, 7).unwrap();
        assert_eq!(got, vec![Incoming::Text(Bytes::from(text.clone())); 2]);
        // ...and a client that takes its context over anyway (told not to) is refused rather
        // than misread: its second message refers to the first one's window.
        use flate2::{Compress, Compression, FlushCompress};
        let mut c = Compress::new(Compression::new(6), false);
        let mut out = Vec::with_capacity(8192);
        c.compress_vec(text.as_bytes(), &mut out, FlushCompress::Sync)
            .unwrap();
        let first = out[..out.len() - 4].to_vec();
        let start = out.len();
        c.compress_vec(text.as_bytes(), &mut out, FlushCompress::Sync)
            .unwrap();
        let second = out[start..out.len() - 4].to_vec();
        let mut stream = compressed(true, OP_TEXT, &first);
        stream.extend(compressed(true, OP_TEXT, &second));
        let mut r = Reader::inflating(1 << 20);
        let mut got = Vec::new();
        let fed = r.feed(&stream, |m| got.push(m));
        assert_eq!(got, vec![Incoming::Text(Bytes::from(text))]);
        assert_eq!(fed, Err(WsError::Protocol("invalid compressed data")));
    }

    #[test]
    fn server_messages_are_compressed_when_it_pays() {
        let text = json(1000);
        let frames = [
            Frame::Text(Bytes::from(text.clone())),
            Frame::Text(Bytes::from_static(b"[null,null,\"t\",\"e\",{}]")),
            Frame::Pong(Bytes::from(text.clone())),
            Frame::Text(Bytes::from(text.clone())).prepared(),
        ];
        let mut out = Vec::new();
        let compressed: Vec<bool> = frames
            .iter()
            .map(|f| encode_queued(f, &mut out, true, None))
            .collect();
        // The prepared one was compressed before it was queued.
        assert_eq!(compressed, [true, false, false, false]);
        // Read back as a client would: RSV1 on the big text messages only.
        let mut at = 0;
        let mut seen = Vec::new();
        while at < out.len() {
            let (b0, len) = (out[at], usize::from(out[at + 1]));
            let (len, hl) = match len {
                126 => (
                    usize::from(u16::from_be_bytes([out[at + 2], out[at + 3]])),
                    4,
                ),
                n => (n, 2),
            };
            let data = &out[at + hl..at + hl + len];
            let rsv1 = b0 & RSV1 != 0;
            let body = if rsv1 {
                crate::deflate::inflate(data, 1 << 20).unwrap()
            } else {
                data.to_vec()
            };
            seen.push((b0 & 0x0F, rsv1, body.len()));
            at += hl + len;
        }
        let n = text.len();
        assert_eq!(
            seen,
            [
                (OP_TEXT, true, n),
                (OP_TEXT, false, 22),
                (OP_PONG, false, n),
                (OP_TEXT, true, n)
            ]
        );
        // Without compression negotiated, nothing is compressed.
        let mut plain = Vec::new();
        assert!(!encode_queued(&frames[0], &mut plain, false, None));
        assert_eq!(plain[0], 0x80 | OP_TEXT);
    }
}
