//! V2 JSON client frames (`Serializer::V2.decode_text`).
//!
//! Properties: never panics; a decoded message re-encoded as a server event frame (`Outbound`,
//! `encode`) decodes back (`decode_server`) to the same refs, topic, event and payload bytes.
#![no_main]
use bytes::Bytes;
use firebrand_protocol::{Outbound, Serializer, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Serializer::V2.decode_text(Bytes::copy_from_slice(data)) else {
        return;
    };
    if m.event == "phx_reply" {
        // A client frame named phx_reply re-encodes as what a client reads as a reply.
        return;
    }
    let out = Outbound::Event {
        join_ref: m.join_ref.as_deref(),
        r#ref: m.r#ref.as_deref(),
        topic: &m.topic,
        event: &m.event,
        payload: &m.payload,
    };
    let encoded = Serializer::V2
        .encode(&out)
        .expect("JSON payloads always encode");
    match Serializer::V2.decode_server(&encoded) {
        Ok(ServerMessage::Event(back)) => assert_eq!(back, m),
        other => panic!("re-encoded frame decoded as {other:?}"),
    }
});
