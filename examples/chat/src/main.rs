//! The firebrand chat: rooms, messages, and who is online — a small, complete app to copy from.
//!
//! `cargo run --release --bin chat` serves it on http://127.0.0.1:4000 (`--port` to change).
//! The page (assets/) uses the official `phoenix` client from npm; `build.rs` installs it and
//! this binary embeds it, so one command is all it takes.
//!
//! The room's events are declared once, as Rust types, in `firebrand-chat-contract`
//! (examples/chat-contract): this server serves them with a typed channel, and the page is
//! type-checked against the TypeScript generated from them (assets/contract.d.ts; see
//! tests/types/run.sh).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use firebrand::contract::{Empty, ErrorReply};
use firebrand::{
    CheckOrigin, ConnectError, ConnectInfo, Endpoint, Handle, JoinContext, JoinError, Joined,
    Socket, TypedChannel, TypedContext,
};
use firebrand_chat_contract::{JoinParams, JoinReply, Message, Meta, NewMsg, RoomContract};

/// The user's socket. Anyone with a name may chat: a real app would verify a signed token
/// here instead (see `firebrand::TokenSigner`).
struct ChatSocket;

impl Socket for ChatSocket {
    /// The user name, readable by every channel of the connection.
    type Assigns = String;

    async fn connect(&self, info: &ConnectInfo) -> Result<String, ConnectError> {
        let name = info.param("user").unwrap_or("").trim();
        if name.is_empty() || name.chars().count() > 32 {
            return Err(ConnectError::forbidden());
        }
        Ok(name.to_owned())
    }
}

/// The app state: the rules of the rooms, set once in `main` and read by every room through
/// `ctx.state()` (given to `Endpoint::socket_with_state`).
#[derive(Clone, Debug)]
struct Rooms {
    /// How many of a room's last messages a newcomer sees (at most what its history keeps).
    recent: usize,
    /// The longest message, in characters.
    max_chars: usize,
}

impl Rooms {
    /// Rooms are named with a-z, 0-9, `-` and `_`, 1 to 32 of them.
    fn valid_name(&self, name: &str) -> bool {
        (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    }
}

/// How many messages a room keeps (for newcomers and for tabs that come back), and how long.
const HISTORY: (usize, Duration) = (100, Duration::from_secs(3600));

/// One chat room per topic `room:<name>`, serving the chat's contract
/// (`firebrand_chat_contract::RoomContract`, shared with the page's generated TypeScript).
struct Room;

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl TypedChannel for Room {
    type Contract = RoomContract;
    type Assigns = String;
    type State = Rooms;
    type Info = ();

    async fn join(
        topic: &str,
        // `since` is read by firebrand itself: rooms are recoverable topics (see `main`).
        _params: JoinParams,
        ctx: &JoinContext<'_, String, Rooms>,
    ) -> Result<Joined<Self, JoinReply>, JoinError> {
        let rooms = ctx.state();
        match topic.strip_prefix("room:") {
            // A newcomer sees the room's last messages; a tab that comes back after losing its
            // connection gets what it missed (the page rejoins with `since`). The reply's
            // `position` and `recovered` are filled in by the room's history.
            Some(name) if rooms.valid_name(name) => {
                Ok(Joined::with_reply(Room, JoinReply::default()).recent(rooms.recent))
            }
            _ => Err(JoinError::reason("rooms are named with a-z, 0-9, - and _")),
        }
    }

    /// Show up in the room's presence, then send the newcomer who is already there.
    async fn after_join(&mut self, ctx: &mut TypedContext<'_, Self>) {
        let user = ctx.assigns().clone();
        let meta = Meta {
            online_at: unix_now().as_secs().to_string(),
        };
        if let Err(e) = ctx.track(&user, &meta) {
            tracing::warn!(error = %e, "presence not tracked");
        }
        ctx.push_presence_state();
    }
}

/// `new_msg`: a payload of the wrong shape never gets here (firebrand answers it with an error
/// reply naming the field); any other event is answered `unknown event`.
impl Handle<NewMsg> for Room {
    async fn handle(
        &mut self,
        msg: NewMsg,
        ctx: &mut TypedContext<'_, Self>,
    ) -> Result<Empty, ErrorReply> {
        let max = ctx.state().max_chars;
        let body = msg.body.trim();
        if body.is_empty() || body.chars().count() > max {
            return Err(ErrorReply::new(format!(
                "a message has 1 to {max} characters"
            )));
        }
        let message = Message {
            user: ctx.assigns().clone(),
            body: body.to_owned(),
            at: u64::try_from(unix_now().as_millis()).unwrap_or(u64::MAX),
        };
        // Everyone in the room gets it, the sender included; the sender also gets "ok".
        ctx.broadcast(&message);
        Ok(Empty)
    }
}

const INDEX: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
/// The runtime of the generated contract module (its types are in `assets/contract.d.ts`).
const CONTRACT_JS: &str = include_str!("../assets/contract.js");
const PHOENIX_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/phoenix.mjs"));

fn javascript(source: &'static str) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        source,
    )
}

