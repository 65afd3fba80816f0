//! Latency histogram, the subscriber sink, and /proc readers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable that gives worker processes the coordinator's epoch.
pub(crate) const EPOCH_ENV: &str = "FIREBRAND_BENCH_EPOCH_NS";

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The bench's epoch: the coordinator's start (inherited by its workers through `EPOCH_ENV`),
/// as wall-clock ns, so that timestamps compare across processes.
static EPOCH: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    std::env::var(EPOCH_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(wall_ns)
});

/// The epoch (wall-clock ns), to hand to worker processes.
pub(crate) fn epoch_ns() -> u64 {
    *EPOCH
}

/// Nanoseconds since the bench's epoch (the timestamp put in payloads). The same clock in every
/// process of a run (the system's real-time clock, read through the vDSO).
pub(crate) fn now_ns() -> u64 {
    wall_ns().saturating_sub(*EPOCH)
}

/// A log-linear histogram of microseconds (≤ 1.6 % error).
#[derive(Clone)]
pub(crate) struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
}

fn index(v: u64) -> usize {
    if v < 128 {
        v as usize
    } else {
        let e = 63 - v.leading_zeros() as usize - 6;
        e * 64 + (v >> e) as usize
    }
}

fn value(i: usize) -> u64 {
    if i < 128 {
        i as u64
    } else {
        let e = i / 64 - 1;
        ((i - e * 64) as u64) << e
    }
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; 64 * 64],
            n: 0,
            max: 0,
        }
    }
}

impl Hist {
    pub(crate) fn record(&mut self, us: u64) {
        self.counts[index(us).min(64 * 64 - 1)] += 1;
        self.n += 1;
        self.max = self.max.max(us);
    }
    pub(crate) fn count(&self) -> u64 {
        self.n
    }
    pub(crate) fn max(&self) -> u64 {
        self.max
    }
    /// The non-empty buckets as `index:count,…` (empty: `-`), with the max: `max;buckets`.
    pub(crate) fn to_sparse(&self) -> String {
        let mut out = format!("{};", self.max);
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                out.push_str(&format!("{i}:{c},"));
            }
        }
        out
    }
    /// Adds a histogram serialized by [`Hist::to_sparse`].
    pub(crate) fn merge_sparse(&mut self, s: &str) -> Option<()> {
        let (max, buckets) = s.split_once(';')?;
        self.max = self.max.max(max.parse().ok()?);
        for b in buckets.split(',').filter(|b| !b.is_empty()) {
            let (i, c) = b.split_once(':')?;
            let (i, c): (usize, u64) = (i.parse().ok()?, c.parse().ok()?);
            *self.counts.get_mut(i)? += c;
            self.n += c;
        }
        Some(())
    }
    /// The `q` quantile (0..=1) in µs.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let want = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                return value(i).min(self.max);
            }
        }
        self.max
    }
}

/// Where subscriber tasks report.
#[derive(Default)]
pub(crate) struct Sink {
    pub(crate) delivered: AtomicU64,
    pub(crate) last_ns: AtomicU64,
    pub(crate) joined: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) acks: AtomicU64,
    pub(crate) hist: Mutex<Hist>,
}

impl Sink {
    /// Moves a task's local latencies (µs) into the shared histogram.
    pub(crate) fn record(&self, local: &mut Vec<u32>) {
        if local.is_empty() {
            return;
        }
        let mut h = self.hist.lock().unwrap();
        for &v in local.iter() {
            h.record(u64::from(v));
        }
        local.clear();
    }
    pub(crate) fn take_hist(&self) -> Hist {
        std::mem::take(&mut *self.hist.lock().unwrap())
    }
    pub(crate) fn reset(&self) {
        self.delivered.store(0, Ordering::SeqCst);
        self.last_ns.store(0, Ordering::SeqCst);
        self.take_hist();
    }
}

/// VmRSS of a process, KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The PID of the first process whose command name is `comm` (e.g. `redis-server`), if any.
pub(crate) fn find_pid(comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let c = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (c.trim() == comm).then_some(pid)
    })
}

/// Busy time of the whole machine (all CPUs, everything but idle and iowait) and the part of it
/// in interrupts (irq + softirq: loopback traffic is processed there), ns.
pub(crate) fn machine_busy_ns() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = s.lines().next() else {
        return (0, 0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    let irq = f.get(5).copied().unwrap_or(0) + f.get(6).copied().unwrap_or(0);
    (
        busy * 1_000_000_000 / clk_tck(),
        irq * 1_000_000_000 / clk_tck(),
    )
}

fn clk_tck() -> u64 {
    static TCK: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100)
    });
    *TCK
}

/// Context switches of a process (voluntary and not, summed over its threads): a server's
/// wake-ups.
pub(crate) fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// `perf stat` counting a process's write syscalls (`write`, `writev`, `sendto`, `sendmsg`)
/// until [`PerfStat::finish`]: how many frames each write carried, for any server.
pub(crate) struct PerfStat {
    child: std::process::Child,
    out: std::path::PathBuf,
}

/// What [`PerfStat`] counted.
pub(crate) struct PerfCounts {
    pub(crate) writes: Option<u64>,
}

const WRITE_SYSCALLS: [&str; 4] = [
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_sendmsg",
];

impl PerfStat {
    pub(crate) fn start(pid: u32) -> anyhow::Result<PerfStat> {
        let out = std::env::temp_dir().join(format!("firebrand-bench-perf-{pid}.csv"));
        let child = std::process::Command::new("perf")
            .args(["stat", "-x", ",", "-e", &WRITE_SYSCALLS.join(","), "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("--syscalls needs `perf` (linux-perf): {e}"))?;
        // perf attaches to the threads asynchronously: give it a moment.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(PerfStat { child, out })
    }

    /// Stops perf (SIGINT, so it writes its counts) and sums the write syscalls.
    pub(crate) fn finish(mut self) -> anyhow::Result<PerfCounts> {
        std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let _ = std::fs::remove_file(&self.out);
        let mut writes = None;
        for l in text.lines() {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() > 2
                && WRITE_SYSCALLS.contains(&f[2])
                && let Ok(n) = f[0].parse::<u64>()
            {
                *writes.get_or_insert(0) += n;
            }
        }
        Ok(PerfCounts { writes })
    }
}

/// utime + stime of a process (all threads), ns.
pub(crate) fn cpu_ns(pid: u32) -> u64 {
    let (u, s) = cpu_split_ns(pid);
    u + s
}

/// (utime, stime) of a process (all threads), ns.
pub(crate) fn cpu_split_ns(pid: u32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0, 0);
    };
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return (0, 0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (
        t(11) * 1_000_000_000 / clk_tck(),
        t(12) * 1_000_000_000 / clk_tck(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let mut h = Hist::default();
        for v in 1..=10_000 {
            h.record(v);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.02, "{p50}");
        assert_eq!(h.max(), 10_000);
        let mut m = Hist::default();
        m.merge_sparse(&h.to_sparse()).unwrap();
        m.merge_sparse(&h.to_sparse()).unwrap();
        assert_eq!(m.count(), 20_000);
        assert_eq!(m.max(), 10_000);
        assert_eq!(m.quantile(0.5), h.quantile(0.5));
        for v in [0u64, 1, 127, 128, 255, 256, 1 << 20] {
            let i = index(v);
            assert!(value(i) <= v && v - value(i) <= v / 60 + 1, "{v}");
        }
    }
}
