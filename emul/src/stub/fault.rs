//! Turning a fault inside a stub into an error instead of a dead process.
//!
//! A process-wide handler for SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGTRAP
//! looks at the faulting thread's *active stub* (a thread-local pointer to
//! the stub buffer's control block, set only around a stub call). If the
//! instruction pointer lies in that buffer's code and the stub has passed
//! `load_guest_gprs` (which records the stack pointer), the handler records
//! the exception (kernel trap number, error code, fault address), points the
//! interrupted context at the landing pad with the recorded stack pointer,
//! and returns. The landing pad pops the host's callee-saved registers the
//! stub pushed and returns to the caller as if the stub had finished.
//!
//! Every other fault goes to whatever handler was installed before ours
//! (Rust's stack-overflow handler, for example), or, where that was the
//! default action, is re-raised with the default action restored.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::ptr;
use std::sync::OnceLock;

use super::error::StubError;

/// Divide error.
pub const EXC_DE: u8 = 0;
/// Breakpoint (INT3).
pub const EXC_BP: u8 = 3;
/// Invalid opcode.
pub const EXC_UD: u8 = 6;
/// Stack-segment fault.
pub const EXC_SS: u8 = 12;
/// General protection.
pub const EXC_GP: u8 = 13;
/// Page fault.
pub const EXC_PF: u8 = 14;
/// x87 floating-point error.
pub const EXC_MF: u8 = 16;
/// Alignment check.
pub const EXC_AC: u8 = 17;
/// SIMD floating-point exception.
pub const EXC_XM: u8 = 19;

/// An exception raised by the instruction in a stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct StubFault {
    /// The exception vector (the kernel's trap number).
    pub vector: u8,
    /// The error code the CPU pushed (0 for vectors without one; for #PF
    /// the kernel's view of the page-fault error code).
    pub error_code: u64,
    /// The faulting linear address (CR2), for #PF only.
    pub fault_addr: Option<u64>,
}

impl StubFault {
    /// Whether the vector pushes an error code on the guest's stack.
    pub fn has_error_code(&self) -> bool {
        matches!(self.vector, 8 | 10..=14 | EXC_AC | 21)
    }

    /// The SDM mnemonic of the vector.
    pub fn mnemonic(&self) -> &'static str {
        match self.vector {
            EXC_DE => "#DE",
            1 => "#DB",
            EXC_BP => "#BP",
            4 => "#OF",
            5 => "#BR",
            EXC_UD => "#UD",
            7 => "#NM",
            8 => "#DF",
            10 => "#TS",
            11 => "#NP",
            EXC_SS => "#SS",
            EXC_GP => "#GP",
            EXC_PF => "#PF",
            EXC_MF => "#MF",
            EXC_AC => "#AC",
            18 => "#MC",
            EXC_XM => "#XM",
            21 => "#CP",
            _ => "#??",
        }
    }
}

impl fmt::Display for StubFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mnemonic() {
            "#??" => write!(f, "vector {}", self.vector)?,
            name => f.write_str(name)?,
        }
        if self.has_error_code() {
            write!(f, "({:#x})", self.error_code)?;
        }
        if let Some(addr) = self.fault_addr {
            write!(f, " at {addr:#x}")?;
        }
        Ok(())
    }
}

/// Per-buffer state shared by the generated code, the Rust caller and the
/// signal handler. Lives at the start of the buffer's control page; the
/// helpers address `gprs` and `saved_rsp` RIP-relatively.
#[repr(C)]
pub(crate) struct ControlBlock {
    /// The `GuestGprs` pointer, stored by `load_guest_gprs`.
    pub(crate) gprs: u64,
    /// RSP on entry to `load_guest_gprs`; 0 until the stub got that far.
    pub(crate) saved_rsp: u64,
    /// Code range of this buffer (helper page through stub page).
    pub(crate) code_lo: u64,
    pub(crate) code_hi: u64,
    /// Where a recovered fault resumes.
    pub(crate) landing: u64,
    /// Trap number of a recovered fault, or `NO_FAULT`.
    pub(crate) fault_vector: u64,
    pub(crate) fault_error: u64,
    pub(crate) fault_addr: u64,
    pub(crate) fault_has_addr: u64,
    /// Non-zero: after any fault of a vector run, XSAVE the registers the
    /// fault left into the guest image (probes of partial completion).
    pub(crate) keep_fault_state: u64,
}

