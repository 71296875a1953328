//! System instructions that KVM's instruction emulator does not implement
//! and that a guest runs at CPL 0 (on PVM hosts every CPL 0 instruction is
//! interpreted, so each of these stopped the VM): software interrupts,
//! CLAC/STAC, XGETBV, INVPCID, RDPRU, WBINVD/WBNOINVD.
//!
//! None of them runs in a stub: each is a few checks (the SDM's exception
//! conditions, in its order) and a register update, or a result the VMM
//! must act on ([`Outcome::SoftwareInterrupt`], [`Outcome::FlushTlb`]).
//! [`emulate`] is called before classification; `None` means "not one of
//! these", and the normal path continues.

use iced_x86::{Code, Instruction, InstructionInfoFactory, OpKind};

use crate::address::{gpr_value, linear_address};
use crate::cpu::{CpuState, CR0_PE, CR4_OSXSAVE, RFLAGS_AC};
use crate::exception::Exception;
use crate::paging::{is_canonical, translate_span, Access, WalkError};
use crate::platform::{Platform, VectorState};
use crate::Outcome;

/// CR4.PCIDE
const CR4_PCIDE: u64 = 1 << 17;
/// RFLAGS.OF
const RFLAGS_OF: u64 = 1 << 11;
/// RFLAGS.VM (virtual-8086 mode)
const RFLAGS_VM: u64 = 1 << 17;
/// #BP and #OF: the vectors of INT3 and INTO.
const VEC_BP: u8 = 3;
const VEC_OF: u8 = 4;
/// Offset of XSTATE_BV in an XSAVE image.
const XSTATE_BV_OFFSET: usize = 512;

/// What the guest's CPUID says about these instructions (all absent by
/// default: they then raise #UD, as on a CPU without them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SystemFeatures {
    /// `CPUID.(7,0):EBX[20]`: CLAC/STAC.
    pub smap: bool,
    /// `CPUID.(7,0):EBX[10]`.
    pub invpcid: bool,
    /// `CPUID.8000_0008h:EBX[4]`.
    pub rdpru: bool,
    /// `CPUID.(0Dh,1):EAX[2]`: XGETBV with ECX = 1 (XINUSE).
    pub xgetbv1: bool,
}

impl SystemFeatures {
    /// From the guest's CPUID: `leaf(eax, ecx)` returns (eax, ebx, ecx,
    /// edx) of that leaf, or `None` when the guest has no such leaf.
    pub fn from_cpuid(leaf: impl Fn(u32, u32) -> Option<[u32; 4]>) -> Self {
        let bit =
            |r: Option<[u32; 4]>, reg: usize, b: u32| r.is_some_and(|r| r[reg] & (1 << b) != 0);
        let l7 = leaf(7, 0);
        SystemFeatures {
            smap: bit(l7, 1, 20),
            invpcid: bit(l7, 1, 10),
            rdpru: bit(leaf(0x8000_0008, 0), 1, 4),
            xgetbv1: bit(leaf(0xd, 1), 0, 2),
        }
    }
}

/// Whether `instr` is one of this family.
pub fn handles(instr: &Instruction) -> bool {
    matches!(
        instr.code(),
        Code::Int3
            | Code::Int_imm8
            | Code::Into
            | Code::Clac
            | Code::Stac
            | Code::Xgetbv
            | Code::Invpcid_r32_m128
            | Code::Invpcid_r64_m128
            | Code::Rdpru
            | Code::Wbinvd
            | Code::Wbnoinvd
    )
}

