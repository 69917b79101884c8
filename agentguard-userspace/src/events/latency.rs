//! Hook-to-line latency of kernel events: from the moment the kernel hook
//! ran to the moment the event's line was written to the log (B5). Kept as
//! a histogram of 100 µs buckets up to 1 s, reported in `agentguard status`.
use serde::Serialize;

const BUCKET_US: u64 = 100;
const BUCKETS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    /// Beyond the last bucket.
    over: u64,
    total: u64,
    max_us: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub count: u64,
    /// Upper bounds (µs) of the bucket each percentile falls in.
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: vec![0; BUCKETS], over: 0, total: 0, max_us: 0 }
    }
}

impl Histogram {
    pub fn record_ns(&mut self, ns: i128) {
        let us = u64::try_from(ns.max(0) / 1000).unwrap_or(u64::MAX);
        match self.counts.get_mut(usize::try_from(us / BUCKET_US).unwrap_or(usize::MAX)) {
            Some(c) => *c += 1,
            None => self.over += 1,
        }
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((self.total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return ((i as u64 + 1) * BUCKET_US).min(self.max_us.max(1));
            }
        }
        self.max_us
    }

    pub fn summary(&self) -> Summary {
        Summary {
            count: self.total,
            p50_us: self.percentile(0.50),
            p99_us: self.percentile(0.99),
            p999_us: self.percentile(0.999),
            max_us: self.max_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_bucket_upper_bounds() {
        let mut h = Histogram::default();
        assert_eq!(h.summary(), Summary::default());
        for _ in 0..990 {
            h.record_ns(150_000); // 150 µs: bucket 100..200
        }
        for _ in 0..10 {
            h.record_ns(5_000_000); // 5 ms
        }
        h.record_ns(3_000_000_000); // 3 s: beyond the buckets
        let s = h.summary();
        assert_eq!((s.count, s.p50_us, s.p99_us, s.max_us), (1001, 200, 5_100, 3_000_000));
        assert_eq!(s.p999_us, 5_100);
        h.record_ns(-5);
        assert_eq!(h.summary().count, 1002, "clock skew counts as zero");
    }
}
