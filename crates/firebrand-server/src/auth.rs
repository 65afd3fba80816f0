//! JWT authentication of connections.
//!
//! A client sends a token with phoenix.js's `authToken` option or as the connect param `token`
//! (`new Socket(url, {params: {token}})`); `authToken` is read first. The token must:
//!
//! - be signed with the one configured algorithm: HS256 with the shared secret, or RS256 or
//!   ES256 with the configured public key (`alg: none`, and any other algorithm, is refused);
//! - carry `exp` (not passed, with 60 s of leeway for clock skew) and a non-empty string `sub`,
//!   which becomes the user id;
//! - carry neither `topic` nor `topics`: those make a join token (see
//!   [`Verifier::verify_join`]), which is never accepted as a connection token;
//! - carry the configured `aud` and `iss`, if those are configured (a token with an `aud` is
//!   refused when no audience is configured).
//!
//! The optional `info` claim (any JSON) is handed to the channels with the user id. A refused
//! token refuses the connection with HTTP 403, as Phoenix refuses a connect; it never falls
//! back to an anonymous connection. A connection without a token is accepted (anonymous) only
//! when `allow_anonymous` is on. In development mode (no key configured) tokens are not read.
//!
//! **What `exp` does.** A connection token's `exp` is checked once, when the connection is made
//! (the WebSocket handshake, or the long-poll session's first request); a join token's, at each
//! join it is sent with. An open connection is not closed when its token expires, and its
//! channels stay joined: to end a user's access, call `POST /api/disconnect`. A client that
//! reconnects (phoenix.js does after a network error) is checked again, with the params it
//! sends then: give phoenix.js's `params` as a function (`params: () => ({token:
//! currentToken()})`) so that a reconnect carries a fresh token, not the expired one.

use std::fmt;
use std::str::FromStr;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

/// The algorithm of a public key: `"RS256"` or `"ES256"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
}

impl FromStr for KeyAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "RS256" => Ok(KeyAlgorithm::RS256),
            "ES256" => Ok(KeyAlgorithm::ES256),
            _ => Err(format!("{s:?}: \"RS256\" or \"ES256\" expected")),
        }
    }
}

/// The user a connection authenticated as: the channels' assigns.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct User {
    /// The token's `sub`; `None` for an anonymous connection.
    pub id: Option<String>,
    /// The token's `info` claim (`null` when absent or anonymous).
    pub info: Value,
}

impl User {
    /// An anonymous connection's user.
    pub fn anonymous() -> Self {
        User {
            id: None,
            info: Value::Null,
        }
    }
}

/// Checks tokens against the configured key.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused.
#[derive(Debug)]
pub struct AuthError(Refusal);

#[derive(Debug)]
enum Refusal {
    Jwt(jsonwebtoken::errors::Error),
    /// A connection token with a `topic` or `topics` claim: a join token.
    JoinToken,
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        AuthError(Refusal::Jwt(e))
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Refusal::Jwt(e) => write!(f, "token refused: {e}"),
            Refusal::JoinToken => f.write_str(
                "token refused: a join token (with a topic or topics claim) is not a connection token",
            ),
        }
    }
}

impl std::error::Error for AuthError {}

/// A key that cannot be used.
#[derive(Debug)]
pub struct KeyError(jsonwebtoken::errors::Error);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unusable key: {}", self.0)
    }
}

impl std::error::Error for KeyError {}

/// A join token's claims: the topic (or topics) it lets its holder join, and optionally the
/// user it was issued to.
#[derive(Deserialize)]
struct JoinClaims {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    sub: Option<String>,
}

/// Why a join token was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum JoinTokenError {
    /// Not a valid token (signature, algorithm, `exp`, `aud`, `iss`).
    Invalid(AuthError),
    /// Valid, but for other topics.
    OtherTopic,
    /// Valid, but issued to another user (its `sub`).
    OtherUser,
}

impl fmt::Display for JoinTokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinTokenError::Invalid(e) => e.fmt(f),
            JoinTokenError::OtherTopic => f.write_str("join token for another topic"),
            JoinTokenError::OtherUser => f.write_str("join token for another user"),
        }
    }
}

