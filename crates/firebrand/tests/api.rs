//! The library API beyond the conformance app: connect info and refusals, extra subscriptions,
//! messages to channels, terminate reasons, socket ids.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use firebrand::{
    Channel, ChannelContext, ConnectError, ConnectInfo, Endpoint, HandleResult, Info, JoinContext,
    JoinError, Joined, Payload, Reply, Socket, StopReason, TokenSigner,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

const WAIT: Duration = Duration::from_secs(5);

/// Accepts a signed user id from `authToken` or the `token` param; `rate=limited` gets 429.
struct TokenSocket {
    signer: TokenSigner,
    events: mpsc::UnboundedSender<String>,
}

#[derive(Clone, Debug)]
struct User {
    id: u64,
    peer: Option<SocketAddr>,
    /// Where the test hears about channel lifecycles.
    events: mpsc::UnboundedSender<String>,
}

impl Socket for TokenSocket {
    type Assigns = User;

    async fn connect(&self, info: &ConnectInfo) -> Result<User, ConnectError> {
        if info.param("rate") == Some("limited") {
            return Err(ConnectError::status(StatusCode::TOO_MANY_REQUESTS));
        }
        let token = info
            .auth_token()
            .or(info.param("token"))
            .ok_or(ConnectError::forbidden())?;
        let id = self
            .signer
            .verify(token, Duration::from_secs(60))
            .map_err(|_| ConnectError::forbidden())?;
        Ok(User {
            id,
            peer: info.peer_addr(),
            events: self.events.clone(),
        })
    }

    fn id(&self, user: &User) -> Option<String> {
        Some(format!("user:{}", user.id))
    }
}

/// Reports its lifecycle to the test through `EVENTS`.
struct Probe {
    events: mpsc::UnboundedSender<String>,
    /// Async replies kept open by "hold", answered by "release".
    held: Vec<firebrand::ReplyRef>,
}

impl Channel for Probe {
    type Assigns = User;
    type State = ();
    type Info = String;

    async fn join(
        topic: &str,
        _params: Payload,
        ctx: &JoinContext<'_, User>,
    ) -> Result<Joined<Self>, JoinError> {
        let me = ctx.assigns();
        assert_eq!(ctx.socket_id(), Some(format!("user:{}", me.id).as_str()));
        let reply = json!({"topic": topic, "user": me.id, "has_peer": me.peer.is_some()});
        Ok(Joined::new(Probe {
            events: me.events.clone(),
            held: Vec::new(),
        })
        .reply(reply))
    }

    async fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        match event {
            "subscribe" => {
                let topic: String = payload.decode()?;
                ctx.subscribe(&topic);
                Ok(Some(Reply::ok(json!({}))))
            }
            "unsubscribe" => {
                let topic: String = payload.decode()?;
                ctx.unsubscribe(&topic);
                Ok(Some(Reply::ok(json!({}))))
            }
            "send_self" => {
                let text: String = payload.decode()?;
                let sender = ctx.sender();
                tokio::spawn(async move { sender.send(text).unwrap() });
                Ok(None)
            }
            "hold" => {
                self.held.extend(ctx.reply_later());
                Ok(None)
            }
            "release" => {
                for r in self.held.drain(..) {
                    r.send(Reply::ok(json!({"released": true})));
                }
                Ok(Some(Reply::ok(json!({}))))
            }
            "fail" => {
                ctx.stop(StopReason::Error("asked to".into()));
                Ok(None)
            }
            // Relays a client-chosen event name, as a chat's "typing" relay might: to the
            // others, and back to the client.
            "relay" => {
                let event: String = payload.decode()?;
                ctx.broadcast_from(&event, json!({}));
                ctx.push(&event, json!({}));
                Ok(Some(Reply::ok(json!({}))))
            }
            _ => Ok(None),
        }
    }

    async fn handle_info(&mut self, info: Info<String>, ctx: &mut ChannelContext<Self>) {
        match info {
            Info::Broadcast(b) => {
                ctx.push("relayed", json!({"from": b.topic(), "event": b.event()}))
            }
            Info::Message(text) => ctx.push("info", json!({"text": text})),
        }
    }

    async fn terminate(&mut self, reason: &StopReason, _ctx: &mut ChannelContext<Self>) {
        let _ = self.events.send(format!("terminate {reason:?}"));
    }
}

