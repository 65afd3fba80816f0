//! Joins, pushes, replies, broadcasts, timeouts and leaves against the conformance app.

mod common;

use std::time::Duration;

use common::*;
use firebrand_client::{ChannelEvent, ErrorReason, JoinError, Payload, PushError};
use serde_json::json as j;

#[tokio::test]
async fn join_push_and_leave() {
    let s = start().await;
    let socket = s.socket(&[]);
    let lobby = socket.channel("room:lobby", j!({}));
    let mut events = lobby.events();

    assert_eq!(lobby.push("ping", j!({})).await, Err(PushError::NotJoined));
    assert_eq!(lobby.join().await, Ok(json(j!({}))));
    assert_eq!(
        next(&mut events).await,
        ChannelEvent::Joined {
            response: json(j!({}))
        }
    );
    assert_eq!(lobby.join().await, Err(JoinError::AlreadyJoined));

    // Replies: ok, error, binary.
    assert_eq!(
        lobby.push("ping", j!({"n": 1})).await,
        Ok(json(j!({"n": 1})))
    );
    assert_eq!(
        lobby.push("error_reply", j!({})).await,
        Err(PushError::Reply {
            status: "error".into(),
            response: json(j!({"reason": "requested"})),
        })
    );
    let data = Payload::binary(vec![0u8, 1, 2, 255]);
    assert_eq!(lobby.push("binary_echo", data.clone()).await, Ok(data));

    // A server push to this client only.
    assert_eq!(lobby.push("push_me", j!({"x": 1})).await, Ok(json(j!({}))));
    assert_eq!(message(&mut events, "pushed").await, json(j!({"x": 1})));

    assert_eq!(lobby.leave().await, Ok(()));
    assert_eq!(next(&mut events).await, ChannelEvent::Closed);
    assert_eq!(events.recv().await, None, "the stream ends after Closed");
    assert_eq!(lobby.push("ping", j!({})).await, Err(PushError::Closed));
}

#[tokio::test]
async fn a_refused_join_says_why() {
    let s = start().await;
    let socket = s.socket(&[]);
    let private = socket.channel("room:private", j!({}));
    let mut events = private.events();
    assert_eq!(
        private.join().await,
        Err(JoinError::Refused {
            status: "error".into(),
            response: json(j!({"reason": "unauthorized"})),
        })
    );
    assert!(matches!(
        next(&mut events).await,
        ChannelEvent::Errored {
            reason: ErrorReason::Refused { .. }
        }
    ));
    // Pushes wait for a join that will not come: they time out.
    let push = private.push_with_timeout("ping", j!({}), Duration::from_millis(50));
    assert_eq!(push.await, Err(PushError::Timeout));
    assert_eq!(private.leave().await, Ok(()));
}

#[tokio::test]
async fn join_reply_and_push_timeout() {
    let s = start().await;
    let socket = s.socket(&[]);
    let slow = socket.channel("room:slow", j!({}));
    assert_eq!(slow.join().await, Ok(json(j!({"joined": "slow"}))));
    let push = slow.push_with_timeout("sleep", j!({"ms": 2000}), Duration::from_millis(100));
    assert_eq!(push.await, Err(PushError::Timeout));
}

#[tokio::test]
async fn pushes_made_while_joining_are_sent_after_the_join() {
    let s = start().await;
    let socket = s.socket(&[]);
    let ch = socket.channel("room:slow_join", j!({}));
    let join = tokio::spawn(ch.join().into_future());
    // Queued behind the join command, so buffered until the (500 ms) join completes.
    let reply = ch.push("ping", j!({"early": true}));
    assert_eq!(reply.await, Ok(json(j!({"early": true}))));
    assert!(join.await.unwrap().is_ok());
}

