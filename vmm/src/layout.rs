//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0000 - 0x0000_0fff  untouched (real-mode IVT, guests' page 0)
//! 0x0000_1000 - 0x0000_10ff  GDT for protected and long mode entry
//! 0x0000_2000 - 0x0000_2fff  PML4 (long mode)
//! 0x0000_3000 - 0x0000_3fff  PDPT (long mode)
//! 0x0000_4000 - 0x0000_7fff  four page directories: 4 GiB identity, 2 MiB pages
//! 0x0000_8000 - 0x0000_dfff  untouched (kvm-unit-tests use it)
//! 0x0000_e000 - 0x0000_efff  Multiboot information, memory map, command line
//! 0x0000_f000 - 0x0000_ffff  untouched
//! 0x000e_0000 - 0x000f_ffff  ACPI tables (RSDP is found by the BIOS-area scan)
//! 0x0010_0000                default load address for flat images
//! RAM_32BIT_END              end of low RAM; RAM beyond continues at 4 GiB
//! 0xfec0_0000, 0xfee0_0000   IOAPIC, LAPIC (in-kernel irqchip)
//! 0xff00_0000                pc-testdev MMIO buffer (with --testdev)
//! ```

/// Guest GDT used for protected- and long-mode entry.
pub const GDT_ADDR: u64 = 0x1000;
/// Long-mode page tables.
pub const PML4_ADDR: u64 = 0x2000;
pub const PDPT_ADDR: u64 = 0x3000;
pub const PD_ADDR: u64 = 0x4000;
/// Number of page directories: each maps 1 GiB with 2 MiB pages.
pub const PD_COUNT: u64 = 4;
/// Multiboot information structure and everything it points to.
pub const MB_INFO_ADDR: u64 = 0xe000;
pub const MB_INFO_END: u64 = 0xf000;
/// The region `--mode long|protected` boot structures occupy (kept clear of
/// loaded images).
pub const BOOT_STRUCTS_START: u64 = GDT_ADDR;
pub const BOOT_STRUCTS_END: u64 = PD_ADDR + PD_COUNT * 0x1000;
/// Where the BIOS-area ACPI tables go.
pub const ACPI_AREA: u64 = 0xe_0000;
/// Default load address of flat images.
pub const DEFAULT_LOAD_ADDR: u64 = 0x10_0000;
/// Low RAM stops here so the 32-bit device window (IOAPIC, LAPIC, testdev,
/// user MMIO windows) stays free; RAM beyond this continues at 4 GiB.
pub const RAM_32BIT_END: u64 = 0xc000_0000;
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const TESTDEV_MMIO_ADDR: u64 = 0xff00_0000;

/// Guest RAM regions for `mem_size` bytes of RAM: low RAM up to
/// `RAM_32BIT_END`, the rest at `HIGH_RAM_START`.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(RAM_32BIT_END);
    let mut v = vec![(0, low)];
    if mem_size > low {
        v.push((HIGH_RAM_START, mem_size - low));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_at_the_device_window() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, RAM_32BIT_END),
                (HIGH_RAM_START, (4 << 30) - RAM_32BIT_END)
            ]
        );
    }

    // kvm-unit-tests use page 0 and 0x8000-0xdfff.
    const _: () = assert!(BOOT_STRUCTS_START >= 0x1000);
    const _: () = assert!(BOOT_STRUCTS_END <= 0x8000);
    const _: () = assert!(MB_INFO_ADDR >= 0xe000 && MB_INFO_END <= 0x10000);
}
