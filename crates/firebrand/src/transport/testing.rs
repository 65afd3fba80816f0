//! Test helpers for your channels (Phoenix.ChannelTest's equivalent), behind the `testing`
//! feature: connect, join, push and await replies, assert pushes and broadcasts — in-process,
//! without a network, through the same connection code a WebSocket client goes through.
//!
//! ```toml
//! [dev-dependencies]
//! firebrand = { version = "0.1", features = ["testing"] }
//! ```
//!
//! A complete test of a channel:
//!
//! ```
//! use firebrand::testing::TestSocket;
//! use firebrand::{Channel, ChannelContext, ConnectError, ConnectInfo, Endpoint, HandleResult,
//!                 JoinContext, JoinError, Joined, Payload, Reply, Socket};
//! use serde_json::json;
//!
//! struct UserSocket;
//! impl Socket for UserSocket {
//!     type Assigns = String;
//!     async fn connect(&self, info: &ConnectInfo) -> Result<String, ConnectError> {
//!         info.param("user").map(str::to_owned).ok_or(ConnectError::forbidden())
//!     }
//! }
//!
//! struct Room;
//! impl Channel for Room {
//!     type Assigns = String;
//!     type State = ();
//!     type Info = ();
//!     async fn join(topic: &str, _: Payload, _: &JoinContext<'_, String>) -> Result<Joined<Self>, JoinError> {
//!         match topic {
//!             "room:private" => Err(JoinError::reason("unauthorized")),
//!             _ => Ok(Joined::new(Room)),
//!         }
//!     }
//!     async fn handle_in(&mut self, event: &str, payload: Payload, ctx: &mut ChannelContext<Self>) -> HandleResult {
//!         match event {
//!             "ping" => Ok(Some(Reply::ok(payload))),
//!             "shout" => {
//!                 ctx.broadcast("shout", payload);
//!                 Ok(None)
//!             }
//!             _ => Ok(None),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // In a #[tokio::test]:
//! let endpoint = Endpoint::new();
//! let socket = TestSocket::new(endpoint.socket(UserSocket).channel::<Room>("room:*"));
//!
//! assert!(socket.connect(&[]).await.is_err()); // no user: refused
//! let mut alice = socket.connect(&[("user", "alice")]).await.unwrap();
//!
//! assert_eq!(alice.join("room:lobby", json!({})).await, Ok(json!({})));
//! assert_eq!(alice.join("room:private", json!({})).await, Err(json!({"reason": "unauthorized"})));
//!
//! let reply = alice.request("room:lobby", "ping", json!({"n": 1})).await;
//! assert_eq!((reply.status(), reply.payload().to_value()), ("ok", Some(json!({"n": 1}))));
//!
//! alice.push("room:lobby", "shout", json!({"body": "hey"})).await;
//! assert_eq!(alice.assert_broadcast("room:lobby", "shout").await, json!({"body": "hey"}));
//!
//! alice.leave("room:lobby").await;
//! alice.close().await;
//! # }
//! ```
//!
//! Every `assert_*` waits up to [`TestClient::timeout`] (1 s by default) and panics with what
//! it was waiting for. Frames that do not match stay queued for later assertions, so the order
//! of assertions need not follow the order of frames. With `#[tokio::test(start_paused = true)]`
//! time only advances when every task is idle, which makes
//! [`refute_push`](TestClient::refute_push) both fast and deterministic.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use firebrand_protocol::{Encoded, Message, Payload, Serializer, ServerMessage};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::model::channel::{Reply, StopReason};
use crate::model::socket::{ConnectError, ConnectInfo, Socket};
use crate::node::queue::Frame;
use crate::transport::accept::Shared;
use crate::transport::conn::{Conn, ConnArgs};
use crate::transport::http::SocketBuilder;

/// A socket to test: connect in-process clients to it. See the [module docs](self).
pub struct TestSocket<S: Socket> {
    shared: Arc<Shared<S>>,
}

impl<S: Socket> TestSocket<S> {
    /// The socket built by `builder` (the same builder your app turns into a router).
    pub fn new<St>(builder: SocketBuilder<S, St>) -> Self {
        TestSocket {
            shared: builder.into_shared(),
        }
    }

    /// Connects with these connect params, through your [`Socket::connect`].
    pub async fn connect(&self, params: &[(&str, &str)]) -> Result<TestClient, ConnectError> {
        self.connect_with_token(params, None).await
    }

    /// Connects with connect params and an `authToken` (as the official client sends it).
    pub async fn connect_with_token(
        &self,
        params: &[(&str, &str)],
        auth_token: Option<&str>,
    ) -> Result<TestClient, ConnectError> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .chain([("vsn".to_owned(), "2.0.0".to_owned())])
            .collect();
        let info = ConnectInfo::for_test(params, auth_token.map(str::to_owned));
        let assigns = self.shared.handler.connect(&info).await?;
        let socket_id = self.shared.handler.id(&assigns).map(Arc::<str>::from);
        let conn = Conn::open(ConnArgs {
            shared: self.shared.clone(),
            assigns: Arc::new(assigns),
            socket_id,
            serializer: Serializer::V2,
            deflate: None,
        });
        let (to_server, from_client) = mpsc::unbounded_channel();
        let (to_client, from_server) = mpsc::unbounded_channel();
        tokio::spawn(drive(conn, from_client, to_client));
        Ok(TestClient {
            to_server,
            from_server,
            queued: VecDeque::new(),
            next_ref: 0,
            join_refs: HashMap::new(),
            timeout: Duration::from_secs(1),
        })
    }
}

