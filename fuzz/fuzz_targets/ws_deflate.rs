//! The WebSocket frame reader with permessage-deflate negotiated
//! (`firebrand::fuzzing::ws_deflate_frames`): a client's byte stream after the upgrade, whose
//! messages with RSV1 are inflated. Byte 0 picks how the stream is cut into reads (1 to 64
//! bytes). Properties: never panics; the messages and the violation found are the same
//! whatever the reads' sizes; no message, inflated, is larger than the limit (a deflate bomb is
//! refused with 1009); text messages are UTF-8; the stream decodes as the reader without the
//! extension decodes it, as long as no frame has RSV1 set.
#![no_main]
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let chunk = 1 + usize::from(first % 64);
    let whole = firebrand::fuzzing::ws_deflate_frames(stream, stream.len().max(1), MAX);
    let cut = firebrand::fuzzing::ws_deflate_frames(stream, chunk, MAX);
    assert_eq!(whole, cut, "reads of {chunk} bytes decode differently");
    for (kind, bytes) in &whole.0 {
        assert!(bytes.len() <= MAX, "{} bytes in a {} message", bytes.len(), *kind as char);
        if *kind == b't' {
            assert!(std::str::from_utf8(bytes).is_ok(), "text message not UTF-8");
        }
    }
    let plain = firebrand::fuzzing::ws_frames(stream, stream.len().max(1), MAX);
    if plain.1 != Some((1002, "reserved bits set")) {
        assert_eq!(whole, plain, "decoded differently without RSV1");
    }
});
