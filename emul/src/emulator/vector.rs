//! What is special about instructions that touch x87/SSE/AVX state: the
//! #UD/#NM checks before any memory access, which masked forms suppress
//! faults on masked-out elements, and the x87 pointers the stub leaves.

use iced_x86::{CpuidFeature, EncodingKind, Instruction, Mnemonic, Register, UsedMemory};

use super::fetch::is_prefix;
use super::operand::Operand;
use super::{Emulator, Stop};
use crate::classify::Class;
use crate::cpu::{CpuState, CR0_EM, CR0_TS, CR4_OSFXSR, CR4_OSXSAVE};
use crate::exception::Exception;
use crate::platform::VectorState;
use crate::stub::{BOUNCE_SIZE, STUB_BUF_SIZE};
use crate::writeback::{selection, Selection};

impl Emulator {
    /// A non-control x87 instruction records its own address (FIP), its
    /// operand's (FDP) and its opcode (FOP: the low 3 bits of the D8-DF
    /// byte, then ModRM) in the x87 state. Run in the stub, those are the
    /// stub's, the bounce buffer's and the re-encoded ModRM's; the guest
    /// must see its RIP, its operand's effective address and its own
    /// opcode. (Control instructions leave all three alone, so they still
    /// hold the guest's earlier values.) AMD CPUs store zero pointers with
    /// XSAVE while no x87 exception is pending (measured here: FXSAVE64
    /// after `fld` stores FIP 0, FNSTENV stores the real FIP), so the image
    /// may hold zeros rather than stub addresses: a non-control x87
    /// instruction always gets its own FIP, and its own FOP and FDP where
    /// the host records them ([`HostShape`](crate::stub::shape::HostShape):
    /// always on AMD, only with an unmasked exception on Intel).
    pub(super) fn fix_x87_pointers(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        mem_op: Option<(UsedMemory, Operand)>,
        raw: &[u8],
        instr: Option<&Instruction>,
        before: &[u8],
    ) {
        // XSAVE64 layout: FOP at 6, FIP at 8, FDP at 16.
        const FOP: usize = 6;
        const FIP: usize = 8;
        const FDP: usize = 16;
        let stub = self.stub.stub_exec_addr()..self.stub.stub_exec_addr() + STUB_BUF_SIZE as u64;
        let bounce =
            self.stub.bounce_exec_addr()..self.stub.bounce_exec_addr() + BOUNCE_SIZE as u64;
        let area = self.stub.guest_xsave_mut();
        let word = |a: &[u8], off: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&a[off..off + 8]);
            u64::from_le_bytes(b)
        };
        let own = instr.is_some_and(is_x87_non_control);
        // Intel records FOP (and, with FDP_EXCPTN_ONLY, FDP) only for an
        // instruction that raises an unmasked exception, which leaves
        // FSW.ES set; otherwise the guest's earlier values stay (measured
        // on Intel Xeon Sapphire Rapids by the differential test: FOP 0
        // after `fld`, where AMD records 0x145).
        const FSW: usize = 2;
        const FSW_ES: u8 = 0x80;
        let raised = area[FSW] & FSW_ES != 0;
        let fop_recorded = own && (self.shape.fop_always || raised);
        let fdp_recorded = own && (self.shape.fdp_always || raised);
        let fip_in_stub = stub.contains(&word(area, FIP));
        if own || fip_in_stub {
            area[FIP..FIP + 8].copy_from_slice(&cpu.rip.to_le_bytes());
        }
        if fop_recorded || fip_in_stub {
            if let Some(fop) = x87_opcode(raw, bitness) {
                area[FOP..FOP + 2].copy_from_slice(&fop.to_le_bytes());
            }
        } else if own {
            // Not recorded: the guest's earlier FOP (an AMD host's XSAVE
            // would show zero here, replaying Intel's shape).
            area[FOP..FOP + 2].copy_from_slice(&before[FOP..FOP + 2]);
        }
        if own && !fdp_recorded && mem_op.is_some() {
            area[FDP..FDP + 8].copy_from_slice(&before[FDP..FDP + 8]);
        }
        if let Some((used, op)) = mem_op {
            if fdp_recorded || bounce.contains(&word(area, FDP)) {
                let base = match (bitness, used.segment()) {
                    (64, Register::FS) => cpu.fs.base,
                    (64, Register::GS) => cpu.gs.base,
                    (64, _) => 0,
                    (_, seg) => crate::address::segment_of(cpu, seg).map_or(0, |s| s.base),
                };
                let ea = op.lin.wrapping_sub(base);
                area[FDP..FDP + 8].copy_from_slice(&ea.to_le_bytes());
            }
        }
    }
}

