//! `emul`: completes guest x86 instructions that a hypervisor's in-kernel
//! emulator gives up on, by running them natively inside small generated host
//! stubs that are safe against Indirect Target Selection (ITS).
//!
//! The crate knows nothing about KVM: a VMM hands it register state and a
//! memory/bus view, and gets back the architectural result or the exception
//! the guest must see.

pub mod stub;
