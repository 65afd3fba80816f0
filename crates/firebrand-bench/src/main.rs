//! `firebrand-bench`: a load generator for firebrand (Phoenix V2 over WebSocket) and the
//! benchmark scenarios, each run against the conformance server (or firebrand-server:
//! `--target server`) and against a minimal baseline broadcaster (or the conformance app:
//! `--against conformance`) in the same invocation. `firebrand-bench --help` lists them; the
//! latest figures and the commands that made them are in RESULTS.md.

mod baseline;
mod charts;
mod cluster;
mod history;
mod outbox;
mod presence;
mod scenarios;
mod slow;
mod stats;
mod wire;
mod worker;
mod ws;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use stats::{Hist, PerfStat, Sink, cpu_ns, ctx_switches, now_ns, rss_kib};
use ws::{Ws, stamp};

const USAGE: &str = "usage: firebrand-bench SCENARIO [options]
scenarios: idle fanout latency connect echo slow all    (serve-baseline --port P: run the baseline server)
cluster scenarios (conformance nodes on Redis or NATS, several generator processes):
           cluster-fanout presence-storm presence-room presence-kill cluster-all
           history-cost (--engine redis|nats; --bursts N: N x 1000 broadcasts)
wire-bytes: bytes on the wire of three messages with and without permessage-deflate
outbox: firebrand-server's PostgreSQL outbox against POST /api/publish (--server-bin; --subs N
           per topic (10), --rows N committed as fast as possible (100000), then --rate R rows/s
           (2000) for --secs S (10); PostgreSQL at FIREBRAND_BENCH_POSTGRES_URL)
           charts (SVG: --conns 1000,5000,... --subs 1000,2500,... --out DIR; --nodes N adds
                   the cluster-fanout point: N nodes x --per-node subscribers on --engine)
options:
  --conns N        idle: connections (19000); connect: connections (10000)
  --subs N         fanout: subscribers (10000); latency: comma list (1000,10000)
  --rate R         paced broadcasts per second (20; cluster-fanout 1)
  --secs S         paced / echo duration in seconds (5; cluster-fanout 10)
  --bursts B       fanout: bursts (5)        --burst-size M   broadcasts per burst (100)
  --trigger pipelined|sequential   fanout bursts: each trigger connection sends its share of a
                   burst in one write and then reads the responses (default), or waits for each
                   response before the next request (what the figures before session 10 measured)
  --triggers K     fanout bursts: trigger connections (1)
  --deflate        clients offer permessage-deflate (as browsers do): with `--target
                   conformance-deflate` (COMPRESS=1: a broadcast compressed once) and `--against
                   conformance-per-connection` (compressed by each connection, Phoenix's way),
                   or `--against conformance` (uncompressed); compressed frames are counted but
                   their latency is not read
  --syscalls       fanout: count the server's write syscalls and context switches during the
                   bursts with `perf stat` (frames per write, for any server)
  --clients C      echo: clients (1000)      --concurrency K  connects in flight (256)
  --server PATH    conformance binary (default: next to this binary)
  --target conformance|server|baseline   the firebrand column: the conformance app
                   (default), firebrand-server (development defaults, metrics on; --server-bin
                   PATH), or the baseline (`--target baseline --against baseline-tasks`: what a
                   task per channel costs the raw server)
  --against baseline|baseline-tasks|conformance   the reference column (default: the raw
                   baseline; baseline-tasks: the same with a task per joined topic answering
                   pushes, as a channel does); `--target server --against conformance`: the
                   server against the library's app
  --only firebrand|baseline   run only the firebrand (target) or the reference column
  --repeat N       single-node scenarios: run the servers N times, alternating, and report
                   each metric's median (this machine's run-to-run noise is +-15%); charts: the
                   middle run of each point
  --topic T        fanout: the topic (room:fanout; stream:fanout is recoverable: history kept)
cluster options:
  --engine redis|nats   cluster engine (redis: 127.0.0.1:6379, nats: 127.0.0.1:4222)
  --server-threads N  the servers' Tokio worker threads (TOKIO_WORKER_THREADS; default one per core)
  --nodes N        server nodes (cluster-fanout 5, presence 3; presence-kill always 3)
  --per-node N     cluster-fanout: subscribers per node (19000)
  --users U        presence-storm: distinct users (57000)
  --per-topic P    presence-storm/kill: users per topic (100)
  --room R         presence-room: users in the room (10000)
  --kill K         presence-kill: presences on the killed node (3000)
  --others S       presence-kill: presences on each survivor (500)
  --down-ms MS     presence-kill: PRESENCE_DOWN_MS of the nodes (5000)
  --heartbeat-ms MS presence scenarios: PRESENCE_HEARTBEAT_MS of the nodes (server default 1000)
  --in-flight J    connects/joins in flight over all generator processes (768)
  --per-worker C   connections per generator process (16000; at most ~19000)";

#[derive(Clone)]
struct Opts {
    conns: Option<usize>,
    subs: Option<Vec<usize>>,
    rate: Option<u64>,
    secs: Option<u64>,
    /// outbox: rows of the rate phase.
    rows: Option<u64>,
    bursts: usize,
    burst_size: usize,
    /// fanout bursts: pipelined requests (default) or one at a time.
    pipelined: bool,
    triggers: usize,
    /// fanout: `perf stat` the server's write syscalls during the bursts.
    syscalls: bool,
    clients: usize,
    concurrency: usize,
    server: PathBuf,
    /// The firebrand-server binary (`--target server`).
    server_bin: PathBuf,
    /// The server in the firebrand column, and the one in the reference column.
    target: Kind,
    against: Kind,
    only: Option<String>,
    /// How many times each server runs a single-node scenario (medians reported).
    repeat: usize,
    /// fanout: the topic (a `stream:` topic is recoverable in the conformance app).
    topic: String,
    engine: cluster::Engine,
    nodes: Option<usize>,
    per_node: usize,
    users: Option<usize>,
    per_topic: usize,
    room: usize,
    kill: usize,
    others: usize,
    down_ms: u64,
    heartbeat_ms: Option<u64>,
    in_flight: usize,
    per_worker: usize,
    /// The servers' Tokio worker threads (`TOKIO_WORKER_THREADS`; default: one per core).
    server_threads: Option<usize>,
    /// `--conns` as given (charts: several sizes).
    conns_list: Option<Vec<usize>>,
    /// charts: where the SVG files go.
    out: Option<PathBuf>,
}

