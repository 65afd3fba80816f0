//! The long-poll transport (`/socket/longpoll`), for clients that cannot open a WebSocket.
//!
//! A session is a [`Conn`] like a WebSocket connection's — the same channels, replies,
//! broadcasts and Presence — driven by HTTP requests instead of frames (PROTOCOL.md §3.1):
//!
//! - `GET` without a valid session token runs [`Socket::connect`] and answers
//!   `{"status":410,"token":T,"messages":[]}` (refused: `{"status":403}`);
//! - `GET` with a token waits up to the poll window (10 s) for frames: `{"status":200,"token":T,
//!   "messages":[...]}`, or `{"status":204,...}` when none came;
//! - `POST` with a token carries one frame, or up to 100 `application/x-ndjson` lines (JSON text,
//!   or base64 of a binary frame); each is handed to the session: `{"status":200}`, or
//!   `{"status":408}` when the session did not take one within the window; `{"status":410}` for an
//!   unknown or expired session;
//! - the session ends when it has not been polled for 1.5 windows; its channels terminate.
//!
//! **Bounds.** A session's frames wait for the next poll in its connection's `Outbox`
//! (node/queue.rs), under the socket's
//! [`outbound_limit`](crate::SocketBuilder::outbound_limit): a session that stops polling while
//! frames keep coming ends as a slow consumer, as a WebSocket client that stops reading does
//! (its queue is dropped, its channels terminate, [`Stats::slow_consumers`](crate::Stats)
//! counts it), and its next poll starts a new session (`410`). A poll counts as the session's
//! last one however it ends, also when the client goes away mid-poll and its request is
//! dropped. A POST is read only once its session is found (else `410` at once, its body
//! unread), up to [`max_longpoll_body`](crate::SocketBuilder::max_longpoll_body) (twice the
//! frame limit by default) and within the poll window: past the limit it is answered HTTP 413 before it is
//! buffered whole or forwarded to another node, past the deadline HTTP 408.
//!
//! Every answer is HTTP 200 with the logical status in the body, as Phoenix does (except OPTIONS
//! and malformed requests: 400).
//!
//! **In a cluster**, a session lives on the node that started it, and its token names that node.
//! A poll or post that lands on another node (no sticky sessions behind the load balancer) is
//! forwarded to the session's node through the adapter and answered from there, as Phoenix does
//! over its PubSub. A token naming a node that is gone is treated as no session: a poll starts a
//! new one here (`410` with a new token), a post answers `410`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use firebrand_protocol::{FrameError, Message, Serializer};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};

use crate::Endpoint;
use crate::model::socket::Socket;
use crate::node::queue::{Frame, Outbox};
use crate::token::Proof;
use crate::token::TokenSigner;
use crate::transport::accept::{Shared, query_params};
use crate::transport::conn::{Conn, ConnArgs};

/// At most this many ndjson lines of one POST are processed (Phoenix's limit).
const MAX_LINES: usize = 100;

/// How long a session token stays valid (the session usually ends long before).
const TOKEN_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// The first field of a session token's data.
const SESSION_TAG: &str = "firebrand.lp";

/// How much longer than the poll window a node waits for a forwarded request's answer.
const FORWARD_MARGIN: Duration = Duration::from_secs(5);

/// The long-poll sessions of one node (of all its sockets). One per
/// [`Endpoint`](crate::Endpoint), made with [`Sessions::of`].
pub(crate) struct Sessions {
    node: u64,
    map: Mutex<HashMap<u64, Arc<Session>>>,
    signer: TokenSigner,
    next_id: AtomicU64,
}

/// What a long-poll request asks of its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// `GET`: the frames waiting, or the next ones within the window.
    Poll,
    /// `POST`: frames for the session (`ndjson`: one per line).
    Post { body: Bytes, ndjson: bool },
}

/// A session's answer to a [`Request`], as it travels between nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// An HTTP status and a JSON body.
    Reply { http: u16, body: String },
    /// The token names no running session on its node.
    NoSession,
}

impl Answer {
    fn status(code: u16) -> Answer {
        Answer::Reply {
            http: 200,
            body: json!({ "status": code }).to_string(),
        }
    }

    fn json(body: serde_json::Value) -> Answer {
        Answer::Reply {
            http: 200,
            body: body.to_string(),
        }
    }

