//! The halt probe for VMs with an in-kernel irqchip.

use std::sync::atomic::{AtomicU64, Ordering};

/// With an in-kernel LAPIC, HLT is handled inside KVM and never exits, so
/// the VMM asks periodically: every vCPU, kicked out of KVM_RUN, reports
/// whether it is halted with interrupts off (or never started). When all
/// are, nothing can wake any of them and the VM has ended.
#[derive(Default)]
pub struct HaltProbe {
    round: AtomicU64,
    /// Per vCPU: round << 1 | parked.
    answers: Vec<AtomicU64>,
}

impl HaltProbe {
    pub fn new(cpus: usize) -> Self {
        HaltProbe {
            round: AtomicU64::new(0),
            answers: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The round a kicked vCPU answers (0: no probe yet).
    pub fn round(&self) -> u64 {
        self.round.load(Ordering::Acquire)
    }

    /// A vCPU's answer for `round`.
    pub fn answer(&self, vcpu: u8, round: u64, parked: bool) {
        if let Some(a) = self.answers.get(usize::from(vcpu)) {
            a.store(round << 1 | u64::from(parked), Ordering::Release);
        }
    }

    /// Starts a new round.
    pub fn start(&self) -> u64 {
        self.round.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// `Some(all parked)` once every vCPU answered `round`.
    pub fn result(&self, round: u64) -> Option<bool> {
        let mut all = true;
        for a in &self.answers {
            let v = a.load(Ordering::Acquire);
            if v >> 1 != round {
                return None;
            }
            all &= v & 1 == 1;
        }
        Some(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_ends_when_every_vcpu_answered() {
        let p = HaltProbe::new(2);
        assert_eq!(p.round(), 0);
        let r = p.start();
        assert_eq!(p.result(r), None);
        p.answer(0, r, true);
        assert_eq!(p.result(r), None, "vCPU 1 has not answered");
        p.answer(1, r, false);
        assert_eq!(p.result(r), Some(false));
        let r2 = p.start();
        assert_eq!(p.result(r2), None, "old answers do not count");
        p.answer(0, r2, true);
        p.answer(1, r2, true);
        assert_eq!(p.result(r2), Some(true));
        p.answer(7, r2, false); // out of range: ignored
    }
}
