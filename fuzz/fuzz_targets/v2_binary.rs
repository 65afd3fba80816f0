//! V2 binary client frames (`Serializer::V2.decode_binary`).
//!
//! Properties: never panics; a decoded push re-encodes as a client sends it (`encode_client`)
//! to the same bytes.
#![no_main]
use bytes::Bytes;
use firebrand_protocol::{Encoded, Outbound, Serializer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Serializer::V2.decode_binary(Bytes::copy_from_slice(data)) else {
        return;
    };
    let out = Outbound::Event {
        join_ref: m.join_ref.as_deref(),
        r#ref: m.r#ref.as_deref(),
        topic: &m.topic,
        event: &m.event,
        payload: &m.payload,
    };
    assert_eq!(
        Serializer::V2.encode_client(&out),
        Ok(Encoded::Binary(data.to_vec()))
    );
});
