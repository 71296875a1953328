//! ITS-safe host stubs: completing an x86 instruction by running it
//! natively on the host.
//!
//! # What a stub looks like
//!
//! Each vCPU thread owns a [`StubBuf`]: a memfd mapped twice, once
//! read-write (where code is written) and once read-execute (where it runs),
//! so no page is ever writable and executable. A stub is built in the
//! buffer for one instruction:
//!
//! ```text
//!   push rbx, rbp, r12-r15        host callee-saved registers
//!   call load_guest_gprs          guest GPRs (not RSP) + arithmetic flags
//!   <instruction, 1..=15 bytes>
//!   call save_guest_gprs          back into the GuestGprs, DF cleared
//!   pop r15-r12, rbp, rbx
//!   place_ret
//! ```
//!
//! The helpers are generated machine code in the buffer's helper page. The
//! instruction runs on the host stack with the guest's other registers, so
//! it must not touch RSP; a memory operand is rewritten by the caller to
//! `[rip+disp32]` into the buffer's bounce area ([`StubBuf::bounce_exec_addr`],
//! relative to [`StubBuf::insn_exec_addr`]).
//!
//! # The ITS rule
//!
//! With the Indirect Target Selection mitigation on ([`ItsMode`]), no RET
//! in generated code sits in the lower half of a 64-byte cache line:
//! [`place_ret`] writes a RET where its executable address has bit 5 set,
//! else `JMP rel32` to a shared return thunk (whose RET is at offset 32)
//! followed by INT3. The call into the stub is placed the same way.
//!
//! # Fault recovery
//!
//! An exception in the instruction (#DE, #BP, #UD, #SS, #GP, #PF, #MF, #AC,
//! #XM, ...) arrives as a signal; a process-wide handler, installed on the
//! first [`StubBuf::new`], recognises the running stub of the faulting
//! thread, unwinds to the caller with the host's registers restored, and
//! [`StubBuf::run`] returns [`StubRunError::Fault`] with the vector, error
//! code and (for #PF) address. Faults elsewhere go to the previous handler.
//! The host's MXCSR and x87 control word are restored after every run.
//!
//! # Vector state
//!
//! [`StubBuf::run_with_vector`] also switches the x87/SSE/AVX/AVX-512
//! state: the host's is XSAVEd before the stub and XRSTORed after it; the
//! stub itself XRSTORs the guest's image ([`StubBuf::guest_xsave_mut`])
//! before loading the GPRs and XSAVEs it after saving them, through the
//! helpers `load_guest_vec`/`save_guest_vec`, so a fault there is recovered
//! like one in the instruction. Plain runs call the thunk's bare RET in
//! those two places, so every stub has the same layout.
//!
//! # Threads
//!
//! `StubBuf` is `Send` but not `Sync`: one thread runs it at a time.
//! Recovery state is per thread, so many vCPU threads may run stubs
//! concurrently.
//!
//! ```no_run
//! use emul::stub::{GuestGprs, StubBuf};
//! let mut buf = StubBuf::new(true)?;
//! let mut gprs = GuestGprs { rax: 1, rbx: 2, ..Default::default() };
//! buf.run(&[0x48, 0x01, 0xd8], &mut gprs)?; // add rax, rbx
//! assert_eq!(gprs.rax, 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod buf;
mod builder;
mod cursor;
mod error;
mod fault;
mod helpers;
mod its;
pub mod probe;
mod region;
mod regs;
mod ret;
pub mod selftest;
pub mod shape;

pub use buf::{host_xcr0, StubBuf, VECTOR_XFEATURES, XSAVE_HEADER_OFFSET};
pub use builder::{BuiltStub, MAX_INSN_LEN, MAX_STUB_LEN, STUB_BUF_SIZE, STUB_PROLOGUE_LEN};
pub use error::{StubError, StubRunError};
pub use fault::{
    StubFault, EXC_AC, EXC_BP, EXC_DE, EXC_GP, EXC_MF, EXC_PF, EXC_SS, EXC_UD, EXC_XM,
};
pub use its::{
    decide_from_cpuid, decide_from_sysfs, detect, CpuId, ItsDecision, ItsMode, ParseItsModeError,
    ITS_SYSFS_PATH,
};
pub use region::{BOUNCE_SIZE, XSAVE_AREA_SIZE};
pub use regs::{GuestGprs, ARITH_FLAGS_MASK};
pub use ret::{its_safe, place_ret, RetPolicy, PLACE_RET_MAX_LEN, RET};

#[cfg(test)]
mod tests;
