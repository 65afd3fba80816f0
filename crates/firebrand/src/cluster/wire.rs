//! The node-to-node format: what one node's message to the others carries ([`Body`]), and its
//! bytes. Versioned by its first byte ([`FORMAT_VERSION`]).

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use firebrand_protocol::{Payload, RawJson};

use crate::node::presence::crdt::{State, WireState};
use crate::node::pubsub::Broadcast;

/// The version of the node-to-node message format written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// Why a node-to-node message could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// Written by a build with another format version.
    UnknownVersion(u8),
    /// Shorter than its header says, or with invalid text.
    Malformed,
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::UnknownVersion(v) => {
                write!(
                    f,
                    "node-to-node format version {v}; this node reads {FORMAT_VERSION}"
                )
            }
            MessageError::Malformed => f.write_str("malformed node-to-node message"),
        }
    }
}

impl std::error::Error for MessageError {}

const KIND_BROADCAST: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_TRANSFER_REQUEST: u8 = 3;
const KIND_TRANSFER: u8 = 4;
const KIND_GOODBYE: u8 = 5;
const KIND_DIRECT: u8 = 6;
const KIND_ANSWER: u8 = 8;
const KIND_DISCONNECT: u8 = 9;
const PAYLOAD_JSON: u8 = 0;
const PAYLOAD_BINARY: u8 = 1;

/// Whether a message kind is one of the cluster's own; every other kind is a request to the
/// service of that id ([`Body::Request`]).
pub(crate) fn is_cluster_kind(kind: u8) -> bool {
    matches!(kind, 1..=6 | KIND_ANSWER | KIND_DISCONNECT)
}

/// What a node-to-node message carries.
pub(crate) enum Body {
    /// A broadcast for this node's subscribers.
    Broadcast(Broadcast),
    /// A broadcast for the subscribers of node `to` only.
    Direct { to: u64, broadcast: Broadcast },
    /// A node is alive: its presence changes of generations `(from, to]` (so that a node that
    /// missed some notices the gap and asks for a transfer).
    Heartbeat { from: u64, to: u64, delta: State },
    /// Asks node `to` for its presence state.
    TransferRequest { to: u64 },
    /// Node's presence state as of generation `generation` (at least), for node `to`.
    Transfer {
        to: u64,
        generation: u64,
        state: State,
    },
    /// The node is shutting down: forget its presences now.
    Goodbye,
    /// A request `id` for service `service` of node `to` (a feature's own bytes: long-poll
    /// forwarding, …). Its kind byte is the service id.
    Request {
        to: u64,
        id: u64,
        service: u8,
        body: Bytes,
    },
    /// Node `to`'s request `id`, answered.
    Answer { to: u64, id: u64, body: Bytes },
    /// Close the connections of this socket id (not a topic: see `Hub::disconnect_local`).
    Disconnect(String),
}

