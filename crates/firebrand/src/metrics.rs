//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`), for any
//! exporter of its ecosystem (Prometheus: `metrics-exporter-prometheus`).
//!
//! The endpoint counts with plain atomics (a broadcast to 10,000 connections adds to two
//! counters, never 10,000 metric calls): [`record`] copies them into the facade when it is
//! called — at each scrape — as absolute counters and gauges. The two latency histograms are
//! recorded as they happen, once per join and once per broadcast, into the recorder installed
//! then (none installed: they cost a no-op call).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let endpoint = firebrand::Endpoint::new();
//! firebrand::metrics::describe(); // once, after installing the recorder
//! // On each scrape (e.g. in a `GET /metrics` handler, before rendering):
//! firebrand::metrics::record(&endpoint);
//! # }
//! ```
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `firebrand_connections` | gauge | open connections (WebSocket and long-poll) |
//! | `firebrand_connections_opened_total` | counter | connections opened |
//! | `firebrand_connections_refused_total{reason}` | counter | connection requests refused: `origin` (not allowed), `vsn` (unknown serializer), `connect` ([`Socket::connect`](crate::Socket::connect) refused), `draining` (503 while draining) |
//! | `firebrand_channels` | gauge | channels joined now |
//! | `firebrand_joins_total` | counter | joins answered `ok` |
//! | `firebrand_joins_refused_total` | counter | joins refused by [`Channel::join`](crate::Channel::join) |
//! | `firebrand_channels_closed_total` | counter | joined channels that ended (left, closed, crashed, replaced, connection gone) |
//! | `firebrand_messages_in_total` | counter | messages received from clients (heartbeats and joins included) |
//! | `firebrand_messages_refused_total{reason}` | counter | messages refused: `rate_limited`, `payload_too_large`, `topic_too_long`, `replies_refused` (too many pending async replies) |
//! | `firebrand_frames_out_total` | counter | frames written to WebSocket clients |
//! | `firebrand_bytes_out_total` | counter | bytes written to WebSocket clients |
//! | `firebrand_writes_out_total` | counter | writes to WebSocket clients (each of every frame queued to its connection; frames per write = frames_out / writes_out) |
//! | `firebrand_topics` | gauge | topics with a subscriber on this node |
//! | `firebrand_broadcasts_total` | counter | broadcasts dispatched on this node (presence diffs included) |
//! | `firebrand_deliveries_total` | counter | frames queued to connections by broadcasts |
//! | `firebrand_slow_consumers_total` | counter | connections closed for not keeping up (1008) |
//! | `firebrand_protocol_errors_total` | counter | connections closed for undecodable frames (1007) |
//! | `firebrand_presences` | gauge | presence entries tracked (every node's) |
//! | `firebrand_cluster_received_total` | counter | messages received from other nodes |
//! | `firebrand_cluster_lost_total` | counter | messages the adapter could not send |
//! | `firebrand_cluster_rejected_total` | counter | messages from other nodes dropped (undecodable, forged, replayed…) |
//! | `firebrand_history_bytes` | gauge | bytes the recoverable topics' histories hold on this node ([`Stats::history_bytes`](crate::Stats::history_bytes); at most about [`history_budget`](crate::EndpointBuilder::history_budget)) |
//! | `firebrand_history_evictions_total` | counter | history entries evicted, oldest first, to keep within the budget |
//! | `firebrand_draining` | gauge | 1 while the endpoint drains, else 0 |
//! | `firebrand_cluster_ready` | gauge | 1 while the cluster's engine is reachable (or there is no cluster), else 0: [`Endpoint::cluster_ready`] |
//! | `firebrand_join_seconds` | histogram | from a channel's join starting (its [`Channel::join`](crate::Channel::join) called) to its `ok` reply queued |
//! | `firebrand_broadcast_queue_seconds` | histogram | time to queue one broadcast to this node's subscribers |
//!
//! The names are global: with several endpoints in one process, record one of them.

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};

