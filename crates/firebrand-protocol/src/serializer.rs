//! The three wire formats and the `vsn` negotiation that picks one.

use std::fmt;

use bytes::{BufMut, Bytes};
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::message::{Message, Outbound, ServerMessage};
use crate::payload::{Payload, RawJson};

/// The serializer of one connection, chosen by the `vsn` query parameter at connect time.
///
/// | `vsn` | serializer | frames |
/// |---|---|---|
/// | absent, or matching `~> 1.0.0` | [`Serializer::V1`] | JSON objects, text only |
/// | matching `~> 2.0.0` | [`Serializer::V2`] | JSON arrays as text; binary payloads as V2 binary frames |
///
/// ```
/// use firebrand_protocol::Serializer;
/// assert_eq!(Serializer::from_vsn(None), Ok(Serializer::V1));
/// assert_eq!(Serializer::from_vsn(Some("2.0.0")), Ok(Serializer::V2));
/// assert!(Serializer::from_vsn(Some("3.0.0")).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Serializer {
    /// V1 JSON: `{"topic","event","payload","ref"}`; never sends `join_ref`; no binary.
    V1,
    /// V2: `[join_ref, ref, topic, event, payload]` JSON text, and V2 binary frames.
    V2,
}

/// The `vsn` query parameter matched no serializer. The HTTP upgrade answers 403.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedVsn(pub String);

impl fmt::Display for UnsupportedVsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unsupported serializer vsn {:?}: expected ~> 1.0.0 or ~> 2.0.0",
            self.0
        )
    }
}

impl std::error::Error for UnsupportedVsn {}

/// A frame as it goes on the wire: WebSocket text or binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Encoded {
    /// A text frame (always UTF-8 JSON).
    Text(String),
    /// A binary frame (V2 binary).
    Binary(Vec<u8>),
}

impl Encoded {
    /// The frame's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Encoded::Text(s) => s.as_bytes(),
            Encoded::Binary(b) => b,
        }
    }
}

/// Why a client frame could not be decoded. The connection is closed with code 1007.
#[derive(Debug)]
#[non_exhaustive]
pub enum FrameError {
    /// The text is not JSON of the serializer's shape.
    Json(serde_json::Error),
    /// A binary frame whose first byte is not `0` (the only kind a client sends).
    UnknownBinaryKind(u8),
    /// A binary frame shorter than its header says.
    Truncated,
    /// A binary frame field that is not UTF-8.
    NotUtf8(&'static str),
    /// A binary frame on a V1 connection.
    BinaryOnV1,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Json(e) => write!(f, "malformed frame: {e}"),
            FrameError::UnknownBinaryKind(k) => write!(f, "unknown binary frame kind {k}"),
            FrameError::Truncated => f.write_str("binary frame shorter than its header"),
            FrameError::NotUtf8(field) => write!(f, "binary frame {field} is not UTF-8"),
            FrameError::BinaryOnV1 => f.write_str("binary frames need vsn=2.0.0"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Why an outbound message cannot be put in this serializer's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// V1 has no binary frames.
    BinaryOnV1,
    /// A V2 binary field is longer than 255 bytes.
    FieldTooLong(&'static str, usize),
    /// A binary event frame with a `ref` (V2 binary pushes carry none).
    BinaryWithRef,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BinaryOnV1 => f.write_str("binary payloads need the V2 serializer"),
            EncodeError::FieldTooLong(field, n) => {
                write!(f, "binary frame {field} is {n} bytes; at most 255")
            }
            EncodeError::BinaryWithRef => f.write_str("binary push frames carry no ref"),
        }
    }
}

impl std::error::Error for EncodeError {}

impl Serializer {
    /// Picks the serializer for a `vsn` query parameter (absent means `1.0.0`), as Phoenix does:
    /// the value must be SemVer and match `~> 1.0.0` or `~> 2.0.0`.
    pub fn from_vsn(vsn: Option<&str>) -> Result<Self, UnsupportedVsn> {
        let Some(raw) = vsn else {
            return Ok(Serializer::V1);
        };
        let err = || UnsupportedVsn(raw.to_owned());
        let v = semver::Version::parse(raw).map_err(|_| err())?;
        if !v.pre.is_empty() || v.minor != 0 {
            return Err(err());
        }
        match v.major {
            1 => Ok(Serializer::V1),
            2 => Ok(Serializer::V2),
            _ => Err(err()),
        }
    }

