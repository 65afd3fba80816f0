//! The app: a socket that authenticates with [`auth`](crate::auth), one channel whose rules
//! come from the topic's [namespace](crate::namespace), and the [server API](crate::api).

use std::sync::Arc;

use axum::Router;
use firebrand::{
    Channel, ChannelContext, CheckOrigin, ConnectError, ConnectInfo, Endpoint, HandleResult,
    JoinContext, JoinError, Joined, Payload, Reply, Socket,
};
use serde_json::json;

use crate::auth::{User, Verifier};
use crate::config::{Cluster, Config};
use crate::namespace::{JoinRule, Namespace, Namespaces, Pushes};

/// A connection's assigns: its user, and the rules its joins are checked against.
struct Session {
    user: User,
    rules: Arc<Rules>,
}

struct Rules {
    namespaces: Namespaces,
    /// Checks join tokens (`None` in development mode).
    verifier: Option<Verifier>,
}

/// Authenticates connections: a valid token gives its user; no token gives an anonymous user
/// when that is allowed; anything else is refused with 403.
struct ServerSocket {
    rules: Arc<Rules>,
    allow_anonymous: bool,
}

impl Socket for ServerSocket {
    type Assigns = Session;

    async fn connect(&self, info: &ConnectInfo) -> Result<Session, ConnectError> {
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
            (_, None) if self.allow_anonymous => User::anonymous(),
            (None, Some(_)) if self.allow_anonymous => User::anonymous(),
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
        session
            .user
            .id
            .as_ref()
            .map(|id| format!("user_socket:{id}"))
    }
}

/// Every topic: joins, pushes and presence as its namespace says.
struct TopicChannel {
    namespace: Arc<Namespace>,
}

/// Events a client may not push: the protocol's and Presence's.
fn reserved(event: &str) -> bool {
    event.starts_with("phx_") || event == "presence_state" || event == "presence_diff"
}

impl Channel for TopicChannel {
    type Assigns = Session;
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
        match namespace.join {
            JoinRule::Anyone => {}
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
        });
        Ok(match &user.id {
            Some(id) => joined.reply(json!({ "user": id })),
            None => joined,
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
            if let Err(e) = ctx.track(&id, meta) {
                tracing::warn!(error = %e, "presence not tracked");
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
            Pushes::Broadcast if reserved(event) => {
                Err(Reply::error(json!({"reason": "reserved event"})))
            }
            Pushes::Broadcast => {
                ctx.broadcast_from(event, payload);
                Ok(Some(Reply::ok(json!({}))))
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
            let adapter = firebrand_redis::RedisAdapter::new(url)
                .with_context(|| format!("invalid Redis URL {url:?}"))?;
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
    // Recoverable namespaces, longest prefix first (the library takes the first match; the
    // config makes sure a namespace inside a recoverable one is recoverable too).
    let builder = config
        .namespaces
        .iter()
        .fold(builder, |b, ns| match ns.history {
            Some(h) => b.history(&format!("{}*", ns.prefix), h.size, h.max_age),
            None => b,
        });
    Ok(builder.build())
}

/// The router: the socket at `/socket` (phoenix.js connects to `/socket/websocket`, or
/// `/socket/longpoll` when long-poll is on), the server API under `/api/`.
pub fn router(config: &Config, endpoint: &Endpoint) -> Router {
    let origins = if config.origins.iter().any(|o| o == "*") {
        CheckOrigin::any()
    } else {
        CheckOrigin::allow(config.origins.iter().map(String::as_str))
    };
    let socket = endpoint.socket(ServerSocket {
        rules: Arc::new(Rules {
            namespaces: config.namespaces.clone(),
            verifier: config.auth.verifier.clone(),
        }),
        allow_anonymous: config.auth.allow_anonymous,
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
        .into_router();
    Router::new()
        .nest("/socket", socket)
        .merge(crate::api::router(config.api.clone(), endpoint.clone()))
}
