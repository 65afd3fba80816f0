//! The server's configuration: an optional TOML file, then environment variables (which win).
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:4000"   # address and port to serve on
//! drain_ms = 1000             # on SIGTERM, close the sockets (1012) spread over this period
//! origins = ["https://app.example.com"]  # browser origins that may connect; ["*"]: any
//! longpoll = true             # also serve the long-poll transport (default true)
//! metrics = true              # serve Prometheus metrics at GET /metrics (default true)
//! compress = false            # offer permessage-deflate to WebSocket clients (default false)
//! backend_timeout_ms = 2000   # bound on every call to the backend (connect, join, push)
//! backend_max_calls = 64      # calls to the backend in flight at once; beyond, refused at once
//! history_budget_mb = 64      # what all recoverable topics' histories hold on this node, in MiB
//!
//! [cluster]                   # at most one of redis_url and nats_url
//! redis_url = "redis://127.0.0.1:6379"
//! nats_url = "nats://127.0.0.1:4222"
//! namespace = "firebrand"     # separates clusters sharing one Redis or NATS
//! secret = "…"                # authenticates node-to-node messages (the same on every node; 32 bytes+)
//!
//! [auth]                      # at most one key: a shared secret or a public key file
//! jwt_hs256_secret = "…"      # HS256; 32 bytes or more
//! jwt_public_key_file = "jwt.pub.pem"  # a PEM public key (relative to the config file)…
//! jwt_algorithm = "RS256"     # …and its algorithm: "RS256" or "ES256"
//! audience = "my-app"         # if set, tokens must carry this `aud` (needs a key)
//! issuer = "https://auth.example.com"  # if set, tokens must carry this `iss` (needs a key)
//! allow_anonymous = false     # connections without a token; default: true only with no key
//!                             # (with no key on a non-loopback listen: must be written true)
//! connect_url = "http://127.0.0.1:8000/firebrand/connect"  # the backend decides each connect
//! connect_headers = ["cookie"]  # request headers sent along to connect_url
//!
//! [api]                       # the server API (see the `api` module)
//! key = "…"                   # `Authorization: Bearer <key>`; 16 characters or more
//!
//! [webhooks]                  # tell the backend about topics and presences (see `webhooks`)
//! url = "http://127.0.0.1:8000/firebrand/events"  # POSTed one event at a time
//! secret = "…"                # signs each body (HMAC-SHA256); required with url; 32 bytes+
//! events = ["topic_occupied", "topic_vacated", "presence_join", "presence_leave"]  # default all
//!
//! [outbox]                    # broadcast from the database: rows committed in a PostgreSQL table
//! postgres_url = "postgres://app@127.0.0.1:5432/app"  # the database (no TLS)
//! table = "firebrand_outbox"  # the table ("schema.table" allowed; created when missing)
//! poll_ms = 1000              # read the table at least this often (besides LISTEN/NOTIFY)
//! retention_ms = 300000       # rows kept (the outbox topics' history); default: the largest
//!                             # max_age_ms of the `outbox = true` namespaces, else 300000
//!
//! [[namespace]]               # the rules of the topics starting with `prefix`; one table each
//! prefix = "room:"            # "" is a catch-all; the longest matching prefix wins
//! join = "anyone"             # "anyone" | "user" | "token" | "backend" (default "anyone")
//! join_url = "http://127.0.0.1:8000/firebrand/join"   # with join = "backend"
//! pushes = "broadcast"        # "rejected" | "broadcast" | "backend" (default "rejected")
//! push_url = "http://127.0.0.1:8000/firebrand/push"   # with pushes = "backend"
//! presence = true             # track joined users (default false)
//! history = { size = 100, max_age_ms = 300000 }  # recoverable topics (default: none)
//! outbox = true               # positions and history from the [outbox] table (needs history)
//! ```
//!
//! **Namespaces.** A topic belongs to the namespace with the longest prefix it starts with; a
//! topic in none is refused at join with `{"reason":"unmatched topic"}` (add `prefix = ""` to
//! catch the rest). With no `[[namespace]]` at all there is one catch-all where anyone joins,
//! and pushes are broadcast in development mode (no auth key) and rejected otherwise.
//!
//! - `join`: `"anyone"`: any connected client. `"user"`: only the user whose `sub` is the
//!   rest of the topic (`user:alice` for `alice`; never an anonymous connection).
//!   `"token"`: holders of a join token sent as the join params' `token`
//!   (`socket.channel("doc:42", {token})`): a JWT signed with the connection tokens' key (and
//!   carrying their `aud` and `iss`, if configured), with `exp`, and a `topic` claim equal to
//!   the topic or a `topics` list holding it; a `sub`, if present, must be the connection's
//!   user. Needs an auth key. A refused join gets the error reply `{"reason":"unauthorized"}`
//!   (why is logged).
//! - `pushes`: `"rejected"`: the error reply `{"reason":"pushes are not allowed"}`.
//!   `"broadcast"`: the event and payload go as they are to every *other* subscriber of the
//!   topic (Phoenix's `broadcast_from`: not back to the sender), and the push gets the reply
//!   `ok` `{}`. Events starting with `phx_` or `chan_reply_`, and `presence_state` and `presence_diff`, are
//!   refused with `{"reason":"reserved event"}`.
//! - `presence`: on join, the user is tracked under its `sub` with the meta
//!   `{"user": sub, "info": <the token's info claim>}` and the client gets `presence_state`, then
//!   `presence_diff`s (phoenix.js's `Presence` syncs them). Anonymous connections see the
//!   presences without being tracked.
//! - `history`: the topics are recoverable: their last `size` broadcasts (none older than
//!   `max_age_ms`) are kept, and a client that rejoins with `{since: position}` gets what it
//!   missed (see `firebrand::EndpointBuilder::history`). In a cluster the engine keeps it
//!   (configure every node alike). A namespace inside a recoverable one (`room:vip:` in
//!   `room:`) must have a history too. Clients choose topic names, so what all the recoverable
//!   topics of a node hold together is bounded by `server.history_budget_mb` (default 64 MiB,
//!   the library's `EndpointBuilder::DEFAULT_HISTORY_BUDGET`): past it, the oldest entries of
//!   any topic are evicted first, and a client rejoining from before one of them gets
//!   `recovered: false` on a node alone (in a cluster the engine still has them and is read).
//!
//! - `outbox`: the topics' positions and history are the `[outbox]` table's (see below):
//!   needs `history` (its `size` and `max_age_ms` bound what a rejoin reads from the table)
//!   and `[outbox] postgres_url`.
//!
//! Namespaces are configured in the file only (no environment variables).
//!
//! **The outbox** (`[outbox]`, the crate `firebrand-postgres`): the backend inserts rows
//! `(topic, event, payload)` into a PostgreSQL table in the same transaction as its data, and
//! every node delivers each committed row once to the topic's subscribers, in commit order;
//! a rolled-back row never. On the topics of `outbox = true` namespaces the rows carry
//! positions that outlive the server (the table is their history, kept `retention_ms`): a
//! client that rejoins with `since` after a crash of the server reads what it missed from the
//! table. Rows on other topics go out without a position. The server connects in the
//! background: while the database is unreachable it serves, `/ready` answers 503 with the
//! reason, and it connects (again) as soon as it can, resuming after the last row delivered.
//!
//! **Calls to the backend.** The server can ask the backend over HTTP (POST, JSON both ways;
//! `http://` URLs; each call bounded by `server.backend_timeout_ms`; at most
//! `server.backend_max_calls` in flight at once, pooled keep-alive connections; see
//! [`backend`] for what happens when the backend is down, slow or the cap reached):
//!
//! - `auth.connect_url`: every connect is decided by the backend instead of by a JWT. The body
//!   is `{"params": {name: value}, "headers": {name: value}, "auth_token": <phoenix.js's
//!   authToken or null>}` (the socket's connect params, and the request headers named in
//!   `auth.connect_headers`, e.g. `["cookie"]`, that were sent); the answer `{"allow": true,
//!   "user": "<id>", "info": {..}}` accepts the connection as that user (with that info for
//!   presence; no `user`: anonymous), `{"allow": false}` or a status other than 2xx refuses it
//!   (403). The JWT key, if configured too, then only checks join tokens;
//!   `allow_anonymous` does not apply.
//! - `join = "backend"` with `join_url`: the body is `{"user": <id or null>, "topic",
//!   "params"}` (the join params); the answer `{"allow": true, "reply": ..}` lets the client
//!   join, with `reply` as the join reply (default `{"user": id}`), `{"allow": false, "reply":
//!   ..}` refuses it with `reply` as the error reply (default `{"reason":"unauthorized"}`).
//! - `pushes = "backend"` with `push_url`: the body is `{"user", "topic", "event",
//!   "payload"}`; the answer `{"action": "broadcast", "payload": .., "reply": ..}` broadcasts
//!   the event to the other subscribers with `payload` (default: the client's) and replies `ok`
//!   with `reply` (default `{}`); `{"action": "reject", "reply": ..}` replies `error` with
//!   `reply` (default `{"reason":"rejected"}`). Reserved events are refused before any call;
//!   binary payloads are refused (`{"reason":"binary payload"}`).
//!
//! **The API key.** Without `api.key` the API is disabled (403), except in development mode (no
//! auth key) on a loopback `listen` address, where it is open without a key, like the sockets.
//!
//! Every key is optional, and a key the server does not know is an error (with its line), so
//! a typo is never silently ignored. With no file and no variables the server runs in
//! development mode: it listens on 127.0.0.1:4000 and anyone may connect.
//!
//! **Safe by default.** These are errors (naming the key's line or the variable, and the fix):
//! no authentication (no JWT key, no `connect_url`) on a `listen` address other than loopback
//! unless `allow_anonymous = true` is written (in the file or `FIREBRAND_ALLOW_ANONYMOUS`); a
//! secret shorter than [`MIN_SECRET_BYTES`] (`auth.jwt_hs256_secret`, `webhooks.secret`,
//! `cluster.secret`; `api.key` needs 16 characters); `audience` or `issuer` without a JWT key;
//! a variable set to the empty string (an empty `FIREBRAND_JWT_SECRET` from a secret mount that
//! failed must not start a server without auth). [`Config::warnings`] says what the binary logs
//! as warnings: development mode, a cluster without `cluster.secret`. Secrets are never printed:
//! `Debug` and `Display` leave them out, an error quoting a line of the file hides a secret's
//! value, and URLs have their password replaced ([`redact_url`]).
//!
//! Environment variables (one set to the empty string is an error, not unset):
//!
//! | variable | overrides |
//! | --- | --- |
//! | `FIREBRAND_CONFIG` | the config file, when `--config` is not given |
//! | `FIREBRAND_LISTEN` | `server.listen` |
//! | `FIREBRAND_DRAIN_MS` | `server.drain_ms` |
//! | `FIREBRAND_ORIGINS` | `server.origins` (comma-separated) |
//! | `FIREBRAND_LONGPOLL` | `server.longpoll` (`true` or `false`) |
//! | `FIREBRAND_METRICS` | `server.metrics` (`true` or `false`) |
//! | `FIREBRAND_COMPRESS` | `server.compress` (`true` or `false`) |
//! | `FIREBRAND_BACKEND_TIMEOUT_MS` | `server.backend_timeout_ms` |
//! | `FIREBRAND_BACKEND_MAX_CALLS` | `server.backend_max_calls` |
//! | `FIREBRAND_HISTORY_BUDGET_MB` | `server.history_budget_mb` |
//! | `REDIS_URL` | `cluster.redis_url` |
//! | `NATS_URL` | `cluster.nats_url` |
//! | `FIREBRAND_CLUSTER_NAMESPACE` | `cluster.namespace` |
//! | `FIREBRAND_CLUSTER_SECRET` | `cluster.secret` |
//! | `FIREBRAND_JWT_SECRET` | `auth.jwt_hs256_secret` |
//! | `FIREBRAND_JWT_PUBLIC_KEY_FILE` | `auth.jwt_public_key_file` (relative to the working directory) |
//! | `FIREBRAND_JWT_ALGORITHM` | `auth.jwt_algorithm` |
//! | `FIREBRAND_JWT_AUDIENCE` | `auth.audience` |
//! | `FIREBRAND_JWT_ISSUER` | `auth.issuer` |
//! | `FIREBRAND_ALLOW_ANONYMOUS` | `auth.allow_anonymous` (`true` or `false`) |
//! | `FIREBRAND_CONNECT_URL` | `auth.connect_url` |
//! | `FIREBRAND_API_KEY` | `api.key` |
//! | `FIREBRAND_WEBHOOK_URL` | `webhooks.url` |
//! | `FIREBRAND_WEBHOOK_SECRET` | `webhooks.secret` |
//! | `FIREBRAND_OUTBOX_URL` | `outbox.postgres_url` |
//! | `FIREBRAND_OUTBOX_TABLE` | `outbox.table` |
//!
//! Settings that contradict each other (two auth keys, two cluster engines, a public key
//! without its algorithm) are errors rather than one silently winning, wherever each came from.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::auth::{KeyAlgorithm, Verifier};
use crate::backend::{self, Backend, BackendUrl};
use crate::namespace::{HistoryRule, JoinRule, Namespace, Namespaces, Pushes};
use crate::webhooks::{Event, WebhookConfig};

