//! Percentiles and the lines the benchmarks print.

use std::time::Duration;

/// Latencies of one series, sorted.
pub struct Series {
    sorted: Vec<Duration>,
}

impl Series {
    pub fn new(mut samples: Vec<Duration>) -> Series {
        samples.sort();
        Series { sorted: samples }
    }

    /// The `q` quantile (0..=1), nearest rank.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((q * self.sorted.len() as f64).ceil() as usize).clamp(1, self.sorted.len());
        self.sorted[rank - 1]
    }

    /// How many samples (the tests check that every one came).
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.sorted.len()
    }

    pub fn p50(&self) -> Duration {
        self.quantile(0.50)
    }

    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// `a / b` with two decimals.
pub fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "-".into();
    }
    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let series = Series::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(series.p50(), Duration::from_millis(50));
        assert_eq!(series.p99(), Duration::from_millis(99));
        assert_eq!(series.quantile(1.0), Duration::from_millis(100));
        assert_eq!(Series::new(vec![]).p99(), Duration::ZERO);
    }
}
