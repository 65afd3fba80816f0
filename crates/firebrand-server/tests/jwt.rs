//! JWT authentication: HS256 with a shared secret, RS256 and ES256 with a public key file.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-not-for-production-0123456789";

fn hs256(claims: &Value, secret: &str) -> String {
    sign(
        Algorithm::HS256,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
}

fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
    encode(&Header::new(alg), claims, key).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 300, "info": {"name": "Alice"}})
}

fn with_token(server: &Server, token: &str) -> String {
    format!("{}&token={token}", server.url())
}

#[tokio::test]
async fn hs256_token_in_params_or_auth_token_is_accepted() {
    let server = spawn(&[], &[("FIREBRAND_JWT_SECRET", SECRET)]).await;
    assert!(!server.banner.join("\n").contains("anyone may connect"));
    let token = hs256(&claims("alice"), SECRET);
    let mut client = connect(&with_token(&server, &token), None).await.open();
    assert_eq!(
        client.join("room:a").await,
        ("ok".into(), json!({"user": "alice"}))
    );

    let token = hs256(&claims("bob"), SECRET);
    let mut client = connect(&server.url(), Some(&token)).await.open();
    assert_eq!(
        client.join("room:b").await,
        ("ok".into(), json!({"user": "bob"}))
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_with_403() {
    let server = spawn(&[], &[("FIREBRAND_JWT_SECRET", SECRET)]).await;
    let expired = hs256(&json!({"sub": "alice", "exp": now() - 3600}), SECRET);
    let wrong_secret = hs256(&claims("alice"), "another-secret");
    let no_sub = hs256(&json!({"exp": now() + 300}), SECRET);
    let no_exp = hs256(&json!({"sub": "alice"}), SECRET);
    let hs512 = sign(
        Algorithm::HS512,
        &claims("alice"),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    );
    let none = unsigned(&claims("alice"));
    for (name, token) in [
        ("expired", expired),
        ("wrong secret", wrong_secret),
        ("no sub", no_sub),
        ("no exp", no_exp),
        ("HS512", hs512),
        ("alg none", none),
        ("garbage", "garbage".to_owned()),
    ] {
        let status = connect(&with_token(&server, &token), None).await;
        assert!(matches!(status, Connect::Refused(403)), "{name}");
        let status = connect(&server.url(), Some(&token)).await;
        assert!(
            matches!(status, Connect::Refused(403)),
            "{name} as authToken"
        );
    }
    // No token: refused, as a secret is configured (allow_anonymous defaults to false).
    assert_eq!(connect(&server.url(), None).await.refused(), 403);
}

#[tokio::test]
async fn a_join_token_is_not_a_connection_token() {
    let server = spawn(&[], &[("FIREBRAND_JWT_SECRET", SECRET)]).await;
    let exp = now() + 300;
    for claims in [
        json!({"sub": "alice", "exp": exp, "topic": "doc:1"}),
        json!({"sub": "alice", "exp": exp, "topics": ["doc:1"]}),
        json!({"sub": "alice", "exp": exp, "topics": []}),
        json!({"sub": "alice", "exp": exp, "topic": null}),
    ] {
        let token = hs256(&claims, SECRET);
        let status = connect(&with_token(&server, &token), None).await;
        assert!(matches!(status, Connect::Refused(403)), "{claims}");
        let status = connect(&server.url(), Some(&token)).await;
        assert!(matches!(status, Connect::Refused(403)), "{claims}");
    }
    let token = hs256(&claims("alice"), SECRET);
    connect(&with_token(&server, &token), None).await.open();
}

#[tokio::test]
async fn anonymous_connections_can_be_allowed_beside_tokens() {
    let server = spawn(
        &[],
        &[
            ("FIREBRAND_JWT_SECRET", SECRET),
            ("FIREBRAND_ALLOW_ANONYMOUS", "true"),
        ],
    )
    .await;
    let mut anonymous = connect(&server.url(), None).await.open();
    assert_eq!(anonymous.join("room:a").await, ("ok".into(), json!({})));
    // A bad token is still refused: it does not fall back to anonymous.
    let wrong = hs256(&claims("alice"), "another-secret");
    assert_eq!(
        connect(&with_token(&server, &wrong), None).await.refused(),
        403
    );
}

/// An `alg: none` token (which `jsonwebtoken` refuses to make).
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

/// A config file naming a public key file (relative to the config), and the private key.
fn key_pair_config(name: &str, alg: &str) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let dir = temp_dir(name);
    match alg {
        "RS256" => openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "private.pem",
            ],
        ),
        _ => openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "private.pem",
            ],
        ),
    }
    openssl(
        &dir,
        &[
            "pkey",
            "-in",
            "private.pem",
            "-pubout",
            "-out",
            "public.pem",
        ],
    );
    let config = dir.join("firebrand.toml");
    std::fs::write(
        &config,
        format!("[auth]\njwt_public_key_file = \"public.pem\"\njwt_algorithm = \"{alg}\"\n"),
    )
    .unwrap();
    let private = std::fs::read(dir.join("private.pem")).unwrap();
    let public = std::fs::read(dir.join("public.pem")).unwrap();
    (config, private, public)
}

#[tokio::test]
async fn rs256_with_a_public_key_file() {
    let (config, private, public) = key_pair_config("rs256", "RS256");
    let server = spawn(&["--config", config.to_str().unwrap()], &[]).await;
    let key = EncodingKey::from_rsa_pem(&private).unwrap();
    let token = sign(Algorithm::RS256, &claims("carol"), &key);
    let mut client = connect(&with_token(&server, &token), None).await.open();
    assert_eq!(
        client.join("room:a").await,
        ("ok".into(), json!({"user": "carol"}))
    );

    let expired = sign(
        Algorithm::RS256,
        &json!({"sub": "carol", "exp": now() - 3600}),
        &key,
    );
    assert_eq!(
        connect(&with_token(&server, &expired), None)
            .await
            .refused(),
        403
    );
    // Key confusion: HS256 "signed" with the public key as the secret.
    let confused = hs256(&claims("mallory"), std::str::from_utf8(&public).unwrap());
    assert_eq!(
        connect(&with_token(&server, &confused), None)
            .await
            .refused(),
        403
    );
    assert_eq!(
        connect(&with_token(&server, &unsigned(&claims("m"))), None)
            .await
            .refused(),
        403
    );
    // RS512 with the right key: not the configured algorithm.
    let rs512 = sign(Algorithm::RS512, &claims("carol"), &key);
    assert_eq!(
        connect(&with_token(&server, &rs512), None).await.refused(),
        403
    );
}

#[tokio::test]
async fn es256_with_a_public_key_file() {
    let (config, private, _) = key_pair_config("es256", "ES256");
    let server = spawn(&["--config", config.to_str().unwrap()], &[]).await;
    let key = EncodingKey::from_ec_pem(&private).unwrap();
    let token = sign(Algorithm::ES256, &claims("dave"), &key);
    let mut client = connect(&server.url(), Some(&token)).await.open();
    assert_eq!(
        client.join("room:a").await,
        ("ok".into(), json!({"user": "dave"}))
    );
    let other = key_pair_config("es256-other", "ES256").1;
    let forged = sign(
        Algorithm::ES256,
        &claims("dave"),
        &EncodingKey::from_ec_pem(&other).unwrap(),
    );
    assert_eq!(connect(&server.url(), Some(&forged)).await.refused(), 403);
}
