//! `conformance --port PORT`: serves the conformance app on 127.0.0.1:PORT.

/// jemalloc, not glibc's malloc: no header per allocation and finer size classes make an
/// idle joined connection 15% smaller (2.43 -> 2.07 KB at 19k, `firebrand-bench idle`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::time::Duration;

use anyhow::{Context, bail};
use firebrand_conformance::{Config, router};

fn parse_port() -> anyhow::Result<u16> {
    let mut port = 4000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let v = args.next().context("--port needs a value")?;
                port = v.parse().with_context(|| format!("invalid port {v:?}"))?;
            }
            "-h" | "--help" => {
                println!(
                    "usage: conformance [--port PORT]   (default 4000; env IDLE_TIMEOUT_MS, DRAIN_MS, BROADCAST_CONFIRM_MS, COMPRESS)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (usage: conformance [--port PORT])"),
        }
    }
    Ok(port)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let port = parse_port()?;
    let mut config = Config::default();
    if let Ok(ms) = std::env::var("IDLE_TIMEOUT_MS") {
        let ms: u64 = ms
            .parse()
            .with_context(|| format!("invalid IDLE_TIMEOUT_MS {ms:?}"))?;
        config.idle_timeout = Duration::from_millis(ms);
    }
    // COMPRESS=1: offer permessage-deflate (APP.md).
    // COMPRESS=per-connection (for firebrand-bench, not in APP.md): compressing, but each
    // connection compresses broadcasts itself, as Phoenix's context per connection does.
    config.compress = match std::env::var("COMPRESS").as_deref() {
        Ok("1") => true,
        Ok("per-connection") => {
            firebrand::benching::compress_per_connection(true);
            true
        }
        Ok("0") | Ok("") | Err(_) => false,
        Ok(v) => bail!("invalid COMPRESS {v:?} (1 or 0)"),
    };
    // REDIS_URL or NATS_URL: join a cluster through that engine (CLUSTER_NAMESPACE separates
    // clusters sharing one engine; default "conformance").
    let namespace = std::env::var("CLUSTER_NAMESPACE").unwrap_or_else(|_| "conformance".into());
    let ms = |name: &str, default: u64| -> anyhow::Result<Duration> {
        match std::env::var(name) {
            Ok(v) => Ok(Duration::from_millis(
                v.parse().with_context(|| format!("invalid {name} {v:?}"))?,
            )),
            Err(_) => Ok(Duration::from_millis(default)),
        }
    };
    // The long-poll window (default 10 s, as Phoenix).
    config.longpoll_window = ms("LONGPOLL_WINDOW_MS", 10_000)?;
    // In a cluster, a node not heard from for PRESENCE_DOWN_MS (default 5 s) has its presences
    // removed; nodes gossip presence every PRESENCE_HEARTBEAT_MS (default 1 s).
    // Stream topics keep STREAM_HISTORY broadcasts (default 1000) for STREAM_HISTORY_TTL_MS
    // (default 300 s).
    if let Ok(n) = std::env::var("STREAM_HISTORY") {
        config.stream_history = n
            .parse()
            .with_context(|| format!("invalid STREAM_HISTORY {n:?}"))?;
    }
    config.stream_history_ttl = ms("STREAM_HISTORY_TTL_MS", 300_000)?;
    // POST /api/broadcast waits up to BROADCAST_CONFIRM_MS (default 5 s) for the engine to
    // confirm a broadcast, then answers 202.
    config.broadcast_confirm = ms(
        "BROADCAST_CONFIRM_MS",
        firebrand_conformance::BROADCAST_CONFIRM.as_millis() as u64,
    )?;
    let builder = firebrand_conformance::endpoint(&config)
        .presence_heartbeat(ms("PRESENCE_HEARTBEAT_MS", 1000)?)
        .presence_down_after(ms("PRESENCE_DOWN_MS", 5000)?);
    let builder = if let Ok(url) = std::env::var("REDIS_URL") {
        let adapter = firebrand_redis::RedisAdapter::new(&url)
            .with_context(|| format!("invalid REDIS_URL {url:?}"))?;
        builder.adapter(adapter.namespace(&namespace))
    } else if let Ok(url) = std::env::var("NATS_URL") {
        builder.adapter(firebrand_nats::NatsAdapter::new(&url).namespace(&namespace))
    } else {
        builder
    };
    // CLUSTER_SECRET: node-to-node messages are authenticated with it (the same on every node);
    // without it, whoever can publish on the engine is trusted as a node.
    let builder = match std::env::var("CLUSTER_SECRET") {
        Ok(secret) if !secret.is_empty() => builder.cluster_secret(secret),
        _ => builder,
    };
    let endpoint = builder.build();
    let router = router(&config, &endpoint);
    let server = firebrand::Server::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    println!("listening on 127.0.0.1:{}", server.local_addr()?.port());
    // Like axum::serve, plus a deadline on handshakes and a large listen backlog (see
    // firebrand::Server).
    server.serve(router, shutdown_signal()).await?;
    // Drain: close the sockets (1012) in batches spread over DRAIN_MS (default 1 s), so that
    // clients reconnect gradually; give up on stragglers after 30 s.
    let period = match std::env::var("DRAIN_MS") {
        Ok(ms) => Duration::from_millis(
            ms.parse()
                .with_context(|| format!("invalid DRAIN_MS {ms:?}"))?,
        ),
        Err(_) => Duration::from_secs(1),
    };
    let open = endpoint.drain(period, Duration::from_secs(30)).await;
    if open > 0 {
        tracing::warn!(open, "connections still open at the shutdown deadline");
    }
    Ok(())
}
