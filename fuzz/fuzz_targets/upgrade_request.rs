//! What the WebSocket upgrade reads from a request: the query string (params, `vsn`), the
//! `Sec-WebSocket-Protocol` value (auth token) and the `Origin` check, in three parts separated
//! by 0xFF bytes (never valid in the UTF-8 query). Property: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0xff);
    let (Some(query), Some(protocol), Some(origin)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let _ = firebrand::fuzzing::upgrade_request(query, protocol, origin);
});