struct Harness {
    addr: SocketAddr,
    endpoint: Endpoint,
    signer: TokenSigner,
    events: mpsc::UnboundedReceiver<String>,
}

async fn start() -> Harness {
    let (tx, events) = mpsc::unbounded_channel();
    let signer = TokenSigner::new(b"test secret that is long enough!", "user socket");
    let endpoint = Endpoint::new();
    let socket = endpoint
        .socket(TokenSocket {
            signer: signer.clone(),
            events: tx,
        })
        .channel::<Probe>("probe:*")
        .max_pending_replies(2)
        .into_router();
    let app = axum::Router::new().nest("/socket", socket);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    Harness {
        addr,
        endpoint,
        signer,
        events,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Harness {
    async fn connect(
        &self,
        query: &str,
        protocol: Option<&str>,
    ) -> Result<(Ws, Option<String>), u16> {
        let url = format!("ws://{}/socket/websocket?vsn=2.0.0&{query}", self.addr);
        let mut req = url.into_client_request().unwrap();
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, resp)) => {
                let proto = resp
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap().to_owned());
                Ok((ws, proto))
            }
            Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("{e}"),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(c))) => return json!({"close": c.map(|c| u16::from(c.code))}),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
}

async fn expect_reply(ws: &mut Ws, r: &str, status: &str, response: Value) {
    let got = recv(ws).await;
    assert_eq!(
        (&got[1], &got[3]),
        (&json!(r), &json!("phx_reply")),
        "{got}"
    );
    assert_eq!(got[4], json!({"status": status, "response": response}));
}

#[tokio::test]
async fn connect_with_auth_token_param_or_refusal_status() {
    let h = start().await;
    let token = h.signer.sign(&7u64);
    // phoenix.js's authToken: btoa(token) without padding, in Sec-WebSocket-Protocol.
    let b64 = base64_std_no_pad(token.as_bytes());
    let offered = format!("phoenix, base64url.bearer.phx.{b64}");
    let (mut ws, proto) = h.connect("", Some(&offered)).await.unwrap();
    assert_eq!(proto.as_deref(), Some("phoenix"));
    send(&mut ws, json!(["1", "1", "probe:a", "phx_join", {}])).await;
    expect_reply(
        &mut ws,
        "1",
        "ok",
        json!({"topic": "probe:a", "user": 7, "has_peer": true}),
    )
    .await;

    assert!(h.connect(&format!("token={token}"), None).await.is_ok());
    assert_eq!(h.connect("", None).await.err(), Some(403));
    assert_eq!(h.connect("token=forged.token", None).await.err(), Some(403));
    assert_eq!(h.connect("rate=limited", None).await.err(), Some(429));
}