#[tokio::test]
async fn broadcasts_from_another_client_arrive() {
    let s = start().await;
    let (a, b) = (s.socket(&[]), s.socket(&[]));
    let (ca, cb) = (
        a.channel("room:chat", j!({})),
        b.channel("room:chat", j!({})),
    );
    let mut eb = cb.events();
    ca.join().await.unwrap();
    cb.join().await.unwrap();

    // `new_msg` is broadcast and not replied to: do not wait for a reply.
    let _ = ca.push("new_msg", j!({"body": "hi"}));
    assert_eq!(message(&mut eb, "new_msg").await, json(j!({"body": "hi"})));

    let _ = ca.push("binary_broadcast", Payload::binary(&b"\x00bin"[..]));
    assert_eq!(
        message(&mut eb, "binary_broadcast").await,
        Payload::binary(&b"\x00bin"[..])
    );
}

#[tokio::test]
async fn a_crashed_channel_rejoins_by_itself() {
    let s = start().await;
    let socket = s.socket(&[]);
    let ch = socket.channel("room:crashy", j!({}));
    let mut events = ch.events();
    ch.join().await.unwrap();
    assert!(matches!(
        next(&mut events).await,
        ChannelEvent::Joined { .. }
    ));

    let _ = ch.push("crash", j!({}));
    assert_eq!(
        next(&mut events).await,
        ChannelEvent::Errored {
            reason: ErrorReason::Crashed(json(j!({"reason": "channel_crash"})))
        }
    );
    assert_eq!(
        next(&mut events).await,
        ChannelEvent::Joined {
            response: json(j!({"joined": "crashy"}))
        }
    );
    assert_eq!(ch.push("ping", j!({"a": 1})).await, Ok(json(j!({"a": 1}))));
}

#[tokio::test]
async fn dropping_every_handle_leaves_the_channel() {
    let s = start().await;
    let watcher = s.socket(&[]);
    let w = watcher.channel("room:drop", j!({}));
    let mut we = w.events();
    w.join().await.unwrap();

    let socket = s.socket(&[("user", "dropper")]);
    let ch = socket.channel("room:drop", j!({}));
    let other_handle = ch.clone();
    ch.join().await.unwrap();
    let diff = message(&mut we, "presence_diff").await.to_value().unwrap();
    assert!(diff["joins"].get("dropper").is_some(), "{diff}");

    drop(ch);
    assert_eq!(other_handle.push("ping", j!({})).await, Ok(json(j!({}))));
    drop(other_handle);
    // The server untracks the presence when the channel ends: a leave diff reaches others.
    let diff = message(&mut we, "presence_diff").await.to_value().unwrap();
    assert!(diff["leaves"].get("dropper").is_some(), "{diff}");
}

#[tokio::test]
async fn a_buffered_push_past_its_timeout_is_never_sent() {
    let s = start().await;
    let observer = s.socket(&[]);
    let o = observer.channel("room:slow_join", j!({}));
    let mut oe = o.events();
    o.join().await.unwrap();

    let socket = s.socket(&[]);
    let ch = socket.channel("room:slow_join", j!({}));
    let join = tokio::spawn(ch.join().into_future());
    // Buffered behind the 500 ms join; its 50 ms timeout passes first.
    let stale = ch.push_with_timeout("new_msg", j!({"n": 1}), Duration::from_millis(50));
    assert_eq!(stale.await, Err(PushError::Timeout));
    // Fire and forget: sent after the join although its handle is dropped.
    drop(ch.push("new_msg", j!({"n": 2})));
    join.await.unwrap().unwrap();
    assert_eq!(message(&mut oe, "new_msg").await, json(j!({"n": 2})));
}

#[tokio::test]
async fn a_join_without_reply_in_time_times_out_and_errors() {
    let s = start().await;
    let socket = s.socket(&[]);
    let ch = socket.channel("room:slow_join", j!({}));
    let mut events = ch.events();
    let join = ch.join().timeout(Duration::from_millis(100));
    assert_eq!(join.await, Err(JoinError::Timeout));
    assert_eq!(
        next(&mut events).await,
        ChannelEvent::Errored {
            reason: ErrorReason::JoinTimeout
        }
    );
}
