//! The node's shared machinery, under every connection and channel: topics and their
//! subscribers ([`pubsub`]), the bounded queues between tasks ([`queue`]), the presence tracker
//! ([`presence`]). Nothing here knows sockets, channels, transports or the cluster.

pub mod presence;
pub(crate) mod pubsub;
pub(crate) mod queue;
