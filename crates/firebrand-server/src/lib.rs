//! `firebrand-server`: a standalone Phoenix Channels server, for teams whose backend is not
//! written in Rust.
//!
//! Clients connect with the official `phoenix` client (`new Socket("ws://host:4000/socket",
//! {params: {token}})`), authenticated by a JWT that the backend signs ([`auth`]); the server
//! is configured by one TOML file and environment variables ([`config`]).
//!
//! For now every topic may be joined by any connected client, and client pushes are refused
//! with the error reply `{"reason":"pushes are not allowed"}`; the join reply carries the
//! authenticated user id (`{"user": sub}`; `{}` for an anonymous connection).
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
pub mod config;
pub mod namespace;

#[doc(inline)]
pub use config::{Config, ConfigError};
