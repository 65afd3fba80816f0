//! Namespaces: the rules of a family of topics, chosen by the topic's prefix.
//!
//! A topic belongs to the namespace with the longest prefix it starts with (`room:vip:1` is in
//! `room:vip:` rather than `room:`); a topic in no namespace cannot be joined (the error reply
//! `{"reason":"unmatched topic"}`) unless a catch-all namespace (`prefix = ""`) exists. See
//! [`config`](crate::config) for the keys.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::backend::BackendUrl;

/// Who may join a namespace's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum JoinRule {
    /// Any connected client (anonymous ones too, if they may connect).
    Anyone,
    /// Only the user whose id (`sub`) is the rest of the topic: `user:alice` for `alice`.
    User,
    /// Holders of a join token for the topic, sent as the join params' `token` (see
    /// [`Verifier::verify_join`](crate::auth::Verifier::verify_join)).
    Token,
    /// Whoever the backend allows: the join is POSTed to the namespace's `join_url` (see
    /// [`backend`](crate::backend)).
    Backend,
}

/// What happens to the events clients push on a namespace's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Pushes {
    /// Refused with the error reply `{"reason":"pushes are not allowed"}`.
    Rejected,
    /// Broadcast as they are to the topic's other subscribers (not back to the sender:
    /// Phoenix's `broadcast_from`), and answered with the reply `ok` `{}`.
    Broadcast,
    /// As the backend says: each push is POSTed to the namespace's `push_url`, which answers
    /// whether to broadcast it (as it is or rewritten) or reject it, and the reply.
    Backend,
}

/// How much of a recoverable topic's history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRule {
    /// At most this many broadcasts.
    pub size: usize,
    /// None older than this.
    pub max_age: Duration,
}

/// The rules of the topics starting with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Namespace {
    /// The topics' prefix (`""`: every topic).
    pub prefix: String,
    /// Who may join.
    pub join: JoinRule,
    /// What happens to client pushes.
    pub pushes: Pushes,
    /// Whether joined users are tracked in Presence (and clients get `presence_state` and
    /// `presence_diff`).
    pub presence: bool,
    /// Whether the topics are recoverable, and how much history is kept.
    pub history: Option<HistoryRule>,
    /// Whether the topics' positions and history are the [outbox](crate::config::OutboxConfig)
    /// table's (`outbox = true`; with `history`): rows on them go out with a position that
    /// survives restarts, and a rejoin with `since` reads what it missed from the table.
    pub outbox: bool,
    /// Where joins are POSTed (with [`JoinRule::Backend`]).
    pub join_url: Option<BackendUrl>,
    /// Where pushes are POSTed (with [`Pushes::Backend`]).
    pub push_url: Option<BackendUrl>,
}

impl Namespace {
    /// A namespace with the defaults: anyone joins, pushes are rejected, no presence, no
    /// history.
    pub fn new(prefix: impl Into<String>) -> Self {
        Namespace {
            prefix: prefix.into(),
            join: JoinRule::Anyone,
            pushes: Pushes::Rejected,
            presence: false,
            history: None,
            outbox: false,
            join_url: None,
            push_url: None,
        }
    }
}

/// The configured namespaces, longest prefix first.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    list: Vec<Arc<Namespace>>,
}

impl Namespaces {
    /// The namespaces `list` (prefixes distinct).
    pub fn new(list: Vec<Namespace>) -> Self {
        let mut list: Vec<_> = list.into_iter().map(Arc::new).collect();
        list.sort_by_key(|ns| std::cmp::Reverse(ns.prefix.len()));
        Namespaces { list }
    }

    /// The namespace of `topic`: the one with the longest prefix of it.
    pub fn find(&self, topic: &str) -> Option<&Arc<Namespace>> {
        self.list.iter().find(|ns| topic.starts_with(&*ns.prefix))
    }

    /// The namespaces, longest prefix first.
    pub fn iter(&self) -> impl Iterator<Item = &Namespace> {
        self.list.iter().map(|ns| &**ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins() {
        let ns = Namespaces::new(vec![
            Namespace::new("room:"),
            Namespace::new("room:vip:"),
            Namespace::new("user:"),
        ]);
        let prefix = |t| ns.find(t).map(|n| n.prefix.as_str());
        assert_eq!(prefix("room:vip:1"), Some("room:vip:"));
        assert_eq!(prefix("room:1"), Some("room:"));
        assert_eq!(prefix("user:alice"), Some("user:"));
        assert_eq!(prefix("feed:x"), None);
        let ns = Namespaces::new(vec![Namespace::new(""), Namespace::new("room:")]);
        assert_eq!(ns.find("feed:x").map(|n| n.prefix.as_str()), Some(""));
        assert_eq!(ns.find("room:x").map(|n| n.prefix.as_str()), Some("room:"));
    }
}
