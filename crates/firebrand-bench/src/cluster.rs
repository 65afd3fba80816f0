//! Cluster plumbing for the cluster scenarios: conformance nodes started as child processes on
//! one engine namespace, a check that they see each other, an engine tap that counts the
//! node-to-node messages of the namespace by kind, Redis' `INFO commandstats`, and CPU
//! accounting per process.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stats::{cpu_split_ns, epoch_ns, find_pid, machine_busy_ns, now_ns};
use crate::ws::Ws;
use crate::{Opts, Trigger};

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Engine {
    Redis,
    Nats,
}

impl Engine {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Engine::Redis => "redis",
            Engine::Nats => "nats",
        }
    }
    fn url(self) -> (&'static str, &'static str) {
        match self {
            Engine::Redis => ("REDIS_URL", "redis://127.0.0.1:6379"),
            Engine::Nats => ("NATS_URL", "nats://127.0.0.1:4222"),
        }
    }
    fn host_port(self) -> &'static str {
        match self {
            Engine::Redis => "127.0.0.1:6379",
            Engine::Nats => "127.0.0.1:4222",
        }
    }
    /// The engine server's PID (for CPU accounting), if it runs on this machine.
    pub(crate) fn pid(self) -> Option<u32> {
        find_pid(match self {
            Engine::Redis => "redis-server",
            Engine::Nats => "nats-server",
        })
    }
}

/// One conformance node (SIGKILLed when dropped).
pub(crate) struct Node {
    child: Option<Child>,
    pub(crate) addr: SocketAddr,
    pub(crate) pid: u32,
    pub(crate) log: PathBuf,
}

