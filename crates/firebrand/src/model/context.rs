//! What a channel's callbacks can do: [`JoinContext`] while joining, [`ChannelContext`] after.

use std::fmt;
use std::sync::Arc;

use firebrand_protocol::{Outbound, Payload, Serializer};

use crate::endpoint::Endpoint;
use crate::limits::{Pending, PendingSlot};
use crate::model::channel::{Channel, Info, Reply, StopReason};
use crate::node::presence::PresenceError;
use crate::node::presence::crdt::Owner;
use crate::node::pubsub::{Broadcast, Inbox, SubId, Target};
use crate::node::queue::Frame;
use crate::node::queue::{Delivered, Mailbox, Outbox};

/// What [`Channel::join`] knows about the joining client: its assigns `A` and the channel's
/// part `S` of the app state.
pub struct JoinContext<'a, A, S = ()> {
    pub(crate) topic: &'a str,
    pub(crate) join_ref: &'a str,
    pub(crate) assigns: &'a A,
    pub(crate) state: &'a S,
    pub(crate) socket_id: Option<&'a str>,
    pub(crate) endpoint: &'a Endpoint,
}

impl<A, S> JoinContext<'_, A, S> {
    /// The topic being joined.
    pub fn topic(&self) -> &str {
        self.topic
    }

    /// The join ref of the channel being created.
    pub fn join_ref(&self) -> &str {
        self.join_ref
    }

    /// The socket's assigns.
    pub fn assigns(&self) -> &A {
        self.assigns
    }

    /// The channel's part of the app state (see [`Channel::State`]).
    pub fn state(&self) -> &S {
        self.state
    }

    /// The socket's id, if [`Socket::id`](crate::Socket::id) gave one.
    pub fn socket_id(&self) -> Option<&str> {
        self.socket_id
    }

    /// The endpoint, to broadcast or inspect.
    pub fn endpoint(&self) -> &Endpoint {
        self.endpoint
    }
}

/// A message for a channel task.
pub(crate) enum ChannelMsg<M> {
    In {
        event: String,
        payload: Payload,
        r#ref: Option<String>,
    },
    Leave {
        r#ref: Option<String>,
    },
    Out(Broadcast),
    Info(Info<M>),
    /// The connection has closed: `Closed`, or `Shutdown` when the server is draining.
    Closed(StopReason),
}

impl<M: Send + 'static> Inbox for Mailbox<ChannelMsg<M>> {
    fn cursor(&self) -> &std::sync::atomic::AtomicU64 {
        &self.cursor
    }

    fn intercepted(&self, broadcast: Broadcast) {
        if let Delivered::Full(_) = self.push(ChannelMsg::Out(broadcast)) {
            tracing::warn!("channel mailbox full: intercepted broadcast dropped");
        }
    }

    fn info(&self, broadcast: Broadcast) {
        if let Delivered::Full(_) = self.push(ChannelMsg::Info(Info::Broadcast(broadcast))) {
            tracing::warn!("channel mailbox full: broadcast for handle_info dropped");
        }
    }
}

/// Where a channel's frames go: its connection's outbox, encoded with its serializer.
#[derive(Clone)]
pub(crate) struct Wire {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) serializer: Serializer,
    /// The connection's outstanding async replies, and their limit.
    pub(crate) pending: Arc<Pending>,
    pub(crate) max_pending: u32,
}

impl Wire {
    /// Encodes and queues one frame; a frame this serializer cannot carry is logged and dropped.
    pub(crate) fn send(&self, out: &Outbound<'_>) {
        match self.serializer.encode(out) {
            Ok(frame) => {
                self.outbox.push(Frame::from_encoded(frame));
            }
            Err(e) => tracing::warn!(topic = out.topic(), event = out.event(), error = %e,
                "frame not sent"),
        }
    }

    pub(crate) fn reply(
        &self,
        join_ref: Option<&str>,
        r#ref: Option<&str>,
        topic: &str,
        reply: &Reply,
    ) {
        self.send(&Outbound::Reply {
            join_ref,
            r#ref,
            topic,
            status: reply.status(),
            payload: reply.payload(),
        });
    }
}

