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

/// Groups the exits of one emulated instruction: KVM may exit for MMIO
/// accesses of the operand before it gives up on the instruction (`lock
/// cmpxchg16b [mmio]`: two 8-byte reads, then the emulation failure), all
/// at the instruction's RIP. The guest pays all of them for the one
/// instruction.
#[derive(Debug, Default, Clone, Copy)]
pub struct InstructionChain {
    rip: Option<u64>,
    ns: u64,
}

impl InstructionChain {
    /// Adds one exit at `rip` (`None`: not known, starts no chain); returns
    /// the whole instruction's round trips once an emulation exit ends it.
    #[inline]
    pub fn exit(&mut self, reason: ExitReason, rip: Option<u64>, ns: u64) -> Option<u64> {
        let same = rip.is_some() && self.rip == rip;
        match reason {
            ExitReason::Emulation => {
                let total = if same { self.ns + ns } else { ns };
                *self = InstructionChain::default();
                Some(total)
            }
            ExitReason::MmioRead | ExitReason::MmioWrite | ExitReason::IoIn | ExitReason::IoOut => {
                if same {
                    self.ns += ns;
                } else {
                    *self = InstructionChain { rip, ns };
                }
                None
            }
            _ => None,
        }
    }
}

/// Per-exit-reason latency of one vCPU (or the merge of all), and per
/// emulated instruction (its exits together, see [`InstructionChain`]).
#[derive(Default)]
pub struct ExitStats {
    by_reason: [Option<Box<LatencyHistogram>>; ExitReason::ALL.len()],
    instructions: Box<LatencyHistogram>,
    chain: InstructionChain,
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

    /// Records one exit's round trip; `rip` is the RIP it exited at (when
    /// known), to group an emulated instruction's exits.
    #[inline]
    pub fn record(&mut self, reason: ExitReason, rip: Option<u64>, ns: u64) {
        if let Some(h) = &mut self.by_reason[reason.index()] {
            h.record(ns);
        }
        if let Some(total) = self.chain.exit(reason, rip, ns) {
            self.instructions.record(total);
        }
    }

    /// Per emulated instruction: its emulation exit and the MMIO/PIO exits
    /// KVM made at the same RIP right before it.
    pub fn instructions(&self) -> &LatencyHistogram {
        &self.instructions
    }

    /// The histogram of one exit reason.
    pub fn histogram(&self, reason: ExitReason) -> Option<&LatencyHistogram> {
        self.by_reason[reason.index()].as_deref()
    }

    pub fn merge(&mut self, other: &ExitStats) {
        self.instructions.merge(&other.instructions);
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
        let h = &self.instructions;
        if h.count() > 0 {
            let _ = writeln!(
                s,
                "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10}  (per emulated instruction, with KVM's MMIO exits for it)",
                "emulated-insn",
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
            s.record(ExitReason::IoOut, None, ns * 10);
        }
        let r = s.report();
        assert!(r.contains("io-out"), "{r}");
        assert!(!r.contains("mmio-read"), "{r}");
        let line = r.lines().find(|l| l.starts_with("io-out")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "100");
        assert_eq!(cols[2], "500");
        assert!(!r.contains("emulated-insn"), "{r}");
    }

    #[test]
    fn an_instructions_exits_at_one_rip_count_together() {
        let mut s = ExitStats::new();
        // cmpxchg16b on MMIO: two reads at its RIP, then the failure.
        for _ in 0..3 {
            s.record(ExitReason::MmioRead, Some(0x1000), 100);
            s.record(ExitReason::MmioRead, Some(0x1000), 100);
            s.record(ExitReason::Emulation, Some(0x1000), 300);
        }
        // An MMIO exit elsewhere does not join the next instruction.
        s.record(ExitReason::MmioWrite, Some(0x2000), 7000);
        s.record(ExitReason::Emulation, Some(0x3000), 300);
        // Unknown RIPs never chain.
        s.record(ExitReason::MmioRead, None, 7000);
        s.record(ExitReason::Emulation, None, 300);
        let h = s.instructions();
        assert_eq!(h.count(), 5);
        assert_eq!(h.max(), 500);
        assert_eq!(h.quantile(0.0), 300);
        assert!(s.report().contains("emulated-insn"));
    }
}
