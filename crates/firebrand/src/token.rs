//! Signed, expiring tokens (Phoenix.Token's equivalent).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Serialize, de::DeserializeOwned};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs data into tokens that your app hands to its clients (for example in the page, for the
/// socket's connect params or `authToken`), and verifies them in
/// [`Socket::connect`](crate::Socket::connect).
///
/// A token is `base64url(json).base64url(hmac-sha256)`: signed, not encrypted — the data is
/// readable by whoever holds the token, so put only an id in it. The signing key is derived
/// from your secret and a salt, so tokens for different purposes cannot be swapped.
///
/// ```
/// use std::time::Duration;
/// use firebrand::TokenSigner;
///
/// let signer = TokenSigner::new(b"a secret of at least 32 bytes, from config!", "user socket");
/// let token = signer.sign(&42u64);
/// let user_id: u64 = signer.verify(&token, Duration::from_secs(86_400)).unwrap();
/// assert_eq!(user_id, 42);
/// assert!(signer.verify::<u64>("forged.token", Duration::from_secs(60)).is_err());
/// ```
#[derive(Clone)]
pub struct TokenSigner {
    key: [u8; 32],
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a token of this signer: malformed, tampered with, or signed with another key or salt.
    Invalid,
    /// Genuine, but older than the allowed age.
    Expired,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Invalid => f.write_str("invalid token"),
            TokenError::Expired => f.write_str("expired token"),
        }
    }
}

impl std::error::Error for TokenError {}

#[derive(Serialize, serde::Deserialize)]
struct Signed<T> {
    /// Signing time, milliseconds since the Unix epoch.
    t: u64,
    d: T,
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl TokenSigner {
    /// A signer keyed by `secret` (keep it secret; 32 random bytes or more) and `salt` (a fixed
    /// string naming what the tokens are for).
    pub fn new(secret: &[u8], salt: &str) -> Self {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key size");
        mac.update(b"firebrand token v1\0");
        mac.update(salt.as_bytes());
        TokenSigner {
            key: mac.finalize().into_bytes().into(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key size")
    }

    /// Signs `data`, stamped with the current time.
    pub fn sign<T: Serialize>(&self, data: &T) -> String {
        self.sign_at(data, now_ms())
    }

    fn sign_at<T: Serialize>(&self, data: &T, t: u64) -> String {
        let body = serde_json::to_vec(&Signed { t, d: data }).unwrap_or_default();
        let body = B64.encode(body);
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{body}.{sig}")
    }

    /// Verifies `token` and returns its data, if it was signed by this signer less than
    /// `max_age` ago.
    pub fn verify<T: DeserializeOwned>(
        &self,
        token: &str,
        max_age: Duration,
    ) -> Result<T, TokenError> {
        let (body, sig) = token.split_once('.').ok_or(TokenError::Invalid)?;
        let sig = B64.decode(sig).map_err(|_| TokenError::Invalid)?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&sig).map_err(|_| TokenError::Invalid)?;
        let json = B64.decode(body).map_err(|_| TokenError::Invalid)?;
        let signed: Signed<T> = serde_json::from_slice(&json).map_err(|_| TokenError::Invalid)?;
        let age = now_ms().saturating_sub(signed.t);
        if u128::from(age) > max_age.as_millis() {
            return Err(TokenError::Expired);
        }
        Ok(signed.d)
    }
}

/// A token as it travels between nodes (a long-poll request forwarded to its session's node):
/// its data in clear and a digest of its signature. Only the signer can turn it back into the
/// token ([`TokenSigner::redeem`]); whoever reads it off the cluster's bus has no bearer token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Proof {
    /// The token's data part (`base64url(json)`), as it is in the token.
    pub(crate) body: String,
    /// SHA-256 of the token's signature part.
    pub(crate) digest: [u8; 32],
}

impl Proof {
    /// The proof of `token` (`None`: not of the token form).
    pub(crate) fn of(token: &str) -> Option<Proof> {
        let (body, sig) = token.split_once('.')?;
        Some(Proof {
            body: body.to_owned(),
            digest: <Sha256 as sha2::Digest>::digest(sig.as_bytes()).into(),
        })
    }
}

impl TokenSigner {
    /// The token `proof` stands for, if this signer signed it (its age is not checked: verify
    /// the token).
    pub(crate) fn redeem(&self, proof: &Proof) -> Option<String> {
        let mut mac = self.mac();
        mac.update(proof.body.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        let digest: [u8; 32] = <Sha256 as sha2::Digest>::digest(sig.as_bytes()).into();
        // In constant time: the digest is of a secret value.
        let diff = digest
            .iter()
            .zip(&proof.digest)
            .fold(0, |acc, (a, b)| acc | (a ^ b));
        (diff == 0).then(|| format!("{}.{sig}", proof.body))
    }
}

/// The data of a token of any signer, **not verified**: for routing only (the long-poll
/// token's node), never for trusting.
pub(crate) fn peek<T: DeserializeOwned>(token: &str) -> Option<T> {
    let (body, _) = token.split_once('.')?;
    let json = B64.decode(body).ok()?;
    serde_json::from_slice::<Signed<T>>(&json).ok().map(|s| s.d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_and_resist_tampering() {
        let s = TokenSigner::new(b"k", "salt");
        let old = s.sign_at(&"u", now_ms() - 10_000);
        assert_eq!(
            s.verify::<String>(&old, Duration::from_secs(5)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            s.verify::<String>(&old, Duration::from_secs(50)).as_deref(),
            Ok("u")
        );
        let other = TokenSigner::new(b"k", "other salt");
        assert_eq!(
            other.verify::<String>(&old, Duration::from_secs(50)),
            Err(TokenError::Invalid)
        );
        let (body, sig) = old.split_once('.').unwrap();
        let forged = format!(
            "{}.{sig}",
            B64.encode(format!("{{\"t\":{},\"d\":\"admin\"}}", now_ms()))
        );
        assert_eq!(
            s.verify::<String>(&forged, Duration::from_secs(50)),
            Err(TokenError::Invalid)
        );
        assert!(
            s.verify::<String>(&format!("{body}.!!"), Duration::from_secs(50))
                .is_err()
        );
    }

    #[test]
    fn a_proof_is_no_token_but_its_signer_recovers_the_token() {
        let s = TokenSigner::new(b"k", "salt");
        let token = s.sign(&(1u64, 2u64));
        let proof = Proof::of(&token).unwrap();
        assert!(!token.ends_with(&B64.encode(proof.digest)));
        assert_eq!(s.redeem(&proof).as_deref(), Some(token.as_str()));
        assert_eq!(TokenSigner::new(b"k", "other").redeem(&proof), None);
        let forged = Proof::of(&format!("{}.AAAA", proof.body)).unwrap();
        assert_eq!(s.redeem(&forged), None);
        assert_eq!(Proof::of("no dot"), None);
    }
}