/// What a joined channel's callbacks can do: push, reply, broadcast, subscribe, stop.
pub struct ChannelContext<C: Channel> {
    pub(crate) topic: Arc<str>,
    pub(crate) join_ref: Arc<str>,
    pub(crate) assigns: Arc<C::Assigns>,
    pub(crate) state: C::State,
    pub(crate) wire: Wire,
    pub(crate) endpoint: Endpoint,
    pub(crate) mailbox: Arc<Mailbox<ChannelMsg<C::Info>>>,
    pub(crate) sub_id: Option<SubId>,
    /// Subscriptions made with [`ChannelContext::subscribe`] (boxed: most channels have none).
    #[expect(
        clippy::box_collection,
        reason = "8 bytes in every channel instead of 24"
    )]
    pub(crate) extra: Option<Box<Vec<(String, SubId)>>>,
    pub(crate) current_ref: Option<Box<str>>,
    pub(crate) stop: Option<StopReason>,
    /// This channel as a presence owner, once it tracks something.
    pub(crate) owner: Option<Owner>,
    /// `reply_later` was refused during the current `handle_in`.
    pub(crate) reply_refused: bool,
    /// On a recoverable topic joined with `since`: whether it was recovered.
    pub(crate) recovered: Option<bool>,
}

impl<C: Channel> ChannelContext<C> {
    /// The channel's topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The channel's join ref.
    pub fn join_ref(&self) -> &str {
        &self.join_ref
    }

    /// The socket's assigns.
    pub fn assigns(&self) -> &C::Assigns {
        &self.assigns
    }

    /// The channel's part of the app state (see [`Channel::State`]).
    pub fn state(&self) -> &C::State {
        &self.state
    }

    /// The endpoint, to broadcast on other topics.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// On a [recoverable](crate::EndpointBuilder::history) topic joined with `{"since": P}`:
    /// `Some(true)` when everything after `P` was replayed to the client, `Some(false)` when the
    /// history no longer reached back (then nothing was replayed, and the client was told
    /// `recovered: false`). `None` on other joins. Set before
    /// [`after_join`](crate::Channel::after_join), where a channel can push a fresh snapshot to
    /// a client that could not be recovered.
    ///
    /// ```
    /// # use firebrand::{Channel, ChannelContext, JoinContext, JoinError, Joined, Payload};
    /// # struct Feed;
    /// # impl Channel for Feed {
    /// #   type Assigns = (); type State = (); type Info = ();
    /// #   async fn join(_: &str, _: Payload, _: &JoinContext<'_, ()>) -> Result<Joined<Self>, JoinError> { Ok(Joined::new(Feed)) }
    /// async fn after_join(&mut self, ctx: &mut ChannelContext<Self>) {
    ///     if ctx.recovered() == Some(false) {
    ///         ctx.push("snapshot", serde_json::json!({"items": []}));
    ///     }
    /// }
    /// # }
    /// ```
    pub fn recovered(&self) -> Option<bool> {
        self.recovered
    }

    /// Pushes `event` to this client only: `[join_ref, null, topic, event, payload]`. The
    /// protocol's own events are refused, as for a broadcast
    /// ([`Endpoint::broadcast`](crate::Endpoint::broadcast)).
    pub fn push(&self, event: &str, payload: impl Into<Payload>) {
        if crate::endpoint::refused_event(&self.topic, event) {
            return;
        }
        let payload = payload.into();
        self.wire.send(&Outbound::push(
            &self.join_ref,
            &self.topic,
            event,
            &payload,
        ));
    }

    /// Broadcasts `event` to every subscriber of this channel's topic, this client included.
    pub fn broadcast(&self, event: &str, payload: impl Into<Payload>) {
        self.endpoint
            .publish(Broadcast::new(&*self.topic, event, payload.into()), None);
    }

    /// Broadcasts `event` to every subscriber of this channel's topic except this one.
    pub fn broadcast_from(&self, event: &str, payload: impl Into<Payload>) {
        self.endpoint.publish(
            Broadcast::new(&*self.topic, event, payload.into()),
            self.sub_id,
        );
    }

