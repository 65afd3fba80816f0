//! The client's `Presence` follows the server's presence list through joins, updates and leaves.

mod common;

use common::*;
use firebrand::Endpoint;
use firebrand_client::{Events, Presence};
use serde_json::{Value, json as j};

const TOPIC: &str = "room:presence";

/// Feeds channel events to `presence` until its list equals the server's and the server's has
/// exactly `keys`. Fails after [`WAIT`] without a match.
async fn converge(
    events: &mut Events,
    presence: &mut Presence,
    endpoint: &Endpoint,
    keys: &[&str],
) {
    let matched = async {
        loop {
            let server = endpoint.presence_list(TOPIC).to_value().unwrap();
            let server_keys: Vec<&str> = server
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.as_str())
                .collect();
            let client = serde_json::to_value(presence.state()).unwrap();
            if server_keys == keys && client == server {
                return;
            }
            let event = events.recv().await.expect("channel events ended");
            presence.handle(&event);
        }
    };
    if tokio::time::timeout(WAIT, matched).await.is_err() {
        panic!(
            "client {} never matched server {} (keys {keys:?})",
            serde_json::to_value(presence.state()).unwrap(),
            endpoint.presence_list(TOPIC)
        );
    }
}

#[tokio::test]
async fn presence_matches_the_server_through_joins_updates_and_leaves() {
    let s = start().await;
    let (alice, bob) = (s.socket(&[("user", "alice")]), s.socket(&[("user", "bob")]));
    let (ca, cb) = (alice.channel(TOPIC, j!({})), bob.channel(TOPIC, j!({})));
    let (mut ea, mut eb) = (ca.events(), cb.events());
    let (mut pa, mut pb) = (Presence::new(), Presence::new());

    ca.join().await.unwrap();
    converge(&mut ea, &mut pa, &s.endpoint, &["alice"]).await;

    cb.join().await.unwrap();
    converge(&mut eb, &mut pb, &s.endpoint, &["alice", "bob"]).await;
    converge(&mut ea, &mut pa, &s.endpoint, &["alice", "bob"]).await;

    // An update is one diff with a join (new meta) and a leave (old meta) for bob.
    let old_ref = pa.state()["bob"].metas[0]["phx_ref"].clone();
    assert_eq!(
        cb.push("update_presence", j!({"status": "away"})).await,
        Ok(json(j!({})))
    );
    // The server's list has the update once the reply is in: converging means the diff came.
    converge(&mut ea, &mut pa, &s.endpoint, &["alice", "bob"]).await;
    converge(&mut eb, &mut pb, &s.endpoint, &["alice", "bob"]).await;
    for p in [&pa, &pb] {
        let metas = &p.state()["bob"].metas;
        assert_eq!(metas.len(), 1, "{metas:?}");
        assert_eq!(metas[0]["status"], "away");
        assert_eq!(metas[0]["phx_ref_prev"], old_ref);
        assert_ne!(metas[0]["phx_ref"], old_ref);
    }

    cb.leave().await.unwrap();
    converge(&mut ea, &mut pa, &s.endpoint, &["alice"]).await;
    assert_eq!(pa.list().map(|(k, _)| k).collect::<Vec<_>>(), ["alice"]);
    let alice_metas: &Value = &serde_json::to_value(&pa.state()["alice"].metas).unwrap();
    assert_eq!(alice_metas.as_array().unwrap().len(), 1);
}
