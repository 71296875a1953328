//! `StubBuf`: one vCPU thread's stub buffer and the call into it.

use core::arch::asm;
use std::ptr;

use super::builder::MAX_INSN_LEN;
use super::builder::{self, BuiltStub, STUB_BUF_SIZE};
use super::cursor::INT3;
use super::error::{StubError, StubRunError};
use super::fault::{self, ControlBlock, StubFault, EXC_MF, EXC_XM, NO_FAULT};
use super::helpers::{self, HelperLayout, VecSwitch};
use super::region::{StubRegion, XSAVE_AREA_SIZE};
use super::regs::GuestGprs;
use super::ret::RetPolicy;

/// A per-vCPU stub buffer with its helpers and bounce buffer.
///
/// Build and run stubs from one thread at a time (`run` takes `&mut self`);
/// the buffer may move between threads.
pub struct StubBuf {
    region: StubRegion,
    helpers: HelperLayout,
    policy: RetPolicy,
    /// The host's XCR0 (0 without OSXSAVE).
    xcr0: u64,
    /// The MXCSR bits this CPU accepts (FXSAVE's MXCSR_MASK).
    mxcsr_mask: u32,
    /// The XSAVE components a vector run switches (0: vector runs refused).
    vec_mask: u64,
    /// Bytes of a standard-format image a vector run reads and writes.
    vector_span: usize,
    /// The stub left built by the last run. Guests repeat instructions (a
    /// loop over MMIO), and rewriting code that just ran costs a
    /// self-modifying-code pipeline flush, so an identical request reuses it.
    cached: Option<CachedStub>,
}

/// What the cached stub was built from, and where it is.
#[derive(Clone, Copy)]
struct CachedStub {
    insn: [u8; MAX_INSN_LEN],
    insn_len: usize,
    with_vec: bool,
    stub: BuiltStub,
}

/// XSAVE components a vector run switches between host and guest: x87,
/// SSE, AVX, opmask, ZMM_Hi256 and Hi16_ZMM (not PKRU, AMX or supervisor
/// state, which no allow-listed instruction touches).
pub const VECTOR_XFEATURES: u64 = 0xe7;

/// Offset of XSTATE_BV in a standard-format XSAVE area.
pub const XSAVE_HEADER_OFFSET: usize = 512;
/// Offset of MXCSR in the legacy region.
const MXCSR_OFFSET: usize = 24;

/// The MXCSR bits LDMXCSR and XRSTOR accept on this CPU: FXSAVE's
/// MXCSR_MASK, 0xffbf where it reads 0 (SDM vol. 1, 11.6.6). AMD CPUs
/// with misaligned SSE mode accept bit 17 (MM) too: 0x2ffff here.
fn host_mxcsr_mask() -> u32 {
    #[repr(C, align(16))]
    struct FxArea([u8; 512]);
    let mut area = FxArea([0; 512]);
    // SAFETY: FXSAVE64 stores 512 bytes into a 16-byte aligned buffer of
    // that size; every x86-64 CPU has FXSR.
    unsafe { core::arch::x86_64::_fxsave64(area.0.as_mut_ptr()) };
    let mask = u32::from_le_bytes([area.0[28], area.0[29], area.0[30], area.0[31]]);
    if mask == 0 {
        0xffbf
    } else {
        mask
    }
}

/// The end of the last component in `mask` in a standard-format XSAVE
/// image (CPUID leaf 0xD), at least the legacy area and header.
fn vector_span(mask: u64) -> usize {
    let mut end = XSAVE_HEADER_OFFSET + 64;
    for i in 2..63 {
        if mask & (1 << i) != 0 {
            let leaf = core::arch::x86_64::__cpuid_count(0xd, i);
            end = end.max(leaf.ebx as usize + leaf.eax as usize);
        }
    }
    end.min(XSAVE_AREA_SIZE)
}

