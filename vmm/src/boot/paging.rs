//! Long-mode page tables: an identity map of the low 4 GiB with 2 MiB pages
//! (1 GiB pages fail on these hosts), user-accessible so a guest can drop to
//! CPL 3 without building its own tables.

use super::{write_u64s, BootError};
use crate::layout::{PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR};
use vm_memory::GuestMemoryMmap;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const TABLE: u64 = PRESENT | WRITABLE | USER;

pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    write_u64s(mem, PML4_ADDR, &[PDPT_ADDR | TABLE])?;
    let pdpt: Vec<u64> = (0..PD_COUNT)
        .map(|i| (PD_ADDR + i * 0x1000) | TABLE)
        .collect();
    write_u64s(mem, PDPT_ADDR, &pdpt)?;
    let pds: Vec<u64> = (0..PD_COUNT * 512)
        .map(|i| (i << 21) | TABLE | HUGE)
        .collect();
    write_u64s(mem, PD_ADDR, &pds)
}
