//! `outbox`: broadcast from the database (firebrand-server's `[outbox]`, issue 25) against
//! `POST /api/publish` of the same messages, in one run, on one firebrand-server
//! (`--server-bin`) and the PostgreSQL at `FIREBRAND_BENCH_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`; the table `fb_bench_outbox` is dropped and made
//! again). `--subs` subscribers (10) on a topic of the outbox's namespace and as many on a topic
//! of a plain namespace with the same history:
//!
//! - **rate**: `--rows` rows (100,000) committed as fast as this generator can (four
//!   connections, 500 rows per transaction); rows per second delivered to every subscriber,
//!   beside the rate the rows were committed at (a delivery rate equal to it is the
//!   generator's limit, not the server's);
//! - **paced**: `--rate` rows per second (2,000) for `--secs` (10), one transaction per row
//!   from four connections, each row stamped just before its `INSERT` is sent (so the latency
//!   includes the insert and the commit), then the same messages through `POST /api/publish`
//!   (pipelined, one request per message, stamped before sending): latency p50/p99 to the
//!   subscribers, and the server's CPU per message for each path.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls};

use crate::stats::{Hist, cpu_ns, now_ns};
use crate::ws::{Ws, stamp};
use crate::{Opts, Trigger, fmt, payload, spawn_listening};

const TABLE: &str = "fb_bench_outbox";
const OUTBOX_TOPIC: &str = "bench:outbox";
const PUBLISH_TOPIC: &str = "plain:publish";
/// Writer connections.
const WRITERS: usize = 4;
/// Rows per transaction in the rate phase.
const BATCH: u64 = 500;

