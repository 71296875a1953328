//! The test-report port: the project's scripted guests report 64-bit values
//! here; the VMM logs them and keeps them for in-process tests. Not a QEMU
//! device.
//!
//! Ports 0x4f0-0x4f7 are an 8-byte little-endian latch: a write of any width
//! stores its bytes at its offset, a read returns the latch's bytes (so
//! guests can check 1-, 2- and 4-byte port I/O). A write that covers the last
//! byte (0x4f7) records the latch as one reported value: `out 0x4f0, eax`
//! then `out 0x4f4, eax` reports a u64.

use crate::bus::{BusAction, PioDevice};
use std::sync::{Arc, Mutex};

pub const TEST_REPORT_PORT: u16 = 0x4f0;
pub const TEST_REPORT_LEN: u16 = 8;

/// Reported values, shared with whoever runs the VM.
pub type Reports = Arc<Mutex<Vec<u64>>>;

pub struct TestReport {
    latch: [u8; 8],
    reports: Reports,
}

impl TestReport {
    pub fn new(reports: Reports) -> Self {
        TestReport {
            latch: [0; 8],
            reports,
        }
    }
}

impl PioDevice for TestReport {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        let src = self.latch.get(usize::from(offset)..).unwrap_or(&[]);
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        let start = usize::from(offset);
        let Some(dst) = self.latch.get_mut(start..) else {
            return BusAction::Continue;
        };
        let n = dst.len().min(data.len());
        dst[..n].copy_from_slice(&data[..n]);
        if start + n == self.latch.len() {
            let value = u64::from_le_bytes(self.latch);
            log::info!("guest reports {value:#x}");
            self.reports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(value);
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_halves_make_one_value() {
        let r = Reports::default();
        let mut d = TestReport::new(r.clone());
        d.pio_write(0, &0x89ab_cdefu32.to_le_bytes());
        d.pio_write(4, &0x0123_4567u32.to_le_bytes());
        d.pio_write(0, &5u32.to_le_bytes());
        d.pio_write(4, &0u32.to_le_bytes());
        assert_eq!(*r.lock().unwrap(), vec![0x0123_4567_89ab_cdef, 5]);
    }

    #[test]
    fn latch_reads_back_bytes_of_any_width() {
        let r = Reports::default();
        let mut d = TestReport::new(r.clone());
        d.pio_write(0, &[0x11]);
        d.pio_write(1, &[0x22]);
        d.pio_write(2, &0x4433u16.to_le_bytes());
        let mut b = [0u8; 4];
        d.pio_read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x4433_2211);
        let mut w = [0u8; 2];
        d.pio_read(1, &mut w);
        assert_eq!(w, [0x22, 0x33]);
        assert!(
            r.lock().unwrap().is_empty(),
            "no value until the last byte is written"
        );
        d.pio_write(7, &[0x80]);
        assert_eq!(*r.lock().unwrap(), vec![0x8000_0000_4433_2211]);
    }
}
