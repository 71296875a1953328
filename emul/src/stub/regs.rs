//! The guest register file a stub loads before the instruction and saves
//! after it.

use core::mem::offset_of;

/// The arithmetic flags (CF, PF, AF, ZF, SF, OF) a stub carries between the
/// guest register file and the real RFLAGS. Every other RFLAGS bit but AC
/// (see `RFLAGS_AC`) stays the host's while the stub runs (so DF and TF
/// are clear) and keeps its guest value in [`GuestGprs::rflags`].
pub const ARITH_FLAGS_MASK: u64 = 0x8d5;

/// RFLAGS.AC. Unlike the other non-arithmetic bits, the stub loads it from
/// the register file, so a caller can have the instruction alignment-checked
/// natively (a guest at CPL 3 with CR0.AM and RFLAGS.AC set); callers that
/// do not want that clear it. It is cleared again before the host resumes.
pub const RFLAGS_AC: u64 = 1 << 18;

/// What `load_guest_gprs` takes from the register file's RFLAGS.
pub const LOADED_FLAGS_MASK: u64 = ARITH_FLAGS_MASK | RFLAGS_AC;

/// RFLAGS.CF
pub const RFLAGS_CF: u64 = 1 << 0;
/// RFLAGS.PF
pub const RFLAGS_PF: u64 = 1 << 2;
/// RFLAGS.AF
pub const RFLAGS_AF: u64 = 1 << 4;
/// RFLAGS.ZF
pub const RFLAGS_ZF: u64 = 1 << 6;
/// RFLAGS.SF
pub const RFLAGS_SF: u64 = 1 << 7;
/// RFLAGS.OF
pub const RFLAGS_OF: u64 = 1 << 11;

const _: () = assert!(
    RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF == ARITH_FLAGS_MASK
);

/// The guest's general-purpose registers and RFLAGS, in the hardware
/// register-number order (rax = 0 .. r15 = 15) so the generated helpers can
/// address register `n` at byte offset `8 * n`.
///
/// `rsp` is carried so a caller can keep one structure per vCPU, but a stub
/// never loads it into the real RSP: the stub runs on the host stack.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestGprs {
    /// RAX.
    pub rax: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RBX.
    pub rbx: u64,
    /// RSP.
    pub rsp: u64,
    /// RBP.
    pub rbp: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
    /// RFLAGS (the stub loads and saves the arithmetic flags, and AC).
    pub rflags: u64,
}

/// Hardware number of RSP, the one GPR the helpers skip.
pub(crate) const RSP_NUM: u8 = 4;
/// Hardware number of RDI, the register that holds the `GuestGprs` pointer
/// inside the helpers and is therefore loaded last / saved first.
pub(crate) const RDI_NUM: u8 = 7;

/// Byte offset of GPR number `n` (hardware numbering) in [`GuestGprs`].
pub(crate) const fn gpr_offset(n: u8) -> i32 {
    8 * n as i32
}

/// Byte offset of `rflags` in [`GuestGprs`].
pub(crate) const RFLAGS_OFFSET: i32 = offset_of!(GuestGprs, rflags) as i32;

// The helpers rely on the hardware-order layout; catch a reordered field at
// build time rather than as corrupted guest state at run time.
const _: () = {
    assert!(offset_of!(GuestGprs, rax) as i32 == gpr_offset(0));
    assert!(offset_of!(GuestGprs, rcx) as i32 == gpr_offset(1));
    assert!(offset_of!(GuestGprs, rdx) as i32 == gpr_offset(2));
    assert!(offset_of!(GuestGprs, rbx) as i32 == gpr_offset(3));
    assert!(offset_of!(GuestGprs, rsp) as i32 == gpr_offset(RSP_NUM));
    assert!(offset_of!(GuestGprs, rbp) as i32 == gpr_offset(5));
    assert!(offset_of!(GuestGprs, rsi) as i32 == gpr_offset(6));
    assert!(offset_of!(GuestGprs, rdi) as i32 == gpr_offset(RDI_NUM));
    assert!(offset_of!(GuestGprs, r8) as i32 == gpr_offset(8));
    assert!(offset_of!(GuestGprs, r15) as i32 == gpr_offset(15));
    assert!(RFLAGS_OFFSET == 128);
    assert!(core::mem::size_of::<GuestGprs>() == 17 * 8);
};
