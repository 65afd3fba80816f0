//! Entry points for the fuzz targets (`fuzz/`): the decoders of untrusted input that live in
//! this crate. Not part of the API: hidden from the docs, and may change in any release.

use axum::http::{HeaderMap, HeaderValue, Uri, header};
use firebrand_protocol::Serializer;

use crate::CheckOrigin;

/// Decodes a long-poll POST body as the transport does; returns how many frames decoded.
pub fn longpoll_body(serializer: Serializer, body: &[u8], ndjson: bool) -> usize {
    crate::transport::longpoll::body_lines(body, ndjson)
        .into_iter()
        .filter(|line| crate::transport::longpoll::decode_line(serializer, line).is_ok())
        .count()
}

/// Parses what the WebSocket upgrade reads from a request: the query string (params, `vsn`),
/// the `Sec-WebSocket-Protocol` auth token, and the `Origin` check. Returns whether the request
/// would get as far as `connect`.
pub fn upgrade_request(path_and_query: &str, protocol: &[u8], origin: &[u8]) -> bool {
    let Ok(uri) = path_and_query.parse::<Uri>() else {
        return false;
    };
    let Some(params) = crate::transport::accept::query_params(&uri) else {
        return false;
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(protocol) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    let _token = crate::transport::accept::auth_token(&headers);
    let origin_ok = std::str::from_utf8(origin).is_ok_and(|o| CheckOrigin::default().allows(o));
    let vsn = params
        .iter()
        .find(|(k, _)| k == "vsn")
        .map(|(_, v)| v.as_str());
    origin_ok && Serializer::from_vsn(vsn).is_ok()
}

/// A message decoded by [`ws_frames`]: its kind (`t`ext, `b`inary, `p`ing, p`o`ng, `c`lose,
/// invalid close `x`) and bytes (a close's code, big-endian; for an invalid close, the code
/// it is answered with).
pub type WsMessage = (u8, Vec<u8>);

/// Feeds a client's byte stream to the WebSocket frame reader `chunk` bytes at a time (as
/// reads would deliver it), with a size limit of `max_size`; returns the messages decoded and
/// the close code and reason of the first violation, if any.
pub fn ws_frames(
    stream: &[u8],
    chunk: usize,
    max_size: usize,
) -> (Vec<WsMessage>, Option<(u16, &'static str)>) {
    frames(crate::transport::ws::Reader::new(max_size), stream, chunk)
}

/// [`ws_frames`] on a connection that negotiated permessage-deflate: messages whose first
/// frame has RSV1 are inflated (each on its own, to at most `max_size` bytes).
pub fn ws_deflate_frames(
    stream: &[u8],
    chunk: usize,
    max_size: usize,
) -> (Vec<WsMessage>, Option<(u16, &'static str)>) {
    frames(
        crate::transport::ws::Reader::inflating(max_size),
        stream,
        chunk,
    )
}

fn frames(
    mut reader: crate::transport::ws::Reader,
    stream: &[u8],
    chunk: usize,
) -> (Vec<WsMessage>, Option<(u16, &'static str)>) {
    use crate::transport::ws::Incoming;
    let mut got = Vec::new();
    for part in stream.chunks(chunk.max(1)) {
        let fed = reader.feed(part, |m| {
            got.push(match m {
                Incoming::Text(b) => (b't', b.to_vec()),
                Incoming::Binary(b) => (b'b', b.to_vec()),
                Incoming::Ping(b) => (b'p', b.to_vec()),
                Incoming::Pong => (b'o', Vec::new()),
                Incoming::Close(Ok(code)) => (
                    b'c',
                    code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default(),
                ),
                Incoming::Close(Err(e)) => (b'x', e.close().0.to_be_bytes().to_vec()),
            });
        });
        if let Err(e) = fed {
            return (got, Some(e.close()));
        }
    }
    (got, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_accept_good_input() {
        let body = b"[null,\"1\",\"phoenix\",\"heartbeat\",{}]\r\nAAECAwQ=\n";
        assert_eq!(longpoll_body(Serializer::V2, body, true), 1);
        assert!(upgrade_request(
            "/socket/websocket?vsn=2.0.0&a=b",
            b"phoenix",
            b"http://localhost:4000"
        ));
        let ping = [0x89, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        assert_eq!(
            ws_frames(&ping, 1, 100),
            (vec![(b'p', b"hi".to_vec())], None)
        );
        assert!(!upgrade_request(
            "/socket/websocket?vsn=3.0.0",
            b"",
            b"http://localhost"
        ));
        // "hi" deflated (RFC 7692 §7.2.3.1's example is "Hello"), with RSV1, masked with 0s.
        let z = crate::deflate::inflate(&[0xca, 0xc8, 0x04, 0x00], 10).unwrap();
        assert_eq!(z, b"hi");
        let frame = [0xc1, 0x84, 0, 0, 0, 0, 0xca, 0xc8, 0x04, 0x00];
        assert_eq!(
            ws_deflate_frames(&frame, 3, 100),
            (vec![(b't', b"hi".to_vec())], None)
        );
        assert_eq!(
            ws_frames(&frame, 3, 100).1,
            Some((1002, "reserved bits set"))
        );
    }
}

/// Decodes a node-to-node message as a node reads it from the cluster engine (anyone who can
/// publish there can send one). When it decodes, its re-encoding must decode again to a message
/// of the same length (JSON maps may come out in another order). Returns whether it decoded.
pub fn cluster_message(bytes: &[u8]) -> bool {
    let Ok(msg) = crate::cluster::decode(bytes) else {
        return false;
    };
    // What travels inside requests and answers is the feature's own: long-poll's, here.
    match &msg.body {
        crate::cluster::Body::Request { body, .. } => {
            let _ = crate::transport::longpoll::decode_request(body);
        }
        crate::cluster::Body::Answer { body, .. } => {
            let _ = crate::transport::longpoll::decode_answer(body);
        }
        _ => {}
    }
    let again = crate::cluster::encode(msg.node, &msg.body);
    let back = crate::cluster::decode(&again).expect("a re-encoded message decodes");
    let twice = crate::cluster::encode(back.node, &back.body);
    assert_eq!(twice.len(), again.len(), "re-encoding changes the message");
    true
}

#[cfg(test)]
mod seeds {
    /// The seeds of the `cluster_message` target are real messages: each decodes.
    #[test]
    fn cluster_message_seeds_decode() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/cluster_message"
        );
        let mut seeds = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                super::cluster_message(&bytes),
                "{} does not decode",
                path.display()
            );
            seeds += 1;
        }
        assert!(seeds >= 6);
    }
}
