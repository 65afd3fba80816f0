//! The server API over HTTP, against the real binary: publish, disconnect, presence, topics,
//! history, info; the key; errors as JSON.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-not-for-production-0123456789";
const KEY: &str = "api-key-for-the-tests-0123456789";

const CONFIG: &str = r#"
[auth]
jwt_hs256_secret = "test-secret-not-for-production-0123456789"

[api]
key = "api-key-for-the-tests-0123456789"

[[namespace]]
prefix = "room:"
presence = true

[[namespace]]
prefix = "feed:"
history = { size = 10, max_age_ms = 60000 }
"#;

async fn server(name: &str) -> Server {
    let dir = temp_dir(name);
    let path = dir.join("firebrand.toml");
    std::fs::write(&path, CONFIG).unwrap();
    spawn(&["--config", path.to_str().unwrap()], &[]).await
}

async fn user(server: &Server, sub: &str) -> Client {
    let claims = json!({"sub": sub, "exp": now() + 300, "info": {"name": sub}});
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    let url = format!("{}&token={token}", server.url());
    connect(&url, None).await.open()
}

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    http(
        server.port,
        "POST",
        path,
        Some(KEY),
        Some(&body.to_string()),
    )
    .await
}

async fn get(server: &Server, path: &str) -> (u16, Value) {
    http(server.port, "GET", path, Some(KEY), None).await
}

#[tokio::test]
async fn publish_and_publish_many_reach_joined_clients() {
    let server = server("publish").await;
    let mut alice = user(&server, "alice").await;
    alice.join("room:1").await;
    let mut bob = user(&server, "bob").await;
    bob.join("room:2").await;

    let (status, body) = post(
        &server,
        "/api/publish",
        json!({"topic": "room:1", "event": "news", "payload": {"n": 1}}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"ok": true})));
    assert_eq!(
        alice.recv_event("news").await,
        json!([null, null, "room:1", "news", {"n": 1}])
    );

    let (status, body) = post(
        &server,
        "/api/publish_many",
        json!({"topics": ["room:1", "room:2"], "event": "news", "payload": {"n": 2}}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"ok": true, "topics": 2})));
    assert_eq!(alice.recv_event("news").await[4], json!({"n": 2}));
    assert_eq!(bob.recv_event("news").await[4], json!({"n": 2}));
}

#[tokio::test]
async fn disconnect_closes_every_socket_of_the_user() {
    let server = server("disconnect").await;
    let mut alice1 = user(&server, "alice").await;
    let mut alice2 = user(&server, "alice").await;
    let mut bob = user(&server, "bob").await;
    for c in [&mut alice1, &mut alice2, &mut bob] {
        c.join("room:1").await;
    }
    let (status, _) = post(&server, "/api/disconnect", json!({"user": "alice"})).await;
    assert_eq!(status, 200);
    assert_eq!(alice1.closed().await, Some(1001));
    assert_eq!(alice2.closed().await, Some(1001));
    // Bob is still there.
    let r = bob.send(Some("1"), "room:1", "x", json!({})).await;
    assert_eq!(bob.reply(&r).await.0, "error");
}

#[tokio::test]
async fn presence_topics_and_info() {
    let server = server("presence").await;
    let mut alice = user(&server, "alice").await;
    alice.join("room:1").await;
    alice.recv_event("presence_state").await;
    let mut bob = user(&server, "bob").await;
    bob.join("room:1").await;
    bob.join("feed:1").await;

    let (status, body) = get(&server, "/api/presence?topic=room:1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topic"], "room:1");
    let metas = &body["presences"]["alice"]["metas"];
    assert_eq!(metas[0]["user"], "alice", "{body}");
    assert_eq!(metas[0]["info"], json!({"name": "alice"}), "{body}");
    assert!(body["presences"]["bob"].is_object(), "{body}");

    let (status, body) = get(&server, "/api/topics").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"topics": [
            {"topic": "feed:1", "subscribers": 1},
            {"topic": "room:1", "subscribers": 2},
        ]})
    );

    let (status, body) = get(&server, "/api/info").await;
    assert_eq!(status, 200);
    assert_eq!(body["connections"], 2, "{body}");
    assert_eq!(body["node"], Value::Null);
    assert_eq!(body["nodes"], json!([]));
    assert!(body["version"].is_string());
}

#[tokio::test]
async fn history_of_a_recoverable_topic() {
    let server = server("history").await;
    for n in 1..=3 {
        let body = json!({"topic": "feed:1", "event": "item", "payload": {"n": n}});
        assert_eq!(post(&server, "/api/publish", body).await.0, 200);
    }
    let (status, body) = get(&server, "/api/history?topic=feed:1").await;
    assert_eq!(status, 200, "{body}");
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0]["payload"], json!({"n": 1}));
    assert_eq!(body["position"], messages[2]["position"]);
    let since = messages[0]["position"].as_str().unwrap();
    let (_, body) = get(&server, &format!("/api/history?topic=feed:1&since={since}")).await;
    assert_eq!(body["recovered"], true);
    assert_eq!(body["messages"].as_array().unwrap().len(), 2);

    let (status, body) = get(&server, "/api/history?topic=room:1").await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no history"));
}

