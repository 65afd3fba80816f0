//! One connection: the task that reads client frames, routes them to channels, and writes
//! everything queued in the connection's [`Outbox`] in batches.
//!
//! The task never waits for a channel: a join spawns the channel's task and returns at once,
//! and client pushes are queued to the channel's mailbox. So a slow `join` or `handle_in`
//! delays only its own channel.

use std::sync::Arc;

use std::task::Poll;

use firebrand_protocol::{Message, Payload, Serializer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout, timeout_at};

use crate::limits::{Bucket, Limit};
use crate::model::channel::{Reply, StopReason};
use crate::model::context::Wire;
use crate::model::runner::{ChannelHandle, InRejected, SpawnArgs};
use crate::model::socket::Socket;
use crate::node::Registered;
use crate::node::pubsub::SubId;
use crate::node::queue::{Close, ConnEvent, Frame, Outbox};
use crate::transport::accept::Shared;
use crate::transport::ws::{Deflate, Incoming, Reader, WsError};

pub(crate) struct ConnArgs<S: Socket> {
    pub(crate) shared: Arc<Shared<S>>,
    pub(crate) assigns: Arc<S::Assigns>,
    pub(crate) socket_id: Option<Arc<str>>,
    pub(crate) serializer: Serializer,
    /// permessage-deflate, when negotiated.
    pub(crate) deflate: Option<Deflate>,
}

/// How long a closing connection waits for the client's close frame.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A connection's state, whatever transport carries it: its channels, its outbox, its
/// registrations. Dropping it ends the connection's channels and registrations.
pub(crate) struct Conn<S: Socket> {
    shared: Arc<Shared<S>>,
    assigns: Arc<S::Assigns>,
    socket_id: Option<Arc<str>>,
    pub(crate) wire: Wire,
    channels: Channels,
    next_channel_id: u64,
    id_sub: Option<SubId>,
    /// Rate limits on inbound messages and joins.
    messages: Option<Bucket>,
    joins: Option<Bucket>,
    /// Its registration with the node, and the way to the node's PubSub and counters.
    registered: Registered,
    /// A compression context of its own: only in the benchmark's per-connection mode
    /// ([`crate::deflate::Kept`]).
    kept: Option<crate::deflate::Kept>,
}

/// A connection's channel tasks by topic: a vector, searched linearly (at most `max_channels`,
/// 100 by default), sized to what is joined. A hash map holds room for 3 channels from the
/// first: 300 bytes per connection that joins one topic.
///
/// A task stays here until it has ended (`ConnEvent::ChannelExited`), not only while it is the
/// topic's current channel: one that was left or replaced is [`Slot::Ending`] until its
/// `terminate` has returned and its `Runner` has unsubscribed. So ending tasks count against
/// `max_channels`, and a later channel of the same topic starts only once every earlier one is
/// gone (exactly once across rejoins: the old subscription is gone before the new join is
/// subscribed).
#[derive(Default)]
struct Channels(Vec<(Arc<str>, Slot)>);

/// One channel task of the connection.
enum Slot {
    /// The topic's current channel: client messages for the topic go to it.
    Live(ChannelHandle),
    /// A task left or replaced, still ending. `next` starts its successor, the topic's next
    /// channel, once this task has ended (if it never started, `next` passes to its own
    /// predecessor instead: see [`Channels::exited`]).
    Ending {
        id: u64,
        next: Option<(u64, oneshot::Sender<()>)>,
    },
}

impl Slot {
    fn id(&self) -> u64 {
        match self {
            Slot::Live(c) => c.id,
            Slot::Ending { id, .. } => *id,
        }
    }
}

impl Channels {
    /// The topic's current channel.
    fn get(&self, topic: &str) -> Option<&ChannelHandle> {
        self.0.iter().find_map(|(t, s)| match s {
            Slot::Live(c) if &**t == topic => Some(c),
            _ => None,
        })
    }

    /// Marks the topic's current channel as ending; returns it.
    fn end(&mut self, topic: &str) -> Option<ChannelHandle> {
        let slot = self
            .0
            .iter_mut()
            .find(|(t, s)| &**t == topic && matches!(s, Slot::Live(_)))?;
        let ending = Slot::Ending {
            id: slot.1.id(),
            next: None,
        };
        match std::mem::replace(&mut slot.1, ending) {
            Slot::Live(c) => Some(c),
            Slot::Ending { .. } => None,
        }
    }

