//! The task that runs one channel: join, then one callback at a time from its mailbox.
//!
//! The connection task talks to it through [`ChannelHandle`] (type-erased, so one connection
//! can hold channels of many types). Whatever way the task ends — stop, leave, refused join,
//! panic, or abort on a duplicate join — dropping the [`Runner`] removes its subscriptions,
//! answers pushes still queued with `unmatched topic`, and tells the connection.
//!
//! A channel that follows another of its topic (a rejoin, or a join right after a leave) waits
//! for the connection's go, given once every earlier task of the topic has ended, before its
//! `join`: a broadcast never reaches two subscriptions of one topic on one connection.

use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::extract::FromRef;
use firebrand_protocol::{Outbound, Payload};
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::endpoint::Endpoint;
use crate::limits::Limit;
use crate::model::channel::{Channel, Reply, StopReason};
use crate::model::context::{ChannelContext, ChannelMsg, JoinContext, Wire};
use crate::node::pubsub::{Inbox, Seen, Target};
use crate::node::queue::{ConnEvent, Delivered, Mailbox};

/// Everything a channel task needs to start.
pub(crate) struct SpawnArgs<A> {
    pub(crate) id: u64,
    /// Set when an earlier task of the topic is still ending: the join waits for it.
    pub(crate) after: Option<oneshot::Receiver<()>>,
    pub(crate) topic: Arc<str>,
    /// The channel's join ref (the join's `join_ref`, or its `ref` when that is null).
    pub(crate) join_ref: Arc<str>,
    /// The join message's own refs, echoed in the join reply.
    pub(crate) msg_join_ref: Option<String>,
    pub(crate) msg_ref: Option<String>,
    pub(crate) params: Payload,
    pub(crate) assigns: Arc<A>,
    pub(crate) socket_id: Option<Arc<str>>,
    pub(crate) wire: Wire,
    pub(crate) endpoint: Endpoint,
    /// The join ref of a channel this join replaces: its `phx_close` follows our join reply.
    pub(crate) replaces: Option<Arc<str>>,
    pub(crate) mailbox_limit: usize,
}

/// Why the connection could not hand a client push to a channel.
pub(crate) enum InRejected {
    /// The channel has ended: the push gets `unmatched topic`.
    Closed,
    /// The channel's mailbox is full.
    Full,
}

/// The connection's view of a channel task.
pub(crate) trait ChannelInbox: Send + Sync {
    fn handle_in(
        &self,
        event: String,
        payload: Payload,
        r#ref: Option<String>,
    ) -> Result<(), InRejected>;
    fn leave(&self, r#ref: Option<String>);
    fn socket_closed(&self, reason: StopReason);
}

impl<M: Send + 'static> ChannelInbox for Mailbox<ChannelMsg<M>> {
    fn handle_in(
        &self,
        event: String,
        payload: Payload,
        r#ref: Option<String>,
    ) -> Result<(), InRejected> {
        match self.push(ChannelMsg::In {
            event,
            payload,
            r#ref,
        }) {
            Delivered::Queued => Ok(()),
            Delivered::Closed(_) => Err(InRejected::Closed),
            Delivered::Full(_) => Err(InRejected::Full),
        }
    }

