//! Presence as the official client sees it: presence_state after join, presence_diff on every
//! change, untracking however a channel ends.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

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

/// The phx_refs of a `{key: {"metas": [...]}}` map, with their keys.
fn refs(v: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (key, entry) in v.as_object().unwrap() {
        for m in entry["metas"].as_array().unwrap() {
            out.insert((key.clone(), m["phx_ref"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// What the official client's `Presence` holds: the `presence_state`, then each diff applied
/// (diffs that came first are applied after it, as phoenix.js does). A join of a meta it
/// already holds, or a leave of one it does not, is a change seen twice: the test fails.
#[derive(Default)]
struct View {
    metas: BTreeSet<(String, String)>,
    early: Vec<Value>,
    synced: bool,
}

impl View {
    fn frame(&mut self, f: &Value) {
        match f[3].as_str() {
            Some("presence_state") => {
                self.metas = refs(&f[4]);
                self.synced = true;
                for d in std::mem::take(&mut self.early) {
                    self.diff(&d);
                }
            }
            Some("presence_diff") if !self.synced => self.early.push(f[4].clone()),
            Some("presence_diff") => self.diff(&f[4]),
            _ => {}
        }
    }

    fn diff(&mut self, d: &Value) {
        for m in refs(&d["joins"]) {
            assert!(self.metas.insert(m.clone()), "stale join {m:?} in {d}");
        }
        for m in refs(&d["leaves"]) {
            assert!(
                self.metas.remove(&m),
                "leave {m:?} of a meta not known in {d}"
            );
        }
    }
}

#[tokio::test]
async fn join_pushes_state_and_each_change_is_one_diff() {
    let s = start().await;
    let mut alice = s.presence_client("user=alice").await;
    let state = join_with_presence(&mut alice, "1", "room:p1").await;
    let m = metas(&state, "alice");
    assert_eq!(m.len(), 1);
    let phx_ref = m[0]["phx_ref"].as_str().unwrap();
    assert_eq!(phx_ref.len(), 16);
    let online_at: u64 = m[0]["online_at"].as_str().unwrap().parse().unwrap();
    assert!(online_at > 1_700_000_000);

    // Bob's join: his state holds it, so he gets no diff of it; alice gets exactly one diff,
    // with his join alone (her own join is in her state: never sent to her as a diff).
    let mut bob = s.presence_client("user=bob").await;
    let state = join_with_presence(&mut bob, "7", "room:p1").await;
    assert_eq!(metas(&state, "alice"), m);
    assert_eq!(metas(&state, "bob").len(), 1);
    let d = next_diff(&mut alice).await;
    assert_eq!(
        d,
        json!({"joins": {"bob": {"metas": metas(&state, "bob")}}, "leaves": {}})
    );

    // Bob leaves: one diff with his leave alone, to alice.
    bob.send(json!(["7", "8", "room:p1", "phx_leave", {}]))
        .await;
    let d = next_diff(&mut alice).await;
    assert_eq!(
        d,
        json!({"joins": {}, "leaves": {"bob": {"metas": metas(&state, "bob")}}})
    );
}

/// A channel that has no presence of its own and joins after a user was tracked gets no diff
/// of that earlier join (its join reply and the diff once raced: the diff waited for a batch).
#[tokio::test]
async fn a_subscriber_gets_no_diff_of_changes_before_its_join() {
    let s = start().await;
    let mut alice = s.presence_client("user=alice").await;
    join_with_presence(&mut alice, "1", "room:p5").await;
    let mut watcher = s.presence_client("").await;
    watcher.join("1", "room:p5", json!({"joined": "p5"})).await;
    // The next diff the watcher sees is of bob's join, made after its own join.
    let mut bob = s.presence_client("user=bob").await;
    join_with_presence(&mut bob, "1", "room:p5").await;
    let d = next_diff(&mut watcher).await;
    assert_eq!(
        d["joins"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["bob"],
        "{d}"
    );
}

/// With a batch window far longer than the test may wait, a change in a quiet room still
/// goes out at once: the window only merges changes that come faster than it.
#[tokio::test]
async fn a_quiet_rooms_diff_is_not_held_for_the_window() {
    let endpoint = firebrand::Endpoint::builder()
        .presence_batch(Duration::from_secs(600))
        .build();
    let s = start_endpoint(&Default::default(), endpoint).await;
    let mut watcher = s.presence_client("").await;
    watcher
        .join("1", "room:quiet", json!({"joined": "quiet"}))
        .await;
    let mut bob = s.presence_client("user=bob").await;
    join_with_presence(&mut bob, "1", "room:quiet").await;
    let d = next_diff(&mut watcher).await;
    assert!(d["joins"].get("bob").is_some(), "{d}");
}

/// Many users join at once while others watch and a newcomer joins mid-burst: whatever gets
/// batched, every client's state plus its diffs is the room's final state, no change twice.
#[tokio::test]
async fn a_joiner_during_a_burst_gets_no_stale_diff() {
    const USERS: usize = 40;
    let s = start().await;
    let mut watcher = s.presence_client("user=watcher").await;
    let mut watcher_view = View::default();
    watcher
        .send(json!(["1", "1", "room:burst", "phx_join", {}]))
        .await;
    let mut burst = Vec::new();
    for i in 0..USERS {
        let mut c = s.presence_client(&format!("user=u{i}")).await;
        c.send(json!(["1", "1", "room:burst", "phx_join", {}]))
            .await;
        burst.push(c);
    }
    // The newcomer joins while the burst's diffs are still pending.
    let mut newcomer = s.presence_client("user=newcomer").await;
    let mut newcomer_view = View::default();
    newcomer
        .send(json!(["1", "1", "room:burst", "phx_join", {}]))
        .await;
    // Half the burst leaves again, also while diffs are pending.
    for c in burst.iter_mut().take(USERS / 2) {
        c.send(json!(["1", "2", "room:burst", "phx_leave", {}]))
            .await;
    }
    let expected: BTreeSet<String> = (USERS / 2..USERS)
        .map(|i| format!("u{i}"))
        .chain(["watcher".into(), "newcomer".into()])
        .collect();
    let keys = |v: &View| {
        v.metas
            .iter()
            .map(|(k, _)| k.clone())
            .collect::<BTreeSet<_>>()
    };
    for (c, view) in [
        (&mut watcher, &mut watcher_view),
        (&mut newcomer, &mut newcomer_view),
    ] {
        while !(view.synced && keys(view) == expected) {
            view.frame(&c.recv_json().await);
        }
    }
    let truth = refs(&s.endpoint.presence_list("room:burst").to_value().unwrap());
    assert_eq!(watcher_view.metas, truth);
    assert_eq!(newcomer_view.metas, truth);
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
    // One diff, with this change alone.
    assert_eq!(d["joins"].as_object().unwrap().len(), 1);
    assert_eq!(d["leaves"].as_object().unwrap().len(), 1);
    assert_eq!(metas(&d["leaves"], "upd").len(), 1);
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
    let d = next_diff(&mut tab1).await;
    assert!(has(&d["joins"], &ref2), "{d}");
    // The second tab goes away without a close frame: one diff, with its meta's leave alone.
    drop(tab2);
    let d = next_diff(&mut tab1).await;
    assert_eq!(d["joins"], json!({}));
    assert_eq!(
        metas(&d["leaves"], "twin")
            .iter()
            .map(|m| m["phx_ref"].clone())
            .collect::<Vec<_>>(),
        [ref2]
    );
    let list = s.endpoint.presence_list("room:p4").to_value().unwrap();
    assert_eq!(
        metas(&list, "twin")
            .iter()
            .map(|m| m["phx_ref"].clone())
            .collect::<Vec<_>>(),
        [ref1]
    );
}

/// Two sockets of one user on a topic, the second going away right after joining (a tab
/// opened and closed, well within the batch window): a third client sees the second's join
/// and then its leave as two diffs, as Phoenix sends them, never one diff with the key on both
/// sides. Once by `phx_leave` sent behind the join, once by closing the socket.
#[tokio::test]
async fn a_second_socket_leaving_right_after_joining_is_a_join_diff_then_a_leave_diff() {
    let s = start().await;
    let mut observer = s.presence_client("").await;
    observer.join("1", "room:p6", json!({"joined": "p6"})).await;
    // The first tabs stay (a tab going away would be a change of its own).
    let mut first_tabs = Vec::new();
    for (user, how) in [("twin1", "leave"), ("twin2", "close")] {
        let mut tab1 = s.presence_client(&format!("user={user}")).await;
        let state = join_with_presence(&mut tab1, "1", "room:p6").await;
        let ref1 = metas(&state, user)[0]["phx_ref"].clone();
        let d = next_diff(&mut observer).await;
        assert_eq!(
            d,
            json!({"joins": {user: {"metas": metas(&state, user)}}, "leaves": {}})
        );

        // The first tab's diff just went out: the second tab's join and leave come within
        // the window.
        let mut tab2 = s.presence_client(&format!("user={user}")).await;
        match how {
            "leave" => {
                tab2.send(json!(["1", "1", "room:p6", "phx_join", {}]))
                    .await;
                tab2.send(json!(["1", "2", "room:p6", "phx_leave", {}]))
                    .await;
            }
            _ => {
                join_with_presence(&mut tab2, "1", "room:p6").await;
                tab2.ws.close(None).await.unwrap();
            }
        }
        let joined = next_diff(&mut observer).await;
        assert_eq!(joined["leaves"], json!({}), "{how}: {joined}");
        let m = metas(&joined["joins"], user);
        assert_eq!(m.len(), 1, "{how}: {joined}");
        assert_ne!(m[0]["phx_ref"], ref1, "{how}: {joined}");
        let left = next_diff(&mut observer).await;
        assert_eq!(
            left,
            json!({"joins": {}, "leaves": {user: {"metas": m}}}),
            "{how}"
        );
        first_tabs.push(tab1);
    }
}
