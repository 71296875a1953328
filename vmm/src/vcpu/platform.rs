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

    /// One locked compare-and-exchange on RAM: other vCPUs run natively
    /// while this one emulates. Device memory gets the plain write (one
    /// read and one write reach the device, as a locked access on the bus
    /// makes; a second read could have side effects).
    fn compare_exchange_phys(
        &mut self,
        gpa: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<bool, PlatformError> {
        let len = new.len();
        let fail = |reason| PlatformError { gpa, len, reason };
        if current.len() != len {
            return Err(fail("compare-and-exchange of unequal lengths"));
        }
        let Some((region, at)) = self.ram(gpa, len) else {
            self.write_phys(gpa, new)?;
            return Ok(true);
        };
        let slice = region
            .get_slice(at, len)
            .map_err(|_| fail("guest RAM access failed"))?;
        match crate::kvm::memory::compare_exchange(&slice, current, new) {
            Some(done) => Ok(done),
            // No locked instruction has such an operand (a misaligned
            // CMPXCHG16B raised #GP in the stub already); a read, a compare
            // and a write.
            None => {
                let mut now = [0u8; 16];
                let now = now
                    .get_mut(..len)
                    .ok_or(fail("locked operand over 16 bytes"))?;
                read_region(region, at, gpa, now)?;
                if now != current {
                    return Ok(false);
                }
                self.write_phys(gpa, new)?;
                Ok(true)
            }
        }
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

    /// Locked writes (the walker's accessed/dirty bits, a LOCK-prefixed
    /// instruction's result) are one compare-and-exchange on RAM: bytes
    /// another vCPU changed since the emulator read them are left alone.
    /// Device memory gets the plain write (no second read).
    #[test]
    fn compare_exchange_writes_only_what_was_read() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let mut mmio = MmioBus::new_mmio();
        let window = Arc::new(Mutex::new(MmioRam::new(0x1000).unwrap()));
        mmio.register(0xd000_0000, 0x1000, window.clone()).unwrap();
        let mut phys = GuestPhys {
            mem: &mem,
            mmio: &mmio,
            stop: None,
        };
        let at = |gpa| GuestAddress(gpa);
        let pte = 0x5000_u64 | 0x3;
        mem.write_obj(pte, at(0x1008)).unwrap();
        let b = |v: u64| v.to_le_bytes();
        // Changed since it was read: nothing is written.
        assert_eq!(
            phys.compare_exchange_phys(0x1008, &b(0x9003), &b(0x9023)),
            Ok(false)
        );
        assert_eq!(mem.read_obj::<u64>(at(0x1008)).unwrap(), pte);
        assert_eq!(
            phys.compare_exchange_phys(0x1008, &b(pte), &b(pte | 0x60)),
            Ok(true)
        );
        assert_eq!(mem.read_obj::<u64>(at(0x1008)).unwrap(), pte | 0x60);
        // 32-bit entries: the neighbour is untouched.
        mem.write_obj(0x0003_3003_u32, at(0x1004)).unwrap();
        let w = |v: u32| v.to_le_bytes();
        assert_eq!(
            phys.compare_exchange_phys(0x1000, &w(0x3003), &w(0x23)),
            Ok(false)
        );
        assert_eq!(
            phys.compare_exchange_phys(0x1004, &w(0x0003_3003), &w(0x0003_3023)),
            Ok(true)
        );
        assert_eq!(mem.read_obj::<u32>(at(0x1004)).unwrap(), 0x0003_3023);
        assert_eq!(mem.read_obj::<u64>(at(0x1008)).unwrap(), pte | 0x60);
        // 16 bytes (CMPXCHG16B), and a misaligned 8 (LOCK CMPXCHG).
        let old: [u8; 16] = std::array::from_fn(|i| i as u8);
        let new: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
        mem.write_slice(&old, at(0x1010)).unwrap();
        assert_eq!(phys.compare_exchange_phys(0x1010, &new, &new), Ok(false));
        assert_eq!(mem.read_obj::<[u8; 16]>(at(0x1010)).unwrap(), old);
        assert_eq!(phys.compare_exchange_phys(0x1010, &old, &new), Ok(true));
        assert_eq!(mem.read_obj::<[u8; 16]>(at(0x1010)).unwrap(), new);
        assert_eq!(
            phys.compare_exchange_phys(0x1013, &new[..8], &old[..8]),
            Ok(false)
        );
        assert_eq!(
            phys.compare_exchange_phys(0x1013, &new[3..11], &old[..8]),
            Ok(true)
        );
        assert_eq!(mem.read_obj::<[u8; 8]>(at(0x1013)).unwrap(), old[..8]);
        // 1 and 2 bytes (the 2 misaligned), next to bytes left alone.
        mem.write_slice(&[0x11, 0x22, 0x33, 0x44], at(0x1040))
            .unwrap();
        assert_eq!(
            phys.compare_exchange_phys(0x1041, &[0x23], &[0x99]),
            Ok(false)
        );
        assert_eq!(
            phys.compare_exchange_phys(0x1041, &[0x22], &[0x99]),
            Ok(true)
        );
        assert_eq!(
            phys.compare_exchange_phys(0x1042, &[0x33, 0x45], &[1, 2]),
            Ok(false)
        );
        assert_eq!(
            phys.compare_exchange_phys(0x1042, &[0x33, 0x44], &[1, 2]),
            Ok(true)
        );
        assert_eq!(
            mem.read_obj::<[u8; 4]>(at(0x1040)).unwrap(),
            [0x11, 0x99, 1, 2]
        );
        assert!(phys.compare_exchange_phys(0x1008, &b(0), &w(0)).is_err());
        // Device memory: written as given.
        phys.write_phys(0xd000_0010, &b(pte)).unwrap();
        assert_eq!(
            phys.compare_exchange_phys(0xd000_0010, &b(0x9003), &b(7)),
            Ok(true)
        );
        assert_eq!(window.lock().unwrap().contents()[0x10..0x18], b(7));
    }

    /// Two vCPU threads incrementing one counter in guest RAM by read and
    /// compare-and-exchange, as an emulated `lock cmpxchg16b` (16 bytes,
    /// aligned) or `lock xadd` (8 bytes, misaligned inside a cache line)
    /// loop does: no increment is lost (a read-compare-write loses some
    /// within a few thousand on two host CPUs).
    #[test]
    fn compare_exchange_is_atomic_between_threads() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mmio = MmioBus::new_mmio();
        const N: u128 = 200_000;
        for (gpa, len, step) in [(0x40u64, 16usize, (1u128 << 64) + 1), (0x83, 8, 1)] {
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        let mut phys = GuestPhys {
                            mem: &mem,
                            mmio: &mmio,
                            stop: None,
                        };
                        let mut done = 0;
                        while done < N {
                            let mut now = [0u8; 16];
                            phys.read_phys(gpa, &mut now[..len]).unwrap();
                            let next = (u128::from_le_bytes(now) + step).to_le_bytes();
                            if phys
                                .compare_exchange_phys(gpa, &now[..len], &next[..len])
                                .unwrap()
                            {
                                done += 1;
                            }
                        }
                    });
                }
            });
            let mut end = [0u8; 16];
            mem.read_slice(&mut end[..len], GuestAddress(gpa)).unwrap();
            assert_eq!(
                u128::from_le_bytes(end),
                2 * N * step,
                "{len} bytes at {gpa:#x}"
            );
        }
    }

    /// emul's page walker reads an entry into an 8-byte-aligned buffer
    /// and relies on the read being one access (the CPU's walker reads an
    /// entry atomically): with another thread flipping every byte of the
    /// entry, a read never sees a mix of the two values.
    #[test]
    fn table_entries_are_read_whole() {
        #[repr(align(8))]
        struct Entry([u8; 8]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mmio = MmioBus::new_mmio();
        let (a, b) = (0x0123_4567_89ab_cdefu64, !0x0123_4567_89ab_cdefu64);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut v = a;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    v = if v == a { b } else { a };
                    mem.store(v, GuestAddress(0x88), std::sync::atomic::Ordering::Relaxed)
                        .unwrap();
                }
            });
            let mut phys = GuestPhys {
                mem: &mem,
                mmio: &mmio,
                stop: None,
            };
            let mut torn = None;
            for _ in 0..1_000_000 {
                let mut e = Entry([0; 8]);
                let read = phys.read_phys(0x88, &mut e.0);
                let v = u64::from_le_bytes(e.0);
                if read.is_err() || (v != a && v != b && v != 0) {
                    torn = Some(v);
                    break;
                }
            }
            // Before any assertion: a panic here would leave the writer
            // running and the scope waiting for it.
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(torn, None, "a torn entry");
        });
    }
}
