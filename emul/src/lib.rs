//! `emul`: completes guest x86 instructions that a hypervisor's in-kernel
//! emulator gives up on, by running them natively inside small generated host
//! stubs that are safe against Indirect Target Selection (ITS).
//!
//! KVM's instruction emulator handles the integer instructions and the
//! legacy SSE moves an MMIO access usually comes from; an MMIO operand of
//! AVX/AVX-512, x87, SSE arithmetic, CMPXCHG16B, ADX or BMI instructions
//! stops the VM in QEMU, Firecracker and cloud-hypervisor. With
//! `KVM_CAP_EXIT_ON_EMULATION_FAILURE` enabled, such an instruction exits to
//! userspace with its bytes; hand it to [`Emulator::emulate`] and resume.
//!
//! The crate knows nothing about KVM: a VMM hands it register state
//! ([`CpuState`]), a memory/bus view ([`Platform`]) and lazily the vector
//! state ([`VectorState`]), and gets back an [`Outcome`]: the instruction
//! completed, or the exception the guest must see, or a refusal.
//!
//! # Using it from a VMM
//!
//! What to implement:
//! - [`Platform`]: guest-physical reads and writes, RAM or your MMIO bus
//!   (each call stays inside one guest page; split it across your devices).
//! - [`VectorState`]: the guest's XSAVE image (`KVM_GET_XSAVE`), a dirty
//!   mark (then `KVM_SET_XSAVE` before the next `KVM_RUN`) and XCR0
//!   (`KVM_GET_XCRS`). Each is asked for only when the instruction needs it:
//!   fetch lazily, at most once per exit. [`XsaveImage`] is an owned one.
//!
//! What to pass: a [`CpuState`] filled from KVM's registers (`kvm_regs`,
//! `kvm_sregs`, from `KVM_GET_REGS`/`KVM_GET_SREGS` or `KVM_CAP_SYNC_REGS`),
//! with `max_phys_bits` from the guest's CPUID 0x80000008 and `cpl` =
//! SS.DPL, plus the instruction bytes of the emulation-failure exit (short
//! or empty is fine: the rest is fetched through the guest's page tables).
//!
//! What to do with each [`Outcome`]: see the `match` below.
//! `examples/kvm_vector_mmio.rs` is the same as a complete VMM on
//! kvm-ioctls, from `KVM_CREATE_VM` to the guest's `hlt`.
//!
//! ```
//! use emul::{CpuState, Emulator, Outcome, Platform, PlatformError, Segment, XsaveImage};
//!
//! /// Guest-physical memory: 1 MiB of RAM at 0, a 16-byte device at 0xd0000000.
//! struct Phys {
//!     ram: Vec<u8>,
//!     device: [u8; 16],
//! }
//!
//! impl Platform for Phys {
//!     fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
//!         for (i, b) in buf.iter_mut().enumerate() {
//!             let a = gpa as usize + i;
//!             *b = match a.checked_sub(0xd000_0000) {
//!                 Some(off) => self.device.get(off).copied().unwrap_or(0xff),
//!                 None => self.ram.get(a).copied().unwrap_or(0xff), // open bus
//!             };
//!         }
//!         Ok(())
//!     }
//!     fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
//!         for (i, b) in buf.iter().enumerate() {
//!             let a = gpa as usize + i;
//!             match a.checked_sub(0xd000_0000) {
//!                 Some(off) => self.device.get_mut(off).map(|d| *d = *b),
//!                 None => self.ram.get_mut(a).map(|r| *r = *b),
//!             };
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let mut phys = Phys { ram: vec![0; 1 << 20], device: [0; 16] };
//! for (i, f) in [1.0f32, 2.0, 3.0, 4.0].iter().enumerate() {
//!     phys.device[i * 4..i * 4 + 4].copy_from_slice(&f.to_le_bytes());
//! }
//!
//! // The vCPU as KVM's registers describe it: here 32-bit flat protected
//! // mode, paging off, CR4.OSFXSR on, EBX pointing at the device.
//! let data = Segment::flat_data();
//! let mut cpu = CpuState {
//!     rip: 0x1000,
//!     cr0: 0x3,     // PE | MP
//!     cr4: 1 << 9,  // OSFXSR
//!     cs: Segment { type_: 0xb, ..data },
//!     ss: data,
//!     ds: data,
//!     es: data,
//!     fs: data,
//!     gs: data,
//!     max_phys_bits: 36,
//!     ..CpuState::default()
//! };
//! cpu.gprs.rbx = 0xd000_0000;
//! cpu.gprs.rflags = 0x2;
//!
//! // `addps xmm0, [ebx]`, as the emulation-failure exit reports it.
//! let insn = [0x0f, 0x58, 0x03];
//! // One emulator per vCPU thread (it owns the stub buffer).
//! let mut emulator = Emulator::new(emul::stub::detect().enabled)?;
//! // A KVM VMM implements VectorState over KVM_GET_XSAVE/KVM_GET_XCRS.
//! let mut vector_state = XsaveImage::new();
//! match emulator.emulate(&mut cpu, &insn, &mut vector_state, &mut phys) {
//!     Outcome::Done { mnemonic } => {
//!         // Write cpu.gprs (GPRs, RFLAGS) and cpu.rip back to the vCPU; if
//!         // the vector state was marked dirty, KVM_SET_XSAVE it. Then KVM_RUN.
//!         println!("completed {mnemonic:?}");
//!     }
//!     Outcome::Exception { vector, error_code, cr2 } => {
//!         // Nothing changed: inject the exception (KVM_SET_VCPU_EVENTS; set
//!         // CR2 first for a #PF) and KVM_RUN; the guest's handler runs.
//!         panic!("unexpected exception {vector} {error_code:?} {cr2:?}");
//!     }
//!     Outcome::Unsupported { text } => {
//!         // Outside the allow-list: stop the VM naming `text`, or inject #UD.
//!         panic!("refused: {text}");
//!     }
//!     Outcome::Platform(e) => {
//!         // Your Platform or VectorState failed: stop the VM.
//!         panic!("{e}");
//!     }
//!     Outcome::Retry => {
//!         // Another vCPU kept winning a race for the instruction's memory:
//!         // RIP and the GPRs are unchanged (KVM_SET_XSAVE if the vector
//!         // state is dirty, as always); KVM_RUN runs into it again.
//!     }
//!     Outcome::SoftwareInterrupt { vector } => {
//!         // INT n/INT3/INTO: write cpu.gprs and cpu.rip (past the INT) back
//!         // and inject `vector` as an interrupt (KVM_SET_VCPU_EVENTS,
//!         // interrupt.injected): the guest's IDT handler returns after it.
//!         panic!("unexpected software interrupt {vector}");
//!     }
//!     Outcome::FlushTlb { .. } => {
//!         // INVPCID: write the registers back and flush the guest's TLB.
//!         panic!("unexpected INVPCID");
//!     }
//! }
//! assert_eq!(cpu.rip, 0x1003);
//! assert!(vector_state.dirty);
//! // XMM0 (offset 160 of the XSAVE image) now holds the device's floats.
//! assert_eq!(vector_state.bytes[160..176], phys.device);
//! # Ok::<(), emul::EmulError>(())
//! ```
//!
//! # How it works
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

#![warn(missing_docs)]

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
pub mod xstate;

#[cfg(test)]
mod tests;

pub use cpu::{CpuState, DescriptorTable, Segment};
pub use emulator::{EmulError, Emulator, Outcome};
pub use exception::Exception;
pub use platform::{NoVectorState, Platform, PlatformError, VectorState, XsaveImage};
pub use stub::GuestGprs;
