//! Helpers: the real binary on a free port, and a Phoenix V2 JSON client over a real WebSocket.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(10);

/// Every variable the server reads: cleared, so that the tests' environment does not leak in.
const VARS: &[&str] = &[
    "FIREBRAND_CONFIG",
    "FIREBRAND_LISTEN",
    "FIREBRAND_DRAIN_MS",
    "FIREBRAND_ORIGINS",
    "FIREBRAND_LONGPOLL",
    "FIREBRAND_METRICS",
    "FIREBRAND_BACKEND_TIMEOUT_MS",
    "FIREBRAND_BACKEND_MAX_CALLS",
    "FIREBRAND_CONNECT_URL",
    "REDIS_URL",
    "NATS_URL",
    "FIREBRAND_CLUSTER_NAMESPACE",
    "FIREBRAND_CLUSTER_SECRET",
    "FIREBRAND_JWT_SECRET",
    "FIREBRAND_JWT_PUBLIC_KEY_FILE",
    "FIREBRAND_JWT_ALGORITHM",
    "FIREBRAND_JWT_AUDIENCE",
    "FIREBRAND_JWT_ISSUER",
    "FIREBRAND_ALLOW_ANONYMOUS",
    "FIREBRAND_API_KEY",
    "FIREBRAND_WEBHOOK_URL",
    "FIREBRAND_WEBHOOK_SECRET",
    "FIREBRAND_OUTBOX_URL",
    "FIREBRAND_OUTBOX_TABLE",
];

pub fn command(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_firebrand-server"));
    for var in VARS {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A running server: its port, the lines it printed after `listening on`, and what it has
/// written to stderr (its log) so far.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub banner: Vec<String>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Waits (a few seconds at most) for a line of the log holding every one of `words`.
    pub async fn logged(&self, words: &[&str]) -> bool {
        for _ in 0..50 {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|line| words.iter().all(|w| line.contains(w)));
            if found {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/socket/websocket?vsn=2.0.0", self.port)
    }
}

/// Starts the binary on a free port (`FIREBRAND_LISTEN=127.0.0.1:0` unless `envs` sets it).
pub async fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Server {
    let mut envs = envs.to_vec();
    if !envs.iter().any(|(k, _)| *k == "FIREBRAND_LISTEN") {
        envs.push(("FIREBRAND_LISTEN", "127.0.0.1:0"));
    }
    let mut child = command(args, &envs).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("no `listening on` line in time")
        .unwrap()
        .expect("the server exited before listening");
    let port = line
        .strip_prefix("listening on 127.0.0.1:")
        .expect(&line)
        .parse()
        .unwrap();
    // The guidance printed right after, then keep reading so that the server never writes
    // into a closed pipe.
    let mut banner = Vec::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await
    {
        banner.push(line);
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    Server {
        child,
        port,
        banner,
        log,
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
}

/// How a connection attempt ended.
pub enum Connect {
    Open(Box<Client>),
    Refused(u16),
}

impl Connect {
    pub fn open(self) -> Client {
        match self {
            Connect::Open(c) => *c,
            Connect::Refused(status) => panic!("connection refused with HTTP {status}"),
        }
    }

    pub fn refused(self) -> u16 {
        match self {
            Connect::Open(_) => panic!("connection accepted"),
            Connect::Refused(status) => status,
        }
    }
}

/// Connects to `url`, with phoenix.js's `authToken` (in `Sec-WebSocket-Protocol`) if given.
pub async fn connect(url: &str, auth_token: Option<&str>) -> Connect {
    connect_with(url, auth_token, &[]).await
}

/// Connects to `url` with `authToken` (if given) and extra request `headers`.
pub async fn connect_with(
    url: &str,
    auth_token: Option<&str>,
    headers: &[(&str, &str)],
) -> Connect {
    use base64::Engine;
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    if let Some(token) = auth_token {
        let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(token);
        request.headers_mut().insert(
            "sec-websocket-protocol",
            format!("phoenix, base64url.bearer.phx.{encoded}")
                .parse()
                .unwrap(),
        );
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("no handshake in time")
    {
        Ok((ws, _)) => Connect::Open(Box::new(Client { ws, next_ref: 1 })),
        Err(tungstenite::Error::Http(response)) => Connect::Refused(response.status().as_u16()),
        Err(e) => panic!("connect failed: {e}"),
    }
}

impl Client {
    /// Sends `[join_ref, ref, topic, event, payload]`; returns the ref.
    pub async fn send(
        &mut self,
        join_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> String {
        let r = self.next_ref.to_string();
        self.next_ref += 1;
        let frame = json!([join_ref, r, topic, event, payload]);
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
        r
    }

    /// The next text frame, decoded.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no frame in time")
                .expect("connection closed")
                .unwrap();
            if let Message::Text(text) = msg {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    /// The reply to `r`: `(status, response)`.
    pub async fn reply(&mut self, r: &str) -> (String, Value) {
        loop {
            let frame = self.recv().await;
            if frame[3] == "phx_reply" && frame[1] == r {
                let payload = &frame[4];
                return (
                    payload["status"].as_str().unwrap().to_owned(),
                    payload["response"].clone(),
                );
            }
        }
    }

    /// Joins `topic` (its join ref is the ref of the join): `(status, response)`.
    pub async fn join(&mut self, topic: &str) -> (String, Value) {
        self.join_with(topic, json!({})).await
    }

    /// Joins `topic` with `params`: `(status, response)`.
    pub async fn join_with(&mut self, topic: &str, params: Value) -> (String, Value) {
        let r = self.next_ref.to_string();
        let sent = self.send(Some(&r), topic, "phx_join", params).await;
        self.reply(&sent).await
    }

    /// The next frame with event `event`, skipping others.
    pub async fn recv_event(&mut self, event: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame[3] == event {
                return frame;
            }
        }
    }

    /// Waits for the server to close the connection; its close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("not closed in time")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    }
}

/// An HTTP/1.1 request to the server: `(status, JSON body)`.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut headers = vec![("content-type", "application/json")];
    let auth = key.map(|key| format!("Bearer {key}"));
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }
    http_with(port, method, path, &headers, body.unwrap_or("").as_bytes()).await
}

/// An HTTP/1.1 request with these headers (`host: 127.0.0.1` unless one is given, and
/// `content-length`): `(status, JSON body, or the body as a JSON string if it is not JSON)`.
pub async fn http_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str("host: 127.0.0.1\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    // Written meanwhile: the server may answer (and stop reading) before the body's end.
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        writer
    });
    let mut response = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match tokio::time::timeout(WAIT, reader.read(&mut chunk))
            .await
            .expect("no HTTP response in time")
        {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            // A reset after the answer (the body was not read to its end).
            Err(_) if !response.is_empty() => break,
            Err(e) => panic!("no HTTP response: {e}"),
        }
    }
    drop(writing);
    let response = String::from_utf8(response).unwrap();
    let status = response[9..12].parse().unwrap();
    let (head, rest) = response.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, value)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&tail[..size]);
        rest = &tail[size + 2..];
    }
    out
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "firebrand-server-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `openssl` with `args` in `dir`.
pub fn openssl(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed to make test key pairs");
    assert!(status.success(), "openssl {args:?} failed");
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}
