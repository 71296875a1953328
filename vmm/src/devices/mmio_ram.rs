//! `--mmio-ram ADDR:SIZE`: RAM-like MMIO. Every guest access is a real MMIO
//! exit; reads return what was last written (initially zero). The emulation
//! tests put instruction operands here.
//!
//! The window is an anonymous private mapping (vm-memory's `MmapRegion`,
//! `MAP_NORESERVE`): host memory is only committed for pages the guest
//! writes, so a large window costs nothing until used. The VM still bounds
//! the windows' total size ([`MAX_MMIO_RAM_TOTAL`]), since a guest may write
//! every page.

use crate::bus::{BusAction, MmioDevice};
use vm_memory::mmap::MmapRegion;
use vm_memory::VolatileMemory;

/// The most bytes all `--mmio-ram` windows of a VM may span together: a
/// guest that writes every page commits this much host memory.
pub const MAX_MMIO_RAM_TOTAL: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
#[error("cannot map {size:#x} bytes for an MMIO RAM window: {err}")]
pub struct MmioRamError {
    size: usize,
    err: vm_memory::mmap::MmapRegionError,
}

pub struct MmioRam {
    region: MmapRegion<()>,
}

impl MmioRam {
    /// A zero-filled window of `size` bytes, backed lazily.
    pub fn new(size: usize) -> Result<Self, MmioRamError> {
        let region = MmapRegion::new(size).map_err(|err| MmioRamError { size, err })?;
        Ok(MmioRam { region })
    }

    /// A copy of the window's contents (for tests and small windows).
    pub fn contents(&self) -> Vec<u8> {
        let mut v = vec![0; self.region.size()];
        self.read_clipped(0, &mut v);
        v
    }

    /// Copies the window's bytes from `offset` into `data`; returns how many
    /// were inside the window.
    fn read_clipped(&self, offset: u64, data: &mut [u8]) -> usize {
        let size = self.region.size() as u64;
        let n = size.saturating_sub(offset).min(data.len() as u64) as usize;
        if n == 0 {
            return 0;
        }
        match self.region.get_slice(offset as usize, n) {
            Ok(s) => s.copy_to(&mut data[..n]),
            Err(_) => 0,
        }
    }
}

impl MmioDevice for MmioRam {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        // The bus only hands over bytes inside the window; callers using the
        // device directly may run past its end, which reads all-ones.
        let n = self.read_clipped(offset, data);
        data[n..].fill(0xff);
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        let size = self.region.size() as u64;
        let n = size.saturating_sub(offset).min(data.len() as u64) as usize;
        if n > 0 {
            if let Ok(s) = self.region.get_slice(offset as usize, n) {
                s.copy_from(&data[..n]);
            }
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_writes_and_clips_at_the_end() {
        let mut r = MmioRam::new(16).unwrap();
        let mut b = [0u8; 8];
        r.mmio_read(0, &mut b);
        assert_eq!(b, [0; 8]);
        r.mmio_write(12, &[1, 2, 3, 4, 5, 6]);
        r.mmio_read(8, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 1, 2, 3, 4]);
        r.mmio_read(14, &mut b);
        assert_eq!(b, [3, 4, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        r.mmio_read(u64::MAX, &mut b);
        assert_eq!(b, [0xff; 8]);
        assert_eq!(r.contents()[12..], [1, 2, 3, 4]);
    }

    /// A window as large as the bound maps without committing memory: only
    /// the touched page is backed.
    #[test]
    fn large_window_is_backed_lazily() {
        let mut r = MmioRam::new(MAX_MMIO_RAM_TOTAL as usize).unwrap();
        r.mmio_write(MAX_MMIO_RAM_TOTAL - 8, &[7; 8]);
        let mut b = [0u8; 8];
        r.mmio_read(MAX_MMIO_RAM_TOTAL - 8, &mut b);
        assert_eq!(b, [7; 8]);
        r.mmio_read(1 << 30, &mut b);
        assert_eq!(b, [0; 8]);
    }
}
