//! The socket task: owns the connection and every channel's state; handles and timers talk to
//! it through one command queue, so all state changes happen in one place, in order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use firebrand_protocol::{Encoded, Payload, Serializer, ServerMessage};
use futures_util::stream::BoxStream;
use futures_util::{Sink, SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::backoff::{Schedule, jittered};
use crate::channel::{ChannelEvent, ErrorReason, Params};
use crate::error::{JoinError, LeaveError, PushError};
use crate::inflate::{self, Inflating};
use crate::socket::SocketEvent;
use crate::wire;

pub(crate) type ChanId = u64;
/// A connected WebSocket's halves, whichever way it was reached (inflating or not).
type Reader = BoxStream<'static, Result<WsMessage, tungstenite::Error>>;
type Writer = Pin<Box<dyn Sink<WsMessage, Error = tungstenite::Error> + Send>>;
type Reply<T, E> = oneshot::Sender<Result<T, E>>;

/// What handles ask of the task.
pub(crate) enum Command {
    NewChannel {
        id: ChanId,
        topic: String,
        params: Params,
    },
    Subscribe {
        id: ChanId,
        tx: mpsc::UnboundedSender<ChannelEvent>,
    },
    Join {
        id: ChanId,
        timeout: Duration,
        done: Reply<Payload, JoinError>,
    },
    Push {
        id: ChanId,
        event: String,
        payload: Payload,
        deadline: Instant,
        done: Reply<Payload, PushError>,
    },
    Leave {
        id: ChanId,
        timeout: Duration,
        done: Reply<(), LeaveError>,
    },
    /// The last handle of a channel was dropped.
    Drop {
        id: ChanId,
    },
    SubscribeSocket {
        tx: mpsc::UnboundedSender<SocketEvent>,
    },
    Connect,
    Disconnect,
}

pub(crate) struct Config {
    pub(crate) url: String,
    pub(crate) protocols: Option<HeaderValue>,
    pub(crate) timeout: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) reconnect_after: Schedule,
    pub(crate) rejoin_after: Schedule,
    pub(crate) jitter: f64,
    /// Offer permessage-deflate (on `ws://` URLs).
    pub(crate) compress: bool,
    pub(crate) connected: Arc<AtomicBool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Created, `join` not called yet.
    Closed,
    Joining,
    Joined,
    Errored,
    Leaving,
}

struct Buffered {
    event: String,
    payload: Payload,
    deadline: Instant,
    done: Reply<Payload, PushError>,
}

struct LeaveWait {
    r#ref: String,
    deadline: Instant,
    done: Reply<(), LeaveError>,
}

struct Chan {
    id: ChanId,
    topic: String,
    params: Params,
    /// On a recoverable topic: the position of the last broadcast seen (or the join reply's),
    /// sent as `since` on every rejoin so that the server replays what was missed.
    position: Option<String>,
    state: State,
    joined_once: bool,
    /// The ref of the current join push: frames with another join_ref are stale.
    join_ref: Option<String>,
    /// Whether the current join was sent on the current connection.
    join_sent: bool,
    join_timeout: Duration,
    join_deadline: Option<Instant>,
    join_waiter: Option<Reply<Payload, JoinError>>,
    rejoin_at: Option<Instant>,
    rejoin_tries: u32,
    buffer: Vec<Buffered>,
    subscribers: Vec<mpsc::UnboundedSender<ChannelEvent>>,
    leave: Option<LeaveWait>,
}

