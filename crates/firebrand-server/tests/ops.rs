//! The operations endpoints against the real binary: `/health`, `/ready` (503 while draining)
//! and `/metrics` (counters that follow the traffic; the output checked by `promtool`).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The value of the sample `series` (name and labels) in the Prometheus text `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

async fn metrics(port: u16) -> String {
    let (status, body) = http(port, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200, "{body}");
    match body {
        serde_json::Value::String(text) => text,
        other => panic!("not the text format: {other}"),
    }
}

/// `promtool check metrics` on `text` (Debian's `prometheus` package; scripts/prereqs.sh).
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed (apt-get install prometheus; see scripts/prereqs.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn health_ready_and_metrics_that_follow_the_traffic() {
    let server = spawn(&[], &[]).await;
    let port = server.port;
    assert_eq!(
        http(port, "GET", "/health", None, None).await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(
        http(port, "GET", "/ready", None, None).await,
        (200, json!({"ready": true}))
    );

    let mut client = connect(&server.url(), None).await.open();
    assert_eq!(client.join("room:a").await.0, "ok");
    let (status, _) = http(
        port,
        "POST",
        "/api/publish",
        None,
        Some(&json!({"topic": "room:a", "event": "news", "payload": {}}).to_string()),
    )
    .await;
    assert_eq!(status, 200);
    client.recv_event("news").await;
    // Refused: an origin that is not allowed.
    let refused = connect_with(&server.url(), None, &[("origin", "https://evil.example")]).await;
    assert_eq!(refused.refused(), 403);

    let text = metrics(port).await;
    assert_eq!(value(&text, "firebrand_connections"), 1.0);
    assert_eq!(value(&text, "firebrand_connections_opened_total"), 1.0);
    assert_eq!(
        value(
            &text,
            "firebrand_connections_refused_total{reason=\"origin\"}"
        ),
        1.0
    );
    assert_eq!(value(&text, "firebrand_joins_total"), 1.0);
    assert_eq!(value(&text, "firebrand_channels"), 1.0);
    assert_eq!(value(&text, "firebrand_messages_in_total"), 1.0);
    assert_eq!(value(&text, "firebrand_broadcasts_total"), 1.0);
    assert_eq!(value(&text, "firebrand_deliveries_total"), 1.0);
    // The join reply and the broadcast.
    assert_eq!(value(&text, "firebrand_frames_out_total"), 2.0);
    // Each in a write of its own: the broadcast was published after the join's reply came.
    assert_eq!(value(&text, "firebrand_writes_out_total"), 2.0);
    assert!(value(&text, "firebrand_bytes_out_total") > 0.0);
    assert_eq!(value(&text, "firebrand_draining"), 0.0);
    assert_eq!(value(&text, "firebrand_join_seconds_count"), 1.0);
    assert_eq!(value(&text, "firebrand_broadcast_queue_seconds_count"), 1.0);
    assert!(
        text.contains("# TYPE firebrand_join_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("# HELP firebrand_deliveries_total "),
        "{text}"
    );
    promtool_check(&text);

    // The leave is counted at the next scrape.
    let r = client
        .send(Some("1"), "room:a", "phx_leave", json!({}))
        .await;
    client.reply(&r).await;
    let mut closed = 0.0;
    for _ in 0..50 {
        closed = value(&metrics(port).await, "firebrand_channels_closed_total");
        if closed == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed, 1.0);
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let server = spawn(&[], &[("FIREBRAND_METRICS", "false")]).await;
    let (status, _) = http(server.port, "GET", "/metrics", None, None).await;
    assert_eq!(status, 404);
    let (status, _) = http(server.port, "GET", "/health", None, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn ready_turns_503_while_draining() {
    let mut server = spawn(&[], &[("FIREBRAND_DRAIN_MS", "10")]).await;
    let port = server.port;
    // A client that does not read: its close handshake holds the drain open for a while.
    let mut client = connect(&server.url(), None).await.open();
    client.join("room:a").await;
    let pid = server.child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());

    let mut ready = http(port, "GET", "/ready", None, None).await;
    for _ in 0..100 {
        if ready.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        ready = http(port, "GET", "/ready", None, None).await;
    }
    assert_eq!(ready, (503, json!({"ready": false, "reason": "draining"})));
    // Still serving, but new sockets go elsewhere.
    assert_eq!(connect(&server.url(), None).await.refused(), 503);
    let text = metrics(port).await;
    assert_eq!(value(&text, "firebrand_draining"), 1.0);
    assert_eq!(
        value(
            &text,
            "firebrand_connections_refused_total{reason=\"draining\"}"
        ),
        1.0
    );

    drop(client);
    let status = tokio::time::timeout(WAIT, server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn ready_is_503_while_the_cluster_engine_is_unreachable() {
    // Nothing listens on port 1: the Redis adapter keeps retrying.
    let server = spawn(&[], &[("REDIS_URL", "redis://127.0.0.1:1")]).await;
    let (status, body) = http(server.port, "GET", "/ready", None, None).await;
    assert_eq!(
        (status, body),
        (
            503,
            json!({"ready": false, "reason": "cluster engine unreachable"})
        )
    );
    assert_eq!(
        value(&metrics(server.port).await, "firebrand_cluster_ready"),
        0.0
    );
    // Still alive.
    assert_eq!(http(server.port, "GET", "/health", None, None).await.0, 200);
}

/// Against the real engines (scripts/prereqs.sh starts them): ready once subscribed.
#[tokio::test]
async fn ready_once_the_cluster_engine_is_reached() {
    for (var, url) in [
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("NATS_URL", "nats://127.0.0.1:4222"),
    ] {
        let server = spawn(&[], &[(var, url)]).await;
        let mut ready = http(server.port, "GET", "/ready", None, None).await;
        for _ in 0..200 {
            if ready.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            ready = http(server.port, "GET", "/ready", None, None).await;
        }
        assert_eq!(ready, (200, json!({"ready": true})), "{var}");
    }
}

#[tokio::test]
async fn the_history_budget_evicts_and_is_counted_in_the_metrics() {
    let dir = temp_dir("history-budget");
    let path = dir.join("firebrand.toml");
    std::fs::write(
        &path,
        "[server]\nhistory_budget_mb = 1\n\n[[namespace]]\nprefix = \"\"\npushes = \"broadcast\"\n\
         history = { size = 100, max_age_ms = 60000 }\n",
    )
    .unwrap();
    let server = spawn(&["--config", path.to_str().unwrap()], &[]).await;
    let big = "x".repeat(300_000);
    for topic in ["stream:a", "stream:b", "stream:a"] {
        let body = json!({"topic": topic, "event": "new_msg", "payload": {"s": big}});
        let (status, body) = http(
            server.port,
            "POST",
            "/api/publish",
            None,
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    // Each counts about 600 kB: within 1 MiB, one at a time; the oldest go first.
    let text = metrics(server.port).await;
    assert_eq!(value(&text, "firebrand_history_evictions_total"), 2.0);
    let bytes = value(&text, "firebrand_history_bytes");
    assert!(bytes > 600_000.0 && bytes <= f64::from(1 << 20), "{bytes}");
    assert!(
        text.contains("# TYPE firebrand_history_bytes gauge"),
        "{text}"
    );
    promtool_check(&text);
    let (status, page) = http(
        server.port,
        "GET",
        "/api/history?topic=stream:b",
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, page["messages"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{page}"
    );
}
