//! The emulator's only view of the VM: guest-physical memory (RAM or the
//! MMIO bus, as the VMM decides) and, on demand, the vector state.

use thiserror::Error;

/// A guest-physical access the VMM could not complete.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("guest-physical access of {len} bytes at {gpa:#x} failed: {reason}")]
pub struct PlatformError {
    /// Guest-physical address of the access.
    pub gpa: u64,
    /// Its length in bytes.
    pub len: usize,
    /// What went wrong, for the VMM's message.
    pub reason: &'static str,
}

/// Guest-physical memory as the emulator sees it.
///
/// Each call stays within one guest page (the emulator splits accesses at
/// page boundaries after translation). What an unbacked address reads as
/// (all-ones, like an open bus) is the VMM's choice; returning an error
/// aborts the emulation with [`Outcome::Platform`](crate::Outcome::Platform).
pub trait Platform {
    /// Reads `buf.len()` bytes at guest-physical `gpa` (RAM or a device).
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError>;
    /// Writes `buf` at guest-physical `gpa` (RAM or a device).
    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError>;
    /// Stores `new` at `gpa` only if the bytes there still equal `current`
    /// (same length, 1 to 16 bytes, within one page), as one locked
    /// access; `Ok(false)`: they changed and nothing was written. This is
    /// how the emulator's read-modify-writes that the CPU makes atomic
    /// reach memory: the page walker's accessed and dirty bits (a plain
    /// write would bring back an entry another vCPU just cleared), and the
    /// result of a LOCK-prefixed instruction or XCHG, which ran on a copy
    /// of the operand. On `false` the emulator walks again, or runs the
    /// instruction again on what memory holds now (as KVM's emulator does
    /// for CMPXCHG).
    ///
    /// The default writes `new` through [`write_phys`](Self::write_phys)
    /// and reports success: right for a guest nobody else writes while the
    /// emulator runs (one vCPU, no DMA) and for device memory, where a
    /// second read could have side effects. A VMM with several vCPUs must
    /// override it for RAM.
    fn compare_exchange_phys(
        &mut self,
        gpa: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<bool, PlatformError> {
        let _ = current;
        self.write_phys(gpa, new)?;
        Ok(true)
    }
}

/// The guest's x87/SSE/AVX/AVX-512 state, fetched only for instructions
/// that touch it (each fetch is an ioctl for a KVM VMM).
pub trait VectorState {
    /// The guest's XSAVE image in standard (non-compacted) format, as
    /// `KVM_GET_XSAVE` returns it (4096 bytes; offsets of the extended
    /// components are the host's CPUID leaf 0xD offsets). May be called
    /// twice for one instruction (a masked access reads its mask first):
    /// fetch once and hand out the same image.
    fn image(&mut self) -> Result<&mut [u8], PlatformError>;
    /// Called after the instruction changed the image (the VMM then owes a
    /// `KVM_SET_XSAVE` before the vCPU runs again).
    fn mark_dirty(&mut self);
    /// The guest's XCR0 (`KVM_GET_XCRS` for a KVM VMM). Asked only by
    /// instructions whose behaviour depends on it (VEX/EVEX forms raise #UD
    /// when their state components are off, the XSAVE family's requested
    /// features); a VMM should fetch it at most once per exit.
    fn xcr0(&mut self) -> Result<u64, PlatformError>;
    /// Whether the CPU already ran this instruction natively up to its
    /// memory access with the guest's XCR0 in force (hardware KVM, which
    /// loads the guest's XCR0 for it; not PVM, which interprets CPL 0 code
    /// and runs CPL 3 code under the host's XCR0). A VEX or
    /// EVEX form whose state components are off in XCR0 then raised #UD in
    /// hardware before it could exit, so the emulator skips that check and
    /// its XCR0 read (one ioctl for a KVM VMM). The XSAVE family and XGETBV
    /// still read XCR0: their results depend on it. Default: `false`.
    fn xcr0_checked_natively(&self) -> bool {
        false
    }
}

/// A [`VectorState`] for callers that hold no vector state: any instruction
/// that needs it ends in [`Outcome::Platform`](crate::Outcome::Platform).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoVectorState;

impl VectorState for NoVectorState {
    fn image(&mut self) -> Result<&mut [u8], PlatformError> {
        Err(PlatformError {
            gpa: 0,
            len: 0,
            reason: "no vector state available",
        })
    }
    fn mark_dirty(&mut self) {}
    fn xcr0(&mut self) -> Result<u64, PlatformError> {
        Err(PlatformError {
            gpa: 0,
            len: 0,
            reason: "no vector state available",
        })
    }
}

/// An owned XSAVE image with a dirty flag: the simplest [`VectorState`].
#[derive(Debug, Clone)]
pub struct XsaveImage {
    /// The image, [`KVM_XSAVE_SIZE`] bytes.
    pub bytes: Vec<u8>,
    /// Whether the emulator changed it (write it back to the vCPU).
    pub dirty: bool,
    /// How many times [`VectorState::image`] was called.
    pub fetches: u32,
    /// What [`VectorState::xcr0`] returns.
    pub xcr0: u64,
}

/// Size of the image `KVM_GET_XSAVE` fills.
pub const KVM_XSAVE_SIZE: usize = 4096;

impl XsaveImage {
    /// A 4096-byte image in the initial state (MXCSR 0x1f80, x87 control
    /// word 0x37f, XSTATE_BV 0).
    pub fn new() -> Self {
        let mut bytes = vec![0u8; KVM_XSAVE_SIZE];
        bytes[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        bytes[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        XsaveImage {
            bytes,
            dirty: false,
            fetches: 0,
            xcr0: host_user_xcr0(),
        }
    }
}

impl Default for XsaveImage {
    fn default() -> Self {
        Self::new()
    }
}

impl VectorState for XsaveImage {
    fn image(&mut self) -> Result<&mut [u8], PlatformError> {
        self.fetches += 1;
        Ok(&mut self.bytes)
    }
    fn mark_dirty(&mut self) {
        self.dirty = true;
    }
    fn xcr0(&mut self) -> Result<u64, PlatformError> {
        Ok(self.xcr0)
    }
}

/// The user state components this CPU supports among x87, SSE, AVX and
/// AVX-512 (CPUID leaf 0xD, subleaf 0, EAX bits 0-2 and 5-7): the XCR0 a
/// guest that enables everything it may would have.
pub fn host_user_xcr0() -> u64 {
    let leaf = core::arch::x86_64::__cpuid_count(0xd, 0);
    u64::from(leaf.eax) & 0xe7
}
