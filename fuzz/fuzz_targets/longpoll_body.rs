//! Long-poll POST bodies (ndjson of JSON and base64 lines, or one frame).
//!
//! The first byte picks the serializer (bit 0: V1/V2) and ndjson (bit 1). Properties: never
//! panics; at most 100 frames are taken from one body, at most one from a non-ndjson body, and
//! never more than the body has lines.
#![no_main]
use firebrand_protocol::Serializer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let serializer = if first & 1 == 0 {
        Serializer::V1
    } else {
        Serializer::V2
    };
    let ndjson = first & 2 != 0;
    let decoded = firebrand::fuzzing::longpoll_body(serializer, body, ndjson);
    assert!(decoded <= 100, "{decoded} frames from one body");
    if ndjson {
        assert!(decoded <= body.split(|b| *b == b'\n').count());
    } else {
        assert!(decoded <= 1);
    }
});