/// Completes `instr` if it is one of this family. On `Some(Done |
/// SoftwareInterrupt | FlushTlb)` the registers and RIP in `cpu` are
/// updated; on any other outcome `cpu` is unchanged.
pub fn emulate(
    features: &SystemFeatures,
    cpu: &mut CpuState,
    instr: &Instruction,
    vec: &mut dyn VectorState,
    mem: &mut dyn Platform,
) -> Option<Outcome> {
    if !handles(instr) {
        return None;
    }
    let code = instr.code();
    let mnemonic = instr.mnemonic();
    let next_rip = next_rip(cpu, instr);
    let v86 = cpu.cr0 & CR0_PE != 0 && cpu.gprs.rflags & RFLAGS_VM != 0;
    let result = match code {
        Code::Int3 => software_interrupt(cpu, VEC_BP),
        Code::Int_imm8 => software_interrupt(cpu, instr.immediate8()),
        Code::Into if cpu.gprs.rflags & RFLAGS_OF != 0 => software_interrupt(cpu, VEC_OF),
        Code::Into => Ok(Step::Done),
        Code::Clac | Code::Stac => clac_stac(features, cpu, instr, v86),
        Code::Xgetbv => xgetbv(features, cpu, instr, vec),
        Code::Invpcid_r32_m128 | Code::Invpcid_r64_m128 => invpcid(features, cpu, instr, v86, mem),
        Code::Rdpru => rdpru(features),
        // Caches are coherent and the VMM owns none for the guest: nothing
        // to write back. Privileged: #GP(0) above CPL 0.
        _ if cpu.cpl > 0 || v86 => Err(Exception::gp0().into()),
        _ => Ok(Step::Done),
    };
    Some(match result {
        Ok(step) => {
            cpu.rip = next_rip;
            match step {
                Step::Done => Outcome::Done { mnemonic },
                Step::Interrupt(vector) => Outcome::SoftwareInterrupt { vector },
                Step::FlushTlb => Outcome::FlushTlb { mnemonic },
            }
        }
        Err(Fail::Exception(e)) => e.into(),
        Err(Fail::Unsupported(why)) => Outcome::Unsupported {
            text: format!("{instr}: {why}"),
        },
        Err(Fail::Platform(p)) => Outcome::Platform(p),
        Err(Fail::Contended) => Outcome::Retry,
    })
}

/// What a completed instruction asks of the VMM.
enum Step {
    Done,
    Interrupt(u8),
    FlushTlb,
}

