//! A token bucket, for rate limits on what a peer may make a server store or log: pure,
//! with the time passed in, so a test can step it.

use std::time::{Duration, Instant};

/// Holds at most `burst` tokens and gains `per_second`; each admitted unit takes one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(burst: u32, per_second: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            last: now,
        }
    }

    /// Takes `n` tokens if it holds them at `now`; takes nothing otherwise.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        let gained = now.saturating_duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + gained).min(self.burst);
        self.last = now.max(self.last);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// How long until `n` tokens are there (never, if `n` is more than the burst).
    pub fn wait_for(&self, n: u64) -> Option<Duration> {
        let missing = n as f64 - self.tokens;
        if n as f64 > self.burst {
            None
        } else if missing <= 0.0 {
            Some(Duration::ZERO)
        } else {
            Some(Duration::from_secs_f64(
                missing / self.per_second.max(f64::MIN_POSITIVE),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 2, start);
        assert!(bucket.take(10, start));
        assert!(!bucket.take(1, start), "empty");
        assert_eq!(bucket.wait_for(1), Some(Duration::from_millis(500)));
        assert!(!bucket.take(2, start + Duration::from_millis(900)));
        assert!(bucket.take(2, start + Duration::from_millis(1000)));
        assert!(
            !bucket.take(11, start + Duration::from_secs(3600)),
            "never more than the burst"
        );
        assert!(bucket.take(10, start + Duration::from_secs(3600)));
        assert_eq!(bucket.wait_for(11), None);
    }
}
