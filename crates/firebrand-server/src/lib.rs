//! `firebrand-server`: a standalone Phoenix Channels server, for teams whose backend is not
//! written in Rust.
//!
//! Clients connect with the official `phoenix` client (`new Socket("ws://host:4000/socket",
//! {params: {token}})`), authenticated by a JWT that the backend signs ([`auth`]); the server
//! is configured by one TOML file and environment variables ([`config`]). It is safe by default:
//! it will not start without authentication on an address other than loopback unless
//! `allow_anonymous = true` is written, refuses short secrets and empty variables, logs a
//! warning in development mode, and never prints a secret ([`config`] has the rules).
//!
//! Topics are grouped in [namespaces](namespace) by prefix (`room:`, `user:`, `doc:` …), each
//! saying who may join, what happens to client pushes, whether presence is tracked and how much
//! history is kept for recovery ([`config`] lists the keys). The join reply carries the
//! authenticated user id (`{"user": sub}`; `{}` for an anonymous connection); a refused join
//! gets an error reply with a reason (`unauthorized`, `unmatched topic`).
//!
//! The backend talks to the server over HTTP with an API key ([`api`]): publish to one topic or
//! many, disconnect a user, read a topic's presence or history, list the active topics, describe
//! the node. The binary serves the API's OpenAPI document at `/api/openapi.json`.
//!
//! The server can call the backend too ([`backend`]): to decide each connect (instead of a JWT,
//! e.g. from a session cookie), each join of a namespace, and each push of a namespace (broadcast
//! as it is, rewritten, or rejected, with the backend's reply). Every call is bounded by a
//! timeout: a backend that is down or slow refuses, it never holds a client up longer. The calls
//! share a pool of keep-alive connections and a cap on calls in flight (beyond it a call is
//! refused at once), so that a reconnect storm does not become a storm on the backend.
//!
//! And it can tell the backend what happens ([`webhooks`], each event with a unique id, signed
//! with HMAC-SHA256 over the attempt's timestamp and the body): a topic
//! occupied or vacated, a user's presence joining or leaving a topic.
//!
//! And it can broadcast from the database ([`config`]'s `[outbox]`, the crate
//! `firebrand-postgres`): rows the backend inserts into a PostgreSQL table in its own
//! transactions are delivered once each, in commit order, the rolled-back ones never; on the
//! topics of `outbox = true` namespaces with positions that outlive the server, so a client
//! that rejoins with `since` after a crash recovers every row.
//!
//! For operations ([`ops`]): `GET /health`, `GET /ready` (503 while draining, or while the
//! cluster's engine or the outbox's database is unreachable) and Prometheus metrics at
//! `GET /metrics`.
//!
//! The binary is thin over this library: [`Config::load`], then [`app::endpoint`] and
//! [`app::router`], served by `firebrand::Server` and drained on SIGTERM:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = firebrand_server::Config::load(None, |name| std::env::var(name).ok())?;
//! let endpoint = firebrand_server::app::endpoint(&config)?;
//! let router = firebrand_server::app::router(&config, &endpoint);
//! let server = firebrand::Server::bind(config.listen).await?;
//! server.serve(router, std::future::pending()).await?;
//! endpoint.drain(config.drain, std::time::Duration::from_secs(30)).await;
//! # Ok(()) }
//! ```

pub mod api;
pub mod app;
pub mod auth;
pub mod backend;
pub mod config;
pub mod namespace;
pub mod ops;
pub mod webhooks;

#[doc(inline)]
pub use config::{Config, ConfigError};
