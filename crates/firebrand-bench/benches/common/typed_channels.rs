//! The channels of the typed-channel benchmark (`benches/typed.rs`) and of its instruction
//! count (`examples/typed_cost.rs`): one push, `add`, served by a `TypedChannel` and by an
//! untyped `Channel` doing the same by hand.

use firebrand::contract::{Contract, Empty, ErrorReply, Push};
use firebrand::{
    Channel, ChannelContext, ConnectError, ConnectInfo, Handle, HandleResult, JoinContext,
    JoinError, Joined, Payload, Reply, Socket, TypedChannel, TypedContext,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub(crate) struct Add {
    pub(crate) a: i64,
    pub(crate) b: i64,
    pub(crate) note: String,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Sum {
    pub(crate) sum: i64,
    pub(crate) note: String,
}

impl Push for Add {
    const EVENT: &'static str = "add";
    type Reply = Sum;
}

pub(crate) struct Calc;
impl Contract for Calc {
    type JoinParams = Empty;
    type JoinReply = Empty;
    type Pushes = (Add,);
    type Events = ();
    type Meta = Empty;
}

pub(crate) struct Anyone;
impl Socket for Anyone {
    type Assigns = ();
    async fn connect(&self, _: &ConnectInfo) -> Result<(), ConnectError> {
        Ok(())
    }
}

pub(crate) struct Typed;
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

pub(crate) struct Untyped;
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

/// A socket with both channels, and a client joined to `typed:1` and `untyped:1`.
pub(crate) fn joined(
    rt: &tokio::runtime::Runtime,
) -> (
    firebrand::testing::TestSocket<Anyone>,
    firebrand::testing::TestClient,
) {
    let endpoint = firebrand::Endpoint::new();
    let socket = firebrand::testing::TestSocket::new(
        endpoint
            .socket(Anyone)
            .channel::<Typed>("typed:*")
            .channel::<Untyped>("untyped:*")
            .no_rate_limits(),
    );
    let client = rt.block_on(async {
        let mut c = socket.connect(&[]).await.unwrap();
        c.join("typed:1", serde_json::json!({})).await.unwrap();
        c.join("untyped:1", serde_json::json!({})).await.unwrap();
        c
    });
    (socket, client)
}

/// The push's payload: two numbers and a 100-character note.
pub(crate) fn payload() -> Payload {
    Payload::json(&serde_json::json!({"a": 2, "b": 40, "note": "x".repeat(100)})).unwrap()
}
