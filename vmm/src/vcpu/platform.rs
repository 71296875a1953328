//! The emulator's view of guest-physical memory: RAM, else the MMIO bus,
//! else open bus (reads all-ones, writes dropped).

use crate::bus::{BusAction, MmioBus};
use emul::{Platform, PlatformError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub struct GuestPhys<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub mmio: &'a MmioBus,
    /// A device asked to stop the VM during the access.
    pub stop: Option<BusAction>,
}

impl GuestPhys<'_> {
    /// Whether `[gpa, gpa+len)` is RAM. The emulator never crosses a page,
    /// and RAM regions are page-aligned, so checking both ends suffices.
    fn is_ram(&self, gpa: u64, len: usize) -> bool {
        let last = gpa.saturating_add(len.max(1) as u64 - 1);
        self.mem.address_in_range(GuestAddress(gpa))
            && self.mem.address_in_range(GuestAddress(last))
    }
}

impl Platform for GuestPhys<'_> {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        if self.is_ram(gpa, buf.len()) {
            return self
                .mem
                .read_slice(buf, GuestAddress(gpa))
                .map_err(|_| PlatformError {
                    gpa,
                    len: buf.len(),
                    reason: "guest RAM read failed",
                });
        }
        if !self.mmio.read(gpa, buf) {
            log::debug!("emulated read of unassigned {gpa:#x}");
        }
        Ok(())
    }

    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
        if self.is_ram(gpa, buf.len()) {
            return self
                .mem
                .write_slice(buf, GuestAddress(gpa))
                .map_err(|_| PlatformError {
                    gpa,
                    len: buf.len(),
                    reason: "guest RAM write failed",
                });
        }
        match self.mmio.write(gpa, buf) {
            Some(BusAction::Continue) => {}
            Some(stop) => self.stop = Some(stop),
            None => log::debug!("emulated write to unassigned {gpa:#x} dropped"),
        }
        Ok(())
    }
}
