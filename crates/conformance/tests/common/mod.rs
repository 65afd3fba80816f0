//! Test support: the conformance app on 127.0.0.1:0 and a raw WebSocket client that sends and
//! expects exact frames.
#![allow(dead_code, unreachable_pub)]

pub mod cluster;
pub mod faults;

use std::net::SocketAddr;
use std::time::Duration;

use firebrand::Endpoint;
use firebrand_conformance::{Config, app};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// The test servers' handshake deadline (`firebrand::Server::header_timeout`).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Server {
    pub addr: SocketAddr,
    pub endpoint: Endpoint,
}

pub async fn start() -> Server {
    start_with(Config::default()).await
}

pub async fn start_with(config: Config) -> Server {
    let (router, endpoint) = app(&config);
    serve(router, endpoint).await
}

/// The conformance app on an endpoint built by the test (other presence settings, say).
pub async fn start_endpoint(config: &Config, endpoint: Endpoint) -> Server {
    let router = firebrand_conformance::router(config, &endpoint);
    serve(router, endpoint).await
}

/// Serves `router` (whose sockets live on `endpoint`) on 127.0.0.1:0.
pub async fn serve(router: axum::Router, endpoint: Endpoint) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        firebrand::Server::new(listener)
            .header_timeout(HEADER_TIMEOUT)
            .serve(router, std::future::pending())
            .await
            .unwrap();
    });
    Server { addr, endpoint }
}

impl Server {
    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/socket/websocket?{query}", self.addr)
    }

    /// A V2 client (`vsn=2.0.0`) with extra query params. It hides presence frames
    /// (`presence_state`, `presence_diff`); see [`Server::presence_client`].
    pub async fn client(&self, query: &str) -> Client {
        let mut c = self.presence_client(query).await;
        c.hide_presence = true;
        c
    }

    /// A V2 client that sees every frame, presence included.
    pub async fn presence_client(&self, query: &str) -> Client {
        let sep = if query.is_empty() { "" } else { "&" };
        Client::connect(&self.url(&format!("{query}{sep}vsn=2.0.0"))).await
    }

    /// Raw HTTP: sends `request` and returns the response's status code.
    pub async fn http_status(&self, request: &str) -> u16 {
        let mut tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0; 1024];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        head.split(' ').nth(1).unwrap().parse().unwrap()
    }

    /// The HTTP status of a WebSocket upgrade to `url` with extra headers (101 when it opens).
    pub async fn upgrade_status(&self, url: &str, headers: &[(&'static str, &str)]) -> u16 {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(*k, v.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((_, resp)) => resp.status().as_u16(),
            Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("upgrade failed: {e}"),
        }
    }

    /// A WebSocket upgrade to `url` with extra headers: the client when it opened (101), and
    /// the HTTP response either way (status and headers, e.g. the selected subprotocol).
    pub async fn upgrade_response(
        &self,
        url: &str,
        headers: &[(&'static str, &str)],
    ) -> (Option<Client>, tungstenite::handshake::client::Response) {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(*k, v.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, resp)) => (
                Some(Client {
                    ws,
                    hide_presence: false,
                }),
                resp,
            ),
            Err(tungstenite::Error::Http(resp)) => (None, *resp),
            Err(e) => panic!("upgrade failed: {e}"),
        }
    }
}