impl Opts {
    fn rate(&self) -> u64 {
        self.rate.unwrap_or(20)
    }
    fn secs(&self) -> u64 {
        self.secs.unwrap_or(5)
    }
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let exe = std::env::current_exe()?;
    let mut o = Opts {
        conns: None,
        subs: None,
        rate: None,
        secs: None,
        rows: None,
        bursts: 5,
        burst_size: 100,
        pipelined: true,
        triggers: 1,
        syscalls: false,
        clients: 1000,
        concurrency: 256,
        server: exe.with_file_name("conformance"),
        server_bin: exe.with_file_name("firebrand-server"),
        target: Kind::Conformance,
        against: Kind::Baseline,
        only: None,
        repeat: 1,
        topic: "room:fanout".into(),
        engine: cluster::Engine::Redis,
        nodes: None,
        per_node: 19_000,
        users: None,
        per_topic: 100,
        room: 10_000,
        kill: 3000,
        others: 500,
        down_ms: 5000,
        heartbeat_ms: None,
        in_flight: 768,
        per_worker: 16_000,
        server_threads: None,
        conns_list: None,
        out: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--conns" => {
                let list = v()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<Vec<usize>, _>>()?;
                o.conns = list.first().copied();
                o.conns_list = Some(list);
            }
            "--out" => o.out = Some(v()?.into()),
            "--subs" => o.subs = Some(v()?.split(',').map(str::parse).collect::<Result<_, _>>()?),
            "--rate" => o.rate = Some(v()?.parse()?),
            "--rows" => o.rows = Some(v()?.parse()?),
            "--secs" => o.secs = Some(v()?.parse()?),
            "--bursts" => o.bursts = v()?.parse()?,
            "--burst-size" => o.burst_size = v()?.parse()?,
            "--trigger" => {
                o.pipelined = match v()?.as_str() {
                    "pipelined" => true,
                    "sequential" => false,
                    t => bail!("unknown trigger {t:?} (pipelined|sequential)"),
                }
            }
            "--triggers" => o.triggers = v()?.parse()?,
            "--syscalls" => o.syscalls = true,
            "--deflate" => ws::offer_deflate(),
            "--clients" => o.clients = v()?.parse()?,
            "--concurrency" => o.concurrency = v()?.parse()?,
            "--server" => o.server = v()?.into(),
            "--server-bin" => o.server_bin = v()?.into(),
            "--target" => {
                o.target = match v()?.as_str() {
                    "conformance" => Kind::Conformance,
                    "conformance-deflate" => Kind::ConformanceDeflate,
                    "server" => Kind::FirebrandServer,
                    "baseline" => Kind::Baseline,
                    t => bail!("unknown target {t:?} (conformance|server|baseline)"),
                }
            }
            "--against" => {
                o.against = match v()?.as_str() {
                    "baseline" => Kind::Baseline,
                    "baseline-tasks" => Kind::BaselineTasks,
                    "conformance" => Kind::Conformance,
                    "conformance-per-connection" => Kind::ConformancePerConnection,
                    a => bail!("unknown reference {a:?} (baseline|baseline-tasks|conformance)"),
                }
            }
            "--only" => o.only = Some(v()?.clone()),
            "--repeat" => o.repeat = v()?.parse()?,
            "--topic" => o.topic = v()?.clone(),
            "--engine" => {
                o.engine = match v()?.as_str() {
                    "redis" => cluster::Engine::Redis,
                    "nats" => cluster::Engine::Nats,
                    e => bail!("unknown engine {e:?} (redis|nats)"),
                }
            }
            "--nodes" => o.nodes = Some(v()?.parse()?),
            "--per-node" => o.per_node = v()?.parse()?,
            "--users" => o.users = Some(v()?.parse()?),
            "--per-topic" => o.per_topic = v()?.parse()?,
            "--room" => o.room = v()?.parse()?,
            "--kill" => o.kill = v()?.parse()?,
            "--others" => o.others = v()?.parse()?,
            "--down-ms" => o.down_ms = v()?.parse()?,
            "--heartbeat-ms" => o.heartbeat_ms = Some(v()?.parse()?),
            "--in-flight" => o.in_flight = v()?.parse()?,
            "--per-worker" => o.per_worker = v()?.parse()?,
            "--server-threads" => o.server_threads = Some(v()?.parse()?),
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    if o.per_topic == 0 || o.per_worker == 0 || o.in_flight == 0 || o.repeat == 0 || o.triggers == 0
    {
        bail!("--per-topic, --per-worker, --in-flight, --triggers and --repeat must be positive");
    }
    if o.kill == 0 {
        bail!("--kill must be positive");
    }
    if o.target == o.against {
        bail!("--target and --against name the same server");
    }
    Ok(o)
}

// ---------------------------------------------------------------- servers

/// A server the scenarios run against.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// The conformance app (`--server`): the library with the channels of conformance/APP.md.
    Conformance,
    /// The standalone `firebrand-server` (`--server-bin`) on its development defaults
    /// (anyone joins any topic, metrics on), broadcasting through its `POST /api/publish`.
    FirebrandServer,
    /// The conformance app compressing (`COMPRESS=1`): a broadcast compressed once for all its
    /// compressing subscribers (clients offer it with `--deflate`).
    ConformanceDeflate,
    /// The same, but each connection compresses broadcasts itself, as Phoenix's deflate
    /// context per connection does (`COMPRESS=per-connection`).
    ConformancePerConnection,
    /// The raw broadcaster of `baseline.rs`, run by this binary (`serve-baseline`).
    Baseline,
    /// The same with a task per joined topic answering pushes, as a channel does
    /// (`serve-baseline --channel-tasks`): isolation's cost alone.
    BaselineTasks,
}

impl Kind {
    /// Its column's name in reports, and its short name in the ratio's: the conformance app is
    /// "firebrand" as the target, "conformance" as the reference.
    fn column(self, target: bool) -> (&'static str, &'static str) {
        match self {
            Kind::Conformance if target => ("firebrand", "fb"),
            Kind::Conformance => ("conformance", "conf"),
            Kind::FirebrandServer => ("fb-server", "srv"),
            Kind::ConformanceDeflate => ("deflate-once", "once"),
            Kind::ConformancePerConnection => ("per-conn", "perconn"),
            Kind::Baseline => ("baseline", "base"),
            Kind::BaselineTasks => ("base-tasks", "tasks"),
        }
    }

