//! Topic patterns: which channel type serves a topic.

use std::sync::Arc;

use crate::model::runner::ChannelFactory;

/// A topic pattern: `"room:lobby"` matches exactly; `"room:*"` matches every topic that starts
/// with `"room:"`, including `"room:"` itself. `*` may only be the last character.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(pattern: &str) -> Self {
        match pattern.find('*') {
            None => Pattern::Exact(pattern.to_owned()),
            Some(i) if i == pattern.len() - 1 => Pattern::Prefix(pattern[..i].to_owned()),
            Some(_) => panic!("topic pattern {pattern:?}: `*` may only be the last character"),
        }
    }

    fn matches(&self, topic: &str) -> bool {
        match self {
            Pattern::Exact(t) => t == topic,
            Pattern::Prefix(p) => topic.starts_with(p.as_str()),
        }
    }
}

/// The routes of one socket, in declaration order: the first match wins.
pub(crate) struct Routes<A> {
    routes: Vec<(Pattern, Arc<dyn ChannelFactory<A>>)>,
}

impl<A> Routes<A> {
    pub(crate) fn new() -> Self {
        Routes { routes: Vec::new() }
    }

    /// Adds a route. Panics on an invalid pattern (a configuration error, like axum's routes).
    pub(crate) fn add(&mut self, pattern: &str, factory: Arc<dyn ChannelFactory<A>>) {
        self.routes.push((Pattern::parse(pattern), factory));
    }

    pub(crate) fn find(&self, topic: &str) -> Option<&Arc<dyn ChannelFactory<A>>> {
        self.routes
            .iter()
            .find(|(p, _)| p.matches(topic))
            .map(|(_, f)| f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_phoenix() {
        let p = Pattern::parse("room:*");
        assert!(p.matches("room:lobby"));
        assert!(p.matches("room:"));
        assert!(!p.matches("room"));
        assert!(!p.matches("rooms:x"));
        let e = Pattern::parse("lobby");
        assert!(e.matches("lobby"));
        assert!(!e.matches("lobby:1"));
        assert_eq!(Pattern::parse("*"), Pattern::Prefix(String::new()));
    }

    #[test]
    #[should_panic(expected = "may only be the last character")]
    fn star_in_the_middle_is_refused() {
        Pattern::parse("room:*:x");
    }
}