pub(crate) const NO_FAULT: u64 = u64::MAX;
pub(crate) const CTL_GPRS_OFFSET: u64 = core::mem::offset_of!(ControlBlock, gprs) as u64;
pub(crate) const CTL_SAVED_RSP_OFFSET: u64 = core::mem::offset_of!(ControlBlock, saved_rsp) as u64;

thread_local! {
    /// The control block of the stub this thread is running, or null. A
    /// const-initialised Cell of a raw pointer has no destructor, so the
    /// signal handler can read it without lazy initialisation.
    static ACTIVE: Cell<*mut ControlBlock> = const { Cell::new(ptr::null_mut()) };
}

/// Marks `ctl` as this thread's running stub until the guard drops.
pub(crate) struct ActiveGuard(());

pub(crate) fn enter(ctl: *mut ControlBlock) -> ActiveGuard {
    ACTIVE.with(|a| a.set(ctl));
    // The handler reads ACTIVE on this thread; keep the store before the call.
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    ActiveGuard(())
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        ACTIVE.with(|a| a.set(ptr::null_mut()));
    }
}

const FAULT_SIGNALS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
];

/// The actions that were installed before ours, for chaining.
struct PreviousActions([libc::sigaction; FAULT_SIGNALS.len()]);

static PREVIOUS: OnceLock<PreviousActions> = OnceLock::new();
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// Installs the fault handler once per process; later calls return the
/// first call's outcome.
pub(crate) fn install_handler() -> Result<(), StubError> {
    match INSTALLED.get_or_init(install_once) {
        Ok(()) => Ok(()),
        Err(errno) => Err(StubError::Os {
            what: "sigaction",
            source: io::Error::from_raw_os_error(*errno),
        }),
    }
}

fn install_once() -> Result<(), i32> {
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    // SAFETY: sigaction is plain old data; all-zero is a valid value.
    let mut previous: [libc::sigaction; FAULT_SIGNALS.len()] = unsafe { std::mem::zeroed() };
    for (sig, old) in FAULT_SIGNALS.iter().zip(previous.iter_mut()) {
        // SAFETY: querying only (null new action); `old` is valid for writes.
        if unsafe { libc::sigaction(*sig, ptr::null(), old) } != 0 {
            return Err(errno());
        }
    }
    // Record the old actions before any fault can reach our handler.
    if PREVIOUS.set(PreviousActions(previous)).is_err() {
        return Err(libc::EBUSY);
    }

    // SAFETY: as above, all-zero is a valid sigaction to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_fault_entry as *const () as libc::sighandler_t;
    // SA_ONSTACK: a stack overflow must still reach Rust's handler, on the
    // alternate stack Rust set up.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `action.sa_mask` is a valid sigset to initialise.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    for sig in FAULT_SIGNALS {
        // SAFETY: installs a handler that is async-signal-safe (it touches
        // only a thread-local Cell, the control block and the ucontext).
        if unsafe { libc::sigaction(sig, &action, ptr::null_mut()) } != 0 {
            return Err(errno());
        }
    }
    Ok(())
}

const RFLAGS_TF: i64 = 1 << 8;
const RFLAGS_DF: i64 = 1 << 10;
const RFLAGS_AC: i64 = 1 << 18;

/// The handler's entry: clears RFLAGS.AC before any compiled code runs.
///
/// The kernel enters a handler with DF and TF cleared but AC as the
/// interrupted code left it, and an instruction that set AC and then took
/// #AC would fault again on the first misaligned access in the handler,
/// while SIGBUS is blocked, which kills the process.
#[unsafe(naked)]
extern "C" fn on_fault_entry(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    core::arch::naked_asm!(
        "pushfq",
        "and qword ptr [rsp], {not_ac}",
        "popfq",
        "jmp {handler}",
        not_ac = const !(RFLAGS_AC as i32),
        handler = sym on_fault,
    )
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // try_with: never panic in a signal handler, even during thread exit.
    let ctl = ACTIVE.try_with(Cell::get).unwrap_or(ptr::null_mut());
    // SAFETY: the kernel passes a valid siginfo and ucontext to an
    // SA_SIGINFO handler; `ctl`, when non-null, is the control block of a
    // StubBuf that this thread is running right now (set by `enter`, which
    // holds `&mut StubBuf`), so it is mapped.
    if !ctl.is_null() && unsafe { recover(ctl, ctx.cast()) } {
        return;
    }
    // SAFETY: forwards the kernel's arguments unchanged.
    unsafe { chain(sig, info, ctx) };
}