fn base64_std_no_pad(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn extra_subscriptions_and_messages_reach_handle_info() {
    let h = start().await;
    let token = h.signer.sign(&1u64);
    let (mut ws, _) = h.connect(&format!("token={token}"), None).await.unwrap();
    send(&mut ws, json!(["1", "1", "probe:x", "phx_join", {}])).await;
    expect_reply(
        &mut ws,
        "1",
        "ok",
        json!({"topic": "probe:x", "user": 1, "has_peer": true}),
    )
    .await;
    send(&mut ws, json!(["1", "2", "probe:x", "subscribe", "news"])).await;
    expect_reply(&mut ws, "2", "ok", json!({})).await;
    h.endpoint.broadcast("news", "headline", json!({"t": 1}));
    assert_eq!(
        recv(&mut ws).await,
        json!(["1", null, "probe:x", "relayed", {"from": "news", "event": "headline"}])
    );
    send(&mut ws, json!(["1", "3", "probe:x", "unsubscribe", "news"])).await;
    expect_reply(&mut ws, "3", "ok", json!({})).await;
    h.endpoint.broadcast("news", "headline", json!({"t": 2}));
    send(&mut ws, json!(["1", "4", "probe:x", "send_self", "hello"])).await;
    // The unsubscribed broadcast never arrives: the next frame is the info message.
    assert_eq!(
        recv(&mut ws).await,
        json!(["1", null, "probe:x", "info", {"text": "hello"}])
    );
    send(&mut ws, json!(["1", "5", "probe:x", "subscribe", 5])).await;
    let got = recv(&mut ws).await;
    assert_eq!(got[4]["status"], "error", "{got}");
}

#[tokio::test]
async fn topics_counts_the_joined_channels_only() {
    let h = start().await;
    let mut sockets = Vec::new();
    for (user, topic) in [(1u64, "probe:a"), (2, "probe:a"), (3, "probe:b")] {
        let token = h.signer.sign(&user);
        let (mut ws, _) = h.connect(&format!("token={token}"), None).await.unwrap();
        send(&mut ws, json!(["1", "1", topic, "phx_join", {}])).await;
        assert_eq!(recv(&mut ws).await[4]["status"], "ok");
        sockets.push(ws);
    }
    // An extra subscription and an Endpoint subscription are not joined channels.
    send(
        &mut sockets[0],
        json!(["1", "2", "probe:a", "subscribe", "news"]),
    )
    .await;
    expect_reply(&mut sockets[0], "2", "ok", json!({})).await;
    let _sub = h.endpoint.subscribe("probe:c", 4);
    let mut topics = h.endpoint.topics();
    topics.sort();
    assert_eq!(
        topics,
        [("probe:a".to_owned(), 2), ("probe:b".to_owned(), 1)]
    );
}

#[tokio::test]
async fn terminate_sees_why_the_channel_ended() {
    let mut h = start().await;
    let token = h.signer.sign(&2u64);
    let (mut ws, _) = h.connect(&format!("token={token}"), None).await.unwrap();
    for (jr, topic) in [
        ("1", "probe:leave"),
        ("2", "probe:fail"),
        ("3", "probe:closed"),
    ] {
        send(&mut ws, json!([jr, jr, topic, "phx_join", {}])).await;
        let _ = recv(&mut ws).await;
    }
    send(&mut ws, json!(["1", "4", "probe:leave", "phx_leave", {}])).await;
    expect_reply(&mut ws, "4", "ok", json!({})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!(["1", "1", "probe:leave", "phx_close", {}])
    );
    assert_eq!(h.events.recv().await.unwrap(), "terminate Left");

    send(&mut ws, json!(["2", "5", "probe:fail", "fail", {}])).await;
    assert_eq!(
        h.events.recv().await.unwrap(),
        r#"terminate Error("asked to")"#
    );
    assert_eq!(
        recv(&mut ws).await,
        json!(["2", "2", "probe:fail", "phx_error", {"reason": "channel_crash"}])
    );

    h.endpoint.disconnect("user:2");
    assert_eq!(recv(&mut ws).await, json!({"close": 1001}));
    assert_eq!(h.events.recv().await.unwrap(), "terminate Closed");
}

#[tokio::test]
async fn a_socket_id_is_not_a_topic() {
    let h = start().await;
    let (mut alice, _) = h
        .connect(&format!("token={}", h.signer.sign(&2u64)), None)
        .await
        .unwrap();
    let (mut eve, _) = h
        .connect(&format!("token={}", h.signer.sign(&3u64)), None)
        .await
        .unwrap();
    // Eve subscribes a channel to the topic named like alice's socket id, "user:2".
    send(&mut eve, json!(["1", "1", "probe:eve", "phx_join", {}])).await;
    let _ = recv(&mut eve).await;
    send(
        &mut eve,
        json!(["1", "2", "probe:eve", "subscribe", "user:2"]),
    )
    .await;
    expect_reply(&mut eve, "2", "ok", json!({})).await;
    send(&mut alice, json!(["1", "1", "probe:alice", "phx_join", {}])).await;
    let _ = recv(&mut alice).await;

    // A broadcast of "disconnect" on that topic is only a broadcast: alice stays.
    h.endpoint.broadcast("user:2", "disconnect", json!({}));
    let relayed = |event: &str| json!(["1", null, "probe:eve", "relayed", {"from": "user:2", "event": event}]);
    assert_eq!(recv(&mut eve).await, relayed("disconnect"));
    send(&mut alice, json!(["1", "2", "probe:alice", "release", {}])).await;
    expect_reply(&mut alice, "2", "ok", json!({})).await;

    // The socket id's disconnect closes alice, and eve's channel sees nothing of it: the next
    // broadcast on "user:2" is the next thing it relays.
    h.endpoint.disconnect("user:2");
    assert_eq!(recv(&mut alice).await, json!({"close": 1001}));
    h.endpoint.broadcast("user:2", "fence", json!({}));
    assert_eq!(recv(&mut eve).await, relayed("fence"));
}

#[tokio::test]
async fn the_protocols_own_events_are_never_sent_as_the_apps() {
    let h = start().await;
    let token = h.signer.sign(&4u64);
    let (mut a, _) = h.connect(&format!("token={token}"), None).await.unwrap();
    let (mut b, _) = h.connect(&format!("token={token}"), None).await.unwrap();
    for ws in [&mut a, &mut b] {
        send(ws, json!(["1", "1", "probe:relay", "phx_join", {}])).await;
        let _ = recv(ws).await;
    }
    // A channel relays whatever event name its client asks for: phoenix.js would take
    // `chan_reply_<ref>` as the reply to its push <ref>, and `phx_close` as its channel closing.
    for (i, event) in [
        "chan_reply_2",
        "chan_reply_1",
        "phx_close",
        "phx_reply",
        "phx_error",
    ]
    .into_iter()
    .enumerate()
    {
        let r = format!("r{i}");
        send(&mut a, json!(["1", r, "probe:relay", "relay", event])).await;
        expect_reply(&mut a, &r, "ok", json!({})).await;
    }
    h.endpoint
        .broadcast("probe:relay", "chan_reply_3", json!({}));
    h.endpoint
        .local_broadcast("probe:relay", "phx_close", json!({}));
    // Then one the app may send: it is the next frame on both connections.
    send(&mut a, json!(["1", "x", "probe:relay", "relay", "typing"])).await;
    assert_eq!(
        recv(&mut a).await,
        json!(["1", null, "probe:relay", "typing", {}])
    );
    expect_reply(&mut a, "x", "ok", json!({})).await;
    assert_eq!(
        recv(&mut b).await,
        json!([null, null, "probe:relay", "typing", {}])
    );
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1012() {
    let mut h = start().await;
    let token = h.signer.sign(&3u64);
    let (mut a, _) = h.connect(&format!("token={token}"), None).await.unwrap();
    let (mut b, _) = h.connect(&format!("token={token}"), None).await.unwrap();
    send(&mut a, json!(["1", "1", "probe:s", "phx_join", {}])).await;
    let _ = recv(&mut a).await;
    assert_eq!(h.endpoint.stats().connections, 2);
    let endpoint = h.endpoint.clone();
    let shutdown = tokio::spawn(async move { endpoint.shutdown(WAIT).await });
    assert_eq!(recv(&mut a).await, json!({"close": 1012}));
    assert_eq!(recv(&mut b).await, json!({"close": 1012}));
    assert_eq!(h.events.recv().await.unwrap(), "terminate Shutdown");
    drop((a, b));
    assert_eq!(shutdown.await.unwrap(), 0);
    let stats = h.endpoint.stats();
    assert_eq!(stats.connections, 0);
    assert_eq!((stats.connections_opened, stats.joins), (2, 1));
    assert_eq!((stats.channels_closed, stats.messages_in), (1, 1));
    // The join reply, the two close frames (counted when written) are at least the reply.
    assert!(stats.frames_out >= 1 && stats.bytes_out > 0, "{stats:?}");

    // A draining endpoint refuses new connections with 503, and counts them.
    assert!(h.endpoint.is_draining());
    assert_eq!(
        h.connect(&format!("token={token}"), None).await.err(),
        Some(503)
    );
    assert_eq!(h.endpoint.stats().refused_draining, 1);
}

#[test]
fn public_handles_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Endpoint>();
    assert_send_sync::<firebrand::ReplyRef>();
    assert_send_sync::<firebrand::ChannelSender<String>>();
    assert_send_sync::<firebrand::Broadcast>();
    assert_send_sync::<TokenSigner>();
}

#[tokio::test]
async fn pending_async_replies_are_bounded_per_connection() {
    let h = start().await;
    let token = h.signer.sign(&4u64);
    let (mut ws, _) = h.connect(&format!("token={token}"), None).await.unwrap();
    send(&mut ws, json!(["1", "1", "probe:p", "phx_join", {}])).await;
    let _ = recv(&mut ws).await;
    for r in ["2", "3", "4"] {
        send(&mut ws, json!(["1", r, "probe:p", "hold", {}])).await;
    }
    // The third is over the limit of 2: refused at once.
    expect_reply(
        &mut ws,
        "4",
        "error",
        json!({"reason": "too many pending replies"}),
    )
    .await;
    send(&mut ws, json!(["1", "5", "probe:p", "release", {}])).await;
    expect_reply(&mut ws, "2", "ok", json!({"released": true})).await;
    expect_reply(&mut ws, "3", "ok", json!({"released": true})).await;
    expect_reply(&mut ws, "5", "ok", json!({})).await;
    // Released slots are free again.
    send(&mut ws, json!(["1", "6", "probe:p", "hold", {}])).await;
    send(&mut ws, json!(["1", "7", "probe:p", "release", {}])).await;
    expect_reply(&mut ws, "6", "ok", json!({"released": true})).await;
    assert_eq!(h.endpoint.stats().replies_refused, 1);
}

/// `Server::bind` listens with a backlog of `LISTEN_BACKLOG` (4096), not tokio's 1024: the
/// kernel's own report (`ss`: a listening socket's Send-Q is its backlog) says so.
#[tokio::test]
async fn server_bind_listens_with_the_large_backlog() {
    let server = firebrand::Server::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) reports listen backlogs; install iproute2");
    let report = String::from_utf8_lossy(&out.stdout);
    let backlog: u32 = report
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listening socket on port {port} in: {report}"));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map_or(firebrand::LISTEN_BACKLOG, |s| s.trim().parse().unwrap());
    // Tokio's TcpListener::bind would show 1024 here.
    assert_eq!(backlog, firebrand::LISTEN_BACKLOG.min(somaxconn));
}