pub(crate) struct NodeMessage {
    pub(crate) node: u64,
    pub(crate) body: Body,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct PresenceBody {
    #[serde(default)]
    from: u64,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    to: u64,
    #[serde(default)]
    state: WireState,
}

/// `version, kind, node u64`, then for broadcasts `topic (u16 len), event (u16 len), payload
/// kind, payload`, for presence messages a JSON body, and for requests and answers `to u64,
/// id u64`, then the service's bytes.
pub(crate) fn encode(node: u64, body: &Body) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u8(FORMAT_VERSION);
    let presence = |kind, p: PresenceBody| (kind, Some(p));
    let (kind, json) = match body {
        Body::Broadcast(_) => (KIND_BROADCAST, None),
        Body::Direct { .. } => (KIND_DIRECT, None),
        Body::Request {
            to,
            id,
            service,
            body,
        } => {
            return request_bytes(&mut buf, *service, node, *to, *id, body);
        }
        Body::Answer { to, id, body } => {
            return request_bytes(&mut buf, KIND_ANSWER, node, *to, *id, body);
        }
        Body::Disconnect(id) => {
            buf.put_u8(KIND_DISCONNECT);
            buf.put_u64(node);
            buf.put_slice(id.as_bytes());
            return buf.freeze();
        }
        Body::Heartbeat { from, to, delta } => presence(
            KIND_HEARTBEAT,
            PresenceBody {
                from: *from,
                generation: *to,
                state: delta.to_wire(),
                ..Default::default()
            },
        ),
        Body::TransferRequest { to } => presence(
            KIND_TRANSFER_REQUEST,
            PresenceBody {
                to: *to,
                ..Default::default()
            },
        ),
        Body::Transfer {
            to,
            generation,
            state,
        } => presence(
            KIND_TRANSFER,
            PresenceBody {
                to: *to,
                generation: *generation,
                state: state.to_wire(),
                ..Default::default()
            },
        ),
        Body::Goodbye => presence(KIND_GOODBYE, PresenceBody::default()),
    };
    buf.put_u8(kind);
    buf.put_u64(node);
    if let Some(json) = json {
        // Serializing plain data with string keys cannot fail.
        buf.put_slice(&serde_json::to_vec(&json).unwrap_or_default());
        return buf.freeze();
    }
    let b = match body {
        Body::Direct { to, broadcast } => {
            buf.put_u64(*to);
            broadcast
        }
        Body::Broadcast(b) => b,
        _ => unreachable!("other bodies returned above"),
    };
    let (kind, data): (u8, &[u8]) = match b.payload() {
        Payload::Json(raw) => (PAYLOAD_JSON, raw.as_bytes()),
        Payload::Binary(bytes) => (PAYLOAD_BINARY, bytes),
    };
    buf.reserve(b.topic().len() + b.event().len() + data.len());
    for s in [b.topic(), b.event()] {
        // Topics and events over 64 KiB are refused long before (max_topic_len).
        let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        buf.put_u16(s.len() as u16);
        buf.put_slice(s);
    }
    buf.put_u8(kind);
    buf.put_slice(data);
    buf.freeze()
}

pub(crate) fn decode(mut m: &[u8]) -> Result<NodeMessage, MessageError> {
    let need = |m: &[u8], n: usize| {
        if m.len() < n {
            Err(MessageError::Malformed)
        } else {
            Ok(())
        }
    };
    need(m, 1)?;
    let version = m.get_u8();
    if version != FORMAT_VERSION {
        return Err(MessageError::UnknownVersion(version));
    }
    need(m, 9)?;
    let kind = m.get_u8();
    let node = m.get_u64();
    if !is_cluster_kind(kind) || kind == KIND_ANSWER {
        need(m, 16)?;
        let (to, id) = (m.get_u64(), m.get_u64());
        let body = Bytes::copy_from_slice(m);
        let body = match kind {
            KIND_ANSWER => Body::Answer { to, id, body },
            service => Body::Request {
                to,
                id,
                service,
                body,
            },
        };
        return Ok(NodeMessage { node, body });
    }
    if kind == KIND_DISCONNECT {
        let id = std::str::from_utf8(m).map_err(|_| MessageError::Malformed)?;
        return Ok(NodeMessage {
            node,
            body: Body::Disconnect(id.to_owned()),
        });
    }
    let direct_to = if kind == KIND_DIRECT {
        need(m, 8)?;
        Some(m.get_u64())
    } else {
        None
    };
    if kind != KIND_BROADCAST && kind != KIND_DIRECT {
        let p: PresenceBody = serde_json::from_slice(m).map_err(|_| MessageError::Malformed)?;
        let state = || State::from_wire(p.state).ok_or(MessageError::Malformed);
        let body = match kind {
            KIND_HEARTBEAT => Body::Heartbeat {
                from: p.from,
                to: p.generation,
                delta: state()?,
            },
            KIND_TRANSFER_REQUEST => Body::TransferRequest { to: p.to },
            KIND_TRANSFER => Body::Transfer {
                to: p.to,
                generation: p.generation,
                state: state()?,
            },
            KIND_GOODBYE => Body::Goodbye,
            _ => return Err(MessageError::Malformed),
        };
        return Ok(NodeMessage { node, body });
    }
    let mut text = || -> Result<String, MessageError> {
        need(m, 2)?;
        let len = usize::from(m.get_u16());
        need(m, len)?;
        let s = std::str::from_utf8(&m[..len])
            .map_err(|_| MessageError::Malformed)?
            .to_owned();
        m.advance(len);
        Ok(s)
    };
    let topic = text()?;
    let event = text()?;
    need(m, 1)?;
    let payload = match m.get_u8() {
        PAYLOAD_JSON => {
            Payload::Json(RawJson::parse(m.to_vec()).map_err(|_| MessageError::Malformed)?)
        }
        PAYLOAD_BINARY => Payload::binary(m.to_vec()),
        _ => return Err(MessageError::Malformed),
    };
    let broadcast = Broadcast::new(topic, event, payload);
    let body = match direct_to {
        Some(to) => Body::Direct { to, broadcast },
        None => Body::Broadcast(broadcast),
    };
    Ok(NodeMessage { node, body })
}