    /// [`broadcast`](Self::broadcast), but on a [recoverable](crate::EndpointBuilder::history)
    /// topic not recorded in its history: it goes out without a position and is never replayed
    /// to a client that missed it. For what a rejoining client does not need: a typing
    /// indicator, a cursor, a presence-like signal. (On other topics, the same as
    /// `broadcast`.)
    ///
    /// ```
    /// # fn f<C: firebrand::Channel>(ctx: &mut firebrand::ChannelContext<C>) {
    /// ctx.broadcast_unrecorded("typing", serde_json::json!({"user": "ada"}));
    /// # }
    /// ```
    pub fn broadcast_unrecorded(&self, event: &str, payload: impl Into<Payload>) {
        let b = Broadcast::new(&*self.topic, event, payload.into());
        self.endpoint.publish_unrecorded(b, None);
    }

    /// [`broadcast_from`](Self::broadcast_from), not recorded (see
    /// [`broadcast_unrecorded`](Self::broadcast_unrecorded)).
    pub fn broadcast_from_unrecorded(&self, event: &str, payload: impl Into<Payload>) {
        let b = Broadcast::new(&*self.topic, event, payload.into());
        self.endpoint.publish_unrecorded(b, self.sub_id);
    }

    /// A handle to reply later to the push being handled (Phoenix's `socket_ref`).
    ///
    /// Returns `None` outside [`Channel::handle_in`] or when the push carried no ref.
    ///
    /// A connection holds at most [`max_pending_replies`](crate::SocketBuilder::max_pending_replies)
    /// of these at once; past that this returns `None` and the client's push is answered
    /// `{"reason":"too many pending replies"}` (unless the handler replies itself).
    pub fn reply_later(&mut self) -> Option<ReplyRef> {
        let r#ref = self.current_ref.as_deref()?.to_owned();
        let Some(slot) = self.wire.pending.reserve(self.wire.max_pending as usize) else {
            self.reply_refused = true;
            return None;
        };
        Some(ReplyRef {
            wire: self.wire.clone(),
            topic: self.topic.clone(),
            join_ref: self.join_ref.clone(),
            r#ref,
            _slot: Arc::new(slot),
        })
    }

    /// Subscribes this channel to another topic: its broadcasts arrive in
    /// [`Channel::handle_info`] as [`Info::Broadcast`]. Subscribing twice to one topic does
    /// nothing. Subscriptions end with the channel.
    pub fn subscribe(&mut self, topic: &str) {
        if self
            .extra
            .iter()
            .flat_map(|e| e.iter())
            .any(|(t, _)| t == topic)
        {
            return;
        }
        let inbox: Arc<dyn Inbox> = self.mailbox.clone();
        let id = self
            .endpoint
            .hub()
            .pubsub()
            .subscribe(topic, Target::Info(inbox));
        self.extra
            .get_or_insert_default()
            .push((topic.to_owned(), id));
    }

    /// Ends a subscription made with [`ChannelContext::subscribe`].
    pub fn unsubscribe(&mut self, topic: &str) {
        let Some(extra) = self.extra.as_mut() else {
            return;
        };
        if let Some(i) = extra.iter().position(|(t, _)| t == topic) {
            let (t, id) = extra.swap_remove(i);
            self.endpoint.hub().pubsub().unsubscribe(&t, id);
        }
    }

    /// A cloneable handle that sends [`Info::Message`]s to this channel from anywhere.
    pub fn sender(&self) -> ChannelSender<C::Info> {
        ChannelSender {
            mailbox: self.mailbox.clone(),
        }
    }

    /// Tracks `key` (a user id, say) with `meta` (a JSON object) on this channel's topic, for
    /// as long as the channel lives. Returns the meta's `phx_ref`. Subscribers get a
    /// `presence_diff`. See [the presence docs](crate::node::presence).
    pub fn track(&mut self, key: &str, meta: serde_json::Value) -> Result<String, PresenceError> {
        let tracker = self.endpoint.hub().tracker();
        let owner = *self.owner.get_or_insert_with(|| tracker.new_owner());
        tracker.track(owner, &self.topic, key, meta)
    }

