//! The emulator's view of guest-physical memory: RAM, else the MMIO bus,
//! else open bus (reads all-ones, writes dropped).

use crate::bus::{BusAction, MmioBus};
use emul::{Platform, PlatformError};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

pub struct GuestPhys<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub mmio: &'a MmioBus,
    /// A device asked to stop the VM during the access.
    pub stop: Option<BusAction>,
}

impl GuestPhys<'_> {
    /// The RAM region holding `[gpa, gpa+len)` and gpa's offset in it. The
    /// emulator never crosses a page and RAM regions are page-aligned, so
    /// one region holds the whole access or none does; one lookup (this is
    /// every page-table entry of a walk).
    #[inline]
    fn ram(&self, gpa: u64, len: usize) -> Option<(&GuestRegionMmap, MemoryRegionAddress)> {
        let region = self.mem.find_region(GuestAddress(gpa))?;
        let at = region.to_region_addr(GuestAddress(gpa))?;
        let last = at.0.checked_add(len.max(1) as u64 - 1)?;
        region
            .address_in_range(MemoryRegionAddress(last))
            .then_some((region, at))
    }

    /// Reads guest RAM only (no device is touched).
    pub fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        let Some((region, at)) = self.ram(gpa, buf.len()) else {
            return Err(PlatformError {
                gpa,
                len: buf.len(),
                reason: "not guest RAM",
            });
        };
        read_region(region, at, gpa, buf)
    }
}

/// Reads `buf` from `region` at `at` (guest-physical `gpa`, for the error).
fn read_region(
    region: &GuestRegionMmap,
    at: MemoryRegionAddress,
    gpa: u64,
    buf: &mut [u8],
) -> Result<(), PlatformError> {
    region.read_slice(buf, at).map_err(|_| PlatformError {
        gpa,
        len: buf.len(),
        reason: "guest RAM read failed",
    })
}

impl Platform for GuestPhys<'_> {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        if let Some((region, at)) = self.ram(gpa, buf.len()) {
            return read_region(region, at, gpa, buf);
        }
        // Split across the devices and gaps the bytes fall in.
        self.mmio.read(gpa, buf);
        Ok(())
    }

    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
        if let Some((region, at)) = self.ram(gpa, buf.len()) {
            return region.write_slice(buf, at).map_err(|_| PlatformError {
                gpa,
                len: buf.len(),
                reason: "guest RAM write failed",
            });
        }
        // Split across the devices and gaps the bytes fall in.
        if let stop @ BusAction::Stop { .. } = self.mmio.write(gpa, buf) {
            self.stop.get_or_insert(stop);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::mmio_ram::MmioRam;
    use std::sync::{Arc, Mutex};

    /// The emulator hands over whole operands (up to 64 bytes); they are
    /// split across windows like KVM's own exits.
    #[test]
    fn emulated_operand_is_split_across_windows() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut mmio = MmioBus::new_mmio();
        let first = Arc::new(Mutex::new(MmioRam::new(0x10).unwrap()));
        let second = Arc::new(Mutex::new(MmioRam::new(0x20).unwrap()));
        mmio.register(0xd000_0000, 0x10, first.clone()).unwrap();
        mmio.register(0xd000_0010, 0x20, second.clone()).unwrap();
        let mut phys = GuestPhys {
            mem: &mem,
            mmio: &mmio,
            stop: None,
        };
        let zmm: Vec<u8> = (0..64).collect();
        phys.write_phys(0xd000_0000, &zmm).unwrap();
        assert_eq!(first.lock().unwrap().contents(), zmm[..16]);
        assert_eq!(second.lock().unwrap().contents(), zmm[16..48]);
        let mut back = [0u8; 64];
        phys.read_phys(0xd000_0000, &mut back).unwrap();
        assert_eq!(back[..48], zmm[..48]);
        assert_eq!(back[48..], [0xff; 16]);
        assert!(phys.stop.is_none());
    }
}