    /// Decodes a client text frame. Payloads are slices of `text`, not copies.
    pub fn decode_text(self, text: Bytes) -> Result<Message, FrameError> {
        match self {
            Serializer::V1 => decode_v1(text),
            Serializer::V2 => decode_v2_json(text),
        }
        .map_err(FrameError::Json)
    }

    /// Decodes a client binary frame (V2 binary kind 0, "push").
    pub fn decode_binary(self, data: Bytes) -> Result<Message, FrameError> {
        match self {
            Serializer::V1 => Err(FrameError::BinaryOnV1),
            Serializer::V2 => decode_v2_binary(data),
        }
    }

    /// Decodes a frame a server sent, as a client does: text (V1 or V2 JSON) or V2 binary.
    /// A `phx_reply` becomes [`ServerMessage::Reply`].
    pub fn decode_server(self, frame: &Encoded) -> Result<ServerMessage, FrameError> {
        let msg = match (self, frame) {
            (_, Encoded::Text(t)) => self.decode_text(Bytes::copy_from_slice(t.as_bytes()))?,
            (Serializer::V1, Encoded::Binary(_)) => return Err(FrameError::BinaryOnV1),
            (Serializer::V2, Encoded::Binary(b)) => {
                return decode_server_binary(Bytes::copy_from_slice(b));
            }
        };
        if msg.event != "phx_reply" {
            return Ok(ServerMessage::Event(msg));
        }
        #[derive(serde::Deserialize)]
        struct ReplyBody<'a> {
            status: String,
            #[serde(borrow)]
            response: &'a RawValue,
        }
        let Payload::Json(raw) = &msg.payload else {
            return Err(FrameError::Truncated);
        };
        let body: ReplyBody<'_> =
            serde_json::from_slice(raw.as_bytes()).map_err(FrameError::Json)?;
        let response =
            RawJson::parse(body.response.get().as_bytes().to_vec()).map_err(FrameError::Json)?;
        Ok(ServerMessage::Reply {
            join_ref: msg.join_ref,
            r#ref: msg.r#ref,
            topic: msg.topic,
            status: body.status,
            payload: Payload::Json(response),
        })
    }

    /// Encodes a frame as a client sends it: V1 or V2 JSON text, or a V2 binary push (kind 0,
    /// which carries a `ref`) for a binary payload. Replies are server frames: use
    /// [`Serializer::encode`].
    ///
    /// ```
    /// use firebrand_protocol::{Encoded, Outbound, Payload, Serializer};
    /// let data = Payload::binary(&b"efg"[..]);
    /// let push = Outbound::Event { join_ref: Some("12"), r#ref: Some("123"), topic: "topic", event: "event", payload: &data };
    /// assert_eq!(
    ///     Serializer::V2.encode_client(&push).unwrap(),
    ///     Encoded::Binary(b"\x00\x02\x03\x05\x0512123topiceventefg".to_vec()),
    /// );
    /// ```
    pub fn encode_client(self, out: &Outbound<'_>) -> Result<Encoded, EncodeError> {
        match (self, out) {
            (
                Serializer::V2,
                Outbound::Event {
                    join_ref,
                    r#ref,
                    topic,
                    event,
                    payload: Payload::Binary(data),
                },
            ) => {
                let fields = [
                    ("join_ref", join_ref.unwrap_or("")),
                    ("ref", r#ref.unwrap_or("")),
                    ("topic", topic),
                    ("event", event),
                ];
                let mut buf = Vec::with_capacity(
                    5 + fields.iter().map(|(_, f)| f.len()).sum::<usize>() + data.len(),
                );
                buf.push(KIND_PUSH);
                for (name, f) in fields {
                    buf.push(u8_len(name, f)?);
                }
                for (_, f) in fields {
                    buf.put_slice(f.as_bytes());
                }
                buf.put_slice(data);
                Ok(Encoded::Binary(buf))
            }
            _ => self.encode(out),
        }
    }

    /// Encodes a server frame.
    pub fn encode(self, out: &Outbound<'_>) -> Result<Encoded, EncodeError> {
        match (self, out.payload()) {
            (Serializer::V1, Payload::Binary(_)) => Err(EncodeError::BinaryOnV1),
            (Serializer::V1, Payload::Json(p)) => Ok(Encoded::Text(encode_v1(out, p))),
            (Serializer::V2, Payload::Json(p)) => Ok(Encoded::Text(encode_v2_json(out, p))),
            (Serializer::V2, Payload::Binary(b)) => encode_v2_binary(out, b).map(Encoded::Binary),
        }
    }
}

// ---- V1 JSON -------------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct V1In<'a> {
    topic: String,
    event: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(rename = "ref")]
    r#ref: Option<String>,
    join_ref: Option<String>,
}

