//! Conformance nodes as separate processes in one cluster, for the cluster and fault tests:
//! starting them, their clients, broadcasting through their API, and waiting until the
//! cluster carries messages between two of them.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;
use tokio::time::{Duration, Instant, timeout, timeout_at};

use super::{Client, WAIT, spawn_conformance};

/// The topic of [`await_link`]'s probes.
pub const PROBE_TOPIC: &str = "room:probe";

pub struct Node {
    /// The process; dropping it kills the node (`kill_on_drop`).
    pub child: Child,
    pub port: u16,
}

/// Starts a node with the environment `envs` (the engine's URL, `CLUSTER_NAMESPACE`, …).
pub async fn node_env(envs: &[(&str, &str)]) -> Node {
    let (child, port) = spawn_conformance(envs).await;
    Node { child, port }
}

impl Node {
    /// A client (`query` added to the URL) that does not see presence frames.
    pub async fn client(&self, query: &str) -> Client {
        let mut c = self.presence_client(query).await;
        c.hide_presence = true;
        c
    }

    /// A client that sees presence frames too.
    pub async fn presence_client(&self, query: &str) -> Client {
        Client::connect(&format!(
            "ws://127.0.0.1:{}/socket/websocket?{query}&vsn=2.0.0",
            self.port
        ))
        .await
    }

    /// Sends `sig` (`-KILL`, `-STOP`, …) to the node's process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// A client on the probe topic, for [`await_link`].
    pub async fn probe(&self) -> Client {
        let mut probe = self.client("").await;
        probe
            .join("1", PROBE_TOPIC, json!({"joined": "probe"}))
            .await;
        probe
    }

    /// `POST /api/broadcast` on this node, answered 200.
    pub async fn broadcast(&self, topic: &str, event: &str, payload: Value) {
        let (status, body) = post_broadcast(self.port, topic, event, payload).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// `POST /api/broadcast` on the node at `port`: the status and the JSON body.
pub async fn post_broadcast(port: u16, topic: &str, event: &str, payload: Value) -> (u16, Value) {
    let body = json!({"topic": topic, "event": event, "payload": payload}).to_string();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST /api/broadcast HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    // The node may wait for its engine's confirmation (5 s by default) before it answers.
    timeout(3 * WAIT, tcp.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out}"));
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into()));
    (status, body)
}

/// Waits until the cluster carries messages from node `from` to the node of `probe` (a client
/// of [`Node::probe`]): `from` broadcasts probes until one arrives (engine subscriptions are
/// made in the background, at start and after an outage), then a last `linked` broadcast that
/// `probe` reads up to. Order holds per origin node, so no probe of this wait is still on its
/// way afterwards. Test clients never join the probe topic and never see a probe.
pub async fn await_link(from: &Node, probe: &mut Client) {
    for i in 0..100 {
        // While the link comes back a publish may be answered 503 (not delivered) or 202 (held):
        // what counts is whether a probe arrives.
        post_broadcast(from.port, PROBE_TOPIC, "probe", json!({"i": i})).await;
        let window = Instant::now() + Duration::from_millis(100);
        while let Ok(frame) = timeout_at(window, probe.recv_json()).await {
            if frame[3] == "probe" {
                from.broadcast(PROBE_TOPIC, "linked", json!({})).await;
                while probe.recv_json().await[3] != "linked" {}
                return;
            }
        }
    }
    panic!("the cluster never carried a message");
}

/// Joins `topic` with `params` (join_ref = ref = `jr`); the reply's response.
pub async fn join_stream(c: &mut Client, jr: &str, topic: &str, params: Value) -> Value {
    c.send(json!([jr, jr, topic, "phx_join", params])).await;
    loop {
        let f = c.recv_json().await;
        if f[3] == "phx_reply" && f[1] == jr {
            assert_eq!(f[4]["status"], "ok", "{f}");
            return f[4]["response"].clone();
        }
    }
}

/// The next `count` `new_msg` broadcasts on `c`: `(n, position)` each.
pub async fn stream_messages(c: &mut Client, count: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < count {
        let f = c.recv_json().await;
        if f[3] == "new_msg" {
            let position = f[1].as_str().expect("a position").to_owned();
            got.push((f[4]["n"].as_u64().unwrap(), position));
        }
    }
    got
}

/// Joins `topic` and collects presence frames (state and diffs) into one view of who is here,
/// until `done(view)` holds.
pub async fn presence_until(
    c: &mut Client,
    view: &mut serde_json::Map<String, Value>,
    done: impl Fn(&serde_json::Map<String, Value>) -> bool,
) {
    while !done(view) {
        let f = c.recv_json().await;
        match f[3].as_str() {
            Some("presence_state") => {
                *view = f[4].as_object().unwrap().clone();
            }
            Some("presence_diff") => {
                for (k, v) in f[4]["joins"].as_object().unwrap() {
                    view.insert(k.clone(), v.clone());
                }
                for k in f[4]["leaves"].as_object().unwrap().keys() {
                    view.remove(k);
                }
            }
            _ => {}
        }
    }
}
