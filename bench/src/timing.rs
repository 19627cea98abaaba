//! Timing helpers.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Calls `op` for at least `min` after a warm-up of a tenth of that; returns calls per second.
pub fn rate<T>(min: Duration, mut op: impl FnMut() -> T) -> f64 {
    let warm_up = Instant::now();
    while warm_up.elapsed() < min / 10 {
        black_box(op());
    }

    const BATCH: u64 = 64;
    let start = Instant::now();
    let mut calls = 0u64;
    loop {
        for _ in 0..BATCH {
            black_box(op());
        }
        calls += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= min {
            return calls as f64 / elapsed.as_secs_f64();
        }
    }
}

/// The `p`-th percentile (0 to 100) of sorted samples, by the nearest-rank method.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "no samples");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A small deterministic generator (xorshift64*), to pick ids without a dependency.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&samples[..1], 99.0), Duration::from_micros(1));
    }
}
