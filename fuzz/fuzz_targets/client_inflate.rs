//! firebrand-client's inflating layer (`firebrand_client::fuzzing::inflate`): the bytes a
//! server sends after a handshake answer that accepted permessage-deflate, compressed messages
//! turned into plain frames before tungstenite reads them. Byte 0 picks how the stream is cut
//! into reads (1 to 64 bytes). Properties: never panics; the outcome (the bytes handed on, or
//! the error) is the same whatever the reads' sizes; no inflated frame is larger than the
//! limit; a stream without RSV1 on any frame's first byte position passes through unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let chunk = 1 + usize::from(first % 64);
    let whole = firebrand_client::fuzzing::inflate(stream, stream.len(), MAX);
    let cut = firebrand_client::fuzzing::inflate(stream, chunk, MAX);
    assert_eq!(whole, cut, "reads of {chunk} bytes pass on something else");
    if let Ok(out) = &whole {
        let head = firebrand_client::fuzzing::ACCEPTED;
        assert!(out.starts_with(head), "the handshake answer is handed on first");
        // The bytes handed on are never more than the input and one limit's worth of
        // inflated bytes per 2 input bytes (a frame header is at least 2 bytes).
        assert!(out.len() <= head.len() + stream.len() + stream.len() / 2 * (MAX + 10));
        if stream.iter().all(|b| b & 0x40 == 0) {
            assert_eq!(&out[head.len()..], stream, "no RSV1 anywhere: passed as it is");
        }
    }
});
