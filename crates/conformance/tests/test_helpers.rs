//! firebrand's test helpers (`firebrand::testing`) driving the conformance app's channel
//! in-process: the same behaviours as the wire tests, without a network.

use std::time::Duration;

use firebrand::Endpoint;
use firebrand::testing::{Received, TestSocket};
use firebrand_conformance::{Config, socket};
use serde_json::json;

fn test_socket() -> TestSocket<firebrand_conformance::UserSocket> {
    TestSocket::new(socket(&Endpoint::new(), &Config::default()))
}

#[tokio::test(start_paused = true)]
async fn connect_join_push_reply() {
    let socket = test_socket();
    assert!(socket.connect(&[("token", "bad")]).await.is_err());
    let mut c = socket.connect(&[]).await.unwrap();
    assert_eq!(c.join("room:lobby", json!({})).await, Ok(json!({})));
    assert_eq!(
        c.join("room:42", json!({})).await,
        Ok(json!({"joined": "42"}))
    );
    assert_eq!(
        c.join("room:private", json!({})).await,
        Err(json!({"reason": "unauthorized"}))
    );
    assert_eq!(
        c.join("room:join_crash", json!({})).await,
        Err(json!({"reason": "join crashed"}))
    );
    // The slow join takes 500 ms of (paused, auto-advancing) time.
    assert_eq!(c.join("room:slow_join", json!({})).await, Ok(json!({})));

    let reply = c.request("room:lobby", "ping", json!({"n": 1})).await;
    assert_eq!(
        (reply.status(), reply.payload().to_value()),
        ("ok", Some(json!({"n": 1})))
    );
    let reply = c.request("room:lobby", "error_reply", json!({})).await;
    assert_eq!(reply.status(), "error");

    let r = c.push("room:lobby", "push_me", json!({"k": "v"})).await;
    assert_eq!(
        c.assert_push("room:lobby", "pushed").await,
        json!({"k": "v"})
    );
    assert_eq!(c.assert_reply(&r).await.status(), "ok");

    let r = c
        .push("room:lobby", "async_reply", json!({"later": 1}))
        .await;
    assert_eq!(
        c.assert_reply(&r).await.payload().to_value(),
        Some(json!({"later": 1}))
    );

    c.push("room:lobby", "new_msg", json!({"body": "hi"})).await;
    assert_eq!(
        c.assert_broadcast("room:lobby", "new_msg").await,
        json!({"body": "hi"})
    );
    c.push("room:lobby", "new_msg_from", json!({"body": "not me"}))
        .await;
    c.refute_push("room:lobby", "new_msg", Duration::from_millis(100))
        .await;

    assert_eq!(c.leave("room:42").await.status(), "ok");
    assert_eq!(c.assert_push("room:42", "phx_close").await, json!({}));
    c.close().await;
}

#[tokio::test(start_paused = true)]
async fn crash_intercept_presence_and_disconnect() {
    let endpoint = Endpoint::new();
    let socket = TestSocket::new(socket(&endpoint, &Config::default()));
    let mut alice = socket.connect(&[("user", "alice")]).await.unwrap();
    let mut bob = socket.connect(&[("user", "bob")]).await.unwrap();
    alice.join("room:t", json!({})).await.unwrap();
    let state = alice.assert_push("room:t", "presence_state").await;
    assert_eq!(state["alice"]["metas"].as_array().unwrap().len(), 1);
    bob.join("room:t", json!({})).await.unwrap();
    let diff = alice
        .assert_received(|f| matches!(f, Received::Broadcast { event, payload, .. }
            if event == "presence_diff" && payload.to_value().unwrap()["joins"].get("bob").is_some()))
        .await;
    assert!(matches!(diff, Received::Broadcast { .. }));

    bob.push("room:t", "shout", json!({"m": 1})).await;
    assert_eq!(
        alice.assert_push("room:t", "shout").await,
        json!({"m": 1, "to": "alice"})
    );
    assert_eq!(
        bob.assert_push("room:t", "shout").await,
        json!({"m": 1, "to": "bob"})
    );

    bob.push("room:t", "crash", json!({})).await;
    assert_eq!(
        bob.assert_push("room:t", "phx_error").await,
        json!({"reason": "channel_crash"})
    );
    let leave = alice
        .assert_received(|f| matches!(f, Received::Broadcast { event, payload, .. }
            if event == "presence_diff" && payload.to_value().unwrap()["leaves"].get("bob").is_some()))
        .await;
    assert!(matches!(leave, Received::Broadcast { .. }));

    alice.push("room:t", "disconnect_me", json!({})).await;
    assert_eq!(alice.assert_closed().await, (1001, "disconnect".to_owned()));
    assert_eq!(endpoint.stats().connections, 1);
}

/// Two endpoints as nodes of one in-process cluster: broadcast reaches both, local_broadcast
/// stays home, direct_broadcast reaches the named node only.
#[tokio::test(start_paused = true)]
async fn local_and_direct_broadcasts_between_nodes() {
    use firebrand::cluster::tests_only::Loopback;
    let link = Loopback::default();
    let (a, b) = (
        Endpoint::builder().adapter(link.clone()).build(),
        Endpoint::builder().adapter(link).build(),
    );
    let config = Config::default();
    let mut on_a = TestSocket::new(socket(&a, &config))
        .connect(&[])
        .await
        .unwrap();
    let mut on_b = TestSocket::new(socket(&b, &config))
        .connect(&[])
        .await
        .unwrap();
    on_a.join("room:n", json!({})).await.unwrap();
    on_b.join("room:n", json!({})).await.unwrap();

    a.broadcast("room:n", "everywhere", json!({}));
    assert_eq!(
        on_a.assert_broadcast("room:n", "everywhere").await,
        json!({})
    );
    assert_eq!(
        on_b.assert_broadcast("room:n", "everywhere").await,
        json!({})
    );

    a.local_broadcast("room:n", "home", json!({}));
    assert_eq!(on_a.assert_broadcast("room:n", "home").await, json!({}));
    a.direct_broadcast(b.node().unwrap(), "room:n", "there", json!({}));
    assert_eq!(on_b.assert_broadcast("room:n", "there").await, json!({}));
    let neither = |f: &Received| matches!(f, Received::Broadcast { event, .. } if event == "home" || event == "there");
    // Nothing else arrived: a's "there" and b's "home" would precede this marker.
    a.broadcast("room:n", "marker", json!({}));
    on_a.assert_broadcast("room:n", "marker").await;
    on_b.assert_broadcast("room:n", "marker").await;
    assert!(
        !on_a.unmatched().any(neither),
        "{:?}",
        on_a.unmatched().collect::<Vec<_>>()
    );
    assert!(
        !on_b.unmatched().any(neither),
        "{:?}",
        on_b.unmatched().collect::<Vec<_>>()
    );
    // b received at least the broadcast, the direct one and the marker (plus a's heartbeats).
    assert!(b.stats().cluster_received >= 3);
}