/// Moves messages between a test client and its connection, as the WebSocket loop does.
async fn drive<S: Socket>(
    mut conn: Conn<S>,
    mut from_client: mpsc::UnboundedReceiver<Message>,
    to_client: mpsc::UnboundedSender<Received>,
) {
    let outbox = conn.outbox().clone();
    let mut reason = StopReason::Closed;
    loop {
        tokio::select! {
            () = outbox.ready() => {
                let batch = outbox.take();
                for event in batch.events {
                    conn.on_event(event);
                }
                for frame in batch.frames {
                    if let Some(received) = Received::decode(frame) {
                        let _ = to_client.send(received);
                    }
                }
                if let Some(close) = batch.close {
                    reason = crate::StopReason::of(&close);
                    let _ = to_client.send(Received::Closed { code: close.code, reason: close.reason.to_owned() });
                    break;
                }
            }
            msg = from_client.recv() => match msg {
                Some(msg) => conn.on_message(msg),
                None => break,
            },
        }
    }
    conn.end(reason);
}

/// A frame a [`TestClient`] received.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Received {
    /// A reply to the push with `ref`.
    Reply {
        /// The topic.
        topic: String,
        /// The ref of the push it answers.
        r#ref: String,
        /// The reply.
        reply: Reply,
    },
    /// A push to this client only (including `phx_close` and `phx_error`).
    Push {
        /// The topic.
        topic: String,
        /// The event.
        event: String,
        /// The payload.
        payload: Payload,
    },
    /// A broadcast to the topic's subscribers.
    Broadcast {
        /// The topic.
        topic: String,
        /// The event.
        event: String,
        /// The payload.
        payload: Payload,
    },
    /// The server closed the connection.
    Closed {
        /// The WebSocket close code a real client would see.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

impl Received {
    fn decode(frame: Frame) -> Option<Received> {
        let encoded = match frame {
            Frame::Text(t) => Encoded::Text(String::from_utf8_lossy(&t).into_owned()),
            Frame::Binary(b) => Encoded::Binary(b.to_vec()),
            // The in-process client negotiates no compression.
            Frame::Pong(_) | Frame::Prepared { .. } => return None,
        };
        Some(match Serializer::V2.decode_server(&encoded).ok()? {
            ServerMessage::Reply {
                topic,
                r#ref,
                status,
                payload,
                ..
            } => Received::Reply {
                topic,
                r#ref: r#ref.unwrap_or_default(),
                reply: Reply::new(status, payload),
            },
            ServerMessage::Event(m) if m.join_ref.is_none() => Received::Broadcast {
                topic: m.topic,
                event: m.event,
                payload: m.payload,
            },
            ServerMessage::Event(m) => Received::Push {
                topic: m.topic,
                event: m.event,
                payload: m.payload,
            },
        })
    }
}

/// An in-process client of a [`TestSocket`]. See the [module docs](self).
pub struct TestClient {
    to_server: mpsc::UnboundedSender<Message>,
    from_server: mpsc::UnboundedReceiver<Received>,
    queued: VecDeque<Received>,
    next_ref: u64,
    join_refs: HashMap<String, String>,
    timeout: Duration,
}

impl fmt::Debug for TestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestClient")
            .field("joined", &self.join_refs.keys().collect::<Vec<_>>())
            .field("queued", &self.queued.len())
            .finish()
    }
}

fn json_value(p: &Payload) -> Value {
    p.to_value().unwrap_or(Value::Null)
}

