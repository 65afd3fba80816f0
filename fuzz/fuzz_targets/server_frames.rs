//! Server frames as a client reads them (`decode_server`: text and binary, V1 and V2).
//!
//! The first byte picks the serializer (bit 0: V1/V2) and the frame kind (bit 1: binary/text).
//! Properties: never panics; a V2 binary frame that decodes re-encodes (`encode`) to the same
//! bytes; a text frame that decodes re-encodes to a frame that decodes to the same message
//! (V1 never sends `join_ref`, so it is not compared there).
#![no_main]
use firebrand_protocol::{Encoded, Outbound, Serializer, ServerMessage};
use libfuzzer_sys::fuzz_target;

fn outbound(m: &ServerMessage) -> Outbound<'_> {
    match m {
        ServerMessage::Event(m) => Outbound::Event {
            join_ref: m.join_ref.as_deref(),
            r#ref: m.r#ref.as_deref(),
            topic: &m.topic,
            event: &m.event,
            payload: &m.payload,
        },
        ServerMessage::Reply {
            join_ref,
            r#ref,
            topic,
            status,
            payload,
        } => Outbound::Reply {
            join_ref: join_ref.as_deref(),
            r#ref: r#ref.as_deref(),
            topic,
            status,
            payload,
        },
    }
}

fn without_join_ref(m: ServerMessage) -> ServerMessage {
    match m {
        ServerMessage::Event(m) => ServerMessage::Event(firebrand_protocol::Message {
            join_ref: None,
            ..m
        }),
        ServerMessage::Reply {
            r#ref,
            topic,
            status,
            payload,
            ..
        } => ServerMessage::Reply {
            join_ref: None,
            r#ref,
            topic,
            status,
            payload,
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let serializer = if first & 1 == 0 {
        Serializer::V1
    } else {
        Serializer::V2
    };
    let frame = if first & 2 == 0 {
        Encoded::Binary(rest.to_vec())
    } else {
        match std::str::from_utf8(rest) {
            Ok(s) => Encoded::Text(s.to_owned()),
            Err(_) => return,
        }
    };
    let Ok(msg) = serializer.decode_server(&frame) else {
        return;
    };
    let again = serializer
        .encode(&outbound(&msg))
        .expect("a decoded server frame re-encodes");
    match (&frame, &again) {
        (Encoded::Binary(_), Encoded::Binary(_)) => assert_eq!(again, frame),
        (Encoded::Text(_), Encoded::Text(_)) => {
            let back = serializer
                .decode_server(&again)
                .expect("a re-encoded server frame decodes");
            if serializer == Serializer::V1 {
                assert_eq!(without_join_ref(back), without_join_ref(msg));
            } else {
                assert_eq!(back, msg);
            }
        }
        _ => panic!("{frame:?} re-encoded as {again:?}"),
    }
});