/// The development default of `server.listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4000";

/// The shortest secret accepted: `auth.jwt_hs256_secret`, `webhooks.secret`, `cluster.secret`.
pub const MIN_SECRET_BYTES: usize = 32;

/// The server's settings, resolved from the file, the environment and the defaults.
#[non_exhaustive]
pub struct Config {
    /// The address to serve on.
    pub listen: SocketAddr,
    /// Over how long the sockets are closed on SIGTERM.
    pub drain: Duration,
    /// The browser origins that may connect (`CheckOrigin` patterns; `"*"`: any).
    pub origins: Vec<String>,
    /// Whether the long-poll transport is served too (at `/socket/longpoll`, for phoenix.js's
    /// `transport: LongPoll` and `longPollFallbackMs`).
    pub longpoll: bool,
    /// Whether Prometheus metrics are served at `GET /metrics` (`server.metrics`, default true).
    pub metrics: bool,
    /// Whether permessage-deflate is offered to WebSocket clients (`server.compress`, default
    /// false, as Phoenix): see `SocketBuilder::compress`.
    pub compress: bool,
    /// Makes the calls to the backend (bounded by `server.backend_timeout_ms`).
    pub backend: Backend,
    /// The most bytes all recoverable topics' histories hold on this node
    /// (`server.history_budget_mb`; default the library's, 64 MiB).
    pub history_budget: usize,
    /// The cluster engine, if any.
    pub cluster: Option<Cluster>,
    /// Separates clusters that share one engine.
    pub namespace: String,
    /// Authenticates node-to-node messages.
    pub cluster_secret: Option<String>,
    /// How connections are authenticated.
    pub auth: Auth,
    /// The rules of each family of topics.
    pub namespaces: Namespaces,
    /// Who may use the server API.
    pub api: ApiAccess,
    /// Where events are POSTed, if anywhere (see [`webhooks`](crate::webhooks)).
    pub webhooks: Option<WebhookConfig>,
    /// The PostgreSQL outbox consumed, if any (`[outbox]`).
    pub outbox: Option<OutboxConfig>,
}

/// The PostgreSQL outbox the server consumes (`[outbox]`): see the module's docs.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// The database (`outbox.postgres_url`): a `postgres://` URL or `key=value` pairs.
    pub url: String,
    /// The table's schema, if written (`outbox.table = "schema.table"`).
    pub schema: Option<String>,
    /// The table's name (default [`DEFAULT_OUTBOX_TABLE`]).
    pub table: String,
    /// How often the table is read without a wake-up (`outbox.poll_ms`, default 1 s).
    pub poll: Duration,
    /// How long rows are kept (`outbox.retention_ms`).
    pub retention: Duration,
}

/// The default `outbox.table`.
pub const DEFAULT_OUTBOX_TABLE: &str = "firebrand_outbox";

impl OutboxConfig {
    /// The table as written: `schema.table` or `table`.
    pub fn table_name(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.table),
            None => self.table.clone(),
        }
    }

    /// The database URL without its password (for logs and errors).
    pub fn redacted_url(&self) -> String {
        redact_postgres(&self.url)
    }
}

impl fmt::Debug for OutboxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxConfig")
            .field("url", &self.redacted_url())
            .field("table", &self.table_name())
            .field("poll", &self.poll)
            .field("retention", &self.retention)
            .finish()
    }
}

/// A PostgreSQL connection string without its password: a URL's as [`redact_url`] does, and
/// in the `key=value` form the value of `password`.
pub fn redact_postgres(url: &str) -> String {
    if url.contains("://") {
        return redact_url(url);
    }
    url.split(' ')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.trim() == "password" => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Who may use the server API (`/api/…`).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiAccess {
    /// Requests must carry `Authorization: Bearer <key>`.
    Key(String),
    /// Development mode on a loopback address with no key: every request is allowed.
    Open,
    /// No key configured: every request is refused with 403.
    Disabled,
}

impl fmt::Debug for ApiAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiAccess::Key(_) => f.write_str("Key(..)"),
            ApiAccess::Open => f.write_str("Open"),
            ApiAccess::Disabled => f.write_str("Disabled"),
        }
    }
}

/// The engine nodes of a cluster talk through.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cluster {
    /// Redis at this URL.
    Redis(String),
    /// NATS at this URL.
    Nats(String),
}

/// How connections are authenticated.
#[derive(Debug)]
#[non_exhaustive]
pub struct Auth {
    /// Verifies tokens; `None` when no key is configured.
    pub verifier: Option<Verifier>,
    /// Whether a connection without a token is accepted (as an anonymous user).
    pub allow_anonymous: bool,
    /// The backend decides each connect, if set.
    pub connect: Option<ConnectHook>,
}

/// Where connects are POSTed, and which request headers go along.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectHook {
    /// The backend's URL.
    pub url: BackendUrl,
    /// The headers sent along (lowercase names).
    pub headers: Vec<String>,
}