impl TestClient {
    /// How long each assertion waits (default 1 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn send(
        &mut self,
        topic: &str,
        event: &str,
        payload: Payload,
        join_ref: Option<String>,
    ) -> String {
        self.next_ref += 1;
        let r = self.next_ref.to_string();
        let msg = Message {
            join_ref: join_ref.or_else(|| self.join_refs.get(topic).cloned()),
            r#ref: Some(r.clone()),
            topic: topic.to_owned(),
            event: event.to_owned(),
            payload,
        };
        // A closed connection simply never answers; the assertions report that.
        let _ = self.to_server.send(msg);
        r
    }

    /// Waits for the first received frame matching `pred` (others stay queued).
    async fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&Received) -> bool) -> Received {
        if let Some(i) = self.queued.iter().position(&mut pred) {
            return self.queued.remove(i).expect("position is in range");
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.from_server.recv()).await {
                Ok(Some(r)) if pred(&r) => return r,
                Ok(Some(r)) => self.queued.push_back(r),
                Ok(None) => panic!(
                    "connection ended while waiting for {what}; received: {:?}",
                    self.queued
                ),
                Err(_) => panic!(
                    "timed out after {:?} waiting for {what}; received: {:?}",
                    self.timeout, self.queued
                ),
            }
        }
    }

    async fn reply_to(&mut self, r: &str) -> Reply {
        let what = format!("the reply to ref {r}");
        match self
            .wait_for(
                &what,
                |f| matches!(f, Received::Reply { r#ref, .. } if r#ref == r),
            )
            .await
        {
            Received::Reply { reply, .. } => reply,
            _ => unreachable!("wait_for returns a matching frame"),
        }
    }

    /// Joins `topic` with `params`: `Ok(response)` or `Err(response)` of the refusal.
    pub async fn join(&mut self, topic: &str, params: impl Into<Payload>) -> Result<Value, Value> {
        let jr = (self.next_ref + 1).to_string();
        let r = self.send(topic, "phx_join", params.into(), Some(jr.clone()));
        let reply = self.reply_to(&r).await;
        let response = json_value(reply.payload());
        if reply.status() == "ok" {
            self.join_refs.insert(topic.to_owned(), jr);
            Ok(response)
        } else {
            Err(response)
        }
    }

    /// Pushes `event` to the channel of `topic` without waiting; returns the push's ref, for
    /// [`assert_reply`](TestClient::assert_reply).
    pub async fn push(&mut self, topic: &str, event: &str, payload: impl Into<Payload>) -> String {
        self.send(topic, event, payload.into(), None)
    }

    /// Pushes `event` and waits for its reply.
    pub async fn request(
        &mut self,
        topic: &str,
        event: &str,
        payload: impl Into<Payload>,
    ) -> Reply {
        let r = self.send(topic, event, payload.into(), None);
        self.reply_to(&r).await
    }

    /// Waits for the reply to the push with `ref_`.
    pub async fn assert_reply(&mut self, ref_: &str) -> Reply {
        self.reply_to(ref_).await
    }

    /// Waits for a push of `event` on `topic` to this client; returns its payload as JSON
    /// (`Value::Null` for binary; see [`assert_received`](TestClient::assert_received)).
    pub async fn assert_push(&mut self, topic: &str, event: &str) -> Value {
        let what = format!("a push of {event:?} on {topic:?}");
        match self.wait_for(&what, |f| is_push(f, topic, event)).await {
            Received::Push { payload, .. } => json_value(&payload),
            _ => unreachable!("wait_for returns a matching frame"),
        }
    }

    /// Waits for a broadcast of `event` on `topic`; returns its payload as JSON.
    pub async fn assert_broadcast(&mut self, topic: &str, event: &str) -> Value {
        let what = format!("a broadcast of {event:?} on {topic:?}");
        let found = self
            .wait_for(&what, |f| {
                matches!(f, Received::Broadcast { topic: t, event: e, .. } if t == topic && e == event)
            })
            .await;
        match found {
            Received::Broadcast { payload, .. } => json_value(&payload),
            _ => unreachable!("wait_for returns a matching frame"),
        }
    }

    /// Waits for any frame matching `pred`, for what the other assertions do not cover.
    pub async fn assert_received(&mut self, pred: impl FnMut(&Received) -> bool) -> Received {
        self.wait_for("a frame matching the predicate", pred).await
    }

    /// Frames received that no assertion has matched yet, oldest first.
    pub fn unmatched(&self) -> impl Iterator<Item = &Received> {
        self.queued.iter()
    }

    /// Asserts that no push of `event` on `topic` arrives within `within`.
    pub async fn refute_push(&mut self, topic: &str, event: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, self.from_server.recv()).await {
            self.queued.push_back(r);
        }
        if let Some(f) = self.queued.iter().find(|f| is_push(f, topic, event)) {
            panic!("expected no push of {event:?} on {topic:?}, got {f:?}");
        }
    }

    /// Leaves `topic`; returns the leave's reply.
    pub async fn leave(&mut self, topic: &str) -> Reply {
        let reply = self.request(topic, "phx_leave", Payload::empty()).await;
        self.join_refs.remove(topic);
        reply
    }

    /// Waits until the server closes the connection; returns the close code and reason.
    pub async fn assert_closed(&mut self) -> (u16, String) {
        match self
            .wait_for("the connection to close", |f| {
                matches!(f, Received::Closed { .. })
            })
            .await
        {
            Received::Closed { code, reason } => (code, reason),
            _ => unreachable!("wait_for returns a matching frame"),
        }
    }

    /// Closes the connection, as a client going away: its channels terminate with
    /// [`StopReason::Closed`](crate::StopReason::Closed).
    pub async fn close(self) {
        drop(self.to_server);
        let mut rx = self.from_server;
        // Wait for the connection task to finish.
        while rx.recv().await.is_some() {}
    }
}

fn is_push(f: &Received, topic: &str, event: &str) -> bool {
    matches!(f, Received::Push { topic: t, event: e, .. } if t == topic && e == event)
}
