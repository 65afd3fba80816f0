//! The server API: what a backend calls over HTTP to publish, disconnect users and look
//! inside the server.
//!
//! Every request but `GET /api/openapi.json` needs `Authorization: Bearer <api.key>` (see
//! [`config`](crate::config); compared in constant time). With no key configured the API is
//! disabled (403), except in development mode (no auth key) on a loopback address, where it is
//! open without a key — and then (but for the OpenAPI document) only to requests whose `Host`
//! is a loopback name (`localhost`, `127.0.0.1` or `[::1]`, any port), so that a web page the
//! developer visits cannot reach it through DNS rebinding. Bodies are JSON: a `POST` must say
//! `Content-Type: application/json` (a form or `text/plain` body, which a web page can send
//! without asking, is refused), and is at most 2 MiB. Every answer is JSON. Errors are
//! `{"error": "<reason>"}` with the status saying which kind: 400 (a body or query that does not
//! parse: the reason names the field), 401 (no key, or the wrong one), 403 (the API is
//! disabled, or open and asked with another `Host`), 404 (no such route), 405 (another method
//! expected), 413 (a body over 2 MiB), 415 (a `POST` without a JSON `Content-Type`), 422
//! (well-formed but unacceptable: an empty topic, a reserved event, a topic without history).
//!
//! | request | body or query | answer |
//! | --- | --- | --- |
//! | `POST /api/publish` | `{"topic", "event", "payload"}` | `{"ok": true}` once the cluster's engine has it; every subscriber of the topic, on every node, gets the event |
//! | `POST /api/publish_many` | `{"topics": [..], "event", "payload"}` | `{"ok": true, "topics": n}` once the engine has them all |
//! | `POST /api/disconnect` | `{"user"}` | `{"ok": true}`; the user's connections (every node) close with code 1001 |
//! | `GET /api/presence` | `?topic=` | `{"topic", "presences": {key: {"metas": [..]}}}` (the cluster's) |
//! | `GET /api/history` | `?topic=&since=` | `{"topic", "position", "recovered", "messages": [{"event", "payload", "position"}]}` |
//! | `GET /api/topics` | | `{"topics": [{"topic", "subscribers"}]}`: this node's joined channels |
//! | `GET /api/info` | | `{"node", "nodes", "version", "connections", "topics"}` |
//! | `GET /api/openapi.json` | | this API as an OpenAPI 3.1 document (no key needed) |
//!
//! The publishes wait for the cluster's engine ([`Endpoint::broadcast_confirmed`]), at most
//! [`PUBLISH_CONFIRM`]: 503 `{"error", "reason"}` when a broadcast did not reach it (`reason`:
//! `unreachable` or `queue_full`, never sent; `unconfirmed`, in flight when the connection
//! failed: other nodes may have got it, at most once); 202 `{"ok": true, "queued": true,
//! "info"}` when it did not confirm in time (a stalled link: delivered when it carries again,
//! or lost if the connection is torn down first).
//!
//! `payload` is any JSON (`{}` when left out). Events starting with `phx_` or `chan_reply_`, and
//! `presence_state` and `presence_diff`, are reserved (422). Node ids are strings (they do not
//! fit a JavaScript number).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use firebrand::{BroadcastError, Endpoint};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::config::ApiAccess;

/// The OpenAPI 3.1 document of this API, served at `GET /api/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// At most this many topics in one `publish_many`.
pub const MAX_TOPICS: usize = 10_000;

/// The largest body accepted (413 above): 2 MiB.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// How long `publish` and `publish_many` wait for the cluster's engine to confirm their
/// broadcasts before answering 202 (queued behind a stalled link).
pub const PUBLISH_CONFIRM: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Api {
    endpoint: Endpoint,
    access: Arc<ApiAccess>,
}

/// Why a request failed: each kind is one status, the reason goes in `{"error": …}`.
#[derive(Debug)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: the body or the query does not parse.
    BadRequest(String),
    /// 401: no `Authorization: Bearer` header.
    MissingKey,
    /// 401: the wrong key.
    WrongKey,
    /// 403: no key is configured.
    Disabled,
    /// 403: the API is open without a key, and the request's `Host` is not a loopback name.
    ForeignHost(String),
    /// 413: the body is over [`MAX_BODY`].
    TooLarge,
    /// 415: a body without a JSON `Content-Type`.
    NotJson,
    /// 404: no such route.
    NoRoute(String),
    /// 405: the route exists with another method.
    MethodNotAllowed(String),
    /// 422: well-formed, but not acceptable.
    Unprocessable(String),
    /// 503: what was asked cannot be answered now (the cluster's history engine cannot be
    /// read); ask again.
    Unavailable(String),
    /// 503: a publish did not reach the cluster's engine (its body adds `"reason"`:
    /// [`BroadcastError::code`]); `unconfirmed` means other nodes may have got it, once.
    NotDelivered(BroadcastError, String),
}