    /// Makes task `id` the successor of the topic's latest task, if one is still ending (after
    /// [`Channels::end`] of the current one): returns what `id` must await before it starts.
    fn follow(&mut self, topic: &str, id: u64) -> Option<oneshot::Receiver<()>> {
        // The topic's latest task (the one with no successor yet) is the new one's predecessor.
        let before = self.0.iter_mut().find_map(|(t, s)| match s {
            Slot::Ending { next, .. } if &**t == topic && next.is_none() => Some(next),
            _ => None,
        });
        before.map(|next| {
            let (tx, rx) = oneshot::channel();
            *next = Some((id, tx));
            rx
        })
    }

    /// Adds the topic's new current channel.
    fn push(&mut self, topic: Arc<str>, handle: ChannelHandle) {
        if self.0.is_empty() {
            self.0.reserve_exact(1);
        }
        self.0.push((topic, Slot::Live(handle)));
    }

    /// Forgets the task `id`, which has ended, and starts its successor if it was the last
    /// task before it. A task that ended without starting (aborted while it waited) hands its
    /// successor to its own predecessor, which is still running.
    fn exited(&mut self, id: u64) {
        let next = match self.0.iter().position(|(_, s)| s.id() == id) {
            Some(i) => match self.0.swap_remove(i).1 {
                Slot::Ending { next, .. } => next,
                Slot::Live(_) => None,
            },
            None => None,
        };
        let before = self.0.iter_mut().find_map(|(_, s)| match s {
            Slot::Ending {
                next: n @ Some(_), ..
            } if n.as_ref().is_some_and(|(s, _)| *s == id) => Some(n),
            _ => None,
        });
        match (before, next) {
            (Some(before), next) => *before = next,
            (None, Some((_, start))) => {
                let _ = start.send(());
            }
            (None, None) => {}
        }
    }

    /// Channel tasks alive, current or ending.
    fn len(&self) -> usize {
        self.0.len()
    }

    /// Takes every task: the current channels, to be told the socket closed. Ending tasks
    /// just end; successors still waiting for them do not start.
    fn drain(&mut self) -> impl Iterator<Item = ChannelHandle> + '_ {
        self.0.drain(..).filter_map(|(_, s)| match s {
            Slot::Live(c) => Some(c),
            Slot::Ending { .. } => None,
        })
    }
}

/// How the read loop ended.
enum End {
    /// The transport failed or the client went away: nothing more to send.
    Gone,
    /// The client sent a close frame: its code, or why the frame is invalid.
    ClientClosed(Result<Option<u16>, WsError>),
    /// The server closes with this code.
    Close(Close),
    /// The server closes with this code, but a write to the client did not finish within the
    /// write timeout: the connection is dropped without a close frame, which would land in the
    /// middle of the frame being written.
    Dropped(Close),
    /// A protocol error with a message for the close frame.
    Invalid(u16, String),
}

impl<S: Socket> Conn<S> {
    /// Opens a connection: registers it with the endpoint and subscribes its socket id.
    pub(crate) fn open(args: ConnArgs<S>) -> Self {
        let hub = args.shared.endpoint.hub().clone();
        let compresses = args.deflate.is_some_and(|d| d.compress);
        let kept = args.deflate.is_some_and(|d| d.compress && d.kept);
        let outbox = Arc::new(Outbox::with_compression(
            args.shared.config.outbound_limit,
            compresses,
        ));
        let registered = hub.register(outbox.clone());
        // The rate limits' clock (wrapping milliseconds).
        let now = registered.now_ms() as u32;
        let id_sub = args
            .socket_id
            .as_ref()
            .map(|id| hub.join_socket(id, outbox.clone()));
        Conn {
            assigns: args.assigns,
            socket_id: args.socket_id,
            wire: Wire {
                outbox,
                serializer: args.serializer,
                pending: Arc::default(),
                max_pending: u32::try_from(args.shared.config.max_pending_replies)
                    .unwrap_or(u32::MAX),
            },
            messages: (args.shared.config.message_rate).map(|r| Bucket::new(r, now)),
            joins: (args.shared.config.join_rate).map(|r| Bucket::new(r, now)),
            channels: Channels::default(),
            next_channel_id: 0,
            id_sub,
            registered,
            shared: args.shared,
            kept: kept.then(crate::deflate::Kept::new),
        }
    }

    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.wire.outbox
    }
}