fn decode_v1(text: Bytes) -> Result<Message, serde_json::Error> {
    let m: V1In<'_> = serde_json::from_slice(&text)?;
    let payload = Payload::Json(RawJson::trusted(text.slice_ref(m.payload.get().as_bytes())));
    Ok(Message {
        join_ref: m.join_ref,
        r#ref: m.r#ref,
        topic: m.topic,
        event: m.event,
        payload,
    })
}

fn encode_v1(out: &Outbound<'_>, payload: &RawJson) -> String {
    // Keys in Phoenix's (alphabetical) order: event, payload, ref, topic. Never a join_ref.
    let mut s = String::with_capacity(text_capacity(out, payload));
    s.push_str("{\"event\":");
    json_str(&mut s, out.event());
    s.push_str(",\"payload\":");
    push_payload(&mut s, out, payload);
    s.push_str(",\"ref\":");
    json_opt(&mut s, out.r#ref());
    s.push_str(",\"topic\":");
    json_str(&mut s, out.topic());
    s.push('}');
    s
}

// ---- V2 JSON -------------------------------------------------------------------------------

struct V2In<'a>(Option<String>, Option<String>, String, String, &'a RawValue);

impl<'de: 'a, 'a> serde::Deserialize<'de> for V2In<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = V2In<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array [join_ref, ref, topic, event, payload]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let missing = |i| de::Error::invalid_length(i, &self);
                let jr = seq.next_element()?.ok_or_else(|| missing(0))?;
                let r = seq.next_element()?.ok_or_else(|| missing(1))?;
                let topic = seq.next_element()?.ok_or_else(|| missing(2))?;
                let event = seq.next_element()?.ok_or_else(|| missing(3))?;
                let payload = seq.next_element()?.ok_or_else(|| missing(4))?;
                // Phoenix takes the first five elements and ignores the rest.
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(V2In(jr, r, topic, event, payload))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

