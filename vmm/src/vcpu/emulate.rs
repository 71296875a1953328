//! Emulation-failure exits: KVM's emulator gave up on the instruction at RIP.
//!
//! This first version completes register-only instructions KVM cannot
//! emulate (ADX, BMI1/2, CRC32, POPCNT, LZCNT/TZCNT) by running them in an
//! ITS-safe host stub with the guest's GPRs and flags loaded; everything
//! else is reported with its decoded text and stops the VM.

use emul::stub::{GuestGprs, StubBuf, StubRunError};
use iced_x86::{
    Code, Decoder, DecoderOptions, Encoder, Formatter, Instruction, IntelFormatter, Mnemonic,
    OpKind, Register,
};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::GuestMemoryMmap;

/// Per-vCPU instruction completion; owns the vCPU's stub buffer.
pub struct Emulator {
    stub: StubBuf,
    encoder: Encoder,
}

impl Emulator {
    pub fn new(its_on: bool) -> Result<Self, emul::stub::StubError> {
        Ok(Emulator {
            stub: StubBuf::new(its_on)?,
            encoder: Encoder::new(64),
        })
    }

    /// Runs the stub self-test on this vCPU's own buffer; `Err` lists the
    /// cases that did not match.
    pub fn selftest(&mut self) -> Result<(), String> {
        let cases = emul::stub::selftest::run_with(&mut self.stub);
        if emul::stub::selftest::all_passed(&cases) {
            Ok(())
        } else {
            Err(cases
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join("\n"))
        }
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
        if !is_register_only_allowed(&insn) {
            return Err(format!(
                "vcpu {vcpu}: KVM could not emulate `{}` at rip {:#x} ({bitness}-bit, bytes {})",
                describe(&insn),
                regs.rip,
                hex(bytes)
            ));
        }
        // Stubs run in 64-bit mode: re-encode so 16-bit operand sizes keep
        // their meaning. The encoder appends, so start from an empty buffer.
        let mut code = self.encoder.take_buffer();
        code.clear();
        self.encoder.set_buffer(code);
        let len = self
            .encoder
            .encode(&insn, 0)
            .map_err(|e| format!("vcpu {vcpu}: cannot re-encode `{}`: {e}", describe(&insn)))?;
        let code = self.encoder.take_buffer();
        let mut gprs = to_gprs(regs);
        match self.stub.run(&code[..len], &mut gprs) {
            Ok(()) => {}
            Err(StubRunError::Fault(f)) => {
                return Err(format!(
                    "vcpu {vcpu}: `{}` at rip {:#x} faulted with {f}",
                    describe(&insn),
                    regs.rip
                ))
            }
            Err(StubRunError::Build(e)) => return Err(format!("vcpu {vcpu}: stub: {e}")),
        }
        self.encoder.set_buffer(code);
        from_gprs(&gprs, regs);
        let next = regs.rip.wrapping_add(insn.len() as u64);
        regs.rip = match bitness {
            64 => next,
            32 => next & 0xffff_ffff,
            _ => next & 0xffff,
        };
        Ok(())
    }
}

/// Register-only forms of the instructions KVM's emulator lacks, with no
/// RSP operand (the stub never loads the guest's RSP).
fn is_register_only_allowed(insn: &Instruction) -> bool {
    let allowed = matches!(
        insn.mnemonic(),
        Mnemonic::Adcx
            | Mnemonic::Adox
            | Mnemonic::Andn
            | Mnemonic::Bextr
            | Mnemonic::Blsi
            | Mnemonic::Blsr
            | Mnemonic::Blsmsk
            | Mnemonic::Bzhi
            | Mnemonic::Pdep
            | Mnemonic::Pext
            | Mnemonic::Shlx
            | Mnemonic::Sarx
            | Mnemonic::Shrx
            | Mnemonic::Rorx
            | Mnemonic::Mulx
            | Mnemonic::Crc32
            | Mnemonic::Popcnt
            | Mnemonic::Lzcnt
            | Mnemonic::Tzcnt
    );
    allowed
        && insn.code() != Code::INVALID
        && (0..insn.op_count()).all(|i| match insn.op_kind(i) {
            OpKind::Register => !matches!(insn.op_register(i).full_register(), Register::RSP),
            OpKind::Immediate8 => true,
            _ => false,
        })
}

fn to_gprs(r: &kvm_regs) -> GuestGprs {
    GuestGprs {
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rbx: r.rbx,
        rsp: r.rsp,
        rbp: r.rbp,
        rsi: r.rsi,
        rdi: r.rdi,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rflags: r.rflags,
    }
}

fn from_gprs(g: &GuestGprs, r: &mut kvm_regs) {
    r.rax = g.rax;
    r.rcx = g.rcx;
    r.rdx = g.rdx;
    r.rbx = g.rbx;
    r.rbp = g.rbp;
    r.rsi = g.rsi;
    r.rdi = g.rdi;
    r.r8 = g.r8;
    r.r9 = g.r9;
    r.r10 = g.r10;
    r.r11 = g.r11;
    r.r12 = g.r12;
    r.r13 = g.r13;
    r.r14 = g.r14;
    r.r15 = g.r15;
    r.rflags = g.rflags;
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