/// Recovery on rejoin through the server: a client that joined a topic of a namespace with
/// history, saw a broadcast and went away rejoins with `since` (as phoenix.js does with the
/// last position it saw) and gets what it missed, once, in order.
#[tokio::test]
async fn a_rejoin_with_since_recovers_what_was_missed() {
    let server = server("recover").await;
    let mut a = user(&server, "alice").await;
    let (status, reply) = a.join("feed:2").await;
    assert_eq!(status, "ok", "{reply}");
    let publish = |n: u64| json!({"topic": "feed:2", "event": "item", "payload": {"n": n}});
    assert_eq!(post(&server, "/api/publish", publish(1)).await.0, 200);
    let seen = a.recv_event("item").await;
    assert_eq!(seen[4], json!({"n": 1}));
    // A recoverable topic's broadcasts carry their position in the ref's place.
    let position = seen[1].as_str().expect("a position").to_owned();
    drop(a);
    for n in 2..=4 {
        assert_eq!(post(&server, "/api/publish", publish(n)).await.0, 200);
    }
    let mut again = user(&server, "alice").await;
    let (status, reply) = again.join_with("feed:2", json!({"since": position})).await;
    assert_eq!(status, "ok", "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    for n in 2..=4 {
        assert_eq!(again.recv_event("item").await[4], json!({"n": n}));
    }
    // Nothing twice: the next item is the next broadcast.
    assert_eq!(post(&server, "/api/publish", publish(5)).await.0, 200);
    assert_eq!(again.recv_event("item").await[4], json!({"n": 5}));
}

#[tokio::test]
async fn errors_are_json_with_a_reason() {
    let server = server("errors").await;
    let publish = json!({"topic": "room:1", "event": "e"}).to_string();
    for key in [None, Some("wrong-key-wrong-key-wrong-key-00")] {
        let (status, body) = http(server.port, "POST", "/api/publish", key, Some(&publish)).await;
        assert_eq!(status, 401, "{body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let (status, body) = http(server.port, "GET", "/api/topics", None, None).await;
    assert_eq!(status, 401, "{body}");

    let (status, body) = http(server.port, "POST", "/api/publish", Some(KEY), Some("{")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("invalid body"));
    let (status, body) = post(&server, "/api/publish", json!({"topic": "room:1"})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("`event`"),
        "{body}"
    );
    let (status, body) = get(&server, "/api/presence").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("topic"), "{body}");

    let reserved = json!({"topic": "room:1", "event": "phx_close"});
    let (status, body) = post(&server, "/api/publish", reserved).await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = post(
        &server,
        "/api/publish_many",
        json!({"topics": [], "event": "e"}),
    )
    .await;
    assert_eq!(status, 422);

    let (status, body) = get(&server, "/api/nope").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "no such route: GET /api/nope");
    let (status, body) = get(&server, "/api/publish").await;
    assert_eq!(status, 405, "{body}");
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn posts_need_a_json_content_type() {
    let server = server("content-type").await;
    let publish = br#"{"topic": "room:1", "event": "news"}"#;
    let auth = format!("Bearer {KEY}");
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonx"),
    ] {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(content_type.map(|c| ("content-type", c)));
        let (status, body) =
            http_with(server.port, "POST", "/api/publish", &headers, publish).await;
        assert_eq!(status, 415, "{content_type:?}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("application/json"),
            "{body}"
        );
    }
    for content_type in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
    ] {
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", content_type),
        ];
        let (status, body) =
            http_with(server.port, "POST", "/api/publish", &headers, publish).await;
        assert_eq!(status, 200, "{content_type}: {body}");
    }
    // The key is checked first: without it, 401 whatever the type.
    let (status, _) = http_with(server.port, "POST", "/api/publish", &[], publish).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_body_over_2_mb_gets_a_json_413() {
    let server = server("too-large").await;
    let mut publish = br#"{"topic": "room:1", "event": "news", "payload": ""#.to_vec();
    publish.resize(publish.len() + 2 * 1024 * 1024, b'x');
    publish.extend_from_slice(br#""}"#);
    let auth = format!("Bearer {KEY}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, body) = http_with(server.port, "POST", "/api/publish", &headers, &publish).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("2 MiB"), "{body}");
    // Just under the limit: published.
    publish.truncate(2 * 1024 * 1024 - 2);
    publish.extend_from_slice(br#""}"#);
    let (status, body) = http_with(server.port, "POST", "/api/publish", &headers, &publish).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_openapi_document_is_served_without_a_key() {
    let server = server("openapi").await;
    let (status, body) = http(server.port, "GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert!(body["paths"]["/api/publish"]["post"].is_object(), "{body}");
}

#[tokio::test]
async fn without_a_key_the_api_is_disabled() {
    let server = spawn(&[], &[("FIREBRAND_JWT_SECRET", SECRET)]).await;
    let (status, body) = http(server.port, "GET", "/api/info", None, None).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("FIREBRAND_API_KEY")
    );
    // The key from the environment enables it.
    let server = spawn(
        &[],
        &[("FIREBRAND_JWT_SECRET", SECRET), ("FIREBRAND_API_KEY", KEY)],
    )
    .await;
    assert_eq!(get(&server, "/api/info").await.0, 200);
}