impl<S: Socket> Conn<S> {
    /// Ends the connection's channels (they terminate with `reason`) and its socket id
    /// subscription. Frames queued from then on are dropped. Idempotent; the endpoint
    /// registration lasts until the `Conn` is dropped.
    pub(crate) fn end(&mut self, reason: StopReason) {
        self.wire.outbox.close(Close::ENDED);
        drop(self.wire.outbox.take());
        for ch in self.channels.drain() {
            ch.inbox.socket_closed(reason.clone());
        }
        if let (Some(id), Some(sub)) = (&self.socket_id, self.id_sub.take()) {
            self.registered.hub().leave_socket(id, sub);
        }
    }
}

impl<S: Socket> Drop for Conn<S> {
    fn drop(&mut self) {
        self.end(StopReason::Closed);
    }
}

/// Serves one WebSocket connection until it ends.
///
/// Reads use a buffer on the stack of each read (see [`crate::transport::ws`]): an idle connection holds
/// no read buffer. Everything queued in the outbox is written with one write per batch.
///
/// This task is the largest per-connection cost, so its state is kept small: the connection,
/// its transport and its frame reader live in one box (the future holds a pointer, not three
/// fields plus the copies the compiler keeps of moved arguments); the wait for the next read
/// or queued frame is one `poll_fn` holding references; the idle timeout is a deadline the
/// node's sweep checks ([`Registered::watch_idle`](crate::node::Registered::watch_idle)), not a
/// timer here; writes and the close handshake run in boxed futures of their own. (The task is
/// 256 bytes; with a `select!` over a read, the outbox and a `Sleep` it was 512.)
async fn run<S, T>(mut session: Box<Session<S, T>>)
where
    S: Socket,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let end = serve(&mut session).await;
    Box::pin(finish(session, end)).await;
}

/// Reads and writes until the connection ends; how it ends.
async fn serve<S, T>(session: &mut Session<S, T>) -> End
where
    S: Socket,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Session { io, reader, conn } = session;
    let idle_timeout = conn.shared.config.idle_timeout;
    conn.registered.watch_idle(&conn.wire.outbox, idle_timeout);
    if reader.preloaded()
        && let Some(end) = conn.on_bytes(reader, &[])
    {
        return end;
    }
    loop {
        // Both waits at once, so that neither starves the other: what was read is handled
        // while polling; queued frames are written after.
        let (read, queued) = std::future::poll_fn(|cx| {
            let queued = conn.wire.outbox.poll_ready(cx).is_ready();
            let read = poll_read_with(io, cx, |data| conn.on_bytes(reader, data));
            if queued || read.is_ready() {
                Poll::Ready((read, queued))
            } else {
                Poll::Pending
            }
        })
        .await;
        if let Poll::Ready(read) = read {
            conn.registered.touch(&conn.wire.outbox, idle_timeout);
            match read {
                Ok(Some(None)) => {}
                Ok(Some(Some(end))) => return end,
                Ok(None) | Err(_) => return End::Gone,
            }
        }
        // Boxed: a write's state is held only while writing, not by idle connections.
        if queued && let Some(end) = Box::pin(conn.flush(io)).await {
            return end;
        }
    }
}

