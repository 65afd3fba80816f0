//! Presence: who is online on each topic.

#[allow(dead_code)]
mod crdt;
