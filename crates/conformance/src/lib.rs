//! The conformance app: the fixed contract of `shared/conformance/APP.md`, which outside test
//! suites (the official `phoenix` client, raw WebSocket and HTTP clients) hold firebrand to,
//! side by side with a real Phoenix server implementing the same contract.
//!
//! [`app`] builds the axum app; the `conformance` binary serves it.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use firebrand::{
    Broadcast, BroadcastError, Channel, ChannelContext, CheckOrigin, ConnectError, ConnectInfo,
    Endpoint, EndpointBuilder, HandleResult, JoinContext, JoinError, Joined, Payload, Reply,
    Socket, SocketBuilder, StopReason,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// Settings of the app (from the binary's flags and environment).
#[derive(Clone, Debug)]
pub struct Config {
    /// Close a WebSocket that sent nothing for this long (`IDLE_TIMEOUT_MS`, default 60 s).
    pub idle_timeout: Duration,
    /// Bytes queued for one client before it is dropped as a slow consumer (default 4 MiB).
    pub outbound_limit: usize,
    /// The long-poll window (default 10 s, as Phoenix).
    pub longpoll_window: Duration,
    /// Messages per second one client may send (default: no limit, as Phoenix).
    pub message_rate: Option<u32>,
    /// Joins per second one client may send (default: no limit, as Phoenix).
    pub join_rate: Option<u32>,
    /// Broadcasts kept per stream topic for recovery on rejoin (`STREAM_HISTORY`, default 1000).
    pub stream_history: usize,
    /// How long they are kept (`STREAM_HISTORY_TTL_MS`, default 300 s).
    pub stream_history_ttl: Duration,
    /// How long `POST /api/broadcast` waits for the cluster's engine to confirm a broadcast
    /// before answering 202 (`BROADCAST_CONFIRM_MS`, default [`BROADCAST_CONFIRM`]).
    pub broadcast_confirm: Duration,
    /// Offer permessage-deflate to WebSocket clients (`COMPRESS=1`, default off, as Phoenix).
    pub compress: bool,
}

/// How long `POST /api/broadcast` waits, by default, for the cluster's engine to confirm a
/// broadcast (see [`router`]).
pub const BROADCAST_CONFIRM: Duration = Duration::from_secs(5);

impl Default for Config {
    fn default() -> Self {
        Config {
            idle_timeout: Duration::from_secs(60),
            outbound_limit: 4 << 20,
            longpoll_window: Duration::from_secs(10),
            message_rate: None,
            join_rate: None,
            stream_history: 1000,
            stream_history_ttl: Duration::from_secs(300),
            broadcast_confirm: BROADCAST_CONFIRM,
            compress: false,
        }
    }
}

/// The app's socket: [`UserSocket`] with `room:*` routed to [`RoomChannel`] and `stream:*` to
/// [`StreamChannel`].
pub fn socket(endpoint: &Endpoint, config: &Config) -> SocketBuilder<UserSocket> {
    endpoint
        .socket(UserSocket)
        .channel::<RoomChannel>("room:*")
        .channel::<StreamChannel>("stream:*")
        .check_origin(CheckOrigin::allow(["//localhost", "//127.0.0.1"]))
        .idle_timeout(config.idle_timeout)
        .outbound_limit(config.outbound_limit)
        .compress(config.compress)
        .longpoll(config.longpoll_window)
        .message_rate(config.message_rate)
        .join_rate(config.join_rate)
        .max_channels(100)
}

/// The app's endpoint settings: stream topics keep their history (add an adapter for a
/// cluster).
pub fn endpoint(config: &Config) -> EndpointBuilder {
    Endpoint::builder().history("stream:*", config.stream_history, config.stream_history_ttl)
}

/// The app's router and its endpoint (for shutdown and stats), on a single node.
pub fn app(config: &Config) -> (Router, Endpoint) {
    let endpoint = endpoint(config).build();
    (router(config, &endpoint), endpoint)
}

