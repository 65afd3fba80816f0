//! V2 JSON client frames: decoding never panics; a decoded message re-encodes as a server
//! event frame that a client decodes back to the same refs, topic, event and payload.
#![no_main]
use bytes::Bytes;
use firebrand_protocol::{Outbound, Serializer, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Serializer::V2.decode_text(Bytes::copy_from_slice(data)) else { return };
    if m.event == "phx_reply" {
        return;
    }
    let out = Outbound::Event {
        join_ref: m.join_ref.as_deref(),
        r#ref: m.r#ref.as_deref(),
        topic: &m.topic,
        event: &m.event,
        payload: &m.payload,
    };
    let encoded = Serializer::V2.encode(&out).expect("JSON payloads always encode");
    match Serializer::V2.decode_server(&encoded) {
        Ok(ServerMessage::Event(back)) => {
            assert_eq!((&back.join_ref, &back.r#ref), (&m.join_ref, &m.r#ref));
            assert_eq!((back.topic, back.event), (m.topic, m.event));
            assert_eq!(back.payload.to_value(), m.payload.to_value());
        }
        other => panic!("re-encoded frame decoded as {other:?}"),
    }
});