    fn into_response(self) -> Response {
        match self {
            Answer::Reply { http: 200, body } => json_response(body),
            Answer::Reply { http, body } => (
                StatusCode::from_u16(http).unwrap_or(StatusCode::BAD_REQUEST),
                body,
            )
                .into_response(),
            Answer::NoSession => status(410),
        }
    }
}

/// One long-poll client: the way to its connection, and to the frames waiting to be polled.
struct Session {
    serializer: Serializer,
    window: Duration,
    to_conn: mpsc::UnboundedSender<(Message, oneshot::Sender<()>)>,
    /// The connection's outbox, where its frames wait for the next poll (bounded in bytes).
    outbox: Arc<Outbox>,
    state: Mutex<PollState>,
    /// Woken when frames arrive in the outbox, and when the session ends.
    arrived: Notify,
}

struct PollState {
    ended: bool,
    /// Polls in progress.
    polls: usize,
    /// When the last poll ended.
    last_poll: Instant,
}

impl Session {
    /// Marks the session as being polled until the returned guard is dropped, which counts
    /// as its last poll: when the poll is answered, and also when its request is dropped (the
    /// client went away mid-poll), so that the session still expires.
    fn polling(&self) -> Polling<'_> {
        self.state.lock().polls += 1;
        Polling(self)
    }
}

struct Polling<'a>(&'a Session);

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.polls -= 1;
        st.last_poll = Instant::now();
    }
}

impl Sessions {
    /// The endpoint's sessions, made on first use; in a cluster they answer the requests other
    /// nodes forward.
    pub(crate) fn of(endpoint: &Endpoint) -> Arc<Sessions> {
        let mut made = false;
        let sessions = endpoint.local(|| {
            made = true;
            Sessions::new(endpoint.hub().id())
        });
        if made && let Some(cluster) = endpoint.cluster() {
            cluster.serve(SERVICE, Arc::new(Forwarded(sessions.clone())));
        }
        sessions
    }

    /// The sessions of node `node`, with tokens signed by a key of this process.
    pub(crate) fn new(node: u64) -> Self {
        Sessions {
            node,
            map: Mutex::new(HashMap::new()),
            signer: TokenSigner::new(
                &crate::node::presence::random_bytes(),
                "firebrand long-poll session",
            ),
            next_id: AtomicU64::new(1),
        }
    }

    /// A session token: `(SESSION_TAG, node, id)` signed, so that it is told apart from an
    /// app's own token (a `TokenSigner` token of two numbers, say) passed as a `token` param.
    fn token(&self, id: u64) -> String {
        self.signer.sign(&(SESSION_TAG, self.node, id))
    }

    /// The node a token says its session lives on, if it has a session token's shape (not
    /// verified: only that node can).
    fn node_of(token: &str) -> Option<u64> {
        crate::token::peek::<(String, u64, u64)>(token)
            .filter(|(tag, _, _)| tag == SESSION_TAG)
            .map(|(_, node, _)| node)
    }

    /// The session a token names, if it is genuine, of this node, unexpired and still running.
    fn session(&self, token: &str) -> Option<(u64, Arc<Session>)> {
        let (tag, node, id): (String, u64, u64) = self.signer.verify(token, TOKEN_MAX_AGE).ok()?;
        if tag != SESSION_TAG || node != self.node {
            return None;
        }
        let session = self.map.lock().get(&id).cloned()?;
        Some((id, session))
    }

    /// Answers a request for one of this node's sessions (made here or on another node).
    pub(crate) async fn answer(&self, token: &str, request: Request) -> Answer {
        let Some((id, session)) = self.session(token) else {
            return Answer::NoSession;
        };
        match request {
            Request::Poll => poll(self, id, &session).await,
            Request::Post { body, ndjson } => post(&session, &body, ndjson).await,
        }
    }

    /// The token a forwarded request's proof stands for, if this node signed it.
    pub(crate) fn redeem(&self, proof: &crate::token::Proof) -> Option<String> {
        self.signer.redeem(proof)
    }
}

/// The long-poll service's id among the cluster's request kinds (the kind byte its forwarded
/// requests have always had on the wire).
const SERVICE: u8 = 7;

/// Forwarded long-poll bodies are refused past this size (Phoenix's default body limit) rather
/// than published whole to every node.
const MAX_FORWARD: usize = 8_000_000;