/// Redirects a fault inside the running stub to the landing pad. Returns
/// false when the fault is not ours.
///
/// # Safety
/// `ctl` must point to a live control block; `uc` must be the handler's
/// kernel-provided ucontext.
unsafe fn recover(ctl: *mut ControlBlock, uc: *mut libc::ucontext_t) -> bool {
    // SAFETY: per the function contract, `uc` is the kernel's ucontext.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as u64;
    // SAFETY: per the function contract, `ctl` is live; the fields are
    // read volatile because the stub writes them behind the compiler's back.
    let (lo, hi, landing, saved_rsp) = unsafe {
        (
            ptr::read_volatile(&raw const (*ctl).code_lo),
            ptr::read_volatile(&raw const (*ctl).code_hi),
            ptr::read_volatile(&raw const (*ctl).landing),
            ptr::read_volatile(&raw const (*ctl).saved_rsp),
        )
    };
    // `hi` inclusive: after INT3 the reported RIP is the next byte.
    if rip < lo || rip > hi || saved_rsp == 0 {
        return false;
    }
    let vector = gregs[libc::REG_TRAPNO as usize] as u64;
    let error = gregs[libc::REG_ERR as usize] as u64;
    // Only #PF has an address (CR2); for #GP, #SS and #AC the kernel
    // reports none.
    let addr = (vector == u64::from(EXC_PF)).then(|| gregs[libc::REG_CR2 as usize] as u64);
    // SAFETY: `ctl` is live (contract); plain stores into its data page.
    unsafe {
        ptr::write_volatile(&raw mut (*ctl).fault_vector, vector);
        ptr::write_volatile(&raw mut (*ctl).fault_error, error);
        ptr::write_volatile(&raw mut (*ctl).fault_addr, addr.unwrap_or(0));
        ptr::write_volatile(&raw mut (*ctl).fault_has_addr, u64::from(addr.is_some()));
    }
    // Resume at the landing pad with RSP where the stub's pushes of the
    // host's callee-saved registers begin (past load_guest_gprs' return
    // address). Clear DF/AC/TF: the host ABI needs DF clear, and the
    // instruction may have set AC or TF.
    gregs[libc::REG_RSP as usize] = (saved_rsp + 8) as i64;
    gregs[libc::REG_RIP as usize] = landing as i64;
    gregs[libc::REG_EFL as usize] &= !(RFLAGS_DF | RFLAGS_AC | RFLAGS_TF);
    true
}

/// Hands a fault that is not ours to the previously installed action.
///
/// # Safety
/// Arguments as the kernel passed them to our handler.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let previous = PREVIOUS
        .get()
        .and_then(|p| FAULT_SIGNALS.iter().position(|&s| s == sig).map(|i| p.0[i]));
    let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    match handler {
        libc::SIG_IGN => {}
        libc::SIG_DFL => {
            // Restore the default action and re-raise: the signal stays
            // blocked until we return, then kills the process as if we had
            // never been installed (re-executing a faulting instruction
            // would do the same, but INT3 does not re-execute).
            // SAFETY: all-zero is SIG_DFL with an empty mask.
            let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: sigaction and raise are async-signal-safe.
            unsafe {
                libc::sigaction(sig, &dfl, ptr::null_mut());
                libc::raise(sig);
            }
        }
        f => {
            let siginfo_style = previous.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
            if siginfo_style {
                // SAFETY: the previous owner registered `f` as an
                // SA_SIGINFO handler with exactly this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(f) };
                f(sig, info, ctx);
            } else {
                // SAFETY: the previous owner registered `f` as a plain
                // `void (*)(int)` handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(f) };
                f(sig);
            }
        }
    }
}
