//! Guest page walks in userspace: paging off, 32-bit (with 4 MiB PSE
//! pages), PAE, 4-level and 5-level, with the permission checks and
//! accessed/dirty updates hardware makes. SMAP, SMEP, PKU and CET shadow
//! stacks are not modelled.

use crate::cpu::{
    CpuState, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE,
    RFLAGS_AC,
};
use crate::exception::Exception;
use crate::platform::{Platform, PlatformError};

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;

/// #PF error code bits.
pub const PFEC_P: u32 = 1 << 0;
/// #PF error code: the access was a write.
pub const PFEC_W: u32 = 1 << 1;
/// #PF error code: the access was from user mode.
pub const PFEC_U: u32 = 1 << 2;
/// #PF error code: a reserved bit was set in an entry.
pub const PFEC_RSVD: u32 = 1 << 3;
/// #PF error code: the access was an instruction fetch.
pub const PFEC_ID: u32 = 1 << 4;

/// The deepest walk (5-level paging).
const MAX_LEVELS: usize = 5;

/// What an access wants of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// A write (checks R/W, sets dirty bits).
    pub write: bool,
    /// An instruction fetch (checks NX and SMEP).
    pub fetch: bool,
    /// A user-mode access (CPL 3).
    pub user: bool,
}

/// Why a translation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkError {
    /// The walk failed: this exception (#PF with its error code and CR2) is due.
    Fault(Exception),
    /// Reading or updating a page-table entry failed in the VMM.
    Platform(PlatformError),
    /// Another CPU changed the entry at `gpa` between the walk's read and
    /// its accessed/dirty update, every time the walk tried. Nothing is
    /// wrong with the translation: the instruction is retried from the
    /// guest (as the CPU would finish it once it won the race).
    Contended {
        /// Guest-physical address of the entry.
        gpa: u64,
    },
}

impl From<PlatformError> for WalkError {
    fn from(e: PlatformError) -> Self {
        WalkError::Platform(e)
    }
}

/// One level of a paging mode.
#[derive(Clone, Copy)]
struct Level {
    /// Lowest linear-address bit this level indexes.
    shift: u32,
    /// Index width in bits.
    bits: u32,
    /// Whether PS may map a page here.
    large: bool,
    /// PAE PDPTEs carry no access rights and no A bit.
    pdpte: bool,
}

const fn lv(shift: u32, bits: u32, large: bool) -> Level {
    Level {
        shift,
        bits,
        large,
        pdpte: false,
    }
}

const LEGACY32: [Level; 2] = [lv(22, 10, true), lv(12, 10, false)];
const PAE: [Level; 3] = [
    Level {
        shift: 30,
        bits: 2,
        large: false,
        pdpte: true,
    },
    lv(21, 9, true),
    lv(12, 9, false),
];
const LONG4: [Level; 4] = [
    lv(39, 9, false),
    lv(30, 9, true),
    lv(21, 9, true),
    lv(12, 9, false),
];
const LONG5: [Level; 5] = [
    lv(48, 9, false),
    lv(39, 9, false),
    lv(30, 9, true),
    lv(21, 9, true),
    lv(12, 9, false),
];

/// How many times a walk starts again because another CPU changed an
/// entry between the walk's read and its accessed/dirty update, before the
/// instruction is handed back to the guest to retry
/// ([`WalkError::Contended`]): the CPU never gives up, and neither does
/// the guest's retry, but it lets this thread see the VM stop meanwhile.
const WALK_ATTEMPTS: usize = 64;

/// Translates linear address `lin` for `access`; on success returns the
/// guest-physical address, after setting accessed bits on every entry used
/// and the dirty bit on the leaf of a write. Entry bits from the guest's
/// MAXPHYADDR ([`CpuState::max_phys_bits`]) up to 51 are reserved.
///
/// The bits are set as the CPU's walker sets them, each with a
/// compare-and-exchange ([`Platform::compare_exchange_phys`]); when another
/// CPU changed an entry after the walk read it, the walk starts again
/// with what the entries hold now.
pub fn translate(
    cpu: &CpuState,
    lin: u64,
    access: Access,
    mem: &mut dyn Platform,
) -> Result<u64, WalkError> {
    let mut lost = 0;
    for _ in 0..WALK_ATTEMPTS {
        match walk(cpu, lin, access, mem)? {
            Walked::Done(gpa) => return Ok(gpa),
            Walked::EntryChanged(at) => lost = at,
        }
    }
    Err(WalkError::Contended { gpa: lost })
}

