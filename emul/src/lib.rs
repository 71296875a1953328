//! `emul`: completes guest x86 instructions that a hypervisor's in-kernel
//! emulator gives up on, by running them natively inside small generated host
//! stubs that are safe against Indirect Target Selection (ITS).
//!
//! The crate knows nothing about KVM: a VMM hands it register state
//! ([`CpuState`]), a memory/bus view ([`Platform`]) and lazily the vector
//! state ([`VectorState`]), and gets back an [`Outcome`]: the instruction
//! completed, or the exception the guest must see, or a refusal.
//!
//! Flow of [`Emulator::emulate`]: decode (fetching through the guest page
//! tables when the reported bytes are short) → [`classify`](classify::classify)
//! against the allow-list → linear address and segment/canonical checks
//! ([`address`]) → page walk for each page piece ([`paging`]) → stage the
//! operand in the stub's bounce buffer at the guest's offset modulo 64 →
//! re-encode as 64-bit code with `[rip+disp32]` into the bounce buffer
//! ([`reencode`]) → run in the stub (with the guest's XSAVE image when it
//! touches vector state) → write back the stored bytes ([`writeback`]) and
//! advance RIP.

pub mod address;
pub mod classify;
pub mod cpu;
pub mod emulator;
pub mod exception;
pub mod paging;
pub mod platform;
pub mod reencode;
pub mod stub;
pub mod system;
pub mod vregs;
pub mod writeback;

#[cfg(test)]
mod tests;

pub use cpu::{CpuState, Segment};
pub use emulator::{EmulError, Emulator, Outcome};
pub use exception::Exception;
pub use platform::{NoVectorState, Platform, PlatformError, VectorState, XsaveImage};
