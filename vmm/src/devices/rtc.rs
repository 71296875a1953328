//! The PC's real-time clock and CMOS RAM (Motorola MC146818A), at ports
//! 0x70 (index; bit 7 of a write is the NMI mask) and 0x71 (data).
//!
//! No rust-vmm crate provides it: vm-superio's `Rtc` is the ARM PL031.
//!
//! The clock is the host's UTC time plus an offset the guest sets by
//! writing the time registers. Nothing runs in the background: every
//! register is computed from the host clock when the guest reads it.
//! - Time registers 0x00-0x09 and the century (0x32) in BCD or binary and
//!   12- or 24-hour form as register B says.
//! - Register A: UIP (bit 7) reads 1 during the last 244 us of every
//!   second, before the registers change, as on the chip; the divider and
//!   rate bits are stored (the clock always runs).
//! - Register B: SET stops updates (UIP reads 0 and the time freezes until
//!   SET is cleared), DM, 24/12, and the interrupt enables AIE/UIE/PIE.
//! - Register C: UF and AF, set when an update or an alarm match happened
//!   since the last read of C (read clears), IRQF when an enabled one did.
//!   IRQ 8 is not raised (no guest here needs it); a sleeping VM asks
//!   [`Rtc::next_alarm`] when the alarm will fire (ACPI S3 wake-up).
//! - Register D: VRT (valid RAM and time) set.
//! - The bytes a BIOS fills: base memory (0x15/0x16, KiB), extended memory
//!   above 1 MiB (0x17/0x18 and 0x30/0x31, KiB, at most 0xffff), memory
//!   above 16 MiB (0x34/0x35, 64 KiB units), above 4 GiB (0x5b-0x5d, 64 KiB
//!   units), vCPUs minus one (0x5f, as QEMU), the century (0x32) and the
//!   checksum of 0x10-0x2d (0x2e/0x2f).

use crate::bus::{BusAction, PioDevice};
use crate::layout;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const RTC_PORT: u16 = 0x70;
pub const RTC_LEN: u16 = 2;

const REG_SECONDS: usize = 0x00;
const REG_SECONDS_ALARM: usize = 0x01;
const REG_MINUTES: usize = 0x02;
const REG_MINUTES_ALARM: usize = 0x03;
const REG_HOURS: usize = 0x04;
const REG_HOURS_ALARM: usize = 0x05;
const REG_DAY_OF_WEEK: usize = 0x06;
const REG_DAY_OF_MONTH: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
pub const REG_A: usize = 0x0a;
pub const REG_B: usize = 0x0b;
pub const REG_C: usize = 0x0c;
pub const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;
const CMOS_BASE_MEM_LO: usize = 0x15;
const CMOS_EXT_MEM_LO: usize = 0x17;
const CMOS_EXT_MEM2_LO: usize = 0x30;
const CMOS_MEM_ABOVE_16M_LO: usize = 0x34;
const CMOS_MEM_ABOVE_4G: usize = 0x5b;
const CMOS_NB_CPUS: usize = 0x5f;
const CMOS_CHECKSUM_HI: usize = 0x2e;

pub const REG_A_UIP: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate: what SeaBIOS writes.
const REG_A_BIOS: u8 = 0x26;
pub const REG_B_SET: u8 = 0x80;
pub const REG_B_PIE: u8 = 0x40;
pub const REG_B_AIE: u8 = 0x20;
pub const REG_B_UIE: u8 = 0x10;
/// Binary (not BCD) data mode.
pub const REG_B_DM: u8 = 0x04;
/// 24-hour mode.
pub const REG_B_24H: u8 = 0x02;
pub const REG_C_IRQF: u8 = 0x80;
pub const REG_C_AF: u8 = 0x20;
pub const REG_C_UF: u8 = 0x10;
const REG_D_VRT: u8 = 0x80;
/// An alarm byte with its two top bits set matches any value.
const ALARM_DONT_CARE: u8 = 0xc0;
/// The chip raises UIP this long before each update.
pub const UIP_LEAD: Duration = Duration::from_micros(244);
const SECS_PER_DAY: i64 = 86_400;

/// Where the wall clock comes from (the host's, or a fixed one in tests).
pub type Clock = Box<dyn Fn() -> Duration + Send>;

fn host_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// A calendar time, all fields binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday.
    weekday: u8,
}

/// Days since 1970-01-01 to a civil date (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A civil date to days since 1970-01-01.
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let rem = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (5 with Sunday = 1).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month.clamp(1, 12), self.day.clamp(1, 31)) * SECS_PER_DAY
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.minute.min(59)) * 60
            + i64::from(self.second.min(59))
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

