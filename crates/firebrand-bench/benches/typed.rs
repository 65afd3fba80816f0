//! What a typed channel costs against the untyped path, in one sitting: the same push (`add`,
//! two numbers, answered with their sum) through the in-process test client, handled once by a
//! `TypedChannel` (`Handle<Add>`: decoded by the dispatch, the reply encoded from its type) and
//! once by a `Channel` that matches the event string, decodes with `payload.decode()?` and
//! encodes the reply with `Payload::json`. Everything else on the way (the client's frame, the
//! connection, the channel's mailbox, the reply frame) is the same code.
//!
//! `cargo bench -p firebrand-bench --bench typed`

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use firebrand::contract::{Contract, Empty, ErrorReply, Push};
use firebrand::testing::{TestClient, TestSocket};
use firebrand::{
    Channel, ChannelContext, ConnectError, ConnectInfo, Endpoint, Handle, HandleResult,
    JoinContext, JoinError, Joined, Payload, Reply, Socket, TypedChannel, TypedContext,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
    note: String,
}

#[derive(Serialize, Deserialize)]
struct Sum {
    sum: i64,
    note: String,
}

impl Push for Add {
    const EVENT: &'static str = "add";
    type Reply = Sum;
}

struct Calc;
impl Contract for Calc {
    type JoinParams = Empty;
    type JoinReply = Empty;
    type Pushes = (Add,);
    type Events = ();
    type Meta = Empty;
}

struct Anyone;
impl Socket for Anyone {
    type Assigns = ();
    async fn connect(&self, _: &ConnectInfo) -> Result<(), ConnectError> {
        Ok(())
    }
}

struct Typed;
impl TypedChannel for Typed {
    type Contract = Calc;
    type Assigns = ();
    type State = ();
    type Info = ();
    async fn join(
        _: &str,
        _: Empty,
        _: &JoinContext<'_, ()>,
    ) -> Result<Joined<Self, Empty>, JoinError> {
        Ok(Joined::with_reply(Typed, Empty))
    }
}
impl Handle<Add> for Typed {
    async fn handle(
        &mut self,
        add: Add,
        _: &mut TypedContext<'_, Self>,
    ) -> Result<Sum, ErrorReply> {
        Ok(Sum {
            sum: add.a + add.b,
            note: add.note,
        })
    }
}

struct Untyped;
impl Channel for Untyped {
    type Assigns = ();
    type State = ();
    type Info = ();
    async fn join(_: &str, _: Payload, _: &JoinContext<'_, ()>) -> Result<Joined<Self>, JoinError> {
        Ok(Joined::new(Untyped))
    }
    async fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        _: &mut ChannelContext<Self>,
    ) -> HandleResult {
        match event {
            "add" => {
                let add: Add = payload.decode()?;
                let sum = Sum {
                    sum: add.a + add.b,
                    note: add.note,
                };
                Ok(Some(Reply::ok(Payload::json(&sum).expect("serializable"))))
            }
            _ => Err(Reply::error(serde_json::json!({"reason": "unknown event"}))),
        }
    }
}

fn typed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = Endpoint::new();
    let socket = TestSocket::new(
        endpoint
            .socket(Anyone)
            .channel::<Typed>("typed:*")
            .channel::<Untyped>("untyped:*")
            .no_rate_limits(),
    );
    let mut client: TestClient = rt.block_on(async {
        let mut c = socket.connect(&[]).await.unwrap();
        c.join("typed:1", serde_json::json!({})).await.unwrap();
        c.join("untyped:1", serde_json::json!({})).await.unwrap();
        c
    });
    let payload =
        Payload::json(&serde_json::json!({"a": 2, "b": 40, "note": "x".repeat(100)})).unwrap();
    let mut g = c.benchmark_group("push add, reply sum (round trip)");
    // Interleaved in one sitting: the ratio is what counts, not the absolute time.
    for topic in ["typed:1", "untyped:1"] {
        g.bench_function(topic.trim_end_matches(":1"), |b| {
            b.iter(|| {
                let reply = rt.block_on(client.request(topic, "add", payload.clone()));
                assert_eq!(reply.status(), "ok", "{:?}", reply.payload());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, typed);
criterion_main!(benches);
