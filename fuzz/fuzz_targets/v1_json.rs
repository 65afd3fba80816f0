//! V1 JSON client frames: decoding never panics; a decoded message re-encodes as a server
//! event frame that a client decodes back to the same topic, event and payload.
#![no_main]
use bytes::Bytes;
use firebrand_protocol::{Outbound, Serializer, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Serializer::V1.decode_text(Bytes::copy_from_slice(data)) else { return };
    let out = Outbound::Event { join_ref: None, r#ref: m.r#ref.as_deref(), topic: &m.topic, event: &m.event, payload: &m.payload };
    if m.event == "phx_reply" {
        return;
    }
    let encoded = Serializer::V1.encode(&out).expect("JSON payloads always encode");
    match Serializer::V1.decode_server(&encoded) {
        Ok(ServerMessage::Event(back)) => {
            assert_eq!((back.topic, back.event), (m.topic, m.event));
            assert_eq!(back.payload.to_value(), m.payload.to_value());
        }
        other => panic!("re-encoded frame decoded as {other:?}"),
    }
});
