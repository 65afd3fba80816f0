//! `history-cost`: what recovery costs in a cluster, on each engine, beside an ordinary topic in
//! the same run. Starts an engine of its own (`redis-server`, or `nats-server -js` with its
//! monitoring port, so that its counters are this run's alone) and two conformance nodes on it.
//! For a `room:` topic and a `stream:` (recoverable) topic in turn:
//!
//! - **rate**: one client pushes `new_msg` on node 0 as fast as it can (`--bursts` × 1,000 frames,
//!   128-byte payloads) while a subscriber on node 1 counts them: broadcasts per second that one
//!   topic sustains end to end, and whether every one arrived once, in order;
//! - **engine cost per broadcast**: the engine's own counters before and after (Redis: commands
//!   run and bytes in/out from `INFO`; NATS: messages and bytes in/out from `/varz`);
//! - **memory per kept message**: the engine's memory (Redis `used_memory`, NATS `/jsz` storage)
//!   and node 1's RSS (its ring: node 1 only forwards to one subscriber) after the run, over the
//!   messages kept;
//! - **memory per topic**: 2,000 more topics get one broadcast each (`POST /api/broadcast`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cluster::{Cluster, Engine, redis_info};
use crate::stats::rss_kib;
use crate::ws::{Ws, client_frame};
use crate::{Opts, Trigger, fmt};

/// An engine server of this run's own (killed when dropped).
struct OwnEngine {
    child: Child,
    url: String,
    /// NATS' monitoring port.
    monitor: Option<u16>,
    dir: std::path::PathBuf,
}

