//! Typed channels: a contract's pushes decoded and dispatched to their handlers, replies and
//! events encoded from their types, refusals that name what did not decode, and app state
//! taken by type from the socket's state.

use std::sync::Arc;

use firebrand::contract::{Contract, Empty, ErrorReply, Event, Push};
use firebrand::testing::TestSocket;
use firebrand::{
    ConnectError, ConnectInfo, Endpoint, FromRef, Handle, JoinContext, JoinError, Joined, Socket,
    TypedChannel, TypedContext,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

// ---------------------------------------------------------------- the contract

#[derive(Serialize, Deserialize)]
struct JoinParams {
    nick: String,
}

#[derive(Serialize, Deserialize)]
struct Welcome {
    motd: String,
    nick: String,
}

#[derive(Serialize, Deserialize)]
struct NewMsg {
    body: String,
}
impl Push for NewMsg {
    const EVENT: &'static str = "new_msg";
    type Reply = Empty;
}

#[derive(Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}
#[derive(Serialize, Deserialize)]
struct Sum {
    sum: i64,
}
impl Push for Add {
    const EVENT: &'static str = "add";
    type Reply = Sum;
}

#[derive(Serialize, Deserialize)]
struct Message {
    nick: String,
    body: String,
}
impl Event for Message {
    const EVENT: &'static str = "new_msg";
}

#[derive(Serialize, Deserialize)]
struct Meta {
    nick: String,
}

struct RoomContract;
impl Contract for RoomContract {
    type JoinParams = JoinParams;
    type JoinReply = Welcome;
    type Pushes = (NewMsg, Add);
    type Events = (Message,);
    type Meta = Meta;
}

// ---------------------------------------------------------------- the app

#[derive(Clone)]
struct AppState {
    motd: Motd,
    #[expect(
        dead_code,
        reason = "a part no channel reads: state is more than one channel's part"
    )]
    other: Arc<str>,
}

#[derive(Clone)]
struct Motd(Arc<str>);

impl FromRef<AppState> for Motd {
    fn from_ref(app: &AppState) -> Motd {
        app.motd.clone()
    }
}

struct Anyone;
impl Socket for Anyone {
    type Assigns = ();
    async fn connect(&self, _: &ConnectInfo) -> Result<(), ConnectError> {
        Ok(())
    }
}

struct Room {
    nick: String,
}

impl TypedChannel for Room {
    type Contract = RoomContract;
    type Assigns = ();
    type State = Motd;
    type Info = ();

    async fn join(
        _topic: &str,
        params: JoinParams,
        ctx: &JoinContext<'_, (), Motd>,
    ) -> Result<Joined<Self, Welcome>, JoinError> {
        if params.nick.is_empty() {
            return Err(ErrorReply::new("a nick is needed").into());
        }
        let welcome = Welcome {
            motd: ctx.state().0.to_string(),
            nick: params.nick.clone(),
        };
        Ok(Joined::with_reply(Room { nick: params.nick }, welcome))
    }

    async fn after_join(&mut self, ctx: &mut TypedContext<'_, Self>) {
        let nick = self.nick.clone();
        ctx.track(&nick, &Meta { nick: nick.clone() })
            .expect("tracked");
        ctx.push_presence_state();
    }
}

impl Handle<NewMsg> for Room {
    async fn handle(
        &mut self,
        msg: NewMsg,
        ctx: &mut TypedContext<'_, Self>,
    ) -> Result<Empty, ErrorReply> {
        if msg.body.is_empty() {
            return Err(ErrorReply::new("empty message"));
        }
        ctx.broadcast(&Message {
            nick: self.nick.clone(),
            body: msg.body,
        });
        Ok(Empty)
    }
}

impl Handle<Add> for Room {
    async fn handle(
        &mut self,
        add: Add,
        _: &mut TypedContext<'_, Self>,
    ) -> Result<Sum, ErrorReply> {
        Ok(Sum { sum: add.a + add.b })
    }
}

fn socket() -> TestSocket<Anyone> {
    let state = AppState {
        motd: Motd("be kind".into()),
        other: "unused".into(),
    };
    let endpoint = Endpoint::new();
    TestSocket::new(
        endpoint
            .socket_with_state(Anyone, state)
            .channel::<Room>("room:*"),
    )
}

