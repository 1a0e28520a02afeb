//! Reconnect backoff and the transport packet limit.

use std::time::Duration;

/// Transport packet limit: far above the task limit so an oversized task
/// reaches the application and gets an error result instead of dropping the
/// connection (which would make the broker redeliver it forever).
pub fn transport_limit(max_payload: usize) -> usize {
    (max_payload.saturating_mul(4)).max(16 * 1024 * 1024)
}

/// Jittered exponential backoff ("equal jitter": half fixed, half random).
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            initial_ms: initial_ms.max(1),
            max_ms: max_ms.max(initial_ms.max(1)),
            attempt: 0,
        }
    }
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .initial_ms
            .saturating_mul(1u64 << self.attempt.min(30))
            .min(self.max_ms);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        Duration::from_millis(half + fastrand::u64(0..=exp - half))
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let mut b = Backoff::new(100, 1000);
        let d: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!((50..=100).contains(&d[0]), "{d:?}");
        assert!((100..=200).contains(&d[1]), "{d:?}");
        assert!(d[7] <= 1000 && d[7] >= 500, "{d:?}");
        b.reset();
        assert!(b.next_delay().as_millis() <= 100);
    }

    #[test]
    fn transport_limit_exceeds_task_limit() {
        assert!(transport_limit(1024) > 1024);
        assert!(transport_limit(64 << 20) >= 4 * (64 << 20));
    }
}