enum Fail {
    Exception(Exception),
    Unsupported(&'static str),
    Platform(crate::PlatformError),
    Contended,
}

impl From<Exception> for Fail {
    fn from(e: Exception) -> Self {
        Fail::Exception(e)
    }
}

impl From<WalkError> for Fail {
    fn from(e: WalkError) -> Self {
        match e {
            WalkError::Fault(x) => Fail::Exception(x),
            WalkError::Platform(p) => Fail::Platform(p),
            WalkError::Contended { .. } => Fail::Contended,
        }
    }
}

/// RIP after the instruction (IP wraps at 16 bits in 16-bit code, EIP at
/// 32).
fn next_rip(cpu: &CpuState, instr: &Instruction) -> u64 {
    let next = cpu.rip.wrapping_add(instr.len() as u64);
    match cpu.bitness() {
        16 => next & 0xffff,
        32 => next & 0xffff_ffff,
        _ => next,
    }
}

fn ud() -> Fail {
    Exception::ud().into()
}

/// INT n / INT3 / INTO (taken): the VMM delivers `vector` through the
/// guest's IDT as an event whose return address is the next instruction.
/// Above CPL 0 the gate's DPL must be checked first (#GP(vector * 8 + 2)
/// if it is below CPL); the emulator does not read the IDT, and on the
/// hosts that send these here only CPL 0 code arrives (CPL 3 runs `int n`
/// natively), so it refuses rather than guess.
fn software_interrupt(cpu: &CpuState, vector: u8) -> Result<Step, Fail> {
    if cpu.cr0 & CR0_PE != 0 && cpu.cpl > 0 {
        return Err(Fail::Unsupported(
            "software interrupt above CPL 0 (needs the IDT gate's DPL check)",
        ));
    }
    Ok(Step::Interrupt(vector))
}

/// CLAC/STAC: #UD with LOCK, in virtual-8086 mode, above CPL 0, or when
/// the guest has no SMAP; else clear/set RFLAGS.AC.
fn clac_stac(
    f: &SystemFeatures,
    cpu: &mut CpuState,
    instr: &Instruction,
    v86: bool,
) -> Result<Step, Fail> {
    if instr.has_lock_prefix() || v86 || cpu.cpl > 0 || !f.smap {
        return Err(ud());
    }
    if instr.code() == Code::Clac {
        cpu.gprs.rflags &= !RFLAGS_AC;
    } else {
        cpu.gprs.rflags |= RFLAGS_AC;
    }
    Ok(Step::Done)
}

/// XGETBV: #UD with CR4.OSXSAVE clear (or LOCK); ECX 0 reads XCR0, ECX 1
/// the XINUSE bitmap where XGETBV1 exists (here the XSTATE_BV of KVM's
/// XSAVE image within XCR0: components in their initial state read 0);
/// any other ECX #GP(0). Result in EDX:EAX, upper halves cleared.
fn xgetbv(
    f: &SystemFeatures,
    cpu: &mut CpuState,
    instr: &Instruction,
    vec: &mut dyn VectorState,
) -> Result<Step, Fail> {
    if instr.has_lock_prefix() || cpu.cr4 & CR4_OSXSAVE == 0 {
        return Err(ud());
    }
    let value = match cpu.gprs.rcx as u32 {
        0 => vec.xcr0().map_err(Fail::Platform)?,
        1 if f.xgetbv1 => {
            let xcr0 = vec.xcr0().map_err(Fail::Platform)?;
            let image = vec.image().map_err(Fail::Platform)?;
            let bv = image
                .get(XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes);
            bv & xcr0
        }
        _ => return Err(Exception::gp0().into()),
    };
    cpu.gprs.rax = value & 0xffff_ffff;
    cpu.gprs.rdx = value >> 32;
    Ok(Step::Done)
}

/// INVPCID: #UD without the feature (or in virtual-8086 mode), #GP(0) above
/// CPL 0, for a type above 3, and for the descriptor checks; the
/// descriptor is read like any memory operand (segment checks, page walk,
/// #PF). The VMM cannot flush one PCID or one address of the guest's TLB,
/// so every type flushes the whole of it ([`Outcome::FlushTlb`]): the SDM
/// allows invalidating more than asked.
fn invpcid(
    f: &SystemFeatures,
    cpu: &mut CpuState,
    instr: &Instruction,
    v86: bool,
    mem: &mut dyn Platform,
) -> Result<Step, Fail> {
    if !f.invpcid || v86 {
        return Err(ud());
    }
    if cpu.cr0 & CR0_PE != 0 && cpu.cpl > 0 {
        return Err(Exception::gp0().into());
    }
    if instr.op0_kind() != OpKind::Register {
        return Err(ud());
    }
    let ty = gpr_value(&cpu.gprs, instr.op0_register()).ok_or(Fail::Unsupported("operand"))?;
    let desc = read_descriptor(cpu, instr, mem)?;
    if ty > 3 {
        return Err(Exception::gp0().into());
    }
    let pcid = desc & 0xfff;
    let addr = (desc >> 64) as u64;
    let reserved = (desc >> 12) as u64 & ((1 << 52) - 1);
    let pcide = cpu.cr4 & CR4_PCIDE != 0;
    match ty {
        // Individual address: reserved bits clear, canonical address, PCID
        // 0 unless CR4.PCIDE.
        0 if reserved != 0 || !is_canonical(cpu, addr) || (!pcide && pcid != 0) => {
            return Err(Exception::gp0().into())
        }
        // Single context.
        1 if reserved != 0 || (!pcide && pcid != 0) => return Err(Exception::gp0().into()),
        _ => {}
    }
    Ok(Step::FlushTlb)
}

/// Reads the 16-byte INVPCID descriptor.
fn read_descriptor(
    cpu: &CpuState,
    instr: &Instruction,
    mem: &mut dyn Platform,
) -> Result<u128, Fail> {
    let mut info = InstructionInfoFactory::new();
    let used = match info.info(instr).used_memory() {
        [one] => *one,
        _ => return Err(Fail::Unsupported("descriptor operand")),
    };
    let lin = linear_address(cpu, cpu.bitness(), &used, 16, false)?;
    let access = Access {
        write: false,
        fetch: false,
        user: false,
    };
    let mut bytes = [0u8; 16];
    let span = translate_span(cpu, lin, 16, cpu.bitness() != 64, access, mem)?;
    let mut at = 0;
    for (gpa, n) in span.into_iter().filter(|&(_, n)| n != 0) {
        mem.read_phys(gpa, &mut bytes[at..at + n])
            .map_err(Fail::Platform)?;
        at += n;
    }
    Ok(u128::from_le_bytes(bytes))
}

/// RDPRU: #UD unless the guest's CPUID has it. A guest that has it would
/// read MPERF/APERF, which a VMM outside the kernel cannot read for it.
fn rdpru(f: &SystemFeatures) -> Result<Step, Fail> {
    if !f.rdpru {
        return Err(ud());
    }
    Err(Fail::Unsupported(
        "RDPRU in the guest's CPUID: the VMM cannot read the guest's MPERF/APERF",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CpuState, CR4_OSXSAVE};
    use crate::platform::XsaveImage;
    use iced_x86::{Decoder, DecoderOptions};

    /// Flat RAM at 0 for page tables and descriptors.
    struct Ram(Vec<u8>);

    impl Platform for Ram {
        fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), crate::PlatformError> {
            let a = gpa as usize;
            buf.copy_from_slice(&self.0[a..a + buf.len()]);
            Ok(())
        }
        fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), crate::PlatformError> {
            let a = gpa as usize;
            self.0[a..a + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    /// 64-bit CPL 0 with paging off is not a thing; use long mode with an
    /// identity map of the first 2 MiB (PML4 at 0x1000).
    fn setup() -> (CpuState, Ram) {
        let mut ram = Ram(vec![0u8; 0x20_0000]);
        ram.0[0x1000..0x1008].copy_from_slice(&0x2003u64.to_le_bytes());
        ram.0[0x2000..0x2008].copy_from_slice(&0x3003u64.to_le_bytes());
        ram.0[0x3000..0x3008].copy_from_slice(&0x83u64.to_le_bytes());
        let mut cpu = CpuState::long_mode(0x1000);
        cpu.rip = 0x1_0000;
        cpu.max_phys_bits = 46;
        (cpu, ram)
    }

    fn run(
        f: SystemFeatures,
        cpu: &mut CpuState,
        bytes: &[u8],
        vec: &mut XsaveImage,
        ram: &mut Ram,
    ) -> Option<Outcome> {
        let mut d = Decoder::with_ip(cpu.bitness(), bytes, cpu.rip, DecoderOptions::NONE);
        let i = d.decode();
        emulate(&f, cpu, &i, vec, ram)
    }

    fn all() -> SystemFeatures {
        SystemFeatures {
            smap: true,
            invpcid: true,
            rdpru: false,
            xgetbv1: true,
        }
    }

    #[test]
    fn software_interrupts_return_past_the_instruction() {
        let (mut cpu, mut ram) = setup();
        let mut v = XsaveImage::new();
        assert_eq!(
            run(all(), &mut cpu, &[0xcc], &mut v, &mut ram),
            Some(Outcome::SoftwareInterrupt { vector: 3 })
        );
        assert_eq!(cpu.rip, 0x1_0001);
        assert_eq!(
            run(all(), &mut cpu, &[0xcd, 0x20], &mut v, &mut ram),
            Some(Outcome::SoftwareInterrupt { vector: 0x20 })
        );
        assert_eq!(cpu.rip, 0x1_0003);
        // INTO is invalid in 64-bit mode; in 32-bit code it traps only with OF.
        cpu.cs.l = false;
        cpu.cs.db = true;
        assert_eq!(
            run(all(), &mut cpu, &[0xce], &mut v, &mut ram),
            Some(Outcome::Done {
                mnemonic: iced_x86::Mnemonic::Into
            })
        );
        assert_eq!(cpu.rip, 0x1_0004);
        cpu.gprs.rflags |= RFLAGS_OF;
        assert_eq!(
            run(all(), &mut cpu, &[0xce], &mut v, &mut ram),
            Some(Outcome::SoftwareInterrupt { vector: 4 })
        );
        assert_eq!(cpu.rip, 0x1_0005);
    }

    #[test]
    fn int_n_in_16_bit_code_wraps_ip() {
        let (mut cpu, mut ram) = setup();
        cpu.cr0 = 0x10;
        cpu.efer = 0;
        cpu.cr4 = 0;
        cpu.rip = 0xffff;
        let mut v = XsaveImage::new();
        assert_eq!(
            run(all(), &mut cpu, &[0xcd, 0x10], &mut v, &mut ram),
            Some(Outcome::SoftwareInterrupt { vector: 0x10 })
        );
        assert_eq!(cpu.rip, 0x0001);
    }

    #[test]
    fn clac_stac_need_smap_and_cpl0() {
        let (mut cpu, mut ram) = setup();
        let mut v = XsaveImage::new();
        let stac = [0x0f, 0x01, 0xcb];
        let clac = [0x0f, 0x01, 0xca];
        assert!(matches!(
            run(all(), &mut cpu, &stac, &mut v, &mut ram),
            Some(Outcome::Done { .. })
        ));
        assert_ne!(cpu.gprs.rflags & RFLAGS_AC, 0);
        run(all(), &mut cpu, &clac, &mut v, &mut ram);
        assert_eq!(cpu.gprs.rflags & RFLAGS_AC, 0);
        assert_eq!(cpu.rip, 0x1_0006);
        let before = cpu;
        assert_eq!(
            run(SystemFeatures::default(), &mut cpu, &stac, &mut v, &mut ram),
            Some(Exception::ud().into())
        );
        cpu.cpl = 3;
        assert_eq!(
            run(all(), &mut cpu, &stac, &mut v, &mut ram),
            Some(Exception::ud().into())
        );
        cpu.cpl = 0;
        assert_eq!(cpu, before, "a fault changes nothing");
    }

    #[test]
    fn xgetbv_reads_xcr0_and_checks_ecx_and_osxsave() {
        let (mut cpu, mut ram) = setup();
        let mut v = XsaveImage::new();
        v.xcr0 = 0x7;
        v.bytes[XSTATE_BV_OFFSET] = 0x3;
        let xgetbv = [0x0f, 0x01, 0xd0];
        cpu.gprs.rax = u64::MAX;
        cpu.gprs.rdx = u64::MAX;
        cpu.gprs.rcx = 0xffff_ffff_0000_0000;
        assert!(matches!(
            run(all(), &mut cpu, &xgetbv, &mut v, &mut ram),
            Some(Outcome::Done { .. })
        ));
        assert_eq!((cpu.gprs.rax, cpu.gprs.rdx), (7, 0));
        cpu.gprs.rcx = 1;
        run(all(), &mut cpu, &xgetbv, &mut v, &mut ram);
        assert_eq!(cpu.gprs.rax, 3, "XINUSE");
        let f = SystemFeatures {
            xgetbv1: false,
            ..all()
        };
        assert_eq!(
            run(f, &mut cpu, &xgetbv, &mut v, &mut ram),
            Some(Exception::gp0().into())
        );
        cpu.gprs.rcx = 2;
        assert_eq!(
            run(all(), &mut cpu, &xgetbv, &mut v, &mut ram),
            Some(Exception::gp0().into())
        );
        cpu.gprs.rcx = 0;
        cpu.cr4 &= !CR4_OSXSAVE;
        assert_eq!(
            run(all(), &mut cpu, &xgetbv, &mut v, &mut ram),
            Some(Exception::ud().into())
        );
    }

    #[test]
    fn invpcid_checks_type_and_descriptor_then_flushes() {
        let (mut cpu, mut ram) = setup();
        let mut v = XsaveImage::new();
        // invpcid rbx, [rax]
        let invpcid = [0x66, 0x0f, 0x38, 0x82, 0x18];
        cpu.gprs.rax = 0x8000;
        let desc = |ram: &mut Ram, pcid: u64, addr: u64| {
            ram.0[0x8000..0x8008].copy_from_slice(&pcid.to_le_bytes());
            ram.0[0x8008..0x8010].copy_from_slice(&addr.to_le_bytes());
        };
        desc(&mut ram, 0, 0x1234_5000);
        for ty in 0..4 {
            cpu.gprs.rbx = ty;
            assert!(
                matches!(
                    run(all(), &mut cpu, &invpcid, &mut v, &mut ram),
                    Some(Outcome::FlushTlb { .. })
                ),
                "type {ty}"
            );
        }
        let gp = Some(Exception::gp0().into());
        cpu.gprs.rbx = 4;
        assert_eq!(run(all(), &mut cpu, &invpcid, &mut v, &mut ram), gp);
        // PCID 1 without CR4.PCIDE, for types 0 and 1 only.
        desc(&mut ram, 1, 0x1000);
        cpu.gprs.rbx = 0;
        assert_eq!(run(all(), &mut cpu, &invpcid, &mut v, &mut ram), gp);
        cpu.gprs.rbx = 2;
        assert!(matches!(
            run(all(), &mut cpu, &invpcid, &mut v, &mut ram),
            Some(Outcome::FlushTlb { .. })
        ));
        cpu.cr4 |= CR4_PCIDE;
        cpu.gprs.rbx = 1;
        assert!(matches!(
            run(all(), &mut cpu, &invpcid, &mut v, &mut ram),
            Some(Outcome::FlushTlb { .. })
        ));
        // Reserved descriptor bits, a non-canonical address.
        desc(&mut ram, 0x1000, 0);
        assert_eq!(run(all(), &mut cpu, &invpcid, &mut v, &mut ram), gp);
        desc(&mut ram, 0, 0x8000_0000_0000_0000);
        cpu.gprs.rbx = 0;
        assert_eq!(run(all(), &mut cpu, &invpcid, &mut v, &mut ram), gp);
        // An unmapped descriptor page faults.
        cpu.gprs.rax = 0x40_0000;
        assert!(matches!(
            run(all(), &mut cpu, &invpcid, &mut v, &mut ram),
            Some(Outcome::Exception { vector: 14, .. })
        ));
        cpu.gprs.rax = 0x8000;
        cpu.cpl = 3;
        assert_eq!(run(all(), &mut cpu, &invpcid, &mut v, &mut ram), gp);
        assert_eq!(
            run(
                SystemFeatures::default(),
                &mut cpu,
                &invpcid,
                &mut v,
                &mut ram
            ),
            Some(Exception::ud().into())
        );
    }

    #[test]
    fn rdpru_and_wbinvd() {
        let (mut cpu, mut ram) = setup();
        let mut v = XsaveImage::new();
        assert_eq!(
            run(all(), &mut cpu, &[0x0f, 0x01, 0xfd], &mut v, &mut ram),
            Some(Exception::ud().into())
        );
        assert!(matches!(
            run(all(), &mut cpu, &[0x0f, 0x09], &mut v, &mut ram),
            Some(Outcome::Done { .. })
        ));
        assert!(matches!(
            run(all(), &mut cpu, &[0xf3, 0x0f, 0x09], &mut v, &mut ram),
            Some(Outcome::Done { .. })
        ));
        assert_eq!(cpu.rip, 0x1_0005);
        cpu.cpl = 3;
        assert_eq!(
            run(all(), &mut cpu, &[0x0f, 0x09], &mut v, &mut ram),
            Some(Exception::gp0().into())
        );
        // Anything else is not this family.
        assert_eq!(run(all(), &mut cpu, &[0x90], &mut v, &mut ram), None);
    }
}