fn decode_v2_json(text: Bytes) -> Result<Message, serde_json::Error> {
    let V2In(join_ref, r#ref, topic, event, raw) = serde_json::from_slice(&text)?;
    let payload = Payload::Json(RawJson::trusted(text.slice_ref(raw.get().as_bytes())));
    Ok(Message {
        join_ref,
        r#ref,
        topic,
        event,
        payload,
    })
}

fn encode_v2_json(out: &Outbound<'_>, payload: &RawJson) -> String {
    let mut s = String::with_capacity(text_capacity(out, payload));
    s.push('[');
    json_opt(&mut s, out.join_ref());
    s.push(',');
    json_opt(&mut s, out.r#ref());
    s.push(',');
    json_str(&mut s, out.topic());
    s.push(',');
    json_str(&mut s, out.event());
    s.push(',');
    push_payload(&mut s, out, payload);
    s.push(']');
    s
}

/// The length of `out` as V1 or V2 JSON when nothing needs escaping: the frame is written
/// without growing its buffer (a reply's growth was 5% of a push → reply round trip).
fn text_capacity(out: &Outbound<'_>, payload: &RawJson) -> usize {
    let reply = match out {
        Outbound::Reply { status, .. } => r#"{"response":,"status":""}"#.len() + status.len(),
        Outbound::Event { .. } => 0,
    };
    let fields = [
        Some(out.topic()),
        Some(out.event()),
        out.join_ref(),
        out.r#ref(),
    ];
    // Quotes, commas, brackets, nulls, and V1's keys: 48 bytes cover either form.
    48 + reply + payload.as_bytes().len() + fields.iter().flatten().map(|f| f.len()).sum::<usize>()
}

/// Writes the payload, wrapped as `{"response":P,"status":S}` for replies (Phoenix's key order).
fn push_payload(s: &mut String, out: &Outbound<'_>, payload: &RawJson) {
    match out {
        Outbound::Reply { status, .. } => {
            s.push_str("{\"response\":");
            s.push_str(payload.as_str());
            s.push_str(",\"status\":");
            json_str(s, status);
            s.push('}');
        }
        Outbound::Event { .. } => s.push_str(payload.as_str()),
    }
}

fn json_opt(s: &mut String, v: Option<&str>) {
    match v {
        Some(v) => json_str(s, v),
        None => s.push_str("null"),
    }
}

/// Appends `v` as a JSON string literal.
///
/// Refs, topics and events rarely need escaping: the common case is one scan and one copy
/// (the byte-by-byte escape loop was 7% of a push → reply round trip's instructions).
fn json_str(s: &mut String, v: &str) {
    s.push('"');
    match v.bytes().position(needs_escape) {
        None => s.push_str(v),
        Some(first) => {
            s.push_str(&v[..first]);
            escape_into(s, &v[first..]);
        }
    }
    s.push('"');
}

/// Whether `b` is escaped in a JSON string: `"`, `\` and control characters.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Appends `v` escaped, without quotes.
fn escape_into(s: &mut String, v: &str) {
    let mut start = 0;
    for (i, b) in v.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        s.push_str(&v[start..i]);
        if esc.is_empty() {
            s.push_str(&format!("\\u{b:04x}"));
        } else {
            s.push_str(esc);
        }
        start = i + 1;
    }
    s.push_str(&v[start..]);
}

// ---- V2 binary -----------------------------------------------------------------------------

const KIND_PUSH: u8 = 0;
const KIND_REPLY: u8 = 1;
const KIND_BROADCAST: u8 = 2;

fn decode_v2_binary(data: Bytes) -> Result<Message, FrameError> {
    let header = data.get(..5).ok_or(FrameError::Truncated)?;
    if header[0] != KIND_PUSH {
        return Err(FrameError::UnknownBinaryKind(header[0]));
    }
    let lens = [header[1], header[2], header[3], header[4]].map(usize::from);
    let mut at = 5;
    let mut field = |len: usize, name: &'static str| -> Result<String, FrameError> {
        let bytes = data.get(at..at + len).ok_or(FrameError::Truncated)?;
        at += len;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::NotUtf8(name))
    };
    let join_ref = field(lens[0], "join_ref")?;
    let r#ref = field(lens[1], "ref")?;
    let topic = field(lens[2], "topic")?;
    let event = field(lens[3], "event")?;
    Ok(Message {
        join_ref: Some(join_ref),
        r#ref: Some(r#ref),
        topic,
        event,
        payload: Payload::Binary(data.slice(at..)),
    })
}

