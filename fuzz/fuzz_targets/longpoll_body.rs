//! Long-poll POST bodies (ndjson of JSON and base64 lines, or one frame): never panics, and
//! never more than 100 frames are taken from one body.
#![no_main]
use firebrand_protocol::Serializer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let serializer = if first & 1 == 0 { Serializer::V1 } else { Serializer::V2 };
    let decoded = firebrand::fuzzing::longpoll_body(serializer, body, first & 2 != 0);
    assert!(decoded <= 100);
});