impl ApiError {
    /// The status and the reason.
    pub fn parts(&self) -> (StatusCode, String) {
        match self {
            ApiError::BadRequest(why) => (StatusCode::BAD_REQUEST, why.clone()),
            ApiError::MissingKey => (
                StatusCode::UNAUTHORIZED,
                "missing API key: send Authorization: Bearer <key>".into(),
            ),
            ApiError::WrongKey => (StatusCode::UNAUTHORIZED, "wrong API key".into()),
            ApiError::Disabled => (
                StatusCode::FORBIDDEN,
                "the server API is disabled: configure api.key (FIREBRAND_API_KEY)".into(),
            ),
            ApiError::ForeignHost(host) => (
                StatusCode::FORBIDDEN,
                format!(
                    "host {host:?} refused: the API is open without a key (development mode) to \
                     loopback hosts only (localhost, 127.0.0.1, [::1]); configure api.key \
                     (FIREBRAND_API_KEY) to call it under another name"
                ),
            ),
            ApiError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over the limit of {} MiB", MAX_BODY >> 20),
            ),
            ApiError::NotJson => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent with Content-Type: application/json".into(),
            ),
            ApiError::NoRoute(route) => (StatusCode::NOT_FOUND, format!("no such route: {route}")),
            ApiError::MethodNotAllowed(route) => (
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method not allowed: {route}"),
            ),
            ApiError::Unprocessable(why) => (StatusCode::UNPROCESSABLE_ENTITY, why.clone()),
            ApiError::Unavailable(why) => (StatusCode::SERVICE_UNAVAILABLE, why.clone()),
            ApiError::NotDelivered(_, why) => (StatusCode::SERVICE_UNAVAILABLE, why.clone()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, reason) = self.parts();
        let body = match &self {
            ApiError::NotDelivered(e, _) => json!({ "error": reason, "reason": e.code() }),
            _ => json!({ "error": reason }),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            let bearer = header::HeaderValue::from_static("Bearer");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, bearer);
        }
        response
    }
}

/// The routes that need the key: (method, path under `/api`, handler).
fn routes() -> Vec<(Method, &'static str, MethodRouter<Api>)> {
    vec![
        (Method::POST, "/publish", post(publish)),
        (Method::POST, "/publish_many", post(publish_many)),
        (Method::POST, "/disconnect", post(disconnect)),
        (Method::GET, "/presence", get(presence)),
        (Method::GET, "/history", get(history)),
        (Method::GET, "/topics", get(topics)),
        (Method::GET, "/info", get(info)),
    ]
}

/// The API's router (its paths start with `/api/`), acting on `endpoint`.
pub fn router(access: ApiAccess, endpoint: Endpoint) -> Router {
    let api = Api {
        endpoint,
        access: Arc::new(access),
    };
    let authorized = routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .route_layer(middleware::from_fn_with_state(api.clone(), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    let routes = authorized
        .route("/openapi.json", get(openapi))
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::NoRoute(format!("{method} /api{uri}"))
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::MethodNotAllowed(format!("{method} /api{uri}"))
        })
        .with_state(api);
    Router::new().nest("/api", routes)
}

/// Lets the request through with the right key (or when the API is open).
async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    let key = match &*api.access {
        ApiAccess::Open => {
            return match loopback_host(&request) {
                Ok(()) => next.run(request).await,
                Err(e) => e.into_response(),
            };
        }
        ApiAccess::Disabled => return ApiError::Disabled.into_response(),
        ApiAccess::Key(key) => key,
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => ApiError::MissingKey.into_response(),
        Some(given) if same(given.trim().as_bytes(), key.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::WrongKey.into_response(),
    }
}

/// Whether the request names a loopback host (`localhost`, `127.0.0.1`, `[::1]`, with any
/// port): what the open API answers, so that a page from another name that resolves to
/// 127.0.0.1 (DNS rebinding) cannot use it.
fn loopback_host(request: &Request) -> Result<(), ApiError> {
    let host = match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok()),
    };
    let Some(host) = host else {
        return Err(ApiError::ForeignHost(String::new()));
    };
    if is_loopback_host(host) {
        Ok(())
    } else {
        Err(ApiError::ForeignHost(host.to_owned()))
    }
}

