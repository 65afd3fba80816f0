//! Message payloads: raw JSON text or raw bytes, kept as shared [`Bytes`].

use std::fmt;

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

/// The payload of a message: JSON (any JSON value, kept as validated text) or binary data.
///
/// Payloads stay untyped inside firebrand: a payload decoded from a client frame is a slice of
/// the frame's own buffer, and a broadcast payload is encoded once and shared by every
/// subscriber. Decode it with serde where you handle it:
///
/// ```
/// use firebrand_protocol::Payload;
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct NewMsg { body: String }
///
/// let payload = Payload::from(serde_json::json!({"body": "hi"}));
/// let msg: NewMsg = payload.decode().unwrap();
/// assert_eq!(msg.body, "hi");
/// assert_eq!(payload.to_string(), r#"{"body":"hi"}"#);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub enum Payload {
    /// A JSON value, as its text. Always valid JSON.
    Json(RawJson),
    /// Binary data (V2 binary frames; `ArrayBuffer` on the JavaScript side).
    Binary(Bytes),
}

/// Valid JSON text held in shared bytes.
///
/// Construct it with [`RawJson::parse`] (validates) or through [`Payload`]'s constructors.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RawJson(Bytes);

impl RawJson {
    /// Validates `bytes` as one JSON value and wraps it without copying.
    ///
    /// ```
    /// use firebrand_protocol::RawJson;
    /// assert!(RawJson::parse(&b"{\"a\":1}"[..]).is_ok());
    /// assert!(RawJson::parse(&b"{\"a\":"[..]).is_err());
    /// ```
    pub fn parse(bytes: impl Into<Bytes>) -> Result<Self, serde_json::Error> {
        let bytes = bytes.into();
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)?;
        Ok(RawJson(bytes))
    }

    /// Wraps bytes already known to hold one valid JSON value.
    pub(crate) fn trusted(bytes: Bytes) -> Self {
        RawJson(bytes)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        // Only constructed from validated JSON, which is UTF-8; fall back to empty on the impossible.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The JSON text as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a payload could not be decoded into the type a handler asked for.
///
/// Its `Display` text is what a channel sends back in an error reply when a handler uses `?` on
/// [`Payload::decode`]: `{"reason": "<this text>"}`.
#[derive(Debug)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload is binary, and a JSON value was expected.
    Binary,
    /// The JSON does not have the expected shape. `path` names where, when it is not the top
    /// level: `"body"`, `"items[2].name"`.
    Json {
        /// Where in the payload, e.g. `items[2].name`; `None` at the top level.
        path: Option<String>,
        /// What serde_json says is wrong.
        error: serde_json::Error,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Binary => f.write_str("invalid payload: expected JSON, got binary"),
            DecodeError::Json {
                path: Some(path),
                error,
            } => write!(f, "invalid payload: {path}: {error}"),
            DecodeError::Json { path: None, error } => write!(f, "invalid payload: {error}"),
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Binary => None,
            DecodeError::Json { error, .. } => Some(error),
        }
    }
}

impl Payload {
    /// The empty JSON object `{}`, the payload of most control frames.
    pub fn empty() -> Self {
        Payload::Json(RawJson(Bytes::from_static(b"{}")))
    }

    /// Serializes `value` to a JSON payload.
    ///
    /// Fails only where `serde_json` fails (a map with non-string keys, a failing `Serialize`).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        Ok(Payload::Json(RawJson(serde_json::to_vec(value)?.into())))
    }

    /// A binary payload.
    pub fn binary(bytes: impl Into<Bytes>) -> Self {
        Payload::Binary(bytes.into())
    }

    /// Deserializes a JSON payload into `T`. The error names the field that did not decode
    /// (found by decoding a second time, only when the first fails: nothing is tracked on the
    /// way to a success).
    ///
    /// ```
    /// # use firebrand_protocol::Payload;
    /// #[derive(serde::Deserialize, Debug)]
    /// struct Add { a: i64, b: i64 }
    /// let err = Payload::from(serde_json::json!({"a": 1, "b": "two"})).decode::<Add>().unwrap_err();
    /// assert!(err.to_string().starts_with(r#"invalid payload: b: invalid type: string "two", expected i64"#));
    /// ```
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let raw = match self {
            Payload::Json(raw) => raw.as_bytes(),
            Payload::Binary(_) => return Err(DecodeError::Binary),
        };
        serde_json::from_slice(raw).map_err(|error| {
            let mut de = serde_json::Deserializer::from_slice(raw);
            let path = match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) if e.path().iter().next().is_some() => Some(e.path().to_string()),
                _ => None,
            };
            DecodeError::Json { path, error }
        })
    }

    /// The JSON value, or `None` for a binary payload.
    pub fn to_value(&self) -> Option<serde_json::Value> {
        self.decode().ok()
    }

    /// The bytes of a binary payload.
    pub fn as_binary(&self) -> Option<&Bytes> {
        match self {
            Payload::Binary(b) => Some(b),
            Payload::Json(_) => None,
        }
    }

    /// Whether this is a binary payload.
    pub fn is_binary(&self) -> bool {
        matches!(self, Payload::Binary(_))
    }

    /// The payload's size in bytes (JSON text or binary data).
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(raw) => raw.0.len(),
            Payload::Binary(b) => b.len(),
        }
    }

    /// Whether the payload has no bytes (never true of a JSON payload).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<serde_json::Value> for Payload {
    fn from(value: serde_json::Value) -> Self {
        // Serializing a `Value` cannot fail: its map keys are strings.
        Payload::Json(RawJson(value.to_string().into()))
    }
}

impl From<RawJson> for Payload {
    fn from(raw: RawJson) -> Self {
        Payload::Json(raw)
    }
}

impl fmt::Display for Payload {
    /// JSON payloads as their text; binary ones as `<binary N bytes>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Json(raw) => f.write_str(raw.as_str()),
            Payload::Binary(b) => write!(f, "<binary {} bytes>", b.len()),
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_say_what_is_wrong() {
        let p = Payload::from(serde_json::json!({"n": "x"}));
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct N {
            n: u32,
        }
        let err = p.decode::<N>().unwrap_err().to_string();
        assert!(err.starts_with("invalid payload: n: invalid type"), "{err}");
        let err = Payload::binary(vec![1]).decode::<N>().unwrap_err();
        assert!(matches!(err, DecodeError::Binary));
    }

    #[test]
    fn raw_json_rejects_trailing_garbage() {
        assert!(RawJson::parse(&b"{} x"[..]).is_err());
        assert!(RawJson::parse(&b" 12 "[..]).is_ok());
    }
}