/// An x87 instruction that records its address, operand and opcode: every
/// one but the control instructions (SDM vol. 1, 8.1.8) and MMX.
fn is_x87_non_control(instr: &Instruction) -> bool {
    use Mnemonic as M;
    let x87 = instr.cpuid_features().iter().any(|f| {
        matches!(
            f,
            CpuidFeature::FPU | CpuidFeature::FPU287 | CpuidFeature::FPU387
        )
    });
    x87 && !matches!(
        instr.mnemonic(),
        M::Fninit
            | M::Finit
            | M::Fnclex
            | M::Fclex
            | M::Fldcw
            | M::Fnstcw
            | M::Fstcw
            | M::Fnstsw
            | M::Fstsw
            | M::Fnstenv
            | M::Fstenv
            | M::Fldenv
            | M::Fnsave
            | M::Fsave
            | M::Frstor
            | M::Wait
    )
}

/// FOP of an x87 instruction's bytes: `(opcode & 7) << 8 | ModRM`, after
/// any prefixes; `None` when the bytes are not an x87 instruction.
fn x87_opcode(raw: &[u8], bitness: u32) -> Option<u16> {
    let at = raw.iter().position(|&b| !is_prefix(b, bitness))?;
    let opcode = *raw.get(at)?;
    let modrm = *raw.get(at + 1)?;
    (0xd8..=0xdf)
        .contains(&opcode)
        .then_some(u16::from(opcode & 7) << 8 | u16::from(modrm))
}

/// A masked access whose mask decides which memory elements it touches, so
/// masked-out elements never fault: VMASKMOV/VPMASKMOV, and every
/// EVEX-masked form whose [`Selection`] maps mask bits to memory elements
/// (not the permutes and shuffles, which read their whole operand).
/// `masked_native` checks every form against the CPU on an AVX-512 host.
pub(super) fn is_masked_access(instr: &Instruction) -> bool {
    use Mnemonic as M;
    if matches!(
        instr.mnemonic(),
        M::Vmaskmovps | M::Vmaskmovpd | M::Vpmaskmovd | M::Vpmaskmovq
    ) {
        return true;
    }
    instr.op_mask() != Register::None && !instr.is_vsib() && selection(instr) != Selection::Whole
}

/// XCR0 bits a VEX instruction needs (SSE and AVX state), and those an
/// EVEX one needs besides (opmask, ZMM_Hi256, Hi16_ZMM): SDM vol. 2, 2.8
/// and 2.9, exception classes: #UD unless all are set.
const XCR0_VEX: u64 = 0b110;
const XCR0_EVEX: u64 = 0b1110_0110;

/// The #UD/#NM checks of CR0.EM/TS, CR4.OSFXSR/OSXSAVE and the guest's
/// XCR0 that precede any memory access of an x87/SSE/AVX instruction.
pub(super) fn check_vector_enabled(
    cpu: &CpuState,
    instr: &Instruction,
    class: Class,
    vec: &mut dyn VectorState,
) -> Result<(), Stop> {
    if !class.vector {
        return Ok(());
    }
    let em = cpu.cr0 & CR0_EM != 0;
    let ts = cpu.cr0 & CR0_TS != 0;
    if class.x87_mmx {
        let mmx = instr.cpuid_features().contains(&CpuidFeature::MMX);
        if em {
            return Err(if mmx {
                Exception::ud()
            } else {
                Exception::nm()
            }
            .into());
        }
    } else if !class.vex {
        // Legacy SSE only: VEX/EVEX forms ignore CR0.EM and CR4.OSFXSR
        // (SDM vol. 2, table 2-21, and kvm-unit-tests' xsave test, which
        // runs VZEROALL with OSFXSR clear).
        if em || cpu.cr4 & CR4_OSFXSR == 0 {
            return Err(Exception::ud().into());
        }
    } else {
        if cpu.cr4 & CR4_OSXSAVE == 0 {
            return Err(Exception::ud().into());
        }
        // The stub runs under the host's XCR0: a component the guest
        // turned off must fault here, as it would on the guest's CPU.
        let needed = if instr.encoding() == EncodingKind::EVEX {
            XCR0_EVEX
        } else {
            XCR0_VEX
        };
        if !vec.xcr0_checked_natively() && vec.xcr0()? & needed != needed {
            return Err(Exception::ud().into());
        }
    }
    if ts {
        return Err(Exception::nm().into());
    }
    Ok(())
}
