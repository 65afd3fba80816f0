//! The baseline: the least a broadcaster can do while serving the same frames. Raw WebSocket over
//! tokio, no channels: a `phx_join` adds the connection's queue to the topic's list, a broadcast
//! (`POST /api/broadcast` or a client `new_msg`) encodes the `[null,null,topic,event,payload]`
//! frame once and queues the same bytes to every subscriber; each connection's task writes
//! everything queued with one vectored write (the shared frames, never copied). It answers
//! `heartbeat` and `ping` (echo) like the conformance app.
//!
//! What makes it the limit for bursts (RESULTS.md, "Session 10"): a connection writes only
//! once its queue has filled. The HTTP side handles every request it has read (pipelined
//! broadcasts arrive together) before it wakes any subscriber, so a burst costs each connection
//! one wake-up and one `writev`, not one per few frames. `GET /stats` answers its counters
//! (`{"writes":…,"frames":…,"wakeups":…}`: write syscalls, frames written, writer wake-ups
//! that found frames) for the bench's frames-per-write row.
//!
//! With `channel_tasks` (`serve-baseline --channel-tasks`, the bench's `--against
//! baseline-tasks`) each joined topic gets a task of its own that answers the connection's
//! pushes, as a channel does (Phoenix's process per channel): a push goes to that task through
//! a queue and its reply comes back through the connection's, two task wake-ups. Against the
//! plain baseline it shows what that isolation costs by itself, with nothing else of firebrand.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;
use bytes::Bytes;
use memchr::memmem;
use serde::Deserialize;
use serde_json::value::RawValue;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::ws::parse_header;

/// Write syscalls, frames written and writer wake-ups that found frames (`GET /stats`).
static WRITES: AtomicU64 = AtomicU64::new(0);
static FRAMES: AtomicU64 = AtomicU64::new(0);
static WAKEUPS: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Outq {
    q: Mutex<Vec<Bytes>>,
    notify: Notify,
}

impl Outq {
    /// Queues a frame and wakes the writer now (replies).
    fn push(&self, frame: Bytes) {
        if self.queue(frame) {
            self.notify.notify_one();
        }
    }

    /// Queues a frame without waking the writer; true when the queue was empty (the caller
    /// wakes it later, see [`Wake`]).
    fn queue(&self, frame: Bytes) -> bool {
        let mut q = self.q.lock().unwrap();
        let was_empty = q.is_empty();
        q.push(frame);
        was_empty
    }
}

/// The writers to wake once a batch of broadcasts is queued.
#[derive(Default)]
struct Wake(Vec<Arc<Outq>>);

impl Wake {
    fn now(&mut self) {
        for q in self.0.drain(..) {
            q.notify.notify_one();
        }
    }
}

type Subscribers = Vec<(u64, Arc<Outq>)>;

#[derive(Default)]
struct Registry {
    topics: RwLock<HashMap<String, Subscribers>>,
    next_id: AtomicU64,
    channel_tasks: bool,
}

/// A push for a topic's task: join ref, ref, payload.
type Push = (Option<String>, Option<String>, Box<RawValue>);

/// A topic's task (`channel_tasks`): answers each push with its reply, queued to the
/// connection, until the connection drops its sender.
fn channel_task(topic: String, me: Arc<Outq>) -> tokio::sync::mpsc::UnboundedSender<Push> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Push>();
    tokio::spawn(async move {
        while let Some((jr, r, payload)) = rx.recv().await {
            me.push(reply(jr.as_deref(), r.as_deref(), &topic, payload.get()));
        }
    });
    tx
}

impl Registry {
    /// Queues the frame to every subscriber of `topic`; the writers whose queue was empty go
    /// to `wake`.
    fn broadcast(&self, topic: &str, event: &str, payload: &RawValue, wake: &mut Wake) {
        let text = format!(
            "[null,null,{},{},{}]",
            serde_json::to_string(topic).unwrap_or_default(),
            serde_json::to_string(event).unwrap_or_default(),
            payload.get()
        );
        let frame = server_frame(text.as_bytes());
        if let Some(subs) = self.topics.read().unwrap().get(topic) {
            for (_, q) in subs {
                if q.queue(frame.clone()) {
                    wake.0.push(q.clone());
                }
            }
        }
    }
}

