//! The app: a socket that authenticates with [`auth`](crate::auth) (or asks the
//! [backend](crate::backend)), one channel whose rules come from the topic's
//! [namespace](crate::namespace), and the [server API](crate::api).

use std::sync::Arc;

use axum::Router;
use firebrand::{
    Channel, ChannelContext, CheckOrigin, ConnectError, ConnectInfo, Endpoint, HandleResult,
    JoinContext, JoinError, Joined, Payload, Reply, Socket,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::auth::{User, Verifier};
use crate::backend::{Backend, BackendError};
use crate::config::{Cluster, Config, ConnectHook};
use crate::namespace::{JoinRule, Namespace, Namespaces, Pushes};
use crate::webhooks::{Occupant, Webhooks};

/// A connection's assigns: its user, and the rules its joins are checked against.
struct Session {
    user: User,
    rules: Arc<Rules>,
}

struct Rules {
    namespaces: Namespaces,
    /// Checks join tokens (`None` in development mode).
    verifier: Option<Verifier>,
    /// Makes the join and push calls.
    backend: Backend,
    /// Counts channels and presences, and tells the backend (if configured).
    webhooks: Webhooks,
    /// The outbox's consumer, if any: joins of its topics wait until it has started.
    outbox: Option<Arc<firebrand_postgres::Running>>,
}

/// How long a join of an outbox topic waits for the outbox's consumer to start (to have
/// connected once) before it is refused with `{"reason":"outbox unavailable"}` (the client
/// rejoins later by itself).
const OUTBOX_JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The backend's answer to a connect.
#[derive(Deserialize)]
struct ConnectAnswer {
    allow: bool,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    info: Value,
}

/// The backend's answer to a join.
#[derive(Deserialize)]
struct JoinAnswer {
    allow: bool,
    #[serde(default)]
    reply: Option<Value>,
}

/// The backend's answer to a push.
#[derive(Deserialize)]
struct PushAnswer {
    action: PushAction,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    reply: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PushAction {
    Broadcast,
    Reject,
}

/// Authenticates connections: a valid token gives its user; no token gives an anonymous user
/// when that is allowed; anything else is refused with 403. With a connect backend, the
/// backend decides instead.
struct ServerSocket {
    rules: Arc<Rules>,
    allow_anonymous: bool,
    connect: Option<ConnectHook>,
}

impl ServerSocket {
    /// Asks the backend: its user, or 403 (refused) or 503 (unavailable).
    async fn ask_backend(
        &self,
        hook: &ConnectHook,
        info: &ConnectInfo,
    ) -> Result<User, ConnectError> {
        let params: Map<String, Value> = info
            .params()
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let headers: Map<String, Value> = hook
            .headers
            .iter()
            .filter_map(|name| {
                let values: Vec<&str> = info
                    .headers()
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!values.is_empty()).then(|| (name.clone(), Value::String(values.join(", "))))
            })
            .collect();
        let body = json!({"params": params, "headers": headers, "auth_token": info.auth_token()});
        let peer = info.peer_addr();
        match self
            .rules
            .backend
            .call::<ConnectAnswer>("connect", &hook.url, &body)
            .await
        {
            Ok(ConnectAnswer {
                allow: true,
                user,
                info,
            }) => Ok(User {
                id: user.filter(|u| !u.is_empty()),
                info,
            }),
            Ok(_) => {
                tracing::info!(?peer, "connection refused by the backend");
                Err(ConnectError::forbidden())
            }
            Err(e) if e.is_refusal() => {
                tracing::info!(?peer, error = %e, "connection refused by the backend");
                Err(ConnectError::forbidden())
            }
            Err(e) => {
                // A refusal for too many calls in flight is logged by the backend (rate-limited).
                if !matches!(e, BackendError::Busy(_)) {
                    tracing::warn!(?peer, error = %e, "connection refused: the connect backend is unavailable");
                }
                Err(ConnectError::status(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                ))
            }
        }
    }
}

impl Socket for ServerSocket {
    type Assigns = Session;

    async fn connect(&self, info: &ConnectInfo) -> Result<Session, ConnectError> {
        if let Some(hook) = &self.connect {
            let user = self.ask_backend(hook, info).await?;
            return Ok(Session {
                user,
                rules: self.rules.clone(),
            });
        }
        let token = info.auth_token().or_else(|| info.param("token"));
        let user = match (token, &self.rules.verifier) {
            (Some(token), Some(verifier)) => match verifier.verify(token) {
                Ok(user) => user,
                Err(e) => {
                    tracing::info!(peer = ?info.peer_addr(), error = %e, "connection refused");
                    return Err(ConnectError::forbidden());
                }
            },
            // Development mode: no key to check a token with; the connection is anonymous.
            _ if self.allow_anonymous => User::anonymous(),
            _ => {
                tracing::info!(peer = ?info.peer_addr(), "connection refused: no token");
                return Err(ConnectError::forbidden());
            }
        };
        Ok(Session {
            user,
            rules: self.rules.clone(),
        })
    }

    fn id(&self, session: &Session) -> Option<String> {
        session.user.id.as_deref().map(socket_id)
    }
}

/// The socket id of `user`'s connections: what `POST /api/disconnect` closes.
pub(crate) fn socket_id(user: &str) -> String {
    format!("user_socket:{user}")
}

/// Every topic: joins, pushes and presence as its namespace says.
struct TopicChannel {
    namespace: Arc<Namespace>,
    /// Counts this channel in its topic until it is dropped (the webhooks' occupied/vacated).
    occupant: Occupant,
}

/// Events a client may not push, nor the API publish: those the official client handles
/// itself rather than handing to the app — the protocol's (`phx_*`, and `chan_reply_<ref>`,
/// which phoenix.js takes as the reply to its push `<ref>`: relayed, it would let one client
/// answer another's requests) and Presence's (which would corrupt other clients' lists).
pub(crate) fn reserved(event: &str) -> bool {
    firebrand::is_protocol_event(event) || event == "presence_state" || event == "presence_diff"
}

impl Channel for TopicChannel {
    type Assigns = Session;
    type State = ();
    type Info = ();

    async fn join(
        topic: &str,
        params: Payload,
        ctx: &JoinContext<'_, Session>,
    ) -> Result<Joined<Self>, JoinError> {
        let Session { user, rules } = ctx.assigns();
        let Some(namespace) = rules.namespaces.find(topic) else {
            return Err(JoinError::reason("unmatched topic"));
        };
        let refused = |why: &dyn std::fmt::Display| {
            tracing::info!(topic, user = user.id.as_deref(), %why, "join refused");
            JoinError::reason("unauthorized")
        };
        if let (true, Some(outbox)) = (namespace.outbox, &rules.outbox) {
            // Until the consumer's cursor is fixed, rows committed after this join (or after
            // a rejoin's read of the table) could be neither live nor read: wait for it.
            if tokio::time::timeout(OUTBOX_JOIN_WAIT, outbox.started())
                .await
                .is_err()
            {
                tracing::info!(topic, "join refused: the outbox has not connected yet");
                return Err(JoinError::reason("outbox unavailable"));
            }
        }
        let mut reply = None;
        match namespace.join {
            JoinRule::Anyone => {}
            JoinRule::Backend => {
                let Some(url) = &namespace.join_url else {
                    return Err(refused(&"no join_url"));
                };
                let body = json!({"user": user.id, "topic": topic, "params": params.to_value()});
                match rules.backend.call::<JoinAnswer>("join", url, &body).await {
                    Ok(JoinAnswer {
                        allow: true,
                        reply: r,
                    }) => reply = r,
                    Ok(JoinAnswer {
                        allow: false,
                        reply: Some(r),
                    }) => {
                        tracing::info!(
                            topic,
                            user = user.id.as_deref(),
                            "join refused by the backend"
                        );
                        return Err(JoinError::new(r));
                    }
                    Ok(JoinAnswer { allow: false, .. }) => {
                        return Err(refused(&"refused by the backend"));
                    }
                    Err(e) if e.is_refusal() => return Err(refused(&e)),
                    Err(e) => {
                        if !matches!(e, BackendError::Busy(_)) {
                            tracing::warn!(topic, error = %e, "join refused: the join backend is unavailable");
                        }
                        return Err(JoinError::reason("backend unavailable"));
                    }
                }
            }
            JoinRule::User => {
                let own = topic.strip_prefix(&*namespace.prefix);
                if user.id.is_none() || user.id.as_deref() != own {
                    return Err(refused(&"another user's topic"));
                }
            }
            JoinRule::Token => {
                let params = params.to_value();
                let token = params.as_ref().and_then(|p| p.get("token")?.as_str());
                match (token, &rules.verifier) {
                    (Some(token), Some(verifier)) => verifier
                        .verify_join(token, topic, user)
                        .map_err(|e| refused(&e))?,
                    (None, _) => return Err(refused(&"no join token")),
                    // The config refuses join = "token" without a key.
                    (Some(_), None) => return Err(refused(&"no key")),
                }
            }
        }
        let joined = Joined::new(TopicChannel {
            namespace: namespace.clone(),
            occupant: rules.webhooks.occupy(topic),
        });
        Ok(match (reply, &user.id) {
            (Some(reply), _) => joined.reply(reply),
            (None, Some(id)) => joined.reply(json!({ "user": id })),
            (None, None) => joined,
        })
    }

    /// On a presence namespace: track the user (not an anonymous connection) with
    /// `{"user": sub, "info": info}`, and push `presence_state`.
    async fn after_join(&mut self, ctx: &mut ChannelContext<Self>) {
        if !self.namespace.presence {
            return;
        }
        let user = &ctx.assigns().user;
        if let Some(id) = user.id.clone() {
            let meta = json!({ "user": id, "info": user.info });
            match ctx.track(&id, meta.clone()) {
                Ok(_) => self.occupant.present(&id, &meta),
                Err(e) => tracing::warn!(error = %e, "presence not tracked"),
            }
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
        match self.namespace.pushes {
            Pushes::Rejected => Err(Reply::error(json!({"reason": "pushes are not allowed"}))),
            Pushes::Broadcast | Pushes::Backend if reserved(event) => {
                Err(Reply::error(json!({"reason": "reserved event"})))
            }
            Pushes::Backend => self.ask_backend(event, payload, ctx).await,
            Pushes::Broadcast => {
                ctx.broadcast_from(event, payload);
                Ok(Some(Reply::ok(json!({}))))
            }
        }
    }
}

impl TopicChannel {
    /// Asks the backend what to do with a push: broadcast it (maybe rewritten) or reject it.
    async fn ask_backend(
        &self,
        event: &str,
        payload: Payload,
        ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        let Some(url) = &self.namespace.push_url else {
            return Err(Reply::error(json!({"reason": "pushes are not allowed"})));
        };
        let Some(value) = payload.to_value() else {
            return Err(Reply::error(json!({"reason": "binary payload"})));
        };
        let Session { user, rules } = ctx.assigns();
        let body = json!({"user": user.id, "topic": ctx.topic(), "event": event, "payload": value});
        let answer = rules.backend.call::<PushAnswer>("push", url, &body).await;
        match answer {
            Ok(PushAnswer {
                action: PushAction::Broadcast,
                payload: rewritten,
                reply,
            }) => {
                ctx.broadcast_from(event, rewritten.map_or(payload, Payload::from));
                Ok(Some(Reply::ok(reply.unwrap_or_else(|| json!({})))))
            }
            Ok(PushAnswer {
                action: PushAction::Reject,
                reply,
                ..
            }) => Err(Reply::error(
                reply.unwrap_or_else(|| json!({"reason": "rejected"})),
            )),
            Err(e) if e.is_refusal() => Err(Reply::error(json!({"reason": "rejected"}))),
            Err(e) => {
                if !matches!(e, BackendError::Busy(_)) {
                    tracing::warn!(topic = ctx.topic(), error = %e, "push refused: the push backend is unavailable");
                }
                Err(Reply::error(json!({"reason": "backend unavailable"})))
            }
        }
    }
}

/// The endpoint of `config`: on its own, or a node of the configured cluster.
pub fn endpoint(config: &Config) -> anyhow::Result<Endpoint> {
    use anyhow::Context;
    let builder = Endpoint::builder();
    let builder = match &config.cluster {
        Some(Cluster::Redis(url)) => {
            // Without its password: an error is printed, logged, collected.
            let adapter = firebrand_redis::RedisAdapter::new(url)
                .map_err(|e| anyhow::anyhow!(crate::config::redact_in(e.to_string(), url)))
                .with_context(|| {
                    format!("invalid Redis URL {:?}", crate::config::redact_url(url))
                })?;
            builder.adapter(adapter.namespace(&config.namespace))
        }
        Some(Cluster::Nats(url)) => {
            builder.adapter(firebrand_nats::NatsAdapter::new(url).namespace(&config.namespace))
        }
        None => builder,
    };
    let builder = match &config.cluster_secret {
        Some(secret) => builder.cluster_secret(secret.clone()),
        None => builder,
    };
    let builder = builder.history_budget(config.history_budget);
    // Recoverable namespaces, longest prefix first (the library takes the first match; the
    // config makes sure a namespace inside a recoverable one is recoverable too). Those of the
    // outbox read their history from its table (one connection for all of them).
    let source = outbox(config).map(|o| o.source());
    let builder = config
        .namespaces
        .iter()
        .fold(builder, |b, ns| match (ns.history, &source) {
            (Some(h), Some(source)) if ns.outbox => b.history_source(
                &format!("{}*", ns.prefix),
                h.size,
                h.max_age,
                source.clone(),
            ),
            (Some(h), _) => b.history(&format!("{}*", ns.prefix), h.size, h.max_age),
            (None, _) => b,
        });
    Ok(builder.build())
}

/// The outbox consumer of `config` (`[outbox]`), not started.
fn outbox(config: &Config) -> Option<firebrand_postgres::Outbox> {
    let o = config.outbox.as_ref()?;
    let outbox = firebrand_postgres::Outbox::new(o.url.clone());
    let outbox = match &o.schema {
        Some(schema) => outbox.schema_table(schema, &o.table),
        None => outbox.table(&o.table),
    };
    Some(outbox.poll(o.poll).retention(o.retention))
}

/// The router: the socket at `/socket` (phoenix.js connects to `/socket/websocket`, or
/// `/socket/longpoll` when long-poll is on), the server API under `/api/`.
///
/// With webhooks configured, this starts their sender task, and with an `[outbox]` its
/// consumer (which connects in the background, and again whenever the connection is lost;
/// `/ready` says while it is not connected): call it inside a tokio runtime. The consumer
/// stops when the router is dropped.
pub fn router(config: &Config, endpoint: &Endpoint) -> Router {
    let origins = if config.origins.iter().any(|o| o == "*") {
        CheckOrigin::any()
    } else {
        CheckOrigin::allow(config.origins.iter().map(String::as_str))
    };
    let outbox = outbox(config).map(|o| Arc::new(o.start(endpoint)));
    let socket = endpoint.socket(ServerSocket {
        rules: Arc::new(Rules {
            outbox: outbox.clone(),
            namespaces: config.namespaces.clone(),
            verifier: config.auth.verifier.clone(),
            backend: config.backend.clone(),
            webhooks: match &config.webhooks {
                // A client of their own, outside the calls' cap: one request at a time.
                Some(hooks) => Webhooks::start(
                    hooks,
                    Backend::new(config.backend.timeout(), 1),
                    endpoint.node(),
                ),
                None => Webhooks::default(),
            },
        }),
        allow_anonymous: config.auth.allow_anonymous,
        connect: config.auth.connect.clone(),
    });
    let socket = if config.longpoll {
        // Phoenix's poll window.
        socket.longpoll(std::time::Duration::from_secs(10))
    } else {
        socket
    };
    let socket = socket
        .channel::<TopicChannel>("*")
        .check_origin(origins)
        .compress(config.compress)
        .into_router();
    Router::new()
        .nest("/socket", socket)
        .merge(crate::api::router(config.api.clone(), endpoint.clone()))
        .merge(crate::ops::router_with(
            endpoint.clone(),
            config.metrics,
            outbox,
        ))
}
