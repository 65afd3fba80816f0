//! One connection: the task that reads client frames, routes them to channels, and writes
//! everything queued in the connection's [`Outbox`] in batches.
//!
//! The task never waits for a channel: a join spawns the channel's task and returns at once,
//! and client pushes are queued to the channel's mailbox. So a slow `join` or `handle_in`
//! delays only its own channel.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use firebrand_protocol::{Message, Payload, Serializer};
use futures_util::SinkExt;
use tokio::time::{Instant, sleep, timeout};

use crate::channel::{Reply, StopReason};
use crate::context::Wire;
use crate::endpoint::Registered;
use crate::limits::{Bucket, Limit};
use crate::pubsub::{SubId, Target};
use crate::queue::{Close, ConnEvent, Outbox};
use crate::runner::{ChannelHandle, InRejected, SpawnArgs};
use crate::socket::{Shared, Socket};

pub(crate) struct ConnArgs<S: Socket> {
    pub(crate) shared: Arc<Shared<S>>,
    pub(crate) assigns: Arc<S::Assigns>,
    pub(crate) socket_id: Option<Arc<str>>,
    pub(crate) serializer: Serializer,
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
    channels: HashMap<String, ChannelHandle>,
    next_channel_id: u64,
    id_sub: Option<SubId>,
    /// Rate limits on inbound messages and joins.
    messages: Option<Bucket>,
    joins: Option<Bucket>,
    _registered: Registered,
}

/// How the read loop ended.
enum End {
    /// The client closed, or the transport failed: nothing more to send.
    Gone,
    /// The server closes with this code.
    Close(Close),
    /// A protocol error with a message for the close frame.
    Invalid(u16, String),
}

