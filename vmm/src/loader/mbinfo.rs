//! The Multiboot v1 information structure (spec section 3.3), built in a
//! host buffer and written in one go inside
//! `[layout::MB_INFO_ADDR, layout::MB_INFO_END)` together with everything it
//! points to: command lines, the module list, the memory map and the boot
//! loader name.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::LoadError;
use crate::layout;

/// `flags` bits saying which fields are valid.
const MULTIBOOT_INFO_MEMORY: u32 = 1 << 0;
const MULTIBOOT_INFO_CMDLINE: u32 = 1 << 2;
const MULTIBOOT_INFO_MODS: u32 = 1 << 3;
const MULTIBOOT_INFO_MEM_MAP: u32 = 1 << 6;
const MULTIBOOT_INFO_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Field offsets in the information structure.
const OFF_FLAGS: usize = 0;
const OFF_MEM_LOWER: usize = 4;
const OFF_MEM_UPPER: usize = 8;
const OFF_CMDLINE: usize = 16;
const OFF_MODS_COUNT: usize = 20;
const OFF_MODS_ADDR: usize = 24;
const OFF_MMAP_LENGTH: usize = 44;
const OFF_MMAP_ADDR: usize = 48;
const OFF_BOOT_LOADER_NAME: usize = 64;
/// Up to and including the framebuffer fields; unused fields stay zero.
const INFO_SIZE: usize = 116;

/// A memory map entry: `size` (which excludes itself), base_addr, length, type.
const MMAP_ENTRY_SIZE: u32 = 20;
const MULTIBOOT_MEMORY_AVAILABLE: u32 = 1;
const MULTIBOOT_MEMORY_RESERVED: u32 = 2;
/// mod_start, mod_end, string, reserved.
const MODULE_ENTRY_LEN: usize = 16;

/// Conventional memory ends here; [EBDA_START, 1 MiB) holds the EBDA, video
/// memory and BIOS ROM on a PC, so it is reported reserved even though it is
/// RAM-backed here.
const EBDA_START: u64 = 0x9_fc00;
const HIGH_MEMORY_START: u64 = 0x10_0000;
/// mem_lower: 640 KiB of conventional memory.
const MEM_LOWER_KIB: u64 = 640;

const BOOT_LOADER_NAME: &str = "vmm";

/// A module the caller loaded (see [`super::load_module`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootModule<'a> {
    /// Guest-physical `[start, end)` of the module image.
    pub start: u64,
    pub end: u64,
    pub cmdline: &'a str,
}

/// What to describe in the information structure.
#[derive(Clone, Copy, Debug, Default)]
pub struct MultibootInfoRequest<'a> {
    /// Bytes of guest RAM, laid out by `layout::ram_regions`.
    pub mem_size: u64,
    /// Kernel command line; `None` leaves flag 2 clear.
    pub cmdline: Option<&'a str>,
    pub modules: &'a [MultibootModule<'a>],
}

/// The information area being assembled: offset 0 is `layout::MB_INFO_ADDR`.
struct InfoArea {
    buf: Vec<u8>,
}

impl InfoArea {
    fn addr_of(offset: usize) -> u32 {
        // The area is checked to fit below MB_INFO_END (< 4 GiB) before use,
        // so a truncating conversion never reaches guest memory.
        (layout::MB_INFO_ADDR as u32).wrapping_add(offset as u32)
    }

    fn align(&mut self, align: usize) {
        let padded = self.buf.len().next_multiple_of(align);
        self.buf.resize(padded, 0);
    }

    /// Appends `bytes`, returning their guest address.
    fn push(&mut self, bytes: &[u8]) -> u32 {
        let offset = self.buf.len();
        self.buf.extend_from_slice(bytes);
        Self::addr_of(offset)
    }

    /// Appends a NUL-terminated copy of `s`.
    fn push_str(&mut self, what: &'static str, s: &str) -> Result<u32, LoadError> {
        if s.as_bytes().contains(&0) {
            return Err(LoadError::StringHasNul { what });
        }
        let addr = self.push(s.as_bytes());
        self.buf.push(0);
        Ok(addr)
    }

    fn set_u32(&mut self, offset: usize, v: u32) {
        self.buf[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }
}

fn to_u32(what: &'static str, addr: u64) -> Result<u32, LoadError> {
    u32::try_from(addr).map_err(|_| LoadError::AddressAbove4G { what, addr })
}

/// Memory map entries `(base, length, type)` for `mem_size` bytes of RAM.
fn memory_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut entries = Vec::new();
    for (start, len) in layout::ram_regions(mem_size) {
        let end = start.saturating_add(len);
        // Split each region at the legacy hole boundaries; pieces outside
        // the region come out empty and are dropped.
        let pieces = [
            (start, end.min(EBDA_START), MULTIBOOT_MEMORY_AVAILABLE),
            (
                start.max(EBDA_START),
                end.min(HIGH_MEMORY_START),
                MULTIBOOT_MEMORY_RESERVED,
            ),
            (
                start.max(HIGH_MEMORY_START),
                end,
                MULTIBOOT_MEMORY_AVAILABLE,
            ),
        ];
        for (s, e, kind) in pieces {
            if s < e {
                entries.push((s, e - s, kind));
            }
        }
    }
    entries
}