/// Answers the requests other nodes forward to this node's sessions.
struct Forwarded(Arc<Sessions>);

impl crate::cluster::Service for Forwarded {
    fn answer(
        &self,
        _from: u64,
        request: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send>> {
        let sessions = self.0.clone();
        Box::pin(async move {
            let answer = match decode_request(&request) {
                // Only this node can turn the proof back into the client's token.
                Some((proof, request)) => match sessions.redeem(&proof) {
                    Some(token) => sessions.answer(&token, request).await,
                    None => Answer::NoSession,
                },
                None => Answer::NoSession,
            };
            encode_answer(&answer)
        })
    }
}

/// Sends a long-poll request to the node holding its session and waits up to `wait` for the
/// answer (`None`: no answer in time, or no cluster). The token stays here: the session's node
/// gets its data and a digest of its signature ([`Proof`]).
async fn forward(
    endpoint: &Endpoint,
    node: u64,
    token: &str,
    request: Request,
    wait: Duration,
) -> Option<Answer> {
    let cluster = endpoint.cluster()?;
    if let Request::Post { body, .. } = &request
        && body.len() > MAX_FORWARD
    {
        return Some(Answer::Reply {
            http: 413,
            body: "long-poll body too large to forward to its session's node".into(),
        });
    }
    let Some(proof) = Proof::of(token) else {
        return Some(Answer::NoSession);
    };
    let asked = encode_request(&proof, &request);
    let answer = cluster.request(node, SERVICE, asked, wait).await;
    let answer = answer.as_deref().map(decode_answer);
    if !matches!(answer, Some(Some(_))) {
        tracing::warn!(
            node,
            "long-poll request forwarded to another node: no answer, or an unreadable one"
        );
    }
    answer.flatten()
}

const POLL: u8 = 0;
const POST: u8 = 1;
const POST_NDJSON: u8 = 2;
const ANSWER_NO_SESSION: u8 = 0;
const ANSWER_REPLY: u8 = 1;

/// `op u8, proof data (u16 len), proof digest (32 bytes), POST body`.
fn encode_request(proof: &Proof, request: &Request) -> Bytes {
    let (op, body): (u8, &[u8]) = match request {
        Request::Poll => (POLL, b""),
        Request::Post {
            body,
            ndjson: false,
        } => (POST, body),
        Request::Post { body, ndjson: true } => (POST_NDJSON, body),
    };
    // Tokens are short; a longer one is no token of ours and is cut, failing to verify.
    let data = &proof.body.as_bytes()[..proof.body.len().min(u16::MAX as usize)];
    let mut buf = Vec::with_capacity(3 + data.len() + 32 + body.len());
    buf.push(op);
    buf.extend_from_slice(&(data.len() as u16).to_be_bytes());
    buf.extend_from_slice(data);
    buf.extend_from_slice(&proof.digest);
    buf.extend_from_slice(body);
    Bytes::from(buf)
}

/// The proof and request of [`encode_request`]'s bytes, if they are well formed.
pub(crate) fn decode_request(m: &[u8]) -> Option<(Proof, Request)> {
    let (&op, m) = m.split_first()?;
    let (len, m) = m.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    let (data, m) = m.split_at_checked(len)?;
    let (digest, body) = m.split_first_chunk::<32>()?;
    let proof = Proof {
        body: std::str::from_utf8(data).ok()?.to_owned(),
        digest: *digest,
    };
    let body = Bytes::copy_from_slice(body);
    let request = match op {
        POLL => Request::Poll,
        POST => Request::Post {
            body,
            ndjson: false,
        },
        POST_NDJSON => Request::Post { body, ndjson: true },
        _ => return None,
    };
    Some((proof, request))
}

/// `ANSWER_NO_SESSION`, or `ANSWER_REPLY, http u16, body`.
fn encode_answer(answer: &Answer) -> Bytes {
    match answer {
        Answer::NoSession => Bytes::from_static(&[ANSWER_NO_SESSION]),
        Answer::Reply { http, body } => {
            let mut buf = Vec::with_capacity(3 + body.len());
            buf.push(ANSWER_REPLY);
            buf.extend_from_slice(&http.to_be_bytes());
            buf.extend_from_slice(body.as_bytes());
            Bytes::from(buf)
        }
    }
}

/// The answer of [`encode_answer`]'s bytes, if they are well formed.
pub(crate) fn decode_answer(m: &[u8]) -> Option<Answer> {
    match m.split_first()? {
        (&ANSWER_NO_SESSION, _) => Some(Answer::NoSession),
        (&ANSWER_REPLY, rest) => {
            let (http, body) = rest.split_first_chunk::<2>()?;
            Some(Answer::Reply {
                http: u16::from_be_bytes(*http),
                body: String::from_utf8(body.to_vec()).ok()?,
            })
        }
        _ => None,
    }
}

fn json_response(body: String) -> Response {
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    res
}

fn status(code: u16) -> Response {
    Answer::status(code).into_response()
}

/// The session token, if the request carries one of this endpoint's, and the query params
/// without it (what `connect` sees). It is the `X-Phoenix-Longpoll-Token` header or the *last*
/// `token` query param: the official client appends the session token after the socket's
/// params, which may hold a `token` of their own (a JWT: `new Socket(url, {params: {token}})`),
/// as Plug's last value wins. A last `token` that is not one of ours (the app's own param, on
/// the first poll) stays a param; one of ours never reaches `connect`, even when its session
/// has ended (read as the app's token, it would refuse an anonymous client's reconnect).
fn session_token(
    headers: &HeaderMap,
    mut params: Vec<(String, String)>,
) -> (Option<String>, Vec<(String, String)>) {
    if let Some(t) = headers
        .get("x-phoenix-longpoll-token")
        .and_then(|v| v.to_str().ok())
    {
        return (Some(t.to_owned()), params);
    }
    let last = params.iter().rposition(|(k, _)| k == "token");
    match last {
        Some(i) if Sessions::node_of(&params[i].1).is_some() => {
            let (_, token) = params.remove(i);
            (Some(token), params)
        }
        _ => (None, params),
    }
}

/// Serves one long-poll request of a socket whose poll window is `window`.
pub(crate) async fn handle<S: Socket>(
    shared: Arc<Shared<S>>,
    window: Duration,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    if parts.method == Method::OPTIONS {
        return preflight(&parts.headers);
    }
    if parts.method != Method::GET && parts.method != Method::POST {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let Some(params) = query_params(&parts.uri) else {
        return (StatusCode::BAD_REQUEST, "invalid query string").into_response();
    };
    let (token, params) = session_token(&parts.headers, params);
    let endpoint = &shared.endpoint;
    let sessions = Sessions::of(endpoint);
    // The node a token's session lives on, when that is another live node (the request is
    // forwarded there).
    let elsewhere = token
        .as_deref()
        .and_then(Sessions::node_of)
        .filter(|&node| node != sessions.node && endpoint.nodes().contains(&node));
    let request = if parts.method == Method::GET {
        Request::Poll
    } else {
        // The session is found before the body is read: a POST without one is answered at
        // once, whatever its body (only a session's client may make the server buffer one).
        let found = token
            .as_deref()
            .is_some_and(|t| elsewhere.is_some() || sessions.session(t).is_some());
        if !found {
            return Answer::NoSession.into_response();
        }
        // Read here, before the request may be forwarded: a body over the limit is refused
        // from its `content-length`, or as soon as its bytes pass the limit; one that takes
        // longer than the poll window to arrive, with 408 (a client that trickles a body holds
        // a request and its buffer no longer).
        let limit = shared.config.longpoll_body_limit();
        let too_large = || (StatusCode::PAYLOAD_TOO_LARGE, "long-poll body too large");
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return too_large().into_response();
        }
        let body = match tokio::time::timeout(window, axum::body::to_bytes(body, limit)).await {
            Ok(Ok(body)) => body,
            Ok(Err(_)) => return too_large().into_response(),
            Err(_) => {
                return (StatusCode::REQUEST_TIMEOUT, "long-poll body too slow").into_response();
            }
        };
        let ndjson = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/x-ndjson"));
        Request::Post { body, ndjson }
    };
    let answer = match (&token, elsewhere) {
        (None, _) => Answer::NoSession,
        (Some(token), Some(node)) => forward(
            endpoint,
            node,
            token,
            request.clone(),
            window + FORWARD_MARGIN,
        )
        .await
        .unwrap_or(Answer::NoSession),
        (Some(token), None) => sessions.answer(token, request.clone()).await,
    };
    match (answer, request) {
        (Answer::NoSession, Request::Poll) => start(shared, window, parts, params).await,
        (answer, _) => answer.into_response(),
    }
}

fn preflight(headers: &HeaderMap) -> Response {
    let mut res = StatusCode::OK.into_response();
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("get, post, options"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("3600"),
    );
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    res
}

/// A new session: the same checks and `connect` as a WebSocket, then `410` with its token.
async fn start<S: Socket>(
    shared: Arc<Shared<S>>,
    window: Duration,
    parts: axum::http::request::Parts,
    params: Vec<(String, String)>,
) -> Response {
    let auth_token = parts
        .headers
        .get("x-phoenix-authtoken")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let accepted = match shared.accept(parts, params, auth_token).await {
        Ok(accepted) => accepted,
        Err(refusal) => {
            tracing::debug!(status = %refusal.status(), "long-poll session refused");
            return status(403);
        }
    };
    let sessions = Sessions::of(&shared.endpoint);
    let id = sessions.next_id.fetch_add(1, Ordering::Relaxed);
    let (to_conn, from_clients) = mpsc::unbounded_channel();
    let conn = Conn::open(ConnArgs {
        shared: shared.clone(),
        assigns: Arc::new(accepted.assigns),
        socket_id: accepted.socket_id,
        serializer: accepted.serializer,
        deflate: None,
    });
    let session = Arc::new(Session {
        serializer: accepted.serializer,
        window,
        to_conn,
        outbox: conn.outbox().clone(),
        state: Mutex::new(PollState {
            ended: false,
            polls: 0,
            last_poll: Instant::now(),
        }),
        arrived: Notify::new(),
    });
    sessions.map.lock().insert(id, session.clone());
    let token = sessions.token(id);
    tokio::spawn(run(conn, sessions, id, session, from_clients));
    Answer::json(json!({"status": 410, "token": token, "messages": []})).into_response()
}

/// Drives a session's connection until it ends: frames wait in its outbox for a poll (which
/// is woken), POSTed messages go to the connection, and a session not polled for 1.5 windows,
/// or whose outbox overflows, ends.
async fn run<S: Socket>(
    mut conn: Conn<S>,
    sessions: Arc<Sessions>,
    id: u64,
    session: Arc<Session>,
    mut from_clients: mpsc::UnboundedReceiver<(Message, oneshot::Sender<()>)>,
) {
    let outbox = session.outbox.clone();
    let inactive = session.window * 3 / 2;
    let mut reason = crate::StopReason::Closed;
    loop {
        let deadline = {
            let st = session.state.lock();
            if st.polls > 0 {
                Instant::now() + inactive
            } else {
                st.last_poll + inactive
            }
        };
        tokio::select! {
            () = outbox.ready() => {
                let (events, close) = outbox.take_events();
                for event in events {
                    conn.on_event(event);
                }
                session.arrived.notify_waiters();
                if let Some(close) = close {
                    conn.closing(&close);
                    reason = crate::StopReason::of(&close);
                    break;
                }
            }
            msg = from_clients.recv() => match msg {
                Some((msg, handled)) => {
                    conn.on_message(msg);
                    let _ = handled.send(());
                }
                None => break,
            },
            () = sleep_until(deadline) => {
                let st = session.state.lock();
                if st.polls == 0 && st.last_poll + inactive <= Instant::now() {
                    tracing::debug!("long-poll session ended: not polled");
                    break;
                }
            }
        }
    }
    sessions.map.lock().remove(&id);
    session.state.lock().ended = true;
    session.arrived.notify_waiters();
    conn.end(reason);
}

/// GET with a session: frames already waiting, or the next ones within the window, or 204.
async fn poll(sessions: &Sessions, id: u64, session: &Session) -> Answer {
    let token = sessions.token(id);
    let deadline = Instant::now() + session.window;
    let _polling = session.polling();
    loop {
        let arrived = session.arrived.notified();
        let messages: Vec<String> = session
            .outbox
            .take_frames()
            .into_iter()
            .filter_map(|frame| match frame {
                Frame::Text(t) => Some(String::from_utf8_lossy(&t).into_owned()),
                // phoenix.js's LongPoll decodes every message as JSON text.
                _ => {
                    tracing::debug!("binary frame not sent over long-poll");
                    None
                }
            })
            .collect();
        if !messages.is_empty() {
            return Answer::json(json!({"status": 200, "token": token, "messages": messages}));
        }
        if session.state.lock().ended {
            return Answer::status(410);
        }
        if timeout(deadline.saturating_duration_since(Instant::now()), arrived)
            .await
            .is_err()
        {
            return Answer::json(json!({"status": 204, "token": token, "messages": []}));
        }
    }
}

/// The frames of a POST body: its first 100 ndjson lines (`\n` or `\r\n`), or the whole
/// body as one frame.
pub(crate) fn body_lines(body: &[u8], ndjson: bool) -> Vec<&[u8]> {
    if ndjson {
        body.split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.is_empty())
            .take(MAX_LINES)
            .collect()
    } else {
        vec![body]
    }
}

