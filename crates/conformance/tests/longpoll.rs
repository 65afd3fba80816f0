//! The long-poll transport over raw HTTP, case by case (PROTOCOL.md §3.1).

mod common;

use std::time::Duration;

use common::*;
use firebrand_conformance::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Http {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection.
async fn http(
    s: &Server,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Http {
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT * 3, tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Http {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

const LP: &str = "/socket/longpoll?vsn=2.0.0";

/// Starts a session; returns its token.
async fn session(s: &Server, params: &str) -> String {
    let r = http(s, "GET", &format!("{LP}{params}"), &[], "").await;
    let v = r.json();
    assert_eq!(v["status"], 410, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

async fn post(s: &Server, token: &str, ndjson: bool, body: &str) -> Value {
    let ct = if ndjson {
        "application/x-ndjson"
    } else {
        "text/plain"
    };
    http(
        s,
        "POST",
        LP,
        &[("x-phoenix-longpoll-token", token), ("content-type", ct)],
        body,
    )
    .await
    .json()
}

/// Polls until `n` messages have arrived (each poll returns what is buffered).
async fn poll_messages(s: &Server, token: &str, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = http(s, "GET", &format!("{LP}&token={token}"), &[], "")
            .await
            .json();
        assert!(v["status"] == 200 || v["status"] == 204, "{v}");
        for m in v["messages"].as_array().unwrap() {
            got.push(serde_json::from_str(m.as_str().unwrap()).unwrap());
        }
    }
    got
}

/// Whether `frame` is a `presence_diff` in which `key` `joins` or `leaves`.
fn presence_change(frame: &Value, change: &str, key: &str) -> bool {
    frame[3] == "presence_diff" && frame[4][change].get(key).is_some()
}

/// Reads `watcher`'s frames until `key` `joins` or `leaves` its topic.
async fn await_presence(watcher: &mut Client, change: &str, key: &str) {
    while !presence_change(&watcher.recv_json().await, change, key) {}
}

/// A watcher (seeing presence) and a long-poll session of user `key`, both joined to `topic`
/// (the watcher has seen the session's user join); returns the session's token.
async fn watched_session(s: &Server, watcher: &mut Client, topic: &str, key: &str) -> String {
    watcher.send(json!(["1", "1", topic, "phx_join", {}])).await;
    let token = session(s, &format!("&user={key}")).await;
    let join = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
    assert_eq!(post(s, &token, false, &join).await, json!({"status": 200}));
    await_presence(watcher, "joins", key).await;
    token
}

fn config(window_ms: u64) -> Config {
    Config {
        longpoll_window: Duration::from_millis(window_ms),
        ..Config::default()
    }
}

#[tokio::test]
async fn session_start_headers_and_refusals() {
    let s = start_with(config(2000)).await;
    let r = http(&s, "GET", &format!("{LP}&user=lp"), &[], "").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(
        (v["status"].clone(), v["messages"].clone()),
        (json!(410), json!([]))
    );
    assert!(v["token"].as_str().unwrap().len() > 20);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    // `token=bad` is not a session token: a new session's connect refuses it.
    assert_eq!(
        http(&s, "GET", &format!("{LP}&token=bad"), &[], "")
            .await
            .json(),
        json!({"status": 403})
    );
    let evil = http(&s, "GET", LP, &[("origin", "http://evil.example")], "")
        .await
        .json();
    assert_eq!(evil, json!({"status": 403}));
    assert_eq!(
        http(&s, "GET", "/socket/longpoll?vsn=9.0.0", &[], "")
            .await
            .json(),
        json!({"status": 403})
    );
    assert_eq!(
        post(&s, "not-a-token", false, "[]").await,
        json!({"status": 410})
    );
    let options = http(
        &s,
        "OPTIONS",
        LP,
        &[("access-control-request-headers", "x-phoenix-longpoll-token")],
        "",
    )
    .await;
    assert_eq!(options.status, 200);
    assert_eq!(
        options.header("access-control-allow-headers"),
        Some("x-phoenix-longpoll-token")
    );
    assert_eq!(
        options.header("access-control-allow-methods"),
        Some("get, post, options")
    );
    assert_eq!(options.header("access-control-max-age"), Some("3600"));
    assert_eq!(http(&s, "PUT", LP, &[], "").await.status, 400);
}

#[tokio::test]
async fn join_push_and_poll_as_in_the_phoenix_transcript() {
    let s = start_with(config(2000)).await;
    let token = session(&s, "&user=lp").await;
    assert_eq!(
        post(&s, &token, false, r#"["1","1","room:lobby","phx_join",{}]"#).await,
        json!({"status": 200})
    );
    let batch = "[null,\"2\",\"phoenix\",\"heartbeat\",{}]\n[\"1\",\"3\",\"room:lobby\",\"ping\",{\"lp\":true}]\n";
    assert_eq!(post(&s, &token, true, batch).await, json!({"status": 200}));
    // Phoenix's transcript also holds a presence_diff of lp's own join, before its
    // presence_state that holds the same meta; firebrand never sends a subscriber the diff of
    // a change its presence_state holds (phoenix.js would announce that join twice).
    let got = poll_messages(&s, &token, 4).await;
    let replies: Vec<&Value> = got.iter().filter(|m| m[3] == "phx_reply").collect();
    assert_eq!(
        replies[0],
        &ok_reply(Some("1"), "1", "room:lobby", json!({}))
    );
    assert_eq!(replies[1], &ok_reply(None, "2", "phoenix", json!({})));
    assert_eq!(
        replies[2],
        &ok_reply(Some("1"), "3", "room:lobby", json!({"lp": true}))
    );
    assert!(
        got.iter()
            .any(|m| m[3] == "presence_state" && m[4]["lp"]["metas"].is_array())
    );
    assert!(!got.iter().any(|m| m[3] == "presence_diff"), "{got:?}");

    assert_eq!(
        post(
            &s,
            &token,
            false,
            r#"["1","4","room:lobby","phx_leave",{}]"#
        )
        .await,
        json!({"status": 200})
    );
    let got = poll_messages(&s, &token, 2).await;
    assert_eq!(got[0], ok_reply(Some("1"), "4", "room:lobby", json!({})));
    assert_eq!(got[1], json!(["1", "1", "room:lobby", "phx_close", {}]));
}

#[tokio::test]
async fn an_empty_poll_ends_with_204_after_the_window() {
    let s = start_with(config(200)).await;
    let token = session(&s, "").await;
    let v = http(&s, "GET", &format!("{LP}&token={token}"), &[], "")
        .await
        .json();
    assert_eq!(
        (v["status"].clone(), v["messages"].clone()),
        (json!(204), json!([]))
    );
}

#[tokio::test]
async fn broadcasts_cross_transports() {
    let s = start_with(config(2000)).await;
    let token = session(&s, "").await;
    post(&s, &token, false, r#"["1","1","room:mix","phx_join",{}]"#).await;
    assert_eq!(
        poll_messages(&s, &token, 1).await[0],
        ok_reply(Some("1"), "1", "room:mix", json!({"joined": "mix"}))
    );
    let mut ws = s.client("").await;
    ws.join("1", "room:mix", json!({"joined": "mix"})).await;
    ws.send(json!(["1", "2", "room:mix", "new_msg", {"from": "ws"}]))
        .await;
    assert_eq!(
        poll_messages(&s, &token, 1).await[0],
        json!([null, null, "room:mix", "new_msg", {"from": "ws"}])
    );
    post(
        &s,
        &token,
        false,
        r#"["1","2","room:mix","new_msg",{"from":"lp"}]"#,
    )
    .await;
    ws.expect(json!([null, null, "room:mix", "new_msg", {"from": "ws"}]))
        .await;
    ws.expect(json!([null, null, "room:mix", "new_msg", {"from": "lp"}]))
        .await;
}

#[tokio::test]
async fn only_the_first_100_lines_of_a_post_are_processed() {
    let s = start_with(config(2000)).await;
    let token = session(&s, "").await;
    let body: String = (0..150)
        .map(|i| format!("[null,\"{i}\",\"phoenix\",\"heartbeat\",{{}}]\n"))
        .collect();
    assert_eq!(post(&s, &token, true, &body).await, json!({"status": 200}));
    let got = poll_messages(&s, &token, 100).await;
    assert_eq!(got.len(), 100);
    assert_eq!(got[99][1], "99");
    // Nothing more was queued: the next poll is empty.
    let v = http(&s, "GET", &format!("{LP}&token={token}"), &[], "")
        .await
        .json();
    assert_eq!(v["status"], 204);
}

#[tokio::test]
async fn a_session_that_is_not_polled_ends_and_its_presence_leaves() {
    let s = start_with(config(200)).await;
    let mut watcher = s.presence_client("user=watcher").await;
    let token = watched_session(&s, &mut watcher, "room:lp", "ghost").await;
    // The watcher sees the long-poll user leave once the session times out (300 ms).
    await_presence(&mut watcher, "leaves", "ghost").await;
    assert_eq!(
        post(&s, &token, false, r#"[null,"2","phoenix","heartbeat",{}]"#).await,
        json!({"status": 410})
    );
    assert_eq!(
        http(&s, "GET", &format!("{LP}&token={token}"), &[], "")
            .await
            .json()["status"],
        410
    );
}

#[tokio::test]
async fn undecodable_lines_are_refused_with_400() {
    let s = start_with(config(2000)).await;
    let token = session(&s, "").await;
    let r = http(
        &s,
        "POST",
        LP,
        &[("x-phoenix-longpoll-token", &token)],
        "[\"1\",\"1\"]",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("malformed frame"), "{}", r.body);
}

#[tokio::test]
async fn a_session_that_stops_polling_ends_as_a_slow_consumer() {
    // The session times out after 15 s, later than any wait below.
    let s = start_with(Config {
        outbound_limit: 64 * 1024,
        ..Config::default()
    })
    .await;
    let mut watcher = s.presence_client("user=watcher").await;
    let token = watched_session(&s, &mut watcher, "room:lp", "sleeper").await;
    // 1 KB broadcasts: the watcher (WebSocket) reads each one; the session never polls.
    let body = "x".repeat(1000);
    let mut left = false;
    for n in 0..1000 {
        s.endpoint
            .broadcast("room:lp", "tick", json!({"n": n, "body": body}));
        loop {
            let f = watcher.recv_json().await;
            left |= presence_change(&f, "leaves", "sleeper");
            if f[3] == "tick" {
                assert_eq!(f[4]["n"], n);
                break;
            }
        }
        if s.endpoint.stats().slow_consumers == 1 {
            break;
        }
    }
    assert_eq!(s.endpoint.stats().slow_consumers, 1);
    // Its channel terminated: its presence leaves.
    if !left {
        await_presence(&mut watcher, "leaves", "sleeper").await;
    }
    assert_eq!(
        post(&s, &token, false, r#"[null,"2","phoenix","heartbeat",{}]"#).await,
        json!({"status": 410})
    );
    // Its next poll starts a new session, as for any ended session.
    let v = http(&s, "GET", &format!("{LP}&token={token}"), &[], "")
        .await
        .json();
    assert_eq!(v["status"], 410, "{v}");
    assert_ne!(v["token"], token.as_str());
    watcher.ping_roundtrip("1", "2", "room:lp").await;
    assert_eq!(s.endpoint.stats().slow_consumers, 1);
}

#[tokio::test]
async fn a_session_whose_client_leaves_mid_poll_still_ends() {
    let s = start_with(config(1000)).await;
    let mut watcher = s.presence_client("user=watcher").await;
    let token = watched_session(&s, &mut watcher, "room:lp", "gone").await;
    // Its join reply and presence_state are polled; then a poll whose client closes the
    // connection after 200 ms of the 1 s window and never polls again: the server drops the
    // request.
    poll_messages(&s, &token, 2).await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let get = format!("GET {LP}&token={token} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    tcp.write_all(get.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(tcp);
    // The session times out 1.5 s later (within the watcher's 5 s wait).
    await_presence(&mut watcher, "leaves", "gone").await;
    assert_eq!(
        post(&s, &token, false, r#"[null,"2","phoenix","heartbeat",{}]"#).await,
        json!({"status": 410})
    );
}

#[tokio::test]
async fn a_post_body_over_twice_the_frame_limit_is_refused_with_413_before_it_is_read() {
    // The default limit: twice the 1 MiB frame limit.
    const LIMIT: usize = 2 << 20;
    let s = start_with(config(2000)).await;
    let token = session(&s, "").await;
    // Only the head is sent: the answer comes from the declared length.
    let head = format!(
        "POST {LP} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-phoenix-longpoll-token: {token}\r\n\
         content-length: {}\r\n\r\n",
        LIMIT + 1
    );
    assert_eq!(s.http_status(&head).await, 413);

    // A chunked body is refused once its bytes pass the limit, while the client is still
    // sending.
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    let (mut rx, mut tx) = tcp.into_split();
    let head = format!(
        "POST {LP} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-phoenix-longpoll-token: {token}\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    let sender = tokio::spawn(async move {
        tx.write_all(head.as_bytes()).await?;
        let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
        // Up to 100 MiB; the server answers, and stops reading, after about 2 MiB.
        for _ in 0..1600 {
            tx.write_all(chunk.as_bytes()).await?;
        }
        std::io::Result::Ok(())
    });
    let mut head = [0; 12];
    tokio::time::timeout(WAIT, rx.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    sender.abort();

    // A body under the limit is read as usual: a batch of 20 frames of 70 KB.
    let heartbeats: String = (0..20)
        .map(|i| {
            format!(
                "[null,\"{i}\",\"phoenix\",\"heartbeat\",{{\"pad\":\"{}\"}}]\n",
                "x".repeat(70_000)
            )
        })
        .collect();
    assert!(heartbeats.len() > 1 << 20 && heartbeats.len() < LIMIT);
    assert_eq!(
        post(&s, &token, true, &heartbeats).await,
        json!({"status": 200})
    );
}

#[tokio::test]
async fn a_post_without_a_live_session_is_answered_before_its_body_is_read() {
    let s = start_with(config(2000)).await;
    let ended = session(&s, "&user=gone").await;
    s.endpoint.disconnect("user_socket:gone");
    // Its session has ended once a poll says so.
    loop {
        let v = http(&s, "GET", LP, &[("x-phoenix-longpoll-token", &ended)], "")
            .await
            .json();
        if v["status"] != 200 && v["status"] != 204 {
            break;
        }
    }
    // Heads that announce 1 MB and send none of it: no token, a token that is none of ours,
    // an ended session's. Each is answered at once (the body would never come).
    for token in [None, Some("not-a-token"), Some(ended.as_str())] {
        let token = token.map_or(String::new(), |t| {
            format!("x-phoenix-longpoll-token: {t}\r\n")
        });
        let head = format!(
            "POST {LP} HTTP/1.1\r\nhost: 127.0.0.1\r\n{token}content-length: 1000000\r\n\r\n"
        );
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("status") {
            let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
                .await
                .expect("answered before the body came")
                .unwrap();
            assert!(
                n > 0,
                "closed without an answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains(r#"{"status":410}"#), "{text}");
    }
}

#[tokio::test]
async fn a_post_body_slower_than_the_poll_window_gets_408() {
    let s = start_with(config(300)).await;
    let token = session(&s, "").await;
    // 10 of the 100 bytes announced, then nothing: answered once the window has passed.
    let head = format!(
        "POST {LP} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-phoenix-longpoll-token: {token}\r\n\
         content-length: 100\r\n\r\n[null,\"1\","
    );
    assert_eq!(s.http_status(&head).await, 408);
}

/// A socket that reads a connect param named `token` as the app's credential (as
/// firebrand-server reads its JWT): anything but `jwt` is refused; no `token` is an anonymous
/// connection. Its socket id is `anon:<user>`.
struct TokenSocket;

impl firebrand::Socket for TokenSocket {
    type Assigns = ();

    async fn connect(&self, info: &firebrand::ConnectInfo) -> Result<(), firebrand::ConnectError> {
        match info.param("token") {
            None | Some("jwt") => Ok(()),
            Some(_) => Err(firebrand::ConnectError::forbidden()),
        }
    }

    fn id(&self, _: &()) -> Option<String> {
        Some("anon:1".into())
    }
}

#[tokio::test]
async fn an_anonymous_client_reconnects_after_its_session_ended() {
    let endpoint = firebrand::Endpoint::new();
    let router = axum::Router::new().nest(
        "/socket",
        endpoint
            .socket(TokenSocket)
            .longpoll(Duration::from_secs(2))
            .into_router(),
    );
    let s = serve(router, endpoint).await;
    let token = session(&s, "").await;
    s.endpoint.disconnect("anon:1");
    // The official client polls with the ended session's token as the *query* param `token`:
    // it names no session, so a new one starts, and that token is not the app's credential.
    let again = loop {
        let v = http(&s, "GET", &format!("{LP}&token={token}"), &[], "")
            .await
            .json();
        if v["status"] != 200 && v["status"] != 204 {
            break v;
        }
    };
    assert_eq!(again["status"], 410, "{again}");
    assert_ne!(again["token"], token.as_str());
    // A client with a credential of its own keeps it.
    let v = http(&s, "GET", &format!("{LP}&token=jwt&token={token}"), &[], "")
        .await
        .json();
    assert_eq!(v["status"], 410, "{v}");
    let v = http(
        &s,
        "GET",
        &format!("{LP}&token=forged&token={token}"),
        &[],
        "",
    )
    .await
    .json();
    assert_eq!(v, json!({"status": 403}));
}