use crate::Endpoint;

/// Registers the descriptions (help texts and units) of the endpoint's metrics with the
/// recorder installed now. Call it once, after installing the recorder.
pub fn describe() {
    for (name, help) in [
        ("firebrand_connections_opened_total", "Connections opened."),
        (
            "firebrand_connections_refused_total",
            "Connection requests refused, by reason.",
        ),
        ("firebrand_joins_total", "Channel joins answered ok."),
        (
            "firebrand_joins_refused_total",
            "Channel joins refused by the channel.",
        ),
        (
            "firebrand_channels_closed_total",
            "Joined channels that ended.",
        ),
        (
            "firebrand_messages_in_total",
            "Messages received from clients.",
        ),
        (
            "firebrand_messages_refused_total",
            "Client messages refused by the limits, by reason.",
        ),
        (
            "firebrand_frames_out_total",
            "Frames written to WebSocket clients.",
        ),
        (
            "firebrand_writes_out_total",
            "Writes to WebSocket clients (each of every frame queued to its connection).",
        ),
        (
            "firebrand_broadcasts_total",
            "Broadcasts dispatched on this node.",
        ),
        (
            "firebrand_deliveries_total",
            "Frames queued to connections by broadcasts.",
        ),
        (
            "firebrand_slow_consumers_total",
            "Connections closed for not keeping up.",
        ),
        (
            "firebrand_protocol_errors_total",
            "Connections closed for undecodable frames.",
        ),
        (
            "firebrand_cluster_received_total",
            "Messages received from other nodes.",
        ),
        (
            "firebrand_cluster_lost_total",
            "Messages the cluster adapter could not send.",
        ),
        (
            "firebrand_cluster_rejected_total",
            "Messages from other nodes dropped.",
        ),
        (
            "firebrand_history_evictions_total",
            "History entries evicted to keep within the budget.",
        ),
        (
            "firebrand_cluster_stalls_total",
            "Stalls of the cluster engine link noticed (this node's own messages not coming back).",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_counter!(
        "firebrand_bytes_out_total",
        Unit::Bytes,
        "Bytes written to WebSocket clients."
    );
    describe_gauge!(
        "firebrand_history_bytes",
        Unit::Bytes,
        "Bytes the recoverable topics' histories hold."
    );
    for (name, help) in [
        ("firebrand_connections", "Open connections."),
        ("firebrand_channels", "Channels joined now."),
        ("firebrand_topics", "Topics with a subscriber on this node."),
        ("firebrand_presences", "Presence entries tracked."),
        ("firebrand_draining", "1 while the endpoint drains."),
        (
            "firebrand_cluster_ready",
            "1 while the cluster engine is reachable.",
        ),
    ] {
        describe_gauge!(name, help);
    }
    describe_histogram!(
        "firebrand_join_seconds",
        Unit::Seconds,
        "Time from a join starting to its ok reply."
    );
    describe_histogram!(
        "firebrand_broadcast_queue_seconds",
        Unit::Seconds,
        "Time to queue one broadcast to the local subscribers."
    );
}

/// Publishes `endpoint`'s [`Stats`](crate::Stats) into the recorder installed now: counters
/// set with their absolute values, gauges with theirs. Call it before each scrape renders.
pub fn record(endpoint: &Endpoint) {
    let s = endpoint.stats();
    let counters = [
        ("firebrand_connections_opened_total", s.connections_opened),
        ("firebrand_joins_total", s.joins),
        ("firebrand_joins_refused_total", s.joins_refused),
        ("firebrand_channels_closed_total", s.channels_closed),
        ("firebrand_messages_in_total", s.messages_in),
        ("firebrand_frames_out_total", s.frames_out),
        ("firebrand_bytes_out_total", s.bytes_out),
        ("firebrand_writes_out_total", s.writes_out),
        ("firebrand_broadcasts_total", s.broadcasts),
        ("firebrand_deliveries_total", s.deliveries),
        ("firebrand_slow_consumers_total", s.slow_consumers),
        ("firebrand_protocol_errors_total", s.protocol_errors),
        ("firebrand_cluster_received_total", s.cluster_received),
        ("firebrand_cluster_lost_total", s.cluster_lost),
        ("firebrand_cluster_rejected_total", s.cluster_rejected),
        ("firebrand_history_evictions_total", s.history_evictions),
        ("firebrand_cluster_stalls_total", s.cluster_stalls),
    ];
    for (name, value) in counters {
        counter!(name).absolute(value);
    }
    for (reason, value) in [
        ("origin", s.refused_origin),
        ("vsn", s.refused_vsn),
        ("connect", s.refused_connect),
        ("draining", s.refused_draining),
    ] {
        counter!("firebrand_connections_refused_total", "reason" => reason).absolute(value);
    }
    for (reason, value) in [
        ("rate_limited", s.rate_limited),
        ("payload_too_large", s.payloads_too_large),
        ("topic_too_long", s.topics_too_long),
        ("replies_refused", s.replies_refused),
    ] {
        counter!("firebrand_messages_refused_total", "reason" => reason).absolute(value);
    }
    let channels = s.joins.saturating_sub(s.channels_closed);
    gauge!("firebrand_connections").set(s.connections as f64);
    gauge!("firebrand_channels").set(channels as f64);
    gauge!("firebrand_topics").set(s.topics as f64);
    gauge!("firebrand_presences").set(s.presences as f64);
    gauge!("firebrand_history_bytes").set(s.history_bytes as f64);
    gauge!("firebrand_draining").set(if endpoint.is_draining() { 1.0 } else { 0.0 });
    gauge!("firebrand_cluster_ready").set(if endpoint.cluster_ready() { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use crate::Endpoint;

    /// Renders what [`super::record`] publishes, through the Prometheus exporter.
    fn render(endpoint: &Endpoint) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            super::describe();
            super::record(endpoint);
        });
        handle.render()
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn record_publishes_the_stats() {
        let endpoint = Endpoint::new();
        endpoint.broadcast("room:1", "new", crate::Payload::empty());
        endpoint.broadcast("room:2", "new", crate::Payload::empty());
        let text = render(&endpoint);
        assert_eq!(value(&text, "firebrand_broadcasts_total"), 2.0);
        assert_eq!(value(&text, "firebrand_connections"), 0.0);
        assert_eq!(value(&text, "firebrand_draining"), 0.0);
        assert_eq!(
            value(
                &text,
                "firebrand_connections_refused_total{reason=\"draining\"}"
            ),
            0.0
        );
        assert!(text.contains("# HELP firebrand_joins_total Channel joins answered ok."));
        assert!(text.contains("# TYPE firebrand_joins_total counter"));

        assert_eq!(value(&text, "firebrand_history_bytes"), 0.0);
        assert_eq!(value(&text, "firebrand_history_evictions_total"), 0.0);

        endpoint.shutdown(std::time::Duration::ZERO).await;
        let text = render(&endpoint);
        assert_eq!(value(&text, "firebrand_draining"), 1.0);
    }

    #[tokio::test]
    async fn record_publishes_the_history_budget_s_evictions() {
        let endpoint = Endpoint::builder()
            .history("stream:*", 100, std::time::Duration::from_secs(60))
            .history_budget(2000)
            .build();
        for n in 0..10 {
            endpoint.broadcast("stream:a", "new", serde_json::json!({ "n": n }));
        }
        let stats = endpoint.stats();
        assert!(stats.history_evictions > 0 && stats.history_bytes <= 2000);
        let text = render(&endpoint);
        assert_eq!(
            value(&text, "firebrand_history_evictions_total"),
            stats.history_evictions as f64
        );
        assert_eq!(
            value(&text, "firebrand_history_bytes"),
            stats.history_bytes as f64
        );
        assert!(text.contains("# TYPE firebrand_history_bytes gauge"));
    }
}