impl<S: Socket> Conn<S> {
    /// Opens a connection: registers it with the endpoint and subscribes its socket id.
    pub(crate) fn open(args: ConnArgs<S>) -> Self {
        let endpoint = &args.shared.endpoint;
        let outbox = Arc::new(Outbox::new(args.shared.config.outbound_limit));
        let registered = endpoint.register(outbox.clone());
        let id_sub = args.socket_id.as_ref().map(|id| {
            endpoint
                .pubsub()
                .subscribe(id, Target::Socket(outbox.clone()))
        });
        Conn {
            assigns: args.assigns,
            socket_id: args.socket_id,
            wire: Wire {
                outbox,
                serializer: args.serializer,
                pending: Arc::default(),
                max_pending: args.shared.config.max_pending_replies,
            },
            messages: args.shared.config.message_rate.map(Bucket::new),
            joins: args.shared.config.join_rate.map(Bucket::new),
            channels: HashMap::new(),
            next_channel_id: 0,
            id_sub,
            _registered: registered,
            shared: args.shared,
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
        for (_, ch) in self.channels.drain() {
            ch.inbox.socket_closed(reason.clone());
        }
        if let (Some(id), Some(sub)) = (&self.socket_id, self.id_sub.take()) {
            self.shared.endpoint.pubsub().unsubscribe(id, sub);
        }
    }
}

impl<S: Socket> Drop for Conn<S> {
    fn drop(&mut self) {
        self.end(StopReason::Closed);
    }
}

/// Serves one WebSocket connection until it ends.
pub(crate) async fn run<S: Socket>(mut ws: WebSocket, args: ConnArgs<S>) {
    let endpoint = args.shared.endpoint.clone();
    let config = args.shared.config.clone();
    let mut conn = Conn::open(args);
    let outbox = conn.outbox().clone();

    let idle = sleep(config.idle_timeout);
    tokio::pin!(idle);
    let end = loop {
        tokio::select! {
            () = outbox.ready() => {
                if let Some(end) = conn.flush(&mut ws).await {
                    break end;
                }
            }
            msg = ws.recv() => {
                idle.as_mut().reset(Instant::now() + config.idle_timeout);
                let decoded = match msg {
                    Some(Ok(WsMessage::Text(text))) => conn.wire.serializer.decode_text(text.into()),
                    Some(Ok(WsMessage::Binary(data))) => conn.wire.serializer.decode_binary(data),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    Some(Ok(WsMessage::Close(_))) | None => break End::Gone,
                    Some(Err(e)) => break read_error(e),
                };
                match decoded {
                    Ok(msg) => conn.on_message(msg),
                    Err(e) => {
                        tracing::warn!(error = %e, "closing connection: undecodable frame");
                        endpoint.count_protocol_error();
                        break End::Invalid(1007, e.to_string());
                    }
                }
            }
            () = &mut idle => break End::Close(Close::IDLE),
        }
    };
    conn.end(match &end {
        End::Close(c) => c.stop_reason(),
        _ => StopReason::Closed,
    });

    let frame = match end {
        End::Gone => None,
        End::Close(c) => {
            if c == Close::SLOW_CONSUMER {
                endpoint.count_slow_consumer();
                tracing::warn!("closing connection: slow consumer (outbound queue full)");
            }
            Some(CloseFrame {
                code: c.code,
                reason: c.reason.into(),
            })
        }
        End::Invalid(code, reason) => Some(CloseFrame {
            code,
            // A close reason is at most 123 bytes.
            reason: truncate(&reason, 123).into(),
        }),
    };
    if let Some(frame) = frame {
        let _ = timeout(CLOSE_WAIT, async {
            ws.send(WsMessage::Close(Some(frame))).await?;
            // Wait for the client's close frame, so that neither side sees a reset.
            while let Some(msg) = ws.recv().await {
                if matches!(msg?, WsMessage::Close(_)) {
                    break;
                }
            }
            Ok::<_, axum::Error>(())
        })
        .await;
    } else {
        let _ = timeout(CLOSE_WAIT, ws.close()).await;
    }
    // Unregistered only now, so that a shutdown waits for the close handshakes.
    drop(conn);
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Maps a transport read error to the close code the client should see.
fn read_error(e: axum::Error) -> End {
    use tungstenite::error::{CapacityError, Error, ProtocolError};
    let inner = e.into_inner();
    match inner.downcast_ref::<Error>() {
        Some(Error::Capacity(CapacityError::MessageTooLong { .. })) => End::Close(Close::TOO_BIG),
        Some(Error::Capacity(e)) => End::Invalid(1009, e.to_string()),
        Some(Error::Utf8(_)) => End::Invalid(1007, "invalid UTF-8 in text frame".into()),
        Some(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) | None => End::Gone,
        Some(Error::Protocol(p)) => End::Invalid(1002, p.to_string()),
        Some(_) => End::Gone,
    }
}

impl<S: Socket> Conn<S> {
    /// Writes everything queued, handling connection events on the way. Returns how the
    /// connection ends, if it does.
    async fn flush(&mut self, ws: &mut WebSocket) -> Option<End> {
        let outbox = self.wire.outbox.clone();
        let write_timeout = self.shared.config.write_timeout;
        loop {
            let batch = outbox.take();
            for event in batch.events {
                self.on_event(event);
            }
            if batch.frames.is_empty() {
                return batch.close.map(End::Close);
            }
            let write = async {
                for frame in batch.frames {
                    ws.feed(frame).await?;
                }
                ws.flush().await
            };
            // A client that stops reading blocks the write: give up when its queue overflows
            // meanwhile, or when the write takes longer than the write timeout.
            tokio::select! {
                result = timeout(write_timeout, write) => match result {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Some(End::Gone),
                    Err(_) => return Some(End::Close(Close::SLOW_CONSUMER)),
                },
                close = outbox.closing() => return Some(End::Close(close)),
            }
        }
    }

    pub(crate) fn on_event(&mut self, event: ConnEvent) {
        match event {
            ConnEvent::ChannelExited { topic, id } => {
                if self.channels.get(&topic).is_some_and(|c| c.id == id) {
                    self.channels.remove(&topic);
                }
            }
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
        if let Some(limit) = self.check_limits(&msg) {
            self.shared.endpoint.count_limit(limit);
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
            self.channels.remove(&msg.topic);
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
                        self.channels.remove(&topic);
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
        if self.messages.as_mut().is_some_and(|b| !b.take()) {
            return Some(Limit::Rate);
        }
        if msg.event == "phx_join" && self.joins.as_mut().is_some_and(|b| !b.take()) {
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
        // A second join of a topic replaces its channel (killed without `terminate`); the old
        // channel's phx_close follows the new join's reply.
        let replaces = self.channels.remove(&msg.topic).map(|old| {
            old.task.abort();
            old.join_ref
        });
        if self.channels.len() >= self.shared.config.max_channels {
            return self.error_reply(msg.join_ref.as_deref(), &msg, "too many channels joined");
        }
        self.next_channel_id += 1;
        let join_ref: Arc<str> = msg
            .join_ref
            .as_deref()
            .or(msg.r#ref.as_deref())
            .unwrap_or("")
            .into();
        let topic = msg.topic;
        let handle = factory.spawn(SpawnArgs {
            id: self.next_channel_id,
            topic: topic.as_str().into(),
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
        self.channels.insert(topic, handle);
    }
}
