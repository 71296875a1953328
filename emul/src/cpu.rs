//! The guest CPU state the VMM hands over, and the mode it implies.

use crate::stub::GuestGprs;

/// CR0.PE
pub const CR0_PE: u64 = 1 << 0;
/// CR0.MP
pub const CR0_MP: u64 = 1 << 1;
/// CR0.EM
pub const CR0_EM: u64 = 1 << 2;
/// CR0.TS
pub const CR0_TS: u64 = 1 << 3;
/// CR0.WP
pub const CR0_WP: u64 = 1 << 16;
/// CR0.AM: alignment checking at CPL 3 when RFLAGS.AC is set.
pub const CR0_AM: u64 = 1 << 18;
/// CR0.PG
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PSE
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.LA57
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.OSXSAVE
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.SMEP: supervisor fetches from user pages fault.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: supervisor data accesses to user pages fault unless RFLAGS.AC.
pub const CR4_SMAP: u64 = 1 << 21;
/// RFLAGS.AC (lifts SMAP for explicit supervisor accesses).
pub const RFLAGS_AC: u64 = 1 << 18;
/// EFER.LMA
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE
pub const EFER_NXE: u64 = 1 << 11;

/// A segment register's hidden part, as in `kvm_segment`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The selector (KVM's `selector`).
    pub selector: u16,
    /// The segment base (hidden part).
    pub base: u64,
    /// The limit in bytes, granularity already applied (as KVM reports it).
    pub limit: u32,
    /// Descriptor type (4 bits: for data segments bit 1 = writable,
    /// bit 2 = expand-down; bit 3 = code).
    pub type_: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// D/B: 32-bit default operand/stack size.
    pub db: bool,
    /// L: 64-bit code segment.
    pub l: bool,
    /// P: present.
    pub present: bool,
    /// A null selector loaded in protected mode.
    pub unusable: bool,
}

impl Segment {
    /// A flat writable data segment (base 0, limit 4 GiB).
    pub fn flat_data() -> Self {
        Segment {
            base: 0,
            limit: u32::MAX,
            type_: 0x3,
            db: true,
            present: true,
            ..Default::default()
        }
    }
}

/// A descriptor-table register (GDTR), as in `kvm_dtable`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear address of the table.
    pub base: u64,
    /// The last valid byte offset (a table of N descriptors has limit
    /// 8N - 1).
    pub limit: u16,
}

/// What the emulator needs of the vCPU (from KVM's sync regs/sregs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CpuState {
    /// General-purpose registers and RFLAGS; updated on [`Outcome::Done`](crate::Outcome::Done).
    pub gprs: GuestGprs,
    /// RIP of the instruction; advanced past it on [`Outcome::Done`](crate::Outcome::Done).
    pub rip: u64,
    /// CR0 (PE, PG, WP, AM, EM, TS are read).
    pub cr0: u64,
    /// CR2 (not changed here: a #PF's address comes back in the outcome).
    pub cr2: u64,
    /// CR3: the root of the guest page tables.
    pub cr3: u64,
    /// CR4 (PAE, LA57, SMEP, SMAP, OSFXSR, OSXSAVE... are read).
    pub cr4: u64,
    /// EFER (LMA, NXE are read).
    pub efer: u64,
    /// Code segment: decides the code size (CS.L, CS.D).
    pub cs: Segment,
    /// Stack segment.
    pub ss: Segment,
    /// Data segment.
    pub ds: Segment,
    /// Extra segment.
    pub es: Segment,
    /// FS (its base applies in 64-bit mode).
    pub fs: Segment,
    /// GS (its base applies in 64-bit mode).
    pub gs: Segment,
    /// GDTR: read by LAR, LSL, VERR and VERW.
    pub gdtr: DescriptorTable,
    /// LDTR (its selector, base, byte-granular limit and `unusable` when
    /// null): read by LAR, LSL, VERR and VERW for selectors with TI set.
    pub ldtr: Segment,
    /// Current privilege level (SS.DPL in protected mode, 0 in real mode).
    pub cpl: u8,
    /// The guest's physical-address width (MAXPHYADDR, CPUID
    /// 0x80000008 EAX\[7:0\]): page-table entry bits from it up to 51 are
    /// reserved and give #PF with the RSVD bit. The walk clamps it to
    /// 32..=52, so a forgotten 0 shows at once as faults above 4 GiB.
    pub max_phys_bits: u8,
}

impl CpuState {
    /// Code bitness: 64 in long mode with CS.L, else 32 or 16 by CS.D; 16
    /// in real mode. (Virtual-8086 mode is not distinguished.)
    pub fn bitness(&self) -> u32 {
        if self.cr0 & CR0_PE == 0 {
            16
        } else if self.efer & EFER_LMA != 0 && self.cs.l {
            64
        } else if self.cs.db {
            32
        } else {
            16
        }
    }

    /// A flat 64-bit CPL-0 state with 4-level paging rooted at `cr3`.
    pub fn long_mode(cr3: u64) -> Self {
        let data = Segment::flat_data();
        CpuState {
            cr0: CR0_PE | CR0_MP | CR0_WP | CR0_PG,
            cr3,
            cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE,
            efer: EFER_LMA | EFER_NXE | (1 << 8),
            cs: Segment {
                type_: 0xb,
                l: true,
                db: false,
                ..data
            },
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            max_phys_bits: 52,
            ..Default::default()
        }
    }
}
