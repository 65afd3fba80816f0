//! Latency histogram, the subscriber sink, and /proc readers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Nanoseconds since the bench started (the timestamp put in payloads).
pub(crate) fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
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

/// utime + stime of a process (all threads), ns.
pub(crate) fn cpu_ns(pid: u32) -> u64 {
    static TCK: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100)
    });
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    ticks * 1_000_000_000 / *TCK
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
        for v in [0u64, 1, 127, 128, 255, 256, 1 << 20] {
            let i = index(v);
            assert!(value(i) <= v && v - value(i) <= v / 60 + 1, "{v}");
        }
    }
}