/// One line of a POST body as a client message.
pub(crate) fn decode_line(serializer: Serializer, line: &[u8]) -> Result<Message, FrameError> {
    if line.first().is_some_and(|b| *b == b'[' || *b == b'{') {
        serializer.decode_text(Bytes::copy_from_slice(line))
    } else {
        let data = base64::engine::general_purpose::STANDARD
            .decode(line)
            .map_err(|_| FrameError::Truncated)?;
        serializer.decode_binary(Bytes::from(data))
    }
}

/// POST: each frame is handed to the session and awaited (up to the window).
async fn post(session: &Session, body: &Bytes, ndjson: bool) -> Answer {
    let deadline = Instant::now() + session.window;
    for line in body_lines(body, ndjson) {
        let msg = match decode_line(session.serializer, line) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(error = %e, "long-poll: undecodable frame");
                return Answer::Reply {
                    http: 400,
                    body: json!({"error": e.to_string()}).to_string(),
                };
            }
        };
        let (handled, done) = oneshot::channel();
        if session.to_conn.send((msg, handled)).is_err() {
            return Answer::status(410);
        }
        match timeout(deadline.saturating_duration_since(Instant::now()), done).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Answer::status(410),
            Err(_) => return Answer::status(408),
        }
    }
    Answer::status(200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_token_is_the_last_token_param_and_never_a_connect_param() {
        let params = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ours = Sessions::new(7).token(1);
        let none = HeaderMap::new();
        // The official client: the socket's params (here a JWT named `token`), then the session's.
        let p = params(&[("token", "jwt"), ("vsn", "2.0.0"), ("token", &ours)]);
        let (token, rest) = session_token(&none, p.clone());
        assert_eq!(token.as_deref(), Some(ours.as_str()));
        assert_eq!(rest, params(&[("token", "jwt"), ("vsn", "2.0.0")]));
        // The first poll: the app's own `token` is no session token, and stays a param — also
        // a token of firebrand's own signer carrying two numbers, as a session token's did.
        let jwt = params(&[("token", "jwt")]);
        assert_eq!(session_token(&none, jwt.clone()), (None, jwt));
        let app = TokenSigner::new(b"the app's key", "user socket").sign(&(7u64, 1u64));
        let app = params(&[("token", &app)]);
        assert_eq!(session_token(&none, app.clone()), (None, app));
        let mut headers = HeaderMap::new();
        headers.insert("x-phoenix-longpoll-token", HeaderValue::from_static("h"));
        assert_eq!(session_token(&headers, p.clone()), (Some("h".into()), p));
    }

    fn session() -> (
        Session,
        mpsc::UnboundedReceiver<(Message, oneshot::Sender<()>)>,
    ) {
        let (to_conn, from_clients) = mpsc::unbounded_channel();
        let session = Session {
            serializer: Serializer::V2,
            window: Duration::from_millis(100),
            to_conn,
            outbox: Arc::new(Outbox::new(1 << 20)),
            state: Mutex::new(PollState {
                ended: false,
                polls: 0,
                last_poll: Instant::now(),
            }),
            arrived: Notify::new(),
        };
        (session, from_clients)
    }

    fn body(answer: Answer) -> u16 {
        let Answer::Reply { http: 200, body } = answer else {
            panic!("not a 200 reply: {answer:?}");
        };
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["status"]
            .as_u64()
            .unwrap() as u16
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_the_session_does_not_take_within_the_window_is_408() {
        let (session, _held) = session();
        let frame = Bytes::from_static(br#"[null,"1","phoenix","heartbeat",{}]"#);
        assert_eq!(body(post(&session, &frame, false).await), 408);
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_to_a_session_that_ended_is_410() {
        let (session, from_clients) = session();
        drop(from_clients);
        let frame = Bytes::from_static(br#"[null,"1","phoenix","heartbeat",{}]"#);
        assert_eq!(body(post(&session, &frame, false).await), 410);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_poll_counts_as_the_last_poll() {
        let (session, _held) = session();
        let sessions = Sessions::new(1);
        let started = Instant::now();
        // The request is dropped (its client went away) 30 ms into the 100 ms window.
        let polled = timeout(Duration::from_millis(30), poll(&sessions, 1, &session)).await;
        assert!(polled.is_err());
        let st = session.state.lock();
        assert_eq!(st.polls, 0);
        assert_eq!(st.last_poll, started + Duration::from_millis(30));
    }

    #[test]
    fn forwarded_requests_and_answers_round_trip() {
        for request in [
            Request::Poll,
            Request::Post {
                body: Bytes::from_static(b"[1]\n[2]"),
                ndjson: true,
            },
            Request::Post {
                body: Bytes::from_static(b"[1]"),
                ndjson: false,
            },
        ] {
            let proof = Proof::of("tok.en").unwrap();
            let bytes = encode_request(&proof, &request);
            assert!(
                !bytes.windows(2).any(|w| w == b"en"),
                "the signature travels"
            );
            assert_eq!(decode_request(&bytes), Some((proof, request)));
            for cut in 0..3 + 3 + 32 {
                assert_eq!(decode_request(&bytes[..cut]), None, "cut at {cut}");
            }
        }
        for answer in [
            Answer::NoSession,
            Answer::Reply {
                http: 200,
                body: r#"{"status":204}"#.into(),
            },
        ] {
            assert_eq!(decode_answer(&encode_answer(&answer)), Some(answer));
        }
        assert_eq!(decode_answer(&[ANSWER_REPLY, 1]), None);
    }

    /// Keeps what an endpoint publishes.
    #[derive(Clone, Default)]
    struct Record(Arc<Mutex<Vec<Bytes>>>);

    impl crate::cluster::Adapter for Record {
        fn start(&self, _: crate::cluster::ClusterLink) {}

        fn publish(&self, message: Bytes) {
            self.0.lock().push(message);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn forwarding_keeps_the_token_and_refuses_huge_bodies() {
        let bus = Record::default();
        let e = Endpoint::builder().adapter(bus.clone()).build();
        let wait = Duration::from_millis(10);
        let poll = forward(&e, 5, "eyJkYXRhIjoxfQ.SIGNATURE", Request::Poll, wait);
        assert_eq!(poll.await, None);
        // Format 1, kind 7: the forwarded request (the others are heartbeats).
        let sent = bus
            .0
            .lock()
            .iter()
            .find(|m| m[..2] == [1, SERVICE])
            .cloned()
            .unwrap();
        assert!(sent.windows(9).all(|w| w != b"SIGNATURE"));
        assert!(sent.windows(14).any(|w| w == b"eyJkYXRhIjoxfQ"));

        let post = |len| Request::Post {
            body: Bytes::from(vec![b'x'; len]),
            ndjson: false,
        };
        let huge = forward(&e, 5, "a.b", post(MAX_FORWARD + 1), wait).await;
        assert!(
            matches!(huge, Some(Answer::Reply { http: 413, .. })),
            "{huge:?}"
        );
        assert!(bus.0.lock().iter().all(|m| m.len() < MAX_FORWARD));
        assert_eq!(forward(&e, 5, "a.b", post(MAX_FORWARD), wait).await, None);
        assert!(bus.0.lock().iter().any(|m| m.len() > MAX_FORWARD));
    }

    #[test]
    fn bodies_split_on_newlines_and_stop_at_100_lines() {
        let body: Vec<u8> = (0..150)
            .flat_map(|i| format!("l{i}\r\n").into_bytes())
            .collect();
        let lines = body_lines(&body, true);
        assert_eq!(lines.len(), 100);
        assert_eq!(lines[99], b"l99");
        assert_eq!(body_lines(b"a\nb", false), [b"a\nb".as_slice()]);
    }
}