fn pg_url() -> String {
    std::env::var("FIREBRAND_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn connect_pg(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("PostgreSQL at {url} (FIREBRAND_BENCH_POSTGRES_URL)"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// firebrand-server with the outbox on, killed when dropped.
struct OutboxServer {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for OutboxServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl OutboxServer {
    async fn start(o: &Opts, url: &str) -> anyhow::Result<OutboxServer> {
        if !o.server_bin.exists() {
            bail!(
                "firebrand-server binary not found at {} (cargo build --release -p firebrand-server, or --server-bin PATH)",
                o.server_bin.display()
            );
        }
        let dir =
            std::env::temp_dir().join(format!("firebrand-bench-outbox-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("firebrand.toml");
        let history = "history = { size = 200000, max_age_ms = 600000 }";
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nmetrics = true\n\n\
                 [outbox]\npostgres_url = \"{url}\"\ntable = \"{TABLE}\"\n\n\
                 [[namespace]]\nprefix = \"bench:\"\n{history}\noutbox = true\n\n\
                 [[namespace]]\nprefix = \"plain:\"\n{history}\n"
            ),
        )?;
        let mut cmd = Command::new(&o.server_bin);
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env_remove("FIREBRAND_CONFIG")
            .env_remove("FIREBRAND_LISTEN");
        let (child, addr) = spawn_listening(cmd, o)?;
        let server = OutboxServer { child, addr, dir };
        // Ready once the outbox is connected and installed.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if status(server.addr, "/ready").await? == 200 {
                break;
            }
            if Instant::now() > deadline {
                bail!("firebrand-server not ready in 15 s (is PostgreSQL at {url} reachable?)");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }
}

/// What the subscribers of one topic saw: deliveries, the last one's time, latencies.
#[derive(Default)]
struct Seen {
    delivered: AtomicU64,
    last_ns: AtomicU64,
    hist: Mutex<Hist>,
}

/// `n` subscribers of `topic`, counting `bench` frames and recording their latency (µs, from
/// the payload's stamp) until the set is dropped.
async fn subscribe(
    addr: SocketAddr,
    topic: &str,
    n: usize,
    seen: Arc<Seen>,
) -> anyhow::Result<JoinSet<()>> {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let mut ws = Ws::connect_join(addr, topic)
            .await
            .with_context(|| format!("join {topic}"))?;
        let seen = seen.clone();
        tasks.spawn(async move {
            let mut local = Vec::new();
            loop {
                let mut count = 0;
                let alive = ws
                    .drain(|op, d| {
                        if op == 1 && memchr::memmem::find(d, br#","bench","#).is_some() {
                            count += 1;
                            if let Some(t) = stamp(d) {
                                local.push(now_ns().saturating_sub(t) / 1000);
                            }
                        }
                    })
                    .await;
                if count > 0 {
                    seen.delivered.fetch_add(count, Ordering::Relaxed);
                    seen.last_ns.fetch_max(now_ns(), Ordering::Relaxed);
                    let mut h = seen.hist.lock().unwrap();
                    for v in local.drain(..) {
                        h.record(v);
                    }
                }
                if !matches!(alive, Ok(true)) {
                    return;
                }
            }
        });
    }
    Ok(tasks)
}

/// Waits until `seen` has `want` deliveries, or `within` passes; the deliveries it has.
async fn until_delivered(seen: &Seen, want: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let have = seen.delivered.load(Ordering::Relaxed);
        if have >= want || Instant::now() > deadline {
            return have;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) async fn outbox(o: &Opts) -> anyhow::Result<()> {
    let url = pg_url();
    let db = connect_pg(&url).await?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE}, {TABLE}_meta, {TABLE}_set_aside CASCADE;
         DROP SEQUENCE IF EXISTS {TABLE}_seq;
         DROP FUNCTION IF EXISTS {TABLE}_sequence() CASCADE;
         CREATE TABLE {TABLE} (
           id         bigserial   PRIMARY KEY,
           topic      text        NOT NULL,
           event      text        NOT NULL,
           payload    jsonb       NOT NULL DEFAULT '{{}}',
           created_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let server = OutboxServer::start(o, &url).await?;
    let subs = o
        .subs
        .as_ref()
        .and_then(|s| s.first().copied())
        .unwrap_or(10);
    let rows = o.rows.unwrap_or(100_000);
    let rate = o.rate.unwrap_or(2000);
    let secs = o.secs.unwrap_or(10);
    let outbox_seen = Arc::new(Seen::default());
    let publish_seen = Arc::new(Seen::default());
    let _outbox_subs = subscribe(server.addr, OUTBOX_TOPIC, subs, outbox_seen.clone()).await?;
    let _publish_subs = subscribe(server.addr, PUBLISH_TOPIC, subs, publish_seen.clone()).await?;
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        writers.push(Arc::new(connect_pg(&url).await?));
    }
    println!(
        "outbox: firebrand-server {} with PostgreSQL at {url}; {subs} subscribers per topic",
        server.addr
    );

    // Rate: rows committed as fast as the writers can.
    let cpu0 = cpu_ns(server_pid(&server));
    let start = now_ns();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let pad = "x".repeat(100);
    for db in &writers {
        let (db, next, pad) = (db.clone(), next.clone(), pad.clone());
        tasks.spawn(async move {
            let insert = format!(
                "INSERT INTO {TABLE} (topic, event, payload) \
                 SELECT '{OUTBOX_TOPIC}', 'bench', jsonb_build_object('i', g, 'p', $2::text) \
                 FROM generate_series(1, $1::bigint) g"
            );
            loop {
                let at = next.fetch_add(BATCH, Ordering::Relaxed);
                if at >= rows {
                    return Ok::<_, tokio_postgres::Error>(());
                }
                let n = BATCH.min(rows - at) as i64;
                db.execute(&insert, &[&n, &pad]).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let committed_ns = now_ns() - start;
    let want = rows * subs as u64;
    let have = until_delivered(&outbox_seen, want, Duration::from_secs(120)).await;
    if have < want {
        bail!("rate: {have} of {want} deliveries in 120 s");
    }
    let delivered_ns = outbox_seen.last_ns.load(Ordering::Relaxed) - start;
    let cpu = cpu_ns(server_pid(&server)) - cpu0;
    println!(
        "  rate: {rows} rows ({} per transaction, {WRITERS} writers) committed in {} ms ({} rows/s); \
         delivered to all {subs} subscribers in {} ms: {} rows/s; server CPU {} µs per row",
        BATCH,
        committed_ns / 1_000_000,
        fmt(rows as f64 / (committed_ns as f64 / 1e9)),
        delivered_ns / 1_000_000,
        fmt(rows as f64 / (delivered_ns as f64 / 1e9)),
        fmt(cpu as f64 / rows as f64 / 1e3),
    );
    drop(std::mem::take(&mut *outbox_seen.hist.lock().unwrap()));
    outbox_seen.delivered.store(0, Ordering::Relaxed);

    // Paced: the outbox, then /api/publish, at the same rate.
    let total = rate * secs;
    let cpu0 = cpu_ns(server_pid(&server));
    let sent = paced(rate, total, &writers).await?;
    let have = until_delivered(&outbox_seen, sent * subs as u64, Duration::from_secs(30)).await;
    let outbox_cpu = cpu_ns(server_pid(&server)) - cpu0;
    let outbox_hist = std::mem::take(&mut *outbox_seen.hist.lock().unwrap());

    let cpu0 = cpu_ns(server_pid(&server));
    let published = paced_publish(server.addr, rate, total).await?;
    let have_p = until_delivered(
        &publish_seen,
        published * subs as u64,
        Duration::from_secs(30),
    )
    .await;
    let publish_cpu = cpu_ns(server_pid(&server)) - cpu0;
    let publish_hist = std::mem::take(&mut *publish_seen.hist.lock().unwrap());

    println!("  paced, {rate} messages/s for {secs} s to {subs} subscribers:");
    println!(
        "  {:<16} {:>9} {:>11} {:>9} {:>9} {:>16}",
        "path", "sent", "delivered", "p50 ms", "p99 ms", "CPU µs/message"
    );
    for (name, sent, have, hist, cpu) in [
        ("outbox (commit)", sent, have, &outbox_hist, outbox_cpu),
        (
            "/api/publish",
            published,
            have_p,
            &publish_hist,
            publish_cpu,
        ),
    ] {
        println!(
            "  {:<16} {:>9} {:>11} {:>9} {:>9} {:>16}",
            name,
            sent,
            have,
            fmt(hist.quantile(0.5) as f64 / 1e3),
            fmt(hist.quantile(0.99) as f64 / 1e3),
            fmt(cpu as f64 / sent as f64 / 1e3),
        );
    }
    println!(
        "  outbox/publish: CPU per message {}x, p99 {}x",
        fmt(outbox_cpu as f64 / sent as f64 / (publish_cpu as f64 / published as f64)),
        fmt(outbox_hist.quantile(0.99) as f64 / publish_hist.quantile(0.99).max(1) as f64),
    );
    if have < sent * subs as u64 || have_p < published * subs as u64 {
        bail!("paced: deliveries missing (outbox {have}, publish {have_p})");
    }
    db.batch_execute(&format!("TRUNCATE {TABLE}")).await?;
    Ok(())
}

fn server_pid(server: &OutboxServer) -> u32 {
    server.child.id()
}

/// `rate` rows per second, one per transaction, handed to the writers in turn, `total` in all,
/// each stamped just before its `INSERT` is sent. Returns the rows committed.
async fn paced(rate: u64, total: u64, writers: &[Arc<Client>]) -> anyhow::Result<u64> {
    let mut queues = Vec::new();
    let mut tasks = JoinSet::new();
    for db in writers {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        queues.push(tx);
        let db = db.clone();
        tasks.spawn(async move {
            let insert = format!(
                "INSERT INTO {TABLE} (topic, event, payload) VALUES ('{OUTBOX_TOPIC}', 'bench', $1::text::jsonb)"
            );
            let statement = db.prepare(&insert).await?;
            let mut done = 0u64;
            while rx.recv().await.is_some() {
                db.execute(&statement, &[&payload(OUTBOX_TOPIC)]).await?;
                done += 1;
            }
            Ok::<_, anyhow::Error>(done)
        });
    }
    let mut turn = 0;
    pace(rate, total, || {
        turn = (turn + 1) % queues.len();
        let _ = queues[turn].send(());
    })
    .await;
    drop(queues);
    let mut done = 0;
    while let Some(n) = tasks.join_next().await {
        done += n??;
    }
    Ok(done)
}

/// The same messages through `POST /api/publish`: requests written at `rate`, their answers
/// read by another task. Returns the messages published.
async fn paced_publish(addr: SocketAddr, rate: u64, total: u64) -> anyhow::Result<u64> {
    let mut trigger = Trigger::with_path(addr, "/api/publish").await?;
    let mut sent = 0u64;
    let start = Instant::now();
    while sent < total {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let n = due.min(total) - sent;
        if n > 0 {
            trigger.burst(PUBLISH_TOPIC, "bench", n as usize).await?;
            sent += n;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(sent)
}

/// Calls `send` as `rate` per second says, `total` times.
async fn pace(rate: u64, total: u64, mut send: impl FnMut()) {
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            send();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The status of `GET path`.
async fn status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let response = crate::history::http_get(addr.port(), path).await?;
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path}: {response}"))
}
