//! `slow`: one client stops reading while broadcasts flow to its topic. Shows that the server's
//! memory stays bounded (the client's outbound queue is capped, then the client is closed with
//! 1008 "slow consumer", as documented) and that the other subscribers' latency does not change.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::stats::{Hist, rss_kib};
use crate::ws::Ws;
use crate::{Opts, Row, Server, Subs, Target, Trigger, payload, report_with};

/// Broadcasts `rate`/s for `secs` from `triggers` keep-alive connections; returns how many.
async fn flood(target: Target, topic: &str, rate: u64, secs: u64) -> anyhow::Result<u64> {
    const TRIGGERS: u64 = 4;
    let count = rate * secs;
    let t0 = tokio::time::Instant::now();
    let mut js = JoinSet::new();
    for k in 0..TRIGGERS {
        let topic = topic.to_owned();
        js.spawn(async move {
            let mut trig = Trigger::to(&target).await?;
            let mut sent = 0;
            for i in (k..count).step_by(TRIGGERS as usize) {
                tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate as f64))
                    .await;
                trig.broadcast(&topic, "bench", &payload(&topic)).await?;
                sent += 1;
            }
            anyhow::Ok(sent)
        });
    }
    let mut sent = 0;
    while let Some(r) = js.join_next().await {
        sent += r??;
    }
    Ok(sent)
}

/// The server's largest RSS (KiB) while `f` runs, sampled every 50 ms.
async fn max_rss_during<T>(pid: u32, f: impl std::future::Future<Output = T>) -> (T, u64) {
    let max = Arc::new(AtomicU64::new(rss_kib(pid)));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (max, done) = (max.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                max.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let out = f.await;
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    (out, max.load(Ordering::Relaxed))
}

/// One paced phase: (broadcasts, deliveries, latency histogram, max RSS KiB).
async fn phase(
    subs: &Subs,
    target: Target,
    topic: &str,
    rate: u64,
    secs: u64,
) -> anyhow::Result<(u64, u64, Hist, u64)> {
    subs.collect().await;
    subs.sink.reset();
    let (sent, max_rss) = max_rss_during(target.pid, async {
        let sent = flood(target, topic, rate, secs).await?;
        let joined = subs.sink.joined.load(Ordering::Relaxed);
        subs.wait_delivered(sent * joined).await;
        anyhow::Ok(sent)
    })
    .await;
    let sent = sent?;
    let delivered = subs.sink.delivered.load(Ordering::Relaxed);
    Ok((sent, delivered, subs.collect().await, max_rss))
}

pub(crate) async fn slow(o: &Opts) -> anyhow::Result<()> {
    let n = o
        .subs
        .as_ref()
        .and_then(|v| v.first().copied())
        .unwrap_or(50);
    let rate = o.rate.unwrap_or(10_000);
    let secs = o.secs.unwrap_or(10);
    let server = Server::start(o.target, o)?;
    let target = server.target();
    let topic = "room:slow";
    let subs = Subs::spawn(target.addr, n, |_| topic.to_string(), o);
    subs.wait_joined(Instant::now()).await?;
    let rss0 = rss_kib(target.pid);

    // Phase 1: every subscriber reads.
    let (sent1, got1, h1, max1) = phase(&subs, target, topic, rate, secs).await?;
    // Phase 2: the same, plus one subscriber that joined and never reads again.
    let mut stuck = Ws::connect_join(target.addr, topic).await?;
    let t_stuck = Instant::now();
    let (sent2, got2, h2, max2) = phase(&subs, target, topic, rate, secs).await?;
    let rss_end = rss_kib(target.pid);

    // The stuck client reads at last: everything the server had sent it, then its close.
    let mut close = None;
    let mut frames = 0u64;
    // Reads until the connection ends, or nothing more comes for 2 s.
    let mut ended = "nothing more came for 2 s (still open)";
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match tokio::time::timeout(Duration::from_secs(2), stuck.fill()).await {
                Err(_) => break,
                Ok(Ok(false)) => {
                    ended = "the server closed the connection";
                    break;
                }
                Ok(Err(_)) => {
                    ended = "the server reset the connection";
                    break;
                }
                Ok(Ok(true)) => {}
            }
            while let Some((op, r)) = stuck.next_frame() {
                frames += 1;
                if op == 8 {
                    let d = stuck.data(r);
                    close = Some((
                        u16::from_be_bytes([d[0], d[1]]),
                        String::from_utf8_lossy(&d[2..]).into_owned(),
                    ));
                }
            }
        }
    })
    .await;
    let stuck_secs = t_stuck.elapsed().as_secs_f64();
    drop(subs);

    let ms = |us: u64| us as f64 / 1000.0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let nan = f64::NAN;
    let rows = [
        Row {
            metric: "broadcasts sent".into(),
            fb: sent1 as f64,
            base: sent2 as f64,
            unit: "",
        },
        Row {
            metric: "deliveries to readers".into(),
            fb: got1 as f64,
            base: got2 as f64,
            unit: "",
        },
        Row {
            metric: "readers' p50 latency".into(),
            fb: ms(h1.quantile(0.5)),
            base: ms(h2.quantile(0.5)),
            unit: "ms",
        },
        Row {
            metric: "readers' p99 latency".into(),
            fb: ms(h1.quantile(0.99)),
            base: ms(h2.quantile(0.99)),
            unit: "ms",
        },
        Row {
            metric: "readers' max latency".into(),
            fb: ms(h1.max()),
            base: ms(h2.max()),
            unit: "ms",
        },
        Row {
            metric: "server max RSS".into(),
            fb: mib(max1),
            base: mib(max2),
            unit: "MiB",
        },
        Row {
            metric: "server RSS before phase 1 / after phase 2".into(),
            fb: mib(rss0),
            base: mib(rss_end),
            unit: "MiB",
        },
        Row {
            metric: "frames the stuck client finally read".into(),
            fb: frames as f64,
            base: nan,
            unit: "",
        },
    ];
    let outcome = match &close {
        Some((code, reason)) => format!("got close {code} {reason:?}; {ended}"),
        // The server's close frame waits behind the frames the client never read.
        None => format!("{ended}, without a close frame it could read"),
    };
    report_with(
        "slow",
        ["without", "with", "without/with"],
        &format!(
            "{n} readers + 1 client that stops reading, one topic, {rate} broadcasts/s for {secs} s per phase, 150-byte frames (columns: phase 1 without, phase 2 with the stuck client)"
        ),
        &rows,
        format!(
            "stuck client: {outcome} (read {frames} of {sent2} frames, {stuck_secs:.1} s after it stopped reading); server max RSS {:.1} MiB without, {:.1} MiB with it; readers' p99 {:.2} ms without, {:.2} ms with ({:.2}x); lost to readers: {}",
            mib(max1),
            mib(max2),
            ms(h1.quantile(0.99)),
            ms(h2.quantile(0.99)),
            h2.quantile(0.99) as f64 / h1.quantile(0.99).max(1) as f64,
            (sent1 + sent2) * n as u64 - (got1 + got2),
        ),
    );
    drop(server);
    Ok(())
}
