//! Test support: the conformance app on 127.0.0.1:0 and a raw WebSocket client that sends and
//! expects exact frames.
#![allow(dead_code, unreachable_pub)]

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

pub struct Server {
    pub addr: SocketAddr,
    pub endpoint: Endpoint,
}

pub async fn start() -> Server {
    start_with(Config::default()).await
}

pub async fn start_with(config: Config) -> Server {
    let (router, endpoint) = app(&config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Server { addr, endpoint }
}

impl Server {
    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/socket/websocket?{query}", self.addr)
    }

    /// A V2 client (`vsn=2.0.0`) with extra query params.
    pub async fn client(&self, query: &str) -> Client {
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
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client { ws }
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
                    return Frame::Json(serde_json::from_str(&t).unwrap());
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