/// A frame received from the server.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Json(Value),
    Binary(Vec<u8>),
    Close(Option<(u16, String)>),
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Skip `presence_state` and `presence_diff` frames in [`Client::recv`].
    pub hide_presence: bool,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client {
            ws,
            hide_presence: false,
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::binary(data)).await.unwrap();
    }

    /// The next text, binary or close frame; fails the test after [`WAIT`].
    pub async fn recv(&mut self) -> Frame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    let presence =
                        matches!(v[3].as_str(), Some("presence_state" | "presence_diff"));
                    if self.hide_presence && presence {
                        continue;
                    }
                    return Frame::Json(v);
                }
                Some(Ok(Message::Binary(b))) => return Frame::Binary(b.to_vec()),
                Some(Ok(Message::Close(c))) => {
                    return Frame::Close(
                        c.map(|CloseFrame { code, reason }| (code.into(), reason.to_string())),
                    );
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("transport error: {e}"),
                None => return Frame::Close(None),
            }
        }
    }

    /// The next frame, which must be JSON text.
    pub async fn recv_json(&mut self) -> Value {
        match self.recv().await {
            Frame::Json(v) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Asserts that the next frame is exactly `expected`.
    pub async fn expect(&mut self, expected: Value) {
        let got = self.recv_json().await;
        assert_eq!(got, expected);
    }

    /// Asserts that the server closes the connection with `code`; returns the reason.
    pub async fn expect_close(&mut self, code: u16) -> String {
        match self.recv().await {
            Frame::Close(Some((c, reason))) => {
                assert_eq!(c, code, "close code (reason {reason:?})");
                reason
            }
            other => panic!("expected close {code}, got {other:?}"),
        }
    }

    /// Joins `topic` with join_ref = ref = `jr` and asserts the ok reply `response`.
    pub async fn join(&mut self, jr: &str, topic: &str, response: Value) {
        self.send(serde_json::json!([jr, jr, topic, "phx_join", {}]))
            .await;
        self.expect(ok_reply(Some(jr), jr, topic, response)).await;
    }

    /// Sends a ping with `r` on `topic` (joined with `jr`) and asserts its reply: proves that
    /// nothing else was sent before it.
    pub async fn ping_roundtrip(&mut self, jr: &str, r: &str, topic: &str) {
        self.send(serde_json::json!([jr, r, topic, "ping", {"marker": r}]))
            .await;
        self.expect(ok_reply(
            Some(jr),
            r,
            topic,
            serde_json::json!({"marker": r}),
        ))
        .await;
    }

    /// A heartbeat round trip: proves that nothing was queued before its reply.
    pub async fn heartbeat(&mut self, r: &str) {
        self.send(serde_json::json!([null, r, "phoenix", "heartbeat", {}]))
            .await;
        self.expect(ok_reply(None, r, "phoenix", serde_json::json!({})))
            .await;
    }
}

pub fn reply(jr: Option<&str>, r: &str, topic: &str, status: &str, response: Value) -> Value {
    serde_json::json!([jr, r, topic, "phx_reply", {"status": status, "response": response}])
}

pub fn ok_reply(jr: Option<&str>, r: &str, topic: &str, response: Value) -> Value {
    reply(jr, r, topic, "ok", response)
}

pub fn unmatched(r: &str, topic: &str) -> Value {
    reply(
        None,
        r,
        topic,
        "error",
        serde_json::json!({"reason": "unmatched topic"}),
    )
}

/// A WebSocket client written by hand over TCP: sends any frame, even invalid ones, and can
/// simply stop reading.
pub struct Raw {
    pub tcp: TcpStream,
}

impl Raw {
    pub async fn connect(server: &Server, query: &str) -> Raw {
        Raw::upgrade(TcpStream::connect(server.addr).await.unwrap(), query).await
    }

    /// [`Raw::connect`] with a receive buffer of about `bytes`: a client that stops reading
    /// then fills the server's socket buffer after a few kilobytes, whatever the kernel's
    /// buffer autotuning would allow.
    pub async fn connect_with_recv_buffer(server: &Server, query: &str, bytes: u32) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        Raw::upgrade(socket.connect(server.addr).await.unwrap(), query).await
    }

    /// Upgrades a connection to the socket endpoint with `query`.
    async fn upgrade(mut tcp: TcpStream, query: &str) -> Raw {
        let req = format!(
            "GET /socket/websocket?{query} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        // Read the response head byte by byte, so no frame bytes are consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            tokio::time::timeout(WAIT, tcp.read_exact(&mut b))
                .await
                .unwrap()
                .unwrap();
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        Raw { tcp }
    }

    /// Sends one frame; client frames are masked unless `masked` is false.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [0x12, 0x34, 0x56, 0x78];
        if masked {
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        self.tcp.write_all(&f).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, 1, text.as_bytes(), true).await;
    }

    /// Reads one server frame (unmasked): `(opcode, payload)`.
    pub async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let (opcode, len) = self.read_frame_header().await;
        let mut payload = vec![0; len];
        tokio::time::timeout(WAIT, self.tcp.read_exact(&mut payload))
            .await
            .unwrap()
            .unwrap();
        (opcode, payload)
    }

    /// Reads the header of the next server frame (unmasked): `(opcode, payload length)`.
    pub async fn read_frame_header(&mut self) -> (u8, usize) {
        let mut h = [0u8; 2];
        tokio::time::timeout(WAIT, self.tcp.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(h[0] & 0x80, 0x80, "a server frame is final");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.tcp.read_exact(&mut b).await.unwrap();
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                self.tcp.read_exact(&mut b).await.unwrap();
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        (h[0] & 0x0f, len)
    }

    /// Sends a close frame with `payload` (a code and reason, or anything).
    pub async fn send_close(&mut self, payload: &[u8]) {
        self.send_frame(true, 8, payload, true).await;
    }

    /// Reads the next frame, which must be a close frame; returns its code (`None`: empty).
    pub async fn read_close(&mut self) -> Option<u16> {
        let (op, payload) = self.read_frame().await;
        assert_eq!(op, 8, "expected a close frame, got opcode {op}");
        match *payload {
            [] => None,
            [a, b, ..] => Some(u16::from_be_bytes([a, b])),
            [_] => panic!("close frame with a 1-byte payload"),
        }
    }

    /// Reads frames until a close frame; returns its code.
    pub async fn expect_close(&mut self, code: u16) {
        loop {
            let (op, payload) = self.read_frame().await;
            if op == 8 {
                assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
                return;
            }
        }
    }

    /// Reads and discards everything until the server closes the TCP connection.
    pub async fn drain_until_eof(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut buf))
                .await
                .unwrap();
            match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// Starts the `conformance` binary on a free port with `envs`; returns the process (killed on
/// drop) and its port once it prints `listening on 127.0.0.1:PORT`.
pub async fn spawn_conformance(envs: &[(&str, &str)]) -> (tokio::process::Child, u16) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_conformance"))
        .args(["--port", "0"])
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let port = line
        .strip_prefix("listening on 127.0.0.1:")
        .expect(&line)
        .parse()
        .unwrap();
    (child, port)
}
