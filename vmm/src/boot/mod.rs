//! The CPU state a guest finds at its entry point, for each `--mode`.

mod gdt;
mod paging;

use crate::layout;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use std::str::FromStr;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use gdt::{GDT_CODE32, GDT_CODE64, GDT_DATA};

/// Entry mode of the boot vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// CS:IP = 0000:entry, other segments 0.
    Real,
    /// Flat 32-bit protected mode, paging off: what a Multiboot loader leaves.
    Protected,
    /// 64-bit mode at CPL 0 with a 4 GiB identity map.
    Long,
}

impl FromStr for EntryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "real" => Ok(EntryMode::Real),
            "protected" => Ok(EntryMode::Protected),
            "long" => Ok(EntryMode::Long),
            _ => Err(format!(
                "unknown mode '{s}' (expected real, protected or long)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("real-mode entry {0:#x} is not below 64 KiB")]
    RealEntryTooHigh(u64),
    #[error("protected-mode entry {0:#x} is not below 4 GiB")]
    ProtectedEntryTooHigh(u64),
    #[error("guest RAM too small for the boot structures")]
    WriteBootStructures(#[from] vm_memory::GuestMemoryError),
}

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Fills in `sregs` and `regs` for entering at `entry` in `mode`, writing the
/// GDT and page tables the mode needs into guest memory. `low_ram_end` is the
/// end of RAM below 4 GiB (the long-mode stack goes just beneath it).
pub fn setup_entry(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    entry: u64,
    low_ram_end: u64,
    sregs: &mut kvm_sregs,
    regs: &mut kvm_regs,
) -> Result<(), BootError> {
    *regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Real => {
            if entry >= 0x1_0000 {
                return Err(BootError::RealEntryTooHigh(entry));
            }
            let real_seg = |selector_type: u8| kvm_segment {
                base: 0,
                limit: 0xffff,
                selector: 0,
                type_: selector_type,
                present: 1,
                s: 1,
                ..Default::default()
            };
            sregs.cs = real_seg(0xb);
            for s in [
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                *s = real_seg(0x3);
            }
            sregs.cr0 = CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Protected => {
            if entry > u64::from(u32::MAX) {
                return Err(BootError::ProtectedEntryTooHigh(entry));
            }
            gdt::write(mem)?;
            gdt::load_flat(sregs, GDT_CODE32);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Long => {
            gdt::write(mem)?;
            paging::write_identity_map(mem)?;
            gdt::load_flat(sregs, GDT_CODE64);
            sregs.cr3 = layout::PML4_ADDR;
            // NE: x87 errors are reported as #MF, as on every modern OS.
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
            sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
            regs.rsp = low_ram_end & !0xf;
        }
    }
    Ok(())
}

/// Whether `[start, start+len)` touches the VMM's boot structures for `mode`
/// (loaders refuse to put an image there).
pub fn reserved_ranges(mode: EntryMode) -> Vec<(u64, u64)> {
    match mode {
        EntryMode::Real => vec![],
        EntryMode::Protected => vec![(layout::GDT_ADDR, 0x1000)],
        EntryMode::Long => vec![(
            layout::BOOT_STRUCTS_START,
            layout::BOOT_STRUCTS_END - layout::BOOT_STRUCTS_START,
        )],
    }
}

pub(crate) fn write_u64s(mem: &GuestMemoryMmap, addr: u64, vals: &[u64]) -> Result<(), BootError> {
    for (i, v) in vals.iter().enumerate() {
        mem.write_obj(*v, GuestAddress(addr + 8 * i as u64))?;
    }
    Ok(())
}
