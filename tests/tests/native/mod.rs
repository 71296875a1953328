//! Runs one instruction on the host CPU at CPL 3, outside the emulator: the
//! ground truth for tests that compare the emulator with the CPU without a
//! VM.
//!
//! The instruction runs in a code page of its own, between a frame that
//! loads the GPRs, RFLAGS and an XSAVE image (XRSTOR) and one that saves
//! them again (XSAVE), so the yardstick shares nothing with `emul`'s stubs.
//! A fault in the instruction is caught by this module's signal handler,
//! which records the vector, error code and address and resumes at the
//! saving frame: on signal return the kernel restores the registers the
//! fault left (a gather's completed elements, a scatter's cleared mask
//! bits), so the saved state is the CPU's state at the fault.
//!
//! The handler must be installed before anything else installs one
//! ([`install`] first thing in the test): `emul`'s stub handler, installed
//! later by `Emulator::new`, passes faults outside its stubs on to it.

use iced_x86::code_asm::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Size of the code page and of each XSAVE area (the standard layout of
/// x87..AVX-512 needs about 2.7 KiB; the host's XCR0 may enable more, but
/// only `Machine::rfbm` components are saved).
const PAGE: usize = 4096;
const AREA: usize = 16384;

/// XSAVE components the frame switches: x87, SSE, AVX and AVX-512.
const VECTOR_COMPONENTS: u64 = 0xe7;

/// Where the instruction and the saving frame sit while one runs; 0 when
/// none runs.
static INSN_ADDR: AtomicU64 = AtomicU64::new(0);
static AFTER_ADDR: AtomicU64 = AtomicU64::new(0);
/// The fault the handler saw: vector (u64::MAX for none), error code,
/// address.
static FAULT_VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);
static FAULT_ERROR: AtomicU64 = AtomicU64::new(0);
static FAULT_ADDR: AtomicU64 = AtomicU64::new(0);

const SIGNALS: [libc::c_int; 4] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];

/// A fault the instruction raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub error_code: u64,
    /// The faulting address (#PF: CR2).
    pub addr: u64,
}

/// Registers in and out: GPRs in encoding order (RAX..R15; RSP is neither
/// loaded nor saved), RFLAGS, and a standard-format XSAVE image.
pub struct State {
    pub gprs: [u64; 16],
    pub rflags: u64,
    pub xsave: Box<Area>,
}

/// A 64-byte aligned XSAVE area.
#[repr(C, align(64))]
pub struct Area(pub [u8; AREA]);

impl Area {
    pub fn zeroed() -> Box<Area> {
        Box::new(Area([0; AREA]))
    }
}

/// What the frame reads and writes (offsets are used by the generated
/// code).
#[repr(C)]
struct Ctx {
    gprs: [u64; 16],
    rflags: u64,
    guest: *mut u8,
    host: *mut u8,
    rfbm: u64,
}

const CTX_RFLAGS: i32 = 128;
const CTX_GUEST: i32 = 136;
const CTX_HOST: i32 = 144;
const CTX_RFBM: i32 = 152;

/// The host machine the instructions run on: a code page.
pub struct Machine {
    code: *mut u8,
    host: Box<Area>,
    /// Components switched (VECTOR_COMPONENTS within the host's XCR0).
    pub rfbm: u64,
}

/// Installs the fault handler (once per process).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in SIGNALS {
            // SAFETY: a zeroed sigaction is valid to fill in; `on_fault`
            // has the SA_SIGINFO signature and only touches atomics and the
            // ucontext the kernel passed.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_fault as *const () as libc::sighandler_t;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut act.sa_mask);
                assert_eq!(libc::sigaction(sig, &act, std::ptr::null_mut()), 0);
            }
        }
    });
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext and siginfo to an
    // SA_SIGINFO handler.
    unsafe {
        let uc = uc.cast::<libc::ucontext_t>();
        let gregs = &mut (*uc).uc_mcontext.gregs;
        let rip = gregs[libc::REG_RIP as usize] as u64;
        let insn = INSN_ADDR.load(Ordering::SeqCst);
        if insn != 0 && rip == insn {
            FAULT_VECTOR.store(gregs[libc::REG_TRAPNO as usize] as u64, Ordering::SeqCst);
            FAULT_ERROR.store(gregs[libc::REG_ERR as usize] as u64, Ordering::SeqCst);
            FAULT_ADDR.store((*info).si_addr() as u64, Ordering::SeqCst);
            gregs[libc::REG_RIP as usize] = AFTER_ADDR.load(Ordering::SeqCst) as i64;
            return;
        }
        // Not the instruction's: let the default action happen (the fault
        // repeats on return with the default disposition).
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
    }
}

impl Machine {
    pub fn new() -> Machine {
        install();
        // SAFETY: a fresh anonymous private mapping, owned by the Machine.
        let code = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(code, libc::MAP_FAILED, "mmap of the code page");
        Machine {
            code: code.cast(),
            host: Area::zeroed(),
            rfbm: VECTOR_COMPONENTS & emul::platform::host_user_xcr0(),
        }
    }

