//! Exit latency statistics: one HDR histogram per exit reason. `--stats`
//! prints them at the end; the benchmark uses the same type.

use crate::kvm::run_page::ExitReason;
use hdrhistogram::Histogram;
use std::fmt::Write;

/// A latency histogram in nanoseconds (1 ns .. 60 s, 3 significant digits).
/// Recording never allocates.
pub struct LatencyHistogram(Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        // The bounds are constants that hdrhistogram accepts.
        let h = Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds");
        LatencyHistogram(h)
    }
}

impl LatencyHistogram {
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1));
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn quantile(&self, q: f64) -> u64 {
        self.0.value_at_quantile(q)
    }

    pub fn max(&self) -> u64 {
        self.0.max()
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Both have the same bounds, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Every recorded value with its count (for plots).
    pub fn buckets(&self) -> Vec<(u64, u64)> {
        self.0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }
}

/// Per-exit-reason latency of one vCPU (or the merge of all).
#[derive(Default)]
pub struct ExitStats {
    by_reason: [Option<Box<LatencyHistogram>>; ExitReason::ALL.len()],
}

impl std::fmt::Debug for ExitStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.report())
    }
}

impl ExitStats {
    pub fn new() -> Self {
        let mut s = ExitStats::default();
        for slot in s.by_reason.iter_mut() {
            *slot = Some(Box::default());
        }
        s
    }

    #[inline]
    pub fn record(&mut self, reason: ExitReason, ns: u64) {
        if let Some(h) = &mut self.by_reason[reason.index()] {
            h.record(ns);
        }
    }

    /// The histogram of one exit reason.
    pub fn histogram(&self, reason: ExitReason) -> Option<&LatencyHistogram> {
        self.by_reason[reason.index()].as_deref()
    }

    pub fn merge(&mut self, other: &ExitStats) {
        for (mine, theirs) in self.by_reason.iter_mut().zip(other.by_reason.iter()) {
            if let (Some(m), Some(t)) = (mine, theirs) {
                m.merge(t);
            }
        }
    }

    /// The `--stats` report: count and round-trip percentiles per reason.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "exit reason", "count", "p50 ns", "p90 ns", "p99 ns", "max ns"
        );
        for reason in ExitReason::ALL {
            let Some(h) = &self.by_reason[reason.index()] else {
                continue;
            };
            if h.count() == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10}",
                reason.name(),
                h.count(),
                h.quantile(0.5),
                h.quantile(0.9),
                h.quantile(0.99),
                h.max()
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_recorded_reasons_only() {
        let mut s = ExitStats::new();
        for ns in 1..=100 {
            s.record(ExitReason::IoOut, ns * 10);
        }
        let r = s.report();
        assert!(r.contains("io-out"), "{r}");
        assert!(!r.contains("mmio-read"), "{r}");
        let line = r.lines().find(|l| l.starts_with("io-out")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "100");
        assert_eq!(cols[2], "500");
    }
}
