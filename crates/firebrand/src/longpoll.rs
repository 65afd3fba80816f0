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
//! Every answer is HTTP 200 with the logical status in the body, as Phoenix does (except OPTIONS
//! and malformed requests: 400).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::Message as WsMessage;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use firebrand_protocol::{FrameError, Message, Serializer};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};

use crate::conn::{Conn, ConnArgs};
use crate::socket::{Shared, Socket, query_params};
use crate::token::TokenSigner;

/// At most this many ndjson lines of one POST are processed (Phoenix's limit).
const MAX_LINES: usize = 100;

/// The long-poll sessions of one socket.
pub(crate) struct LongPoll {
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    signer: TokenSigner,
    next_id: AtomicU64,
    pub(crate) window: Duration,
}

/// One long-poll client: its frames waiting to be polled, and the way to its connection.
struct Session {
    serializer: Serializer,
    to_conn: mpsc::UnboundedSender<(Message, oneshot::Sender<()>)>,
    buf: Mutex<Buffer>,
    arrived: Notify,
}

struct Buffer {
    frames: VecDeque<String>,
    ended: bool,
    polling: bool,
    last_poll: Instant,
}

impl LongPoll {
    pub(crate) fn new(window: Duration) -> Self {
        LongPoll {
            sessions: Mutex::new(HashMap::new()),
            signer: TokenSigner::new(
                &crate::presence::random_bytes(),
                "firebrand long-poll session",
            ),
            next_id: AtomicU64::new(1),
            window,
        }
    }

    /// The session a request's token names, if it is genuine, unexpired and still running.
    fn session(&self, token: Option<&str>) -> Option<(u64, Arc<Session>)> {
        let id: u64 = self
            .signer
            .verify(token?, Duration::from_secs(14 * 24 * 3600))
            .ok()?;
        let session = self.sessions.lock().get(&id).cloned()?;
        Some((id, session))
    }
}

fn json_response(body: serde_json::Value) -> Response {
    let mut res = (StatusCode::OK, body.to_string()).into_response();
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
    json_response(json!({ "status": code }))
}

/// The session token from the `X-Phoenix-Longpoll-Token` header or the `token` query param.
fn token<'a>(headers: &'a HeaderMap, params: &'a [(String, String)]) -> Option<&'a str> {
    headers
        .get("x-phoenix-longpoll-token")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            params
                .iter()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.as_str())
        })
}

