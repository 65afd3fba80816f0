//! Namespaces: who may join, what happens to pushes, presence, unmatched topics.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-not-for-production-0123456789";

const CONFIG: &str = r#"
[auth]
jwt_hs256_secret = "test-secret-not-for-production-0123456789"

[[namespace]]
prefix = "room:"
pushes = "broadcast"
presence = true

[[namespace]]
prefix = "room:quiet:"

[[namespace]]
prefix = "user:"
join = "user"

[[namespace]]
prefix = "doc:"
join = "token"
"#;

fn token(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn server(name: &str) -> Server {
    let dir = temp_dir(name);
    let path = dir.join("firebrand.toml");
    std::fs::write(&path, CONFIG).unwrap();
    spawn(&["--config", path.to_str().unwrap()], &[]).await
}

async fn user(server: &Server, sub: &str) -> Client {
    let claims = json!({"sub": sub, "exp": now() + 300, "info": {"name": sub.to_uppercase()}});
    let url = format!("{}&token={}", server.url(), token(&claims, SECRET));
    connect(&url, None).await.open()
}

fn refused(reason: &str) -> (String, Value) {
    ("error".into(), json!({ "reason": reason }))
}

#[tokio::test]
async fn user_topics_are_for_their_user_only() {
    let server = server("user").await;
    let mut alice = user(&server, "alice").await;
    assert_eq!(
        alice.join("user:alice").await,
        ("ok".into(), json!({"user": "alice"}))
    );
    assert_eq!(alice.join("user:bob").await, refused("unauthorized"));
    assert_eq!(alice.join("user:alice2").await, refused("unauthorized"));
}

#[tokio::test]
async fn token_topics_need_a_join_token_for_the_topic() {
    let server = server("token").await;
    let mut alice = user(&server, "alice").await;
    let exp = now() + 300;
    let good = token(&json!({"topic": "doc:1", "exp": exp}), SECRET);
    assert_eq!(
        alice.join_with("doc:1", json!({"token": good})).await,
        ("ok".into(), json!({"user": "alice"}))
    );
    let list = token(&json!({"topics": ["doc:9", "doc:2"], "exp": exp}), SECRET);
    assert_eq!(
        alice.join_with("doc:2", json!({"token": list})).await.0,
        "ok"
    );
    let own = token(
        &json!({"topic": "doc:3", "sub": "alice", "exp": exp}),
        SECRET,
    );
    assert_eq!(
        alice.join_with("doc:3", json!({"token": own})).await.0,
        "ok"
    );

    for (name, bad) in [
        (
            "wrong key",
            token(&json!({"topic": "doc:4", "exp": exp}), "other"),
        ),
        (
            "expired",
            token(&json!({"topic": "doc:4", "exp": now() - 3600}), SECRET),
        ),
        (
            "other topic",
            token(&json!({"topic": "doc:5", "exp": exp}), SECRET),
        ),
        (
            "other user",
            token(&json!({"topic": "doc:4", "sub": "bob", "exp": exp}), SECRET),
        ),
        ("garbage", "garbage".to_owned()),
    ] {
        assert_eq!(
            alice.join_with("doc:4", json!({"token": bad})).await,
            refused("unauthorized"),
            "{name}"
        );
    }
    assert_eq!(alice.join("doc:4").await, refused("unauthorized"));
}

#[tokio::test]
async fn pushes_are_broadcast_to_the_others_or_rejected() {
    let server = server("pushes").await;
    let mut alice = user(&server, "alice").await;
    let mut bob = user(&server, "bob").await;
    // Each client's first join has join ref "1".
    alice.join("room:1").await;
    bob.join("room:1").await;
    let r = alice
        .send(Some("1"), "room:1", "new_msg", json!({"body": "hi"}))
        .await;
    assert_eq!(alice.reply(&r).await, ("ok".into(), json!({})));
    assert_eq!(
        bob.recv_event("new_msg").await,
        json!([null, null, "room:1", "new_msg", {"body": "hi"}])
    );
    // Alice never gets her own message back: bob's next push, which the topic delivers
    // after anything her push queued, comes first.
    let r = bob.send(Some("1"), "room:1", "fence", json!({})).await;
    assert_eq!(bob.reply(&r).await, ("ok".into(), json!({})));
    loop {
        let frame = alice.recv().await;
        assert_ne!(frame[3], "new_msg", "{frame}");
        if frame[3] == "fence" {
            break;
        }
    }
    // The longest prefix wins: room:quiet: rejects pushes.
    let mut carol = user(&server, "carol").await;
    carol.join("room:quiet:1").await;
    let r = carol
        .send(Some("1"), "room:quiet:1", "new_msg", json!({}))
        .await;
    assert_eq!(carol.reply(&r).await, refused("pushes are not allowed"));
}

#[tokio::test]
async fn presence_is_tracked_on_presence_namespaces_only() {
    let server = server("presence").await;
    let mut alice = user(&server, "alice").await;
    alice.join("room:1").await;
    let state = alice.recv_event("presence_state").await;
    let metas = &state[4]["alice"]["metas"];
    assert_eq!(metas[0]["user"], "alice", "{state}");
    assert_eq!(metas[0]["info"], json!({"name": "ALICE"}), "{state}");

    let mut bob = user(&server, "bob").await;
    bob.join("room:1").await;
    let state = bob.recv_event("presence_state").await;
    assert!(state[4]["alice"].is_object() && state[4]["bob"].is_object());
    let diff = alice.recv_event("presence_diff").await;
    assert!(diff[4]["joins"]["bob"].is_object(), "{diff}");

    // No presence on room:quiet: nor user:.
    let mut carol = user(&server, "carol").await;
    carol.join("room:quiet:1").await;
    carol.join("user:carol").await;
    // A join's presence_state comes before its channel handles anything else: replies to a
    // push on each topic after the joins are carol's next frames.
    let pushed = [
        carol
            .send(Some("1"), "room:quiet:1", "new_msg", json!({}))
            .await,
        carol
            .send(Some("2"), "user:carol", "new_msg", json!({}))
            .await,
    ];
    for _ in 0..pushed.len() {
        let frame = carol.recv().await;
        assert_eq!(frame[3], "phx_reply", "{frame}");
        assert!(pushed.iter().any(|r| frame[1] == json!(r)), "{frame}");
    }
}

#[tokio::test]
async fn a_topic_in_no_namespace_is_refused() {
    let server = server("unmatched").await;
    let mut alice = user(&server, "alice").await;
    assert_eq!(alice.join("other:1").await, refused("unmatched topic"));
    assert_eq!(alice.join("room").await, refused("unmatched topic"));
}
