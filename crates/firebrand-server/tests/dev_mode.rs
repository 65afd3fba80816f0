//! With no configuration at all: development mode, anyone may connect.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn without_config_anyone_connects_and_joins() {
    let server = spawn(&[], &[]).await;
    let banner = server.banner.join("\n");
    // It says what to do next: the phoenix.js URL, that anyone may connect, how to set a secret.
    let url = format!("new Socket(\"ws://127.0.0.1:{}/socket\")", server.port);
    assert!(banner.contains(&url), "{banner}");
    assert!(banner.contains("anyone may connect"), "{banner}");
    assert!(banner.contains("FIREBRAND_JWT_SECRET"), "{banner}");
    // And logs it as a warning.
    assert!(
        server.logged(&["WARN", "development mode"]).await,
        "{:?}",
        server.log.lock().unwrap()
    );

    let mut client = connect(&server.url(), None).await.open();
    assert_eq!(client.join("room:a").await, ("ok".into(), json!({})));
    // A token is not checked (there is no key to check it with): still anonymous.
    let url = format!("{}&token=whatever", server.url());
    let mut other = connect(&url, None).await.open();
    assert_eq!(other.join("anything").await, ("ok".into(), json!({})));
}

#[tokio::test]
async fn client_pushes_are_broadcast_to_the_others() {
    let server = spawn(&[], &[]).await;
    let mut alice = connect(&server.url(), None).await.open();
    let mut bob = connect(&server.url(), None).await.open();
    alice.join("room:a").await;
    bob.join("room:a").await;
    let r = alice
        .send(Some("1"), "room:a", "new_msg", json!({"body": "hi"}))
        .await;
    assert_eq!(alice.reply(&r).await, ("ok".into(), json!({})));
    assert_eq!(
        bob.recv_event("new_msg").await,
        json!([null, null, "room:a", "new_msg", {"body": "hi"}])
    );
    // Not back to the sender (broadcast_from): its next frame is the reply to its next push.
    let r = alice.send(Some("1"), "room:a", "phx_x", json!({})).await;
    let frame = alice.recv().await;
    assert_eq!(frame[1], json!(r), "{frame}");
    assert_eq!(frame[4]["response"], json!({"reason": "reserved event"}));
}

#[tokio::test]
async fn the_api_is_open_without_a_key() {
    let server = spawn(&[], &[]).await;
    let (status, body) = http(server.port, "GET", "/api/info", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["node"], json!(null));
}

#[tokio::test]
async fn the_open_api_answers_loopback_hosts_only() {
    let server = spawn(&[], &[]).await;
    let port = server.port.to_string();
    for host in [
        "localhost".to_owned(),
        format!("localhost:{port}"),
        "127.0.0.1".to_owned(),
        format!("127.0.0.1:{port}"),
        "[::1]".to_owned(),
        format!("[::1]:{port}"),
        "LOCALHOST".to_owned(),
    ] {
        let (status, body) =
            http_with(server.port, "GET", "/api/info", &[("host", &host)], b"").await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    // A page the developer visits, whose name resolves to 127.0.0.1 (DNS rebinding), or any
    // other name: refused, with a JSON error.
    for host in [
        "evil.example.com",
        "evil.example.com:4000",
        "localhost.evil.example.com",
        "127.0.0.1.nip.io",
    ] {
        let (status, body) =
            http_with(server.port, "GET", "/api/info", &[("host", host)], b"").await;
        assert_eq!(status, 403, "{host}: {body}");
        assert!(body["error"].as_str().unwrap().contains("host"), "{body}");
        let publish = br#"{"topic": "room:a", "event": "e"}"#;
        let headers = [("host", host), ("content-type", "application/json")];
        let (status, body) =
            http_with(server.port, "POST", "/api/publish", &headers, publish).await;
        assert_eq!(status, 403, "{host}: {body}");
    }
}

#[tokio::test]
async fn sigterm_exits_0() {
    let mut server = spawn(&[], &[("FIREBRAND_DRAIN_MS", "10")]).await;
    let mut client = connect(&server.url(), None).await.open();
    client.join("room:a").await;
    let pid = server.child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