/// Recovery on rejoin through the in-process test client (feature `testing`).
#[cfg(feature = "testing")]
mod recovery {
    use super::*;

    /// A recoverable channel that tells its client, in `after_join`, what `recovered()` said.
    struct Feed;

    impl Channel for Feed {
        type Assigns = ();
        type State = ();
        type Info = ();

        async fn join(
            _: &str,
            _: Payload,
            _: &JoinContext<'_, ()>,
        ) -> Result<Joined<Self>, JoinError> {
            Ok(Joined::new(Feed))
        }

        async fn after_join(&mut self, ctx: &mut ChannelContext<Self>) {
            ctx.push("recovered", json!({ "recovered": ctx.recovered() }));
        }
    }

    struct Anyone;

    impl Socket for Anyone {
        type Assigns = ();

        async fn connect(&self, _: &ConnectInfo) -> Result<(), ConnectError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_recoverable_channel_knows_whether_its_client_was_recovered() {
        let endpoint = Endpoint::builder()
            .history("feed:*", 10, Duration::from_secs(60))
            .build();
        let socket =
            firebrand::testing::TestSocket::new(endpoint.socket(Anyone).channel::<Feed>("feed:*"));
        let mut c = socket.connect(&[]).await.unwrap();
        let reply = c.join("feed:a", json!({})).await.unwrap();
        assert_eq!(
            c.assert_push("feed:a", "recovered").await,
            json!({"recovered": null})
        );
        endpoint.broadcast("feed:a", "item", json!({"n": 1}));
        c.assert_broadcast("feed:a", "item").await;

        let since = reply["position"].clone();
        let mut back = socket.connect(&[]).await.unwrap();
        let reply = back
            .join("feed:a", json!({ "since": since }))
            .await
            .unwrap();
        assert_eq!(reply["recovered"], true);
        assert_eq!(
            back.assert_broadcast("feed:a", "item").await,
            json!({"n": 1})
        );
        assert_eq!(
            back.assert_push("feed:a", "recovered").await,
            json!({"recovered": true})
        );

        let mut stale = socket.connect(&[]).await.unwrap();
        let huge = "A".repeat(100_000);
        let reply = stale
            .join("feed:a", json!({ "since": huge }))
            .await
            .unwrap();
        assert_eq!(reply["recovered"], false);
        assert_eq!(
            stale.assert_push("feed:a", "recovered").await,
            json!({"recovered": false})
        );
    }
}

/// Server-side subscribers: Rust code outside any channel receives a topic's broadcasts, from
/// this node and from the others; a reader that falls behind loses the oldest and is told how
/// many; dropping the subscription unsubscribes.
#[tokio::test]
async fn subscriptions_receive_broadcasts_from_every_node_and_say_when_they_lagged() {
    let bus = firebrand::cluster::tests_only::Loopback::default();
    let a = Endpoint::builder().adapter(bus.clone()).build();
    let b = Endpoint::builder().adapter(bus).build();
    let mut sub = b.subscribe("room:jobs", 2);
    assert_eq!(sub.topic(), "room:jobs");
    a.broadcast("room:jobs", "new_msg", json!({"n": 1}));
    b.broadcast("room:jobs", "new_msg", json!({"n": 2}));
    let n = |r: Result<firebrand::Broadcast, firebrand::Lagged>| {
        r.unwrap().payload().to_value().unwrap()["n"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(n(tokio::time::timeout(WAIT, sub.recv()).await.unwrap()), 1);
    assert_eq!(n(tokio::time::timeout(WAIT, sub.recv()).await.unwrap()), 2);
    assert!(sub.try_recv().is_none());

    // Five more than the reader takes: the oldest three are dropped, and it is told.
    for i in 3..=7 {
        b.broadcast("room:jobs", "new_msg", json!({ "n": i }));
    }
    assert_eq!(sub.recv().await.unwrap_err(), firebrand::Lagged(3));
    assert_eq!(n(sub.recv().await), 6);
    assert_eq!(n(sub.next().await.unwrap()), 7);

    // On a recoverable topic, each broadcast carries its position.
    let alone = Endpoint::builder()
        .history("stream:*", 10, Duration::from_secs(60))
        .build();
    let mut stream = alone.subscribe("stream:jobs", 8);
    alone.broadcast("stream:jobs", "new_msg", json!({}));
    let got = tokio::time::timeout(WAIT, stream.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(got.position().is_some_and(|p| p.len() == 28));

    // Dropped: unsubscribed.
    let topics = b.stats().topics;
    drop(sub);
    assert_eq!(b.stats().topics, topics - 1);
}