impl Node {
    /// SIGKILL now.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The nodes of one run, on a namespace of their own.
pub(crate) struct Cluster {
    pub(crate) nodes: Vec<Node>,
    pub(crate) namespace: String,
    pub(crate) engine: Engine,
}

impl Cluster {
    /// Starts `n` nodes with `env` added, waits for each one's `listening on` line, then until
    /// a broadcast on node 0 reaches a probe client on every node.
    pub(crate) async fn start(
        o: &Opts,
        n: usize,
        env: &[(&str, String)],
    ) -> anyhow::Result<Cluster> {
        let namespace = format!("bench{}x{}", std::process::id(), epoch_ns() % 1_000_000_007);
        let logdir = std::env::temp_dir().join(format!("firebrand-bench-{namespace}"));
        std::fs::create_dir_all(&logdir)?;
        let (var, url) = o.engine.url();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            namespace,
            engine: o.engine,
        };
        for i in 0..n {
            let log = logdir.join(format!("node{i}.log"));
            let mut cmd = Command::new(&o.server);
            cmd.args(["--port", "0"])
                .env(var, url)
                .env("CLUSTER_NAMESPACE", &cluster.namespace)
                .env("RUST_LOG", "warn")
                .env("NO_COLOR", "1")
                .env("IDLE_TIMEOUT_MS", "120000")
                .stdout(Stdio::piped())
                .stderr(File::create(&log)?);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = cmd
                .spawn()
                .with_context(|| format!("cannot start {}", o.server.display()))?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
            let pid = child.id();
            let node = Node {
                child: Some(child),
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                pid,
                log,
            };
            cluster.nodes.push(node);
            let addr = line
                .trim()
                .strip_prefix("listening on ")
                .with_context(|| format!("node {i}: unexpected output {line:?}"))?
                .parse()?;
            cluster.nodes[i].addr = addr;
        }
        let t0 = Instant::now();
        cluster.wait_mesh().await?;
        println!(
            "  {n} nodes on {} namespace {} (logs in {}); they see each other after {:.2} s",
            o.engine.name(),
            cluster.namespace,
            logdir.display(),
            t0.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// Until a broadcast posted to node 0 reaches a probe joined on every node (30 s at most).
    async fn wait_mesh(&self) -> anyhow::Result<()> {
        let mut probes = Vec::new();
        for n in &self.nodes {
            probes.push(Ws::connect_join(n.addr, "room:probe").await?);
        }
        let mut trig = Trigger::connect(self.nodes[0].addr).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = vec![false; probes.len()];
        while Instant::now() < deadline {
            let tag = format!("{:015}", now_ns());
            trig.broadcast("room:probe", "probe", &format!(r#"{{"t":"{tag}"}}"#))
                .await?;
            for (i, p) in probes.iter_mut().enumerate() {
                if seen[i] {
                    continue;
                }
                let got = tokio::time::timeout(
                    Duration::from_millis(300),
                    p.until(|d| memmem::find(d, tag.as_bytes()).is_some()),
                )
                .await;
                seen[i] = matches!(got, Ok(Ok(())));
            }
            if seen.iter().all(|s| *s) {
                return Ok(());
            }
        }
        bail!("nodes do not see each other after 30 s (probes reached: {seen:?})")
    }

    /// Warnings and errors in each node's log: `node0: 0 WARN, 0 ERROR; …` plus the first one.
    pub(crate) fn log_summary(&self) -> String {
        let mut parts = Vec::new();
        let mut first = None;
        for (i, n) in self.nodes.iter().enumerate() {
            let text = strip_ansi(&std::fs::read_to_string(&n.log).unwrap_or_default());
            let w = text.lines().filter(|l| l.contains("WARN")).count();
            let e = text.lines().filter(|l| l.contains("ERROR")).count();
            if first.is_none() {
                first = text
                    .lines()
                    .find(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| format!("node{i}: {}", l.chars().take(300).collect::<String>()));
            }
            parts.push(format!("node{i} {w} WARN {e} ERROR"));
        }
        match first {
            Some(f) => format!("{}; first: {f}", parts.join(", ")),
            None => parts.join(", "),
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------- engine

/// Counts the node-to-node messages on the cluster's Redis channel or NATS subject, by kind
/// (the second byte of each message: 1 broadcast, 2 heartbeat, 3 transfer request, 4 transfer,
/// 5 goodbye, 6 direct).
pub(crate) struct Tap {
    counts: Arc<[AtomicU64; 8]>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) const KIND_BROADCAST: usize = 1;

impl Tap {
    pub(crate) async fn start(c: &Cluster) -> anyhow::Result<Tap> {
        let counts: Arc<[AtomicU64; 8]> = Arc::new(Default::default());
        let mut s = TcpStream::connect(c.engine.host_port()).await?;
        let mut buf = Vec::with_capacity(1 << 16);
        match c.engine {
            Engine::Redis => {
                s.write_all(format!("SUBSCRIBE firebrand:{}\r\n", c.namespace).as_bytes())
                    .await?;
                // The confirmation: *3 $9 subscribe $N channel :1
                loop {
                    if let Some((n, items)) = resp_array(&buf) {
                        if items.first().map(|r| &buf[r.clone()]) != Some(b"subscribe".as_slice()) {
                            bail!("redis tap: unexpected reply");
                        }
                        buf.drain(..n);
                        break;
                    }
                    if s.read_buf(&mut buf).await? == 0 {
                        bail!("redis tap: connection closed");
                    }
                }
            }
            Engine::Nats => {
                s.write_all(
                    format!(
                        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB firebrand.{} 1\r\nPING\r\n",
                        c.namespace
                    )
                    .as_bytes(),
                )
                .await?;
                loop {
                    if memmem::find(&buf, b"PONG\r\n").is_some() {
                        break;
                    }
                    if memmem::find(&buf, b"-ERR").is_some() {
                        bail!("nats tap: {}", String::from_utf8_lossy(&buf));
                    }
                    if s.read_buf(&mut buf).await? == 0 {
                        bail!("nats tap: connection closed");
                    }
                }
                let p = memmem::find(&buf, b"PONG\r\n").unwrap_or(0) + 6;
                buf.drain(..p);
            }
        }
        let (engine, cnt) = (c.engine, counts.clone());
        let task = tokio::spawn(async move {
            let _ = tap_loop(engine, s, buf, cnt).await;
        });
        Ok(Tap { counts, task })
    }

    pub(crate) fn snapshot(&self) -> [u64; 8] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

fn count(counts: &[AtomicU64; 8], msg: &[u8]) {
    let k = msg.get(1).copied().unwrap_or(0) as usize;
    counts[k.min(7)].fetch_add(1, Ordering::Relaxed);
}

async fn tap_loop(
    engine: Engine,
    mut s: TcpStream,
    mut buf: Vec<u8>,
    counts: Arc<[AtomicU64; 8]>,
) -> anyhow::Result<()> {
    loop {
        let mut used = 0;
        loop {
            let b = &buf[used..];
            match engine {
                Engine::Redis => {
                    let Some((n, items)) = resp_array(b) else {
                        break;
                    };
                    if items.len() == 3 && &b[items[0].clone()] == b"message" {
                        count(&counts, &b[items[2].clone()]);
                    }
                    used += n;
                }
                Engine::Nats => {
                    let Some(eol) = memmem::find(b, b"\r\n") else {
                        break;
                    };
                    let line = &b[..eol];
                    if line.starts_with(b"PING") {
                        s.write_all(b"PONG\r\n").await?;
                        used += eol + 2;
                    } else if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
                        let f: Vec<&[u8]> = line.split(|c| *c == b' ').collect();
                        let num = |x: &[u8]| std::str::from_utf8(x).ok()?.parse::<usize>().ok();
                        let total = f.last().and_then(|x| num(x)).context("nats MSG")?;
                        let hdr = if line.starts_with(b"HMSG ") {
                            f.get(f.len() - 2).and_then(|x| num(x)).unwrap_or(0)
                        } else {
                            0
                        };
                        if b.len() < eol + 2 + total + 2 {
                            break;
                        }
                        count(&counts, &b[eol + 2 + hdr..eol + 2 + total]);
                        used += eol + 2 + total + 2;
                    } else {
                        used += eol + 2;
                    }
                }
            }
        }
        buf.drain(..used);
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// One RESP array of bulk strings / integers at the start of `b`: (bytes used, item ranges).
fn resp_array(b: &[u8]) -> Option<(usize, Vec<std::ops::Range<usize>>)> {
    let line = |i: usize| -> Option<(usize, usize)> {
        let e = i + memmem::find(b.get(i..)?, b"\r\n")?;
        Some((e, e + 2))
    };
    if *b.first()? != b'*' {
        return None;
    }
    let (e, mut i) = line(0)?;
    let n: usize = std::str::from_utf8(&b[1..e]).ok()?.parse().ok()?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        match *b.get(i)? {
            b'$' => {
                let (e, s) = line(i)?;
                let len: usize = std::str::from_utf8(&b[i + 1..e]).ok()?.parse().ok()?;
                if b.len() < s + len + 2 {
                    return None;
                }
                items.push(s..s + len);
                i = s + len + 2;
            }
            _ => {
                let (e, next) = line(i)?;
                items.push(i + 1..e);
                i = next;
            }
        }
    }
    Some((i, items))
}

/// Redis' `cmdstat_publish` calls (all clients of the server), if the engine is Redis.
pub(crate) async fn redis_publish_calls(engine: Engine) -> Option<u64> {
    if engine != Engine::Redis {
        return None;
    }
    let info = redis_info(engine.host_port(), "commandstats").await.ok()?;
    Some(
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
            .and_then(|v| v.split(',').next()?.parse().ok())
            .unwrap_or(0),
    )
}

/// The text of Redis' `INFO section` at `addr`.
pub(crate) async fn redis_info(addr: &str, section: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("INFO {section}\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    loop {
        if let Some(e) = memmem::find(&buf, b"\r\n") {
            let len: usize = std::str::from_utf8(&buf[1..e])?.parse()?;
            if buf.len() >= e + 2 + len {
                return Ok(String::from_utf8_lossy(&buf[e + 2..e + 2 + len]).into_owned());
            }
        }
        if s.read_buf(&mut buf).await? == 0 {
            bail!("redis closed the connection");
        }
    }
}

// ---------------------------------------------------------------- CPU

/// CPU time of a set of processes over a window.
pub(crate) struct CpuWatch {
    procs: Vec<(String, u32, (u64, u64))>,
    t0: Instant,
    machine0: (u64, u64),
}

impl CpuWatch {
    pub(crate) fn start(procs: Vec<(String, u32)>) -> CpuWatch {
        CpuWatch {
            procs: procs
                .into_iter()
                .map(|(n, p)| {
                    let c = cpu_split_ns(p);
                    (n, p, c)
                })
                .collect(),
            t0: Instant::now(),
            machine0: machine_busy_ns(),
        }
    }

    /// CPU time (user + system) since the start of the processes whose name starts with
    /// `prefix` (e.g. `node`: the servers).
    pub(crate) fn cpu_ns(&self, prefix: &str) -> u64 {
        self.procs
            .iter()
            .filter(|(n, _, _)| n.starts_with(prefix))
            .map(|(_, p, (u0, s0))| {
                let (u1, s1) = cpu_split_ns(*p);
                u1.saturating_sub(*u0) + s1.saturating_sub(*s0)
            })
            .sum()
    }

    /// `name 1.23 s (61%, sys 0.4s)` per process: CPU seconds, share of one core over the
    /// window, and the part spent in the kernel;
    /// then the whole machine's busy time and what of it is not ours (e.g. another build).
    pub(crate) fn report(&self) -> String {
        let secs = self.t0.elapsed().as_secs_f64();
        let mut ours = 0.0;
        let parts: Vec<String> = self
            .procs
            .iter()
            .map(|(n, p, (u0, s0))| {
                let (u1, s1) = cpu_split_ns(*p);
                let u = u1.saturating_sub(*u0) as f64 / 1e9;
                let s = s1.saturating_sub(*s0) as f64 / 1e9;
                ours += u + s;
                format!(
                    "{n} {:.1}s ({:.0}%, sys {s:.1}s)",
                    u + s,
                    (u + s) / secs * 100.0
                )
            })
            .collect();
        let (busy, irq) = machine_busy_ns();
        let machine = busy.saturating_sub(self.machine0.0) as f64 / 1e9;
        let irq = irq.saturating_sub(self.machine0.1) as f64 / 1e9;
        format!(
            "over {secs:.1} s: {}; machine busy {machine:.1}s of {:.1}s available ({} cores), of which irq/softirq {irq:.1}s (loopback traffic) and other processes {:.1}s",
            parts.join(", "),
            secs * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            (machine - ours - irq).max(0.0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_arrays() {
        let m = b"*3\r\n$7\r\nmessage\r\n$3\r\nabc\r\n$4\r\n\x01\x01\r\n\r\n*3";
        let (n, items) = resp_array(m).unwrap();
        assert_eq!(&m[items[0].clone()], b"message");
        assert_eq!(&m[items[2].clone()], b"\x01\x01\r\n");
        assert_eq!(&m[n..], b"*3");
        assert!(resp_array(b"*3\r\n$7\r\nmessage\r\n$3\r\nab").is_none());
        let (_, items) = resp_array(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n").unwrap();
        assert_eq!(items.len(), 3);
    }
}
