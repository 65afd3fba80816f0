//! The connection comes back by itself: server restarts, heartbeat timeouts, the auth token.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use firebrand_client::{ChannelEvent, ErrorReason, Socket, SocketEvent};
use futures_util::{SinkExt, StreamExt};
use serde_json::json as j;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

#[tokio::test]
async fn reconnects_and_rejoins_after_a_server_restart() {
    let s = start().await;
    let addr = s.addr;
    let socket = s.socket(&[("user", "phoenix")]);
    let mut socket_events = socket.events();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let ch = socket.channel_with("room:restart", move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        j!({"attempt": n})
    });
    let mut events = ch.events();
    ch.join().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(matches!(
        next(&mut events).await,
        ChannelEvent::Joined { .. }
    ));
    assert_eq!(next_socket(&mut socket_events).await, SocketEvent::Open);

    s.stop().await;
    assert_eq!(
        next_socket(&mut socket_events).await,
        SocketEvent::Closed {
            code: Some(1012),
            reason: "server restart".into()
        }
    );
    assert_eq!(
        until(&mut events, |e| match e {
            ChannelEvent::Errored { reason } => Some(reason),
            _ => None,
        })
        .await,
        ErrorReason::ConnectionLost
    );

    let s2 = start_on(addr).await;
    assert!(matches!(
        until(&mut events, |e| match e {
            e @ ChannelEvent::Joined { .. } => Some(e),
            ChannelEvent::Closed => panic!("channel closed"),
            _ => None,
        })
        .await,
        ChannelEvent::Joined { .. }
    ));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "params re-evaluated on rejoin"
    );
    assert_eq!(
        ch.push("ping", j!({"after": 1})).await,
        Ok(json(j!({"after": 1})))
    );
    assert!(socket.is_connected());
    // The new server knows this client: it tracks its presence in the rejoined channel.
    assert!(
        s2.endpoint
            .presence_list("room:restart")
            .to_string()
            .contains("phoenix")
    );
}

#[tokio::test]
async fn pushes_made_while_disconnected_go_out_after_the_rejoin() {
    let s = start().await;
    let addr = s.addr;
    let socket = s.socket(&[]);
    let ch = socket.channel("room:buffered", j!({}));
    let mut events = ch.events();
    ch.join().await.unwrap();
    s.stop().await;
    until(&mut events, |e| {
        matches!(e, ChannelEvent::Errored { .. }).then_some(())
    })
    .await;
    let push = ch.push("ping", j!({"queued": true}));
    let _s2 = start_on(addr).await;
    assert_eq!(push.await, Ok(json(j!({"queued": true}))));
}

/// A fake server that answers the upgrade (recording the request), then does what the test
/// says with the frames.
// tungstenite's callback signature returns its (large) error response type.
#[allow(clippy::result_large_err)]
async fn accept(
    listener: &TcpListener,
) -> (
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    Request,
) {
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("no connection")
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let ws = tokio_tungstenite::accept_hdr_async(tcp, move |req: &Request, mut resp: Response| {
        tx.send(req.clone()).unwrap();
        if req.headers().contains_key("sec-websocket-protocol") {
            resp.headers_mut()
                .insert("sec-websocket-protocol", "phoenix".parse().unwrap());
        }
        Ok(resp)
    })
    .await
    .unwrap();
    (ws, rx.recv().unwrap())
}

async fn recv_text(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("no frame")
        .expect("closed")
        .unwrap()
}

#[tokio::test]
async fn a_heartbeat_without_reply_closes_and_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socket = Socket::builder(format!("ws://{}/socket", listener.local_addr().unwrap()))
        .param("user", "a b&c")
        .auth_token("secret?>")
        .heartbeat_interval(Duration::from_millis(100))
        .connect()
        .unwrap();
    let mut socket_events = socket.events();

    let (mut ws, req) = accept(&listener).await;
    assert_eq!(
        req.uri().to_string(),
        "/socket/websocket?user=a%20b%26c&vsn=2.0.0"
    );
    assert_eq!(
        req.headers()["sec-websocket-protocol"],
        "phoenix, base64url.bearer.phx.c2VjcmV0Pz4"
    );
    assert_eq!(next_socket(&mut socket_events).await, SocketEvent::Open);

    // The heartbeat comes after one interval; leave it unanswered.
    let hb = recv_text(&mut ws).await;
    assert_eq!(
        hb.to_text().unwrap(),
        r#"[null,"1","phoenix","heartbeat",{}]"#
    );
    match recv_text(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(
                (u16::from(f.code), f.reason.as_str()),
                (1000, "heartbeat timeout")
            );
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(
        next_socket(&mut socket_events).await,
        SocketEvent::Closed {
            code: Some(1000),
            reason: "heartbeat timeout".into()
        }
    );

    // It reconnects; answered heartbeats keep coming, one interval after each reply.
    let (mut ws, _) = accept(&listener).await;
    assert_eq!(next_socket(&mut socket_events).await, SocketEvent::Open);
    for _ in 0..3 {
        let hb: serde_json::Value =
            serde_json::from_str(recv_text(&mut ws).await.to_text().unwrap()).unwrap();
        assert_eq!((&hb[2], &hb[3]), (&j!("phoenix"), &j!("heartbeat")));
        let reply = j!([null, hb[1], "phoenix", "phx_reply", {"status": "ok", "response": {}}]);
        ws.send(Message::text(reply.to_string())).await.unwrap();
    }
    assert!(socket.is_connected());
}

/// On a recoverable topic the client sends the last position it saw as `since` on its rejoin by
/// itself: what was broadcast while it was away arrives after the rejoin, once, in order.
#[tokio::test]
async fn rejoins_with_the_last_position_and_gets_what_it_missed() {
    let s = start().await;
    let socket = s.socket(&[("user", "recover")]);
    let ch = socket.channel("stream:client", j!({}));
    let mut events = ch.events();
    ch.join().await.unwrap();
    let joined = next(&mut events).await;
    assert!(matches!(joined, ChannelEvent::Joined { .. }));
    assert_eq!(joined.recovered(), None, "a first join has no since");
    let n = |e: &ChannelEvent| match e {
        ChannelEvent::Message { event, payload } if event == "new_msg" => {
            payload.to_value().and_then(|v| v["n"].as_u64())
        }
        _ => None,
    };
    s.endpoint
        .broadcast("stream:client", "new_msg", j!({"n": 1}));
    assert_eq!(until(&mut events, |e| n(&e)).await, 1);

    // The server closes the connection; 2 and 3 are published before the client is back.
    s.endpoint.disconnect("user_socket:recover");
    s.endpoint
        .broadcast("stream:client", "new_msg", j!({"n": 2}));
    s.endpoint
        .broadcast("stream:client", "new_msg", j!({"n": 3}));
    let rejoined = until(&mut events, |e| match e {
        e @ ChannelEvent::Joined { .. } => Some(e),
        ChannelEvent::Message { .. } => panic!("a message before the rejoin: {e:?}"),
        _ => None,
    })
    .await;
    assert_eq!(rejoined.recovered(), Some(true));
    s.endpoint
        .broadcast("stream:client", "new_msg", j!({"n": 4}));
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(until(&mut events, |e| n(&e)).await);
    }
    assert_eq!(got, [2, 3, 4]);
}
