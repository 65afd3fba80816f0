//! permessage-deflate against a real server on 127.0.0.1:0, with a hand-written client that
//! offers it (tokio-tungstenite 0.29 has no permessage-deflate): negotiation on the wire,
//! compressed replies and broadcasts, a compressed client message, control frames
//! uncompressed, a deflate bomb closed with 1009, and a broadcast to many compressing
//! subscribers compressed once.

use std::net::SocketAddr;
use std::time::Duration;

use firebrand::{
    Channel, ChannelContext, ConnectError, ConnectInfo, Endpoint, HandleResult, JoinContext,
    JoinError, Joined, Payload, Reply, Socket,
};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

struct Open;

impl Socket for Open {
    type Assigns = ();
    async fn connect(&self, _: &ConnectInfo) -> Result<(), ConnectError> {
        Ok(())
    }
}

/// `echo` replies with the payload, `shout` broadcasts it.
struct Room;

impl Channel for Room {
    type Assigns = ();
    type State = ();
    type Info = ();

    async fn join(_: &str, _: Payload, _: &JoinContext<'_, ()>) -> Result<Joined<Self>, JoinError> {
        Ok(Joined::new(Room))
    }

    async fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        match event {
            "echo" => Ok(Some(Reply::ok(payload))),
            "shout" => {
                ctx.broadcast("shout", payload);
                Ok(None)
            }
            _ => Ok(None),
        }
    }
}

async fn start(compress: bool) -> (SocketAddr, Endpoint) {
    let endpoint = Endpoint::new();
    let socket = endpoint
        .socket(Open)
        .channel::<Room>("room:*")
        .compress(compress)
        .max_frame_size(64 * 1024)
        .into_router();
    let app = axum::Router::new().nest("/socket", socket);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, endpoint)
}

/// A frame from the server: RSV1, opcode, payload (inflated when RSV1 is set).
#[derive(Debug)]
struct ServerFrame {
    rsv1: bool,
    opcode: u8,
    data: Vec<u8>,
    /// Its payload's length on the wire.
    wire_len: usize,
}

/// A WebSocket client written for the test: it offers `offer` as permessage-deflate and
/// inflates compressed server messages without context takeover, as it was told.
struct Client {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The server's `Sec-WebSocket-Extensions`, if any.
    extensions: Option<String>,
}

impl Client {
    async fn connect(addr: SocketAddr, offer: Option<&str>) -> Client {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let ext = offer
            .map(|o| format!("sec-websocket-extensions: {o}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\n\
             upgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{ext}\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0; 4096];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        });
        buf.drain(..end);
        Client {
            tcp,
            buf,
            extensions,
        }
    }

    /// Sends a masked frame; `rsv1` marks it compressed.
    async fn send_frame(&mut self, fin: bool, rsv1: bool, opcode: u8, data: &[u8]) {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode];
        match data.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&f).await.unwrap();
    }

    async fn send_json(&mut self, msg: Value) {
        self.send_frame(true, false, 1, msg.to_string().as_bytes())
            .await;
    }

    async fn recv(&mut self) -> ServerFrame {
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            let mut chunk = [0; 65536];
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
                .await
                .expect("a frame from the server")
                .unwrap();
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text message, decoded.
    async fn recv_json(&mut self) -> (bool, Value) {
        let f = self.recv().await;
        assert_eq!(f.opcode, 1, "{f:?}");
        (f.rsv1, serde_json::from_slice(&f.data).unwrap())
    }

    async fn join(&mut self, topic: &str) {
        self.send_json(json!(["1", "1", topic, "phx_join", {}]))
            .await;
        let (_, reply) = self.recv_json().await;
        assert_eq!(reply[3], "phx_reply");
        assert_eq!(reply[4]["status"], "ok");
    }
}

/// A complete server frame at the start of `b`, and its length.
fn parse(b: &[u8]) -> Option<(ServerFrame, usize)> {
    let [b0, b1, ..] = *b else { return None };
    assert_eq!(b1 & 0x80, 0, "server frames are not masked");
    let (len, hl) = match b1 & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (usize::from(n), 2),
    };
    let payload = b.get(hl..hl + len)?;
    let rsv1 = b0 & 0x40 != 0;
    let data = if rsv1 {
        inflate(payload)
    } else {
        payload.to_vec()
    };
    let frame = ServerFrame {
        rsv1,
        opcode: b0 & 0x0f,
        data,
        wire_len: len,
    };
    Some((frame, hl + len))
}

/// Inflates one message with a fresh context (RFC 7692 §7.2.2).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(d.total_in() as usize, input.len(), "inflated whole");
    out
}

/// Deflates one message with a fresh context, the tail removed (RFC 7692 §7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A payload deflate shrinks well: a list of similar records.
fn records(n: usize) -> Value {
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"user": format!("user{i}"), "online_at": "1700000000", "status": "away"}))
        .collect();
    json!({ "items": items })
}