    /// Replaces the meta this channel tracks for `key`; returns the new `phx_ref` (the new meta
    /// carries `phx_ref_prev`). One diff carries the new meta as a join and the old as a leave.
    pub fn update_presence(
        &mut self,
        key: &str,
        meta: serde_json::Value,
    ) -> Result<String, PresenceError> {
        let owner = self.owner.ok_or(PresenceError::NoPresence)?;
        self.endpoint
            .hub()
            .tracker()
            .update(owner, &self.topic, key, meta)
    }

    /// Stops tracking `key` (nothing happens when it is not tracked).
    pub fn untrack(&mut self, key: &str) {
        if let Some(owner) = self.owner {
            self.endpoint
                .hub()
                .tracker()
                .untrack(owner, &self.topic, key);
        }
    }

    /// The presences on this channel's topic, for `push("presence_state", …)`.
    ///
    /// From then on this channel's client gets the `presence_diff` of later changes only:
    /// never a diff of a change the list already holds. List in `after_join` (a channel's
    /// diffs start at the end of `after_join` if it has not listed by then).
    pub fn presence_list(&self) -> Payload {
        self.endpoint
            .hub()
            .tracker()
            .list_for(&self.topic, &self.mailbox.cursor)
    }

    /// Stops the channel once the current callback returns (after its reply, if any).
    /// [`StopReason::Normal`] and [`StopReason::Shutdown`] send `phx_close`;
    /// [`StopReason::Error`] sends `phx_error`.
    pub fn stop(&mut self, reason: StopReason) {
        self.stop = Some(reason);
    }
}

/// Replies to a client push after its `handle_in` has returned (Phoenix's `reply/2` with a
/// `socket_ref`). Cloneable and `Send`: hand it to a task. Replying more than once is allowed.
#[derive(Clone)]
pub struct ReplyRef {
    wire: Wire,
    topic: Arc<str>,
    join_ref: Arc<str>,
    r#ref: String,
    /// Counts against the connection's pending replies until the last clone is dropped.
    _slot: Arc<PendingSlot>,
}

impl ReplyRef {
    /// Sends the reply. Does nothing once the connection is gone.
    pub fn send(&self, reply: Reply) {
        self.wire
            .reply(Some(&self.join_ref), Some(&self.r#ref), &self.topic, &reply);
    }
}

impl fmt::Debug for ReplyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyRef")
            .field("topic", &self.topic)
            .field("ref", &self.r#ref)
            .finish()
    }
}

/// Sends messages to one channel's [`Channel::handle_info`]. Cloneable.
pub struct ChannelSender<M> {
    mailbox: Arc<Mailbox<ChannelMsg<M>>>,
}

impl<M> Clone for ChannelSender<M> {
    fn clone(&self) -> Self {
        ChannelSender {
            mailbox: self.mailbox.clone(),
        }
    }
}

/// Why [`ChannelSender::send`] handed a message back.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError<M> {
    /// The channel has stopped.
    Closed(M),
    /// The channel's mailbox is full (it is not keeping up).
    Full(M),
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Closed(_) => f.write_str("channel has stopped"),
            SendError::Full(_) => f.write_str("channel mailbox is full"),
        }
    }
}

impl<M: fmt::Debug> std::error::Error for SendError<M> {}

impl<M> ChannelSender<M> {
    /// Queues `msg` for the channel. Never blocks.
    pub fn send(&self, msg: M) -> Result<(), SendError<M>> {
        let unwrap = |m: ChannelMsg<M>| match m {
            ChannelMsg::Info(Info::Message(m)) => m,
            _ => unreachable!("only Info::Message is sent here"),
        };
        match self.mailbox.push(ChannelMsg::Info(Info::Message(msg))) {
            Delivered::Queued => Ok(()),
            Delivered::Closed(m) => Err(SendError::Closed(unwrap(m))),
            Delivered::Full(m) => Err(SendError::Full(unwrap(m))),
        }
    }
}
