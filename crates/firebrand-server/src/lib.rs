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
//! [`app::router`], served by `firebrand::Server` and drained on SIGTERM.

pub mod app;
pub mod auth;
pub mod config;

#[doc(inline)]
pub use config::{Config, ConfigError};
