//! ACPI PM1a event and control registers (PIIX4 layout: PM1a_EVT_BLK at
//! 0x600, status word then enable word; PM1a_CNT_BLK at 0x604), enough for
//! a guest to enter S3 and be woken by the RTC alarm.
//!
//! Writing SLP_EN with SLP_TYP = [`SLP_TYP_S3`] (QEMU's DSDT value for
//! `\_S3`, which kvm-unit-tests' `s3` writes without reading any DSDT) asks
//! the vCPU that wrote it to suspend the VM (see `Vcpu::suspend`): it waits
//! for the RTC alarm when PM1 enable has RTC_EN, sets WAK_STS and RTC_STS,
//! and restarts the boot vCPU in real mode at the FACS firmware waking
//! vector, RAM kept. Any other sleep type (S5 is `SLP_TYP` 0 here) ends the
//! VM as a power-off (status 0).

use crate::bus::{BusAction, PioDevice};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

pub const PM1_EVT_PORT: u16 = 0x600;
pub const PM1_EVT_LEN: u16 = 4;
pub const PM1_CNT_PORT: u16 = 0x604;
pub const PM1_CNT_LEN: u16 = 2;

/// PM1 status/enable bits.
pub const PM1_TMR: u16 = 1 << 0;
pub const PM1_RTC: u16 = 1 << 10;
pub const PM1_WAK_STS: u16 = 1 << 15;
/// PM1 control: SCI_EN, SLP_TYP (bits 10-12), SLP_EN (write-only).
const PM1_CNT_SCI_EN: u16 = 1 << 0;
const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
const PM1_CNT_SLP_TYP_MASK: u16 = 7 << PM1_CNT_SLP_TYP_SHIFT;
const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// The SLP_TYP value of S3 (QEMU's `\_S3` package: 1).
pub const SLP_TYP_S3: u8 = 1;

/// A pending sleep request, seen by the vCPU loop after a port write.
#[derive(Debug, Default)]
pub struct SleepRequest(AtomicU8);

const NO_REQUEST: u8 = 0xff;

impl SleepRequest {
    pub fn new() -> Self {
        SleepRequest(AtomicU8::new(NO_REQUEST))
    }

    /// The requested SLP_TYP, consuming the request.
    #[inline]
    pub fn take(&self) -> Option<u8> {
        if self.0.load(Ordering::Relaxed) == NO_REQUEST {
            return None;
        }
        match self.0.swap(NO_REQUEST, Ordering::AcqRel) {
            NO_REQUEST => None,
            t => Some(t),
        }
    }

    fn request(&self, slp_typ: u8) {
        self.0.store(slp_typ, Ordering::Release);
    }
}

/// The PM1a event (status, enable) and control registers.
pub struct Pm1 {
    status: u16,
    enable: u16,
    control: u16,
    sleep: Arc<SleepRequest>,
}

impl Pm1 {
    pub fn new(sleep: Arc<SleepRequest>) -> Self {
        Pm1 {
            status: 0,
            enable: 0,
            // SCI_EN: the platform is in ACPI mode (no SMI handover here).
            control: PM1_CNT_SCI_EN,
            sleep,
        }
    }

    pub fn enable(&self) -> u16 {
        self.enable
    }

    /// Sets status bits (wake-up events).
    pub fn raise(&mut self, bits: u16) {
        self.status |= bits;
    }

    fn read_reg(&self, reg: u16) -> u16 {
        match reg {
            0 => self.status,
            2 => self.enable,
            _ => self.control,
        }
    }

    fn write_reg(&mut self, reg: u16, v: u16) {
        match reg {
            // Status bits are cleared by writing ones.
            0 => self.status &= !v,
            2 => self.enable = v,
            _ => {
                self.control = v & !PM1_CNT_SLP_EN;
                if v & PM1_CNT_SLP_EN != 0 {
                    let typ = ((v & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT) as u8;
                    self.status &= !PM1_WAK_STS;
                    self.sleep.request(typ);
                }
            }
        }
    }
}

/// The event block (status at 0, enable at 2) and, registered separately,
/// the control block: one device type over both, told apart by `base`.
pub struct Pm1Port {
    pub pm1: Arc<std::sync::Mutex<Pm1>>,
    /// Register number of offset 0: 0 for the event block, 4 for control.
    pub first_reg: u16,
}

impl PioDevice for Pm1Port {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        let pm1 = self.pm1.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in data.iter_mut().enumerate() {
            let at = self.first_reg + offset + i as u16;
            let word = pm1.read_reg(at & !1);
            *b = word.to_le_bytes()[usize::from(at & 1)];
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        let mut pm1 = self.pm1.lock().unwrap_or_else(|p| p.into_inner());
        let at = self.first_reg + offset;
        // Registers are 16 bits; a byte write changes one half.
        let mut i = 0;
        while i < data.len() {
            let reg = (at + i as u16) & !1;
            let mut bytes = pm1.read_reg(reg).to_le_bytes();
            if reg == 0 {
                // Write-one-to-clear: untouched bytes clear nothing.
                bytes = [0, 0];
            }
            let lo = usize::from((at + i as u16) & 1);
            for (k, b) in bytes.iter_mut().enumerate().skip(lo) {
                if let Some(&v) = data.get(i + k - lo) {
                    *b = v;
                }
            }
            pm1.write_reg(reg, u16::from_le_bytes(bytes));
            i += 2 - lo;
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn ports() -> (Pm1Port, Pm1Port, Arc<SleepRequest>) {
        let sleep = Arc::new(SleepRequest::new());
        let pm1 = Arc::new(Mutex::new(Pm1::new(sleep.clone())));
        (
            Pm1Port {
                pm1: pm1.clone(),
                first_reg: 0,
            },
            Pm1Port { pm1, first_reg: 4 },
            sleep,
        )
    }

    #[test]
    fn s3_request_as_kvm_unit_tests_writes_it() {
        let (mut evt, mut cnt, sleep) = ports();
        evt.pio_write(2, &0x400u16.to_le_bytes());
        assert_eq!(evt.pm1.lock().unwrap().enable(), PM1_RTC);
        assert_eq!(sleep.take(), None);
        cnt.pio_write(0, &0x2400u16.to_le_bytes());
        assert_eq!(sleep.take(), Some(SLP_TYP_S3));
        assert_eq!(sleep.take(), None, "taken once");
        let mut w = [0u8; 2];
        cnt.pio_read(0, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0400, "SLP_EN reads 0");
    }

    #[test]
    fn status_is_write_one_to_clear() {
        let (mut evt, _, _) = ports();
        evt.pm1.lock().unwrap().raise(PM1_WAK_STS | PM1_RTC);
        let mut w = [0u8; 4];
        evt.pio_read(0, &mut w);
        assert_eq!(u16::from_le_bytes([w[0], w[1]]), 0x8400);
        evt.pio_write(0, &[0x00, 0x04]);
        evt.pio_read(0, &mut w);
        assert_eq!(u16::from_le_bytes([w[0], w[1]]), 0x8000);
        // A dword write covers status and enable.
        evt.pio_write(0, &[0, 0x80, 0x01, 0x00]);
        evt.pio_read(0, &mut w);
        assert_eq!(w, [0, 0, 1, 0]);
    }
}
