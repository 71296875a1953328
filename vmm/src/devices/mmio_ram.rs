//! `--mmio-ram ADDR:SIZE`: RAM-like MMIO. Every guest access is a real MMIO
//! exit; reads return what was last written (initially zero). The emulation
//! tests put instruction operands here.

use crate::bus::{BusAction, MmioDevice};

pub struct MmioRam {
    bytes: Vec<u8>,
}

impl MmioRam {
    pub fn new(size: usize) -> Self {
        MmioRam {
            bytes: vec![0; size],
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl MmioDevice for MmioRam {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        // The bus only routes addresses inside the window, but an access may
        // run past its end: that part reads all-ones like unbacked space.
        data.fill(0xff);
        let start = offset as usize;
        if let Some(src) = self.bytes.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        let start = offset as usize;
        if let Some(dst) = self.bytes.get_mut(start..) {
            let n = dst.len().min(data.len());
            dst[..n].copy_from_slice(&data[..n]);
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_writes_and_clips_at_the_end() {
        let mut r = MmioRam::new(16);
        let mut b = [0u8; 8];
        r.mmio_read(0, &mut b);
        assert_eq!(b, [0; 8]);
        r.mmio_write(12, &[1, 2, 3, 4, 5, 6]);
        r.mmio_read(8, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 1, 2, 3, 4]);
        r.mmio_read(14, &mut b);
        assert_eq!(b, [3, 4, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    }
}