/// `localhost`, `127.0.0.1` or `[::1]`, each with a port or without.
fn is_loopback_host(host: &str) -> bool {
    let (loopback, port) = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((name, rest)) => match (rest, rest.strip_prefix(':')) {
                ("", _) => (name == "::1", ""),
                (_, Some(port)) => (name == "::1", port),
                (_, None) => return false,
            },
            None => return false,
        },
        None => {
            let (name, port) = host.split_once(':').unwrap_or((host, ""));
            (
                name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1",
                port,
            )
        }
    };
    loopback && port.bytes().all(|b| b.is_ascii_digit())
}
/// A JSON body: with a JSON `Content-Type` (else 415), at most [`MAX_BODY`] (else 413), that
/// parses as `T` (else 400).
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json);
        if !json {
            return Err(ApiError::NotJson);
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge
            } else {
                ApiError::BadRequest(format!("invalid body: {}", e.body_text()))
            }
        })?;
        body(&bytes).map(JsonBody)
    }
}

/// `application/json` (parameters allowed) or `application/<something>+json`.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Compares in time that depends on the lengths only, not on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0 && a.len() == b.len()
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// The body as `T`, or a 400 naming what is wrong.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
}

/// The query as `T`, or a 400 naming what is wrong.
fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))
}

fn empty_object() -> Value {
    json!({})
}

fn check_topic(topic: &str) -> Result<(), ApiError> {
    if topic.is_empty() {
        return Err(ApiError::Unprocessable("topic is empty".into()));
    }
    Ok(())
}

