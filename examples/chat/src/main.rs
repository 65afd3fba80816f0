//! The firebrand chat: rooms, messages, and who is online — a small, complete app to copy from.
//!
//! `cargo run --release --bin chat` serves it on http://127.0.0.1:4000 (`--port` to change).
//! The page (assets/) uses the official `phoenix` client from npm; `build.rs` installs it and
//! this binary embeds it, so one command is all it takes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use firebrand::{
    Channel, ChannelContext, CheckOrigin, ConnectError, ConnectInfo, Endpoint, HandleResult,
    JoinContext, JoinError, Joined, Payload, Reply, Socket,
};
use serde::Deserialize;
use serde_json::json;

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

/// One chat room per topic `room:<name>`.
struct Room;

/// What a client sends with `new_msg`.
#[derive(Deserialize)]
struct NewMsg {
    body: String,
}

fn valid_room(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl Channel for Room {
    type Assigns = String;
    type State = ();
    type Info = ();

    async fn join(
        topic: &str,
        _params: Payload,
        _ctx: &JoinContext<'_, String>,
    ) -> Result<Joined<Self>, JoinError> {
        match topic.strip_prefix("room:") {
            // A newcomer sees the room's last 50 messages; a tab that comes back after losing
            // its connection gets what it missed (the page rejoins with `since`).
            Some(name) if valid_room(name) => Ok(Joined::new(Room).recent(50)),
            _ => Err(JoinError::reason("rooms are named with a-z, 0-9, - and _")),
        }
    }

    /// Show up in the room's presence, then send the newcomer who is already there.
    async fn after_join(&mut self, ctx: &mut ChannelContext<Self>) {
        let user = ctx.assigns().clone();
        let online_at = unix_now().as_secs().to_string();
        if let Err(e) = ctx.track(&user, json!({ "online_at": online_at })) {
            tracing::warn!(error = %e, "presence not tracked");
        }
        let list = ctx.presence_list();
        ctx.push("presence_state", list);
    }

    async fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        match event {
            "new_msg" => {
                // A payload of the wrong shape is answered with an error reply by `?`.
                let msg: NewMsg = payload.decode()?;
                let body = msg.body.trim();
                if body.is_empty() || body.chars().count() > 1000 {
                    return Err(Reply::error(
                        json!({"reason": "a message has 1 to 1000 characters"}),
                    ));
                }
                let at = u64::try_from(unix_now().as_millis()).unwrap_or(u64::MAX);
                // Everyone in the room gets it, the sender included; the sender also gets "ok".
                ctx.broadcast(
                    "new_msg",
                    json!({ "user": ctx.assigns(), "body": body, "at": at }),
                );
                Ok(Some(Reply::ok(json!({}))))
            }
            _ => Err(Reply::error(
                json!({"reason": format!("unknown event {event:?}")}),
            )),
        }
    }
}

const INDEX: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const PHOENIX_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/phoenix.mjs"));

fn javascript(source: &'static str) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        source,
    )
}

fn app(endpoint: &Endpoint) -> Router {
    let socket = endpoint
        .socket(ChatSocket)
        .channel::<Room>("room:*")
        .check_origin(CheckOrigin::allow(["//localhost", "//127.0.0.1"]))
        // Browsers that cannot open a WebSocket fall back to long-poll.
        .longpoll(Duration::from_secs(10))
        .into_router();
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/assets/app.js", get(|| async { javascript(APP_JS) }))
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
    // With REDIS_URL set, this node joins the other chat nodes on that Redis: messages and
    // presence span them all (see scripts/chat-cluster.sh).
    let endpoint = match std::env::var("REDIS_URL") {
        Ok(url) => {
            let adapter = firebrand_redis::RedisAdapter::new(&url)
                .with_context(|| format!("invalid REDIS_URL {url:?}"))?;
            Endpoint::builder()
                .adapter(adapter.namespace("chat"))
                .build()
        }
        // Alone, the rooms keep their last 100 messages for an hour. (A clustered endpoint
        // keeps no history yet.)
        Err(_) => Endpoint::builder()
            .history("room:*", 100, Duration::from_secs(3600))
            .build(),
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
    server.serve(app(&endpoint), shutdown_signal()).await?;
    // Close the sockets gradually (code 1012: the page reconnects) before exiting.
    endpoint
        .drain(Duration::from_secs(2), Duration::from_secs(10))
        .await;
    Ok(())
}
