//! A DDSketch of latencies: relative-error quantiles from counts in fixed logarithmic
//! buckets, so windows and agents merge by adding counts and quantiles stay within 1%.
//!
//! The bucket layout is fixed (1 µs to 100 s at 1% relative accuracy, 924 buckets), which
//! lets the agent record with one atomic add per request and no allocation, and lets any
//! two sketches merge without rescaling. Written here rather than taken from a crate
//! because the crates record through `&mut` (a lock on a shared hot path).

use serde::{Deserialize, Serialize};

/// Relative accuracy of quantiles.
pub const ALPHA: f64 = 0.01;
/// Number of buckets: bucket 0 holds values up to 1 µs, the last everything from 100 s.
pub const BUCKETS: usize = 924;

fn gamma() -> f64 {
    (1.0 + ALPHA) / (1.0 - ALPHA)
}

/// The bucket a latency of `micros` microseconds falls into.
pub fn bucket(micros: f64) -> usize {
    if micros.is_nan() || micros <= 1.0 {
        return 0;
    }
    let index = (micros.ln() / gamma().ln()).ceil();
    (index as usize).min(BUCKETS - 1)
}

/// The value a bucket stands for (within [`ALPHA`] of every value in it).
pub fn value(bucket: usize) -> f64 {
    if bucket == 0 {
        return 1.0;
    }
    let g = gamma();
    2.0 * g.powi(bucket as i32) / (g + 1.0)
}

/// Counts per bucket, stored sparsely.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySketch {
    /// `(bucket, count)` for each non-empty bucket, by bucket.
    pub buckets: Vec<(u16, u64)>,
}

impl LatencySketch {
    /// A sketch from dense counts (one per bucket).
    pub fn from_counts(counts: &[u64]) -> Self {
        Self {
            buckets: counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| (i as u16, c))
                .collect(),
        }
    }

    /// Dense counts, one per bucket.
    pub fn counts(&self) -> Vec<u64> {
        let mut out = vec![0u64; BUCKETS];
        for &(b, c) in &self.buckets {
            if let Some(slot) = out.get_mut(b as usize) {
                *slot = slot.saturating_add(c);
            }
        }
        out
    }

    /// Records one latency.
    pub fn record(&mut self, micros: f64) {
        let b = bucket(micros) as u16;
        match self.buckets.binary_search_by_key(&b, |&(k, _)| k) {
            Ok(i) => self.buckets[i].1 += 1,
            Err(i) => self.buckets.insert(i, (b, 1)),
        }
    }

    /// Adds `other`'s counts to this sketch.
    pub fn merge(&mut self, other: &Self) {
        let mut counts = self.counts();
        for &(b, c) in &other.buckets {
            if let Some(slot) = counts.get_mut(b as usize) {
                *slot = slot.saturating_add(c);
            }
        }
        *self = Self::from_counts(&counts);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0, |sum, &(_, c)| sum.saturating_add(c))
    }

    /// The `q`-quantile in microseconds (`q` in `[0, 1]`), or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (total - 1) as f64).floor() as u64;
        let mut seen = 0;
        for &(b, c) in &self.buckets {
            seen = c.saturating_add(seen);
            if seen > rank {
                return Some(value(b as usize));
            }
        }
        self.buckets.last().map(|&(b, _)| value(b as usize))
    }

    /// Counts of values at or below each of `bounds` (microseconds), cumulative, for
    /// Prometheus histogram buckets.
    pub fn cumulative(&self, bounds: &[f64]) -> Vec<u64> {
        bounds
            .iter()
            .map(|&le| {
                self.buckets
                    .iter()
                    .filter(|&&(b, _)| value(b as usize) <= le)
                    .fold(0, |sum: u64, &(_, c)| sum.saturating_add(c))
            })
            .collect()
    }

    /// The sum of the values recorded, from the buckets (within [`ALPHA`]).
    pub fn approximate_sum(&self) -> f64 {
        self.buckets.iter().map(|&(b, c)| value(b as usize) * c as f64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SeededRng;

    #[test]
    fn quantiles_are_within_the_relative_accuracy() {
        let mut rng = SeededRng::new(5);
        let mut values: Vec<f64> = (0..50_000).map(|_| rng.normal(7.0, 1.5).exp()).collect();
        let mut sketch = LatencySketch::default();
        for &v in &values {
            sketch.record(v);
        }
        values.sort_by(f64::total_cmp);
        for q in [0.5, 0.9, 0.95, 0.99, 0.999] {
            let exact = values[(q * (values.len() - 1) as f64).floor() as usize];
            let got = sketch.quantile(q).unwrap();
            assert!((got - exact).abs() <= exact * ALPHA * 1.01, "q{q}: {got} vs {exact}");
        }
        assert_eq!(sketch.count(), 50_000);
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let mut rng = SeededRng::new(6);
        let (mut a, mut b, mut all) =
            (LatencySketch::default(), LatencySketch::default(), LatencySketch::default());
        for i in 0..10_000 {
            let v = rng.range(1.0, 1e6);
            if i % 3 == 0 {
                a.record(v);
            } else {
                b.record(v);
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }

    #[test]
    fn buckets_cover_the_range_and_clamp_outside_it() {
        assert_eq!(bucket(0.2), 0);
        assert_eq!(bucket(f64::NAN), 0);
        assert_eq!(bucket(1e12), BUCKETS - 1);
        assert!(bucket(99_999_000.0) < BUCKETS - 1);
        for b in 1..BUCKETS - 1 {
            let v = value(b);
            assert_eq!(bucket(v), b, "bucket {b} value {v}");
        }
        assert!(LatencySketch::default().quantile(0.5).is_none());
    }

    #[test]
    fn cumulative_counts_for_prometheus() {
        let mut s = LatencySketch::default();
        for v in [10.0, 100.0, 1000.0, 10_000.0] {
            s.record(v);
        }
        assert_eq!(s.cumulative(&[50.0, 500.0, 5_000.0, 1e9]), vec![1, 2, 3, 4]);
        let exact: f64 = [10.0, 100.0, 1000.0, 10_000.0].iter().sum();
        assert!((s.approximate_sum() - exact).abs() <= exact * ALPHA, "{}", s.approximate_sum());
    }
}