/// Reads a V2 binary frame sent by a server: kinds 0 (push), 1 (reply), 2 (broadcast).
fn decode_server_binary(data: Bytes) -> Result<ServerMessage, FrameError> {
    let kind = *data.first().ok_or(FrameError::Truncated)?;
    let header_len = match kind {
        KIND_PUSH => 4,
        KIND_REPLY => 5,
        KIND_BROADCAST => 3,
        k => return Err(FrameError::UnknownBinaryKind(k)),
    };
    let header = data
        .get(1..header_len)
        .ok_or(FrameError::Truncated)?
        .to_vec();
    let mut at = header_len;
    let mut fields = Vec::with_capacity(4);
    for (len, name) in header.iter().zip(["a", "b", "c", "d"]) {
        let bytes = data
            .get(at..at + usize::from(*len))
            .ok_or(FrameError::Truncated)?;
        at += usize::from(*len);
        fields.push(String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::NotUtf8(name))?);
    }
    let payload = Payload::Binary(data.slice(at..));
    let mut f = fields.into_iter();
    let mut next = || f.next().unwrap_or_default();
    Ok(match kind {
        KIND_PUSH => ServerMessage::Event(Message {
            join_ref: Some(next()),
            r#ref: None,
            topic: next(),
            event: next(),
            payload,
        }),
        KIND_REPLY => ServerMessage::Reply {
            join_ref: Some(next()),
            r#ref: Some(next()),
            topic: next(),
            status: next(),
            payload,
        },
        _ => ServerMessage::Event(Message {
            join_ref: None,
            r#ref: None,
            topic: next(),
            event: next(),
            payload,
        }),
    })
}

fn u8_len(field: &'static str, s: &str) -> Result<u8, EncodeError> {
    u8::try_from(s.len()).map_err(|_| EncodeError::FieldTooLong(field, s.len()))
}

