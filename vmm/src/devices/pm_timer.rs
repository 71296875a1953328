//! The ACPI power-management timer (ACPI spec, "Power Management Timer"):
//! a free-running up-counter at 3.579545 MHz, read as a 32-bit port at
//! PM_TMR_BLK. QEMU's PIIX4/ICH9 timers are 24 bits wide; ours counts all 32
//! bits and the FADT says so with TMR_VAL_EXT, which makes it wrap every
//! ~20 minutes instead of every ~4.7 s. The count is derived from a monotonic
//! host clock, so it needs no thread and costs nothing until the guest reads.
//!
//! kvm-unit-tests finds the port through the FADT's `pm_tmr_blk`
//! (`x86/vmexit.c`'s `inl_from_pmtimer` exit benchmark).

use crate::bus::{BusAction, PioDevice};
use std::time::Instant;

/// PM_TMR_BLK: QEMU's PIIX4 PM base 0x600 plus the timer's offset 8.
pub const PM_TMR_PORT: u16 = 0x608;
/// PM_TMR_LEN in the FADT.
pub const PM_TMR_LEN: u16 = 4;
/// The timer's fixed frequency, in Hz.
pub const PM_TMR_FREQUENCY: u64 = 3_579_545;
/// TMR_VAL_EXT: the counter is 32 bits wide (FADT flags bit 8).
pub const PM_TMR_VAL_EXT: bool = true;
const PM_TMR_MASK: u32 = if PM_TMR_VAL_EXT {
    u32::MAX
} else {
    0x00ff_ffff
};
const NANOS_PER_SEC: u128 = 1_000_000_000;

pub struct PmTimer {
    start: Instant,
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl PmTimer {
    /// A timer that reads zero now.
    pub fn new() -> Self {
        PmTimer {
            start: Instant::now(),
        }
    }

    /// The counter value at `now` (an instant before creation reads zero).
    pub fn count_at(&self, now: Instant) -> u32 {
        let ns = now.saturating_duration_since(self.start).as_nanos();
        let ticks = ns * u128::from(PM_TMR_FREQUENCY) / NANOS_PER_SEC;
        // The register shows the low bits of an ever-growing count.
        (ticks as u32) & PM_TMR_MASK
    }
}

impl PioDevice for PmTimer {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        // The spec asks for 32-bit reads; narrower ones see the matching
        // bytes, wider or misplaced ones read zero beyond the register.
        data.fill(0);
        let value = self.count_at(Instant::now()).to_le_bytes();
        if let Some(src) = value.get(usize::from(offset)..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn pio_write(&mut self, _offset: u16, _data: &[u8]) -> BusAction {
        // Read-only register.
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn read(t: &mut PmTimer) -> u32 {
        let mut b = [0u8; 4];
        t.pio_read(0, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn counts_at_the_acpi_frequency() {
        let t = PmTimer::new();
        assert_eq!(t.count_at(t.start), 0);
        assert_eq!(t.count_at(t.start + Duration::from_secs(1)), 3_579_545);
        assert_eq!(t.count_at(t.start + Duration::from_millis(10)), 35_795);
        // 2^32 ticks is 1199.86 s: the register wraps, it does not saturate.
        let wrap = t.start + Duration::from_secs(1200);
        let want = (1200 * PM_TMR_FREQUENCY - (1 << 32)) as u32;
        assert_eq!(t.count_at(wrap), want);
    }

    #[test]
    fn advances_in_real_time() {
        let mut t = PmTimer::new();
        let a = read(&mut t);
        std::thread::sleep(Duration::from_millis(5));
        let b = read(&mut t);
        let delta = b.wrapping_sub(a) & PM_TMR_MASK;
        // At least 5 ms worth of ticks; an upper bound loose enough for a
        // loaded CI machine but far below a wrap.
        assert!(delta >= 17_897, "{delta}");
        assert!(delta < 10 * PM_TMR_FREQUENCY as u32, "{delta}");
    }

    #[test]
    fn narrow_reads_see_the_matching_bytes_and_writes_are_ignored() {
        let mut t = PmTimer::new();
        t.start -= Duration::from_secs(1); // count ~0x0036_9e99 and growing
        t.pio_write(0, &[0; 4]);
        let mut hi = [0u8; 2];
        t.pio_read(2, &mut hi);
        assert_eq!(hi[1], 0, "bits 24-31 are still zero after 1 s");
        assert!(hi[0] >= 0x36);
        let mut over = [0xffu8; 2];
        t.pio_read(3, &mut over);
        assert_eq!(over[1], 0);
    }
}
