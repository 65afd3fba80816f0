//! The cluster scenarios of the clustering issue: cluster-fanout, presence-storm,
//! presence-room and presence-kill. Each starts its own conformance nodes on a fresh engine
//! namespace and its own worker processes, and kills them all at the end (or on error).

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::cluster::{Cluster, CpuWatch, KIND_BROADCAST, Tap, redis_publish_calls};
use crate::stats::{Hist, epoch_ns, now_ns};
use crate::worker::{PStatus, Worker, pstatus_all};
use crate::{Opts, Trigger, fmt, payload};

/// A third octet for the workers' source addresses that differs between runs.
fn salt() -> u8 {
    ((epoch_ns() / 1_000_000_000) % 200) as u8
}

fn spawn_workers(first_id: usize, n: usize) -> anyhow::Result<Vec<Worker>> {
    let s = salt();
    (first_id..first_id + n)
        .map(|i| Worker::spawn(i, s))
        .collect()
}

/// Has the generator workers join `users` users between them (`in_flight` joins in flight in
/// all): each runs `users <first> <count> <spec> <in flight> <node addresses>`.
async fn start_users(
    gens: &mut [Worker],
    users: usize,
    in_flight: usize,
    spec: &str,
    cluster: &Cluster,
) -> anyhow::Result<()> {
    let chunk = users.div_ceil(gens.len());
    let conc = (in_flight / gens.len()).max(1);
    let addrs: Vec<String> = cluster.addrs().iter().map(|a| a.to_string()).collect();
    let addrs = addrs.join(",");
    for (w, g) in gens.iter_mut().enumerate() {
        let (a, b) = (w * chunk, ((w + 1) * chunk).min(users));
        g.cmd(&format!("users {a} {} {spec} {conc} {addrs}", b - a))
            .await?;
    }
    Ok(())
}

fn procs(cluster: &Cluster, groups: &[&[Worker]]) -> Vec<(String, u32)> {
    let mut p: Vec<(String, u32)> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("node{i}"), n.pid))
        .collect();
    if let Some(e) = cluster.engine.pid() {
        p.push((cluster.engine.name().into(), e));
    }
    let mut k = 0;
    for g in groups {
        for w in *g {
            p.push((format!("gen{k}"), w.pid));
            k += 1;
        }
    }
    p.push(("coordinator".into(), std::process::id()));
    p
}