impl Auth {
    /// No key and no connect backend: anyone may connect.
    fn is_open(&self) -> bool {
        self.verifier.is_none() && self.connect.is_none()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Without the secrets, and without the cluster URLs (which may hold a password).
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("drain", &self.drain)
            .field("origins", &self.origins)
            .field("longpoll", &self.longpoll)
            .field("metrics", &self.metrics)
            .field("compress", &self.compress)
            .field("backend", &self.backend)
            .field("history_budget", &self.history_budget)
            .field("cluster", &self.cluster.as_ref().map(Cluster::engine))
            .field("namespace", &self.namespace)
            .field(
                "cluster_secret",
                &self.cluster_secret.as_ref().map(|_| ".."),
            )
            .field("auth", &self.auth)
            .field("namespaces", &self.namespaces)
            .field("api", &self.api)
            .field("webhooks", &self.webhooks)
            .field("outbox", &self.outbox)
            .finish()
    }
}

impl fmt::Display for Config {
    /// A one-line summary, without secrets: what `--check-config` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "listen {}", self.listen)?;
        match (&self.auth.verifier, &self.auth.connect) {
            (_, Some(c)) => write!(f, ", connects decided by the backend ({:?})", c.url)?,
            (Some(v), None) => write!(f, ", JWT {}", v.algorithm())?,
            (None, None) => write!(f, ", no auth key (development mode)")?,
        }
        if self.auth.allow_anonymous {
            write!(f, ", anonymous connections allowed")?;
        }
        match &self.cluster {
            Some(c) => write!(
                f,
                ", cluster over {} (namespace {:?})",
                c.engine(),
                self.namespace
            )?,
            None => write!(f, ", single node")?,
        }
        write!(f, ", namespaces")?;
        for ns in self.namespaces.iter() {
            write!(f, " {:?}", ns.prefix)?;
        }
        match self.api {
            ApiAccess::Key(_) => write!(f, ", API with a key")?,
            ApiAccess::Open => write!(f, ", API open (development mode, no key)")?,
            ApiAccess::Disabled => write!(f, ", API disabled (no key)")?,
        }
        if let Some(w) = &self.webhooks {
            write!(f, ", webhooks to {:?}", w.url)?;
        }
        if let Some(o) = &self.outbox {
            write!(f, ", outbox {} at {}", o.table_name(), o.redacted_url())?;
        }
        if self.namespaces.iter().any(|ns| ns.history.is_some()) {
            let mib = self.history_budget as f64 / f64::from(1 << 20);
            write!(f, ", history budget {mib} MiB")?;
        }
        Ok(())
    }
}

impl Cluster {
    /// `"Redis"` or `"NATS"`.
    pub fn engine(&self) -> &'static str {
        match self {
            Cluster::Redis(_) => "Redis",
            Cluster::Nats(_) => "NATS",
        }
    }
}

impl Config {
    /// Development mode: no key and no connect backend, so anyone may connect.
    pub fn is_development(&self) -> bool {
        self.auth.is_open()
    }

    /// What an operator should know is unsafe about this configuration (the binary logs each
    /// with `tracing::warn!`): development mode, a cluster without `cluster.secret`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.is_development() {
            warnings.push(format!(
                "development mode: no authentication is configured (no JWT key, no \
                 auth.connect_url), so anyone who reaches {} may connect, anonymously; set \
                 auth.jwt_hs256_secret (FIREBRAND_JWT_SECRET) to require tokens",
                self.listen
            ));
        }
        if let (Some(cluster), None) = (&self.cluster, &self.cluster_secret) {
            warnings.push(format!(
                "cluster without cluster.secret: whoever can publish on the {} engine is \
                 trusted as a node; set cluster.secret (FIREBRAND_CLUSTER_SECRET, 32 bytes or \
                 more, the same on every node)",
                cluster.engine()
            ));
        }
        for ns in self.namespaces.iter() {
            if ns.outbox && ns.pushes != Pushes::Rejected {
                warnings.push(format!(
                    "namespace {:?} takes its positions from the outbox, but its pushes are \
                     broadcast: they go out without a position and are not kept, so a client \
                     that rejoins does not recover them (insert into the outbox instead)",
                    ns.prefix
                ));
            }
        }
        warnings
    }

    /// Reads `file` (if any), then applies the environment given by `env` (a variable's value
    /// by name, e.g. `|name| std::env::var(name).ok()`).
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (source, raw) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    location: Location::File {
                        path: path.to_owned(),
                        line: None,
                    },
                    message: format!("cannot read the config file: {e}"),
                })?;
                let raw = toml::from_str::<RawFile>(&text).map_err(|e| {
                    let at = e.span().map(|span| line_col(&text, span.start));
                    ConfigError {
                        location: Location::File {
                            path: path.to_owned(),
                            line: at,
                        },
                        message: describe(&text, &e),
                    }
                })?;
                (
                    Some(Source {
                        path: path.to_owned(),
                        text,
                    }),
                    raw,
                )
            }
            None => (None, RawFile::default()),
        };
        Resolver {
            source: source.as_ref(),
            env: &env,
        }
        .resolve(raw)
    }
}

/// A configuration error: where (a file's line, or a variable) and what.
#[derive(Debug)]
pub struct ConfigError {
    location: Location,
    message: String,
}

#[derive(Debug)]
enum Location {
    File {
        path: PathBuf,
        line: Option<(usize, usize)>,
    },
    Env(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Location::File {
                path,
                line: Some((line, col)),
            } => write!(f, "{}:{line}:{col}: {}", path.display(), self.message),
            Location::File { path, line: None } => {
                write!(f, "{}: {}", path.display(), self.message)
            }
            Location::Env(name) => write!(f, "environment variable {name}: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// `url` with its credentials hidden: `redis://:***@host`, `nats://***@host` (a user alone may
/// be a token), `redis://user:***@host`. A URL without credentials is returned as it is.
pub fn redact_url(url: &str) -> String {
    match credentials(url) {
        Some((start, secret)) => format!("{}***{}", &url[..start], &url[start + secret.len()..]),
        None => url.to_owned(),
    }
}

/// The secret part of `url`'s credentials (the password, or a user given alone), and where it
/// starts.
fn credentials(url: &str) -> Option<(usize, &str)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    match userinfo.find(':') {
        Some(colon) => Some((start + colon + 1, &userinfo[colon + 1..])),
        None => Some((start, userinfo)),
    }
    .filter(|(_, secret)| !secret.is_empty())
}

/// `message` (about `url`) without `url`'s credentials.
pub(crate) fn redact_in(message: String, url: &str) -> String {
    match credentials(url) {
        Some((_, secret)) => {
            let escaped = format!("{secret:?}");
            message
                .replace(secret, "***")
                .replace(&escaped[1..escaped.len() - 1], "***")
        }
        None => message,
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// A boolean variable: `true`, `false`, `1` or `0`.
fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{v:?}: true or false expected")),
    }
}

/// The toml error's message, with the offending line quoted (it names the key).
fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let (line, _) = line_col(text, span.start);
            // An unknown key may be a secret's, misspelt: its value is hidden too.
            let unknown = message.starts_with("unknown field");
            let quoted = hide_value(text.lines().nth(line - 1).unwrap_or("").trim(), unknown);
            format!("{message}\n  {line} | {quoted}")
        }
        None => message.to_owned(),
    }
}

/// A quoted line of the file, without the value if it may be a secret (`always`, or its key says
/// secret or key) and without a URL's credentials.
fn hide_value(line: &str, always: bool) -> String {
    let Some((key, value)) = line.split_once('=') else {
        return line.to_owned();
    };
    let name = key.to_ascii_lowercase();
    if always
        || ["secret", "key", "password", "token"]
            .iter()
            .any(|w| name.contains(w))
    {
        format!("{key}= …")
    } else {
        format!("{key}={}", redact_url(value))
    }
}

/// The config file as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    namespace: Vec<RawNamespace>,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    webhooks: RawWebhooks,
    #[serde(default)]
    outbox: RawOutbox,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    postgres_url: Option<Spanned<String>>,
    table: Option<Spanned<String>>,
    poll_ms: Option<Spanned<u64>>,
    retention_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWebhooks {
    url: Option<Spanned<String>>,
    secret: Option<Spanned<String>>,
    events: Option<Spanned<Vec<Event>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    prefix: Spanned<String>,
    join: Option<Spanned<JoinRule>>,
    join_url: Option<Spanned<String>>,
    pushes: Option<Spanned<Pushes>>,
    push_url: Option<Spanned<String>>,
    presence: Option<bool>,
    history: Option<Spanned<RawHistory>>,
    outbox: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    size: usize,
    max_age_ms: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    key: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    drain_ms: Option<Spanned<u64>>,
    origins: Option<Spanned<Vec<String>>>,
    longpoll: Option<Spanned<bool>>,
    metrics: Option<Spanned<bool>>,
    compress: Option<Spanned<bool>>,
    backend_timeout_ms: Option<Spanned<u64>>,
    backend_max_calls: Option<Spanned<u64>>,
    history_budget_mb: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis_url: Option<Spanned<String>>,
    nats_url: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    secret: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    jwt_hs256_secret: Option<Spanned<String>>,
    jwt_public_key_file: Option<Spanned<String>>,
    jwt_algorithm: Option<Spanned<KeyAlgorithm>>,
    audience: Option<Spanned<String>>,
    issuer: Option<Spanned<String>>,
    allow_anonymous: Option<Spanned<bool>>,
    connect_url: Option<Spanned<String>>,
    connect_headers: Option<Spanned<Vec<String>>>,
}

