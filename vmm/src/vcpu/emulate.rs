//! Emulation-failure exits: KVM's emulator gave up on the instruction at RIP.

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::GuestMemoryMmap;

/// The vCPU's view of instruction completion. Holds the per-vCPU stub buffer.
pub struct Emulator {
    its_on: bool,
}

impl Emulator {
    pub fn new(its_on: bool) -> Self {
        Emulator { its_on }
    }

    /// Completes the instruction at RIP, updating `regs`; on failure returns
    /// the one-line message that ends the VM.
    pub fn complete(
        &mut self,
        vcpu: u8,
        bytes: &[u8],
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
        _mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        let bitness = bitness(sregs);
        let insn = decode(bytes, bitness, regs.rip);
        Err(format!(
            "vcpu {vcpu}: KVM could not emulate `{}` at rip {:#x} ({bitness}-bit, bytes {})",
            describe(&insn),
            regs.rip,
            hex(bytes)
        ))
    }
}

/// The code size of the vCPU: 16/32/64 from CR0.PE, EFER.LMA, CS.L and CS.D.
pub fn bitness(sregs: &kvm_sregs) -> u32 {
    const CR0_PE: u64 = 1;
    const EFER_LMA: u64 = 1 << 10;
    if sregs.cr0 & CR0_PE == 0 {
        16
    } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Instruction {
    let mut d = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    d.decode()
}

fn describe(insn: &Instruction) -> String {
    if insn.is_invalid() {
        return "(undecodable bytes)".into();
    }
    let mut out = String::new();
    IntelFormatter::new().format(insn, &mut out);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