pub struct Rtc {
    /// CMOS RAM; the time registers' bytes are computed, not stored.
    cmos: [u8; 128],
    index: u8,
    /// Bit 7 of the last index write (NMI disabled; recorded only: the VMM
    /// raises no NMIs).
    nmi_masked: bool,
    clock: Clock,
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// While register B's SET bit is on: the frozen time the guest edits.
    frozen: Option<i64>,
    /// Guest time (ns since the epoch) of the last read of register C.
    last_c: i128,
}

impl Rtc {
    /// An RTC on the host's clock with the CMOS bytes for `mem_size` bytes
    /// of RAM laid out as [`layout::ram_regions`] and `cpus` vCPUs.
    pub fn new(mem_size: u64, cpus: u8) -> Self {
        Self::with_clock(mem_size, cpus, Box::new(host_clock))
    }

    pub fn with_clock(mem_size: u64, cpus: u8, clock: Clock) -> Self {
        let mut rtc = Rtc {
            cmos: [0; 128],
            index: 0,
            nmi_masked: false,
            clock,
            offset: 0,
            frozen: None,
            last_c: 0,
        };
        rtc.last_c = rtc.now_ns();
        rtc.cmos[REG_A] = REG_A_BIOS;
        rtc.cmos[REG_B] = REG_B_24H;
        rtc.cmos[REG_D] = REG_D_VRT;
        rtc.fill_memory_size(mem_size);
        rtc.cmos[CMOS_NB_CPUS] = cpus.saturating_sub(1);
        rtc.update_checksum();
        rtc
    }