#[tokio::test]
async fn a_typed_join_decodes_params_and_replies_with_its_type_and_the_state() {
    let socket = socket();
    let mut c = socket.connect(&[]).await.unwrap();
    let reply = c.join("room:a", json!({"nick": "ada"})).await.unwrap();
    assert_eq!(reply, json!({"motd": "be kind", "nick": "ada"}));
    let state = c.assert_push("room:a", "presence_state").await;
    assert_eq!(state["ada"]["metas"][0]["nick"], "ada");

    // Params that do not decode are refused with the field named; the app's own refusal too.
    let refused = c.join("room:b", json!({"name": "x"})).await.unwrap_err();
    let reason = refused["reason"].as_str().unwrap();
    assert!(reason.contains("missing field `nick`"), "{reason}");
    let refused = c.join("room:c", json!({"nick": ""})).await.unwrap_err();
    assert_eq!(refused, json!({"reason": "a nick is needed"}));
}

#[tokio::test]
async fn pushes_are_dispatched_by_event_and_answered_with_their_reply_types() {
    let socket = socket();
    let mut c = socket.connect(&[]).await.unwrap();
    c.join("room:a", json!({"nick": "ada"})).await.unwrap();

    let sum = c.request("room:a", "add", json!({"a": 2, "b": 40})).await;
    assert_eq!(
        (sum.status(), sum.payload().to_value()),
        ("ok", Some(json!({"sum": 42})))
    );

    let sent = c.request("room:a", "new_msg", json!({"body": "hi"})).await;
    assert_eq!(
        (sent.status(), sent.payload().to_value()),
        ("ok", Some(json!({})))
    );
    let msg = c.assert_broadcast("room:a", "new_msg").await;
    assert_eq!(msg, json!({"nick": "ada", "body": "hi"}));

    // The handler's own error, a payload of the wrong shape, an event not in the contract.
    let empty = c.request("room:a", "new_msg", json!({"body": ""})).await;
    assert_eq!(
        (empty.status(), empty.payload().to_value()),
        ("error", Some(json!({"reason": "empty message"})))
    );
    let wrong = c
        .request("room:a", "add", json!({"a": 1, "b": "two"}))
        .await;
    assert_eq!(wrong.status(), "error");
    let reason = wrong.payload().to_value().unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.starts_with("invalid payload: b: invalid type: string \"two\""),
        "{reason}"
    );
    let unknown = c.request("room:a", "shout", json!({})).await;
    assert_eq!(
        (unknown.status(), unknown.payload().to_value()),
        ("error", Some(json!({"reason": "unknown event \"shout\""})))
    );
}

/// Counts its own serializations: a typed broadcast is encoded once for every subscriber.
static ENCODED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[tokio::test]
async fn a_typed_broadcast_is_serialized_once_for_all_subscribers() {
    use std::sync::atomic::Ordering;

    #[derive(Deserialize)]
    struct Counted;
    impl Serialize for Counted {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            ENCODED.fetch_add(1, Ordering::SeqCst);
            s.serialize_str("counted")
        }
    }
    impl Event for Counted {
        const EVENT: &'static str = "counted";
    }
    impl Push for Counted {
        const EVENT: &'static str = "count";
        type Reply = Empty;
    }
    struct Counting;
    impl Contract for Counting {
        type JoinParams = Empty;
        type JoinReply = Empty;
        type Pushes = (Counted,);
        type Events = (Counted,);
        type Meta = Empty;
    }
    struct Counter;
    impl TypedChannel for Counter {
        type Contract = Counting;
        type Assigns = ();
        type State = ();
        type Info = ();
        async fn join(
            _: &str,
            _: Empty,
            _: &JoinContext<'_, ()>,
        ) -> Result<Joined<Self, Empty>, JoinError> {
            Ok(Joined::with_reply(Counter, Empty))
        }
    }
    impl Handle<Counted> for Counter {
        async fn handle(
            &mut self,
            c: Counted,
            ctx: &mut TypedContext<'_, Self>,
        ) -> Result<Empty, ErrorReply> {
            ctx.broadcast(&c);
            Ok(Empty)
        }
    }

    let endpoint = Endpoint::new();
    let socket = TestSocket::new(endpoint.socket(Anyone).channel::<Counter>("count:*"));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = socket.connect(&[]).await.unwrap();
        c.join("count:x", json!({})).await.unwrap();
        clients.push(c);
    }
    let before = ENCODED.load(Ordering::SeqCst);
    let reply = clients[0].request("count:x", "count", json!(null)).await;
    assert_eq!(reply.status(), "ok", "{:?}", reply.payload());
    for c in &mut clients {
        assert_eq!(
            c.assert_broadcast("count:x", "counted").await,
            json!("counted")
        );
    }
    assert_eq!(ENCODED.load(Ordering::SeqCst) - before, 1);
}