fn encode_v2_binary(out: &Outbound<'_>, data: &Bytes) -> Result<Vec<u8>, EncodeError> {
    let topic = out.topic();
    let mut buf = Vec::with_capacity(5 + 64 + topic.len() + data.len());
    match *out {
        Outbound::Reply {
            join_ref,
            r#ref,
            status,
            ..
        } => {
            let (jr, r) = (join_ref.unwrap_or(""), r#ref.unwrap_or(""));
            buf.put_slice(&[
                KIND_REPLY,
                u8_len("join_ref", jr)?,
                u8_len("ref", r)?,
                u8_len("topic", topic)?,
                u8_len("status", status)?,
            ]);
            for f in [jr, r, topic, status] {
                buf.put_slice(f.as_bytes());
            }
        }
        Outbound::Event {
            join_ref: None,
            r#ref: None,
            event,
            ..
        } => {
            buf.put_slice(&[
                KIND_BROADCAST,
                u8_len("topic", topic)?,
                u8_len("event", event)?,
            ]);
            buf.put_slice(topic.as_bytes());
            buf.put_slice(event.as_bytes());
        }
        Outbound::Event {
            join_ref: Some(jr),
            r#ref: None,
            event,
            ..
        } => {
            buf.put_slice(&[
                KIND_PUSH,
                u8_len("join_ref", jr)?,
                u8_len("topic", topic)?,
                u8_len("event", event)?,
            ]);
            for f in [jr, topic, event] {
                buf.put_slice(f.as_bytes());
            }
        }
        Outbound::Event { r#ref: Some(_), .. } => return Err(EncodeError::BinaryWithRef),
    }
    buf.put_slice(data);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn vsn_negotiation_matches_phoenix() {
        assert_eq!(Serializer::from_vsn(Some("1.0.0")), Ok(Serializer::V1));
        assert_eq!(Serializer::from_vsn(Some("1.0.7")), Ok(Serializer::V1));
        assert_eq!(Serializer::from_vsn(Some("2.0.0")), Ok(Serializer::V2));
        for bad in ["2.1.0", "1.1.0", "3.0.0", "2.0", "abc", "", "2.0.0-rc.1"] {
            assert!(Serializer::from_vsn(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn v2_json_decodes_and_ignores_extra_elements() {
        let m = Serializer::V2
            .decode_text(text(
                r#"["1","2","room:lobby","new_msg",{"body":"hi"},"extra"]"#,
            ))
            .unwrap();
        assert_eq!(m.join_ref.as_deref(), Some("1"));
        assert_eq!(m.r#ref.as_deref(), Some("2"));
        assert_eq!(m.topic, "room:lobby");
        assert_eq!(m.event, "new_msg");
        assert_eq!(m.payload.to_string(), r#"{"body":"hi"}"#);
    }

    #[test]
    fn v2_json_rejects_wrong_shapes() {
        for bad in [
            "not json",
            r#"["1","2","t","e"]"#,
            r#"{"topic":"t"}"#,
            r#"[1,"2","t","e",{}]"#,
            r#"["1","2","t","e",{}"#,
        ] {
            let e = Serializer::V2.decode_text(Bytes::from(bad)).unwrap_err();
            assert!(e.to_string().starts_with("malformed frame"), "{bad}: {e}");
        }
    }

    #[test]
    fn v2_json_reply_and_broadcast_bytes() {
        let p = Payload::from(serde_json::json!({"n":1}));
        let reply = Outbound::Reply {
            join_ref: Some("1"),
            r#ref: Some("2"),
            topic: "room:lobby",
            status: "ok",
            payload: &p,
        };
        assert_eq!(
            Serializer::V2.encode(&reply).unwrap(),
            Encoded::Text(
                r#"["1","2","room:lobby","phx_reply",{"response":{"n":1},"status":"ok"}]"#.into()
            )
        );
        let bc = Outbound::broadcast("room:lobby", "new_msg", &p);
        assert_eq!(
            Serializer::V2.encode(&bc).unwrap(),
            Encoded::Text(r#"[null,null,"room:lobby","new_msg",{"n":1}]"#.into())
        );
    }

    #[test]
    fn v1_frames_match_phoenix() {
        let m = Serializer::V1
            .decode_text(text(
                r#"{"topic":"room:lobby","event":"phx_join","payload":{},"ref":"1"}"#,
            ))
            .unwrap();
        assert_eq!(
            (m.topic.as_str(), m.event.as_str()),
            ("room:lobby", "phx_join")
        );
        assert_eq!(m.join_ref, None);
        let reply = Outbound::Reply {
            join_ref: Some("1"),
            r#ref: Some("1"),
            topic: "room:lobby",
            status: "ok",
            payload: &Payload::empty(),
        };
        assert_eq!(
            Serializer::V1.encode(&reply).unwrap(),
            Encoded::Text(
                r#"{"event":"phx_reply","payload":{"response":{},"status":"ok"},"ref":"1","topic":"room:lobby"}"#
                    .into()
            )
        );
        assert!(
            Serializer::V1
                .decode_text(text(r#"{"topic":"t","event":"e"}"#))
                .is_err()
        );
        assert!(matches!(
            Serializer::V1.encode(&Outbound::broadcast("t", "e", &Payload::binary(vec![1]))),
            Err(EncodeError::BinaryOnV1)
        ));
    }

    #[test]
    fn v2_binary_bytes_match_phoenix() {
        // PROTOCOL.md §1.5 exact bytes.
        let push = b"\x00\x02\x03\x05\x0512123topiceventefg".to_vec();
        let m = Serializer::V2.decode_binary(push.into()).unwrap();
        assert_eq!(m.join_ref.as_deref(), Some("12"));
        assert_eq!(m.r#ref.as_deref(), Some("123"));
        assert_eq!((m.topic.as_str(), m.event.as_str()), ("topic", "event"));
        assert_eq!(m.payload, Payload::binary(&b"efg"[..]));

        let data = Payload::binary(&b"efg"[..]);
        let reply = Outbound::Reply {
            join_ref: Some("12"),
            r#ref: Some("123"),
            topic: "topic",
            status: "ok",
            payload: &data,
        };
        assert_eq!(
            Serializer::V2.encode(&reply).unwrap(),
            Encoded::Binary(b"\x01\x02\x03\x05\x0212123topicokefg".to_vec())
        );
        let bc = Outbound::broadcast("topic", "event", &data);
        assert_eq!(
            Serializer::V2.encode(&bc).unwrap(),
            Encoded::Binary(b"\x02\x05\x05topiceventefg".to_vec())
        );
        let push = Outbound::push("12", "topic", "event", &data);
        assert_eq!(
            Serializer::V2.encode(&push).unwrap(),
            Encoded::Binary(b"\x00\x02\x05\x0512topiceventefg".to_vec())
        );
    }

    #[test]
    fn v2_binary_rejects_bad_frames() {
        let dec = |b: &[u8]| Serializer::V2.decode_binary(Bytes::copy_from_slice(b));
        assert!(matches!(
            dec(b"\x07\x00\x00\x00\x00"),
            Err(FrameError::UnknownBinaryKind(7))
        ));
        assert!(matches!(dec(b"\x00\x01"), Err(FrameError::Truncated)));
        assert!(matches!(
            dec(b"\x00\x09\x00\x00\x00ab"),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            dec(b"\x00\x01\x00\x00\x00\xff"),
            Err(FrameError::NotUtf8(_))
        ));
        assert!(matches!(
            Serializer::V1.decode_binary(Bytes::from_static(b"\x00")),
            Err(FrameError::BinaryOnV1)
        ));
        let long = "t".repeat(256);
        let p = Payload::binary(vec![0u8]);
        assert_eq!(
            Serializer::V2.encode(&Outbound::broadcast(&long, "e", &p)),
            Err(EncodeError::FieldTooLong("topic", 256))
        );
    }

    #[test]
    fn server_frames_decode_as_a_client_reads_them() {
        let data = Payload::binary(&b"efg"[..]);
        let json = Payload::from(serde_json::json!({"a": 1}));
        let frames = [
            Outbound::Reply {
                join_ref: Some("1"),
                r#ref: Some("2"),
                topic: "t",
                status: "ok",
                payload: &json,
            },
            Outbound::Reply {
                join_ref: Some("1"),
                r#ref: Some("2"),
                topic: "t",
                status: "ok",
                payload: &data,
            },
            Outbound::push("1", "t", "e", &data),
            Outbound::broadcast("t", "e", &data),
            Outbound::broadcast("t", "e", &json),
        ];
        for out in frames {
            let decoded = Serializer::V2
                .decode_server(&Serializer::V2.encode(&out).unwrap())
                .unwrap();
            match (out, decoded) {
                (
                    Outbound::Reply {
                        status, payload, ..
                    },
                    ServerMessage::Reply {
                        status: s,
                        payload: p,
                        r#ref,
                        ..
                    },
                ) => {
                    assert_eq!(
                        (status, payload, r#ref.as_deref()),
                        (s.as_str(), &p, Some("2"))
                    );
                }
                (
                    Outbound::Event {
                        join_ref,
                        event,
                        payload,
                        ..
                    },
                    ServerMessage::Event(m),
                ) => {
                    assert_eq!(
                        (join_ref, event, payload),
                        (m.join_ref.as_deref(), m.event.as_str(), &m.payload)
                    );
                }
                (out, got) => panic!("{out:?} decoded as {got:?}"),
            }
        }
    }

    #[test]
    fn text_frames_fit_their_first_allocation() {
        let payload = Payload::from(serde_json::json!({"t": "000001234567890"}));
        let Payload::Json(raw) = &payload else {
            unreachable!()
        };
        let frames = [
            Outbound::Reply {
                join_ref: Some("12"),
                r#ref: Some("345"),
                topic: "room:echo5",
                status: "ok",
                payload: &payload,
            },
            Outbound::broadcast("room:lobby", "new_msg", &payload),
            Outbound::push("7", "room:lobby", "pushed", &payload),
        ];
        for out in &frames {
            for text in [encode_v1(out, raw), encode_v2_json(out, raw)] {
                assert_eq!(text.capacity(), text_capacity(out, raw), "{text}");
            }
        }
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
        // Nothing to escape (one copy), and escapes after a clean prefix.
        for v in ["room:lobby", "", "é ü", "lobby\t", "x\u{1f}", "\\"] {
            let mut s = String::new();
            json_str(&mut s, v);
            assert_eq!(s, serde_json::to_string(v).unwrap());
        }
    }
}
