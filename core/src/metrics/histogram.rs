//! A cumulative histogram with fixed bucket bounds, as Prometheus exposes one.

use serde::{Deserialize, Serialize};

/// Bounds (seconds) of `nixenv_pull_duration_seconds`: a warm cache answers in well under a
/// second, a large closure over a slow link takes minutes.
pub const PULL_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Bounds (seconds) of `nixenv_prepare_duration_seconds`: a warm start costs milliseconds,
/// a cold one includes its pull.
pub const PREPARE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Observations counted per bucket: `counts[i]` is the number of observations `<= bounds[i]`
/// and above the bound before it; `counts[bounds.len()]` those above every bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts one observation.
    pub fn observe(&mut self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Whether it has the shape of a histogram over `bounds` (a file written by a version with
    /// other buckets, or damaged, has not).
    pub fn fits(&self, bounds: &[f64]) -> bool {
        self.bounds == bounds && self.counts.len() == bounds.len() + 1
    }

    /// Adds `other`'s observations (same bounds; otherwise `other` is ignored and `false`
    /// returned).
    pub fn merge(&mut self, other: &Histogram) -> bool {
        if !other.fits(&self.bounds) || self.counts.len() != other.counts.len() {
            return false;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
        true
    }

    /// `(upper bound, cumulative count)` per bucket, the last one `+Inf`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.counts)
            .map(|(b, c)| {
                total += c;
                (b, total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_accumulate() {
        let mut h = Histogram::new(&[1.0, 5.0]);
        h.observe(0.5);
        h.observe(1.0);
        h.observe(3.0);
        h.observe(100.0);
        assert_eq!(h.cumulative(), vec![(1.0, 2), (5.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(h.count, 4);
        assert_eq!(h.sum, 104.5);

        let mut total = Histogram::new(&[1.0, 5.0]);
        assert!(total.merge(&h));
        assert!(total.merge(&h));
        assert_eq!(total.cumulative().last(), Some(&(f64::INFINITY, 8)));
        assert!(!total.merge(&Histogram::new(&[2.0])));
        assert_eq!(total.count, 8);
    }
}
