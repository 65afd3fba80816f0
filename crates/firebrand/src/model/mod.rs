//! The app's model: what an app implements ([`Socket`](socket::Socket),
//! [`Channel`](channel::Channel), [`TypedChannel`](typed::TypedChannel)), what its callbacks get (the contexts), and the task that runs a
//! channel ([`runner`]). Transport-agnostic: a channel never knows whether its client speaks
//! WebSocket, long-poll or is an in-process test client.

pub(crate) mod channel;
pub(crate) mod context;
pub(crate) mod router;
pub(crate) mod runner;
pub(crate) mod socket;
pub(crate) mod typed;
