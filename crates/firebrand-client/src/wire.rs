//! What goes on the wire: the connection URL, the auth-token subprotocol, client frames.

use base64::Engine as _;
use firebrand_protocol::{EncodeError, Encoded, Outbound, Payload, Serializer};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::error::PushError;

/// `endpoint + "/websocket?" + params + "&vsn=2.0.0"`, as phoenix.js builds it.
pub(crate) fn websocket_url(endpoint: &str, params: &[(String, String)]) -> String {
    let mut url = endpoint.trim_end_matches('/').to_owned();
    url.push_str("/websocket?");
    for (k, v) in params {
        url.push_str(&encode_uri_component(k));
        url.push('=');
        url.push_str(&encode_uri_component(v));
        url.push('&');
    }
    url.push_str("vsn=2.0.0");
    url
}

/// JavaScript's `encodeURIComponent`: everything but `A-Z a-z 0-9 - _ . ! ~ * ' ( )` is
/// percent-encoded as UTF-8.
pub(crate) fn encode_uri_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => out.push(b as char),
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The `Sec-WebSocket-Protocol` value carrying an auth token, as phoenix.js sends it:
/// `phoenix, base64url.bearer.phx.<token in standard base64 without padding>` (phoenix.js uses
/// `btoa`, the standard alphabet, despite the prefix's name).
pub(crate) fn auth_protocols(token: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(token);
    format!("phoenix, base64url.bearer.phx.{b64}")
}

/// A client frame: V2 JSON text, or a V2 binary push (kind 0) for a binary payload.
pub(crate) fn encode(
    join_ref: Option<&str>,
    r#ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Payload,
) -> Result<WsMessage, PushError> {
    let out = Outbound::Event {
        join_ref,
        r#ref,
        topic,
        event,
        payload,
    };
    match Serializer::V2.encode_client(&out) {
        Ok(Encoded::Text(t)) => Ok(WsMessage::text(t)),
        Ok(Encoded::Binary(b)) => Ok(WsMessage::binary(b)),
        Err(EncodeError::FieldTooLong(field, len)) => Err(PushError::FieldTooLong { field, len }),
        Err(e) => unreachable!("a V2 client event frame encodes unless a field is too long: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_is_built_like_phoenix_js() {
        let params = vec![
            ("user".to_owned(), "al ice".to_owned()),
            ("a[b]".to_owned(), "é&=".to_owned()),
        ];
        assert_eq!(
            websocket_url("ws://h:4000/socket/", &params),
            "ws://h:4000/socket/websocket?user=al%20ice&a%5Bb%5D=%C3%A9%26%3D&vsn=2.0.0"
        );
        assert_eq!(
            websocket_url("ws://h/socket", &[]),
            "ws://h/socket/websocket?vsn=2.0.0"
        );
    }

    #[test]
    fn auth_token_uses_btoa_without_padding() {
        // btoa("secret?>") === "c2VjcmV0Pz4=" : standard alphabet, padding stripped.
        assert_eq!(
            auth_protocols("secret?>"),
            "phoenix, base64url.bearer.phx.c2VjcmV0Pz4"
        );
    }

    #[test]
    fn frames_match_protocol_md() {
        let m = encode(
            Some("12"),
            Some("123"),
            "topic",
            "event",
            &Payload::binary(&b"efg"[..]),
        )
        .unwrap();
        assert_eq!(
            m.into_data().as_ref(),
            b"\x00\x02\x03\x05\x0512123topiceventefg"
        );
        let m = encode(None, Some("5"), "phoenix", "heartbeat", &Payload::empty()).unwrap();
        assert_eq!(
            m.into_text().unwrap().as_str(),
            r#"[null,"5","phoenix","heartbeat",{}]"#
        );
        let long = "e".repeat(256);
        let err = encode(Some("1"), Some("2"), "t", &long, &Payload::binary(vec![1])).unwrap_err();
        assert!(matches!(
            err,
            PushError::FieldTooLong {
                field: "event",
                len: 256
            }
        ));
    }
}