/// Serves one long-poll request.
pub(crate) async fn handle<S: Socket>(
    shared: Arc<Shared<S>>,
    lp: Arc<LongPoll>,
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
    let session = lp.session(token(&parts.headers, &params));
    let method = parts.method.clone();
    match (method, session) {
        (Method::GET, Some((id, session))) => poll(&lp, id, &session).await,
        (Method::GET, None) => start(shared, lp, parts, params).await,
        (_, Some((_, session))) => {
            let Ok(body) =
                axum::body::to_bytes(body, shared.config.max_frame_size * MAX_LINES).await
            else {
                return (StatusCode::PAYLOAD_TOO_LARGE, "long-poll body too large").into_response();
            };
            let ndjson = parts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/x-ndjson"));
            post(&lp, &session, &body, ndjson).await
        }
        (_, None) => status(410),
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
    lp: Arc<LongPoll>,
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
    let id = lp.next_id.fetch_add(1, Ordering::Relaxed);
    let (to_conn, from_clients) = mpsc::unbounded_channel();
    let session = Arc::new(Session {
        serializer: accepted.serializer,
        to_conn,
        buf: Mutex::new(Buffer {
            frames: VecDeque::new(),
            ended: false,
            polling: false,
            last_poll: Instant::now(),
        }),
        arrived: Notify::new(),
    });
    lp.sessions.lock().insert(id, session.clone());
    let conn = Conn::open(ConnArgs {
        shared: shared.clone(),
        assigns: Arc::new(accepted.assigns),
        socket_id: accepted.socket_id,
        serializer: accepted.serializer,
    });
    tokio::spawn(run(conn, lp.clone(), id, session, from_clients));
    json_response(json!({"status": 410, "token": lp.signer.sign(&id), "messages": []}))
}

/// Drives a session's connection until it ends: frames go to the poll buffer, POSTed
/// messages to the connection, and a session not polled for 1.5 windows ends.
async fn run<S: Socket>(
    mut conn: Conn<S>,
    lp: Arc<LongPoll>,
    id: u64,
    session: Arc<Session>,
    mut from_clients: mpsc::UnboundedReceiver<(Message, oneshot::Sender<()>)>,
) {
    let outbox = conn.outbox().clone();
    let inactive = lp.window * 3 / 2;
    let mut reason = crate::StopReason::Closed;
    loop {
        let deadline = {
            let buf = session.buf.lock();
            if buf.polling {
                Instant::now() + inactive
            } else {
                buf.last_poll + inactive
            }
        };
        tokio::select! {
            () = outbox.ready() => {
                let batch = outbox.take();
                for event in batch.events {
                    conn.on_event(event);
                }
                let mut buf = session.buf.lock();
                for frame in batch.frames {
                    match frame {
                        WsMessage::Text(t) => buf.frames.push_back(t.to_string()),
                        // phoenix.js's LongPoll decodes every message as JSON text.
                        _ => tracing::debug!("binary frame not sent over long-poll"),
                    }
                }
                drop(buf);
                session.arrived.notify_waiters();
                if let Some(close) = batch.close {
                    reason = close.stop_reason();
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
                let buf = session.buf.lock();
                if !buf.polling && buf.last_poll + inactive <= Instant::now() {
                    tracing::debug!("long-poll session ended: not polled");
                    break;
                }
            }
        }
    }
    lp.sessions.lock().remove(&id);
    session.buf.lock().ended = true;
    session.arrived.notify_waiters();
    conn.end(reason);
}

/// GET with a session: frames already waiting, or the next ones within the window, or 204.
async fn poll(lp: &LongPoll, id: u64, session: &Session) -> Response {
    let token = lp.signer.sign(&id);
    let deadline = Instant::now() + lp.window;
    session.buf.lock().polling = true;
    let response = loop {
        let arrived = session.arrived.notified();
        {
            let mut buf = session.buf.lock();
            if !buf.frames.is_empty() {
                let messages: Vec<String> = buf.frames.drain(..).collect();
                break json_response(json!({"status": 200, "token": token, "messages": messages}));
            }
            if buf.ended {
                break status(410);
            }
        }
        if timeout(deadline.saturating_duration_since(Instant::now()), arrived)
            .await
            .is_err()
        {
            break json_response(json!({"status": 204, "token": token, "messages": []}));
        }
    };
    let mut buf = session.buf.lock();
    buf.polling = false;
    buf.last_poll = Instant::now();
    response
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
async fn post(lp: &LongPoll, session: &Session, body: &Bytes, ndjson: bool) -> Response {
    let deadline = Instant::now() + lp.window;
    for line in body_lines(body, ndjson) {
        let msg = match decode_line(session.serializer, line) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(error = %e, "long-poll: undecodable frame");
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"error": e.to_string()}).to_string(),
                )
                    .into_response();
            }
        };
        let (handled, done) = oneshot::channel();
        if session.to_conn.send((msg, handled)).is_err() {
            return status(410);
        }
        match timeout(deadline.saturating_duration_since(Instant::now()), done).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return status(410),
            Err(_) => return status(408),
        }
    }
    status(200)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> (
        Session,
        mpsc::UnboundedReceiver<(Message, oneshot::Sender<()>)>,
    ) {
        let (to_conn, from_clients) = mpsc::unbounded_channel();
        let session = Session {
            serializer: Serializer::V2,
            to_conn,
            buf: Mutex::new(Buffer {
                frames: VecDeque::new(),
                ended: false,
                polling: false,
                last_poll: Instant::now(),
            }),
            arrived: Notify::new(),
        };
        (session, from_clients)
    }

    fn body(status: Response) -> u16 {
        assert_eq!(status.status(), StatusCode::OK);
        let bytes =
            futures_util::FutureExt::now_or_never(axum::body::to_bytes(status.into_body(), 1024))
                .unwrap()
                .unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["status"]
            .as_u64()
            .unwrap() as u16
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_the_session_does_not_take_within_the_window_is_408() {
        let lp = LongPoll::new(Duration::from_millis(100));
        let (session, _held) = session();
        let frame = Bytes::from_static(br#"[null,"1","phoenix","heartbeat",{}]"#);
        assert_eq!(body(post(&lp, &session, &frame, false).await), 408);
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_to_a_session_that_ended_is_410() {
        let lp = LongPoll::new(Duration::from_millis(100));
        let (session, from_clients) = session();
        drop(from_clients);
        let frame = Bytes::from_static(br#"[null,"1","phoenix","heartbeat",{}]"#);
        assert_eq!(body(post(&lp, &session, &frame, false).await), 410);
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