/// KiB of RAM from 1 MiB up to the first hole.
fn mem_upper_kib(mem_size: u64) -> u32 {
    let kib = layout::ram_regions(mem_size)
        .into_iter()
        .find(|&(start, len)| {
            start <= HIGH_MEMORY_START && HIGH_MEMORY_START < start.saturating_add(len)
        })
        .map_or(0, |(start, len)| {
            (start.saturating_add(len) - HIGH_MEMORY_START) / 1024
        });
    u32::try_from(kib).unwrap_or(u32::MAX)
}

/// Writes the Multiboot information structure for `info` and returns its
/// guest address (for EBX at kernel entry).
pub fn write_multiboot_info(
    mem: &GuestMemoryMmap,
    info: &MultibootInfoRequest,
) -> Result<u64, LoadError> {
    let mut area = InfoArea {
        buf: vec![0; INFO_SIZE],
    };
    let mut flags =
        MULTIBOOT_INFO_MEMORY | MULTIBOOT_INFO_MEM_MAP | MULTIBOOT_INFO_BOOT_LOADER_NAME;

    let mem_lower = (info.mem_size / 1024).min(MEM_LOWER_KIB) as u32;
    area.set_u32(OFF_MEM_LOWER, mem_lower);
    area.set_u32(OFF_MEM_UPPER, mem_upper_kib(info.mem_size));

    if let Some(cmdline) = info.cmdline {
        flags |= MULTIBOOT_INFO_CMDLINE;
        let addr = area.push_str("command line", cmdline)?;
        area.set_u32(OFF_CMDLINE, addr);
    }

    let name = area.push_str("boot loader name", BOOT_LOADER_NAME)?;
    area.set_u32(OFF_BOOT_LOADER_NAME, name);

    if !info.modules.is_empty() {
        flags |= MULTIBOOT_INFO_MODS;
        let mut entries = Vec::with_capacity(info.modules.len() * MODULE_ENTRY_LEN);
        for module in info.modules {
            if module.end < module.start {
                return Err(LoadError::BadModuleRange {
                    start: module.start,
                    end: module.end,
                });
            }
            let start = to_u32("module start", module.start)?;
            let end = to_u32("module end", module.end)?;
            let string = area.push_str("module command line", module.cmdline)?;
            for v in [start, end, string, 0] {
                entries.extend_from_slice(&v.to_le_bytes());
            }
        }
        area.align(4);
        let mods_addr = area.push(&entries);
        let count = u32::try_from(info.modules.len()).unwrap_or(u32::MAX);
        area.set_u32(OFF_MODS_COUNT, count);
        area.set_u32(OFF_MODS_ADDR, mods_addr);
    }

    let mut mmap = Vec::new();
    for (base, len, kind) in memory_map(info.mem_size) {
        mmap.extend_from_slice(&MMAP_ENTRY_SIZE.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    area.align(8);
    let mmap_addr = area.push(&mmap);
    area.set_u32(OFF_MMAP_LENGTH, mmap.len() as u32);
    area.set_u32(OFF_MMAP_ADDR, mmap_addr);

    area.set_u32(OFF_FLAGS, flags);

    let available = (layout::MB_INFO_END - layout::MB_INFO_ADDR) as usize;
    if area.buf.len() > available {
        return Err(LoadError::MultibootInfoTooLarge {
            need: area.buf.len(),
            available,
        });
    }
    mem.write_slice(&area.buf, GuestAddress(layout::MB_INFO_ADDR))?;
    Ok(layout::MB_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::super::testimg::{guest_mem, MEM_SIZE};
    use super::*;

    fn u32_at(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn u64_at(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn c_string(mem: &GuestMemoryMmap, addr: u64) -> String {
        let mut s = Vec::new();
        for a in addr.. {
            let b: u8 = mem.read_obj(GuestAddress(a)).unwrap();
            if b == 0 {
                break;
            }
            s.push(b);
        }
        String::from_utf8(s).unwrap()
    }

    #[test]
    fn info_reads_back() {
        let mem = guest_mem();
        let modules = [
            MultibootModule {
                start: 0x40_0000,
                end: 0x40_1234,
                cmdline: "initrd arg=1",
            },
            MultibootModule {
                start: 0x40_2000,
                end: 0x40_2000,
                cmdline: "",
            },
        ];
        let req = MultibootInfoRequest {
            mem_size: MEM_SIZE,
            cmdline: Some("console=ttyS0 quiet"),
            modules: &modules,
        };
        let base = write_multiboot_info(&mem, &req).unwrap();
        assert_eq!(base, layout::MB_INFO_ADDR);

        let flags = u32_at(&mem, base);
        assert_eq!(flags, 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9);
        assert_eq!(u32_at(&mem, base + 4), 640);
        assert_eq!(
            u32_at(&mem, base + 8),
            ((MEM_SIZE - (1 << 20)) / 1024) as u32
        );

        let cmdline = u32_at(&mem, base + 16) as u64;
        assert_eq!(c_string(&mem, cmdline), "console=ttyS0 quiet");
        let name = u32_at(&mem, base + 64) as u64;
        assert_eq!(c_string(&mem, name), "vmm");

        assert_eq!(u32_at(&mem, base + 20), 2);
        let mods = u32_at(&mem, base + 24) as u64;
        assert_eq!(mods % 4, 0);
        assert_eq!(u32_at(&mem, mods), 0x40_0000);
        assert_eq!(u32_at(&mem, mods + 4), 0x40_1234);
        assert_eq!(
            c_string(&mem, u32_at(&mem, mods + 8) as u64),
            "initrd arg=1"
        );
        assert_eq!(u32_at(&mem, mods + 16), 0x40_2000);
        assert_eq!(c_string(&mem, u32_at(&mem, mods + 24) as u64), "");

        let mmap_len = u32_at(&mem, base + 44) as u64;
        let mmap = u32_at(&mem, base + 48) as u64;
        let mut entries = Vec::new();
        let mut at = mmap;
        while at < mmap + mmap_len {
            let size = u32_at(&mem, at);
            assert_eq!(size, 20);
            entries.push((
                u64_at(&mem, at + 4),
                u64_at(&mem, at + 12),
                u32_at(&mem, at + 20),
            ));
            at += 4 + u64::from(size);
        }
        assert_eq!(
            entries,
            vec![
                (0, 0x9_fc00, 1),
                (0x9_fc00, 0x10_0000 - 0x9_fc00, 2),
                (0x10_0000, MEM_SIZE - 0x10_0000, 1),
            ]
        );
        // Everything stays inside the Multiboot area.
        for addr in [cmdline, name, mods, mmap + mmap_len] {
            assert!((layout::MB_INFO_ADDR..=layout::MB_INFO_END).contains(&addr));
        }
    }

    #[test]
    fn no_cmdline_and_no_modules_leave_flags_clear() {
        let mem = guest_mem();
        let req = MultibootInfoRequest {
            mem_size: MEM_SIZE,
            ..Default::default()
        };
        let base = write_multiboot_info(&mem, &req).unwrap();
        assert_eq!(u32_at(&mem, base), 1 | 1 << 6 | 1 << 9);
    }

    #[test]
    fn memory_map_covers_high_ram_after_the_device_window() {
        let mem_size = 4u64 << 30;
        let map = memory_map(mem_size);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], (0x10_0000, layout::RAM_32BIT_END - 0x10_0000, 1));
        assert_eq!(
            map[3],
            (layout::HIGH_RAM_START, mem_size - layout::RAM_32BIT_END, 1)
        );
        assert_eq!(
            mem_upper_kib(mem_size) as u64,
            (layout::RAM_32BIT_END - 0x10_0000) / 1024
        );
        // Tiny guests: no high memory at all.
        assert_eq!(memory_map(0x8_0000), vec![(0, 0x8_0000, 1)]);
        assert_eq!(mem_upper_kib(0x8_0000), 0);
    }

    #[test]
    fn rejects_oversized_info() {
        let mem = guest_mem();
        mem.write_obj(0xdead_beefu32, GuestAddress(layout::MB_INFO_ADDR))
            .unwrap();
        let long = "x".repeat(5000);
        let req = MultibootInfoRequest {
            mem_size: MEM_SIZE,
            cmdline: Some(&long),
            modules: &[],
        };
        let err = write_multiboot_info(&mem, &req).unwrap_err();
        assert!(
            matches!(err, LoadError::MultibootInfoTooLarge { .. }),
            "{err}"
        );
        // Nothing was written.
        assert_eq!(u32_at(&mem, layout::MB_INFO_ADDR), 0xdead_beef);
    }

    #[test]
    fn rejects_bad_modules_and_strings() {
        let mem = guest_mem();
        let check = |modules: &[MultibootModule], cmdline, expect: fn(&LoadError) -> bool| {
            let req = MultibootInfoRequest {
                mem_size: MEM_SIZE,
                cmdline,
                modules,
            };
            let err = write_multiboot_info(&mem, &req).unwrap_err();
            assert!(expect(&err), "{err}");
        };
        let module = |start, end, cmdline| MultibootModule {
            start,
            end,
            cmdline,
        };
        check(&[module(1 << 32, (1 << 32) + 1, "")], None, |e| {
            matches!(e, LoadError::AddressAbove4G { .. })
        });
        check(&[module(0x2000, 0x1000, "")], None, |e| {
            matches!(e, LoadError::BadModuleRange { .. })
        });
        check(&[module(0x1000, 0x2000, "a\0b")], None, |e| {
            matches!(e, LoadError::StringHasNul { .. })
        });
        check(&[], Some("nul\0"), |e| {
            matches!(e, LoadError::StringHasNul { .. })
        });
    }
}