/// The host's XCR0, or 0 when the OS has not enabled XSAVE.
pub fn host_xcr0() -> u64 {
    const OSXSAVE: u32 = 1 << 27;
    if core::arch::x86_64::__cpuid(1).ecx & OSXSAVE == 0 {
        return 0;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX=0 only reads XCR0; CPUID said OSXSAVE is set,
    // so it cannot fault.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

// SAFETY: the raw pointers inside point into mappings owned by this value,
// not into any thread's memory; fault recovery state is per thread and set
// only for the duration of a `run`, which borrows `self` mutably.
unsafe impl Send for StubBuf {}

impl StubBuf {
    /// Maps a buffer, generates its helpers and installs the process-wide
    /// fault handler (once). `its_on` selects ITS-safe returns.
    pub fn new(its_on: bool) -> Result<Self, StubError> {
        fault::install_handler()?;
        let mut region = StubRegion::new()?;
        let control = region.control_ptr() as u64;
        let xcr0 = host_xcr0();
        // Without x87 and SSE in XCR0 there is nothing worth switching.
        let vec_mask = match xcr0 & VECTOR_XFEATURES {
            m if m & 0b11 == 0b11 => m,
            _ => 0,
        };
        let vec = (vec_mask != 0).then(|| VecSwitch {
            image: region.guest_xsave_addr(),
            mask: vec_mask,
        });
        let helpers = region
            .write_helpers(|page, exec| helpers::generate(page, exec, control, its_on, vec))?;
        region.stub_write()[..].fill(INT3);

        let (code_lo, code_hi) = region.exec_range();
        let ctl = region.control_ptr().cast::<ControlBlock>();
        // SAFETY: the control page is mapped read-write, page-aligned (so
        // suitably aligned for ControlBlock) and referenced by nothing else yet.
        unsafe {
            ctl.write(ControlBlock {
                gprs: 0,
                saved_rsp: 0,
                code_lo,
                code_hi,
                landing: helpers.landing,
                fault_vector: NO_FAULT,
                fault_error: 0,
                fault_addr: 0,
                fault_has_addr: 0,
                keep_fault_state: 0,
            });
        }
        let policy = if its_on {
            RetPolicy::Thunk(helpers.thunk)
        } else {
            RetPolicy::Plain
        };
        Ok(StubBuf {
            region,
            helpers,
            policy,
            xcr0,
            mxcsr_mask: host_mxcsr_mask(),
            vec_mask,
            vector_span: vector_span(vec_mask),
            cached: None,
        })
    }

    /// Loads `image` (standard format) as the guest state the next vector
    /// run switches to. Only the legacy area, the header and the components
    /// the run switches are copied (832 bytes of 4 KiB on an AVX2 host):
    /// XRSTOR and XSAVE touch nothing else, and each cache line copied
    /// after a KVM_RUN is a miss. Returns how many bytes of the image the
    /// run uses; compare and write back that many from
    /// [`guest_xsave`](Self::guest_xsave).
    pub fn load_guest_image(&mut self, image: &[u8]) -> usize {
        let n = image.len().min(self.vector_span);
        let area = self.region.guest_xsave_mut();
        area[..n].copy_from_slice(&image[..n]);
        area[n..self.vector_span].fill(0);
        n
    }

    /// The MXCSR bits this CPU accepts (FXSAVE's MXCSR_MASK).
    pub fn mxcsr_mask(&self) -> u32 {
        self.mxcsr_mask
    }

    /// Whether this buffer's code uses ITS-safe returns.
    pub fn its_on(&self) -> bool {
        matches!(self.policy, RetPolicy::Thunk(_))
    }

    /// Where the instruction bytes of the next stub built by [`run`](Self::run)
    /// execute, for encoding RIP-relative operands.
    pub fn insn_exec_addr(&self) -> u64 {
        self.insn_exec_addr_at(0)
    }

    /// As [`insn_exec_addr`](Self::insn_exec_addr) for a stub at `start`.
    pub fn insn_exec_addr_at(&self, start: usize) -> u64 {
        builder::insn_exec_addr(self.region.stub_exec(), start)
    }

    /// The bounce buffer's address as the stub sees it (readable and
    /// writable, never executable, within rel32 reach of the stub).
    pub fn bounce_exec_addr(&self) -> u64 {
        self.region.bounce_addr()
    }

    /// The bounce buffer (8 KiB) for staging a memory operand.
    pub fn bounce(&self) -> &[u8] {
        self.region.bounce()
    }

    /// The bounce buffer, writable.
    pub fn bounce_mut(&mut self) -> &mut [u8] {
        self.region.bounce_mut()
    }

    /// The XSAVE components [`run_with_vector`](Self::run_with_vector)
    /// switches: [`VECTOR_XFEATURES`] as far as the host's XCR0 enables
    /// them, or 0 when this host cannot run vector stubs.
    pub fn vector_mask(&self) -> u64 {
        self.vec_mask
    }

    /// The guest XSAVE image (standard format, [`XSAVE_AREA_SIZE`] bytes)
    /// that a vector run loads before the instruction and saves after it.
    pub fn guest_xsave(&self) -> &[u8] {
        self.region.guest_xsave()
    }

    /// The guest XSAVE image, writable: fill it before a vector run.
    pub fn guest_xsave_mut(&mut self) -> &mut [u8] {
        self.region.guest_xsave_mut()
    }

    /// Builds a stub for `insn` at offset `start` of the buffer without
    /// running it.
    pub fn build_at(&mut self, start: usize, insn: &[u8]) -> Result<BuiltStub, StubError> {
        self.forget_cached();
        self.build_stub(start, insn, false)
    }

    /// Fills the cached stub's bytes with INT3 again.
    fn forget_cached(&mut self) {
        if let Some(c) = self.cached.take() {
            let buf = &mut self.region.stub_write()[..STUB_BUF_SIZE];
            buf[c.stub.start..c.stub.start + c.stub.len].fill(INT3);
        }
    }

    /// The stub for `insn` at `start`: the cached one when it was built from
    /// the same request, else a fresh build (the old stub is erased first,
    /// so only the stub about to run is ever executable).
    fn stub_for(
        &mut self,
        start: usize,
        insn: &[u8],
        with_vec: bool,
    ) -> Result<BuiltStub, StubError> {
        if let Some(c) = &self.cached {
            if c.stub.start == start
                && c.with_vec == with_vec
                && c.insn.get(..c.insn_len) == Some(insn)
            {
                return Ok(c.stub);
            }
        }
        self.forget_cached();
        let stub = self.build_stub(start, insn, with_vec)?;
        let mut saved = [0u8; MAX_INSN_LEN];
        // build_stub refused anything longer than MAX_INSN_LEN.
        saved[..insn.len()].copy_from_slice(insn);
        self.cached = Some(CachedStub {
            insn: saved,
            insn_len: insn.len(),
            with_vec,
            stub,
        });
        Ok(stub)
    }

    fn build_stub(
        &mut self,
        start: usize,
        insn: &[u8],
        with_vec: bool,
    ) -> Result<BuiltStub, StubError> {
        let stub_exec = self.region.stub_exec();
        let helpers = self.helpers;
        let policy = self.policy;
        builder::build(
            self.region.stub_write(),
            stub_exec,
            start,
            insn,
            &helpers,
            policy,
            with_vec,
        )
    }

    /// Checks what XRSTOR would reject in the guest image (so a fault in the
    /// stub is the instruction's, not the image's): XSTATE_BV outside XCR0,
    /// a compacted-format or non-zero reserved header, MXCSR bits this CPU
    /// does not accept (not 0xffff: AMD's MM bit 17 is valid where the CPU
    /// has it, and a guest's LDMXCSR of it completes).
    fn check_guest_xsave(&self) -> Result<(), StubError> {
        let img = self.region.guest_xsave();
        let word = |off: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&img[off..off + 8]);
            u64::from_le_bytes(b)
        };
        let xstate_bv = word(XSAVE_HEADER_OFFSET);
        let header_rest = (1..8).any(|i| word(XSAVE_HEADER_OFFSET + 8 * i) != 0);
        let mxcsr = word(MXCSR_OFFSET) as u32;
        if xstate_bv & !self.xcr0 != 0 || header_rest || mxcsr & !self.mxcsr_mask != 0 {
            return Err(StubError::BadXsaveImage);
        }
        Ok(())
    }

    /// Runs one instruction like [`run`](Self::run), with the guest's
    /// vector and x87 state: the stub XRSTORs [`guest_xsave`](Self::guest_xsave)
    /// (components [`vector_mask`](Self::vector_mask)) before the
    /// instruction and XSAVEs it after, inside the region where faults are
    /// recovered. The host's own state of those components is saved before
    /// the stub and restored after it, also after a fault. After #XM or #MF
    /// the image holds the state the exception left (MXCSR flags, a pending
    /// x87 exception); after any other fault it is left as it was.
    pub fn run_with_vector(
        &mut self,
        insn: &[u8],
        gprs: &mut GuestGprs,
    ) -> Result<(), StubRunError> {
        if self.vec_mask == 0 {
            return Err(StubError::NoXsave.into());
        }
        self.check_guest_xsave()?;
        let stub = self.stub_for(0, insn, true)?;
        self.invoke(&stub, gprs, true).map_err(StubRunError::Fault)
    }

    /// [`run_with_vector`](Self::run_with_vector), but after any fault the
    /// guest image holds the registers the fault left (what a gather
    /// completed before it): for probes of the host CPU, whose image is
    /// known to load.
    pub(crate) fn run_with_vector_keeping_fault_state(
        &mut self,
        insn: &[u8],
        gprs: &mut GuestGprs,
    ) -> Result<(), StubRunError> {
        let ctl = self.region.control_ptr().cast::<ControlBlock>();
        // SAFETY: `ctl` points at the control block written in `new`; no
        // stub runs now.
        unsafe { ptr::write_volatile(&raw mut (*ctl).keep_fault_state, 1) };
        let ran = self.run_with_vector(insn, gprs);
        // SAFETY: as above.
        unsafe { ptr::write_volatile(&raw mut (*ctl).keep_fault_state, 0) };
        ran
    }

    /// Runs one instruction with the guest's GPRs and arithmetic flags.
    ///
    /// On success `gprs` holds the registers and flags after the
    /// instruction; on a fault its contents are unspecified.
    pub fn run(&mut self, insn: &[u8], gprs: &mut GuestGprs) -> Result<(), StubRunError> {
        self.run_at(0, insn, gprs)
    }

    /// [`run`](Self::run) with the stub at offset `start` of the buffer.
    pub fn run_at(
        &mut self,
        start: usize,
        insn: &[u8],
        gprs: &mut GuestGprs,
    ) -> Result<(), StubRunError> {
        let stub = self.stub_for(start, insn, false)?;
        self.invoke(&stub, gprs, false).map_err(StubRunError::Fault)
    }

    /// Calls a built stub and collects a recovered fault.
    fn invoke(
        &mut self,
        stub: &BuiltStub,
        gprs: &mut GuestGprs,
        with_vec: bool,
    ) -> Result<(), StubFault> {
        let ctl = self.region.control_ptr().cast::<ControlBlock>();
        // SAFETY: `ctl` points at the control block written in `new`; the
        // stub and the signal handler are the only other writers and
        // neither runs now.
        unsafe {
            ptr::write_volatile(&raw mut (*ctl).saved_rsp, 0);
            ptr::write_volatile(&raw mut (*ctl).fault_vector, NO_FAULT);
        }
        // The host's MXCSR and x87 control word, restored after the stub
        // (the instruction may have loaded others, and a fault leaves the
        // FPU in whatever state the instruction left it).
        let mut host_fpu = [0u32; 2];
        let guard = fault::enter(ctl);
        if with_vec {
            self.invoke_with_vec(stub, gprs);
        } else {
            // SAFETY: `stub.entry` is a stub built by `builder::build` (just
            // now, or for an identical earlier request and left in place;
            // checked to fit its buffer) in this buffer's executable alias,
            // with helpers generated for this buffer. The stub saves and
            // restores rbx, rbp and r12-r15 itself (also on the fault path, via
            // the landing pad) and only runs on the stack below the current
            // RSP; every other register it may change is covered by
            // clobber_abi("C"), which includes the vector and x87/MMX
            // registers. The arithmetic flags are clobbered (no
            // preserves_flags) and DF is clear on return. r12 carries
            // `host_fpu`, a live local. The indirect call's last byte sits at
            // offset 34 of an aligned cache line, so the call is ITS-safe too.
            unsafe {
                asm!(
                    "stmxcsr [r12]",
                    "fnstcw [r12 + 4]",
                    "jmp 3f",
                    ".p2align 6",
                    ".fill 32, 1, 0xcc",
                    "3:",
                    "call r11",
                    "fninit",
                    "fldcw [r12 + 4]",
                    "ldmxcsr [r12]",
                    in("r11") stub.entry,
                    in("rdi") ptr::from_mut(gprs),
                    in("r12") host_fpu.as_mut_ptr(),
                    clobber_abi("C"),
                );
            }
        }
        drop(guard);
        // SAFETY: as above; the handler, if it ran, finished before the
        // landing pad returned here.
        let (vector, error_code, addr, has_addr) = unsafe {
            (
                ptr::read_volatile(&raw const (*ctl).fault_vector),
                ptr::read_volatile(&raw const (*ctl).fault_error),
                ptr::read_volatile(&raw const (*ctl).fault_addr),
                ptr::read_volatile(&raw const (*ctl).fault_has_addr),
            )
        };
        if vector == NO_FAULT {
            return Ok(());
        }
        Err(StubFault {
            vector: vector as u8,
            error_code,
            fault_addr: (has_addr != 0).then_some(addr),
        })
    }

    /// The asm call of a vector run: the host's state of the switched
    /// components goes to the host XSAVE area before the call and comes back
    /// after it (the landing pad of a fault returns to the same place).
    ///
    /// After #XM or #MF the registers hold what the exception left (the
    /// signal return restored them from the frame): MXCSR's exception
    /// flags, a pending x87 exception. That is guest state the guest must
    /// see, so it is XSAVEd into the guest image before the host's comes
    /// back. Other faults (in the image's XRSTOR too) leave the image alone,
    /// unless the control block's `keep_fault_state` asks for every fault's
    /// registers (probes, whose image is known to load).
    fn invoke_with_vec(&mut self, stub: &BuiltStub, gprs: &mut GuestGprs) {
        let host_area = self.region.host_xsave_ptr();
        let ctl = self.region.control_ptr().cast::<ControlBlock>();
        let guest_area = self.region.guest_xsave_addr();
        debug_assert!(XSAVE_AREA_SIZE >= 2688 && (host_area as usize).is_multiple_of(64));
        // SAFETY: as for the plain call in `invoke`. In addition, r12 holds
        // the page-aligned host XSAVE area (XSAVE_AREA_SIZE bytes, large
        // enough for the standard layout of VECTOR_XFEATURES, header zero)
        // and r13 the component mask, both preserved by the stub and the
        // landing pad (callee-saved there). XSAVE/XRSTOR of host-written
        // data with a mask within XCR0 cannot fault; RAX and RDX are
        // clobbered, and the restore rewrites every vector and x87 register
        // the clobber list names. r14 (the control block) and r15 (the guest
        // image, XSAVE_AREA_SIZE bytes, 64-byte aligned) are callee-saved
        // too; the guest image is only written here after a fault (#XM,
        // #MF, or any with keep_fault_state), when no other reference to it
        // is live.
        unsafe {
            asm!(
                "mov rax, r13",
                "mov rdx, r13",
                "shr rdx, 32",
                "xsave64 [r12]",
                "jmp 3f",
                ".p2align 6",
                ".fill 32, 1, 0xcc",
                "3:",
                "call r11",
                "mov rax, r13",
                "mov rdx, r13",
                "shr rdx, 32",
                "mov rcx, [r14 + {fault_vector}]",
                "cmp rcx, {xm}",
                "je 4f",
                "cmp rcx, {mf}",
                "je 4f",
                "cmp rcx, -1",
                "je 5f",
                "cmp qword ptr [r14 + {keep}], 0",
                "je 5f",
                "4:",
                "xsave64 [r15]",
                "5:",
                "xrstor64 [r12]",
                fault_vector = const core::mem::offset_of!(ControlBlock, fault_vector),
                keep = const core::mem::offset_of!(ControlBlock, keep_fault_state),
                xm = const EXC_XM,
                mf = const EXC_MF,
                in("r11") stub.entry,
                in("rdi") ptr::from_mut(gprs),
                in("r12") host_area,
                in("r13") self.vec_mask,
                in("r14") ctl,
                in("r15") guest_area,
                clobber_abi("C"),
            );
        }
    }

    /// The generated helper code and its executable address (for checks).
    pub fn helper_code(&self) -> (u64, &[u8]) {
        let len = (self.helpers.end - self.region.helper_exec()) as usize;
        (
            self.region.helper_exec(),
            &self.region.helper_bytes()[..len],
        )
    }

    /// The code of a stub built by [`build_at`](Self::build_at), read
    /// through the executable alias, and its entry address.
    pub fn stub_code(&self, stub: &BuiltStub) -> (u64, &[u8]) {
        let bytes = &self.region.stub_exec_bytes()[stub.start..stub.start + stub.len];
        (stub.entry, bytes)
    }

    /// Executable address of the return thunk.
    pub fn thunk_addr(&self) -> u64 {
        self.helpers.thunk
    }

    /// Executable address of the stub buffer.
    pub fn stub_exec_addr(&self) -> u64 {
        self.region.stub_exec()
    }
}

#[cfg(test)]
impl StubBuf {
    /// The mapping, for tests that inspect the aliases.
    pub(crate) fn region(&self) -> &StubRegion {
        &self.region
    }
}
