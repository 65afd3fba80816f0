//! The WebSocket frame reader (`firebrand::fuzzing::ws_frames`): a client's byte stream after
//! the upgrade. Byte 0 picks how the stream is cut into reads (1 to 64 bytes). Properties: never
//! panics; the messages and the violation found are the same whatever the reads' sizes; no
//! message is larger than the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let chunk = 1 + usize::from(first % 64);
    let whole = firebrand::fuzzing::ws_frames(stream, stream.len().max(1), MAX);
    let cut = firebrand::fuzzing::ws_frames(stream, chunk, MAX);
    assert_eq!(whole, cut, "reads of {chunk} bytes decode differently");
    for (kind, bytes) in &whole.0 {
        assert!(bytes.len() <= MAX, "{} bytes in a {} message", bytes.len(), *kind as char);
        if *kind == b't' {
            assert!(std::str::from_utf8(bytes).is_ok(), "text message not UTF-8");
        }
    }
});