    /// Runs `pre` then `insn` (one instruction; `pre` must not fault) with
    /// `state`, which holds the registers after it (or at its fault).
    pub fn run(&mut self, pre: &[u8], insn: &[u8], state: &mut State) -> Option<Fault> {
        let prologue = prologue();
        let epilogue = epilogue();
        let total = prologue.len() + pre.len() + insn.len() + epilogue.len();
        assert!(total <= PAGE, "native frame too large");
        // SAFETY: `code` is this Machine's page; it is made writable, filled
        // and made executable again before the call.
        let page = unsafe {
            assert_eq!(
                libc::mprotect(self.code.cast(), PAGE, libc::PROT_READ | libc::PROT_WRITE),
                0
            );
            std::slice::from_raw_parts_mut(self.code, PAGE)
        };
        let mut at = 0;
        for part in [&prologue[..], pre, insn, &epilogue[..]] {
            page[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let insn_addr = self.code as u64 + (prologue.len() + pre.len()) as u64;
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                libc::mprotect(self.code.cast(), PAGE, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
        }
        let mut ctx = Ctx {
            gprs: state.gprs,
            rflags: state.rflags,
            guest: state.xsave.0.as_mut_ptr(),
            host: self.host.0.as_mut_ptr(),
            rfbm: self.rfbm,
        };
        FAULT_VECTOR.store(u64::MAX, Ordering::SeqCst);
        AFTER_ADDR.store(insn_addr + insn.len() as u64, Ordering::SeqCst);
        INSN_ADDR.store(insn_addr, Ordering::SeqCst);
        // SAFETY: the page holds the frame generated below around the
        // caller's instruction: it saves and restores every callee-saved
        // GPR, runs on the caller's stack below RSP (the instruction must
        // not touch RSP), switches the vector state through two 64-byte
        // aligned XSAVE areas of AREA bytes (the host's own state comes back
        // from `host`, so MXCSR and the x87 control word survive), and
        // returns with DF clear. Everything else is covered by
        // clobber_abi("C").
        unsafe {
            core::arch::asm!(
                "call {entry}",
                entry = in(reg) self.code,
                in("rdi") &raw mut ctx,
                clobber_abi("C"),
            );
        }
        INSN_ADDR.store(0, Ordering::SeqCst);
        state.gprs = ctx.gprs;
        state.rflags = ctx.rflags;
        let vector = FAULT_VECTOR.load(Ordering::SeqCst);
        (vector != u64::MAX).then(|| Fault {
            vector: vector as u8,
            error_code: FAULT_ERROR.load(Ordering::SeqCst),
            addr: FAULT_ADDR.load(Ordering::SeqCst),
        })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: the page was mapped in `new` and nothing runs from it.
        unsafe { libc::munmap(self.code.cast(), PAGE) };
    }
}

/// Host pages mirroring the guest's: a filler page, A (read-write) and B
/// (no access).
pub struct HostPages {
    base: *mut u8,
}

impl HostPages {
    pub fn new() -> HostPages {
        // SAFETY: a fresh anonymous mapping owned by HostPages; page 2 is
        // made inaccessible and never touched here.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(
                libc::mprotect(p.cast::<u8>().add(2 * PAGE).cast(), PAGE, libc::PROT_NONE),
                0
            );
            HostPages { base: p.cast() }
        }
    }
    /// Address of page A.
    pub fn a(&self) -> u64 {
        self.base as u64 + PAGE as u64
    }
    pub fn page_a(&mut self) -> &mut [u8] {
        // SAFETY: page 1 of the mapping is read-write and only reached
        // through this borrow or by the native instruction (not while the
        // borrow lives).
        unsafe { std::slice::from_raw_parts_mut(self.base.add(PAGE), PAGE) }
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`.
        unsafe { libc::munmap(self.base.cast(), 3 * PAGE) };
    }
}

const GPRS: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];

fn assemble(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit assembler");
    f(&mut a).expect("native frame assembles");
    a.assemble(0).expect("native frame encodes")
}

/// Saves the host's callee-saved GPRs and vector state, loads the guest's.
fn prologue() -> Vec<u8> {
    assemble(|a| {
        for r in [rbx, rbp, r12, r13, r14, r15, rdi] {
            a.push(r)?;
        }
        a.mov(r15, rdi)?;
        a.mov(rax, qword_ptr(r15 + CTX_RFBM))?;
        a.xor(edx, edx)?;
        a.mov(rcx, qword_ptr(r15 + CTX_HOST))?;
        a.xsave64(ptr(rcx))?;
        a.mov(rcx, qword_ptr(r15 + CTX_GUEST))?;
        a.xrstor64(ptr(rcx))?;
        a.push(qword_ptr(r15 + CTX_RFLAGS))?;
        a.popfq()?;
        for (i, r) in GPRS.iter().enumerate() {
            if i != 4 && i != 15 {
                a.mov(*r, qword_ptr(r15 + 8 * i as i32))?;
            }
        }
        a.mov(r15, qword_ptr(r15 + 8 * 15))?;
        Ok(())
    })
}

/// Saves the guest's registers, restores the host's, returns.
fn epilogue() -> Vec<u8> {
    assemble(|a| {
        a.push(r15)?;
        a.pushfq()?;
        a.mov(r15, qword_ptr(rsp + 16))?;
        a.pop(qword_ptr(r15 + CTX_RFLAGS))?;
        a.pop(qword_ptr(r15 + 8 * 15))?;
        for (i, r) in GPRS.iter().enumerate() {
            if i != 4 && i != 15 {
                a.mov(qword_ptr(r15 + 8 * i as i32), *r)?;
            }
        }
        a.cld()?;
        a.mov(rax, qword_ptr(r15 + CTX_RFBM))?;
        a.xor(edx, edx)?;
        a.mov(rcx, qword_ptr(r15 + CTX_GUEST))?;
        a.xsave64(ptr(rcx))?;
        a.mov(rcx, qword_ptr(r15 + CTX_HOST))?;
        a.xrstor64(ptr(rcx))?;
        for r in [rdi, r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.ret()?;
        Ok(())
    })
}