/// The app's router on `endpoint` (which may be a node of a cluster).
///
/// `POST /api/broadcast` answers once the broadcast is safe, as APP.md says: 200
/// `{"ok":true}` when the cluster's engine confirmed it (at once on a node alone: see
/// [`Endpoint::broadcast_confirmed`]). On a node of a cluster it may also answer 503
/// `{"error": "<why>", "reason": "unreachable" | "queue_full" | "unconfirmed"}` when it was
/// lost on the way to the engine (`unconfirmed`: the connection failed with it in flight, so
/// other nodes may have got it, once), or 202 `{"ok": true, "queued": true, "info": "<what
/// that means>"}` when the engine did not confirm it within [`Config::broadcast_confirm`]: the
/// link is stalled, and the broadcast waits in its connection, delivered when the link carries
/// again (or lost if the connection is torn down first). Nothing answered 200 is lost.
pub fn router(config: &Config, endpoint: &Endpoint) -> Router {
    let socket = socket(endpoint, config).into_router();
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/api/broadcast", post(api_broadcast))
        .with_state(Api {
            endpoint: endpoint.clone(),
            confirm: config.broadcast_confirm,
        })
        .nest("/socket", socket)
}

/// What `/api/broadcast` needs.
#[derive(Clone)]
struct Api {
    endpoint: Endpoint,
    confirm: Duration,
}

#[derive(Deserialize)]
struct BroadcastBody {
    topic: String,
    event: String,
    payload: serde_json::Map<String, Value>,
}

/// `POST /api/broadcast {"topic","event","payload"}`: Phoenix's `Endpoint.broadcast`. As in
/// Phoenix, a `"disconnect"` to a socket id closes that id's connections: firebrand keeps
/// socket ids apart from topics (no channel can reach them), so this trusted, server-side call
/// does it with `Endpoint::disconnect`.
async fn api_broadcast(
    State(Api { endpoint, confirm }): State<Api>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    match serde_json::from_slice::<BroadcastBody>(&body) {
        Ok(b) => {
            if b.event == "disconnect" {
                endpoint.disconnect(&b.topic);
            }
            let sent = endpoint.broadcast_confirmed(&b.topic, &b.event, Value::Object(b.payload));
            match tokio::time::timeout(confirm, sent).await {
                // A protocol event is dropped (and logged), as `Endpoint::broadcast` does;
                // APP.md answers 200 all the same.
                Ok(Ok(()) | Err(BroadcastError::ReservedEvent)) => {
                    (StatusCode::OK, Json(json!({"ok": true})))
                }
                Ok(Err(e)) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": e.to_string(), "reason": e.code()})),
                ),
                Err(_) => (
                    StatusCode::ACCEPTED,
                    Json(json!({
                        "ok": true,
                        "queued": true,
                        "info": format!(
                            "the cluster's engine did not confirm it within {} ms (its link is \
                             stalled): queued, delivered to the other nodes when the link carries \
                             again, or lost if the connection is torn down first",
                            confirm.as_millis()
                        ),
                    })),
                ),
            }
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

/// The contract's socket: refuses `token=bad`; the assigns are the `user` param; the socket id
/// is `user_socket:<user>`.
pub struct UserSocket;

impl Socket for UserSocket {
    type Assigns = Option<String>;

    async fn connect(&self, info: &ConnectInfo) -> Result<Self::Assigns, ConnectError> {
        if info.param("token") == Some("bad") {
            return Err(ConnectError::forbidden());
        }
        Ok(info.param("user").map(str::to_owned))
    }

    fn id(&self, user: &Self::Assigns) -> Option<String> {
        user.as_ref().map(|u| format!("user_socket:{u}"))
    }
}

/// `room:*`, as the contract's RoomChannel table says.
pub struct RoomChannel;

/// Unix seconds, as a string (the contract's `online_at`).
fn online_at() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.unwrap_or_default().as_secs().to_string()
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
}

impl Channel for RoomChannel {
    type Assigns = Option<String>;
    type State = ();
    type Info = ();
    const INTERCEPTS: &'static [&'static str] = &["shout"];

    async fn join(
        topic: &str,
        _params: Payload,
        _ctx: &JoinContext<'_, Self::Assigns>,
    ) -> Result<Joined<Self>, JoinError> {
        let name = topic.strip_prefix("room:").unwrap_or(topic);
        match name {
            "private" => Err(JoinError::reason("unauthorized")),
            "join_crash" => panic!("join crashed on purpose"),
            "slow_join" => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(Joined::new(RoomChannel))
            }
            "lobby" => Ok(Joined::new(RoomChannel)),
            other => Ok(Joined::new(RoomChannel).reply(json!({ "joined": other }))),
        }
    }

    async fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        handle_in(event, payload, ctx).await
    }

    /// With a user: track it in Presence and push `presence_state` (Phoenix's after-join idiom).
    async fn after_join(&mut self, ctx: &mut ChannelContext<Self>) {
        let Some(user) = ctx.assigns().clone() else {
            return;
        };
        if let Err(e) = ctx.track(&user, json!({ "online_at": online_at() })) {
            tracing::warn!(error = %e, "presence not tracked");
        }
        let list = ctx.presence_list();
        ctx.push("presence_state", list);
    }

    /// `shout` goes to each subscriber with `"to"` set to that subscriber's user.
    async fn handle_out(&mut self, broadcast: Broadcast, ctx: &mut ChannelContext<Self>) {
        shout_to(broadcast, ctx);
    }
}

