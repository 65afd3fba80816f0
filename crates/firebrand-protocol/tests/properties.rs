//! Properties of the serializers over arbitrary input.

use bytes::Bytes;
use firebrand_protocol::{Encoded, Outbound, Payload, Serializer};
use proptest::prelude::*;

fn field() -> impl Strategy<Value = String> {
    // Short strings, with JSON-hostile and non-ASCII characters.
    "[a-z0-9:_\"\\\\\u{0}-\u{1f}é🔥]{0,40}"
}

proptest! {
    /// Decoders return an error, never panic, whatever the bytes.
    #[test]
    fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        for ser in [Serializer::V1, Serializer::V2] {
            let _ = ser.decode_text(Bytes::from(data.clone()));
            let _ = ser.decode_binary(Bytes::from(data.clone()));
        }
    }

    /// What the server encodes as a push, a client-side decode (the same layout as a client
    /// push, ref added) reads back unchanged; JSON frames parse as JSON.
    #[test]
    fn v2_frames_round_trip(jr in field(), topic in field(), event in field(), body in field(),
                            data in proptest::collection::vec(any::<u8>(), 0..100)) {
        let json = Payload::from(serde_json::json!({"body": body}));
        let out = Outbound::push(&jr, &topic, &event, &json);
        let Encoded::Text(text) = Serializer::V2.encode(&out).unwrap() else { panic!("text") };
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back[0], &serde_json::json!(jr));
        prop_assert_eq!(&back[2], &serde_json::json!(topic));
        prop_assert_eq!(&back[4]["body"], &serde_json::json!(body));

        // A client push with the same fields decodes to them.
        let mut frame = vec![0u8, jr.len() as u8, 1, topic.len() as u8, event.len() as u8];
        for f in [jr.as_bytes(), b"7", topic.as_bytes(), event.as_bytes(), &data] {
            frame.extend_from_slice(f);
        }
        let m = Serializer::V2.decode_binary(Bytes::from(frame)).unwrap();
        prop_assert_eq!(m.join_ref.as_deref(), Some(jr.as_str()));
        prop_assert_eq!(m.r#ref.as_deref(), Some("7"));
        prop_assert_eq!(&m.topic, &topic);
        prop_assert_eq!(&m.event, &event);
        prop_assert_eq!(m.payload, Payload::binary(data));
    }

    /// Text frames the V2 JSON decoder accepts carry their payload byte for byte.
    #[test]
    fn v2_json_payload_is_kept_verbatim(topic in field(), n in any::<i64>(), s in field()) {
        let payload = serde_json::json!({"n": n, "s": s});
        let text = serde_json::json!(["1", "2", topic, "ev", payload]).to_string();
        let m = Serializer::V2.decode_text(Bytes::from(text)).unwrap();
        prop_assert_eq!(m.payload.to_value().unwrap(), payload);
        prop_assert_eq!(m.topic, topic);
    }
}