#[tokio::test]
async fn negotiated_when_on_and_offered_only() {
    let (on, _e1) = start(true).await;
    let (off, _e2) = start(false).await;
    let browser = "permessage-deflate; client_max_window_bits";
    let c = Client::connect(on, Some(browser)).await;
    assert_eq!(
        c.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    assert_eq!(Client::connect(on, None).await.extensions, None);
    assert_eq!(Client::connect(off, Some(browser)).await.extensions, None);
    // A first offer it cannot accept is skipped for the next one.
    let c = Client::connect(
        on,
        Some("permessage-deflate; server_max_window_bits=20, permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(
        c.extensions.as_deref(),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
        )
    );
}

#[tokio::test]
async fn replies_and_broadcasts_are_compressed_and_client_messages_inflated() {
    let (addr, endpoint) = start(true).await;
    let mut c = Client::connect(addr, Some("permessage-deflate")).await;
    c.join("room:a").await;
    let payload = records(40);
    let text = json!([null, "2", "room:a", "echo", payload]).to_string();

    // A compressed client message; its reply comes back compressed.
    c.send_frame(true, true, 1, &deflate(text.as_bytes())).await;
    let (rsv1, reply) = c.recv_json().await;
    assert!(rsv1, "a large reply is compressed");
    assert_eq!(reply[4]["response"], payload);

    // Fragmented and compressed, with a ping between the fragments: the pong is not
    // compressed (control frames never are), the reply is.
    let z = deflate(text.as_bytes());
    let (a, b) = z.split_at(z.len() / 3);
    c.send_frame(false, true, 1, a).await;
    c.send_frame(true, false, 9, b"ping").await;
    c.send_frame(true, false, 0, b).await;
    let pong = c.recv().await;
    assert_eq!(
        (pong.opcode, pong.rsv1, &pong.data[..]),
        (10, false, &b"ping"[..])
    );
    let (rsv1, reply) = c.recv_json().await;
    assert!(rsv1);
    assert_eq!(reply[4]["response"], payload);

    // A small reply (a heartbeat's) is not compressed.
    c.send_json(json!([null, "3", "phoenix", "heartbeat", {}]))
        .await;
    let (rsv1, reply) = c.recv_json().await;
    assert!(!rsv1);
    assert_eq!(reply[1], "3");

    // A broadcast: compressed, several times shorter on the wire.
    c.send_json(json!([null, "4", "room:a", "shout", payload]))
        .await;
    let f = c.recv().await;
    assert!(f.rsv1);
    assert!(
        f.wire_len * 4 < f.data.len(),
        "{} of {}",
        f.wire_len,
        f.data.len()
    );
    let msg: Value = serde_json::from_slice(&f.data).unwrap();
    assert_eq!((&msg[3], &msg[4]), (&json!("shout"), &payload));
    assert_eq!(endpoint.stats().compressed, 3);
}

#[tokio::test]
async fn a_broadcast_is_compressed_once_for_all_compressing_subscribers() {
    let (addr, endpoint) = start(true).await;
    let mut compressing = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(addr, Some("permessage-deflate; client_max_window_bits")).await;
        c.join("room:many").await;
        compressing.push(c);
    }
    let mut plain = Client::connect(addr, None).await;
    plain.join("room:many").await;
    let before = endpoint.stats().compressed;
    let payload = records(100);
    endpoint.broadcast("room:many", "update", payload.clone());
    let mut wire = None;
    for c in &mut compressing {
        let f = c.recv().await;
        assert!(f.rsv1);
        let msg: Value = serde_json::from_slice(&f.data).unwrap();
        assert_eq!(msg[4], payload);
        // The same bytes for everyone.
        assert_eq!(*wire.get_or_insert(f.wire_len), f.wire_len);
    }
    let f = plain.recv().await;
    assert!(
        !f.rsv1,
        "a subscriber that did not negotiate gets it uncompressed"
    );
    assert_eq!(f.wire_len, f.data.len());
    assert_eq!(endpoint.stats().compressed - before, 1, "compressed once");
}

#[tokio::test]
async fn a_deflate_bomb_is_closed_with_1009() {
    let (addr, _endpoint) = start(true).await;
    let mut c = Client::connect(addr, Some("permessage-deflate")).await;
    c.join("room:a").await;
    // 4 MB of spaces in a string: 4 KB compressed, far under the 64 KiB frame limit; inflated,
    // far over it.
    let text = json!([null, "2", "room:a", "echo", {"x": " ".repeat(4 << 20)}]).to_string();
    let bomb = deflate(text.as_bytes());
    assert!(bomb.len() < 16_000, "{}", bomb.len());
    c.send_frame(true, true, 1, &bomb).await;
    let close = c.recv().await;
    assert_eq!(close.opcode, 8);
    assert_eq!(u16::from_be_bytes([close.data[0], close.data[1]]), 1009);
}