/// A table row: metric, value, unit, goal or reference.
struct R(String, String, &'static str, String);

fn row(metric: impl Into<String>, v: f64, unit: &'static str, note: impl Into<String>) -> R {
    R(metric.into(), fmt(v), unit, note.into())
}

fn text(metric: impl Into<String>, v: impl Into<String>, note: impl Into<String>) -> R {
    R(metric.into(), v.into(), "", note.into())
}

fn print_table(scenario: &str, setup: &str, rows: &[R], notes: &[String], summary: &str) {
    println!("\n== {scenario} ({setup})");
    println!(
        "{:<48} {:>14} {:<6} goal / reference",
        "metric", "value", "unit"
    );
    for R(m, v, u, n) in rows {
        println!("{m:<48} {v:>14} {u:<6} {n}");
    }
    for n in notes {
        println!("  {n}");
    }
    println!("SUMMARY {scenario}: {summary}");
}

fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

// ---------------------------------------------------------------- cluster-fanout

async fn fan_status(ws: &mut [Worker]) -> anyhow::Result<[u64; 5]> {
    let mut t = [0u64; 5];
    for w in ws {
        let r = w.cmd("status").await?;
        let v: Vec<u64> = r
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        for (i, t) in t.iter_mut().take(4).enumerate() {
            *t += v.get(i).copied().unwrap_or(0);
        }
        t[4] = t[4].max(v.get(4).copied().unwrap_or(0));
    }
    Ok(t)
}

/// Until `expected` deliveries or `timeout`: (delivered, last delivery ns).
async fn wait_delivered(
    ws: &mut [Worker],
    expected: u64,
    timeout: Duration,
) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = fan_status(ws).await?;
        if s[3] >= expected || Instant::now() > deadline {
            return Ok((s[3], s[4]));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What `cluster-fanout` measured, for the charts.
pub(crate) struct ClusterFanout {
    pub(crate) subscribers: u64,
    pub(crate) p99_ms: f64,
    /// The nodes' CPU time (all of them) over the paced run, per delivery.
    pub(crate) server_cpu_per_delivery_ns: f64,
}

pub(crate) async fn cluster_fanout(o: &Opts) -> anyhow::Result<ClusterFanout> {
    let nodes = o.nodes.unwrap_or(5);
    let per_node = o.per_node;
    let total = nodes * per_node;
    let secs = o.secs.unwrap_or(10);
    let rate = o.rate.unwrap_or(1);
    let count = rate * secs;
    let cluster = Cluster::start(o, nodes, &[]).await?;
    let tap = Tap::start(&cluster).await?;
    let nw = total.div_ceil(o.per_worker).max(1);
    let chunk = total.div_ceil(nw);
    let mut workers = spawn_workers(0, nw)?;
    let conc = (o.in_flight / nw).max(1);
    let topic = "room:cfanout";
    let t0 = Instant::now();
    for (w, wk) in workers.iter_mut().enumerate() {
        let (a, b) = (w * chunk, ((w + 1) * chunk).min(total));
        let mut i = a;
        while i < b {
            let node = i / per_node;
            let end = ((node + 1) * per_node).min(b);
            let addr = cluster.nodes[node].addr;
            wk.cmd(&format!("subs {addr} {} {topic} {conc}", end - i))
                .await?;
            i = end;
        }
    }
    let mut last_print = Instant::now();
    let (joined, failed) = loop {
        let s = fan_status(&mut workers).await?;
        if s[0] + s[1] >= total as u64 {
            break (s[0], s[1]);
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("only {} of {total} joined ({} failed) in 300 s", s[0], s[1]);
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            println!("  joining: {} of {total} ({} failed)", s[0], s[1]);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let join_secs = t0.elapsed().as_secs_f64();
    println!("  {joined} of {total} subscribers joined in {join_secs:.1} s ({failed} failed)");
    // Warm-up: one broadcast must reach everyone before measuring.
    let mut trig = Trigger::connect(cluster.nodes[0].addr).await?;
    trig.broadcast(topic, "bench", &payload(topic)).await?;
    let (warm, _) = wait_delivered(&mut workers, joined, Duration::from_secs(30)).await?;
    if warm < joined {
        println!("  warm-up broadcast reached {warm} of {joined}");
    }
    for w in &mut workers {
        w.cmd("hist").await?;
        w.cmd("reset").await?;
    }
    // Background engine traffic over an idle period as long as the measured one.
    let (idle_pub0, idle_tap0, idle_t0) = (
        redis_publish_calls(o.engine).await,
        tap.snapshot(),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (idle_pub1, idle_tap1, idle_secs) = (
        redis_publish_calls(o.engine).await,
        tap.snapshot(),
        idle_t0.elapsed().as_secs_f64(),
    );
    // Paced broadcasts, on a fresh connection (the server closes keep-alive connections that
    // stay idle, as the trigger did during the idle period).
    let mut trig = Trigger::connect(cluster.nodes[0].addr).await?;
    let cpu = CpuWatch::start(procs(&cluster, &[&workers]));
    let (pub0, tap0, run_t0) = (
        redis_publish_calls(o.engine).await,
        tap.snapshot(),
        Instant::now(),
    );
    let first = now_ns();
    let start = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        trig.broadcast(topic, "bench", &payload(topic)).await?;
    }
    let expected = count * joined;
    let (got, last) = wait_delivered(&mut workers, expected, Duration::from_secs(30)).await?;
    let (pub1, tap1, run_secs) = (
        redis_publish_calls(o.engine).await,
        tap.snapshot(),
        run_t0.elapsed().as_secs_f64(),
    );
    let cpu_line = cpu.report();
    let server_cpu = cpu.cpu_ns("node");
    let mut hist = Hist::default();
    for w in &mut workers {
        let r = w.cmd("hist").await?;
        hist.merge_sparse(r.strip_prefix("hist ").unwrap_or(""))
            .ok_or_else(|| anyhow::anyhow!("bad histogram from a worker"))?;
    }
    let end = fan_status(&mut workers).await?;
    drop(workers);
    let logs = cluster.log_summary();
    // Over the offered period, or longer if the last deliveries came later.
    let deliv_secs = (last.saturating_sub(first) as f64 / 1e9).max(count as f64 / rate as f64);
    let rate_d = got as f64 / deliv_secs;
    let lost = expected as i64 - got as i64;
    let tap_b = (tap1[KIND_BROADCAST] - tap0[KIND_BROADCAST]) as f64 / count as f64;
    let hb_idle: u64 = (0..8)
        .filter(|&k| k != KIND_BROADCAST)
        .map(|k| idle_tap1[k] - idle_tap0[k])
        .sum();
    let hb_run: u64 = (0..8)
        .filter(|&k| k != KIND_BROADCAST)
        .map(|k| tap1[k] - tap0[k])
        .sum();
    let cmdstat = match (idle_pub0, idle_pub1, pub0, pub1) {
        (Some(a), Some(b), Some(c), Some(d)) => {
            let bg = (b - a) as f64 * run_secs / idle_secs;
            ((d - c) as f64 - bg) / count as f64
        }
        _ => f64::NAN,
    };
    let (p50, p99, max) = (
        hist.quantile(0.5) as f64 / 1000.0,
        hist.quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    );
    let rows = [
        row(
            "subscribers joined",
            joined as f64,
            "",
            format!("of {total}; {failed} failed"),
        ),
        row("connect + join rate", joined as f64 / join_secs, "1/s", ""),
        row(
            "broadcasts",
            count as f64,
            "",
            format!("{rate}/s for {secs} s to node0"),
        ),
        row("deliveries", got as f64, "", format!("expected {expected}")),
        row("lost deliveries", lost as f64, "", "goal 0"),
        row("subscriber connections closed", end[2] as f64, "", "goal 0"),
        row(
            "deliveries/s",
            rate_d,
            "1/s",
            format!(
                "offered {}; over max(first broadcast -> last delivery, {count}/{rate} s); Phoenix 36k",
                rate as usize * total
            ),
        ),
        row("delivery latency p50", p50, "ms", ""),
        row(
            "delivery latency p99",
            p99,
            "ms",
            "goal < 1000; Phoenix 17,000",
        ),
        row("delivery latency max", max, "ms", ""),
        row("latency samples", hist.count() as f64, "", ""),
        row("engine messages per broadcast (tap)", tap_b, "", "goal 1"),
        row(
            "engine cmdstat_publish per broadcast",
            cmdstat,
            "",
            if o.engine.name() == "redis" {
                "INFO commandstats delta minus idle background"
            } else {
                "Redis only (NATS monitoring not enabled)"
            },
        ),
        row(
            "presence/gossip messages/s, idle",
            hb_idle as f64 / idle_secs,
            "1/s",
            "background",
        ),
        row(
            "presence/gossip messages/s, run",
            hb_run as f64 / run_secs,
            "1/s",
            "",
        ),
    ];
    let verdict = if lost == 0 && p99 < 1000.0 {
        "goal met"
    } else {
        "GOAL MISSED"
    };
    print_table(
        "cluster-fanout",
        &format!(
            "{nodes} nodes x {per_node} subscribers of one topic on {}, {nw} generator processes, 150-byte frames via POST /api/broadcast",
            o.engine.name()
        ),
        &rows,
        &[format!("cpu {cpu_line}"), format!("node logs: {logs}")],
        &format!(
            "{got} of {expected} deliveries ({lost} lost) to {joined} subscribers on {nodes} nodes, {rate_d:.0} deliveries/s, p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms, {tap_b:.2} engine messages per broadcast (cmdstat {}): {verdict} (goal: all delivered, p99 < 1 s; Phoenix 36k/s, p99 17 s)",
            fmt(cmdstat)
        ),
    );
    Ok(ClusterFanout {
        subscribers: joined,
        p99_ms: p99,
        server_cpu_per_delivery_ns: server_cpu as f64 / got.max(1) as f64,
    })
}

// ---------------------------------------------------------------- presence

/// Polls `ws` every 100 ms until `done` or `timeout`; prints `progress` every 5 s.
async fn poll_until(
    ws: &mut [Worker],
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&PStatus) -> bool,
) -> anyhow::Result<(PStatus, bool)> {
    let deadline = Instant::now() + timeout;
    let mut last_print = Instant::now();
    loop {
        let p = pstatus_all(ws).await?;
        if done(&p) {
            return Ok((p, true));
        }
        if Instant::now() > deadline {
            return Ok((p, false));
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            let groups: Vec<u64> = p.groups.values().map(|g| g.present).collect();
            println!(
                "  {what}: ok {} err {} timeout {} connect-fail {} phx_error {} closed {}; groups {groups:?}; members complete {}/{}",
                p.join_ok,
                p.join_error,
                p.join_timeout,
                p.connect_failed,
                p.phx_error,
                p.closed,
                p.members_complete,
                p.members
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// PRESENCE_HEARTBEAT_MS when `--heartbeat-ms` is given.
fn hb_env(o: &Opts) -> Vec<(&'static str, String)> {
    o.heartbeat_ms
        .map(|ms| ("PRESENCE_HEARTBEAT_MS", ms.to_string()))
        .into_iter()
        .collect()
}

fn hb_text(o: &Opts) -> String {
    match o.heartbeat_ms {
        Some(ms) => format!("PRESENCE_HEARTBEAT_MS {ms}"),
        None => "presence heartbeat: server default (1 s)".into(),
    }
}

fn resolved(p: &PStatus) -> u64 {
    p.join_ok + p.join_error + p.join_timeout + p.connect_failed
}

/// Starts observers on `nodes` (group = node index) for `users` users over `ntopics` topics,
/// and waits until they joined every topic.
async fn observers(
    cluster: &Cluster,
    nodes: &[usize],
    users: usize,
    ntopics: usize,
    prefix: &str,
) -> anyhow::Result<Worker> {
    let mut obs = spawn_workers(0, 1)?.remove(0);
    for &i in nodes {
        obs.cmd(&format!(
            "observe {i} {users} {ntopics} {prefix} {users} {}",
            cluster.nodes[i].addr
        ))
        .await?;
    }
    let want = (ntopics * nodes.len()) as u64;
    let (p, ok) = poll_until(
        std::slice::from_mut(&mut obs),
        Duration::from_secs(60),
        "observers",
        |p| resolved(p) >= want,
    )
    .await?;
    if !ok || p.join_ok < want {
        bail!(
            "observers joined {} of {want} topics (first error: {:?})",
            p.join_ok,
            p.first_error
        );
    }
    Ok(obs)
}

fn join_rows(p: &PStatus, n: usize, rows: &mut Vec<R>) {
    rows.push(row("joins ok", p.join_ok as f64, "", format!("of {n}")));
    rows.push(row("joins refused", p.join_error as f64, "", "goal 0"));
    rows.push(row(
        "joins timed out (no reply in 10 s)",
        p.join_timeout as f64,
        "",
        format!("goal 0; {} ok later", p.join_late_ok),
    ));
    rows.push(row(
        "connect failures",
        p.connect_failed as f64,
        "",
        "goal 0",
    ));
    let span = p.last_ok_ns.saturating_sub(p.first_sent_ns) as f64 / 1e9;
    rows.push(row(
        "join rate",
        p.join_ok as f64 / span,
        "1/s",
        format!("over {span:.2} s"),
    ));
}

pub(crate) async fn presence_storm(o: &Opts) -> anyhow::Result<()> {
    let users = o.users.unwrap_or(57_000);
    let nodes = o.nodes.unwrap_or(3);
    let per_topic = o.per_topic;
    let ntopics = users.div_ceil(per_topic);
    let cluster = Cluster::start(o, nodes, &hb_env(o)).await?;
    let all: Vec<usize> = (0..nodes).collect();
    let mut obs = observers(&cluster, &all, users, ntopics, "room:storm").await?;
    println!(
        "  observers joined {ntopics} topics on each of {nodes} nodes ({} connections)",
        ntopics.div_ceil(100) * nodes
    );
    let mut gens = spawn_workers(1, users.div_ceil(o.per_worker).max(1))?;
    let cpu = CpuWatch::start(procs(&cluster, &[std::slice::from_ref(&obs), &gens]));
    let spec = format!("{ntopics} room:storm none 0");
    start_users(&mut gens, users, o.in_flight, &spec, &cluster).await?;
    let nw = gens.len();
    let conc = (o.in_flight / nw).max(1);
    let (up, _) = poll_until(&mut gens, Duration::from_secs(600), "storm", |p| {
        resolved(p) >= users as u64
    })
    .await?;
    let (op, converged) = poll_until(
        std::slice::from_mut(&mut obs),
        Duration::from_secs(30),
        "observers",
        |p| p.groups.values().all(|g| g.present == users as u64),
    )
    .await?;
    let cpu_line = cpu.report();
    let up = {
        // Final counts (crashes or closes after the joins).
        let mut p = pstatus_all(&mut gens).await?;
        p.last_ok_ns = up.last_ok_ns.max(p.last_ok_ns);
        p
    };
    drop(gens);
    drop(obs);
    let logs = cluster.log_summary();
    let mut rows = vec![row(
        "users",
        users as f64,
        "",
        format!("{per_topic} per topic, {ntopics} topics room:storm<k>, user n on node n%{nodes}"),
    )];
    join_rows(&up, users, &mut rows);
    rows.push(row(
        "channel crashes (phx_error), users",
        up.phx_error as f64,
        "",
        "goal 0",
    ));
    rows.push(row(
        "channel crashes (phx_error), observers",
        op.phx_error as f64,
        "",
        "goal 0",
    ));
    rows.push(row(
        "connections closed by server",
        (up.closed + op.closed) as f64,
        "",
        "goal 0",
    ));
    let mut worst: Option<f64> = None;
    for (g, s) in &op.groups {
        let conv = if s.present == users as u64 && s.reached_ns > 0 {
            let c = ms(s.reached_ns as i128 - up.last_ok_ns as i128);
            worst = Some(worst.map_or(c, |w: f64| w.max(c)));
            fmt(c)
        } else {
            "never".into()
        };
        rows.push(text(
            format!("node{g}: users present at the end"),
            s.present.to_string(),
            format!("of {users}"),
        ));
        rows.push(text(
            format!("node{g}: last join ok -> list complete"),
            conv,
            "ms; goal <= 500 (Phoenix at 10k: 350)",
        ));
        if s.foreign + s.stale_leaves > 0 {
            rows.push(text(
                format!("node{g}: foreign keys / stale leaves"),
                format!("{} / {}", s.foreign, s.stale_leaves),
                "goal 0",
            ));
        }
    }
    let failures = up.join_error + up.join_timeout + up.connect_failed;
    let crashes = up.phx_error + op.phx_error;
    let ok = failures == 0 && crashes == 0 && converged && worst.is_some_and(|w| w <= 500.0);
    let mut notes = vec![format!("cpu {cpu_line}"), format!("node logs: {logs}")];
    if let Some(e) = up.first_error.as_ref().or(op.first_error.as_ref()) {
        notes.push(format!("first client error: {e}"));
    }
    print_table(
        "presence-storm",
        &format!(
            "{users} users joining over {nodes} nodes on {}, ~{} joins in flight ({nw} generator processes), observers on every node, {}",
            o.engine.name(),
            conc * nw,
            hb_text(o)
        ),
        &rows,
        &notes,
        &format!(
            "{} of {users} joins ok ({} refused, {} timed out, {} connect failures), {crashes} channel crashes, {:.0} joins/s, every node's list complete {} after the last join: {} (goal: no failure, no crash, <= 500 ms; Phoenix at 57k: tracker timeouts, 80% of channels crashed)",
            up.join_ok,
            up.join_error,
            up.join_timeout,
            up.connect_failed,
            up.join_ok as f64 / (up.last_ok_ns.saturating_sub(up.first_sent_ns) as f64 / 1e9),
            worst.map_or("never".into(), |w| format!("{w:.0} ms")),
            if ok { "goal met" } else { "GOAL MISSED" }
        ),
    );
    Ok(())
}

pub(crate) async fn presence_room(o: &Opts) -> anyhow::Result<()> {
    let users = o.room;
    let nodes = o.nodes.unwrap_or(3);
    let cluster = Cluster::start(o, nodes, &hb_env(o)).await?;
    let mut gens = spawn_workers(1, users.div_ceil(o.per_worker).max(1))?;
    let cpu = CpuWatch::start(procs(&cluster, &[&gens]));
    let spec = format!("0 room:big member {users}");
    start_users(&mut gens, users, o.in_flight, &spec, &cluster).await?;
    let nw = gens.len();
    let conc = (o.in_flight / nw).max(1);
    let (jp, _) = poll_until(&mut gens, Duration::from_secs(600), "room joins", |p| {
        resolved(p) >= users as u64
    })
    .await?;
    let (p, converged) = poll_until(&mut gens, Duration::from_secs(120), "room lists", |p| {
        p.members_complete == users as u64
    })
    .await?;
    let cpu_line = cpu.report();
    drop(gens);
    let logs = cluster.log_summary();
    let mut rows = vec![row(
        "members",
        users as f64,
        "",
        format!("one topic room:big, user n on node n%{nodes}"),
    )];
    join_rows(&jp, users, &mut rows);
    let conv = ms(p.member_reached_max_ns as i128 - jp.last_ok_ns as i128);
    rows.push(row(
        "channel crashes (phx_error)",
        p.phx_error as f64,
        "",
        "goal 0 (Phoenix: 76% crashed)",
    ));
    rows.push(row(
        "connections closed by server",
        p.closed as f64,
        "",
        "goal 0",
    ));
    rows.push(row(
        "members whose list holds all members",
        p.members_complete as f64,
        "",
        format!("of {users}; smallest list {}", p.member_present_min),
    ));
    rows.push(text(
        "last join ok -> every list complete",
        if converged { fmt(conv) } else { "never".into() },
        "ms",
    ));
    rows.push(row(
        "bytes received, total",
        p.member_bytes_sum as f64 / 1e6,
        "MB",
        "",
    ));
    rows.push(row(
        "bytes received per member",
        p.member_bytes_sum as f64 / users as f64 / 1e3,
        "KB",
        "mostly the presence_state at join",
    ));
    rows.push(row(
        "frames per member, mean",
        p.member_frames_sum as f64 / users as f64,
        "",
        "presence_state + batched diffs",
    ));
    rows.push(row(
        "frames per member, max",
        p.member_frames_max as f64,
        "",
        "",
    ));
    rows.push(row(
        "unparsable or unknown keys in lists",
        p.member_foreign as f64,
        "",
        "goal 0",
    ));
    rows.push(row(
        "leaves of a presence not in a list (no-op)",
        p.member_stale_leaves as f64,
        "",
        "0 unless members were closed or nodes declared down",
    ));
    rows.push(row(
        "members still connected",
        (p.conns - p.closed) as f64,
        "",
        format!("of {users}; server closes show in node logs"),
    ));
    let failures = jp.join_error + jp.join_timeout + jp.connect_failed;
    let ok = failures == 0 && p.phx_error == 0 && converged && p.closed == 0;
    let mut notes = vec![format!("cpu {cpu_line}"), format!("node logs: {logs}")];
    if let Some(e) = &p.first_error {
        notes.push(format!("first client error: {e}"));
    }
    print_table(
        "presence-room",
        &format!(
            "one room of {users} users over {nodes} nodes on {}, every member keeps its own list, ~{} joins in flight, {}",
            o.engine.name(),
            conc * nw,
            hb_text(o)
        ),
        &rows,
        &notes,
        &format!(
            "{} of {users} joins ok, {} crashes, {} of {users} lists complete {} after the last join, {:.0} frames and {:.0} KB per member: {} (goal: no crash, lists converge; Phoenix: 76% crashed)",
            jp.join_ok,
            p.phx_error,
            p.members_complete,
            if converged {
                format!("{conv:.0} ms")
            } else {
                "never".into()
            },
            p.member_frames_sum as f64 / users as f64,
            p.member_bytes_sum as f64 / users as f64 / 1e3,
            if ok { "goal met" } else { "GOAL MISSED" }
        ),
    );
    Ok(())
}

pub(crate) async fn presence_kill(o: &Opts) -> anyhow::Result<()> {
    let (k, s) = (o.kill, o.others);
    let total = k + 2 * s;
    let ntopics = total.div_ceil(o.per_topic);
    let heartbeat_ms = o.heartbeat_ms.unwrap_or(1000);
    let bound_ms = o.down_ms + heartbeat_ms;
    let env = [
        ("PRESENCE_DOWN_MS", o.down_ms.to_string()),
        ("PRESENCE_HEARTBEAT_MS", heartbeat_ms.to_string()),
    ];
    let mut cluster = Cluster::start(o, 3, &env).await?;
    let mut obs = observers(&cluster, &[0, 1], total, ntopics, "room:kill").await?;
    let mut gens = spawn_workers(1, 2)?;
    let conc = (o.in_flight / 2).max(1);
    let a = cluster.addrs();
    gens[0]
        .cmd(&format!(
            "users 0 {k} {ntopics} room:kill none 0 {conc} {}",
            a[2]
        ))
        .await?;
    gens[1]
        .cmd(&format!(
            "users {k} {} {ntopics} room:kill none 0 {conc} {},{}",
            2 * s,
            a[0],
            a[1]
        ))
        .await?;
    let (jp, _) = poll_until(&mut gens, Duration::from_secs(120), "joins", |p| {
        resolved(p) >= total as u64
    })
    .await?;
    if jp.join_ok < total as u64 {
        bail!(
            "only {} of {total} joins ok (first error {:?})",
            jp.join_ok,
            jp.first_error
        );
    }
    let (before, ok) = poll_until(
        std::slice::from_mut(&mut obs),
        Duration::from_secs(30),
        "lists before the kill",
        |p| p.groups.values().all(|g| g.present == total as u64),
    )
    .await?;
    if !ok {
        bail!(
            "survivors' lists did not reach {total} before the kill: {:?}",
            before.groups
        );
    }
    // Two heartbeats so that every node has settled.
    tokio::time::sleep(Duration::from_millis(2 * heartbeat_ms)).await;
    for g in [0, 1] {
        obs.cmd(&format!("record {g} on")).await?;
    }
    let t_kill = now_ns();
    cluster.nodes[2].kill();
    let after = 2 * s as u64;
    let (_, dropped) = poll_until(
        std::slice::from_mut(&mut obs),
        Duration::from_millis(bound_ms + 20_000),
        "lists after the kill",
        |p| p.groups.values().all(|g| g.present <= after),
    )
    .await?;
    // Keep watching a little: a wrong leave after the expected ones must show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fin = obs.pstatus().await?;
    let mut rows = vec![
        row(
            "presences on the killed node",
            k as f64,
            "",
            format!("users u0..u{}", k - 1),
        ),
        row("presences on each survivor", s as f64, "", ""),
        row(
            "topics",
            ntopics as f64,
            "",
            format!("user n in room:kill<n % {ntopics}>"),
        ),
    ];
    let mut worst = 0f64;
    let mut all_ok = dropped;
    for g in [0u32, 1] {
        let leaves: Vec<(u32, u64)> =
            serde_json::from_str(&obs.cmd(&format!("leaves {g}")).await?)?;
        let mut seen = vec![false; total];
        let (mut victim, mut wrong, mut dup) = (0u64, 0u64, 0u64);
        let (mut first, mut last) = (u64::MAX, 0u64);
        for &(u, t) in &leaves {
            let u = u as usize;
            if u < total && seen[u] {
                dup += 1;
            } else if u < total {
                seen[u] = true;
            }
            if u < k {
                victim += 1;
                first = first.min(t);
                last = last.max(t);
            } else {
                wrong += 1;
            }
        }
        let missing = (0..k).filter(|&u| !seen[u]).count();
        let gs = fin.groups.get(&g).cloned().unwrap_or_default();
        let last_ms = ms(last as i128 - t_kill as i128);
        let first_ms = ms(first.min(last) as i128 - t_kill as i128);
        if victim > 0 {
            worst = worst.max(last_ms);
        }
        all_ok &=
            wrong == 0 && missing == 0 && dup == 0 && victim > 0 && last_ms <= bound_ms as f64;
        rows.push(row(
            format!("node{g}: leaves of the killed node's users"),
            victim as f64,
            "",
            format!("expected {k}"),
        ));
        rows.push(row(
            format!("node{g}: missing leaves"),
            missing as f64,
            "",
            "goal 0",
        ));
        rows.push(row(
            format!("node{g}: wrong leaves (users of survivors)"),
            wrong as f64,
            "",
            "goal 0",
        ));
        rows.push(row(
            format!("node{g}: duplicate leaves"),
            dup as f64,
            "",
            "goal 0",
        ));
        rows.push(row(
            format!("node{g}: kill -> first leave"),
            if victim > 0 { first_ms } else { f64::NAN },
            "ms",
            "",
        ));
        rows.push(row(
            format!("node{g}: kill -> last leave"),
            if victim > 0 { last_ms } else { f64::NAN },
            "ms",
            format!(
                "bound {bound_ms} (down {} + heartbeat {heartbeat_ms})",
                o.down_ms
            ),
        ));
        rows.push(row(
            format!("node{g}: users present at the end"),
            gs.present as f64,
            "",
            format!("expected {after}"),
        ));
        all_ok &= gs.present == after;
    }
    let logs = cluster.log_summary();
    rows.push(row(
        "channel crashes (phx_error)",
        (jp.phx_error + fin.phx_error) as f64,
        "",
        "goal 0",
    ));
    drop(gens);
    drop(obs);
    print_table(
        "presence-kill",
        &format!(
            "3 nodes on {}, SIGKILL of node2 holding {k} presences, {s} on each survivor, PRESENCE_DOWN_MS {}",
            o.engine.name(),
            o.down_ms
        ),
        &rows,
        &[format!("node logs: {logs}")],
        &format!(
            "survivors dropped the {k} presences of the killed node, last leave {worst:.0} ms after the kill (bound {bound_ms} ms): {}",
            if all_ok {
                "exactly those, within the bound: goal met"
            } else {
                "GOAL MISSED (see rows)"
            }
        ),
    );
    Ok(())
}