fn check_event(event: &str) -> Result<(), ApiError> {
    if event.is_empty() {
        return Err(ApiError::Unprocessable("event is empty".into()));
    }
    if crate::app::reserved(event) {
        return Err(ApiError::Unprocessable(format!(
            "event {event:?} is reserved"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish {
    topic: String,
    event: String,
    #[serde(default = "empty_object")]
    payload: Value,
}

async fn publish(
    State(api): State<Api>,
    JsonBody(Publish {
        topic,
        event,
        payload,
    }): JsonBody<Publish>,
) -> Result<impl IntoResponse, ApiError> {
    check_topic(&topic)?;
    check_event(&event)?;
    let sent = api.endpoint.broadcast_confirmed(&topic, &event, payload);
    let deadline = tokio::time::Instant::now() + PUBLISH_CONFIRM;
    confirmed(vec![sent], deadline, json!({"ok": true})).await
}

/// Waits until `deadline` for the confirmations of a publish's broadcasts: 200 with `ok` when
/// the engine has them all, 503 when one was lost, 202 when some are still unconfirmed (the
/// engine's link is stalled: they wait in its connection).
async fn confirmed(
    sent: Vec<impl Future<Output = Result<(), BroadcastError>>>,
    deadline: tokio::time::Instant,
    ok: Value,
) -> Result<Response, ApiError> {
    let (count, mut pending, mut lost) = (sent.len(), 0, Vec::new());
    for answer in sent {
        // A ready answer is taken even past the deadline (the future is polled first).
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => lost.push(e),
            Err(_) => pending += 1,
        }
    }
    if let Some(&first) = lost.first() {
        let why = if count == 1 {
            first.to_string()
        } else {
            format!(
                "{} of {count} broadcasts not delivered: {first}",
                lost.len()
            )
        };
        return Err(ApiError::NotDelivered(first, why));
    }
    if pending > 0 {
        let info = format!(
            "{pending} of {count} broadcasts not confirmed by the cluster's engine within {} s \
             (its link is stalled): queued, delivered to the other nodes when the link carries \
             again, or lost if the connection is torn down first",
            PUBLISH_CONFIRM.as_secs()
        );
        let body = json!({"ok": true, "queued": true, "info": info});
        return Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response());
    }
    Ok(axum::Json(ok).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishMany {
    topics: Vec<String>,
    event: String,
    #[serde(default = "empty_object")]
    payload: Value,
}

async fn publish_many(
    State(api): State<Api>,
    JsonBody(PublishMany {
        topics,
        event,
        payload,
    }): JsonBody<PublishMany>,
) -> Result<impl IntoResponse, ApiError> {
    if topics.is_empty() || topics.len() > MAX_TOPICS {
        return Err(ApiError::Unprocessable(format!(
            "topics: between 1 and {MAX_TOPICS} expected, got {}",
            topics.len()
        )));
    }
    topics.iter().try_for_each(|t| check_topic(t))?;
    check_event(&event)?;
    // One payload, encoded once per topic's broadcast.
    let payload = firebrand::Payload::from(payload);
    let sent: Vec<_> = topics
        .iter()
        .map(|topic| {
            api.endpoint
                .broadcast_confirmed(topic, &event, payload.clone())
        })
        .collect();
    let deadline = tokio::time::Instant::now() + PUBLISH_CONFIRM;
    confirmed(sent, deadline, json!({"ok": true, "topics": topics.len()})).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Disconnect {
    user: String,
}

async fn disconnect(
    State(api): State<Api>,
    JsonBody(Disconnect { user }): JsonBody<Disconnect>,
) -> Result<impl IntoResponse, ApiError> {
    if user.is_empty() {
        return Err(ApiError::Unprocessable("user is empty".into()));
    }
    api.endpoint.disconnect(&crate::app::socket_id(&user));
    Ok(axum::Json(json!({"ok": true})))
}

#[derive(Deserialize)]
struct TopicQuery {
    topic: String,
}

async fn presence(
    State(api): State<Api>,
    q: Result<Query<TopicQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let TopicQuery { topic } = query(q)?;
    check_topic(&topic)?;
    let presences = api.endpoint.presence_list(&topic).to_value();
    Ok(axum::Json(json!({"topic": topic, "presences": presences})))
}

#[derive(Deserialize)]
struct HistoryQuery {
    topic: String,
    since: Option<String>,
}

async fn history(
    State(api): State<Api>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let HistoryQuery { topic, since } = query(q)?;
    check_topic(&topic)?;
    let Some(page) = api.endpoint.history(&topic, since.as_deref()).await else {
        return Err(ApiError::Unprocessable(format!(
            "topic {topic:?} keeps no history (its namespace has no history)"
        )));
    };
    if page.unavailable {
        return Err(ApiError::Unavailable(
            "the cluster's history engine cannot be read to check since; try again".into(),
        ));
    }
    let messages: Vec<Value> = page
        .broadcasts
        .iter()
        .map(|b| {
            json!({
                "event": b.event(),
                "payload": b.payload().to_value(),
                "position": b.position(),
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "topic": topic,
        "position": page.position,
        "recovered": page.recovered,
        "messages": messages,
    })))
}

async fn topics(State(api): State<Api>) -> impl IntoResponse {
    let mut topics = api.endpoint.topics();
    topics.sort();
    let topics: Vec<Value> = topics
        .into_iter()
        .map(|(topic, n)| json!({"topic": topic, "subscribers": n}))
        .collect();
    axum::Json(json!({ "topics": topics }))
}

async fn info(State(api): State<Api>) -> impl IntoResponse {
    let stats = api.endpoint.stats();
    let nodes: Vec<String> = api.endpoint.nodes().iter().map(u64::to_string).collect();
    axum::Json(json!({
        "node": api.endpoint.node().map(|n| n.to_string()),
        "nodes": nodes,
        "version": env!("CARGO_PKG_VERSION"),
        "connections": stats.connections,
        "topics": stats.topics,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_route_and_no_other() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..4]), Some("3.1."));
        let paths = doc["paths"].as_object().expect("paths");
        let mut routed: Vec<(String, String)> = routes()
            .iter()
            .map(|(m, p, _)| (m.as_str().to_lowercase(), format!("/api{p}")))
            .collect();
        routed.push(("get".into(), "/api/openapi.json".into()));
        let mut documented = Vec::new();
        for (path, item) in paths {
            for method in item.as_object().expect("a path item").keys() {
                if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                    documented.push((method.clone(), path.clone()));
                }
            }
        }
        routed.sort();
        documented.sort();
        assert_eq!(routed, documented);
    }

    #[test]
    fn json_content_types() {
        for yes in [
            "application/json",
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "application/merge-patch+json",
        ] {
            assert!(is_json(yes), "{yes}");
        }
        for no in ["", "text/plain", "application/jsonx", "text/json+x", "json"] {
            assert!(!is_json(no), "{no}");
        }
    }

    #[test]
    fn loopback_hosts() {
        let check = |host: &str| {
            let request = Request::builder()
                .uri("/api/info")
                .header(header::HOST, host)
                .body(axum::body::Body::empty())
                .unwrap();
            loopback_host(&request).is_ok()
        };
        for yes in [
            "localhost",
            "localhost:4000",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:4000",
        ] {
            assert!(check(yes), "{yes}");
        }
        for no in [
            "example.com",
            "localhost.example.com",
            "127.0.0.1.nip.io",
            "::1",
            "[::1]x",
            "[::1]5",
            "localhost:80x",
            "127.0.0.2",
            "",
        ] {
            assert!(!check(no), "{no}");
        }
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!same(b"", b"x"));
    }

    #[test]
    fn reserved_events_are_refused() {
        assert!(check_event("new_msg").is_ok());
        for event in ["", "phx_reply", "presence_diff", "presence_state"] {
            assert!(check_event(event).is_err(), "{event}");
        }
    }
}