/// Translates the `len` bytes (at most a page) at `lin` page by page, as
/// one access: the guest-physical address and length of each piece, the
/// second empty when the bytes stay on one page. Every page is walked
/// before the caller touches any byte, so a fault leaves nothing done.
/// With `wrap32` (code outside IA-32e mode) the second page's address
/// wraps at 4 GiB.
pub(crate) fn translate_span(
    cpu: &CpuState,
    lin: u64,
    len: usize,
    wrap32: bool,
    access: Access,
    mem: &mut dyn Platform,
) -> Result<[(u64, usize); 2], WalkError> {
    const PAGE: u64 = 4096;
    let first = len.min((PAGE - (lin & (PAGE - 1))) as usize);
    let gpa = translate(cpu, lin, access, mem)?;
    if first == len {
        return Ok([(gpa, len), (0, 0)]);
    }
    let next = lin.wrapping_add(first as u64);
    let next = if wrap32 { next & 0xffff_ffff } else { next };
    Ok([
        (gpa, first),
        (translate(cpu, next, access, mem)?, len - first),
    ])
}

/// One pass of [`translate`].
enum Walked {
    /// The guest-physical address, with the accessed/dirty bits set.
    Done(u64),
    /// The entry at this address changed before its accessed/dirty update.
    EntryChanged(u64),
}