impl Drop for OwnEngine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl OwnEngine {
    async fn start(engine: Engine) -> anyhow::Result<OwnEngine> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("firebrand-bench-engine-{port}"));
        std::fs::create_dir_all(&dir)?;
        let (child, url, monitor) = match engine {
            Engine::Redis => {
                let child = Command::new("redis-server")
                    .args([
                        "--port",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                    ])
                    .args(["--appendonly", "no", "--dir", &dir.display().to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .context("cannot start redis-server (is it installed?)")?;
                (child, format!("redis://127.0.0.1:{port}"), None)
            }
            Engine::Nats => {
                let monitor = free_port()?;
                let child = Command::new(nats_server())
                    .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                    .args([
                        "-m",
                        &monitor.to_string(),
                        "-js",
                        "-sd",
                        &dir.display().to_string(),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("cannot start nats-server (is it installed?)")?;
                (child, format!("nats://127.0.0.1:{port}"), Some(monitor))
            }
        };
        let e = OwnEngine {
            child,
            url,
            monitor,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("{} did not listen on {port} within 10 s", engine.name());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(e)
    }

    /// The counters this scenario reads: `(commands or messages in, bytes in, bytes out,
    /// memory or storage bytes)`.
    async fn counters(&self) -> anyhow::Result<[u64; 4]> {
        match self.monitor {
            None => {
                let port = self.url.rsplit(':').next().unwrap_or_default();
                let info = redis_info(&format!("127.0.0.1:{port}"), "all").await?;
                let field = |name: &str| -> u64 {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0)
                };
                // Commands: every cmdstat line's calls.
                let calls: u64 = info
                    .lines()
                    .filter(|l| l.starts_with("cmdstat_"))
                    .filter_map(|l| {
                        l.split("calls=")
                            .nth(1)?
                            .split(',')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .sum();
                Ok([
                    calls,
                    field("total_net_input_bytes"),
                    field("total_net_output_bytes"),
                    field("used_memory"),
                ])
            }
            Some(m) => {
                let varz = http_get(m, "/varz").await?;
                let jsz = http_get(m, "/jsz").await?;
                let num = |doc: &str, key: &str| -> u64 {
                    let k = format!("\"{key}\":");
                    doc.find(&k)
                        .and_then(|i| {
                            let rest = doc[i + k.len()..].trim_start();
                            let end = rest
                                .find(|c: char| !c.is_ascii_digit())
                                .unwrap_or(rest.len());
                            rest[..end].parse().ok()
                        })
                        .unwrap_or(0)
                };
                Ok([
                    num(&varz, "in_msgs") + num(&varz, "out_msgs"),
                    num(&varz, "in_bytes"),
                    num(&varz, "out_bytes"),
                    num(&jsz, "storage"),
                ])
            }
        }
    }
}

fn nats_server() -> &'static str {
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// `GET path` from the server on 127.0.0.1:`port`: the whole response.
pub(crate) async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// What one topic kind measured.
struct Measured {
    rate: f64,
    in_order: bool,
    per_broadcast: [f64; 3],
    engine_mem_per_kept: f64,
    rss_per_kept: f64,
    engine_mem_per_topic: f64,
    rss_per_topic: f64,
}

/// Pushes `n` broadcasts on `topic` from node 0 and counts them on node 1.
async fn measure(o: &Opts, engine: &OwnEngine, topic: &str, n: u64) -> anyhow::Result<Measured> {
    let env = [
        (
            if o.engine == Engine::Redis {
                "REDIS_URL"
            } else {
                "NATS_URL"
            },
            engine.url.clone(),
        ),
        ("STREAM_HISTORY", n.max(1000).to_string()),
    ];
    let cluster = Cluster::start(o, 2, &env).await?;
    let (a, b): (SocketAddr, SocketAddr) = (cluster.nodes[0].addr, cluster.nodes[1].addr);
    let mut sub = Ws::connect_join(b, topic).await?;
    let mut publisher = Ws::connect_join(a, topic).await?;
    // Let the join's history read (and the engine's first writes) settle before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rss_kib(cluster.nodes[1].pid);
    let before = engine.counters().await?;
    let pad = "x".repeat(100);
    let t0 = Instant::now();
    let progress = std::sync::Arc::new((
        std::sync::atomic::AtomicU64::new(0),
        tokio::sync::Notify::new(),
    ));
    let seen = progress.clone();
    let reader = tokio::spawn(async move {
        let (mut next, mut in_order) = (1u64, true);
        while next <= n {
            seen.0.store(next - 1, std::sync::atomic::Ordering::Relaxed);
            seen.1.notify_one();
            while let Some((op, r)) = sub.next_frame() {
                let d = sub.data(r);
                if op == 1 && memmem::find(d, b"\"new_msg\"").is_some() {
                    let i = memmem::find(d, b"\"n\":").map(|i| i + 4).unwrap_or(d.len());
                    let end = d[i..].iter().position(|c| !c.is_ascii_digit()).unwrap_or(0);
                    let got: u64 = std::str::from_utf8(&d[i..i + end])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    in_order &= got == next;
                    next += 1;
                }
            }
            if next <= n && !sub.fill().await? {
                bail!("the subscriber was closed after {} of {n}", next - 1);
            }
        }
        anyhow::Ok((Instant::now(), in_order))
    });
    // At most WINDOW in flight: the pushing channel's mailbox (1,024) and the node's queue to the
    // engine (16,384) are bounded, and what overflows them is refused or dropped by design.
    const WINDOW: u64 = 500;
    let mut frames = Vec::new();
    for i in 1..=n {
        while i > WINDOW && progress.0.load(std::sync::atomic::Ordering::Relaxed) < i - WINDOW {
            if tokio::time::timeout(Duration::from_secs(60), progress.1.notified())
                .await
                .is_err()
            {
                bail!("{topic}: no progress for 60 s");
            }
        }
        let text = format!(r#"["1",null,"{topic}","new_msg",{{"n":{i},"pad":"{pad}"}}]"#);
        client_frame(&mut frames, 1, text.as_bytes());
        if i % 100 == 0 || i == n || i % WINDOW == 0 {
            publisher.send_raw(&frames).await?;
            frames.clear();
            // The publisher gets its own broadcasts too: read them away, so that it is not
            // closed as a slow consumer.
            while let Ok(read) = tokio::time::timeout(Duration::ZERO, publisher.fill()).await {
                if !read? {
                    bail!("{topic}: the publisher was closed");
                }
                while publisher.next_frame().is_some() {}
                publisher.shrink();
            }
        }
    }
    let (done, in_order) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .with_context(|| {
            let got = progress.0.load(std::sync::atomic::Ordering::Relaxed);
            format!("{topic}: the subscriber got {got} of {n} broadcasts in 60 s")
        })???;
    let rate = n as f64 / (done - t0).as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = engine.counters().await?;
    let rss1 = rss_kib(cluster.nodes[1].pid);
    let per = |i: usize| after[i].saturating_sub(before[i]) as f64 / n as f64;
    // Topics: one broadcast each on TOPICS more.
    const TOPICS: u64 = 2000;
    let kind = topic.split(':').next().unwrap_or("room");
    let mut trig = Trigger::connect(a).await?;
    for t in 0..TOPICS {
        trig.broadcast(
            &format!("{kind}:cost-topic-{t}"),
            "new_msg",
            &format!(r#"{{"pad":"{pad}"}}"#),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = engine.counters().await?;
    let rss2 = rss_kib(cluster.nodes[1].pid);
    Ok(Measured {
        rate,
        in_order,
        per_broadcast: [per(0), per(1), per(2)],
        engine_mem_per_kept: after[3].saturating_sub(before[3]) as f64 / n as f64,
        rss_per_kept: (rss1.saturating_sub(rss0) * 1024) as f64 / n as f64,
        engine_mem_per_topic: later[3].saturating_sub(after[3]) as f64 / TOPICS as f64,
        rss_per_topic: (rss2.saturating_sub(rss1) * 1024) as f64 / TOPICS as f64,
    })
}

pub(crate) async fn history_cost(o: &Opts) -> anyhow::Result<()> {
    let n = (o.bursts.max(1) * 1000) as u64;
    let engine = OwnEngine::start(o.engine).await?;
    let room = measure(o, &engine, "room:cost", n).await?;
    let stream = measure(o, &engine, "stream:cost", n).await?;
    let (unit_cmd, what) = match o.engine {
        Engine::Redis => ("cmds", "Redis commands run"),
        Engine::Nats => ("msgs", "NATS messages in + out"),
    };
    println!(
        "\n== history-cost ({}: one topic, {n} pushes of 128 B payloads on node 0, a subscriber on node 1; then 2,000 topics with one broadcast each)",
        o.engine.name()
    );
    println!("{:<44} {:>14} {:>14}  unit", "metric", "room:", "stream:");
    let line =
        |m: &str, r: f64, s: f64, u: &str| println!("{m:<44} {:>14} {:>14}  {u}", fmt(r), fmt(s));
    line(
        "broadcasts/s one topic sustains (end to end)",
        room.rate,
        stream.rate,
        "msg/s",
    );
    line(
        &format!("{what} per broadcast"),
        room.per_broadcast[0],
        stream.per_broadcast[0],
        unit_cmd,
    );
    line(
        "engine bytes in per broadcast",
        room.per_broadcast[1],
        stream.per_broadcast[1],
        "B",
    );
    line(
        "engine bytes out per broadcast",
        room.per_broadcast[2],
        stream.per_broadcast[2],
        "B",
    );
    line(
        "engine memory per kept message",
        room.engine_mem_per_kept,
        stream.engine_mem_per_kept,
        "B",
    );
    line(
        "node RSS per kept message (its ring)",
        room.rss_per_kept,
        stream.rss_per_kept,
        "B",
    );
    line(
        "engine memory per topic (1 message each)",
        room.engine_mem_per_topic,
        stream.engine_mem_per_topic,
        "B",
    );
    line(
        "node RSS per topic (1 message each)",
        room.rss_per_topic,
        stream.rss_per_topic,
        "B",
    );
    let ordered = room.in_order && stream.in_order;
    println!(
        "SUMMARY history-cost: {}: one recoverable topic sustains {} broadcasts/s ({:.2}x an ordinary topic's {}); {} {unit_cmd} and {} B in + {} B out per broadcast at the engine (ordinary: {} and {} + {}); every broadcast delivered once{}",
        o.engine.name(),
        fmt(stream.rate),
        stream.rate / room.rate,
        fmt(room.rate),
        fmt(stream.per_broadcast[0]),
        fmt(stream.per_broadcast[1]),
        fmt(stream.per_broadcast[2]),
        fmt(room.per_broadcast[0]),
        fmt(room.per_broadcast[1]),
        fmt(room.per_broadcast[2]),
        if ordered {
            ", in order"
        } else {
            "; OUT OF ORDER"
        }
    );
    if !ordered {
        bail!("broadcasts arrived out of order");
    }
    Ok(())
}