/// An unmasked server text frame.
fn server_frame(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 10);
    out.push(0x81);
    let n = data.len();
    if n < 126 {
        out.push(n as u8);
    } else if n < 65536 {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(data);
    out.into()
}

/// Serves the baseline on `listener` forever (with a task per joined topic for pushes when
/// `channel_tasks`: see the module docs).
pub(crate) async fn serve(listener: TcpListener, channel_tasks: bool) -> io::Result<()> {
    let reg = Arc::new(Registry {
        channel_tasks,
        ..Registry::default()
    });
    loop {
        let (s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        let reg = reg.clone();
        tokio::spawn(async move {
            let _ = conn(s, reg).await;
        });
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn conn(mut s: TcpStream, reg: Arc<Registry>) -> io::Result<()> {
    let mut buf = vec![0u8; 2048];
    let mut end = 0;
    let head_end = loop {
        if let Some(p) = memmem::find(&buf[..end], b"\r\n\r\n") {
            break p + 4;
        }
        if end == buf.len() {
            return Ok(());
        }
        let n = s.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    };
    if buf.starts_with(b"POST ") {
        return http(s, buf, end, reg).await;
    }
    if buf.starts_with(b"GET /stats ") {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let body = format!(
            r#"{{"writes":{},"frames":{},"wakeups":{}}}"#,
            l(&WRITES),
            l(&FRAMES),
            l(&WAKEUPS)
        );
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        return s.write_all(resp.as_bytes()).await;
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let Some(key) = header(&head, "sec-websocket-key") else {
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await?;
        return Ok(());
    };
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(h.finalize());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {accept}\r\n\r\n"
    );
    s.write_all(resp.as_bytes()).await?;
    buf.copy_within(head_end..end, 0);
    end -= head_end;
    websocket(s, buf, end, reg).await
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    topic: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// Keep-alive `POST /api/broadcast` requests, pipelined or not: every request read is handled
/// (its frames queued) before any subscriber is woken, and their responses go out in one write.
async fn http(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    mut end: usize,
    reg: Arc<Registry>,
) -> io::Result<()> {
    buf.resize(buf.len().max(64 << 10), 0);
    let mut wake = Wake::default();
    let mut out = Vec::new();
    loop {
        let mut start = 0;
        // Every complete request buffered.
        while let Some(p) = memmem::find(&buf[start..end], b"\r\n\r\n") {
            let head_end = start + p + 4;
            let head = String::from_utf8_lossy(&buf[start..head_end]);
            let len: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if end < head_end + len {
                break;
            }
            let ok = match serde_json::from_slice::<Body>(&buf[head_end..head_end + len]) {
                Ok(b) => {
                    reg.broadcast(&b.topic, &b.event, b.payload, &mut wake);
                    true
                }
                Err(_) => false,
            };
            out.extend_from_slice(if ok {
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"
            } else {
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
            });
            start = head_end + len;
        }
        wake.now();
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        buf.copy_within(start..end, 0);
        end -= start;
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = s.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}

type ClientFrame<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    std::borrow::Cow<'a, str>,
    &'a str,
    &'a RawValue,
);

fn reply(jr: Option<&str>, r: Option<&str>, topic: &str, response: &str) -> Bytes {
    let text = format!(
        r#"[{},{},{},"phx_reply",{{"status":"ok","response":{response}}}]"#,
        serde_json::to_string(&jr).unwrap_or_default(),
        serde_json::to_string(&r).unwrap_or_default(),
        serde_json::to_string(topic).unwrap_or_default(),
    );
    server_frame(text.as_bytes())
}

/// Writes `frames` with as few `writev` calls as the kernel takes (1024 slices at most each).
async fn write_frames(s: &mut TcpStream, frames: &[Bytes]) -> io::Result<()> {
    let (mut i, mut off) = (0, 0);
    while i < frames.len() {
        let mut slices = Vec::with_capacity((frames.len() - i).min(1024));
        slices.push(io::IoSlice::new(&frames[i][off..]));
        for f in frames[i + 1..].iter().take(1023) {
            slices.push(io::IoSlice::new(f));
        }
        let mut n = s.write_vectored(&slices).await?;
        WRITES.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while i < frames.len() && n >= frames[i].len() - off {
            n -= frames[i].len() - off;
            off = 0;
            i += 1;
        }
        off += n;
    }
    FRAMES.fetch_add(frames.len() as u64, Ordering::Relaxed);
    Ok(())
}

async fn websocket(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    mut end: usize,
    reg: Arc<Registry>,
) -> io::Result<()> {
    let me = Arc::new(Outq::default());
    let id = reg.next_id.fetch_add(1, Ordering::Relaxed);
    // The joined topics, each with its task when `channel_tasks`.
    let mut topics: Vec<(String, Option<tokio::sync::mpsc::UnboundedSender<Push>>)> = Vec::new();
    let mut batch: Vec<Bytes> = Vec::new();
    let result: io::Result<()> = async {
        loop {
            // Handle every complete client frame buffered.
            let mut start = 0;
            while let Some((b0, masked, hl, len)) = parse_header(&buf[start..end]) {
                let data = start + hl..start + hl + len;
                if masked {
                    let mut key = [0u8; 4];
                    key.copy_from_slice(&buf[start + hl - 4..start + hl]);
                    for (i, b) in buf[data.clone()].iter_mut().enumerate() {
                        *b ^= key[i % 4];
                    }
                }
                start = data.end;
                match b0 & 0x0f {
                    8 => return Ok(()),
                    1 => {
                        let Ok((jr, r, topic, event, payload)) =
                            serde_json::from_slice::<ClientFrame>(&buf[data])
                        else {
                            return Ok(());
                        };
                        match event {
                            "phx_join" => {
                                reg.topics
                                    .write()
                                    .unwrap()
                                    .entry(topic.to_string())
                                    .or_default()
                                    .push((id, me.clone()));
                                let task = reg
                                    .channel_tasks
                                    .then(|| channel_task(topic.to_string(), me.clone()));
                                topics.push((topic.to_string(), task));
                                me.push(reply(jr, r, &topic, "{}"));
                            }
                            "heartbeat" => me.push(reply(None, r, "phoenix", "{}")),
                            "ping" if reg.channel_tasks => {
                                let push = (
                                    jr.map(str::to_owned),
                                    r.map(str::to_owned),
                                    payload.to_owned(),
                                );
                                if let Some((_, Some(task))) =
                                    topics.iter().find(|(t, _)| *t == topic)
                                {
                                    let _ = task.send(push);
                                }
                            }
                            "ping" => me.push(reply(jr, r, &topic, payload.get())),
                            "new_msg" => {
                                let mut wake = Wake::default();
                                reg.broadcast(&topic, "new_msg", payload, &mut wake);
                                wake.now();
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
            buf.copy_within(start..end, 0);
            end -= start;
            if end == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            tokio::select! {
                n = s.read(&mut buf[end..]) => {
                    let n = n?;
                    if n == 0 {
                        return Ok(());
                    }
                    end += n;
                }
                _ = me.notify.notified() => {
                    // Take the queue, leaving the last batch's (empty) vector in its place.
                    std::mem::swap(&mut *me.q.lock().unwrap(), &mut batch);
                    if !batch.is_empty() {
                        WAKEUPS.fetch_add(1, Ordering::Relaxed);
                        write_frames(&mut s, &batch).await?;
                        batch.clear();
                    }
                }
            }
        }
    }
    .await;
    let mut map = reg.topics.write().unwrap();
    for (t, _) in topics {
        if let Some(subs) = map.get_mut(&t) {
            subs.retain(|(i, _)| *i != id);
            if subs.is_empty() {
                map.remove(&t);
            }
        }
    }
    result
}
