//! V1 JSON client frames (`Serializer::V1.decode_text`).
//!
//! Properties: never panics; a decoded message re-encoded as a server event frame (`Outbound`,
//! `encode`) decodes back (`decode_server`) to the same ref, topic, event and payload bytes.
#![no_main]
use bytes::Bytes;
use firebrand_protocol::{Outbound, Serializer, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Serializer::V1.decode_text(Bytes::copy_from_slice(data)) else {
        return;
    };
    if m.event == "phx_reply" {
        // A client frame named phx_reply re-encodes as what a client reads as a reply.
        return;
    }
    let out = Outbound::Event {
        join_ref: None,
        r#ref: m.r#ref.as_deref(),
        topic: &m.topic,
        event: &m.event,
        payload: &m.payload,
    };
    let encoded = Serializer::V1
        .encode(&out)
        .expect("JSON payloads always encode");
    match Serializer::V1.decode_server(&encoded) {
        Ok(ServerMessage::Event(back)) => {
            assert_eq!(back.r#ref, m.r#ref);
            assert_eq!((back.topic, back.event), (m.topic, m.event));
            assert_eq!(back.payload, m.payload);
        }
        other => panic!("re-encoded frame decoded as {other:?}"),
    }
});