fn walk(
    cpu: &CpuState,
    lin: u64,
    access: Access,
    mem: &mut dyn Platform,
) -> Result<Walked, WalkError> {
    if cpu.cr0 & CR0_PG == 0 {
        // Paging off: linear is physical (32 bits outside long mode).
        return Ok(Walked::Done(if cpu.efer & EFER_LMA != 0 {
            lin
        } else {
            lin & 0xffff_ffff
        }));
    }
    let nxe = cpu.efer & EFER_NXE != 0;
    let (levels, entry_size, mut table): (&[Level], usize, u64) = if cpu.cr4 & CR4_PAE == 0 {
        (&LEGACY32, 4, cpu.cr3 & 0xffff_f000)
    } else if cpu.efer & EFER_LMA == 0 {
        (&PAE, 8, cpu.cr3 & 0xffff_ffe0)
    } else if cpu.cr4 & CR4_LA57 != 0 {
        (&LONG5, 8, cpu.cr3 & 0x000f_ffff_ffff_f000)
    } else {
        (&LONG4, 8, cpu.cr3 & 0x000f_ffff_ffff_f000)
    };
    let phys_bits = u32::from(cpu.max_phys_bits.clamp(32, 52));
    let addr_mask = ((1u64 << phys_bits) - 1) & !0xfff;
    // Bits MAXPHYADDR..51 of a 64-bit entry, and NX without EFER.NXE.
    let rsvd_hi = (((1u64 << 52) - 1) & !((1u64 << phys_bits) - 1)) | if nxe { 0 } else { PTE_NX };

    let smep = cpu.cr4 & CR4_SMEP != 0;
    let bit = |on: bool, b: u32| if on { b } else { 0 };
    let base_code = bit(access.write, PFEC_W)
        | bit(access.user, PFEC_U)
        | bit(access.fetch && ((nxe && entry_size == 8) || smep), PFEC_ID);
    let fault = |bits: u32| WalkError::Fault(Exception::page_fault(base_code | bits, lin));

    let mut used = [(0u64, 0u64, false); MAX_LEVELS];
    let mut used_len = 0;
    let (mut user_ok, mut write_ok, mut nx) = (true, true, false);
    let mut frame = None;
    // Bounded by the mode's level count: a guest cannot make this loop.
    for level in levels {
        let index = (lin >> level.shift) & ((1 << level.bits) - 1);
        let entry_addr = table + index * entry_size as u64;
        let entry = read_entry(mem, entry_addr, entry_size)?;
        if entry & PTE_P == 0 {
            return Err(fault(0));
        }
        let is_large =
            level.large && entry & PTE_PS != 0 && (entry_size == 8 || cpu.cr4 & CR4_PSE != 0);
        if entry_size == 8 {
            let mut rsvd = entry & rsvd_hi != 0;
            if level.pdpte {
                // PAE PDPTE: bits 1, 2, 5..8 and NX are reserved.
                rsvd |= entry & (0x1e6 | PTE_NX) != 0;
            } else if !level.large && level.shift > 12 && entry & PTE_PS != 0 {
                rsvd = true; // PS in a PML4E/PML5E
            }
            if is_large {
                // Frame bits below the page size (above the PAT bit).
                let low = ((1u64 << level.shift) - 1) & !0x1fff;
                rsvd |= entry & low != 0;
            }
            if rsvd {
                return Err(fault(PFEC_P | PFEC_RSVD));
            }
        }
        if !level.pdpte {
            user_ok &= entry & PTE_US != 0;
            write_ok &= entry & PTE_RW != 0;
            nx |= nxe && entry & PTE_NX != 0;
        }
        used[used_len] = (entry_addr, entry, level.pdpte);
        used_len += 1;
        if is_large || level.shift == 12 {
            let page_mask = (1u64 << level.shift) - 1;
            let base = if entry_size == 4 && is_large {
                // PSE-36: PDE bits 13..20 are physical-address bits 32..39.
                (entry & 0xffc0_0000) | ((entry >> 13) & 0xff) << 32
            } else {
                entry & addr_mask & !page_mask
            };
            frame = Some(base | (lin & page_mask));
            break;
        }
        table = if entry_size == 4 {
            entry & 0xffff_f000
        } else {
            entry & addr_mask
        };
    }
    let Some(gpa) = frame else {
        return Err(fault(0));
    };

    let wp = cpu.cr0 & CR0_WP != 0;
    // A supervisor access to a user page: SMEP forbids fetching from it,
    // SMAP forbids touching its data unless RFLAGS.AC is set.
    let supervisor_on_user = !access.user && user_ok;
    let smap = cpu.cr4 & CR4_SMAP != 0 && cpu.gprs.rflags & RFLAGS_AC == 0;
    if (access.user && !user_ok)
        || (access.write && !write_ok && (access.user || wp))
        || (access.fetch && nx)
        || (supervisor_on_user && access.fetch && smep)
        || (supervisor_on_user && !access.fetch && smap)
    {
        return Err(fault(PFEC_P));
    }

    // Accessed on every level, dirty on the leaf of a write, as the
    // hardware walker does: each a locked update of the entry the walk
    // read.
    for (i, &(addr, entry, pdpte)) in used[..used_len].iter().enumerate() {
        if pdpte {
            continue;
        }
        let leaf = i + 1 == used_len;
        let new = entry | PTE_A | if leaf && access.write { PTE_D } else { 0 };
        let (current, new) = (entry.to_le_bytes(), new.to_le_bytes());
        let size = entry_size;
        if new != current && !mem.compare_exchange_phys(addr, &current[..size], &new[..size])? {
            return Ok(Walked::EntryChanged(addr));
        }
    }
    Ok(Walked::Done(gpa))
}

/// Reads an entry in one access, as the CPU's walker does: the buffer is
/// aligned like the entry, so a VMM's copy cannot tear it into bytes
/// (vm-memory 0.18 copies up to 8 bytes at the smaller alignment of its
/// two sides; `vmm`'s `table_entries_are_read_whole` checks it).
fn read_entry(mem: &mut dyn Platform, addr: u64, size: usize) -> Result<u64, PlatformError> {
    #[repr(align(8))]
    struct Entry([u8; 8]);
    let mut b = Entry([0; 8]);
    mem.read_phys(addr, &mut b.0[..size])?;
    Ok(u64::from_le_bytes(b.0))
}

/// Whether `lin` is canonical for 48-bit (or, with LA57, 57-bit) linear
/// addresses.
pub fn is_canonical(cpu: &CpuState, lin: u64) -> bool {
    let bits = if cpu.cr4 & CR4_LA57 != 0 { 57 } else { 48 };
    let shift = 64 - bits;
    ((lin << shift) as i64 >> shift) as u64 == lin
}
