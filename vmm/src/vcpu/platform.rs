//! The emulator's view of guest-physical memory: RAM, else the MMIO bus,
//! else open bus (reads all-ones, writes dropped).

use crate::bus::{BusAction, MmioBus};
use emul::{Platform, PlatformError};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, VolatileMemory,
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

    /// A locked compare-and-exchange on RAM, as the CPU's walker makes:
    /// other vCPUs change page tables while this one emulates (an
    /// unmapping vCPU clears an entry; a plain write of the accessed bit
    /// would bring it back). Tables in device memory are read, compared
    /// and written through the bus.
    fn update_table_entry(
        &mut self,
        gpa: u64,
        size: usize,
        old: u64,
        new: u64,
    ) -> Result<bool, PlatformError> {
        let Some((region, at)) = self.ram(gpa, size) else {
            return emul::platform::compare_and_write_entry(self, gpa, size, old, new);
        };
        let fail = |reason| PlatformError {
            gpa,
            len: size,
            reason,
        };
        let slice = region
            .get_slice(at, size)
            .map_err(|_| fail("guest RAM access failed"))?;
        let swapped = match size {
            8 => slice
                .get_atomic_ref::<AtomicU64>(0)
                .map_err(|_| fail("page-table entry not 8-byte aligned"))?
                .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok(),
            4 => slice
                .get_atomic_ref::<AtomicU32>(0)
                .map_err(|_| fail("page-table entry not 4-byte aligned"))?
                .compare_exchange(old as u32, new as u32, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok(),
            _ => return Err(fail("page-table entries are 4 or 8 bytes")),
        };
        Ok(swapped)
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

    /// The walker's accessed/dirty update is a compare-and-exchange on RAM
    /// (an entry changed since the walk read it is left alone) and, for a
    /// table in device memory, a read-compare-write through the bus.
    #[test]
    fn table_entry_update_writes_only_what_the_walk_read() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let mut mmio = MmioBus::new_mmio();
        let window = Arc::new(Mutex::new(MmioRam::new(0x1000).unwrap()));
        mmio.register(0xd000_0000, 0x1000, window.clone()).unwrap();
        let mut phys = GuestPhys {
            mem: &mem,
            mmio: &mmio,
            stop: None,
        };
        let pte = 0x5000_u64 | 0x3;
        mem.write_obj(pte, GuestAddress(0x1008)).unwrap();
        // Another vCPU changed the entry: nothing is written.
        assert_eq!(
            phys.update_table_entry(0x1008, 8, 0x9003, 0x9023),
            Ok(false)
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1008)).unwrap(), pte);
        assert_eq!(
            phys.update_table_entry(0x1008, 8, pte, pte | 0x60),
            Ok(true)
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1008)).unwrap(),
            pte | 0x60
        );
        // 32-bit paging: the neighbouring entry is untouched.
        mem.write_obj(0x0003_3003_u32, GuestAddress(0x1004))
            .unwrap();
        assert_eq!(
            phys.update_table_entry(0x1000, 4, 0x0003_3003, 0x23),
            Ok(false)
        );
        assert_eq!(
            phys.update_table_entry(0x1004, 4, 0x0003_3003, 0x0003_3023),
            Ok(true)
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1004)).unwrap(),
            0x0003_3023
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1008)).unwrap(),
            pte | 0x60
        );
        // A misaligned entry is the VMM's error, not a torn write.
        assert!(phys.update_table_entry(0x1009, 8, 0, 1).is_err());
        // Device memory.
        phys.write_phys(0xd000_0010, &pte.to_le_bytes()).unwrap();
        assert_eq!(
            phys.update_table_entry(0xd000_0010, 8, 0x9003, 0),
            Ok(false)
        );
        assert_eq!(
            phys.update_table_entry(0xd000_0010, 8, pte, pte | 0x20),
            Ok(true)
        );
        assert_eq!(
            window.lock().unwrap().contents()[0x10..0x18],
            (pte | 0x20).to_le_bytes()
        );
    }
}