fn request_bytes(buf: &mut BytesMut, kind: u8, node: u64, to: u64, id: u64, body: &[u8]) -> Bytes {
    buf.reserve(25 + body.len());
    buf.put_u8(kind);
    buf.put_u64(node);
    buf.put_u64(to);
    buf.put_u64(id);
    buf.put_slice(body);
    buf.split().freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broadcast_of(m: NodeMessage) -> Broadcast {
        match m.body {
            Body::Broadcast(b) => b,
            _ => panic!("not a broadcast"),
        }
    }

    #[test]
    fn messages_round_trip_and_versions_are_checked() {
        let b = Broadcast::new(
            "room:1",
            "new_msg",
            Payload::from(serde_json::json!({"a": 1})),
        );
        let msg = encode(7, &Body::Broadcast(b.clone()));
        let m = decode(&msg).unwrap();
        assert_eq!(m.node, 7);
        let got = broadcast_of(m);
        assert_eq!(
            (got.topic(), got.event(), got.payload()),
            ("room:1", "new_msg", b.payload())
        );
        let bin = Broadcast::new("t", "e", Payload::binary(vec![0, 255]));
        let got = broadcast_of(decode(&encode(1, &Body::Broadcast(bin.clone()))).unwrap());
        assert_eq!(got.payload(), bin.payload());
        let mut future = msg.to_vec();
        future[0] = 2;
        assert_eq!(decode(&future).err(), Some(MessageError::UnknownVersion(2)));
        for cut in 0..msg.len() - 8 {
            assert!(decode(&msg[..cut]).is_err(), "cut at {cut}");
        }
        let hb = decode(&encode(
            3,
            &Body::Heartbeat {
                from: 4,
                to: 9,
                delta: State::default(),
            },
        ))
        .unwrap();
        assert!(matches!(hb.body, Body::Heartbeat { from: 4, to: 9, .. }));
        let req = decode(&encode(3, &Body::TransferRequest { to: 4 })).unwrap();
        assert!(matches!(req.body, Body::TransferRequest { to: 4 }));
        assert!(matches!(
            decode(&encode(3, &Body::Goodbye)).unwrap().body,
            Body::Goodbye
        ));
        let direct = decode(&encode(
            3,
            &Body::Direct {
                to: 5,
                broadcast: b,
            },
        ))
        .unwrap();
        assert!(
            matches!(direct.body, Body::Direct { to: 5, ref broadcast } if broadcast.event() == "new_msg")
        );
        let request = Body::Request {
            to: 5,
            id: 9,
            service: 7,
            body: Bytes::from_static(b"request"),
        };
        let got = decode(&encode(3, &request)).unwrap();
        assert!(
            matches!(got.body, Body::Request { to: 5, id: 9, service: 7, ref body } if body == "request")
        );
        let answer = Body::Answer {
            to: 3,
            id: 9,
            body: Bytes::new(),
        };
        let got = decode(&encode(5, &answer)).unwrap();
        assert!(matches!(got.body, Body::Answer { to: 3, id: 9, ref body } if body.is_empty()));
        let disconnect = decode(&encode(5, &Body::Disconnect("user_socket:42".into()))).unwrap();
        assert!(
            matches!(disconnect, NodeMessage { node: 5, body: Body::Disconnect(ref id) } if id == "user_socket:42")
        );
        for cut in 1..9 + 16 {
            assert!(decode(&encode(3, &request)[..cut]).is_err(), "cut at {cut}");
        }
    }
}