struct Source {
    path: PathBuf,
    text: String,
}

/// A setting's value and where it came from.
struct Setting<T> {
    value: T,
    from: From,
}

#[derive(Clone, Copy)]
enum From {
    /// The file, at this byte range.
    File(usize),
    Env(&'static str),
}

struct Resolver<'a, E> {
    source: Option<&'a Source>,
    env: &'a E,
}

impl<E: Fn(&str) -> Option<String>> Resolver<'_, E> {
    /// The setting from variable `var` if set (parsed with `parse`), else from the file.
    fn pick<T>(
        &self,
        file: Option<Spanned<T>>,
        var: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<Setting<T>>, ConfigError> {
        if let Some(v) = (self.env)(var) {
            if v.is_empty() {
                return Err(ConfigError {
                    location: Location::Env(var),
                    message: "is empty: unset it, or give it a value (an empty variable is an \
                              error, not unset: a secret mount that failed, say)"
                        .into(),
                });
            }
            let value = parse(&v).map_err(|message| ConfigError {
                location: Location::Env(var),
                message,
            })?;
            return Ok(Some(Setting {
                value,
                from: From::Env(var),
            }));
        }
        Ok(file.map(|s| Setting {
            from: From::File(s.span().start),
            value: s.into_inner(),
        }))
    }

    fn error(&self, from: From, key: &str, message: impl fmt::Display) -> ConfigError {
        let location = match (from, self.source) {
            (From::Env(var), _) => Location::Env(var),
            (From::File(offset), Some(source)) => Location::File {
                path: source.path.clone(),
                line: Some(line_col(&source.text, offset)),
            },
            (From::File(_), None) => unreachable!("a setting from a file without a file"),
        };
        ConfigError {
            location,
            message: format!("{key}: {message}"),
        }
    }

    fn describe(&self, from: From, key: &str) -> String {
        match (from, self.source) {
            (From::Env(var), _) => format!("{key} (from {var})"),
            (From::File(offset), Some(source)) => {
                let (line, _) = line_col(&source.text, offset);
                format!("{key} ({}:{line})", source.path.display())
            }
            (From::File(_), None) => key.to_owned(),
        }
    }

    /// A secret's value, refused if shorter than [`MIN_SECRET_BYTES`] (never printed).
    fn secret(&self, s: Setting<String>, key: &str) -> Result<String, ConfigError> {
        if s.value.len() < MIN_SECRET_BYTES {
            return Err(self.error(
                s.from,
                key,
                format_args!(
                    "is too short ({} bytes): use {MIN_SECRET_BYTES} bytes or more, random \
                     (e.g. `openssl rand -hex 32`)",
                    s.value.len()
                ),
            ));
        }
        Ok(s.value)
    }

    fn resolve(&self, raw: RawFile) -> Result<Config, ConfigError> {
        let text = |v: &str| Ok(v.to_owned());
        let (listen, listen_from) = match self.pick(raw.server.listen, "FIREBRAND_LISTEN", text)? {
            Some(s) => (
                s.value.parse::<SocketAddr>().map_err(|e| {
                    self.error(
                        s.from,
                        "server.listen",
                        format_args!("{e} (write an address and port, e.g. \"0.0.0.0:4000\")"),
                    )
                })?,
                Some(s.from),
            ),
            None => (DEFAULT_LISTEN.parse().expect("a valid default"), None),
        };
        let drain_ms = self.pick(raw.server.drain_ms, "FIREBRAND_DRAIN_MS", |v| {
            v.parse::<u64>()
                .map_err(|e| format!("{e} (milliseconds expected)"))
        })?;
        let drain = Duration::from_millis(drain_ms.map_or(1000, |s| s.value));
        let origins = self.pick(raw.server.origins, "FIREBRAND_ORIGINS", |v| {
            Ok(v.split(',').map(|o| o.trim().to_owned()).collect())
        })?;
        let origins = origins.map_or_else(
            || vec!["//localhost".to_owned(), "//127.0.0.1".to_owned()],
            |s| s.value,
        );
        let longpoll = self
            .pick(raw.server.longpoll, "FIREBRAND_LONGPOLL", parse_bool)?
            .is_none_or(|s| s.value);
        let metrics = self
            .pick(raw.server.metrics, "FIREBRAND_METRICS", parse_bool)?
            .is_none_or(|s| s.value);
        let compress = self
            .pick(raw.server.compress, "FIREBRAND_COMPRESS", parse_bool)?
            .is_some_and(|s| s.value);
        let timeout = self.pick(
            raw.server.backend_timeout_ms,
            "FIREBRAND_BACKEND_TIMEOUT_MS",
            |v| {
                v.parse::<u64>()
                    .map_err(|e| format!("{e} (milliseconds expected)"))
            },
        )?;
        let timeout = match timeout {
            Some(Setting { value: 0, from }) => {
                return Err(self.error(from, "server.backend_timeout_ms", "must be above 0"));
            }
            Some(s) => Duration::from_millis(s.value),
            None => backend::DEFAULT_TIMEOUT,
        };
        let max_calls = self.pick(
            raw.server.backend_max_calls,
            "FIREBRAND_BACKEND_MAX_CALLS",
            |v| {
                v.parse::<u64>()
                    .map_err(|e| format!("{e} (a count expected)"))
            },
        )?;
        let max_calls = match max_calls {
            Some(Setting { value: 0, from }) => {
                return Err(self.error(from, "server.backend_max_calls", "must be above 0"));
            }
            Some(s) => usize::try_from(s.value).unwrap_or(usize::MAX),
            None => backend::DEFAULT_MAX_CALLS,
        };
        let backend = Backend::new(timeout, max_calls);
        let budget = self.pick(
            raw.server.history_budget_mb,
            "FIREBRAND_HISTORY_BUDGET_MB",
            |v| v.parse::<u64>().map_err(|e| format!("{e} (MiB expected)")),
        )?;
        let history_budget = match budget {
            Some(Setting { value: 0, from }) => {
                return Err(self.error(
                    from,
                    "server.history_budget_mb",
                    "must be above 0 (leave the namespaces' history out to keep none)",
                ));
            }
            Some(s) => usize::try_from(s.value)
                .ok()
                .and_then(|mb| mb.checked_mul(1 << 20))
                .ok_or_else(|| self.error(s.from, "server.history_budget_mb", "is too large"))?,
            None => firebrand::EndpointBuilder::DEFAULT_HISTORY_BUDGET,
        };

        let redis = self.pick(raw.cluster.redis_url, "REDIS_URL", text)?;
        let nats = self.pick(raw.cluster.nats_url, "NATS_URL", text)?;
        let cluster = match (redis, nats) {
            (Some(r), Some(n)) => {
                return Err(self.error(
                    n.from,
                    "cluster.nats_url",
                    format_args!(
                        "a cluster uses one engine, but {} is set too",
                        self.describe(r.from, "cluster.redis_url")
                    ),
                ));
            }
            (Some(r), None) => Some(Cluster::Redis(r.value)),
            (None, Some(n)) => Some(Cluster::Nats(n.value)),
            (None, None) => None,
        };
        let namespace = self
            .pick(raw.cluster.namespace, "FIREBRAND_CLUSTER_NAMESPACE", text)?
            .map_or_else(|| "firebrand".to_owned(), |s| s.value);
        let cluster_secret = self
            .pick(raw.cluster.secret, "FIREBRAND_CLUSTER_SECRET", text)?
            .map(|s| self.secret(s, "cluster.secret"))
            .transpose()?;

        // Whether allow_anonymous is written (resolve_auth reads its value).
        let anonymous_written = self
            .pick(
                raw.auth.allow_anonymous.clone(),
                "FIREBRAND_ALLOW_ANONYMOUS",
                parse_bool,
            )?
            .is_some();
        let auth = self.resolve_auth(raw.auth)?;
        if let Some(from) = listen_from
            && auth.is_open()
            && !anonymous_written
            && !listen.ip().is_loopback()
        {
            return Err(self.error(
                from,
                "server.listen",
                format_args!(
                    "{listen} is not a loopback address, and no authentication is configured: \
                     anyone who reaches it could connect. Set a JWT key (auth.jwt_hs256_secret \
                     or FIREBRAND_JWT_SECRET, or auth.jwt_public_key_file) or auth.connect_url; \
                     or, to let anyone connect on purpose, write allow_anonymous = true under \
                     [auth] (or FIREBRAND_ALLOW_ANONYMOUS=true)"
                ),
            ));
        }
        let outbox = self.resolve_outbox_url(raw.outbox.postgres_url.clone())?;
        let namespaces = self.resolve_namespaces(raw.namespace, &auth, outbox.as_ref())?;
        let outbox = match outbox {
            Some(url) => Some(self.resolve_outbox(url, raw.outbox, &namespaces)?),
            None => {
                let RawOutbox {
                    table,
                    poll_ms,
                    retention_ms,
                    ..
                } = raw.outbox;
                let written = [
                    table.map(|t| t.span().start),
                    poll_ms.map(|p| p.span().start),
                    retention_ms.map(|r| r.span().start),
                ];
                if let Some(at) = written.into_iter().flatten().next() {
                    return Err(self.error(
                        From::File(at),
                        "outbox",
                        "is configured, but outbox.postgres_url (FIREBRAND_OUTBOX_URL) is not",
                    ));
                }
                if (self.env)("FIREBRAND_OUTBOX_TABLE").is_some() {
                    return Err(ConfigError {
                        location: Location::Env("FIREBRAND_OUTBOX_TABLE"),
                        message: "is set, but outbox.postgres_url (FIREBRAND_OUTBOX_URL) is not"
                            .into(),
                    });
                }
                None
            }
        };
        let api = match self.pick(raw.api.key, "FIREBRAND_API_KEY", text)? {
            Some(key) if key.value.len() < 16 => {
                return Err(self.error(
                    key.from,
                    "api.key",
                    "is too short: use 16 characters or more (32 random bytes, say)",
                ));
            }
            Some(key) => ApiAccess::Key(key.value),
            None if auth.is_open() && listen.ip().is_loopback() => ApiAccess::Open,
            None => ApiAccess::Disabled,
        };
        let webhooks = self.resolve_webhooks(raw.webhooks)?;
        Ok(Config {
            listen,
            drain,
            origins,
            longpoll,
            metrics,
            compress,
            backend,
            history_budget,
            cluster,
            namespace,
            cluster_secret,
            auth,
            namespaces,
            api,
            webhooks,
            outbox,
        })
    }

    /// `outbox.postgres_url`, checked (its errors without the password).
    fn resolve_outbox_url(
        &self,
        raw: Option<Spanned<String>>,
    ) -> Result<Option<Setting<String>>, ConfigError> {
        let Some(url) = self.pick(raw, "FIREBRAND_OUTBOX_URL", |v| Ok(v.to_owned()))? else {
            return Ok(None);
        };
        if let Err(e) = url.value.parse::<tokio_postgres::Config>() {
            return Err(self.error(
                url.from,
                "outbox.postgres_url",
                format_args!(
                    "{} (write postgres://user[:password]@host[:port]/database)",
                    redact_in(e.to_string(), &url.value)
                ),
            ));
        }
        Ok(Some(url))
    }

    /// The rest of `[outbox]`, with its URL given.
    fn resolve_outbox(
        &self,
        url: Setting<String>,
        raw: RawOutbox,
        namespaces: &Namespaces,
    ) -> Result<OutboxConfig, ConfigError> {
        let table = self.pick(raw.table, "FIREBRAND_OUTBOX_TABLE", |v| Ok(v.to_owned()))?;
        let (schema, table) = match table {
            None => (None, DEFAULT_OUTBOX_TABLE.to_owned()),
            Some(t) => {
                let (schema, name) = match t.value.split_once('.') {
                    Some((schema, name)) => (Some(schema.to_owned()), name.to_owned()),
                    None => (None, t.value.clone()),
                };
                let bad = |s: &str| s.is_empty() || s.contains(['.', '\0']);
                if bad(&name) || schema.as_deref().is_some_and(bad) {
                    return Err(self.error(
                        t.from,
                        "outbox.table",
                        format_args!(
                            "{:?}: write a table name, or schema.table (no other dot)",
                            t.value
                        ),
                    ));
                }
                (schema, name)
            }
        };
        let poll = match raw.poll_ms {
            Some(p) if *p.get_ref() == 0 => {
                return Err(self.error(
                    From::File(p.span().start),
                    "outbox.poll_ms",
                    "must be above 0",
                ));
            }
            Some(p) => Duration::from_millis(p.into_inner()),
            None => Duration::from_secs(1),
        };
        // The history an outbox namespace promises must still be in the table.
        let longest = namespaces
            .iter()
            .filter(|ns| ns.outbox)
            .filter_map(|ns| ns.history.map(|h| (h.max_age, ns.prefix.clone())))
            .max();
        let retention = match raw.retention_ms {
            Some(r) => {
                let at = From::File(r.span().start);
                let retention = Duration::from_millis(r.into_inner());
                if retention.is_zero() {
                    return Err(self.error(at, "outbox.retention_ms", "must be above 0"));
                }
                if let Some((age, prefix)) = longest.as_ref().filter(|(age, _)| *age > retention) {
                    return Err(self.error(
                        at,
                        "outbox.retention_ms",
                        format_args!(
                            "is shorter than the history.max_age_ms of namespace {prefix:?} \
                             ({} ms): rows would be deleted before their history ends",
                            age.as_millis()
                        ),
                    ));
                }
                retention
            }
            None => longest.map_or(Duration::from_secs(300), |(age, _)| age),
        };
        Ok(OutboxConfig {
            url: url.value,
            schema,
            table,
            poll,
            retention,
        })
    }

    fn resolve_webhooks(&self, raw: RawWebhooks) -> Result<Option<WebhookConfig>, ConfigError> {
        let text = |v: &str| Ok(v.to_owned());
        let url = self.pick(raw.url, "FIREBRAND_WEBHOOK_URL", text)?;
        let secret = self.pick(raw.secret, "FIREBRAND_WEBHOOK_SECRET", text)?;
        let (url, secret) = match (url, secret) {
            (Some(url), Some(secret)) => (url, self.secret(secret, "webhooks.secret")?),
            (Some(url), None) => {
                return Err(self.error(
                    url.from,
                    "webhooks.url",
                    "needs webhooks.secret (or FIREBRAND_WEBHOOK_SECRET) to sign the events",
                ));
            }
            (None, Some(secret)) => {
                return Err(self.error(
                    secret.from,
                    "webhooks.secret",
                    "is set, but webhooks.url is not",
                ));
            }
            (None, None) => {
                if let Some(events) = raw.events {
                    return Err(self.error(
                        From::File(events.span().start),
                        "webhooks.events",
                        "is set, but webhooks.url is not",
                    ));
                }
                return Ok(None);
            }
        };
        let parsed = url
            .value
            .parse()
            .map_err(|e| self.error(url.from, "webhooks.url", redact_in(e, &url.value)))?;
        let events = match raw.events {
            Some(events) => {
                let at = From::File(events.span().start);
                let events = events.into_inner();
                if events.is_empty() {
                    return Err(self.error(
                        at,
                        "webhooks.events",
                        "is empty (leave it out for every event, or remove [webhooks])",
                    ));
                }
                events
            }
            None => Event::ALL.to_vec(),
        };
        Ok(Some(WebhookConfig {
            url: parsed,
            secret,
            events,
        }))
    }

    fn resolve_namespaces(
        &self,
        raw: Vec<RawNamespace>,
        auth: &Auth,
        outbox: Option<&Setting<String>>,
    ) -> Result<Namespaces, ConfigError> {
        if raw.is_empty() {
            // One catch-all: anyone joins; in development mode pushes are broadcast.
            let mut all = Namespace::new("");
            if auth.is_open() {
                all.pushes = Pushes::Broadcast;
            }
            return Ok(Namespaces::new(vec![all]));
        }
        let mut list: Vec<(Namespace, usize)> = Vec::new();
        for raw in raw {
            let at = raw.prefix.span().start;
            let prefix = raw.prefix.into_inner();
            if let Some((_, other)) = list.iter().find(|(ns, _)| ns.prefix == prefix) {
                return Err(self.error(
                    From::File(at),
                    "namespace.prefix",
                    format_args!(
                        "{prefix:?} is configured twice (also {})",
                        self.describe(From::File(*other), "namespace.prefix")
                    ),
                ));
            }
            let mut ns = Namespace::new(prefix);
            let join_at = raw.join.as_ref().map(|j| j.span().start);
            if let Some(join) = raw.join {
                if *join.get_ref() == JoinRule::Token && auth.verifier.is_none() {
                    return Err(self.error(
                        From::File(join.span().start),
                        "namespace.join",
                        "\"token\" needs a key to check join tokens with \
                         (auth.jwt_hs256_secret or auth.jwt_public_key_file)",
                    ));
                }
                ns.join = join.into_inner();
            }
            ns.join_url = self.hook_url(
                ns.join == JoinRule::Backend,
                join_at,
                raw.join_url,
                ("namespace.join_url", "join = \"backend\""),
            )?;
            ns.pushes = raw
                .pushes
                .as_ref()
                .map_or(Pushes::Rejected, |p| *p.get_ref());
            ns.push_url = self.hook_url(
                ns.pushes == Pushes::Backend,
                raw.pushes.as_ref().map(|p| p.span().start),
                raw.push_url,
                ("namespace.push_url", "pushes = \"backend\""),
            )?;
            ns.presence = raw.presence.unwrap_or(false);
            if let Some(history) = raw.history {
                let from = From::File(history.span().start);
                let RawHistory { size, max_age_ms } = history.into_inner();
                if size == 0 || max_age_ms == 0 {
                    return Err(self.error(
                        from,
                        "namespace.history",
                        "size and max_age_ms must be above 0 (leave history out for none)",
                    ));
                }
                ns.history = Some(HistoryRule {
                    size,
                    max_age: Duration::from_millis(max_age_ms),
                });
            }
            if let Some(flag) = raw.outbox {
                let from = From::File(flag.span().start);
                ns.outbox = flag.into_inner();
                if ns.outbox && outbox.is_none() {
                    return Err(self.error(
                        from,
                        "namespace.outbox",
                        "needs outbox.postgres_url (or FIREBRAND_OUTBOX_URL): the table the \
                         topics' positions and history come from",
                    ));
                }
                if ns.outbox && ns.history.is_none() {
                    return Err(self.error(
                        from,
                        "namespace.outbox",
                        "needs history = { size, max_age_ms }: how much of the table a rejoin \
                         reads back",
                    ));
                }
            }
            list.push((ns, at));
        }
        // A recoverable namespace makes every topic under its prefix recoverable: a namespace
        // inside it must keep a history too.
        for (inner, at) in &list {
            let outer = list.iter().find(|(o, _)| {
                o.history.is_some()
                    && o.prefix.len() < inner.prefix.len()
                    && inner.prefix.starts_with(&o.prefix)
            });
            if let (None, Some((outer, outer_at))) = (inner.history, outer) {
                return Err(self.error(
                    From::File(*at),
                    "namespace.history",
                    format_args!(
                        "{:?} has none, but it is inside {:?} ({}), which has one: give it a \
                         history too",
                        inner.prefix,
                        outer.prefix,
                        self.describe(From::File(*outer_at), "namespace.prefix")
                    ),
                ));
            }
        }
        Ok(Namespaces::new(
            list.into_iter().map(|(ns, _)| ns).collect(),
        ))
    }

    /// A namespace's `join_url` or `push_url`: given exactly when its rule says "backend"
    /// (`rule_at`: where the rule is written).
    fn hook_url(
        &self,
        wanted: bool,
        rule_at: Option<usize>,
        url: Option<Spanned<String>>,
        (key, rule): (&str, &str),
    ) -> Result<Option<BackendUrl>, ConfigError> {
        match (wanted, url) {
            (true, Some(url)) => {
                let at = From::File(url.span().start);
                Ok(Some(url.get_ref().parse().map_err(|e| {
                    self.error(at, key, redact_in(e, url.get_ref()))
                })?))
            }
            (true, None) => Err(self.error(
                From::File(rule_at.unwrap_or(0)),
                key,
                format_args!("is missing: {rule} calls the backend at that URL"),
            )),
            (false, Some(url)) => Err(self.error(
                From::File(url.span().start),
                key,
                format_args!("is only used with {rule}"),
            )),
            (false, None) => Ok(None),
        }
    }

    fn resolve_auth(&self, raw: RawAuth) -> Result<Auth, ConfigError> {
        let text = |v: &str| Ok(v.to_owned());
        let secret = self.pick(raw.jwt_hs256_secret, "FIREBRAND_JWT_SECRET", text)?;
        let key_file = self.pick(
            raw.jwt_public_key_file,
            "FIREBRAND_JWT_PUBLIC_KEY_FILE",
            text,
        )?;
        let algorithm = self.pick(raw.jwt_algorithm, "FIREBRAND_JWT_ALGORITHM", |v| {
            v.parse::<KeyAlgorithm>()
        })?;
        let connect_url = match self.pick(raw.connect_url, "FIREBRAND_CONNECT_URL", text)? {
            Some(s) => Some(Setting {
                value: s
                    .value
                    .parse::<BackendUrl>()
                    .map_err(|e| self.error(s.from, "auth.connect_url", redact_in(e, &s.value)))?,
                from: s.from,
            }),
            None => None,
        };
        let audience = self.pick(raw.audience, "FIREBRAND_JWT_AUDIENCE", text)?;
        let issuer = self.pick(raw.issuer, "FIREBRAND_JWT_ISSUER", text)?;
        let anonymous = self.pick(raw.allow_anonymous, "FIREBRAND_ALLOW_ANONYMOUS", parse_bool)?;

        let verifier = match (secret, key_file, algorithm) {
            (Some(s), Some(k), _) => {
                return Err(self.error(
                    k.from,
                    "auth.jwt_public_key_file",
                    format_args!(
                        "configure one key, but {} is set too",
                        self.describe(s.from, "auth.jwt_hs256_secret")
                    ),
                ));
            }
            (Some(s), None, Some(a)) => {
                return Err(self.error(
                    a.from,
                    "auth.jwt_algorithm",
                    format_args!(
                        "is for jwt_public_key_file; a shared secret ({}) is always HS256",
                        self.describe(s.from, "auth.jwt_hs256_secret")
                    ),
                ));
            }
            (None, None, Some(a)) => {
                return Err(self.error(
                    a.from,
                    "auth.jwt_algorithm",
                    "is set, but auth.jwt_public_key_file is not",
                ));
            }
            (Some(s), None, None) => {
                let from = s.from;
                let secret = self.secret(s, "auth.jwt_hs256_secret")?;
                Some(
                    Verifier::hs256(secret.as_bytes())
                        .map_err(|e| self.error(from, "auth.jwt_hs256_secret", e))?,
                )
            }
            (None, Some(k), None) => {
                return Err(self.error(
                    k.from,
                    "auth.jwt_public_key_file",
                    "needs auth.jwt_algorithm (\"RS256\" or \"ES256\")",
                ));
            }
            (None, Some(k), Some(a)) => {
                let path = match (k.from, self.source) {
                    // A path in the file is relative to the file.
                    (From::File(_), Some(source)) => {
                        source.path.parent().unwrap_or(Path::new("")).join(&k.value)
                    }
                    _ => PathBuf::from(&k.value),
                };
                let pem = std::fs::read(&path).map_err(|e| {
                    self.error(
                        k.from,
                        "auth.jwt_public_key_file",
                        format_args!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(Verifier::public_key(a.value, &pem).map_err(|e| {
                    self.error(
                        k.from,
                        "auth.jwt_public_key_file",
                        format_args!("{}: {e}", path.display()),
                    )
                })?)
            }
            (None, None, None) => None,
        };
        if verifier.is_none() {
            // Nothing would check them: an error rather than silently dropped.
            for (setting, key) in [(&audience, "auth.audience"), (&issuer, "auth.issuer")] {
                if let Some(s) = setting {
                    return Err(self.error(
                        s.from,
                        key,
                        "is set, but no JWT key is configured to check tokens with \
                         (auth.jwt_hs256_secret or auth.jwt_public_key_file)",
                    ));
                }
            }
        }
        let verifier = verifier.map(|v| {
            v.audience(audience.map(|s| s.value))
                .issuer(issuer.map(|s| s.value))
        });
        let connect = match (connect_url, raw.connect_headers) {
            (Some(url), headers) => {
                let headers = match headers {
                    Some(h) => {
                        let at = From::File(h.span().start);
                        let mut names = Vec::new();
                        for name in h.into_inner() {
                            let name = name.to_ascii_lowercase();
                            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                                return Err(self.error(
                                    at,
                                    "auth.connect_headers",
                                    format_args!("{name:?} is not a header name"),
                                ));
                            }
                            names.push(name);
                        }
                        names
                    }
                    None => Vec::new(),
                };
                if let Some(a) = &anonymous {
                    return Err(self.error(
                        a.from,
                        "auth.allow_anonymous",
                        "does not apply with auth.connect_url: the backend decides every connect \
                         (answer {\"allow\": true} without a user for an anonymous one)",
                    ));
                }
                Some(ConnectHook {
                    url: url.value,
                    headers,
                })
            }
            (None, Some(h)) => {
                return Err(self.error(
                    From::File(h.span().start),
                    "auth.connect_headers",
                    "is only used with auth.connect_url",
                ));
            }
            (None, None) => None,
        };
        let allow_anonymous = match anonymous {
            Some(Setting { value: false, from }) if verifier.is_none() && connect.is_none() => {
                return Err(self.error(
                    from,
                    "auth.allow_anonymous",
                    "is false, but no key is configured (auth.jwt_hs256_secret or \
                     auth.jwt_public_key_file): nobody could connect",
                ));
            }
            Some(s) => s.value,
            None => verifier.is_none() && connect.is_none(),
        };
        Ok(Auth {
            verifier,
            allow_anonymous,
            connect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "firebrand-server-config-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("firebrand.toml");
        std::fs::write(&path, text).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(Some(&path), |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    /// The crate README's quickstart config is a valid config, as written.
    #[test]
    fn the_readme_config_loads() {
        let readme = include_str!("../README.md");
        let tag = "```toml quickstart:firebrand.toml\n";
        let start = readme
            .find(tag)
            .expect("the quickstart's config in README.md")
            + tag.len();
        let len = readme[start..].find("```").expect("the block's end");
        let config = load(&readme[start..start + len], &[]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:4000");
        assert!(!config.is_development());
    }

    #[test]
    fn no_file_is_development_mode() {
        let config = Config::load(None, |_| None).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert!(config.is_development());
        assert!(config.auth.allow_anonymous);
        assert_eq!(config.cluster, None);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = load("[server]\nlisten = \"127.0.0.1:1\"\ndrain_msec = 5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("firebrand.toml:3:1:"), "{e}");
        assert!(e.contains("drain_msec"), "{e}");
    }

    #[test]
    fn a_misspelt_secret_is_not_quoted() {
        let e = load("[auth]\njwt_hs256_secrte = \"hunter2-hunter2\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("jwt_hs256_secrte"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = load("\n[server]\ndrain_ms = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("firebrand.toml:3:"), "{e}");
        assert!(e.contains("drain_ms"), "{e}");
    }

    #[test]
    fn bad_algorithm_names_line() {
        let e = load(
            "[auth]\njwt_public_key_file = \"k.pem\"\njwt_algorithm = \"none\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("firebrand.toml:3:"), "{e}");
    }

    #[test]
    fn env_wins_over_file() {
        let config = load(
            "[server]\nlisten = \"127.0.0.1:1\"\n",
            &[("FIREBRAND_LISTEN", "127.0.0.1:2")],
        )
        .unwrap();
        assert_eq!(config.listen.port(), 2);
        assert!(config.longpoll);
        let config = load(
            "[server]\nlongpoll = true\n",
            &[("FIREBRAND_LONGPOLL", "false")],
        );
        assert!(!config.unwrap().longpoll);
    }

    #[test]
    fn compress_is_off_unless_turned_on() {
        assert!(!load("", &[]).unwrap().compress);
        assert!(load("[server]\ncompress = true\n", &[]).unwrap().compress);
        let config = load(
            "[server]\ncompress = true\n",
            &[("FIREBRAND_COMPRESS", "false")],
        );
        assert!(!config.unwrap().compress);
        assert!(
            load("", &[("FIREBRAND_COMPRESS", "true")])
                .unwrap()
                .compress
        );
        assert!(load("", &[("FIREBRAND_COMPRESS", "yes please")]).is_err());
    }

    #[test]
    fn metrics_are_served_unless_turned_off() {
        assert!(load("", &[]).unwrap().metrics);
        assert!(!load("[server]\nmetrics = false\n", &[]).unwrap().metrics);
        let config = load(
            "[server]\nmetrics = false\n",
            &[("FIREBRAND_METRICS", "true")],
        );
        assert!(config.unwrap().metrics);
    }

    #[test]
    fn a_secret_turns_off_anonymous_by_default() {
        let config = load(
            "[auth]\njwt_hs256_secret = \"0123456789abcdef0123456789abcdef\"\n",
            &[],
        )
        .unwrap();
        assert!(!config.is_development());
        assert!(!config.auth.allow_anonymous);
        let config = load("", &[("FIREBRAND_JWT_SECRET", SECRET)]).unwrap();
        assert!(!config.auth.allow_anonymous);
    }

    #[test]
    fn contradictions_are_errors() {
        let e = load(
            "[auth]\njwt_hs256_secret = \"0123456789abcdef0123456789abcdef\"\n",
            &[("FIREBRAND_JWT_PUBLIC_KEY_FILE", "k.pem")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("FIREBRAND_JWT_PUBLIC_KEY_FILE"), "{e}");
        assert!(e.contains("firebrand.toml:2"), "{e}");
        let e = load(
            "[cluster]\nredis_url = \"redis://x\"\nnats_url = \"nats://y\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("firebrand.toml:3:"), "{e}");
        let e = load("[auth]\nallow_anonymous = false\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("firebrand.toml:2:"), "{e}");
    }

    #[test]
    fn missing_key_file_names_line() {
        let e = load(
            "[auth]\njwt_algorithm = \"RS256\"\njwt_public_key_file = \"nope.pem\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("firebrand.toml:3:"), "{e}");
        assert!(e.contains("nope.pem"), "{e}");
    }

    #[test]
    fn namespaces_with_their_options_and_defaults() {
        let config = load(
            "[auth]\njwt_hs256_secret = \"0123456789abcdef0123456789abcdef\"\n\n[[namespace]]\nprefix = \"room:\"\n\
             pushes = \"broadcast\"\npresence = true\nhistory = { size = 5, max_age_ms = 1000 }\n\n\
             [[namespace]]\nprefix = \"doc:\"\njoin = \"token\"\n",
            &[],
        )
        .unwrap();
        let room = config.namespaces.find("room:1").unwrap();
        assert_eq!(
            (room.join, room.pushes, room.presence),
            (JoinRule::Anyone, Pushes::Broadcast, true)
        );
        assert_eq!(room.history.map(|h| h.size), Some(5));
        let doc = config.namespaces.find("doc:1").unwrap();
        assert_eq!(
            (doc.join, doc.pushes, doc.presence, doc.history),
            (JoinRule::Token, Pushes::Rejected, false, None)
        );
        assert!(config.namespaces.find("user:1").is_none());
    }

    #[test]
    fn without_namespaces_one_catch_all() {
        let dev = Config::load(None, |_| None).unwrap();
        assert_eq!(dev.namespaces.find("x").unwrap().pushes, Pushes::Broadcast);
        let keyed = load(
            "[auth]\njwt_hs256_secret = \"0123456789abcdef0123456789abcdef\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(keyed.namespaces.find("x").unwrap().pushes, Pushes::Rejected);
    }

    #[test]
    fn namespace_mistakes_name_their_line() {
        for (text, line) in [
            (
                "[[namespace]]\nprefix = \"a:\"\n[[namespace]]\nprefix = \"a:\"\n",
                4,
            ),
            ("[[namespace]]\nprefix = \"a:\"\njoin = \"token\"\n", 3),
            ("[[namespace]]\nprefix = \"a:\"\njoin = \"admins\"\n", 3),
            (
                "[[namespace]]\nprefix = \"a:\"\nhistory = { size = 0, max_age_ms = 1 }\n",
                3,
            ),
            (
                "[[namespace]]\nprefix = \"\"\nhistory = { size = 1, max_age_ms = 1 }\n\
                 [[namespace]]\nprefix = \"a:\"\n",
                5,
            ),
        ] {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("firebrand.toml:{line}:")),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn the_api_key_and_the_api_in_development() {
        let dev = Config::load(None, |_| None).unwrap();
        assert_eq!(dev.api, ApiAccess::Open);
        let exposed = load(
            "[server]\nlisten = \"0.0.0.0:4000\"\n[auth]\nallow_anonymous = true\n",
            &[],
        )
        .unwrap();
        assert_eq!(exposed.api, ApiAccess::Disabled);
        let keyed = load(
            "[auth]\njwt_hs256_secret = \"0123456789abcdef0123456789abcdef\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(keyed.api, ApiAccess::Disabled);
        let key = "0123456789abcdef0123";
        let with_key = load("", &[("FIREBRAND_API_KEY", key)]).unwrap();
        assert_eq!(with_key.api, ApiAccess::Key(key.into()));
        assert!(!format!("{with_key:?}").contains(key));
        let e = load("[api]\nkey = \"short\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("firebrand.toml:2:"), "{e}");
    }

    #[test]
    fn backend_calls() {
        let config = load(
            "[server]\nbackend_timeout_ms = 300\nbackend_max_calls = 8\n[auth]\nconnect_url = \"http://127.0.0.1:9/c\"\n\
             connect_headers = [\"Cookie\"]\n[[namespace]]\nprefix = \"a:\"\njoin = \"backend\"\n\
             join_url = \"http://127.0.0.1:9/j\"\npushes = \"backend\"\npush_url = \"http://127.0.0.1:9/p\"\n",
            &[],
        )
        .unwrap();
        let hook = config.auth.connect.as_ref().unwrap();
        assert_eq!(hook.headers, ["cookie"]);
        assert_eq!(config.backend.max_calls(), 8);
        assert_eq!(
            load("", &[]).unwrap().backend.max_calls(),
            backend::DEFAULT_MAX_CALLS
        );
        let env = load("", &[("FIREBRAND_BACKEND_MAX_CALLS", "3")]).unwrap();
        assert_eq!(env.backend.max_calls(), 3);
        // A connect backend is not development mode: the API needs a key, pushes are rejected.
        assert!(!config.is_development());
        assert!(!config.auth.allow_anonymous);
        assert_eq!(config.api, ApiAccess::Disabled);
        let ns = config.namespaces.find("a:1").unwrap();
        assert_eq!((ns.join, ns.pushes), (JoinRule::Backend, Pushes::Backend));
        assert!(ns.join_url.is_some() && ns.push_url.is_some());
        assert!(format!("{config}").contains("backend"));
        let env = load("", &[("FIREBRAND_CONNECT_URL", "http://x/c")]).unwrap();
        assert!(env.auth.connect.is_some());
        assert!(load("", &[("FIREBRAND_CONNECT_URL", "https://x/c")]).is_err());
    }

    #[test]
    fn history_budget() {
        let default = firebrand::EndpointBuilder::DEFAULT_HISTORY_BUDGET;
        assert_eq!(load("", &[]).unwrap().history_budget, default);
        let file = load("[server]\nhistory_budget_mb = 8\n", &[]).unwrap();
        assert_eq!(file.history_budget, 8 << 20);
        let env = load(
            "[server]\nhistory_budget_mb = 8\n",
            &[("FIREBRAND_HISTORY_BUDGET_MB", "3")],
        )
        .unwrap();
        assert_eq!(env.history_budget, 3 << 20);
        for (text, envs, wanted) in [
            (
                "[server]\nhistory_budget_mb = 0\n",
                &[][..],
                "firebrand.toml:2:",
            ),
            (
                "",
                &[("FIREBRAND_HISTORY_BUDGET_MB", "lots")][..],
                "FIREBRAND_HISTORY_BUDGET_MB",
            ),
            (
                "[server]\nhistory_budget_mb = -1\n",
                &[][..],
                "firebrand.toml:2:",
            ),
        ] {
            let e = load(text, envs).unwrap_err().to_string();
            assert!(e.contains(wanted), "{text} {envs:?}: {e}");
        }
    }

    #[test]
    fn backend_mistakes_name_their_line() {
        for (text, line) in [
            ("[[namespace]]\nprefix = \"a:\"\njoin = \"backend\"\n", 3),
            (
                "[[namespace]]\nprefix = \"a:\"\n\njoin_url = \"http://x/j\"\n",
                4,
            ),
            ("[[namespace]]\nprefix = \"a:\"\npushes = \"backend\"\n", 3),
            (
                "[[namespace]]\nprefix = \"a:\"\npushes = \"backend\"\npush_url = \"https://x/p\"\n",
                4,
            ),
            ("[auth]\nconnect_headers = [\"cookie\"]\n", 2),
            (
                "[auth]\nconnect_url = \"http://x/c\"\nconnect_headers = [\"a b\"]\n",
                3,
            ),
            (
                "[auth]\nconnect_url = \"http://x/c\"\nallow_anonymous = true\n",
                3,
            ),
            ("[auth]\nconnect_url = \"x\"\n", 2),
            ("[server]\nbackend_timeout_ms = 0\n", 2),
            ("[server]\nbackend_max_calls = 0\n", 2),
        ] {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("firebrand.toml:{line}:")),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn webhooks() {
        assert!(load("", &[]).unwrap().webhooks.is_none());
        let config = load(
            "[webhooks]\nurl = \"http://127.0.0.1:9/w\"\nsecret = \"0123456789abcdef0123456789abcdef\"\nevents = [\"presence_join\"]\n",
            &[],
        )
        .unwrap();
        let hooks = config.webhooks.as_ref().unwrap();
        assert_eq!(hooks.events, [Event::PresenceJoin]);
        assert!(!format!("{config:?}").contains(SECRET));
        let env = load(
            "",
            &[
                ("FIREBRAND_WEBHOOK_URL", "http://x/w"),
                ("FIREBRAND_WEBHOOK_SECRET", SECRET),
            ],
        )
        .unwrap();
        assert_eq!(env.webhooks.unwrap().events, Event::ALL);
        for (text, line) in [
            ("[webhooks]\nurl = \"http://x/w\"\n", 2),
            (
                "[webhooks]\nsecret = \"0123456789abcdef0123456789abcdef\"\n",
                2,
            ),
            (
                "[webhooks]\nurl = \"https://x/w\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n",
                2,
            ),
            (
                "[webhooks]\nurl = \"http://x/w\"\nsecret = \"0123456789abcdef0123456789abcdef\"\nevents = [\"joined\"]\n",
                4,
            ),
            (
                "[webhooks]\nurl = \"http://x/w\"\nsecret = \"0123456789abcdef0123456789abcdef\"\nevents = []\n",
                4,
            ),
        ] {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("firebrand.toml:{line}:")),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn urls_are_redacted() {
        for (url, redacted) in [
            ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
            ("redis://user:pw@host", "redis://user:***@host"),
            ("nats://token@host:4222", "nats://***@host:4222"),
            ("redis://host:6379", "redis://host:6379"),
            ("redis://host/a@b", "redis://host/a@b"),
            ("redis://:p:w@h", "redis://:***@h"),
            ("u:pw@h", "u:***@h"),
        ] {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
        let e = redact_in("\"http://u:pw@h/\": credentials".into(), "http://u:pw@h/");
        assert_eq!(e, "\"http://u:***@h/\": credentials");
        assert_eq!(
            hide_value("jwt_hs256_secret = \"hunter2\"", false),
            "jwt_hs256_secret = …"
        );
        assert_eq!(
            hide_value("redis_url = 5 # redis://:pw@h", false),
            "redis_url = 5 # redis://:***@h"
        );
    }

    #[test]
    fn the_outbox_and_its_namespaces() {
        assert!(load("", &[]).unwrap().outbox.is_none());
        let url = "postgres://app:hunter2@127.0.0.1:5432/app";
        let config = load(
            "[outbox]\ntable = \"app.events\"\npoll_ms = 250\n\n[[namespace]]\nprefix = \"orders:\"\n\
             history = { size = 50, max_age_ms = 600000 }\noutbox = true\n\n[[namespace]]\nprefix = \"\"\n",
            &[("FIREBRAND_OUTBOX_URL", url)],
        )
        .unwrap();
        let outbox = config.outbox.as_ref().unwrap();
        assert_eq!(outbox.table_name(), "app.events");
        assert_eq!(outbox.poll, Duration::from_millis(250));
        // The retention follows the longest history of the outbox's namespaces.
        assert_eq!(outbox.retention, Duration::from_secs(600));
        assert!(config.namespaces.find("orders:1").unwrap().outbox);
        assert!(!config.namespaces.find("feed:1").unwrap().outbox);
        for shown in [format!("{config}"), format!("{config:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("app.events"), "{shown}");
        }
        let default = load(
            "[outbox]\npostgres_url = \"postgres://postgres@127.0.0.1/test\"\n",
            &[],
        )
        .unwrap();
        let outbox = default.outbox.unwrap();
        assert_eq!(outbox.table_name(), DEFAULT_OUTBOX_TABLE);
        assert_eq!(
            (outbox.poll, outbox.retention),
            (Duration::from_secs(1), Duration::from_secs(300))
        );
        let env = load(
            "",
            &[
                ("FIREBRAND_OUTBOX_URL", url),
                ("FIREBRAND_OUTBOX_TABLE", "t2"),
            ],
        )
        .unwrap();
        assert_eq!(env.outbox.unwrap().table, "t2");
        assert_eq!(
            redact_postgres("host=h user=u password=hunter2 dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        let pushes = load(
            "[outbox]\npostgres_url = \"postgres://h/d\"\n[[namespace]]\nprefix = \"a:\"\npushes = \"broadcast\"\n\
             history = { size = 1, max_age_ms = 1 }\noutbox = true\n",
            &[],
        )
        .unwrap();
        assert!(
            pushes
                .warnings()
                .iter()
                .any(|w| w.contains("without a position"))
        );
    }

    #[test]
    fn outbox_mistakes_name_their_line() {
        for (text, wanted) in [
            ("[outbox]\ntable = \"t\"\n", "firebrand.toml:2:"),
            (
                "[[namespace]]\nprefix = \"a:\"\nhistory = { size = 1, max_age_ms = 1 }\noutbox = true\n",
                "firebrand.toml:4:",
            ),
            (
                "[outbox]\npostgres_url = \"postgres://h/d\"\n[[namespace]]\nprefix = \"a:\"\noutbox = true\n",
                "firebrand.toml:5:",
            ),
            (
                "[outbox]\npostgres_url = \"postgres://h/d\"\nretention_ms = 1000\n[[namespace]]\nprefix = \"a:\"\n\
                 history = { size = 1, max_age_ms = 2000 }\noutbox = true\n",
                "firebrand.toml:3:",
            ),
            (
                "[outbox]\npostgres_url = \"postgres://h/d\"\ntable = \"a.b.c\"\n",
                "firebrand.toml:3:",
            ),
            (
                "[outbox]\npostgres_url = \"postgres://h/d\"\npoll_ms = 0\n",
                "firebrand.toml:3:",
            ),
            (
                "[outbox]\npostgres_url = \"postgres://u:hunter2@h:port/d\"\n",
                "firebrand.toml:2:",
            ),
        ] {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(e.contains(wanted), "{text}: {e}");
            assert!(!e.contains("hunter2"), "{text}: {e}");
        }
        let e = load("", &[("FIREBRAND_OUTBOX_TABLE", "t")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("FIREBRAND_OUTBOX_TABLE"), "{e}");
    }

    #[test]
    fn bad_listen_names_line() {
        let e = load("[server]\n\nlisten = \"localhost\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("firebrand.toml:3:"), "{e}");
        assert!(e.contains("server.listen"), "{e}");
    }
}