/// The contract's events (RoomChannel's table; StreamChannel's too).
async fn handle_in<C: Channel<Assigns = Option<String>>>(
    event: &str,
    payload: Payload,
    ctx: &mut ChannelContext<C>,
) -> HandleResult {
    match event {
        "new_msg" => ctx.broadcast("new_msg", payload),
        // Unrecorded on stream topics (APP.md: only `new_msg` pushes and API broadcasts are).
        "new_msg_from" => ctx.broadcast_from_unrecorded("new_msg", payload),
        "ping" => return Ok(Some(Reply::ok(payload))),
        "sleep" => {
            let Sleep { ms } = payload.decode()?;
            tokio::time::sleep(Duration::from_millis(ms.min(5000))).await;
            return Ok(Some(Reply::ok(json!({}))));
        }
        "error_reply" => return Err(Reply::error(json!({"reason": "requested"}))),
        "push_me" => {
            ctx.push("pushed", payload);
            return Ok(Some(Reply::ok(json!({}))));
        }
        "async_reply" => {
            if let Some(reply) = ctx.reply_later() {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    reply.send(Reply::ok(payload));
                });
            }
        }
        "stop" => {
            ctx.stop(StopReason::Shutdown);
            return Ok(Some(Reply::ok(json!({}))));
        }
        "crash" => panic!("handle_in crashed on purpose"),
        "shout" => ctx.broadcast_unrecorded("shout", payload),
        "disconnect_me" => {
            if let Some(user) = ctx.assigns() {
                ctx.endpoint().disconnect(&format!("user_socket:{user}"));
            }
        }
        "update_presence" => {
            let mut meta = serde_json::Map::new();
            meta.insert("online_at".into(), json!(online_at()));
            if let Some(Value::Object(fields)) = payload.to_value() {
                meta.extend(fields);
            }
            if let Some(user) = ctx.assigns().clone() {
                ctx.update_presence(&user, Value::Object(meta))
                    .map_err(|e| Reply::error(json!({ "reason": e.to_string() })))?;
            }
            return Ok(Some(Reply::ok(json!({}))));
        }
        "binary_echo" => return Ok(Some(Reply::ok(payload))),
        "binary_broadcast" => ctx.broadcast("binary_broadcast", payload),
        _ => {}
    }
    Ok(None)
}

/// `shout`, pushed with `"to"` set to this subscriber's user.
fn shout_to<C: Channel<Assigns = Option<String>>>(
    broadcast: Broadcast,
    ctx: &mut ChannelContext<C>,
) {
    let mut body = match broadcast.payload().to_value() {
        Some(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    body.insert("to".into(), json!(ctx.assigns()));
    ctx.push(broadcast.event(), Value::Object(body));
}

/// `stream:*`, as the contract's StreamChannel section says: broadcasts on it are recorded in
/// the topic's history ([`endpoint`]), delivered with their position, and replayed to a client
/// that rejoins with `{"since": P}`. firebrand adds `"position"` and `"recovered"` to the join
/// reply.
pub struct StreamChannel;

impl Channel for StreamChannel {
    type Assigns = Option<String>;
    type State = ();
    type Info = ();
    const INTERCEPTS: &'static [&'static str] = &["shout"];

    async fn join(
        topic: &str,
        _params: Payload,
        _ctx: &JoinContext<'_, Self::Assigns>,
    ) -> Result<Joined<Self>, JoinError> {
        let name = topic.strip_prefix("stream:").unwrap_or(topic);
        Ok(Joined::new(StreamChannel).reply(json!({ "joined": name })))
    }

    async fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        handle_in(event, payload, ctx).await
    }

    async fn handle_out(&mut self, broadcast: Broadcast, ctx: &mut ChannelContext<Self>) {
        shout_to(broadcast, ctx);
    }
}
