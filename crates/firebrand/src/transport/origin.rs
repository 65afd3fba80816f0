//! The `Origin` check on the WebSocket upgrade (Phoenix's `check_origin`).

use std::fmt;
use std::sync::Arc;

/// Which `Origin` headers may open a socket. A request without an `Origin` header (not a
/// browser) always passes; a refused one gets HTTP 403.
///
/// The default, like Phoenix's `check_origin: true` with its default URL host, accepts origins
/// whose host is `localhost`. Set your public host in production:
///
/// ```
/// use firebrand::CheckOrigin;
///
/// // scheme, host and port as given; a missing part matches anything; `*.` matches subdomains
/// let check = CheckOrigin::allow(["https://example.com", "//*.example.org", "//localhost:4000"]);
/// assert!(check.allows("https://example.com"));
/// assert!(check.allows("http://api.example.org"));
/// assert!(check.allows("http://example.org"));
/// assert!(!check.allows("http://example.com"));
/// assert!(!check.allows("http://localhost:5000"));
/// ```
#[derive(Clone)]
pub struct CheckOrigin(Check);

#[derive(Clone)]
enum Check {
    Any,
    Allow(Vec<OriginPattern>),
    Custom(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl Default for CheckOrigin {
    fn default() -> Self {
        CheckOrigin::allow(["//localhost"])
    }
}

impl fmt::Debug for CheckOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Check::Any => f.write_str("CheckOrigin::any()"),
            Check::Allow(list) => f.debug_tuple("CheckOrigin::allow").field(list).finish(),
            Check::Custom(_) => f.write_str("CheckOrigin::custom(..)"),
        }
    }
}

impl CheckOrigin {
    /// Accepts every origin (Phoenix's `check_origin: false`).
    pub fn any() -> Self {
        CheckOrigin(Check::Any)
    }

    /// Accepts origins matching one of `patterns`: `"https://example.com"`, `"//host:port"`,
    /// `"//*.example.com"`. A pattern without a scheme or port matches any scheme or port.
    pub fn allow<I, S>(patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        CheckOrigin(Check::Allow(
            patterns
                .into_iter()
                .filter_map(|p| OriginPattern::parse(p.as_ref()))
                .collect(),
        ))
    }

    /// Decides with a function of the `Origin` header's value.
    pub fn custom(f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        CheckOrigin(Check::Custom(Arc::new(f)))
    }

    /// Whether `origin` (an `Origin` header value) passes.
    pub fn allows(&self, origin: &str) -> bool {
        match &self.0 {
            Check::Any => true,
            Check::Custom(f) => f(origin),
            Check::Allow(list) => match Origin::parse(origin) {
                Some(o) => list.iter().any(|p| p.matches(&o)),
                None => false,
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct OriginPattern {
    scheme: Option<String>,
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Splits `host[:port]` (lower-cased host; IPv6 in brackets).
fn host_port(s: &str) -> Option<(String, Option<u16>)> {
    let s = s.split('/').next()?;
    let (host, port) = match s.rfind(':') {
        Some(i) if !s[i..].contains(']') => (&s[..i], Some(s[i + 1..].parse().ok()?)),
        _ => (s, None),
    };
    (!host.is_empty()).then(|| (host.to_ascii_lowercase(), port))
}

impl OriginPattern {
    fn parse(p: &str) -> Option<Self> {
        let (scheme, rest) = match p.split_once("//") {
            Some(("", rest)) => (None, rest),
            Some((s, rest)) => (Some(s.trim_end_matches(':').to_ascii_lowercase()), rest),
            None => (None, p),
        };
        let (host, port) = host_port(rest)?;
        let port = port.or_else(|| scheme.as_deref().and_then(default_port));
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(h) => (h.to_owned(), true),
            None => (host, false),
        };
        Some(OriginPattern {
            scheme,
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, o: &Origin) -> bool {
        let host_ok =
            o.host == self.host || (self.wildcard && o.host.ends_with(&format!(".{}", self.host)));
        host_ok
            && self.scheme.as_ref().is_none_or(|s| *s == o.scheme)
            && self.port.is_none_or(|p| Some(p) == o.port)
    }
}

impl Origin {
    fn parse(origin: &str) -> Option<Self> {
        let (scheme, rest) = origin.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let (host, port) = host_port(rest)?;
        let port = port.or_else(|| default_port(&scheme));
        Some(Origin { scheme, host, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_accepts_localhost_only() {
        let c = CheckOrigin::default();
        assert!(c.allows("http://localhost:4000"));
        assert!(c.allows("https://LOCALHOST"));
        assert!(!c.allows("http://127.0.0.1:4000"));
        assert!(!c.allows("http://evil.com"));
        assert!(!c.allows("null"));
    }

    #[test]
    fn ports_and_wildcards() {
        let c = CheckOrigin::allow(["//another.com:888", "//*.other.com"]);
        assert!(c.allows("https://another.com:888"));
        assert!(!c.allows("https://another.com"));
        assert!(c.allows("http://a.b.other.com:1"));
        assert!(!c.allows("http://notother.com"));
        assert!(CheckOrigin::any().allows("whatever"));
        assert!(CheckOrigin::custom(|o| o.ends_with(".test")).allows("http://x.test"));
    }
}
