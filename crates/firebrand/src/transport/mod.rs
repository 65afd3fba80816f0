//! How clients reach the model: the HTTP entry a socket is mounted on ([`http`]), the
//! connection that serves a client whatever its transport ([`conn`]), the WebSocket loop's
//! RFC 6455 framing ([`ws`]), long-poll ([`longpoll`]), the in-process test client
//! (`testing`), and the accept loop ([`server`]).

pub(crate) mod accept;
pub(crate) mod conn;
pub(crate) mod http;
pub(crate) mod longpoll;
pub(crate) mod origin;
pub(crate) mod server;
#[cfg(feature = "testing")]
pub mod testing;
pub(crate) mod ws;