impl std::error::Error for JoinTokenError {}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    info: Value,
    /// Join tokens' claims: a connection token must carry neither.
    #[serde(default)]
    topic: Present,
    #[serde(default)]
    topics: Present,
}

/// Whether a claim is there, whatever its value (`null` included).
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Present(true))
    }
}

impl Verifier {
    /// HS256 with a shared secret (not empty).
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        let key = DecodingKey::from_secret(secret).map_err(KeyError)?;
        Ok(Verifier::new(key, Algorithm::HS256))
    }

    /// RS256 or ES256 with a PEM public key.
    pub fn public_key(algorithm: KeyAlgorithm, pem: &[u8]) -> Result<Self, KeyError> {
        let (key, algorithm) = match algorithm {
            KeyAlgorithm::RS256 => (DecodingKey::from_rsa_pem(pem), Algorithm::RS256),
            KeyAlgorithm::ES256 => (DecodingKey::from_ec_pem(pem), Algorithm::ES256),
        };
        Ok(Verifier::new(key.map_err(KeyError)?, algorithm))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        // Only the configured algorithm; `exp` and `sub` required (`exp` checked, 60 s leeway).
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier { key, validation }
    }

    /// The one algorithm tokens must be signed with.
    pub fn algorithm(&self) -> &'static str {
        match self.validation.algorithms.first() {
            Some(Algorithm::RS256) => "RS256",
            Some(Algorithm::ES256) => "ES256",
            _ => "HS256",
        }
    }

    /// Requires this `aud` (with `None`, a token carrying an `aud` is refused).
    pub fn audience(mut self, audience: Option<String>) -> Self {
        if let Some(aud) = audience {
            self.validation.set_audience(&[aud]);
            self.validation.required_spec_claims.insert("aud".into());
        }
        self
    }

    /// Requires this `iss`.
    pub fn issuer(mut self, issuer: Option<String>) -> Self {
        if let Some(iss) = issuer {
            self.validation.set_issuer(&[iss]);
            self.validation.required_spec_claims.insert("iss".into());
        }
        self
    }

    /// The user `token` authenticates, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<User, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        if data.claims.sub.is_empty() {
            return Err(jsonwebtoken::errors::Error::from(
                jsonwebtoken::errors::ErrorKind::InvalidSubject,
            )
            .into());
        }
        if data.claims.topic.0 || data.claims.topics.0 {
            return Err(AuthError(Refusal::JoinToken));
        }
        Ok(User {
            id: Some(data.claims.sub),
            info: data.claims.info,
        })
    }

    /// Checks a per-topic join token: signed like connection tokens (same key, algorithm,
    /// `aud` and `iss`), with `exp`, and a `topic` claim equal to `topic` or a `topics` list
    /// holding it. A `sub`, if the token has one, must be `user`'s id.
    pub fn verify_join(&self, token: &str, topic: &str, user: &User) -> Result<(), JoinTokenError> {
        let mut validation = self.validation.clone();
        validation.required_spec_claims.remove("sub");
        let data = jsonwebtoken::decode::<JoinClaims>(token, &self.key, &validation)
            .map_err(|e| JoinTokenError::Invalid(e.into()))?;
        let claims = data.claims;
        if claims.topic.as_deref() != Some(topic) && !claims.topics.iter().any(|t| t == topic) {
            return Err(JoinTokenError::OtherTopic);
        }
        match claims.sub {
            Some(sub) if user.id.as_deref() != Some(&*sub) => Err(JoinTokenError::OtherUser),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn accepts_a_valid_token_with_info() {
        let v = Verifier::hs256(b"s3cret").unwrap();
        let t = hs(
            json!({"sub": "alice", "exp": now() + 60, "info": {"role": "admin"}}),
            "s3cret",
        );
        let user = v.verify(&t).unwrap();
        assert_eq!(user.id.as_deref(), Some("alice"));
        assert_eq!(user.info, json!({"role": "admin"}));
    }

    #[test]
    fn refuses_missing_sub_exp_and_bad_tokens() {
        let v = Verifier::hs256(b"s3cret").unwrap();
        for claims in [
            json!({"exp": now() + 60}),
            json!({"sub": "alice"}),
            json!({"sub": "", "exp": now() + 60}),
            json!({"sub": 7, "exp": now() + 60}),
            json!({"sub": "alice", "exp": now() - 3600}),
            json!({"sub": "alice", "exp": now() + 60, "aud": "other"}),
        ] {
            assert!(v.verify(&hs(claims.clone(), "s3cret")).is_err(), "{claims}");
        }
        assert!(v.verify("not a token").is_err());
        let wrong = hs(json!({"sub": "a", "exp": now() + 60}), "other");
        assert!(v.verify(&wrong).is_err());
    }

    #[test]
    fn a_join_token_is_not_a_connection_token() {
        let v = Verifier::hs256(b"s3cret").unwrap();
        for claims in [
            json!({"sub": "alice", "exp": now() + 60, "topic": "doc:1"}),
            json!({"sub": "alice", "exp": now() + 60, "topics": ["doc:1"]}),
            json!({"sub": "alice", "exp": now() + 60, "topic": null}),
        ] {
            let e = v.verify(&hs(claims.clone(), "s3cret")).unwrap_err();
            assert!(e.to_string().contains("join token"), "{claims}: {e}");
        }
    }

    #[test]
    fn refuses_other_algorithms() {
        let v = Verifier::hs256(b"s3cret").unwrap();
        let claims = json!({"sub": "alice", "exp": now() + 60});
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(b"s3cret").unwrap(),
        )
        .unwrap();
        assert!(v.verify(&hs384).is_err());
        assert!(v.verify(&unsigned(&claims)).is_err());
    }

    /// An `alg: none` token (which `jsonwebtoken` cannot make).
    fn unsigned(claims: &Value) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(claims.to_string())
        )
    }

    #[test]
    fn join_tokens_name_their_topics_and_maybe_their_user() {
        let v = Verifier::hs256(b"k").unwrap();
        let alice = User {
            id: Some("alice".into()),
            info: Value::Null,
        };
        let ok = |claims: Value| v.verify_join(&hs(claims, "k"), "doc:1", &alice);
        assert!(ok(json!({"topic": "doc:1", "exp": now() + 60})).is_ok());
        assert!(ok(json!({"topics": ["doc:2", "doc:1"], "exp": now() + 60})).is_ok());
        assert!(ok(json!({"topic": "doc:1", "sub": "alice", "exp": now() + 60})).is_ok());
        assert!(matches!(
            ok(json!({"topic": "doc:2", "exp": now() + 60})),
            Err(JoinTokenError::OtherTopic)
        ));
        assert!(matches!(
            ok(json!({"topic": "doc:1", "sub": "bob", "exp": now() + 60})),
            Err(JoinTokenError::OtherUser)
        ));
        assert!(matches!(
            ok(json!({"topic": "doc:1", "exp": now() - 3600})),
            Err(JoinTokenError::Invalid(_))
        ));
        assert!(matches!(
            ok(json!({"topic": "doc:1"})),
            Err(JoinTokenError::Invalid(_))
        ));
        let forged = hs(json!({"topic": "doc:1", "exp": now() + 60}), "other");
        assert!(v.verify_join(&forged, "doc:1", &alice).is_err());
    }

    #[test]
    fn audience_and_issuer() {
        let v = Verifier::hs256(b"k")
            .unwrap()
            .audience(Some("app".into()))
            .issuer(Some("me".into()));
        let ok = json!({"sub": "a", "exp": now() + 60, "aud": "app", "iss": "me"});
        assert!(v.verify(&hs(ok, "k")).is_ok());
        let no_aud = json!({"sub": "a", "exp": now() + 60, "iss": "me"});
        assert!(v.verify(&hs(no_aud, "k")).is_err());
        let bad_iss = json!({"sub": "a", "exp": now() + 60, "aud": "app", "iss": "you"});
        assert!(v.verify(&hs(bad_iss, "k")).is_err());
    }
}