/// Ends the connection's channels, then the close handshake that `end` calls for.
async fn finish<S, T>(mut session: Box<Session<S, T>>, end: End)
where
    S: Socket,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Session { io, conn, .. } = &mut *session;
    let max_frame_size = conn.shared.config.max_frame_size;
    conn.end(match &end {
        End::Close(c) | End::Dropped(c) => StopReason::of(c),
        _ => StopReason::Closed,
    });

    let frame = match end {
        End::Gone | End::Dropped(_) => None,
        // Echo the client's close (RFC 6455 §5.5.1), or answer an invalid one with the error's
        // code; either way the client has closed, so no close frame is awaited.
        End::ClientClosed(Ok(code)) => Some((
            crate::transport::ws::close_frame(code.unwrap_or(1000), ""),
            false,
        )),
        End::ClientClosed(Err(e)) => {
            let (code, reason) = e.close();
            tracing::debug!(code, reason, "closing connection: invalid close frame");
            Some((crate::transport::ws::close_frame(code, reason), false))
        }
        End::Close(c) => Some((crate::transport::ws::close_frame(c.code, c.reason), true)),
        End::Invalid(code, reason) => {
            Some((crate::transport::ws::close_frame(code, &reason), true))
        }
    };
    close_handshake(io, frame, max_frame_size).await;
    // Unregistered only now, so that a shutdown waits for the close handshakes.
    drop(session);
}

/// Serves a connection once the HTTP server hands it over after the `101` response.
pub(crate) async fn upgraded<S: Socket>(
    on_upgrade: hyper::upgrade::OnUpgrade,
    args: Box<ConnArgs<S>>,
) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => return tracing::debug!(error = %e, "WebSocket upgrade failed"),
    };
    // The connection gets a task of its own (this one ends): nested in this one, its state
    // would be this future's plus what the upgrade kept, 384 bytes a connection, not 256.
    match Opened::new(upgraded, args) {
        Opened::Tcp(session) => tokio::spawn(run(session)),
        Opened::Upgraded(session) => tokio::spawn(run(session)),
    };
}

/// A connection handed over by hyper, as its session.
enum Opened<S: Socket> {
    /// Served by [`Server`](crate::Server): the connection is taken back as the `TcpStream` it
    /// is (no boxed stream, no dynamic call per read and write).
    Tcp(Box<Session<S, tokio::net::TcpStream>>),
    /// Served by something else: through hyper's `Upgraded`.
    Upgraded(Box<Session<S, hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>>),
}

impl<S: Socket> Opened<S> {
    fn new(upgraded: hyper::upgrade::Upgraded, args: Box<ConnArgs<S>>) -> Self {
        use hyper_util::rt::TokioIo;
        match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
            Ok(parts) => Opened::Tcp(Session::open(parts.io.into_inner(), args, &parts.read_buf)),
            Err(upgraded) => Opened::Upgraded(Session::open(TokioIo::new(upgraded), args, &[])),
        }
    }
}

/// A WebSocket connection's state, boxed by [`run`].
struct Session<S: Socket, T> {
    io: T,
    reader: Reader,
    conn: Conn<S>,
}

impl<S: Socket, T> Session<S, T> {
    /// Takes the arguments' box, freed here: kept by the task, it would last as long as the
    /// connection. `read` is what the HTTP server read past the upgrade request (a client
    /// that did not wait for the `101`): the reader starts with it.
    #[expect(clippy::boxed_local, reason = "the task hands over its box to free it")]
    fn open(io: T, args: Box<ConnArgs<S>>, read: &[u8]) -> Box<Self> {
        let args = *args;
        let max_size = args.shared.config.max_frame_size;
        let mut reader = match args.deflate {
            Some(_) => Reader::inflating(max_size),
            None => Reader::new(max_size),
        };
        reader.preload(read);
        Box::new(Session {
            io,
            reader,
            conn: Conn::open(args),
        })
    }
}