/// The page and its socket; `compress`: offer permessage-deflate (browsers accept it).
fn app(endpoint: &Endpoint, compress: bool) -> Router {
    let socket = endpoint
        .socket_with_state(
            ChatSocket,
            Rooms {
                recent: 50,
                max_chars: 1000,
            },
        )
        .channel::<Room>("room:*")
        .check_origin(CheckOrigin::allow(["//localhost", "//127.0.0.1"]))
        // Browsers that cannot open a WebSocket fall back to long-poll.
        .longpoll(Duration::from_secs(10))
        .compress(compress)
        .into_router();
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/assets/app.js", get(|| async { javascript(APP_JS) }))
        .route(
            "/assets/contract.js",
            get(|| async { javascript(CONTRACT_JS) }),
        )
        .route(
            "/assets/phoenix.mjs",
            get(|| async { javascript(PHOENIX_JS) }),
        )
        .nest("/socket", socket)
}

fn port() -> anyhow::Result<u16> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok(4000),
        (Some("--port"), Some(p)) => p.parse().with_context(|| format!("invalid port {p:?}")),
        _ => anyhow::bail!("usage: chat [--port PORT]   (default 4000)"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let port = port()?;
    // The rooms keep their last 100 messages for an hour. With REDIS_URL set, this node joins
    // the other chat nodes on that Redis: messages and presence span them all (see
    // scripts/chat-cluster.sh), and the history lives in Redis, so a tab recovers what it
    // missed on any node, also after the one it was on went down.
    let (size, max_age) = HISTORY;
    let builder = Endpoint::builder().history("room:*", size, max_age);
    let endpoint = match std::env::var("REDIS_URL") {
        Ok(url) => {
            let adapter = firebrand_redis::RedisAdapter::new(&url)
                .with_context(|| format!("invalid REDIS_URL {url:?}"))?;
            builder.adapter(adapter.namespace("chat")).build()
        }
        Err(_) => builder.build(),
    };
    let server = firebrand::Server::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    println!(
        "chat listening on http://127.0.0.1:{}",
        server.local_addr()?.port()
    );
    // Like axum::serve, plus a deadline on handshakes and a large listen backlog (see
    // firebrand::Server).
    // COMPRESS=1: permessage-deflate, as Phoenix's `websocket: [compress: true]`.
    let compress = std::env::var("COMPRESS").is_ok_and(|v| v == "1");
    server
        .serve(app(&endpoint, compress), shutdown_signal())
        .await?;
    // Close the sockets gradually (code 1012: the page reconnects) before exiting.
    endpoint
        .drain(Duration::from_secs(2), Duration::from_secs(10))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use firebrand_chat_contract::{JoinParams, Message, NewMsg, RoomContract};
    use firebrand_client::TypedPushError;

    /// firebrand-client with the page's contract crate: the same Rust types on both ends.
    #[tokio::test]
    async fn a_rust_client_speaks_the_rooms_contract() {
        let endpoint = Endpoint::builder()
            .history("room:*", 100, Duration::from_secs(60))
            .build();
        let server = firebrand::Server::bind(("127.0.0.1", 0)).await.unwrap();
        let port = server.local_addr().unwrap().port();
        let app = app(&endpoint, false);
        tokio::spawn(async move { server.serve(app, std::future::pending()).await });

        let socket = firebrand_client::Socket::builder(format!("ws://127.0.0.1:{port}/socket"))
            .param("user", "ada")
            .connect()
            .unwrap();
        let room = socket.typed_channel::<RoomContract>("room:lobby", &JoinParams::default());
        let mut messages = room.on::<Message, _>();
        let reply = room.join().await.unwrap();
        assert_eq!(reply.recovered, None, "a first join sends no since");

        room.push(&NewMsg {
            body: "  hello  ".into(),
        })
        .await
        .unwrap();
        let wait = Duration::from_secs(5);
        let message = tokio::time::timeout(wait, messages.recv()).await;
        let message = message.expect("the broadcast").expect("open").unwrap();
        assert_eq!(
            (message.user.as_str(), message.body.as_str()),
            ("ada", "hello")
        );

        let refused = room.push(&NewMsg { body: " ".into() }).await;
        match refused {
            Err(TypedPushError::Reply(e)) => assert!(e.reason.contains("1 to 1000"), "{e:?}"),
            other => panic!("expected the server's error reply, got {other:?}"),
        }
    }
}
