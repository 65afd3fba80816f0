//! Server frames as a client reads them (text and binary, V1 and V2): never panics.
#![no_main]
use firebrand_protocol::{Encoded, Serializer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let serializer = if first & 1 == 0 { Serializer::V1 } else { Serializer::V2 };
    let frame = if first & 2 == 0 {
        Encoded::Binary(rest.to_vec())
    } else {
        match std::str::from_utf8(rest) {
            Ok(s) => Encoded::Text(s.to_owned()),
            Err(_) => return,
        }
    };
    let _ = serializer.decode_server(&frame);
});