    fn leave(&self, r#ref: Option<String>) {
        self.push_always(ChannelMsg::Leave { r#ref });
    }

    fn socket_closed(&self, reason: StopReason) {
        self.push_always(ChannelMsg::Closed(reason));
    }
}

/// A running channel, as the connection holds it.
pub(crate) struct ChannelHandle {
    pub(crate) id: u64,
    pub(crate) join_ref: Arc<str>,
    pub(crate) inbox: Arc<dyn ChannelInbox>,
    pub(crate) task: tokio::task::AbortHandle,
}

/// Starts channels of one type; the router holds these type-erased.
pub(crate) trait ChannelFactory<A>: Send + Sync {
    fn spawn(&self, args: SpawnArgs<A>) -> ChannelHandle;
}

/// Starts channels of type `C`, each with its part of the socket's app state `St`.
pub(crate) struct Factory<C, St> {
    state: Arc<St>,
    _channel: PhantomData<fn() -> C>,
}

impl<C, St> Factory<C, St> {
    pub(crate) fn new(state: Arc<St>) -> Self {
        Factory {
            state,
            _channel: PhantomData,
        }
    }
}

impl<C, St> ChannelFactory<C::Assigns> for Factory<C, St>
where
    C: Channel<State: FromRef<St>>,
    St: Send + Sync + 'static,
{
    fn spawn(&self, args: SpawnArgs<C::Assigns>) -> ChannelHandle {
        let mailbox = Arc::new(Mailbox::new(args.mailbox_limit));
        let (id, join_ref) = (args.id, args.join_ref.clone());
        let inbox: Arc<dyn ChannelInbox> = mailbox.clone();
        let state = C::State::from_ref(&self.state);
        let (runner, join) = Runner::<C>::new(args, state, mailbox);
        let task = tokio::spawn(run(Box::new(runner), join));
        ChannelHandle {
            id,
            join_ref,
            inbox,
            task: task.abort_handle(),
        }
    }
}

struct Runner<C: Channel> {
    id: u64,
    ctx: ChannelContext<C>,
    channel: Option<C>,
}

struct JoinMsg {
    after: Option<oneshot::Receiver<()>>,
    params: Payload,
    join_ref: Option<String>,
    r#ref: Option<String>,
    replaces: Option<Arc<str>>,
    socket_id: Option<Arc<str>>,
}

/// The channel's task. While it waits for its next message it holds only the [`Runner`] and
/// the wait: the join and each message are handled in a boxed future of their own, so an idle
/// channel does not keep room for its largest callback (about 1 KB less per joined channel).
///
/// Arguments are boxed: an async fn keeps its arguments for its whole life, besides the
/// locals they are moved into.
async fn run<C: Channel>(mut runner: Box<Runner<C>>, mut join: Box<JoinMsg>) {
    // An error: the connection ended before the earlier task did; there is no one to join for.
    if let Some(after) = join.after.take()
        && after.await.is_err()
    {
        return;
    }
    // The join's box goes with it: an argument kept here would hold it for the channel's life.
    if !Box::pin(runner.join_guarded(join)).await {
        return;
    }
    loop {
        let msg = runner.ctx.mailbox.recv().await;
        if !Box::pin(runner.handle_guarded(msg)).await {
            return;
        }
    }
}

fn crash_payload() -> Payload {
    Payload::from(serde_json::json!({"reason": "channel_crash"}))
}

/// `phx_close` / `phx_error`: `[join_ref, join_ref, topic, event, payload]`.
fn control<'a, C: Channel>(
    ctx: &'a ChannelContext<C>,
    event: &'a str,
    payload: &'a Payload,
) -> Outbound<'a> {
    Outbound::Event {
        join_ref: Some(&ctx.join_ref),
        r#ref: Some(&ctx.join_ref),
        topic: &ctx.topic,
        event,
        payload,
    }
}

/// A recoverable topic's join reply: the app's, with the topic's `"position"` and, when the
/// client sent `since`, `"recovered"` (unless the app set them; a reply that is not an object is
/// left as it is).
fn with_position(reply: Payload, position: Option<String>, recovered: Option<bool>) -> Payload {
    let Some(Value::Object(mut fields)) = reply.to_value() else {
        return reply;
    };
    let position = position.map_or(Value::Null, Value::String);
    fields.entry("position").or_insert(position);
    if let Some(recovered) = recovered {
        fields.entry("recovered").or_insert(Value::Bool(recovered));
    }
    Payload::from(Value::Object(fields))
}

fn close_replaced<C: Channel>(ctx: &ChannelContext<C>, replaces: Option<&str>) {
    if let Some(old) = replaces {
        let empty = Payload::empty();
        ctx.wire.send(&Outbound::Event {
            join_ref: Some(old),
            r#ref: Some(old),
            topic: &ctx.topic,
            event: "phx_close",
            payload: &empty,
        });
    }
}

impl<C: Channel> Runner<C> {
    fn new(
        args: SpawnArgs<C::Assigns>,
        state: C::State,
        mailbox: Arc<Mailbox<ChannelMsg<C::Info>>>,
    ) -> (Self, Box<JoinMsg>) {
        let join = Box::new(JoinMsg {
            after: args.after,
            params: args.params,
            join_ref: args.msg_join_ref,
            r#ref: args.msg_ref,
            replaces: args.replaces,
            socket_id: args.socket_id,
        });
        let runner = Runner {
            id: args.id,
            ctx: ChannelContext {
                topic: args.topic,
                join_ref: args.join_ref,
                assigns: args.assigns,
                state,
                wire: args.wire,
                endpoint: args.endpoint,
                mailbox,
                sub_id: None,
                extra: None,
                current_ref: None,
                stop: None,
                owner: None,
                reply_refused: false,
                recovered: None,
            },
            channel: None,
        };
        (runner, join)
    }