impl Chan {
    fn emit(&mut self, event: ChannelEvent) {
        self.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// phoenix.js `isMember`: a frame whose join_ref is set and differs from ours is stale.
    fn is_member(&self, join_ref: Option<&str>) -> bool {
        match join_ref {
            Some(jr) if !jr.is_empty() => self.join_ref.as_deref() == Some(jr),
            _ => true,
        }
    }
}

enum Conn {
    Idle,
    Connecting(JoinHandle<Result<(Reader, Writer), tungstenite::Error>>),
    Open {
        reader: Reader,
        writer: mpsc::UnboundedSender<WsMessage>,
    },
}

enum Wake {
    Cmd(Command),
    Connected(Result<Result<(Reader, Writer), tungstenite::Error>, tokio::task::JoinError>),
    Frame(Option<Result<WsMessage, tungstenite::Error>>),
    Timer,
}

pub(crate) struct Task {
    cfg: Config,
    cmds: mpsc::UnboundedReceiver<Command>,
    conn: Conn,
    want_connected: bool,
    reconnect_at: Option<Instant>,
    reconnect_tries: u32,
    last_ref: u64,
    chans: Vec<Chan>,
    /// Pushes sent and waiting for their reply, by ref.
    pending: HashMap<String, (ChanId, Reply<Payload, PushError>)>,
    /// When each pending push times out: its entry is then removed.
    expiries: BinaryHeap<Reverse<(Instant, String)>>,
    heartbeat_at: Option<Instant>,
    heartbeat_pending: Option<(String, Instant)>,
    socket_subs: Vec<mpsc::UnboundedSender<SocketEvent>>,
}

fn halves<S>(ws: WebSocketStream<S>) -> (Reader, Writer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (writer, reader) = ws.split();
    (reader.boxed(), Box::pin(writer))
}

async fn conn_wake(conn: &mut Conn) -> Wake {
    match conn {
        Conn::Idle => std::future::pending().await,
        Conn::Connecting(handle) => Wake::Connected(handle.await),
        Conn::Open { reader, .. } => Wake::Frame(reader.next().await),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Writes queued frames, flushing once per batch. Ends when the queue closes (then closes the
/// WebSocket) or on the first write error.
async fn write_loop(mut sink: Writer, mut rx: mpsc::UnboundedReceiver<WsMessage>) {
    while let Some(msg) = rx.recv().await {
        if sink.feed(msg).await.is_err() {
            return;
        }
        while let Ok(msg) = rx.try_recv() {
            if sink.feed(msg).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

impl Task {
    pub(crate) fn new(cfg: Config, cmds: mpsc::UnboundedReceiver<Command>) -> Self {
        Task {
            cfg,
            cmds,
            conn: Conn::Idle,
            want_connected: true,
            reconnect_at: None,
            reconnect_tries: 0,
            last_ref: 0,
            chans: Vec::new(),
            pending: HashMap::new(),
            expiries: BinaryHeap::new(),
            heartbeat_at: None,
            heartbeat_pending: None,
            socket_subs: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        self.start_connect();
        loop {
            let deadline = self.next_deadline();
            let wake = tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => Wake::Cmd(cmd),
                    None => break,
                },
                wake = conn_wake(&mut self.conn) => wake,
                () = sleep_until(deadline) => Wake::Timer,
            };
            match wake {
                Wake::Cmd(cmd) => self.command(cmd),
                Wake::Connected(Ok(Ok(ws))) => self.opened(ws),
                Wake::Connected(Ok(Err(e))) => {
                    let status = match &e {
                        tungstenite::Error::Http(resp) => Some(resp.status().as_u16()),
                        _ => None,
                    };
                    self.connect_failed(status, e.to_string());
                }
                Wake::Connected(Err(e)) => self.connect_failed(None, e.to_string()),
                Wake::Frame(frame) => self.frame(frame),
                Wake::Timer => self.timers(Instant::now()),
            }
        }
        // Every handle is gone: say goodbye.
        if let Conn::Open { writer, .. } = &self.conn {
            let _ = writer.send(close_frame(1000, ""));
        }
        self.cfg.connected.store(false, Ordering::Relaxed);
    }

    // ---- connection ------------------------------------------------------------------------

    fn start_connect(&mut self) {
        if !matches!(self.conn, Conn::Idle) {
            return;
        }
        self.reconnect_at = None;
        let (url, protocols) = (self.cfg.url.clone(), self.cfg.protocols.clone());
        tracing::debug!(%url, "connecting");
        let offer = self.cfg.compress;
        self.conn = Conn::Connecting(tokio::spawn(async move {
            let mut request = url.into_client_request()?;
            // Not over wss://, where the inflating layer would sit beneath TLS.
            let scheme = request.uri().scheme_str();
            let compress = offer && scheme.is_some_and(|s| s.eq_ignore_ascii_case("ws"));
            let headers = request.headers_mut();
            if let Some(p) = protocols {
                headers.insert("sec-websocket-protocol", p);
            }
            if !compress {
                let (ws, _) = tokio_tungstenite::connect_async(request).await?;
                return Ok(halves(ws));
            }
            // ws:// with the offer: the same connection, read through the inflating layer.
            let offer = HeaderValue::from_static(inflate::OFFER);
            headers.insert("sec-websocket-extensions", offer);
            let uri = request.uri();
            let host = uri.host().unwrap_or_default();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let tcp = TcpStream::connect((host, uri.port_u16().unwrap_or(80))).await?;
            let stream = Inflating::new(tcp, true);
            let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
            let compressing = ws.get_ref().compressing();
            tracing::debug!(compressing, "handshake done");
            Ok(halves(ws))
        }));
    }

    fn schedule_reconnect(&mut self) {
        if !self.want_connected {
            return;
        }
        self.reconnect_tries = self.reconnect_tries.saturating_add(1);
        let delay = jittered(
            (self.cfg.reconnect_after)(self.reconnect_tries),
            self.cfg.jitter,
        );
        tracing::debug!(?delay, tries = self.reconnect_tries, "reconnect scheduled");
        self.reconnect_at = Some(Instant::now() + delay);
    }

    fn connect_failed(&mut self, status: Option<u16>, message: String) {
        tracing::debug!(?status, %message, "connect failed");
        self.conn = Conn::Idle;
        self.emit_socket(SocketEvent::Error { status, message });
        self.schedule_reconnect();
    }

    fn opened(&mut self, (reader, sink): (Reader, Writer)) {
        tracing::debug!("connected");
        let (writer, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(sink, rx));
        self.conn = Conn::Open { reader, writer };
        self.cfg.connected.store(true, Ordering::Relaxed);
        self.reconnect_tries = 0;
        self.reconnect_at = None;
        self.heartbeat_pending = None;
        self.heartbeat_at = Some(Instant::now() + self.cfg.heartbeat);
        self.emit_socket(SocketEvent::Open);
        // Errored channels (and joins asked for while disconnected) join now.
        let ids: Vec<ChanId> = self.chans.iter().map(|c| c.id).collect();
        for id in ids {
            let Some(c) = self.chan(id) else { continue };
            c.rejoin_at = None;
            c.rejoin_tries = 0;
            if c.state == State::Errored || (c.state == State::Joining && !c.join_sent) {
                self.rejoin(id);
            }
        }
    }

    fn is_open(&self) -> bool {
        matches!(self.conn, Conn::Open { .. })
    }

    /// The connection is gone (closed by either side, or failed): channels error, reconnect.
    fn lost(&mut self, code: Option<u16>, reason: String, why: ErrorReason) {
        tracing::debug!(?code, %reason, "connection closed");
        if let Conn::Connecting(handle) = &self.conn {
            handle.abort();
        }
        self.conn = Conn::Idle;
        self.cfg.connected.store(false, Ordering::Relaxed);
        self.heartbeat_at = None;
        self.heartbeat_pending = None;
        self.emit_socket(SocketEvent::Closed { code, reason });
        let ids: Vec<ChanId> = self.chans.iter().map(|c| c.id).collect();
        for id in ids {
            let Some(c) = self.chan(id) else { continue };
            match c.state {
                State::Joined | State::Joining if c.join_sent || c.state == State::Joined => {
                    c.state = State::Errored;
                    c.join_sent = false;
                    c.rejoin_at = None;
                    if c.join_waiter.is_none() {
                        c.join_deadline = None;
                    }
                    c.emit(ChannelEvent::Errored {
                        reason: why.clone(),
                    });
                }
                // The server's channel died with the connection: the leave is done.
                State::Leaving => {
                    if let Some(leave) = c.leave.take() {
                        let _ = leave.done.send(Ok(()));
                    }
                    self.close_chan(id);
                }
                _ => {}
            }
        }
        // Replies to pushes in flight will not come; they time out (as in phoenix.js).
        self.schedule_reconnect();
    }

    /// Closes the connection ourselves with a close frame.
    fn close(&mut self, code: u16, reason: &str, why: ErrorReason) {
        if let Conn::Open { writer, .. } = &self.conn {
            let _ = writer.send(close_frame(code, reason));
        }
        self.lost(Some(code), reason.to_owned(), why);
    }

    fn send(&mut self, msg: WsMessage) {
        if let Conn::Open { writer, .. } = &self.conn {
            let _ = writer.send(msg);
        }
    }

    fn send_frame(
        &mut self,
        join_ref: Option<&str>,
        r#ref: &str,
        topic: &str,
        event: &str,
        payload: &Payload,
    ) -> Result<(), PushError> {
        let msg = wire::encode(join_ref, Some(r#ref), topic, event, payload)?;
        self.send(msg);
        Ok(())
    }

    fn make_ref(&mut self) -> String {
        self.last_ref = self.last_ref.wrapping_add(1);
        self.last_ref.to_string()
    }

    fn emit_socket(&mut self, event: SocketEvent) {
        self.socket_subs.retain(|tx| tx.send(event.clone()).is_ok());
    }

    // ---- incoming frames --------------------------------------------------------------------

    fn frame(&mut self, frame: Option<Result<WsMessage, tungstenite::Error>>) {
        let encoded = match frame {
            Some(Ok(WsMessage::Text(t))) => Encoded::Text(t.as_str().to_owned()),
            Some(Ok(WsMessage::Binary(b))) => Encoded::Binary(b.to_vec()),
            Some(Ok(WsMessage::Close(close))) => {
                let (code, reason) = match close {
                    Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                    None => (None, String::new()),
                };
                return self.lost(code, reason, ErrorReason::ConnectionLost);
            }
            Some(Ok(_)) => return,
            Some(Err(e)) => return self.lost(None, e.to_string(), ErrorReason::ConnectionLost),
            None => return self.lost(None, String::new(), ErrorReason::ConnectionLost),
        };
        match Serializer::V2.decode_server(&encoded) {
            Ok(msg) => self.message(msg),
            Err(e) => tracing::warn!(error = %e, "undecodable frame from the server ignored"),
        }
    }

    fn message(&mut self, msg: ServerMessage) {
        let (topic, join_ref) = match &msg {
            ServerMessage::Event(m) => (m.topic.as_str(), m.join_ref.as_deref()),
            ServerMessage::Reply {
                topic, join_ref, ..
            } => (topic.as_str(), join_ref.as_deref()),
        };
        if topic == "phoenix" {
            if let ServerMessage::Reply { r#ref: Some(r), .. } = &msg
                && self
                    .heartbeat_pending
                    .as_ref()
                    .is_some_and(|(hb, _)| hb == r)
            {
                self.heartbeat_pending = None;
                self.heartbeat_at = Some(Instant::now() + self.cfg.heartbeat);
            }
            return;
        }
        let members: Vec<ChanId> = self
            .chans
            .iter()
            .filter(|c| c.topic == topic && c.is_member(join_ref))
            .map(|c| c.id)
            .collect();
        for id in members {
            match &msg {
                ServerMessage::Reply {
                    r#ref,
                    status,
                    payload,
                    ..
                } => self.reply(id, r#ref.as_deref(), status, payload),
                ServerMessage::Event(m) => self.event(id, &m.event, &m.payload, m.r#ref.as_deref()),
            }
        }
    }

    fn reply(&mut self, id: ChanId, r#ref: Option<&str>, status: &str, payload: &Payload) {
        let Some(r) = r#ref else { return };
        let Some(c) = self.chan(id) else { return };
        if c.state == State::Joining && c.join_ref.as_deref() == Some(r) {
            c.join_deadline = None;
            if status == "ok" {
                if let Some(Value::Object(response)) = payload.to_value()
                    && let Some(Value::String(position)) = response.get("position")
                    && (c.position.is_none()
                        || response.get("recovered") == Some(&Value::Bool(false)))
                {
                    // Resume from the topic's position at this join (before a first
                    // broadcast, or when the server could not recover).
                    c.position = Some(position.clone());
                }
                c.state = State::Joined;
                c.rejoin_tries = 0;
                c.rejoin_at = None;
                if let Some(w) = c.join_waiter.take() {
                    let _ = w.send(Ok(payload.clone()));
                }
                c.emit(ChannelEvent::Joined {
                    response: payload.clone(),
                });
                let now = Instant::now();
                for b in std::mem::take(&mut c.buffer) {
                    if b.deadline > now {
                        self.send_push(id, b.event, b.payload, b.deadline, b.done);
                    } else {
                        let _ = b.done.send(Err(PushError::Timeout));
                    }
                }
            } else {
                c.state = State::Errored;
                c.join_sent = false;
                if let Some(w) = c.join_waiter.take() {
                    let _ = w.send(Err(JoinError::Refused {
                        status: status.to_owned(),
                        response: payload.clone(),
                    }));
                }
                c.emit(ChannelEvent::Errored {
                    reason: ErrorReason::Refused {
                        status: status.to_owned(),
                        response: payload.clone(),
                    },
                });
                self.schedule_rejoin(id);
            }
            return;
        }
        if c.leave.as_ref().is_some_and(|l| l.r#ref == r) {
            if let Some(leave) = c.leave.take() {
                let _ = leave.done.send(Ok(()));
            }
            self.close_chan(id);
            return;
        }
        if self.pending.get(r).is_some_and(|(chan, _)| *chan == id)
            && let Some((_, done)) = self.pending.remove(r)
        {
            let result = if status == "ok" {
                Ok(payload.clone())
            } else {
                Err(PushError::Reply {
                    status: status.to_owned(),
                    response: payload.clone(),
                })
            };
            let _ = done.send(result);
        }
    }

    fn event(&mut self, id: ChanId, event: &str, payload: &Payload, r#ref: Option<&str>) {
        let Some(c) = self.chan(id) else { return };
        if let Some(position) = r#ref.filter(|_| !event.starts_with("phx_")) {
            // A broadcast of a recoverable topic carries its position as its ref.
            c.position = Some(position.to_owned());
        }
        match event {
            "phx_close" => {
                if let Some(leave) = c.leave.take() {
                    let _ = leave.done.send(Ok(()));
                }
                self.close_chan(id);
            }
            "phx_error" => {
                if c.state == State::Leaving {
                    if let Some(leave) = c.leave.take() {
                        let _ = leave.done.send(Ok(()));
                    }
                    return self.close_chan(id);
                }
                c.state = State::Errored;
                c.join_sent = false;
                if c.join_waiter.is_none() {
                    c.join_deadline = None;
                }
                c.emit(ChannelEvent::Errored {
                    reason: ErrorReason::Crashed(payload.clone()),
                });
                self.schedule_rejoin(id);
            }
            _ => c.emit(ChannelEvent::Message {
                event: event.to_owned(),
                payload: payload.clone(),
            }),
        }
    }

    // ---- channels ---------------------------------------------------------------------------

    fn chan(&mut self, id: ChanId) -> Option<&mut Chan> {
        self.chans.iter_mut().find(|c| c.id == id)
    }

    /// Sends a (re)join: a new join ref, the params evaluated now.
    fn rejoin(&mut self, id: ChanId) {
        let Some(c) = self.chan(id) else { return };
        if c.state == State::Leaving {
            return;
        }
        // phoenix.js `leaveOpenTopic`: another live channel on the topic is left first.
        let topic = c.topic.clone();
        let dups: Vec<ChanId> = self
            .chans
            .iter()
            .filter(|d| {
                d.id != id && d.topic == topic && matches!(d.state, State::Joined | State::Joining)
            })
            .map(|d| d.id)
            .collect();
        for dup in dups {
            self.send_leave(dup);
            self.close_chan(dup);
        }
        let r = self.make_ref();
        let Some(c) = self.chan(id) else { return };
        c.state = State::Joining;
        c.join_ref = Some(r.clone());
        c.join_sent = true;
        c.rejoin_at = None;
        c.join_deadline = Some(Instant::now() + c.join_timeout);
        let payload = with_since((c.params)(), c.position.as_deref());
        tracing::debug!(%topic, join_ref = %r, "joining");
        if let Err(e) = self.send_frame(Some(&r), &r, &topic, "phx_join", &payload) {
            tracing::warn!(%topic, error = %e, "join params cannot be encoded");
        }
    }

    fn schedule_rejoin(&mut self, id: ChanId) {
        if !self.is_open() {
            return;
        }
        let (schedule, jitter) = (self.cfg.rejoin_after.clone(), self.cfg.jitter);
        let Some(c) = self.chan(id) else { return };
        c.rejoin_tries = c.rejoin_tries.saturating_add(1);
        let delay = jittered(schedule(c.rejoin_tries), jitter);
        tracing::debug!(topic = %c.topic, ?delay, "rejoin scheduled");
        c.rejoin_at = Some(Instant::now() + delay);
    }

    /// Sends `phx_leave` for the channel's current join, if connected and it was sent.
    fn send_leave(&mut self, id: ChanId) -> Option<String> {
        if !self.is_open() {
            return None;
        }
        let r = self.make_ref();
        let c = self.chan(id)?;
        let (jr, topic) = (c.join_ref.clone(), c.topic.clone());
        self.send_frame(jr.as_deref(), &r, &topic, "phx_leave", &Payload::empty())
            .ok()?;
        Some(r)
    }

    /// Removes a channel: its waiters get `Closed`, its streams get [`ChannelEvent::Closed`].
    fn close_chan(&mut self, id: ChanId) {
        let Some(i) = self.chans.iter().position(|c| c.id == id) else {
            return;
        };
        let mut c = self.chans.remove(i);
        tracing::debug!(topic = %c.topic, "channel closed");
        c.emit(ChannelEvent::Closed);
        if let Some(w) = c.join_waiter.take() {
            let _ = w.send(Err(JoinError::Closed));
        }
        if let Some(leave) = c.leave.take() {
            let _ = leave.done.send(Ok(()));
        }
        for b in c.buffer.drain(..) {
            let _ = b.done.send(Err(PushError::Closed));
        }
        let refs: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, (chan, _))| *chan == id)
            .map(|(r, _)| r.clone())
            .collect();
        for r in refs {
            if let Some((_, done)) = self.pending.remove(&r) {
                let _ = done.send(Err(PushError::Closed));
            }
        }
    }

    fn send_push(
        &mut self,
        id: ChanId,
        event: String,
        payload: Payload,
        deadline: Instant,
        done: Reply<Payload, PushError>,
    ) {
        let r = self.make_ref();
        let Some(c) = self.chan(id) else {
            let _ = done.send(Err(PushError::Closed));
            return;
        };
        let (jr, topic) = (c.join_ref.clone(), c.topic.clone());
        match self.send_frame(jr.as_deref(), &r, &topic, &event, &payload) {
            Ok(()) => {
                self.expiries.push(Reverse((deadline, r.clone())));
                self.pending.insert(r, (id, done));
            }
            Err(e) => {
                let _ = done.send(Err(e));
            }
        }
    }

    // ---- commands ---------------------------------------------------------------------------

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::NewChannel { id, topic, params } => self.chans.push(Chan {
                id,
                topic,
                params,
                state: State::Closed,
                joined_once: false,
                position: None,
                join_ref: None,
                join_sent: false,
                join_timeout: self.cfg.timeout,
                join_deadline: None,
                join_waiter: None,
                rejoin_at: None,
                rejoin_tries: 0,
                buffer: Vec::new(),
                subscribers: Vec::new(),
                leave: None,
            }),
            Command::Subscribe { id, tx } => match self.chan(id) {
                Some(c) => c.subscribers.push(tx),
                None => {
                    let _ = tx.send(ChannelEvent::Closed);
                }
            },
            Command::Join { id, timeout, done } => {
                let open = self.is_open();
                let Some(c) = self.chan(id) else {
                    let _ = done.send(Err(JoinError::Closed));
                    return;
                };
                if c.joined_once {
                    let _ = done.send(Err(JoinError::AlreadyJoined));
                    return;
                }
                c.joined_once = true;
                c.join_timeout = timeout;
                c.join_waiter = Some(done);
                if open {
                    self.rejoin(id);
                } else {
                    c.state = State::Joining;
                    c.join_sent = false;
                    c.join_deadline = Some(Instant::now() + timeout);
                }
            }
            Command::Push {
                id,
                event,
                payload,
                deadline,
                done,
            } => {
                let open = self.is_open();
                let Some(c) = self.chan(id) else {
                    let _ = done.send(Err(PushError::Closed));
                    return;
                };
                if !c.joined_once {
                    let _ = done.send(Err(PushError::NotJoined));
                } else if c.state == State::Leaving {
                    let _ = done.send(Err(PushError::Closed));
                } else if open && c.state == State::Joined {
                    self.send_push(id, event, payload, deadline, done);
                } else {
                    c.buffer.push(Buffered {
                        event,
                        payload,
                        deadline,
                        done,
                    });
                }
            }
            Command::Leave { id, timeout, done } => {
                let Some(c) = self.chan(id) else {
                    let _ = done.send(Err(LeaveError::Closed));
                    return;
                };
                if c.state == State::Leaving {
                    let _ = done.send(Err(LeaveError::Closed));
                    return;
                }
                let was_joined = c.state == State::Joined;
                c.rejoin_at = None;
                c.join_deadline = None;
                c.state = State::Leaving;
                if let Some(w) = c.join_waiter.take() {
                    let _ = w.send(Err(JoinError::Closed));
                }
                let sent = self.send_leave(id);
                match sent {
                    Some(r) if was_joined => {
                        if let Some(c) = self.chan(id) {
                            c.leave = Some(LeaveWait {
                                r#ref: r,
                                deadline: Instant::now() + timeout,
                                done,
                            });
                        }
                    }
                    _ => {
                        self.close_chan(id);
                        let _ = done.send(Ok(()));
                    }
                }
            }
            Command::Drop { id } => {
                if let Some(c) = self.chan(id) {
                    if c.state == State::Joined || (c.state == State::Joining && c.join_sent) {
                        self.send_leave(id);
                    }
                    self.close_chan(id);
                }
            }
            Command::SubscribeSocket { tx } => {
                if self.is_open() {
                    let _ = tx.send(SocketEvent::Open);
                }
                self.socket_subs.push(tx);
            }
            Command::Connect => {
                self.want_connected = true;
                self.start_connect();
            }
            Command::Disconnect => {
                self.want_connected = false;
                self.reconnect_at = None;
                match &self.conn {
                    Conn::Idle => {}
                    Conn::Connecting(handle) => {
                        handle.abort();
                        self.conn = Conn::Idle;
                    }
                    Conn::Open { .. } => self.close(1000, "", ErrorReason::ConnectionLost),
                }
            }
        }
    }

    // ---- timers -----------------------------------------------------------------------------

    fn next_deadline(&self) -> Option<Instant> {
        let chans = self.chans.iter().flat_map(|c| {
            [
                c.join_deadline,
                c.rejoin_at,
                c.leave.as_ref().map(|l| l.deadline),
            ]
        });
        [
            self.expiries.peek().map(|Reverse((t, _))| *t),
            self.reconnect_at,
            self.heartbeat_at,
            self.heartbeat_pending.as_ref().map(|(_, d)| *d),
        ]
        .into_iter()
        .chain(chans)
        .flatten()
        .min()
    }

    fn timers(&mut self, now: Instant) {
        while let Some(Reverse((t, _))) = self.expiries.peek() {
            if *t > now {
                break;
            }
            if let Some(Reverse((_, r))) = self.expiries.pop()
                && let Some((_, done)) = self.pending.remove(&r)
            {
                let _ = done.send(Err(PushError::Timeout));
            }
        }
        if self.reconnect_at.is_some_and(|t| t <= now) {
            self.reconnect_at = None;
            self.start_connect();
        }
        if self
            .heartbeat_pending
            .as_ref()
            .is_some_and(|(_, t)| *t <= now)
        {
            tracing::debug!("heartbeat timeout");
            self.heartbeat_pending = None;
            self.close(1000, "heartbeat timeout", ErrorReason::HeartbeatTimeout);
        }
        if self.heartbeat_at.is_some_and(|t| t <= now) && self.is_open() {
            let r = self.make_ref();
            let _ = self.send_frame(None, &r, "phoenix", "heartbeat", &Payload::empty());
            self.heartbeat_at = None;
            self.heartbeat_pending = Some((r, now + self.cfg.heartbeat));
        }
        let ids: Vec<ChanId> = self.chans.iter().map(|c| c.id).collect();
        for id in ids {
            let open = self.is_open();
            let Some(c) = self.chan(id) else { continue };
            if c.join_deadline.is_some_and(|t| t <= now) {
                self.join_timed_out(id);
            }
            let Some(c) = self.chan(id) else { continue };
            if c.rejoin_at.is_some_and(|t| t <= now) {
                c.rejoin_at = None;
                if open {
                    self.rejoin(id);
                }
            }
            let Some(c) = self.chan(id) else { continue };
            if c.leave.as_ref().is_some_and(|l| l.deadline <= now) {
                if let Some(leave) = c.leave.take() {
                    let _ = leave.done.send(Err(LeaveError::Timeout));
                }
                self.close_chan(id);
            }
        }
    }

    fn join_timed_out(&mut self, id: ChanId) {
        let Some(c) = self.chan(id) else { return };
        c.join_deadline = None;
        if let Some(w) = c.join_waiter.take() {
            let _ = w.send(Err(JoinError::Timeout));
        }
        if c.state != State::Joining {
            return;
        }
        let sent = c.join_sent;
        if sent {
            // phoenix.js leaves the attempt that timed out.
            self.send_leave(id);
        }
        let Some(c) = self.chan(id) else { return };
        c.state = State::Errored;
        c.join_sent = false;
        c.join_ref = None;
        c.emit(ChannelEvent::Errored {
            reason: ErrorReason::JoinTimeout,
        });
        self.schedule_rejoin(id);
    }
}

fn close_frame(code: u16, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// The join params with `since` (the last position seen on a recoverable topic), unless the
/// params set it or are not an object.
fn with_since(params: Payload, since: Option<&str>) -> Payload {
    let Some(since) = since else { return params };
    match params.to_value() {
        Some(Value::Object(mut fields)) => {
            fields
                .entry("since")
                .or_insert_with(|| Value::String(since.to_owned()));
            Payload::from(Value::Object(fields))
        }
        _ => params,
    }
}
