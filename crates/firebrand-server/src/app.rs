//! The app: a socket that authenticates with [`auth`](crate::auth) and a channel for every
//! topic.

use std::sync::Arc;

use axum::Router;
use firebrand::{
    Channel, ChannelContext, CheckOrigin, ConnectError, ConnectInfo, Endpoint, HandleResult,
    JoinContext, JoinError, Joined, Payload, Reply, Socket,
};
use serde_json::json;

use crate::auth::{User, Verifier};
use crate::config::{Cluster, Config};

/// Authenticates connections: a valid token gives its user; no token gives an anonymous user
/// when that is allowed; anything else is refused with 403.
struct ServerSocket {
    verifier: Option<Verifier>,
    allow_anonymous: bool,
}

impl Socket for ServerSocket {
    type Assigns = Arc<User>;

    async fn connect(&self, info: &ConnectInfo) -> Result<Arc<User>, ConnectError> {
        let token = info.auth_token().or_else(|| info.param("token"));
        match (token, &self.verifier) {
            (Some(token), Some(verifier)) => match verifier.verify(token) {
                Ok(user) => Ok(Arc::new(user)),
                Err(e) => {
                    tracing::info!(peer = ?info.peer_addr(), error = %e, "connection refused");
                    Err(ConnectError::forbidden())
                }
            },
            // Development mode: no key to check a token with; the connection is anonymous.
            (_, None) if self.allow_anonymous => Ok(Arc::new(User::anonymous())),
            (None, Some(_)) if self.allow_anonymous => Ok(Arc::new(User::anonymous())),
            _ => {
                tracing::info!(peer = ?info.peer_addr(), "connection refused: no token");
                Err(ConnectError::forbidden())
            }
        }
    }

    fn id(&self, user: &Arc<User>) -> Option<String> {
        user.id.as_ref().map(|id| format!("user_socket:{id}"))
    }
}

/// Every topic, for now: anyone connected may join; client pushes are refused.
struct TopicChannel;

impl Channel for TopicChannel {
    type Assigns = Arc<User>;
    type Info = ();

    async fn join(
        _topic: &str,
        _params: Payload,
        ctx: &JoinContext<'_, Arc<User>>,
    ) -> Result<Joined<Self>, JoinError> {
        let joined = Joined::new(TopicChannel);
        Ok(match &ctx.assigns().id {
            Some(id) => joined.reply(json!({ "user": id })),
            None => joined,
        })
    }

    async fn handle_in(
        &mut self,
        _event: &str,
        _payload: Payload,
        _ctx: &mut ChannelContext<Self>,
    ) -> HandleResult {
        Err(Reply::error(json!({"reason": "pushes are not allowed"})))
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
    Ok(builder.build())
}

/// The router: the socket at `/socket` (phoenix.js connects to `/socket/websocket`).
pub fn router(config: &Config, endpoint: &Endpoint) -> Router {
    let origins = if config.origins.iter().any(|o| o == "*") {
        CheckOrigin::any()
    } else {
        CheckOrigin::allow(config.origins.iter().map(String::as_str))
    };
    let socket = endpoint
        .socket(ServerSocket {
            verifier: config.auth.verifier.clone(),
            allow_anonymous: config.auth.allow_anonymous,
        })
        .channel::<TopicChannel>("*")
        .check_origin(origins)
        .into_router();
    Router::new().nest("/socket", socket)
}