    /// Where it takes broadcasts over HTTP (`{"topic","event","payload"}` in both).
    fn publish_path(self) -> &'static str {
        match self {
            Kind::FirebrandServer => "/api/publish",
            Kind::Conformance
            | Kind::ConformanceDeflate
            | Kind::ConformancePerConnection
            | Kind::Baseline
            | Kind::BaselineTasks => "/api/broadcast",
        }
    }
}

struct Server {
    child: Child,
    addr: SocketAddr,
    pid: u32,
    kind: Kind,
}

impl Server {
    fn start(kind: Kind, o: &Opts) -> anyhow::Result<Server> {
        let cmd = match kind {
            Kind::Conformance => {
                let mut c = Command::new(&o.server);
                c.args(["--port", "0"]).env("RUST_LOG", "warn");
                c
            }
            Kind::ConformanceDeflate | Kind::ConformancePerConnection => {
                let mut c = Command::new(&o.server);
                let compress = if kind == Kind::ConformanceDeflate {
                    "1"
                } else {
                    "per-connection"
                };
                c.args(["--port", "0"])
                    .env("RUST_LOG", "warn")
                    .env("COMPRESS", compress);
                c
            }
            Kind::FirebrandServer => {
                let mut c = Command::new(&o.server_bin);
                c.env("FIREBRAND_LISTEN", "127.0.0.1:0")
                    .env("FIREBRAND_METRICS", "true")
                    .env("RUST_LOG", "warn")
                    .env_remove("FIREBRAND_CONFIG");
                c
            }
            Kind::Baseline => {
                let mut c = Command::new(std::env::current_exe()?);
                c.args(["serve-baseline", "--port", "0"]);
                c
            }
            Kind::BaselineTasks => {
                let mut c = Command::new(std::env::current_exe()?);
                c.args(["serve-baseline", "--port", "0", "--channel-tasks"]);
                c
            }
        };
        let (child, addr) =
            spawn_listening(cmd, o).with_context(|| format!("cannot start the {kind:?} server"))?;
        let pid = child.id();
        Ok(Server {
            child,
            addr,
            pid,
            kind,
        })
    }

    /// What a scenario gets to know of it.
    fn target(&self) -> Target {
        Target {
            addr: self.addr,
            pid: self.pid,
            publish: self.kind.publish_path(),
        }
    }
}

