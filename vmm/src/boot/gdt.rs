//! The boot GDT: flat 32-bit code, flat data and 64-bit code descriptors.

use super::{write_u64s, BootError};
use crate::layout::GDT_ADDR;
use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::GuestMemoryMmap;

pub const GDT_CODE32: u16 = 0x08;
pub const GDT_DATA: u16 = 0x10;
pub const GDT_CODE64: u16 = 0x18;

/// Descriptor bits: (access byte, flags nibble).
const CODE32: (u8, u8) = (0x9b, 0xc); // present, code, read, accessed; G, D
const DATA: (u8, u8) = (0x93, 0xc); // present, data, write, accessed; G, B
const CODE64: (u8, u8) = (0x9b, 0xa); // present, code, read, accessed; G, L

fn descriptor((access, flags): (u8, u8)) -> u64 {
    // Base 0, limit 0xfffff pages.
    let limit = 0xf_ffffu64;
    (limit & 0xffff) | ((limit >> 16) << 48) | (u64::from(access) << 40) | (u64::from(flags) << 52)
}

pub fn write(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    write_u64s(
        mem,
        GDT_ADDR,
        &[0, descriptor(CODE32), descriptor(DATA), descriptor(CODE64)],
    )
}

fn segment(selector: u16, (access, flags): (u8, u8)) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: access & 0xf,
        present: 1,
        dpl: 0,
        db: (flags >> 2) & 1,
        s: 1,
        l: (flags >> 1) & 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Loads the flat segments into `sregs` with `code` as CS.
pub fn load_flat(sregs: &mut kvm_sregs, code: u16) {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.cs = segment(code, if code == GDT_CODE64 { CODE64 } else { CODE32 });
    let data = segment(GDT_DATA, DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_flat_segments() {
        assert_eq!(descriptor(CODE32), 0x00cf_9b00_0000_ffff);
        assert_eq!(descriptor(DATA), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(CODE64), 0x00af_9b00_0000_ffff);
    }
}
