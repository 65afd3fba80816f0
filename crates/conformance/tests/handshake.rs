//! HTTP upgrade outcomes (PROTOCOL.md §1.1): serializer negotiation by `vsn`, connect refusal,
//! origin check, method and upgrade-header checks, and the `authToken` subprotocol.

mod common;

use common::*;
use serde_json::json;

/// A V1 heartbeat with ref `r` and its exact reply (FRAMES.md "no vsn param").
async fn v1_heartbeat(c: &mut Client, r: &str) {
    c.send(json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": r}))
        .await;
    c.expect(json!({
        "event": "phx_reply",
        "payload": {"response": {}, "status": "ok"},
        "ref": r,
        "topic": "phoenix"
    }))
    .await;
}

#[tokio::test]
async fn no_vsn_opens_and_speaks_v1() {
    let s = start().await;
    // No query string at all.
    let mut c = Client::connect(&format!("ws://{}/socket/websocket", s.addr)).await;
    v1_heartbeat(&mut c, "1").await;
    // An empty query string, and other params without vsn.
    let mut c = Client::connect(&s.url("")).await;
    v1_heartbeat(&mut c, "1").await;
    let mut c = Client::connect(&s.url("user=alice")).await;
    v1_heartbeat(&mut c, "2").await;
}

#[tokio::test]
async fn vsn_1_0_0_speaks_v1() {
    let s = start().await;
    let mut c = Client::connect(&s.url("vsn=1.0.0")).await;
    v1_heartbeat(&mut c, "1").await;
}

#[tokio::test]
async fn vsn_2_0_0_speaks_v2() {
    let s = start().await;
    let mut c = Client::connect(&s.url("vsn=2.0.0")).await;
    c.heartbeat("1").await;
    c.join("2", "room:lobby", json!({})).await;
}

#[tokio::test]
async fn patch_versions_match_their_serializer() {
    // `~> 1.0.0` and `~> 2.0.0` accept any patch version.
    let s = start().await;
    let mut c = Client::connect(&s.url("vsn=1.0.7")).await;
    v1_heartbeat(&mut c, "1").await;
    let mut c = Client::connect(&s.url("vsn=2.0.3")).await;
    c.heartbeat("1").await;
}

#[tokio::test]
async fn unsupported_vsn_is_403() {
    let s = start().await;
    for vsn in ["3.0.0", "2.1.0", "1.1.0", "abc", "", "2", "2.0"] {
        assert_eq!(
            s.upgrade_status(&s.url(&format!("vsn={vsn}")), &[]).await,
            403,
            "vsn={vsn:?}"
        );
    }
}

#[tokio::test]
async fn bad_token_is_403_good_token_opens() {
    let s = start().await;
    assert_eq!(
        s.upgrade_status(&s.url("token=bad&vsn=2.0.0"), &[]).await,
        403
    );
    // Refused whatever the serializer.
    assert_eq!(
        s.upgrade_status(&s.url("token=bad&vsn=1.0.0"), &[]).await,
        403
    );
    assert_eq!(
        s.upgrade_status(&s.url("token=good&vsn=2.0.0"), &[]).await,
        101
    );
    let mut c = s.client("token=good").await;
    c.heartbeat("1").await;
}

#[tokio::test]
async fn origin_check() {
    let s = start().await;
    let url = s.url("vsn=2.0.0");
    assert_eq!(s.upgrade_status(&url, &[]).await, 101);
    for ok in ["http://localhost:4000", "http://127.0.0.1:5173"] {
        assert_eq!(
            s.upgrade_status(&url, &[("origin", ok)]).await,
            101,
            "origin {ok}"
        );
    }
    assert_eq!(
        s.upgrade_status(&url, &[("origin", "http://evil.example")])
            .await,
        403
    );
}

#[tokio::test]
async fn accepted_origin_opens_a_working_socket() {
    let s = start().await;
    let (c, resp) = s
        .upgrade_response(&s.url("vsn=2.0.0"), &[("origin", "http://localhost:4000")])
        .await;
    assert_eq!(resp.status().as_u16(), 101);
    let mut c = c.expect("socket opened");
    c.heartbeat("1").await;
}

#[tokio::test]
async fn post_is_400() {
    let s = start().await;
    let plain = "POST /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    assert_eq!(s.http_status(plain).await, 400);
    // Even with valid upgrade headers: the method is checked first.
    let upgrade = "POST /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    assert_eq!(s.http_status(upgrade).await, 400);
}

#[tokio::test]
async fn get_without_upgrade_headers_is_400() {
    let s = start().await;
    let plain =
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    assert_eq!(s.http_status(plain).await, 400);
}

#[tokio::test]
async fn auth_token_subprotocol_selects_phoenix() {
    let s = start().await;
    // phoenix.js: `phoenix, base64url.bearer.phx.${btoa(token)}` with `=` stripped.
    let offered = "phoenix, base64url.bearer.phx.c2VjcmV0"; // "secret"
    let (c, resp) = s
        .upgrade_response(&s.url("vsn=2.0.0"), &[("sec-websocket-protocol", offered)])
        .await;
    assert_eq!(resp.status().as_u16(), 101);
    let selected = resp
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(selected, ["phoenix"]);
    let mut c = c.expect("socket opened");
    c.heartbeat("1").await;
    c.join("2", "room:lobby", json!({})).await;
}

/// A client that sends its first frames with the upgrade request, before the `101` (the HTTP
/// server reads them with the request head): they are handled as if sent after it, and the
/// connection is served as usual after them.
#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_handled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start().await;
    /// A masked text frame (client to server), payload under 126 bytes.
    fn masked(text: &str) -> Vec<u8> {
        let mask = [7u8, 1, 9, 3];
        let mut f = vec![0x81, 0x80 | text.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut request = format!(
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nhost: {}\r\nconnection: upgrade\r\n\
         upgrade: websocket\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        s.addr
    )
    .into_bytes();
    request.extend(masked(r#"["1","1","room:early","phx_join",{}]"#));
    request.extend(masked(r#"[null,"2","phoenix","heartbeat",{}]"#));
    tcp.write_all(&request).await.unwrap();
    // The 101, then the heartbeat's reply and the join's (answered by the channel's task).
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let replied = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        text.contains(r#""2","phoenix","phx_reply""#)
            && text.contains(r#"["1","1","room:early","phx_reply",{"response":{"joined":"early"},"status":"ok"}]"#)
    };
    while !replied(&got) {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("the replies to the early frames")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // Served as usual afterwards.
    tcp.write_all(&masked(r#"[null,"3","phoenix","heartbeat",{}]"#))
        .await
        .unwrap();
    while !String::from_utf8_lossy(&got).contains(r#""3","phoenix","phx_reply""#) {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("the reply to a later frame")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
}