    /// Runs the join (and `after_join`); whether the channel runs on. A panic answers the
    /// join with `join crashed` (or, in `after_join`, crashes the channel).
    async fn join_guarded(&mut self, join: Box<JoinMsg>) -> bool {
        let (jr, r) = (join.join_ref.clone(), join.r#ref.clone());
        let replaces = join.replaces.clone();
        match AssertUnwindSafe(self.join(*join)).catch_unwind().await {
            Ok(joined) => joined,
            Err(_) if self.channel.is_some() => {
                self.crashed();
                false
            }
            Err(_) => {
                let ctx = &self.ctx;
                tracing::error!(topic = &*ctx.topic, "join crashed");
                let reply = Reply::error(serde_json::json!({"reason": "join crashed"}));
                ctx.wire
                    .reply(jr.as_deref(), r.as_deref(), &ctx.topic, &reply);
                close_replaced(ctx, replaces.as_deref());
                false
            }
        }
    }

    /// Handles one message (and the channel's end, if it stops); whether the channel runs on.
    /// A panic crashes the channel.
    async fn handle_guarded(&mut self, msg: ChannelMsg<C::Info>) -> bool {
        match AssertUnwindSafe(self.handle(msg)).catch_unwind().await {
            Ok(running) => running,
            Err(_) => {
                self.crashed();
                false
            }
        }
    }

    fn crashed(&self) {
        let ctx = &self.ctx;
        tracing::error!(topic = &*ctx.topic, "channel crashed");
        ctx.wire.send(&control(ctx, "phx_error", &crash_payload()));
    }

    async fn join(&mut self, join: JoinMsg) -> bool {
        let started = crate::node::Started::now();
        let ctx = &mut self.ctx;
        let hub = ctx.endpoint.hub().clone();
        let recoverable = hub
            .history()
            .and_then(|h| Some((h, h.retention(&ctx.topic)?)));
        // On a recoverable topic, the position the client last saw (anything but a string:
        // not a position, so not recovered).
        let since = recoverable.is_some().then(|| match join.params.to_value() {
            Some(Value::Object(params)) => params.get("since").map(|s| match s {
                Value::String(s) => s.clone(),
                _ => String::new(),
            }),
            _ => None,
        });
        let joined = {
            let jc = JoinContext {
                topic: &ctx.topic,
                join_ref: &ctx.join_ref,
                assigns: &*ctx.assigns,
                state: &ctx.state,
                socket_id: join.socket_id.as_deref(),
                endpoint: &ctx.endpoint,
            };
            C::join(&ctx.topic, join.params, &jc).await
        };
        let (jr, r) = (join.join_ref.as_deref(), join.r#ref.as_deref());
        let joined = match joined {
            Ok(joined) => joined,
            Err(refused) => {
                ctx.wire
                    .reply(jr, r, &ctx.topic, &Reply::error(refused.payload));
                hub.count_join_refused();
                close_replaced(ctx, join.replaces.as_deref());
                return false;
            }
        };
        // Subscribe before replying, so a broadcast sent after the client saw "ok" reaches it.
        let target = |seen: Option<Seen>| Target::Fastlane {
            outbox: ctx.wire.outbox.clone(),
            serializer: ctx.wire.serializer,
            intercepts: C::INTERCEPTS,
            inbox: ctx.mailbox.clone() as Arc<dyn Inbox>,
            seen: seen.map(Box::new),
        };
        match recoverable {
            None => {
                ctx.sub_id = Some(hub.pubsub().subscribe(&ctx.topic, target(None)));
                ctx.wire.reply(jr, r, &ctx.topic, &Reply::ok(joined.reply));
            }
            Some((history, retention)) => {
                // Under the topic's history lock: subscribe, reply with the position, replay
                // what the client missed (a newcomer: the recent ones the app asked for).
                // Broadcasts of the topic wait, then come live. On a clustered node whose
                // history does not reach back, the engine is read first.
                let (since, recent) = (since.flatten(), joined.recent);
                let mut reply = Some(joined.reply);
                let endpoint = &ctx.endpoint;
                let caught_up = endpoint
                    .catch_up(
                        history,
                        &ctx.topic,
                        retention,
                        since.as_deref(),
                        recent,
                        |c| {
                            if c.unavailable {
                                // phoenix.js rejoins after its backoff, on a node that can
                                // answer by then.
                                let why = serde_json::json!({"reason": "history unavailable"});
                                ctx.wire.reply(jr, r, &ctx.topic, &Reply::error(why));
                                return None;
                            }
                            let sub_id = hub.pubsub().subscribe(&ctx.topic, target(c.seen));
                            let recovered = c.recovered;
                            let reply = reply.take().unwrap_or_else(Payload::empty);
                            let reply = with_position(reply, c.position, c.recovered);
                            ctx.wire.reply(jr, r, &ctx.topic, &Reply::ok(reply));
                            let replay = target(None);
                            for b in &c.replay {
                                replay.replay(b, hub.pubsub());
                            }
                            Some((sub_id, recovered))
                        },
                    )
                    .await;
                let Some((sub_id, recovered)) = caught_up else {
                    tracing::info!(
                        topic = &*ctx.topic,
                        "join refused: the history engine cannot be read to check its position"
                    );
                    hub.count_join_refused();
                    close_replaced(ctx, join.replaces.as_deref());
                    return false;
                };
                ctx.sub_id = Some(sub_id);
                ctx.recovered = recovered;
            }
        }
        hub.count_join(started);
        close_replaced(ctx, join.replaces.as_deref());
        let channel = self.channel.insert(joined.channel);
        channel.after_join(ctx).await;
        ctx.endpoint.hub().tracker().go_live(&ctx.mailbox.cursor);
        self.stopped().await
    }

    /// Handles one message; whether the channel runs on.
    async fn handle(&mut self, msg: ChannelMsg<C::Info>) -> bool {
        let ctx = &mut self.ctx;
        let Some(channel) = self.channel.as_mut() else {
            return false;
        };
        match msg {
            ChannelMsg::In {
                event,
                payload,
                r#ref,
            } => {
                ctx.current_ref = r#ref.map(String::into_boxed_str);
                let result = channel.handle_in(&event, payload, ctx).await;
                let r#ref = ctx.current_ref.take().map(String::from);
                let refused = std::mem::take(&mut ctx.reply_refused);
                let result = match result {
                    Ok(None) if refused => {
                        ctx.endpoint.hub().count_limit(Limit::PendingReplies);
                        Err(Reply::error(
                            serde_json::json!({"reason": Limit::PendingReplies.reason()}),
                        ))
                    }
                    other => other,
                };
                if let Ok(Some(reply)) | Err(reply) = result {
                    ctx.wire
                        .reply(Some(&ctx.join_ref), r#ref.as_deref(), &ctx.topic, &reply);
                }
            }
            ChannelMsg::Leave { r#ref } => {
                let ok = Reply::ok(Payload::empty());
                ctx.wire
                    .reply(Some(&ctx.join_ref), r#ref.as_deref(), &ctx.topic, &ok);
                ctx.stop = Some(StopReason::Left);
            }
            ChannelMsg::Out(broadcast) => channel.handle_out(broadcast, ctx).await,
            ChannelMsg::Info(info) => channel.handle_info(info, ctx).await,
            ChannelMsg::Closed(reason) => {
                channel.terminate(&reason, ctx).await;
                return false;
            }
        }
        self.stopped().await
    }

    /// If the channel was asked to stop: ends it (`phx_close`, or `phx_error` for an error,
    /// and `terminate`) and returns false.
    async fn stopped(&mut self) -> bool {
        let ctx = &mut self.ctx;
        let (Some(reason), Some(channel)) = (ctx.stop.take(), self.channel.as_mut()) else {
            return true;
        };
        if let StopReason::Error(e) = &reason {
            tracing::warn!(topic = &*ctx.topic, reason = %e, "channel stopped with an error");
            channel.terminate(&reason, ctx).await;
            ctx.wire.send(&control(ctx, "phx_error", &crash_payload()));
        } else {
            ctx.wire.send(&control(ctx, "phx_close", &Payload::empty()));
            channel.terminate(&reason, ctx).await;
        }
        false
    }
}

impl<C: Channel> Drop for Runner<C> {
    fn drop(&mut self) {
        let ctx = &mut self.ctx;
        let pubsub = ctx.endpoint.hub().pubsub();
        if let Some(id) = ctx.sub_id.take() {
            pubsub.unsubscribe(&ctx.topic, id);
            ctx.endpoint.hub().count_channel_closed();
        }
        for (topic, id) in ctx.extra.take().into_iter().flat_map(|e| *e) {
            pubsub.unsubscribe(&topic, id);
        }
        if let Some(owner) = ctx.owner {
            ctx.endpoint.hub().tracker().untrack_owner(owner);
        }
        let unmatched = Reply::error(serde_json::json!({"reason": "unmatched topic"}));
        for msg in ctx.mailbox.close() {
            if let ChannelMsg::In { r#ref: Some(r), .. } = msg {
                ctx.wire.reply(None, Some(&r), &ctx.topic, &unmatched);
            }
        }
        ctx.wire
            .outbox
            .event(ConnEvent::ChannelExited { id: self.id });
    }
}