    fn fill_memory_size(&mut self, mem_size: u64) {
        let put16 = |cmos: &mut [u8; 128], at: usize, v: u64| {
            let v = v.min(0xffff) as u16;
            cmos[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        let low = mem_size.min(layout::RAM_32BIT_END);
        let high = mem_size - low;
        put16(&mut self.cmos, CMOS_BASE_MEM_LO, 640);
        let ext_kib = low.saturating_sub(1 << 20) >> 10;
        put16(&mut self.cmos, CMOS_EXT_MEM_LO, ext_kib);
        put16(&mut self.cmos, CMOS_EXT_MEM2_LO, ext_kib);
        put16(
            &mut self.cmos,
            CMOS_MEM_ABOVE_16M_LO,
            low.saturating_sub(16 << 20) >> 16,
        );
        let above_4g = (high >> 16).min(0xff_ffff) as u32;
        self.cmos[CMOS_MEM_ABOVE_4G..CMOS_MEM_ABOVE_4G + 3]
            .copy_from_slice(&above_4g.to_le_bytes()[..3]);
    }

    fn update_checksum(&mut self) {
        let sum: u16 = self.cmos[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
        self.cmos[CMOS_CHECKSUM_HI..CMOS_CHECKSUM_HI + 2].copy_from_slice(&sum.to_be_bytes());
    }

    /// Guest time, ns since the epoch.
    fn now_ns(&self) -> i128 {
        (self.clock)().as_nanos() as i128 + i128::from(self.offset) * 1_000_000_000
    }

    /// The guest's current time, whole seconds.
    fn now_secs(&self) -> i64 {
        self.frozen
            .unwrap_or_else(|| self.now_ns().div_euclid(1_000_000_000) as i64)
    }

    fn binary(&self) -> bool {
        self.cmos[REG_B] & REG_B_DM != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.cmos[REG_B] & REG_B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { 0x80 } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & REG_B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h + 12
        } else {
            h
        }
    }

    /// Whether the alarm registers match time `t` (whole seconds).
    fn alarm_matches(&self, t: i64) -> bool {
        let dt = DateTime::from_unix(t);
        let field = |reg: usize, v: u8, hour: bool| {
            let a = self.cmos[reg];
            a & ALARM_DONT_CARE == ALARM_DONT_CARE
                || if hour {
                    self.decode_hour(a) == v
                } else {
                    self.decode(a) == v
                }
        };
        field(REG_SECONDS_ALARM, dt.second, false)
            && field(REG_MINUTES_ALARM, dt.minute, false)
            && field(REG_HOURS_ALARM, dt.hour, true)
    }

    /// The first second in `(from, to]` whose update matches the alarm.
    fn alarm_between(&self, from: i64, to: i64) -> Option<i64> {
        // The alarm repeats at least daily; looking one day ahead suffices.
        let end = to.min(from + SECS_PER_DAY);
        (from + 1..=end).find(|&t| self.alarm_matches(t))
    }

    /// Register C: the flags of what happened since the last read.
    fn read_c(&mut self) -> u8 {
        let now = self.now_ns();
        let (from, to) = (
            self.last_c.div_euclid(1_000_000_000) as i64,
            now.div_euclid(1_000_000_000) as i64,
        );
        self.last_c = now;
        if self.frozen.is_some() || to <= from {
            return 0;
        }
        let mut c = REG_C_UF;
        if self.alarm_between(from, to).is_some() {
            c |= REG_C_AF;
        }
        let b = self.cmos[REG_B];
        let raised =
            (c & REG_C_UF != 0 && b & REG_B_UIE != 0) || (c & REG_C_AF != 0 && b & REG_B_AIE != 0);
        if raised {
            c |= REG_C_IRQF;
        }
        c
    }

    /// How long from now until the alarm interrupt fires (AIE set and the
    /// alarm matches within a day), for waking a sleeping VM.
    pub fn next_alarm(&self) -> Option<Duration> {
        if self.cmos[REG_B] & REG_B_AIE == 0 || self.frozen.is_some() {
            return None;
        }
        let now = self.now_ns();
        let secs = now.div_euclid(1_000_000_000) as i64;
        let t = self.alarm_between(secs, secs + SECS_PER_DAY)?;
        let ns = i128::from(t) * 1_000_000_000 - now;
        Some(Duration::from_nanos(ns.max(0) as u64))
    }

    /// The register the index port selects.
    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn nmi_masked(&self) -> bool {
        self.nmi_masked
    }

    fn read_time_reg(&self, reg: usize) -> u8 {
        let dt = DateTime::from_unix(self.now_secs());
        match reg {
            REG_SECONDS => self.encode(dt.second),
            REG_MINUTES => self.encode(dt.minute),
            REG_HOURS => self.encode_hour(dt.hour),
            REG_DAY_OF_WEEK => self.encode(dt.weekday),
            REG_DAY_OF_MONTH => self.encode(dt.day),
            REG_MONTH => self.encode(dt.month),
            REG_YEAR => self.encode(dt.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(dt.year.div_euclid(100).clamp(0, 99) as u8),
            _ => self.cmos[reg],
        }
    }

    fn write_time_reg(&mut self, reg: usize, v: u8) {
        let t = self.now_secs();
        let mut dt = DateTime::from_unix(t);
        match reg {
            REG_SECONDS => dt.second = self.decode(v),
            REG_MINUTES => dt.minute = self.decode(v),
            REG_HOURS => dt.hour = self.decode_hour(v),
            // Derived from the date here.
            REG_DAY_OF_WEEK => return,
            REG_DAY_OF_MONTH => dt.day = self.decode(v),
            REG_MONTH => dt.month = self.decode(v),
            REG_YEAR => dt.year = dt.year.div_euclid(100) * 100 + i64::from(self.decode(v) % 100),
            REG_CENTURY => dt.year = i64::from(self.decode(v)) * 100 + dt.year.rem_euclid(100),
            _ => return,
        }
        let new = dt.to_unix();
        match &mut self.frozen {
            Some(f) => *f = new,
            None => self.offset += new - t,
        }
    }

    /// Reads the register at `reg` (0-127).
    pub fn read(&mut self, reg: usize) -> u8 {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => self.read_time_reg(reg),
            REG_A => {
                let frac = self.now_ns().rem_euclid(1_000_000_000) as u64;
                let uip =
                    self.frozen.is_none() && frac >= 1_000_000_000 - UIP_LEAD.as_nanos() as u64;
                (self.cmos[REG_A] & !REG_A_UIP) | if uip { REG_A_UIP } else { 0 }
            }
            REG_C => self.read_c(),
            REG_D => REG_D_VRT,
            _ => self.cmos[reg & 0x7f],
        }
    }

    /// Writes `v` to the register at `reg` (0-127).
    pub fn write(&mut self, reg: usize, v: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => self.write_time_reg(reg, v),
            REG_A => self.cmos[REG_A] = v & !REG_A_UIP,
            REG_B => {
                let was_set = self.frozen.is_some();
                let set = v & REG_B_SET != 0;
                if set && !was_set {
                    self.frozen = Some(self.now_secs());
                } else if !set && was_set {
                    if let Some(f) = self.frozen.take() {
                        // The clock restarts from the time the guest wrote,
                        // at the start of a second.
                        let host = (self.clock)().as_secs() as i64;
                        self.offset = f - host;
                    }
                }
                self.cmos[REG_B] = v;
            }
            // C and D are read-only.
            REG_C | REG_D => {}
            _ => self.cmos[reg & 0x7f] = v,
        }
    }
}

impl PioDevice for Rtc {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            // The index register is write-only; QEMU reads 0xff.
            0 => 0xff,
            _ => self.read(usize::from(self.index)),
        };
        // Wider accesses: the bytes beyond the port read as open bus.
        for b in data.iter_mut().skip(1) {
            *b = 0xff;
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        let Some(&v) = data.first() else {
            return BusAction::Continue;
        };
        match offset {
            0 => {
                self.index = v & 0x7f;
                self.nmi_masked = v & 0x80 != 0;
            }
            _ => self.write(usize::from(self.index), v),
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// 2026-11-29 19:25:25 UTC, a Sunday.
    const T0: u64 = 1_795_980_325;

    fn rtc_at(ns: Arc<AtomicU64>) -> Rtc {
        Rtc::with_clock(
            256 << 20,
            2,
            Box::new(move || Duration::from_nanos(ns.load(Ordering::Relaxed))),
        )
    }

    fn fixed(secs: u64, frac_ns: u64) -> (Arc<AtomicU64>, Rtc) {
        let ns = Arc::new(AtomicU64::new(secs * 1_000_000_000 + frac_ns));
        let rtc = rtc_at(ns.clone());
        (ns, rtc)
    }

    fn io_read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.pio_write(0, &[reg]);
        let mut b = [0u8];
        rtc.pio_read(1, &mut b);
        b[0]
    }

    fn io_write(rtc: &mut Rtc, reg: u8, v: u8) {
        rtc.pio_write(0, &[reg]);
        rtc.pio_write(1, &[v]);
    }

    #[test]
    fn calendar_round_trips() {
        for secs in [0i64, 951_782_400, 1_709_164_800, T0 as i64, 4_102_444_799] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        let d = DateTime::from_unix(T0 as i64);
        assert_eq!(
            (d.year, d.month, d.day, d.hour, d.minute, d.second, d.weekday),
            (2026, 11, 29, 19, 25, 25, 1)
        );
        // 2000-02-29 (leap day of a century leap year) was a Tuesday.
        let leap = DateTime::from_unix(951_782_400);
        assert_eq!((leap.month, leap.day, leap.weekday), (2, 29, 3));
    }

    #[test]
    fn time_reads_in_bcd_24h_by_default() {
        let (_, mut rtc) = fixed(T0, 0);
        assert_eq!(io_read(&mut rtc, 0x00), 0x25);
        assert_eq!(io_read(&mut rtc, 0x02), 0x25);
        assert_eq!(io_read(&mut rtc, 0x04), 0x19);
        assert_eq!(io_read(&mut rtc, 0x06), 0x01);
        assert_eq!(io_read(&mut rtc, 0x07), 0x29);
        assert_eq!(io_read(&mut rtc, 0x08), 0x11);
        assert_eq!(io_read(&mut rtc, 0x09), 0x26);
        assert_eq!(io_read(&mut rtc, 0x32), 0x20);
        assert_eq!(io_read(&mut rtc, 0x0a), 0x26);
        assert_eq!(io_read(&mut rtc, 0x0b), 0x02);
        assert_eq!(io_read(&mut rtc, 0x0d), 0x80);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let (_, mut rtc) = fixed(T0, 0);
        io_write(&mut rtc, 0x0b, REG_B_DM);
        assert_eq!(io_read(&mut rtc, 0x00), 25);
        // 19h in 12-hour binary mode: 7 with the PM bit.
        assert_eq!(io_read(&mut rtc, 0x04), 0x87);
        io_write(&mut rtc, 0x0b, 0);
        assert_eq!(io_read(&mut rtc, 0x04), 0x87);
    }

    #[test]
    fn uip_is_set_only_just_before_the_update() {
        let (ns, mut rtc) = fixed(T0, 0);
        assert_eq!(io_read(&mut rtc, 0x0a) & REG_A_UIP, 0);
        ns.store(T0 * 1_000_000_000 + 999_900_000, Ordering::Relaxed);
        assert_eq!(io_read(&mut rtc, 0x0a) & REG_A_UIP, REG_A_UIP);
        assert_eq!(io_read(&mut rtc, 0x00), 0x25, "not yet updated");
        ns.store((T0 + 1) * 1_000_000_000, Ordering::Relaxed);
        assert_eq!(io_read(&mut rtc, 0x0a) & REG_A_UIP, 0);
        assert_eq!(io_read(&mut rtc, 0x00), 0x26);
    }

    #[test]
    fn guest_sets_the_time_with_set_bit() {
        let (ns, mut rtc) = fixed(T0, 0);
        io_write(&mut rtc, 0x0b, REG_B_SET | REG_B_24H);
        io_write(&mut rtc, 0x04, 0x08);
        io_write(&mut rtc, 0x02, 0x30);
        io_write(&mut rtc, 0x00, 0x00);
        io_write(&mut rtc, 0x09, 0x99);
        ns.store((T0 + 5) * 1_000_000_000, Ordering::Relaxed);
        // Frozen while SET is on.
        assert_eq!(io_read(&mut rtc, 0x00), 0x00);
        assert_eq!(io_read(&mut rtc, 0x0a) & REG_A_UIP, 0);
        io_write(&mut rtc, 0x0b, REG_B_24H);
        ns.store((T0 + 7) * 1_000_000_000, Ordering::Relaxed);
        assert_eq!(io_read(&mut rtc, 0x04), 0x08);
        assert_eq!(io_read(&mut rtc, 0x02), 0x30);
        assert_eq!(io_read(&mut rtc, 0x00), 0x02);
        assert_eq!(io_read(&mut rtc, 0x09), 0x99);
        assert_eq!(io_read(&mut rtc, 0x32), 0x20);
    }

    #[test]
    fn register_c_reports_updates_and_alarms_once() {
        let (ns, mut rtc) = fixed(T0, 500_000_000);
        assert_eq!(io_read(&mut rtc, 0x0c), 0);
        // Alarm at xx:xx:27 (don't-care hours and minutes).
        io_write(&mut rtc, 0x01, 0x27);
        io_write(&mut rtc, 0x03, 0xc0);
        io_write(&mut rtc, 0x05, 0xff);
        io_write(&mut rtc, 0x0b, REG_B_24H | REG_B_AIE);
        assert_eq!(
            rtc.next_alarm(),
            Some(Duration::from_millis(1500)),
            "from :25.5 to :27"
        );
        ns.store((T0 + 1) * 1_000_000_000, Ordering::Relaxed);
        assert_eq!(io_read(&mut rtc, 0x0c), REG_C_UF, "update, no alarm yet");
        ns.store((T0 + 2) * 1_000_000_000 + 1, Ordering::Relaxed);
        assert_eq!(io_read(&mut rtc, 0x0c), REG_C_UF | REG_C_AF | REG_C_IRQF);
        assert_eq!(io_read(&mut rtc, 0x0c), 0, "read clears");
        // With every field don't-care, the alarm fires at the next update.
        io_write(&mut rtc, 0x01, 0xc0);
        assert_eq!(rtc.next_alarm(), Some(Duration::from_nanos(999_999_999)));
    }

    #[test]
    fn index_port_keeps_nmi_mask_apart() {
        let (_, mut rtc) = fixed(T0, 0);
        rtc.pio_write(0, &[0x80 | 0x0b]);
        assert!(rtc.nmi_masked());
        assert_eq!(rtc.index(), 0x0b);
        let mut b = [0u8];
        rtc.pio_read(1, &mut b);
        assert_eq!(b[0], 0x02);
        rtc.pio_read(0, &mut b);
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn cmos_holds_memory_sizes_and_cpu_count() {
        let big = 5u64 << 30;
        let mut rtc = Rtc::with_clock(big, 4, Box::new(|| Duration::from_secs(T0)));
        let w = |rtc: &mut Rtc, r: usize| u16::from_le_bytes([rtc.read(r), rtc.read(r + 1)]);
        assert_eq!(w(&mut rtc, 0x15), 640);
        assert_eq!(w(&mut rtc, 0x17), 0xffff, "capped");
        assert_eq!(w(&mut rtc, 0x30), 0xffff);
        // 3 GiB of low RAM: (3 GiB - 16 MiB) / 64 KiB.
        assert_eq!(
            u64::from(w(&mut rtc, 0x34)),
            ((3u64 << 30) - (16 << 20)) >> 16
        );
        let above4g = u32::from_le_bytes([rtc.read(0x5b), rtc.read(0x5c), rtc.read(0x5d), 0]);
        assert_eq!(u64::from(above4g), (2u64 << 30) >> 16);
        assert_eq!(rtc.read(0x5f), 3);
        let small = Rtc::with_clock(256 << 20, 1, Box::new(|| Duration::from_secs(T0)));
        assert_eq!(
            u16::from_le_bytes([small.cmos[0x17], small.cmos[0x18]]),
            0xffff,
            "255 MiB of extended memory is over the 16-bit field"
        );
        assert_eq!(
            u16::from_le_bytes([small.cmos[0x34], small.cmos[0x35]]),
            3840
        );
        let sum: u16 = small.cmos[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
        assert_eq!(
            u16::from_be_bytes([small.cmos[0x2e], small.cmos[0x2f]]),
            sum
        );
    }
}
