//! Reconnect and rejoin delays, and the jitter spread over them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A delay schedule: the delay before attempt number `tries` (1 for the first retry).
pub(crate) type Schedule = Arc<dyn Fn(u32) -> Duration + Send + Sync>;

/// The official client's `reconnectAfterMs`:
/// `[10, 50, 100, 150, 200, 250, 500, 1000, 2000][tries - 1]`, then 5 s.
///
/// ```
/// use std::time::Duration;
/// use firebrand_client::reconnect_after;
/// assert_eq!(reconnect_after(1), Duration::from_millis(10));
/// assert_eq!(reconnect_after(9), Duration::from_millis(2000));
/// assert_eq!(reconnect_after(10), Duration::from_millis(5000));
/// ```
pub fn reconnect_after(tries: u32) -> Duration {
    const STEPS: [u64; 9] = [10, 50, 100, 150, 200, 250, 500, 1000, 2000];
    pick(&STEPS, tries, 5000)
}

/// The official client's `rejoinAfterMs`: `[1000, 2000, 5000][tries - 1]`, then 10 s.
///
/// ```
/// use std::time::Duration;
/// use firebrand_client::rejoin_after;
/// assert_eq!(rejoin_after(1), Duration::from_secs(1));
/// assert_eq!(rejoin_after(4), Duration::from_secs(10));
/// ```
pub fn rejoin_after(tries: u32) -> Duration {
    pick(&[1000, 2000, 5000], tries, 10_000)
}

fn pick(steps: &[u64], tries: u32, otherwise: u64) -> Duration {
    let i = usize::try_from(tries).unwrap_or(usize::MAX).wrapping_sub(1);
    Duration::from_millis(steps.get(i).copied().unwrap_or(otherwise))
}

/// Spreads `delay` uniformly over `delay × [1 - jitter, 1 + jitter]` (`jitter` in `0.0..=1.0`).
pub(crate) fn jittered(delay: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return delay;
    }
    let jitter = jitter.min(1.0);
    let factor = 1.0 + jitter * (2.0 * random_unit() - 1.0);
    delay.mul_f64(factor.max(0.0))
}

/// A uniform number in `[0, 1)` from a SplitMix64 sequence seeded by the clock. Not for
/// cryptography: it only keeps many clients from retrying in lockstep.
fn random_unit() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.load(Ordering::Relaxed);
    if seed == 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // Mix in an address so processes started in the same nanosecond still differ.
        let local = 0u8;
        seed = ((now.as_nanos() as u64) ^ (((&raw const local) as usize as u64) << 16)) | 1;
    }
    let next = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    STATE.store(next, Ordering::Relaxed);
    let mut z = next;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_phoenix_js() {
        let ms = |d: Duration| d.as_millis();
        let reconnect: Vec<_> = (1..=11).map(|t| ms(reconnect_after(t))).collect();
        assert_eq!(
            reconnect,
            [10, 50, 100, 150, 200, 250, 500, 1000, 2000, 5000, 5000]
        );
        let rejoin: Vec<_> = (1..=5).map(|t| ms(rejoin_after(t))).collect();
        assert_eq!(rejoin, [1000, 2000, 5000, 10_000, 10_000]);
        // tries = 0 never happens, but must not panic.
        assert_eq!(ms(reconnect_after(0)), 5000);
    }

    #[test]
    fn jitter_stays_in_range_and_spreads() {
        let base = Duration::from_millis(1000);
        assert_eq!(jittered(base, 0.0), base);
        let samples: Vec<_> = (0..1000).map(|_| jittered(base, 0.5)).collect();
        assert!(
            samples
                .iter()
                .all(|d| (500..=1500).contains(&d.as_millis()))
        );
        let low = samples.iter().filter(|d| d.as_millis() < 1000).count();
        assert!((350..650).contains(&low), "{low} of 1000 below the base");
    }
}