/// Starts a server (`cmd`, on `--server-threads` workers) that prints `listening on ADDR` first;
/// the child and that address. Whatever else it prints is read and dropped: a closed pipe
/// would fail its writes.
fn spawn_listening(mut cmd: Command, o: &Opts) -> anyhow::Result<(Child, SocketAddr)> {
    if let Some(n) = o.server_threads {
        // All servers run on Tokio's multi-thread runtime, which takes its size from this.
        cmd.env("TOKIO_WORKER_THREADS", n.to_string());
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected server output {line:?}"))?
        .parse()?;
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Ok((child, addr))
}

/// What a scenario gets: the server's address, PID and broadcast path (the `Server` stays
/// alive in `each`).
#[derive(Clone, Copy)]
struct Target {
    addr: SocketAddr,
    pid: u32,
    publish: &'static str,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve_baseline(args: &[String]) -> anyhow::Result<()> {
    let (args, channel_tasks) = match args {
        [rest @ .., last] if last == "--channel-tasks" => (rest, true),
        _ => (args, false),
    };
    let port: u16 = match args {
        [p, v] if p == "--port" => v.parse()?,
        [] => 4100,
        _ => bail!("usage: firebrand-bench serve-baseline [--port P] [--channel-tasks]"),
    };
    // The outside instrument's raw baseline listens with a backlog of 4096, as the binaries do.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
    let listener = socket.listen(4096)?;
    println!("listening on {}", listener.local_addr()?);
    baseline::serve(listener, channel_tasks).await?;
    Ok(())
}

// ---------------------------------------------------------------- trigger

/// A keep-alive HTTP/1.1 client for `POST /api/broadcast` (the conformance app's, and the
/// baseline's) or firebrand-server's `POST /api/publish`.
struct Trigger {
    s: TcpStream,
    path: &'static str,
    buf: Vec<u8>,
}

impl Trigger {
    /// To the conformance app (the cluster scenarios' nodes) or the baseline.
    async fn connect(addr: SocketAddr) -> anyhow::Result<Trigger> {
        Self::with_path(addr, Kind::Conformance.publish_path()).await
    }

    /// To the server of a scenario, whichever kind.
    async fn to(target: &Target) -> anyhow::Result<Trigger> {
        Self::with_path(target.addr, target.publish).await
    }

    async fn with_path(addr: SocketAddr, path: &'static str) -> anyhow::Result<Trigger> {
        Ok(Trigger {
            s: ws::tcp(addr).await?,
            path,
            buf: vec![0; 4096],
        })
    }

    /// `n` broadcasts of a fresh [`payload`] each, pipelined: every request in one write, then
    /// the `n` responses. The server gets a burst as fast as it can read it, not one broadcast
    /// per round trip of this client.
    async fn burst(&mut self, topic: &str, event: &str, n: usize) -> anyhow::Result<()> {
        let mut reqs = Vec::new();
        for _ in 0..n {
            let body = format!(
                r#"{{"topic":"{topic}","event":"{event}","payload":{}}}"#,
                payload(topic)
            );
            reqs.extend_from_slice(
                format!(
                    "POST {} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n{body}",
                    self.path,
                    body.len()
                )
                .as_bytes(),
            );
        }
        self.s.write_all(&reqs).await?;
        let (mut start, mut end, mut left) = (0, 0, n);
        while left > 0 {
            if let Some(p) = memmem::find(&self.buf[start..end], b"\r\n\r\n") {
                let head =
                    String::from_utf8_lossy(&self.buf[start..start + p]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    bail!("broadcast failed: {head}");
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .context("no content-length")?;
                if end >= start + p + 4 + len {
                    start += p + 4 + len;
                    left -= 1;
                    continue;
                }
            }
            self.buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            if end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let r = self.s.read(&mut self.buf[end..]).await?;
            if r == 0 {
                bail!("trigger connection closed");
            }
            end += r;
        }
        Ok(())
    }

    async fn broadcast(&mut self, topic: &str, event: &str, payload: &str) -> anyhow::Result<()> {
        let body = format!(r#"{{"topic":"{topic}","event":"{event}","payload":{payload}}}"#);
        let req = format!(
            "POST {} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            self.path,
            body.len()
        );
        self.s.write_all(req.as_bytes()).await?;
        let mut end = 0;
        loop {
            if let Some(p) = memmem::find(&self.buf[..end], b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..p]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    bail!("broadcast failed: {head}");
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .context("no content-length")?;
                while end < p + 4 + len {
                    let n = self.s.read(&mut self.buf[end..]).await?;
                    if n == 0 {
                        bail!("trigger connection closed");
                    }
                    end += n;
                }
                return Ok(());
            }
            let n = self.s.read(&mut self.buf[end..]).await?;
            if n == 0 {
                bail!("trigger connection closed");
            }
            end += n;
        }
    }
}

/// The baseline's counters (`GET /stats`, see `baseline.rs`); `None` from other servers.
struct ServerStats {
    writes: u64,
}

async fn server_stats(addr: SocketAddr) -> Option<ServerStats> {
    let mut s = ws::tcp(addr).await.ok()?;
    s.write_all(b"GET /stats HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf));
    read.await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    let (_, body) = text.split_once("\r\n\r\n")?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(ServerStats {
        writes: v.get("writes")?.as_u64()?,
    })
}

/// A payload whose broadcast frame `[null,null,"room:fanout","bench",{...}]` is 150 bytes.
fn payload(topic: &str) -> String {
    let t = now_ns();
    let fixed = format!(r#"[null,null,"{topic}","bench",{{"t":"{t:015}","p":""}}]"#).len();
    let pad = "x".repeat(150usize.saturating_sub(fixed));
    format!(r#"{{"t":"{t:015}","p":"{pad}"}}"#)
}

// ---------------------------------------------------------------- clients

/// Subscribers: connect + join (at most `concurrency` in flight), then count deliveries and
/// record their latency until aborted; heartbeat every 30 s; flush latencies on each `ctl` bump.
struct Subs {
    sink: Arc<Sink>,
    ctl: watch::Sender<u64>,
    _tasks: JoinSet<()>,
    n: usize,
}

impl Subs {
    fn spawn(addr: SocketAddr, n: usize, topic: impl Fn(usize) -> String, o: &Opts) -> Subs {
        let sink = Arc::new(Sink::default());
        let (ctl, _) = watch::channel(0u64);
        let sem = Arc::new(Semaphore::new(o.concurrency));
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let (sink, sem, mut rx, topic) = (sink.clone(), sem.clone(), ctl.subscribe(), topic(i));
            tasks.spawn(async move {
                let permit = sem.acquire_owned().await;
                let mut ws = match Ws::connect_join(addr, &topic).await {
                    Ok(ws) => ws,
                    Err(e) => {
                        if sink.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("connect/join failed: {e}");
                        }
                        return;
                    }
                };
                drop(permit);
                sink.joined.fetch_add(1, Ordering::Relaxed);
                let period = Duration::from_secs(30);
                let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                let mut local: Vec<u32> = Vec::with_capacity(64);
                let mut stamps: Vec<u64> = Vec::new();
                let mut unstamped = 0u64;
                let mut hb_ref = 100u64;
                loop {
                    tokio::select! {
                        r = ws.drain(|op, d| {
                            if op == 1 && let Some(t) = stamp(d) {
                                stamps.push(t);
                            } else if op == ws::RSV1 | 1 {
                                // Compressed (--deflate): counted, its stamp unread (the
                                // generator does not inflate).
                                unstamped += 1;
                            }
                        }) => {
                            if !matches!(r, Ok(true)) {
                                sink.closed.fetch_add(1, Ordering::Relaxed);
                                sink.record(&mut local);
                                return;
                            }
                            let count = stamps.len() as u64 + std::mem::take(&mut unstamped);
                            if count > 0 {
                                let now = now_ns();
                                local.extend(
                                    stamps.drain(..).map(|t| (now.saturating_sub(t) / 1000) as u32),
                                );
                                sink.delivered.fetch_add(count, Ordering::Relaxed);
                                sink.last_ns.fetch_max(now, Ordering::Relaxed);
                                if local.len() >= 256 {
                                    sink.record(&mut local);
                                }
                            }
                        }
                        _ = hb.tick() => {
                            hb_ref += 1;
                            let f = format!(r#"[null,"{hb_ref}","phoenix","heartbeat",{{}}]"#);
                            if ws.send_text(f.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        r = rx.changed() => {
                            if r.is_err() {
                                return;
                            }
                            sink.record(&mut local);
                            sink.acks.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        Subs {
            sink,
            ctl,
            _tasks: tasks,
            n,
        }
    }

    /// Waits until every subscriber joined or failed; returns (joined, seconds).
    async fn wait_joined(&self, t0: Instant) -> anyhow::Result<(u64, f64)> {
        let deadline = t0 + Duration::from_secs(120);
        loop {
            let j = self.sink.joined.load(Ordering::Relaxed);
            let f = self.sink.failed.load(Ordering::Relaxed);
            if j + f >= self.n as u64 {
                let secs = t0.elapsed().as_secs_f64();
                if f > 0 {
                    eprintln!("  {f} of {} connections failed", self.n);
                }
                return Ok((j, secs));
            }
            if Instant::now() > deadline {
                bail!("only {j} of {} joined in 120 s", self.n);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until `expected` deliveries were counted (or 60 s passed); returns the count.
    async fn wait_delivered(&self, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let d = self.sink.delivered.load(Ordering::Relaxed);
            if d >= expected || Instant::now() > deadline {
                if d < expected {
                    eprintln!("  timeout: {d} of {expected} deliveries");
                }
                return d;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    /// Flushes every task's local latencies and takes the histogram.
    async fn collect(&self) -> Hist {
        self.sink.acks.store(0, Ordering::SeqCst);
        self.ctl.send_modify(|g| *g += 1);
        let live =
            self.sink.joined.load(Ordering::Relaxed) - self.sink.closed.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sink.acks.load(Ordering::SeqCst) < live && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.sink.take_hist()
    }
}

/// Joins everything; the caller drops `Subs` to close the sockets.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------- report

struct Row {
    metric: String,
    fb: f64,
    base: f64,
    unit: &'static str,
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Prints the rows with the columns of `o`'s target and reference (firebrand / baseline unless
/// `--target` or `--against` say otherwise).
fn report(o: &Opts, scenario: &str, trigger: &str, rows: &[Row], summary: String) {
    let ((fb, fb_short), (base, base_short)) = (o.target.column(true), o.against.column(false));
    let ratio = format!("{fb_short}/{base_short}");
    let mut notes = Vec::new();
    if (o.target, o.against) != (Kind::Conformance, Kind::Baseline) {
        notes.push(format!("firebrand = {fb}, baseline = {base}"));
    }
    if o.repeat > 1 {
        notes.push(format!("medians of {} runs each", o.repeat));
    }
    let summary = if notes.is_empty() {
        summary
    } else {
        format!("[{}] {summary}", notes.join("; "))
    };
    report_with(scenario, [fb, base, &ratio], trigger, rows, summary);
}

/// [`report`] with other column names than firebrand / baseline.
fn report_with(scenario: &str, columns: [&str; 3], trigger: &str, rows: &[Row], summary: String) {
    println!("\n== {scenario} ({trigger})");
    println!(
        "{:<44} {:>12} {:>12} {:>12}  unit",
        "metric", columns[0], columns[1], columns[2]
    );
    for r in rows {
        let ratio = if r.base != 0.0 && !r.fb.is_nan() && !r.base.is_nan() {
            format!("{:.2}", r.fb / r.base)
        } else {
            "-".into()
        };
        println!(
            "{:<44} {:>12} {:>12} {:>12}  {}",
            r.metric,
            fmt(r.fb),
            fmt(r.base),
            ratio,
            r.unit
        );
    }
    println!("SUMMARY {scenario}: {summary}");
}

const HTTP_TRIGGER: &str =
    "broadcasts via POST /api/broadcast (fb-server: /api/publish), keep-alive HTTP/1.1";

/// The servers to run, in order: the target (firebrand column), then the reference.
fn kinds(o: &Opts) -> Vec<Kind> {
    match o.only.as_deref() {
        Some("firebrand") => vec![o.target],
        Some("baseline") => vec![o.against],
        _ => vec![o.target, o.against],
    }
}

/// A scenario's result for one server, and how the results of `--repeat` runs combine.
trait Outcome: Sized {
    fn combine(runs: Vec<Self>) -> Self;
    /// One run's values, printed when runs are repeated.
    fn describe(&self) -> String;
}

/// One value per metric: each metric's median over the runs (empty: skipped, NaN rows).
impl Outcome for Vec<f64> {
    fn combine(runs: Vec<Self>) -> Self {
        let n = runs.iter().map(Vec::len).max().unwrap_or(0);
        (0..n)
            .map(|i| {
                let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(i).copied()).collect();
                v.sort_by(f64::total_cmp);
                match v.len() {
                    0 => f64::NAN,
                    len if len % 2 == 1 => v[len / 2],
                    len => (v[len / 2 - 1] + v[len / 2]) / 2.0,
                }
            })
            .collect()
    }

    fn describe(&self) -> String {
        let v: Vec<String> = self.iter().map(|x| fmt(*x)).collect();
        v.join(" ")
    }
}

/// A chart's point: the middle run's (a point's values belong together).
impl<T> Outcome for Option<T> {
    fn combine(mut runs: Vec<Self>) -> Self {
        let middle = runs.len() / 2;
        if runs.is_empty() {
            None
        } else {
            runs.swap_remove(middle)
        }
    }

    fn describe(&self) -> String {
        String::new()
    }
}

/// Runs `f` against each server kind, `--repeat` times in alternation; returns per-kind
/// results combined over the runs (NaN rows when skipped).
async fn each<T: Outcome, F, Fut>(o: &Opts, mut f: F) -> anyhow::Result<(T, T)>
where
    F: FnMut(Target) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (mut fb, mut base) = (Vec::new(), Vec::new());
    for round in 1..=o.repeat {
        for k in kinds(o) {
            settle_time_wait().await;
            let server = Server::start(k, o)?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = f(server.target()).await?;
            drop(server);
            if o.repeat > 1 {
                println!("  run {round} of {}, {k:?}: {}", o.repeat, r.describe());
            }
            if k == o.target {
                fb.push(r);
            } else {
                base.push(r);
            }
        }
    }
    Ok((T::combine(fb), T::combine(base)))
}

/// Sockets in TIME_WAIT (`/proc/net/sockstat`), if the kernel says.
/// Sockets in TIME_WAIT that a benchmark made: its clients bind 127.B.C.x with x >= 2, so any
/// loopback socket with an address other than 127.0.0.1 (others on the machine churn through
/// 127.0.0.1 all the time: e.g. RabbitMQ's checks of epmd, thousands a minute).
fn time_wait() -> Option<u64> {
    const LOCALHOST: &str = "0100007F:";
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let n = tcp
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().take(4).collect();
            f.len() == 4
                && f[3] == "06"
                && !(f[1].starts_with(LOCALHOST) && f[2].starts_with(LOCALHOST))
        })
        .count();
    Some(n as u64)
}

/// Waits (up to 70 s) until few sockets are left in TIME_WAIT from an earlier run: with tens of
/// thousands of them, loopback connects slow down to a few hundred per second for any server,
/// and figures of back-to-back runs mean nothing. The kernel announces no event: it is polled.
async fn settle_time_wait() {
    const FEW: u64 = 4000;
    let Some(n) = time_wait().filter(|n| *n > FEW) else {
        return;
    };
    println!("  waiting for {n} sockets in TIME_WAIT (from an earlier run) to expire");
    let deadline = Instant::now() + Duration::from_secs(70);
    while time_wait().is_some_and(|n| n > FEW) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn nan_if_empty(v: &[f64], i: usize) -> f64 {
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// One row per metric: the i-th metric shows the i-th value of each server's results.
fn rows<const N: usize>(
    fb: &[f64],
    base: &[f64],
    metrics: [(String, &'static str); N],
) -> Vec<Row> {
    metrics
        .into_iter()
        .enumerate()
        .map(|(i, (metric, unit))| Row {
            metric,
            fb: nan_if_empty(fb, i),
            base: nan_if_empty(base, i),
            unit,
        })
        .collect()
}

// ---------------------------------------------------------------- scenarios

async fn idle(o: &Opts) -> anyhow::Result<()> {
    let n = o.conns.unwrap_or(19_000);
    let (fb, base) = each(o, |server| async move {
        let before = rss_kib(server.pid);
        let subs = Subs::spawn(server.addr, n, |i| format!("room:idle{}", i % 100), o);
        let (joined, secs) = subs.wait_joined(Instant::now()).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = rss_kib(server.pid);
        let per = (after.saturating_sub(before) * 1024) as f64 / joined as f64;
        println!("  {joined} joined in {secs:.1} s; RSS {before} -> {after} KiB");
        drop(subs);
        settle().await;
        Ok(vec![per, joined as f64, after as f64 / 1024.0])
    })
    .await?;
    let rows = rows(
        &fb,
        &base,
        [
            (
                format!("server RSS per idle joined connection (n={n})"),
                "bytes",
            ),
            ("connections joined".into(), ""),
            ("server RSS total".into(), "MiB"),
        ],
    );
    report(
        o,
        "idle",
        "one topic per connection, 100 topics, heartbeat every 30 s",
        &rows,
        format!(
            "firebrand {:.0} B/conn at {n} idle joined connections (target <= 3072), baseline {:.0} B/conn",
            nan_if_empty(&fb, 0),
            nan_if_empty(&base, 0)
        ),
    );
    Ok(())
}

/// Paced broadcasts: `rate`/s for `secs`. Returns (deliveries, expected, seconds, server cpu ns, histogram).
async fn paced(
    subs: &Subs,
    server: &Target,
    topic: &str,
    o: &Opts,
) -> anyhow::Result<(u64, u64, f64, u64, Hist)> {
    let mut trig = Trigger::to(server).await?;
    // Warm-up broadcast.
    trig.broadcast(topic, "bench", &payload(topic)).await?;
    subs.wait_delivered(subs.n as u64).await;
    subs.collect().await;
    subs.sink.reset();
    let count = o.rate() * o.secs();
    let expected = count * subs.sink.joined.load(Ordering::Relaxed);
    let cpu0 = cpu_ns(server.pid);
    let t0 = tokio::time::Instant::now();
    let first = now_ns();
    for i in 0..count {
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / o.rate() as f64)).await;
        trig.broadcast(topic, "bench", &payload(topic)).await?;
    }
    let got = subs.wait_delivered(expected).await;
    let cpu = cpu_ns(server.pid) - cpu0;
    let secs = (subs
        .sink
        .last_ns
        .load(Ordering::Relaxed)
        .saturating_sub(first)) as f64
        / 1e9;
    let hist = subs.collect().await;
    Ok((got, expected, secs, cpu, hist))
}

async fn fanout(o: &Opts) -> anyhow::Result<()> {
    let n = o
        .subs
        .as_ref()
        .and_then(|v| v.first().copied())
        .unwrap_or(10_000);
    let (fb, base) = each(o, |server| async move {
        // Leaked once per run: the burst tasks need a 'static topic.
        let topic: &'static str = Box::leak(o.topic.clone().into_boxed_str());
        let subs = Subs::spawn(server.addr, n, |_| topic.to_string(), o);
        subs.wait_joined(Instant::now()).await?;
        let (got, _exp, secs, cpu, hist) = paced(&subs, &server, topic, o).await?;
        let paced_rate = got as f64 / secs;
        let paced_cpu = cpu as f64 / got as f64;
        // Bursts: `burst_size` broadcasts over `--triggers` connections, pipelined or not.
        let mut trigs = Vec::new();
        for _ in 0..o.triggers {
            trigs.push(Trigger::to(&server).await?);
        }
        let joined = subs.sink.joined.load(Ordering::Relaxed);
        let (mut total, mut total_secs, mut total_cpu, mut gen_cpu) = (0u64, 0f64, 0u64, 0u64);
        let mut burst_hist = Hist::default();
        let base_stats0 = server_stats(server.addr).await;
        let ctx0 = ctx_switches(server.pid);
        let perf = o.syscalls.then(|| PerfStat::start(server.pid)).transpose()?;
        for _ in 0..o.bursts {
            subs.sink.reset();
            let cpu0 = cpu_ns(server.pid);
            let gen0 = cpu_ns(std::process::id());
            let first = now_ns();
            let per = o.burst_size / trigs.len();
            let mut js = JoinSet::new();
            for mut t in trigs.drain(..) {
                let pipelined = o.pipelined;
                js.spawn(async move {
                    if pipelined {
                        t.burst(topic, "bench", per).await?;
                    } else {
                        for _ in 0..per {
                            t.broadcast(topic, "bench", &payload(topic)).await?;
                        }
                    }
                    anyhow::Ok(t)
                });
            }
            while let Some(t) = js.join_next().await {
                trigs.push(t??);
            }
            let expected = (per * trigs.len()) as u64 * joined;
            let got = subs.wait_delivered(expected).await;
            total_cpu += cpu_ns(server.pid) - cpu0;
            gen_cpu += cpu_ns(std::process::id()) - gen0;
            total += got;
            total_secs += subs
                .sink
                .last_ns
                .load(Ordering::Relaxed)
                .saturating_sub(first) as f64
                / 1e9;
            let h = subs.collect().await;
            burst_hist
                .merge_sparse(&h.to_sparse())
                .context("burst histogram")?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let writes = match (perf, base_stats0, server_stats(server.addr).await) {
            (Some(p), _, _) => p.finish()?.writes,
            (None, Some(a), Some(b)) => Some(b.writes - a.writes),
            _ => None,
        };
        let ctx = ctx_switches(server.pid) - ctx0;
        println!(
            "  paced: {got} deliveries in {secs:.2} s; bursts: {total} in {total_secs:.2} s; generator CPU {:.2} s; server write syscalls {}, context switches {ctx}",
            gen_cpu as f64 / 1e9,
            writes.map_or("-".into(), |w| w.to_string())
        );
        drop(subs);
        settle().await;
        Ok(vec![
            paced_rate,
            paced_cpu,
            hist.quantile(0.99) as f64 / 1000.0,
            total as f64 / total_secs,
            total_cpu as f64 / total as f64,
            burst_hist.quantile(0.5) as f64 / 1000.0,
            burst_hist.quantile(0.99) as f64 / 1000.0,
            writes.map_or(f64::NAN, |w| total as f64 / w as f64),
            ctx as f64 * 1000.0 / total as f64,
            gen_cpu as f64 / total as f64,
        ])
    })
    .await?;
    let rows = rows(
        &fb,
        &base,
        [
            (
                format!("paced {}/s x {} s: deliveries/s", o.rate(), o.secs()),
                "1/s",
            ),
            ("paced: server CPU per delivery".into(), "ns"),
            ("paced: p99 delivery latency".into(), "ms"),
            (
                format!(
                    "bursts {}x{} ({}): deliveries/s",
                    o.bursts,
                    o.burst_size,
                    if o.pipelined {
                        "pipelined"
                    } else {
                        "sequential"
                    }
                ),
                "1/s",
            ),
            ("bursts: server CPU per delivery".into(), "ns"),
            ("bursts: p50 latency inside the burst".into(), "ms"),
            ("bursts: p99 latency inside the burst".into(), "ms"),
            ("bursts: frames per server write syscall".into(), ""),
            ("bursts: server context switches per 1k".into(), ""),
            ("bursts: generator CPU per delivery".into(), "ns"),
        ],
    );
    let eff = |i| nan_if_empty(&base, i) / nan_if_empty(&fb, i) * 100.0;
    report(
        o,
        "fanout",
        &format!(
            "{n} subscribers on {}, 150-byte frames (+28 for a position), {HTTP_TRIGGER}",
            o.topic
        ),
        &rows,
        format!(
            "paced: firebrand CPU/delivery at {:.0}% of baseline efficiency (target >= 90%); bursts: {:.2} M deliveries/s, {:.2}x baseline (issue 23: >= 0.9x), CPU per delivery {:.2}x (<= 1.3x), p99 inside the burst {:.2}x (<= 1x)",
            eff(1),
            nan_if_empty(&fb, 3) / 1e6,
            nan_if_empty(&fb, 3) / nan_if_empty(&base, 3),
            nan_if_empty(&fb, 4) / nan_if_empty(&base, 4),
            nan_if_empty(&fb, 6) / nan_if_empty(&base, 6),
        ),
    );
    Ok(())
}

async fn latency(o: &Opts) -> anyhow::Result<()> {
    let sizes = o.subs.clone().unwrap_or_else(|| vec![1000, 10_000]);
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for &n in &sizes {
        let (fb, base) = each(o, |server| async move {
            let topic = "room:latency";
            let subs = Subs::spawn(server.addr, n, |_| topic.to_string(), o);
            subs.wait_joined(Instant::now()).await?;
            let (got, exp, _secs, _cpu, h) = paced(&subs, &server, topic, o).await?;
            drop(subs);
            settle().await;
            let ms = |us: u64| us as f64 / 1000.0;
            Ok(vec![
                ms(h.quantile(0.5)),
                ms(h.quantile(0.99)),
                ms(h.max()),
                h.count() as f64,
                (exp - got) as f64,
            ])
        })
        .await?;
        for (i, (m, u)) in [
            ("p50", "ms"),
            ("p99", "ms"),
            ("max", "ms"),
            ("samples", ""),
            ("lost", ""),
        ]
        .iter()
        .enumerate()
        {
            rows.push(Row {
                metric: format!("{n} subs, {}/s: {m}", o.rate()),
                fb: nan_if_empty(&fb, i),
                base: nan_if_empty(&base, i),
                unit: u,
            });
        }
        summary.push(format!(
            "{n} subs p99 {:.2} ms = {:.2}x baseline",
            nan_if_empty(&fb, 1),
            nan_if_empty(&fb, 1) / nan_if_empty(&base, 1)
        ));
    }
    report(
        o,
        "latency",
        &format!(
            "paced {}/s for {} s, 150-byte frames, {HTTP_TRIGGER}",
            o.rate(),
            o.secs()
        ),
        &rows,
        format!("{} (target at 10k: <= 1.2x)", summary.join("; ")),
    );
    Ok(())
}

async fn connect(o: &Opts) -> anyhow::Result<()> {
    let n = o.conns.unwrap_or(10_000);
    let (fb, base) = each(o, |server| async move {
        let t0 = Instant::now();
        let cpu0 = cpu_ns(server.pid);
        let subs = Subs::spawn(server.addr, n, |i| format!("room:c{}", i % 100), o);
        let (joined, secs) = subs.wait_joined(t0).await?;
        let cpu = cpu_ns(server.pid) - cpu0;
        drop(subs);
        settle().await;
        Ok(vec![
            joined as f64 / secs,
            joined as f64,
            cpu as f64 / 1000.0 / joined as f64,
        ])
    })
    .await?;
    let rows = rows(
        &fb,
        &base,
        [
            (
                format!("connect + join per second ({} in flight)", o.concurrency),
                "1/s",
            ),
            ("connections joined".into(), ""),
            ("server CPU per connect + join".into(), "us"),
        ],
    );
    report(
        o,
        "connect",
        "WebSocket upgrade + phx_join + ok reply",
        &rows,
        format!(
            "firebrand {:.0} connections+joins/s (target >= 8000), {:.2}x baseline; server CPU per connect + join {:.1} us, {:.2}x baseline",
            nan_if_empty(&fb, 0),
            nan_if_empty(&fb, 0) / nan_if_empty(&base, 0),
            nan_if_empty(&fb, 2),
            nan_if_empty(&fb, 2) / nan_if_empty(&base, 2)
        ),
    );
    Ok(())
}

async fn echo(o: &Opts) -> anyhow::Result<()> {
    if kinds(o).contains(&Kind::FirebrandServer) {
        bail!("echo needs the conformance app's `ping` handler, which firebrand-server has not");
    }
    let c = o.clients;
    let secs = o.secs();
    let (fb, base) = each(o, |server| async move {
        let sink = Arc::new(Sink::default());
        let sem = Arc::new(Semaphore::new(o.concurrency));
        let (start_tx, start_rx) = watch::channel(None::<Instant>);
        let mut js = JoinSet::new();
        for i in 0..c {
            let (sink, sem, mut rx, addr) =
                (sink.clone(), sem.clone(), start_rx.clone(), server.addr);
            js.spawn(async move {
                let topic = format!("room:echo{}", i % 100);
                let permit = sem.acquire_owned().await;
                let Ok(mut ws) = Ws::connect_join(addr, &topic).await else {
                    sink.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                drop(permit);
                sink.joined.fetch_add(1, Ordering::Relaxed);
                let deadline = loop {
                    if let Some(d) = *rx.borrow_and_update() {
                        break d;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                };
                let mut local = Vec::new();
                let mut r = 1u64;
                while Instant::now() < deadline {
                    r += 1;
                    let f = format!(r#"["1","{r}","{topic}","ping",{{"t":"{:015}"}}]"#, now_ns());
                    if ws.send_text(f.as_bytes()).await.is_err() {
                        break;
                    }
                    let mut t = 0;
                    if ws
                        .until(|d| {
                            t = stamp(d).unwrap_or(0);
                            memmem::find(d, b"phx_reply").is_some()
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    local.push(((now_ns() - t) / 1000) as u32);
                }
                sink.delivered
                    .fetch_add(local.len() as u64, Ordering::Relaxed);
                sink.record(&mut local);
            });
        }
        while sink.joined.load(Ordering::Relaxed) + sink.failed.load(Ordering::Relaxed) < c as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let cpu0 = cpu_ns(server.pid);
        let t0 = Instant::now();
        start_tx.send_replace(Some(t0 + Duration::from_secs(secs)));
        while js.join_next().await.is_some() {}
        let el = t0.elapsed().as_secs_f64();
        let cpu = cpu_ns(server.pid) - cpu0;
        let n = sink.delivered.load(Ordering::Relaxed);
        let h = sink.take_hist();
        settle().await;
        Ok(vec![
            n as f64 / el,
            h.quantile(0.5) as f64 / 1000.0,
            h.quantile(0.99) as f64 / 1000.0,
            cpu as f64 / n as f64,
        ])
    })
    .await?;
    let rows = rows(
        &fb,
        &base,
        [
            ("replies/s".into(), "1/s"),
            ("round trip p50".into(), "ms"),
            ("round trip p99".into(), "ms"),
            ("server CPU per request".into(), "ns"),
        ],
    );
    report(
        o,
        "echo",
        &format!("{c} clients, each one `ping` push in flight, {secs} s"),
        &rows,
        format!(
            "firebrand {:.0} replies/s ({:.2}x baseline), p99 {:.2} ms",
            nan_if_empty(&fb, 0),
            nan_if_empty(&fb, 0) / nan_if_empty(&base, 0),
            nan_if_empty(&fb, 2)
        ),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(scenario) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    // Up to the hard limit of open files (20,000 here): children inherit it.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if scenario == "worker" {
        return rt.block_on(worker::run());
    }
    if scenario == "serve-baseline" {
        return rt.block_on(serve_baseline(&args[1..]));
    }
    if scenario == "-h" || scenario == "--help" {
        println!("{USAGE}");
        return Ok(());
    }
    let o = parse(&args[1..])?;
    // The outbox scenario runs firebrand-server alone (it checks for it itself).
    let used = if scenario == "outbox" {
        Vec::new()
    } else {
        kinds(&o)
    };
    let conformance = [
        Kind::Conformance,
        Kind::ConformanceDeflate,
        Kind::ConformancePerConnection,
    ];
    if used.iter().any(|k| conformance.contains(k)) && !o.server.exists() {
        bail!(
            "conformance binary not found at {} (cargo build --release -p firebrand-conformance --bin conformance, or --server PATH)",
            o.server.display()
        );
    }
    if used.contains(&Kind::FirebrandServer) && !o.server_bin.exists() {
        bail!(
            "firebrand-server binary not found at {} (cargo build --release -p firebrand-server, or --server-bin PATH)",
            o.server_bin.display()
        );
    }
    let _ = now_ns();
    rt.block_on(async {
        match scenario.as_str() {
            "idle" => idle(&o).await,
            "fanout" => fanout(&o).await,
            "latency" => latency(&o).await,
            "connect" => connect(&o).await,
            "echo" => echo(&o).await,
            "slow" => slow::slow(&o).await,
            "cluster-fanout" => scenarios::cluster_fanout(&o).await.map(drop),
            "presence-storm" => scenarios::presence_storm(&o).await,
            "presence-room" => scenarios::presence_room(&o).await,
            "presence-kill" => scenarios::presence_kill(&o).await,
            "history-cost" => history::history_cost(&o).await,
            "outbox" => outbox::outbox(&o).await,
            "wire-bytes" => wire::wire_bytes(&o).await,
            "charts" => charts::charts(&o).await,
            "cluster-all" => {
                scenarios::cluster_fanout(&o).await?;
                scenarios::presence_storm(&o).await?;
                scenarios::presence_room(&o).await?;
                scenarios::presence_kill(&o).await
            }
            "all" => {
                connect(&o).await?;
                echo(&o).await?;
                latency(&o).await?;
                fanout(&o).await?;
                slow::slow(&o).await?;
                idle(&o).await
            }
            other => bail!("unknown scenario {other:?}\n{USAGE}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 50 subscribers against the in-process baseline: join, one broadcast, one echo.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smoke_baseline() {
        smoke(false).await;
    }

    /// The same with a task per joined topic answering the echo (`--against baseline-tasks`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smoke_baseline_with_channel_tasks() {
        smoke(true).await;
    }

    async fn smoke(channel_tasks: bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(baseline::serve(listener, channel_tasks));
        let o = parse(&[]).unwrap();
        let subs = Subs::spawn(addr, 50, |_| "room:smoke".into(), &o);
        let (joined, _) = subs.wait_joined(Instant::now()).await.unwrap();
        assert_eq!(joined, 50);
        let mut t = Trigger::connect(addr).await.unwrap();
        t.broadcast("room:smoke", "bench", &payload("room:smoke"))
            .await
            .unwrap();
        assert_eq!(subs.wait_delivered(50).await, 50);
        let h = subs.collect().await;
        assert_eq!(h.count(), 50);
        let mut ws = Ws::connect_join(addr, "room:e").await.unwrap();
        ws.send_text(br#"["1","2","room:e","ping",{"t":"000000000000042"}]"#)
            .await
            .unwrap();
        let mut got = None;
        // A bound on a reply that never comes (a failure, not a timing goal).
        let reply = ws.until(|d| {
            got = stamp(d);
            got.is_some()
        });
        tokio::time::timeout(Duration::from_secs(30), reply)
            .await
            .expect("no echo reply")
            .unwrap();
        assert_eq!(got, Some(42));
    }

    #[test]
    fn repeated_runs_combine_into_medians() {
        let runs = vec![vec![3.0, 10.0], vec![1.0, 30.0], vec![2.0, 20.0]];
        assert_eq!(Vec::<f64>::combine(runs), vec![2.0, 20.0]);
        let even = vec![vec![1.0], vec![4.0]];
        assert_eq!(Vec::<f64>::combine(even), vec![2.5]);
        assert!(Vec::<f64>::combine(Vec::new()).is_empty());
        assert_eq!(Option::combine(vec![Some(1), Some(2), Some(3)]), Some(2));
    }

    #[test]
    fn payload_frame_is_150_bytes() {
        let p = payload("room:fanout");
        let frame = format!(r#"[null,null,"room:fanout","bench",{p}]"#);
        assert_eq!(frame.len(), 150);
        assert!(stamp(frame.as_bytes()).is_some());
    }

    #[test]
    fn stamps_are_read_as_postgresql_writes_jsonb_back_too() {
        assert_eq!(stamp(br#"{"t":"000000000000042","p":"x"}"#), Some(42));
        assert_eq!(stamp(br#"{"p": "x", "t": "000000000000042"}"#), Some(42));
        assert_eq!(stamp(br#"{"t": 42}"#), None);
    }
}
