//! Operations endpoints: `GET /health`, `GET /ready` and `GET /metrics`, without the API key
//! (they tell nothing about users; keep them off the public internet if you prefer, with your
//! load balancer's rules).
//!
//! - `GET /health`: `200 {"status": "ok"}` while the process serves (a liveness probe).
//! - `GET /ready`: `200 {"ready": true}`, or `503 {"ready": false, "reason": "draining"}` once
//!   SIGTERM has started the drain (the server keeps listening during the drain, new sockets
//!   refused with 503, so that a load balancer sees the node leave), or `503 {"ready": false,
//!   "reason": "cluster engine unreachable"}` while the Redis or NATS adapter has lost its
//!   engine (`firebrand::Endpoint::cluster_ready`), or `503 {"ready": false, "reason":
//!   "outbox unreachable", "error": "<why>"}` while the `[outbox]` consumer is not connected
//!   to its database (at start, until it first connects, and after it lost the connection,
//!   until it is back). The server serves meanwhile; the consumer connects as soon as it can.
//! - `GET /metrics` (with `[server] metrics = true`, the default): the Prometheus text format,
//!   rendered by `metrics-exporter-prometheus`. The endpoint's counters are published at each
//!   scrape (see `firebrand::metrics` for their meaning):
//!
//! | name | type |
//! | --- | --- |
//! | `firebrand_connections`, `firebrand_channels`, `firebrand_topics`, `firebrand_presences`, `firebrand_draining`, `firebrand_cluster_ready` | gauge |
//! | `firebrand_connections_opened_total`, `firebrand_connections_refused_total{reason}` (`origin`, `vsn`, `connect`, `draining`) | counter |
//! | `firebrand_joins_total`, `firebrand_joins_refused_total`, `firebrand_channels_closed_total` | counter |
//! | `firebrand_messages_in_total`, `firebrand_messages_refused_total{reason}` (`rate_limited`, `payload_too_large`, `topic_too_long`, `replies_refused`) | counter |
//! | `firebrand_frames_out_total`, `firebrand_bytes_out_total`, `firebrand_writes_out_total` | counter |
//! | `firebrand_broadcasts_total`, `firebrand_deliveries_total`, `firebrand_slow_consumers_total`, `firebrand_protocol_errors_total` | counter |
//! | `firebrand_cluster_received_total`, `firebrand_cluster_lost_total`, `firebrand_cluster_rejected_total` | counter |
//! | `firebrand_join_seconds`, `firebrand_broadcast_queue_seconds` | histogram |
//! | `firebrand_webhooks_sent_total`, `firebrand_webhooks_lost_total{reason}` (`queue_full`, `failed`): see [`webhooks`](crate::webhooks) | counter |
//! | `firebrand_backend_calls_refused_total{call}` (`connect`, `join`, `push`): see [`backend`](crate::backend) | counter |
//! | `firebrand_outbox_rows_delivered_total`, `firebrand_outbox_rows_set_aside_total` (with an `[outbox]`) | counter |
//! | `firebrand_outbox_lag_rows`, `firebrand_outbox_lag_seconds`, `firebrand_outbox_connected` (with an `[outbox]`) | gauge |

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;

use firebrand::Endpoint;
use firebrand_postgres::Running;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;

/// The latency histograms' buckets, in seconds.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Clone)]
struct Ops {
    endpoint: Endpoint,
    metrics: Option<PrometheusHandle>,
    outbox: Option<Arc<Running>>,
}

/// The routes `/health`, `/ready` and, with `metrics`, `/metrics`.
pub fn router(endpoint: Endpoint, metrics: bool) -> Router {
    router_with(endpoint, metrics, None)
}

/// [`router`], with the running outbox consumer's state in `/ready` and `/metrics`.
pub(crate) fn router_with(
    endpoint: Endpoint,
    metrics: bool,
    outbox: Option<Arc<Running>>,
) -> Router {
    let metrics = metrics.then(prometheus).flatten();
    let router = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready));
    let router = if metrics.is_some() {
        router.route("/metrics", get(render))
    } else {
        router
    };
    router.with_state(Ops {
        endpoint,
        metrics,
        outbox,
    })
}

/// The process's Prometheus recorder, installed on first use (`None` if another recorder was
/// installed before).
fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .and_then(PrometheusBuilder::install_recorder);
            let handle = match installed {
                Ok(handle) => handle,
                Err(e) => {
                    tracing::warn!(error = %e, "no /metrics: cannot install the Prometheus recorder");
                    return None;
                }
            };
            firebrand::metrics::describe();
            crate::webhooks::describe();
            crate::backend::describe();
            describe_outbox();
            // Folds the histograms' samples in between scrapes (bounded memory unscraped).
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let upkeep = handle.clone();
                runtime.spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        upkeep.run_upkeep();
                    }
                });
            }
            Some(handle)
        })
        .clone()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn ready(State(ops): State<Ops>) -> Response {
    let reason = if ops.endpoint.is_draining() {
        "draining"
    } else if !ops.endpoint.cluster_ready() {
        "cluster engine unreachable"
    } else if let Some(outbox) = ops.outbox.as_ref().filter(|o| !o.is_connected()) {
        let error = outbox
            .last_error()
            .unwrap_or_else(|| "connecting".to_owned());
        let body = json!({"ready": false, "reason": "outbox unreachable", "error": error});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    } else {
        return axum::Json(json!({"ready": true})).into_response();
    };
    let body = json!({"ready": false, "reason": reason});
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

async fn render(State(ops): State<Ops>) -> Response {
    let Some(handle) = &ops.metrics else {
        return StatusCode::NOT_FOUND.into_response();
    };
    firebrand::metrics::record(&ops.endpoint);
    if let Some(outbox) = &ops.outbox {
        record_outbox(outbox);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// Describes the outbox's metrics (once, with the recorder).
fn describe_outbox() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "firebrand_outbox_rows_delivered_total",
        "outbox rows handed to this node's subscribers"
    );
    describe_counter!(
        "firebrand_outbox_rows_set_aside_total",
        "outbox rows not sent (empty topic, reserved event, payload too large), kept in <table>_set_aside"
    );
    describe_gauge!(
        "firebrand_outbox_lag_rows",
        "outbox rows committed and not yet handed, at the last read"
    );
    describe_gauge!(
        "firebrand_outbox_lag_seconds",
        "age of the oldest outbox row not yet handed, at the last read (0 when caught up)"
    );
    describe_gauge!(
        "firebrand_outbox_connected",
        "1 while the outbox consumer is connected to its database, else 0"
    );
}

/// Publishes the outbox consumer's counters (absolute values) before a scrape.
fn record_outbox(outbox: &Running) {
    let stats = outbox.stats();
    metrics::counter!("firebrand_outbox_rows_delivered_total").absolute(stats.delivered);
    metrics::counter!("firebrand_outbox_rows_set_aside_total").absolute(stats.set_aside);
    metrics::gauge!("firebrand_outbox_lag_rows").set(stats.lag_rows as f64);
    metrics::gauge!("firebrand_outbox_lag_seconds").set(stats.lag_seconds);
    metrics::gauge!("firebrand_outbox_connected").set(if outbox.is_connected() {
        1.0
    } else {
        0.0
    });
}
