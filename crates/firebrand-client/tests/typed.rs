//! Typed channels end to end: one contract (the `contract` module, as a crate shared by both
//! ends would be) served by a firebrand `TypedChannel` and used by the client's
//! `TypedChannel`; and the same contract against an untyped server channel that does not keep
//! it, whose replies and events come back as decode errors.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{WAIT, next, until};
use firebrand::{
    Channel, ChannelContext, ConnectError, ConnectInfo, Endpoint, Handle, HandleResult,
    JoinContext, JoinError, Joined, Reply, TypedContext,
};
use firebrand_client::contract::{Empty, ErrorReply};
use firebrand_client::{
    ChannelEvent, Presence, Socket, TypedEvents, TypedJoinError, TypedPushError,
};
use serde_json::json;

/// The shared contract: what a `chat-contract` crate would hold, used below by the server's
/// channel and by the client alike.
mod contract {
    use firebrand_client::contract::{Contract, Empty, Event, Push};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Nick {
        pub nick: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Welcome {
        pub nick: String,
        pub motd: String,
    }

    /// Say something to the room; broadcast as a [`Message`].
    #[derive(Debug, Serialize, Deserialize)]
    pub(crate) struct NewMsg {
        pub body: String,
    }
    impl Push for NewMsg {
        const EVENT: &'static str = "new_msg";
        type Reply = Empty;
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(crate) struct Add {
        pub a: i64,
        pub b: i64,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Sum {
        pub sum: i64,
    }
    impl Push for Add {
        const EVENT: &'static str = "add";
        type Reply = Sum;
    }

    /// The server waits `ms` before answering.
    #[derive(Debug, Serialize, Deserialize)]
    pub(crate) struct Nap {
        pub ms: u64,
    }
    impl Push for Nap {
        const EVENT: &'static str = "nap";
        type Reply = Empty;
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Message {
        pub nick: String,
        pub body: String,
    }
    impl Event for Message {
        const EVENT: &'static str = "new_msg";
    }

    pub(crate) struct Room;
    impl Contract for Room {
        type JoinParams = Nick;
        type JoinReply = Welcome;
        type Pushes = (NewMsg, Add, Nap);
        type Events = (Message,);
        type Meta = Empty;
    }
}

use contract::{Add, Message, Nap, NewMsg, Nick, Room, Sum, Welcome};

// ---------------------------------------------------------------- the server

/// Anyone connects; the socket id is `user:<user param>` (to disconnect it in a test).
struct Users;

impl firebrand::Socket for Users {
    type Assigns = Option<String>;

    async fn connect(&self, info: &ConnectInfo) -> Result<Self::Assigns, ConnectError> {
        Ok(info.param("user").map(str::to_owned))
    }

    fn id(&self, user: &Self::Assigns) -> Option<String> {
        user.as_ref().map(|u| format!("user:{u}"))
    }
}

/// `room:*`: the contract, typed.
struct RoomChannel {
    nick: String,
}

impl firebrand::TypedChannel for RoomChannel {
    type Contract = Room;
    type Assigns = Option<String>;
    type State = ();
    type Info = ();

    async fn join(
        topic: &str,
        params: Nick,
        _: &JoinContext<'_, Option<String>>,
    ) -> Result<Joined<Self, Welcome>, JoinError> {
        if params.nick.is_empty() {
            return Err(ErrorReply::new("a nick is needed").into());
        }
        let welcome = Welcome {
            nick: params.nick.clone(),
            motd: format!("welcome to {topic}"),
        };
        Ok(Joined::with_reply(
            RoomChannel { nick: params.nick },
            welcome,
        ))
    }

    async fn after_join(&mut self, ctx: &mut TypedContext<'_, Self>) {
        let nick = self.nick.clone();
        ctx.track(&nick, &Empty).expect("tracked");
        ctx.push_presence_state();
    }
}

impl Handle<NewMsg> for RoomChannel {
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

impl Handle<Add> for RoomChannel {
    async fn handle(
        &mut self,
        add: Add,
        _: &mut TypedContext<'_, Self>,
    ) -> Result<Sum, ErrorReply> {
        Ok(Sum { sum: add.a + add.b })
    }
}

impl Handle<Nap> for RoomChannel {
    async fn handle(
        &mut self,
        nap: Nap,
        _: &mut TypedContext<'_, Self>,
    ) -> Result<Empty, ErrorReply> {
        tokio::time::sleep(Duration::from_millis(nap.ms)).await;
        Ok(Empty)
    }
}

/// `legacy:*`: an untyped channel with the same event names that does not keep the contract
/// (an older server, say): its replies and events have other shapes.
struct Legacy;

impl Channel for Legacy {
    type Assigns = Option<String>;
    type State = ();
    type Info = ();

    async fn join(
        _: &str,
        _: firebrand::Payload,
        _: &JoinContext<'_, Self::Assigns>,
    ) -> Result<Joined<Self>, JoinError> {
        Ok(Joined::new(Legacy).reply(json!({"hello": "legacy"})))
    }

    async fn handle_in(
        &mut self,
        event: &str,
        _: firebrand::Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        match event {
            "add" => Ok(Some(Reply::ok(json!({"total": 42})))),
            "nap" => Err(Reply::error(json!({"why": "no reason field"}))),
            "new_msg" => {
                ctx.broadcast("new_msg", json!({"text": "old shape"}));
                ctx.broadcast("new_msg", json!({"nick": "legacy", "body": "new shape"}));
                Ok(Some(Reply::ok(json!({}))))
            }
            _ => Err(Reply::error(json!({"reason": "unknown event"}))),
        }
    }
}

struct Server {
    addr: SocketAddr,
    endpoint: Endpoint,
}

impl Server {
    fn socket(&self, user: &str) -> Socket {
        Socket::builder(format!("ws://{}/socket", self.addr))
            .param("user", user)
            .connect()
            .unwrap()
    }
}

/// The typed room (`room:*`, recoverable) and the legacy channel on 127.0.0.1.
async fn start() -> Server {
    let endpoint = Endpoint::builder()
        .history("room:*", 100, Duration::from_secs(300))
        .build();
    let socket = endpoint
        .socket(Users)
        .channel::<RoomChannel>("room:*")
        .channel::<Legacy>("legacy:*")
        .into_router();
    let router = axum::Router::new().nest("/socket", socket);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Server { addr, endpoint }
}

fn nick(nick: &str) -> Nick {
    Nick { nick: nick.into() }
}

/// The next decoded event of a typed stream (a decode error fails the test).
async fn next_typed<E: firebrand_client::contract::Event + std::fmt::Debug>(
    events: &mut TypedEvents<E>,
) -> E {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("timed out waiting for a typed event")
        .expect("typed event stream ended")
        .expect("event decodes")
}

// ---------------------------------------------------------------- the tests

#[tokio::test]
async fn a_typed_join_sends_the_contract_params_and_gets_its_reply() {
    let s = start().await;
    let socket = s.socket("ada");

    let room = socket.typed_channel::<Room>("room:lobby", &nick("ada"));
    assert_eq!(room.topic(), "room:lobby");
    assert_eq!(
        room.join().await,
        Ok(Welcome {
            nick: "ada".into(),
            motd: "welcome to room:lobby".into()
        })
    );
    assert_eq!(room.join().await, Err(TypedJoinError::AlreadyJoined));

    // The server's refusal arrives as the contract's ErrorReply.
    let refused = socket.typed_channel::<Room>("room:other", &nick(""));
    assert_eq!(
        refused.join().await,
        Err(TypedJoinError::Refused(ErrorReply::new("a nick is needed")))
    );
    refused.leave().await.unwrap();
}

#[tokio::test]
async fn a_push_gets_its_reply_type_or_the_servers_error_reply() {
    let s = start().await;
    let socket = s.socket("ada");
    let room = socket.typed_channel::<Room>("room:lobby", &nick("ada"));

    assert_eq!(
        room.push(&Add { a: 1, b: 2 }).await,
        Err(TypedPushError::NotJoined)
    );
    room.join().await.unwrap();

    assert_eq!(room.push(&Add { a: 2, b: 40 }).await, Ok(Sum { sum: 42 }));
    assert_eq!(room.push(&NewMsg { body: "hi".into() }).await, Ok(Empty));
    assert_eq!(
        room.push(&NewMsg { body: "".into() }).await,
        Err(TypedPushError::Reply(ErrorReply::new("empty message")))
    );

    let nap = room.push_with_timeout(&Nap { ms: 1000 }, Duration::from_millis(100));
    assert_eq!(nap.await, Err(TypedPushError::Timeout));

    room.leave().await.unwrap();
    assert_eq!(
        room.push(&Add { a: 1, b: 2 }).await,
        Err(TypedPushError::Closed)
    );
}

#[tokio::test]
async fn events_arrive_decoded_and_the_untyped_channel_serves_presence() {
    let s = start().await;
    let (a, b) = (s.socket("ada"), s.socket("bob"));
    let ra = a.typed_channel::<Room>("room:chat", &nick("ada"));
    let rb = b.typed_channel::<Room>("room:chat", &nick("bob"));
    let mut messages = rb.on::<Message, _>();
    let mut events = rb.channel().events();
    ra.join().await.unwrap();
    rb.join().await.unwrap();

    ra.push(&NewMsg {
        body: "hello".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        next_typed(&mut messages).await,
        Message {
            nick: "ada".into(),
            body: "hello".into()
        }
    );

    // Presence, outside the contract's events, through the untyped channel underneath.
    let mut presence = Presence::new();
    while presence.list().count() < 2 {
        presence.handle(&next(&mut events).await);
    }
    let mut online: Vec<_> = presence.list().map(|(k, _)| k.to_owned()).collect();
    online.sort();
    assert_eq!(online, ["ada", "bob"]);

    rb.leave().await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, messages.recv())
            .await
            .unwrap()
            .is_none(),
        "the typed stream ends when the channel closes"
    );
}

#[tokio::test]
async fn a_server_off_contract_gives_decode_errors_that_say_which_type_and_why() {
    let s = start().await;
    let socket = s.socket("ada");
    let legacy = socket.typed_channel::<Room>("legacy:1", &nick("ada"));
    let mut messages = legacy.on::<Message, _>();

    // The join reply is not a Welcome; the channel is joined nonetheless.
    let Err(TypedJoinError::Decode(e)) = legacy.join().await else {
        panic!("the join reply should not decode");
    };
    assert!(e.type_name().ends_with("Welcome"), "{e}");
    assert!(e.reason().contains("missing field"), "{e}");
    assert_eq!(e.payload().to_value(), Some(json!({"hello": "legacy"})));

    // An `ok` reply of the wrong shape.
    let Err(TypedPushError::Decode(e)) = legacy.push(&Add { a: 2, b: 40 }).await else {
        panic!("the reply should not decode");
    };
    assert!(e.type_name().ends_with("contract::Sum"), "{e}");
    assert!(e.reason().contains("missing field `sum`"), "{e}");
    assert_eq!(e.payload().to_value(), Some(json!({"total": 42})));
    let shown = TypedPushError::Decode(e).to_string();
    assert!(shown.contains("Sum`: missing field `sum`"), "{shown}");

    // An `error` reply that is not an ErrorReply.
    let Err(TypedPushError::Decode(e)) = legacy.push(&Nap { ms: 0 }).await else {
        panic!("the error reply should not decode");
    };
    assert!(e.type_name().ends_with("ErrorReply"), "{e}");
    assert!(e.reason().contains("missing field `reason`"), "{e}");

    // An event of the wrong shape is an error item, and the stream goes on.
    legacy.push(&NewMsg { body: "x".into() }).await.unwrap();
    let e = tokio::time::timeout(WAIT, messages.recv())
        .await
        .unwrap()
        .unwrap()
        .expect_err("the old shape should not decode");
    assert!(e.type_name().ends_with("Message"), "{e}");
    assert!(e.reason().contains("missing field `nick`"), "{e}");
    assert_eq!(e.payload().to_value(), Some(json!({"text": "old shape"})));
    assert_eq!(
        next_typed(&mut messages).await,
        Message {
            nick: "legacy".into(),
            body: "new shape".into()
        }
    );
}

/// The typed channel is the untyped one underneath: on a recoverable topic it rejoins with its
/// typed params plus the last position it saw, and gets what it missed, decoded.
#[tokio::test]
async fn a_typed_channel_rejoins_with_its_params_and_recovers_what_it_missed() {
    let s = start().await;
    let socket = s.socket("rec");
    let room = socket.typed_channel::<Room>("room:feed", &nick("rec"));
    let mut messages = room.on::<Message, _>();
    let mut events = room.channel().events();
    room.join().await.unwrap();
    let said = |n: u32| json!({"nick": "server", "body": n.to_string()});

    s.endpoint.broadcast("room:feed", "new_msg", said(1));
    assert_eq!(next_typed(&mut messages).await.body, "1");

    s.endpoint.disconnect("user:rec");
    s.endpoint.broadcast("room:feed", "new_msg", said(2));
    s.endpoint.broadcast("room:feed", "new_msg", said(3));
    let rejoined = until(&mut events, |e| match e {
        ChannelEvent::Joined { .. } if e.recovered().is_some() => Some(e),
        _ => None,
    })
    .await;
    assert_eq!(rejoined.recovered(), Some(true));
    let ChannelEvent::Joined { response } = rejoined else {
        unreachable!()
    };
    // The rejoin's params were the contract's (the server's typed join decoded the nick).
    let welcome: Welcome = response.decode().unwrap();
    assert_eq!(welcome.nick, "rec");

    s.endpoint.broadcast("room:feed", "new_msg", said(4));
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(next_typed(&mut messages).await.body);
    }
    assert_eq!(got, ["2", "3", "4"]);
}
