//! Presence as the official client sees it: presence_state after join, presence_diff on every
//! change, untracking however a channel ends.

mod common;

use common::*;
use serde_json::{Value, json};

/// Receives frames until a `presence_diff` arrives; returns its payload.
async fn next_diff(c: &mut Client) -> Value {
    loop {
        let f = c.recv_json().await;
        if f[3] == "presence_diff" {
            assert_eq!(
                (&f[0], &f[1]),
                (&Value::Null, &Value::Null),
                "diffs are broadcasts"
            );
            return f[4].clone();
        }
    }
}

/// Collects diffs until `done(joins, leaves)` holds, merging them (diffs may be batched).
async fn diffs_until(c: &mut Client, done: impl Fn(&Value, &Value) -> bool) -> (Value, Value) {
    let (mut joins, mut leaves) = (json!({}), json!({}));
    while !done(&joins, &leaves) {
        let d = next_diff(c).await;
        for (side, acc) in [("joins", &mut joins), ("leaves", &mut leaves)] {
            for (k, v) in d[side].as_object().unwrap() {
                acc[k] = v.clone();
            }
        }
    }
    (joins, leaves)
}

fn metas(v: &Value, key: &str) -> Vec<Value> {
    v[key]["metas"].as_array().cloned().unwrap_or_default()
}

/// Joins `topic` as the given client and returns the presence_state payload.
async fn join_with_presence(c: &mut Client, jr: &str, topic: &str) -> Value {
    c.send(json!([jr, jr, topic, "phx_join", {}])).await;
    loop {
        let f = c.recv_json().await;
        match f[3].as_str() {
            Some("phx_reply") => assert_eq!(f[4]["status"], "ok"),
            Some("presence_state") => {
                assert_eq!(
                    (&f[0], &f[1]),
                    (&json!(jr), &Value::Null),
                    "state is a push"
                );
                return f[4].clone();
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn join_pushes_state_and_broadcasts_a_join_diff() {
    let s = start().await;
    let mut alice = s.presence_client("user=alice").await;
    let state = join_with_presence(&mut alice, "1", "room:p1").await;
    let m = metas(&state, "alice");
    assert_eq!(m.len(), 1);
    let phx_ref = m[0]["phx_ref"].as_str().unwrap();
    assert_eq!(phx_ref.len(), 16);
    let online_at: u64 = m[0]["online_at"].as_str().unwrap().parse().unwrap();
    assert!(online_at > 1_700_000_000);
    let (joins, _) = diffs_until(&mut alice, |j, _| j.get("alice").is_some()).await;
    assert_eq!(metas(&joins, "alice"), m);

    let mut bob = s.presence_client("user=bob").await;
    let state = join_with_presence(&mut bob, "7", "room:p1").await;
    assert_eq!(metas(&state, "alice"), m);
    assert_eq!(metas(&state, "bob").len(), 1);
    let (joins, leaves) = diffs_until(&mut alice, |j, _| j.get("bob").is_some()).await;
    assert_eq!(metas(&joins, "bob"), metas(&state, "bob"));
    assert_eq!(leaves, json!({}));
}

#[tokio::test]
async fn leave_crash_and_disconnect_each_untrack() {
    let s = start().await;
    let mut watcher = s.presence_client("user=watcher").await;
    join_with_presence(&mut watcher, "1", "room:p2").await;
    for (user, how) in [
        ("leaver", "leave"),
        ("crasher", "crash"),
        ("closer", "close"),
    ] {
        let mut c = s.presence_client(&format!("user={user}")).await;
        join_with_presence(&mut c, "1", "room:p2").await;
        diffs_until(&mut watcher, |j, _| j.get(user).is_some()).await;
        match how {
            "leave" => c.send(json!(["1", "2", "room:p2", "phx_leave", {}])).await,
            "crash" => c.send(json!(["1", "2", "room:p2", "crash", {}])).await,
            _ => c.ws.close(None).await.unwrap(),
        }
        let (_, leaves) = diffs_until(&mut watcher, |_, l| l.get(user).is_some()).await;
        assert_eq!(metas(&leaves, user).len(), 1, "{how}");
    }
    watcher
        .send(json!(["1", "9", "room:p2", "phx_leave", {}]))
        .await;
    let mut late = s.presence_client("user=late").await;
    let state = join_with_presence(&mut late, "1", "room:p2").await;
    assert_eq!(
        state.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["late"]
    );
}

#[tokio::test]
async fn update_sends_a_join_with_phx_ref_prev_and_a_leave() {
    let s = start().await;
    let mut c = s.presence_client("user=upd").await;
    let state = join_with_presence(&mut c, "1", "room:p3").await;
    let old_ref = metas(&state, "upd")[0]["phx_ref"].clone();
    diffs_until(&mut c, |j, _| j.get("upd").is_some()).await;
    c.send(json!(["1", "2", "room:p3", "update_presence", {"status": "away"}]))
        .await;
    let d = next_diff(&mut c).await;
    let joined = metas(&d["joins"], "upd");
    assert_eq!(joined.len(), 1);
    assert_eq!(joined[0]["status"], "away");
    assert_eq!(joined[0]["phx_ref_prev"], old_ref);
    assert_ne!(joined[0]["phx_ref"], old_ref);
    assert!(joined[0]["online_at"].is_string());
    assert_eq!(metas(&d["leaves"], "upd")[0]["phx_ref"], old_ref);
}

#[tokio::test]
async fn two_tabs_of_one_user_are_two_metas() {
    let s = start().await;
    let mut tab1 = s.presence_client("user=twin").await;
    let state = join_with_presence(&mut tab1, "1", "room:p4").await;
    let ref1 = metas(&state, "twin")[0]["phx_ref"].clone();
    let mut tab2 = s.presence_client("user=twin").await;
    let state = join_with_presence(&mut tab2, "1", "room:p4").await;
    let both = metas(&state, "twin");
    assert_eq!(both.len(), 2);
    let ref2 = both
        .iter()
        .map(|m| m["phx_ref"].clone())
        .find(|r| *r != ref1)
        .unwrap();
    let has = |side: &Value, r: &Value| metas(side, "twin").iter().any(|m| m["phx_ref"] == *r);
    diffs_until(&mut tab1, |j, _| has(j, &ref2)).await;
    // The second tab goes away without a close frame: its meta alone leaves.
    drop(tab2);
    let (_, leaves) = diffs_until(&mut tab1, |_, l| has(l, &ref2)).await;
    assert_eq!(metas(&leaves, "twin").len(), 1);
    let list = s.endpoint.presence_list("room:p4").to_value().unwrap();
    assert_eq!(
        metas(&list, "twin")
            .iter()
            .map(|m| m["phx_ref"].clone())
            .collect::<Vec<_>>(),
        [ref1]
    );
}