/// Sends a close frame, if any, and when `wait` waits (up to [`CLOSE_WAIT`]) for the
/// client's close frame or its end of the connection, so that neither side sees a reset.
async fn close_handshake<T>(io: &mut T, frame: Option<(Vec<u8>, bool)>, max_frame_size: usize)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    if let Some((frame, wait)) = frame {
        let _ = timeout(CLOSE_WAIT, async {
            io.write_all(&frame).await?;
            if !wait {
                return Ok(());
            }
            let mut closing = Reader::new(max_frame_size);
            loop {
                let read = read_with(io, |data| {
                    let mut closed = false;
                    let ok = closing.feed(data, |m| closed |= matches!(m, Incoming::Close(_)));
                    closed || ok.is_err()
                })
                .await?;
                if read.is_none_or(|closed| closed) {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
    let _ = timeout(CLOSE_WAIT, io.shutdown()).await;
}

/// Reads what is available into a buffer on the stack and hands it to `on` (`Ok(None)`: the
/// connection ended). The buffer lives only during the read, so a waiting connection holds none.
fn read_with<T, R>(
    io: &mut T,
    mut on: impl FnMut(&[u8]) -> R,
) -> impl Future<Output = std::io::Result<Option<R>>>
where
    T: AsyncRead + Unpin,
{
    std::future::poll_fn(move |cx| poll_read_with(io, cx, &mut on))
}

/// [`read_with`] as a poll.
fn poll_read_with<T, R>(
    io: &mut T,
    cx: &mut std::task::Context<'_>,
    on: impl FnOnce(&[u8]) -> R,
) -> Poll<std::io::Result<Option<R>>>
where
    T: AsyncRead + Unpin,
{
    // Not zeroed: the connection task polls here on every wake-up (each batch of queued
    // frames too), and clearing 8 KB each time was 1% of a burst's CPU. The socket writes
    // what `filled()` then shows.
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut buf = ReadBuf::uninit(&mut buf);
    match std::pin::Pin::new(io).poll_read(cx, &mut buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(Ok(None)),
        Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(on(buf.filled())))),
    }
}

/// How much one read takes at most (on the stack).
const READ_CHUNK: usize = 8 * 1024;

impl<S: Socket> Conn<S> {
    /// Decodes the bytes just read and handles each message; returns how the connection
    /// ends, if it does.
    fn on_bytes(&mut self, reader: &mut Reader, data: &[u8]) -> Option<End> {
        let mut end = None;
        let fed = reader.feed(data, |incoming| {
            if end.is_some() {
                return;
            }
            let decoded = match incoming {
                Incoming::Text(text) => self.wire.serializer.decode_text(text),
                Incoming::Binary(data) => self.wire.serializer.decode_binary(data),
                Incoming::Ping(data) => {
                    // The pong goes through the outbox, in order with other frames.
                    self.wire.outbox.push(Frame::Pong(data));
                    return;
                }
                Incoming::Pong => return,
                Incoming::Close(code) => {
                    end = Some(End::ClientClosed(code));
                    return;
                }
            };
            match decoded {
                Ok(msg) => self.on_message(msg),
                Err(e) => {
                    tracing::warn!(error = %e, "closing connection: undecodable frame");
                    self.registered.hub().count_protocol_error();
                    end = Some(End::Invalid(1007, e.to_string()));
                }
            }
        });
        if let Err(e) = fed {
            let (code, reason) = e.close();
            tracing::debug!(code, reason, "closing connection: invalid WebSocket frames");
            return Some(End::Invalid(code, reason.to_owned()));
        }
        end
    }

    /// Writes everything queued, handling connection events on the way. Returns how the
    /// connection ends, if it does.
    ///
    /// A close requested while a write is blocked (a client that stops reading) waits for
    /// that write, within the write timeout, so that its close frame follows whole frames.
    async fn flush<T: AsyncWrite + Unpin>(&mut self, io: &mut T) -> Option<End> {
        let outbox = self.wire.outbox.clone();
        let write_timeout = self.shared.config.write_timeout;
        // The close requested during a blocked write, once seen.
        let mut closing = None;
        loop {
            let batch = outbox.take();
            for event in batch.events {
                self.on_event(event);
            }
            if batch.frames.is_empty() {
                let close = batch.close?;
                if closing.is_none() {
                    self.closing(&close);
                }
                return Some(End::Close(close));
            }
            let mut out = scratch::lend();
            out.reserve(batch.frames.iter().map(|f| f.len() + 10).sum());
            let compress = outbox.compresses();
            let mut compressed = 0;
            for frame in &batch.frames {
                compressed += u64::from(crate::transport::ws::encode_queued(
                    frame,
                    &mut out,
                    compress,
                    self.kept.as_mut(),
                ));
            }
            let hub = self.registered.hub();
            hub.count_written(batch.frames.len(), out.len());
            if compressed > 0 {
                hub.count_compressed(compressed);
            }
            drop(batch.frames);
            let written: Result<(), End> = {
                let write = io.write_all(&out);
                tokio::pin!(write);
                // Most writes complete at once: try without arming a timer or a close waiter.
                match futures_util::FutureExt::now_or_never(write.as_mut()) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(_)) => Err(End::Gone),
                    None => {
                        // A client that stops reading blocks the write. A close requested
                        // meanwhile (its queue overflowing, a disconnect, a drain) is noted at
                        // once, but its close frame waits for the frames being written: the
                        // loop sends it once they are.
                        let deadline = Instant::now() + write_timeout;
                        let timed = timeout_at(deadline, write.as_mut());
                        tokio::pin!(timed);
                        let written = std::future::poll_fn(|cx| {
                            if closing.is_none()
                                && let Poll::Ready(close) = outbox.poll_close(cx)
                            {
                                self.closing(&close);
                                closing = Some(close);
                            }
                            timed.as_mut().poll(cx)
                        })
                        .await;
                        match written {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(_)) => Err(End::Gone),
                            // The write takes longer than the write timeout: the client is
                            // dropped, with no close frame in the middle of a frame.
                            Err(_) => {
                                let close = closing.clone().unwrap_or_else(|| {
                                    self.closing(&Close::SLOW_CONSUMER);
                                    Close::SLOW_CONSUMER
                                });
                                Err(End::Dropped(close))
                            }
                        }
                    }
                }
            };
            scratch::give_back(out);
            if let Err(end) = written {
                return Some(end);
            }
        }
    }

    /// Notes that the server closes the connection with `close`, as soon as it is known: a
    /// slow consumer is counted and logged.
    pub(crate) fn closing(&self, close: &Close) {
        if *close == Close::SLOW_CONSUMER {
            self.registered.hub().count_slow_consumer();
            tracing::warn!("closing connection: slow consumer");
        }
    }

    pub(crate) fn on_event(&mut self, event: ConnEvent) {
        match event {
            ConnEvent::ChannelExited { id } => self.channels.exited(id),
        }
    }

    fn reply(&self, join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, reply: &Reply) {
        self.wire.reply(join_ref, r#ref, topic, reply);
    }

    fn error_reply(&self, join_ref: Option<&str>, msg: &Message, reason: &str) {
        let reply = Reply::error(serde_json::json!({ "reason": reason }));
        self.reply(join_ref, msg.r#ref.as_deref(), &msg.topic, &reply);
    }

    /// `ok {}` echoing the message's refs: heartbeats, and the leave of a topic not joined.
    fn ok_echo(&self, msg: &Message) {
        let ok = Reply::ok(Payload::empty());
        self.reply(
            msg.join_ref.as_deref(),
            msg.r#ref.as_deref(),
            &msg.topic,
            &ok,
        );
    }

    /// `[null, ref, topic, "phx_reply", {"status":"error","response":{"reason":"unmatched topic"}}]`
    fn unmatched(&self, msg: &Message) {
        self.error_reply(None, msg, "unmatched topic");
    }

    /// Handles one decoded client message.
    pub(crate) fn on_message(&mut self, msg: Message) {
        self.registered.hub().count_message_in();
        if let Some(limit) = self.check_limits(&msg) {
            self.registered.hub().count_limit(limit);
            tracing::debug!(topic = %msg.topic, event = %msg.event, reason = limit.reason(), "message refused");
            return self.error_reply(msg.join_ref.as_deref(), &msg, limit.reason());
        }
        if msg.event == "phx_join" {
            return self.join(msg);
        }
        if msg.topic == "phoenix" && msg.event == "heartbeat" {
            return self.ok_echo(&msg);
        }
        let Some(ch) = self.channels.get(&msg.topic) else {
            if msg.event == "phx_leave" {
                return self.ok_echo(&msg);
            }
            return self.unmatched(&msg);
        };
        // A message for an earlier incarnation of this topic's channel is dropped silently.
        if msg
            .join_ref
            .as_deref()
            .is_some_and(|jr| jr != &*ch.join_ref)
        {
            return;
        }
        if msg.event == "phx_leave" {
            ch.inbox.leave(msg.r#ref);
            self.channels.end(&msg.topic);
            return;
        }
        let Message {
            topic,
            event,
            payload,
            r#ref,
            ..
        } = msg;
        match ch.inbox.handle_in(event, payload, r#ref.clone()) {
            Ok(()) => {}
            Err(rejected) => {
                let reason = match rejected {
                    InRejected::Closed => {
                        self.channels.end(&topic);
                        "unmatched topic"
                    }
                    InRejected::Full => "channel overloaded",
                };
                let reply = Reply::error(serde_json::json!({ "reason": reason }));
                let join_ref = match rejected {
                    InRejected::Closed => None,
                    InRejected::Full => self.channels.get(&topic).map(|c| c.join_ref.clone()),
                };
                self.reply(join_ref.as_deref(), r#ref.as_deref(), &topic, &reply);
            }
        }
    }

    /// The limit `msg` hits, if any (see the `limits` module).
    fn check_limits(&mut self, msg: &Message) -> Option<Limit> {
        let config = &self.shared.config;
        let now = self.registered.now_ms() as u32;
        if self.messages.as_mut().is_some_and(|b| !b.take(now)) {
            return Some(Limit::Rate);
        }
        if msg.event == "phx_join" && self.joins.as_mut().is_some_and(|b| !b.take(now)) {
            return Some(Limit::Rate);
        }
        if msg.topic.len() > config.max_topic_len {
            return Some(Limit::Topic);
        }
        if msg.payload.len() > config.max_payload {
            return Some(Limit::Payload);
        }
        None
    }

    fn join(&mut self, msg: Message) {
        let Some(factory) = self.shared.routes.find(&msg.topic).cloned() else {
            return self.unmatched(&msg);
        };
        // Every channel task alive counts against the limit, a leaving one until its
        // `terminate` has returned; only the channel this join replaces does not (it is
        // aborted, and ends at once).
        let replacing = self.channels.get(&msg.topic).is_some();
        if self.channels.len() - usize::from(replacing) >= self.shared.config.max_channels {
            return self.error_reply(msg.join_ref.as_deref(), &msg, "too many channels joined");
        }
        // A second join of a topic replaces its channel (killed without `terminate`); the old
        // channel's phx_close follows the new join's reply.
        let replaces = self.channels.end(&msg.topic).map(|old| {
            old.task.abort();
            old.join_ref
        });
        self.next_channel_id += 1;
        let join_ref: Arc<str> = msg
            .join_ref
            .as_deref()
            .or(msg.r#ref.as_deref())
            .unwrap_or("")
            .into();
        let topic: Arc<str> = msg.topic.into();
        // It starts once every earlier task of its topic has ended and unsubscribed.
        let after = self.channels.follow(&topic, self.next_channel_id);
        let handle = factory.spawn(SpawnArgs {
            id: self.next_channel_id,
            after,
            topic: topic.clone(),
            join_ref,
            msg_join_ref: msg.join_ref,
            msg_ref: msg.r#ref,
            params: msg.payload,
            assigns: self.assigns.clone(),
            socket_id: self.socket_id.clone(),
            wire: self.wire.clone(),
            endpoint: self.shared.endpoint.clone(),
            replaces,
            mailbox_limit: self.shared.config.mailbox_limit,
        });
        self.channels.push(topic, handle);
    }
}

/// The worker thread's write buffer, lent to one connection's batch at a time: batches are
/// encoded into one reused buffer rather than an allocation each (a burst to 10,000
/// connections is 10,000 batches), and an idle connection keeps none. A buffer whose write had
/// to wait is given back to whichever thread finishes it.
mod scratch {
    use std::cell::Cell;

    /// Larger buffers (a batch of big frames) are freed rather than kept.
    const KEEP: usize = 256 << 10;

    thread_local! {
        static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    }

    /// The thread's buffer (empty), or a new one if it is lent.
    pub(super) fn lend() -> Vec<u8> {
        SCRATCH.with(Cell::take)
    }

    /// Keeps `buf` for the thread's next batch.
    pub(super) fn give_back(mut buf: Vec<u8>) {
        if buf.capacity() <= KEEP {
            buf.clear();
            SCRATCH.with(|s| s.set(buf));
        }
    }
}
