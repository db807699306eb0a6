//! Randomized delays, in one place: the exponential backoff of reconnecting links and the jitter
//! that spreads timers (reconnects, keepalives) of many connections apart.

use std::time::Duration;

/// A random `u64` from the operating system (0 if it has none to give, which only makes delays
/// less random).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map(|_| u64::from_le_bytes(b)).unwrap_or(0)
}

/// A uniformly random duration in `[0, d]`, at microsecond resolution.
pub fn random_up_to(d: Duration) -> Duration {
    let span = d.as_micros() as u64;
    Duration::from_micros(if span == 0 { 0 } else { random_u64() % (span + 1) })
}

/// `d` jittered down to a random duration in `[d/2, d]`.
pub fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + random_up_to(d - half)
}

/// Exponential backoff with jitter: `min`, doubling per attempt up to `max`, each delay jittered to
/// 50–100 % (see [`jitter`]).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, attempt: 0 }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.min.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        jitter(base)
    }

    /// Starts over from `min` (the last attempt succeeded for long enough).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        let first = b.next_delay();
        assert!(first >= min / 2 && first <= min, "{first:?}");
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= max, "{d:?}");
        }
        let d = b.next_delay();
        assert!(d >= max / 2, "{d:?}");
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn jitter_stays_in_range() {
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        assert_eq!(random_up_to(Duration::ZERO), Duration::ZERO);
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(10));
            assert!(d >= Duration::from_millis(5) && d <= Duration::from_millis(10), "{d:?}");
            assert!(random_up_to(Duration::from_millis(3)) <= Duration::from_millis(3));
        }
    }
}
