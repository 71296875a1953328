//! What is special about instructions that touch x87/SSE/AVX state: the
//! #UD/#NM checks before any memory access, which masked forms suppress
//! faults on masked-out elements, and the x87 pointers the stub leaves.

use iced_x86::{CpuidFeature, Instruction, Mnemonic, OpKind, Register, UsedMemory};

use super::operand::Operand;
use super::{Emulator, Stop};
use crate::classify::Class;
use crate::cpu::{CpuState, CR0_EM, CR0_TS, CR4_OSFXSR, CR4_OSXSAVE};
use crate::exception::Exception;
use crate::stub::{BOUNCE_SIZE, STUB_BUF_SIZE};

impl Emulator {
    /// A non-control x87 instruction records its own address (FIP) and its
    /// operand's (FDP) in the x87 state. Run in the stub, those are the
    /// stub's and the bounce buffer's; the guest must see its RIP and its
    /// operand's effective address. (Control instructions leave both
    /// alone, so they still hold the guest's earlier values.)
    pub(super) fn fix_x87_pointers(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        used: Option<UsedMemory>,
        op: Option<Operand>,
    ) {
        // XSAVE64 layout: FIP at 8, FDP at 16.
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
        if stub.contains(&word(area, FIP)) {
            area[FIP..FIP + 8].copy_from_slice(&cpu.rip.to_le_bytes());
        }
        if let (Some(used), Some(op)) = (used, op) {
            if bounce.contains(&word(area, FDP)) {
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

/// A masked access whose mask bits select memory elements one to one, so
/// masked-out elements never fault: EVEX-masked moves, VMASKMOV, and
/// element-wise EVEX arithmetic whose memory operand is a full vector of
/// the destination's element type. Other masked instructions (broadcasts,
/// inserts, shifts by a memory count, conversions, mixed element sizes such
/// as VPMULTISHIFTQB or VPDPBUSD) do not map mask bits to memory elements
/// that way, so their whole operand is translated (`masked-fault-suppression`
/// checks the listed forms against the CPU).
pub(super) fn is_masked_access(instr: &Instruction) -> bool {
    use Mnemonic as M;
    if matches!(
        instr.mnemonic(),
        M::Vmaskmovps | M::Vmaskmovpd | M::Vpmaskmovd | M::Vpmaskmovq
    ) {
        return true;
    }
    if instr.op_mask() == Register::None || instr.is_broadcast() {
        return false;
    }
    let evex_move = matches!(
        instr.mnemonic(),
        M::Vmovdqu8
            | M::Vmovdqu16
            | M::Vmovdqu32
            | M::Vmovdqu64
            | M::Vmovdqa32
            | M::Vmovdqa64
            | M::Vmovups
            | M::Vmovupd
            | M::Vmovaps
            | M::Vmovapd
            | M::Vmovss
            | M::Vmovsd
            | M::Vmovsh
    );
    // Same-type element-wise arithmetic: destination, sources and memory
    // share one element type.
    let elementwise = matches!(
        instr.mnemonic(),
        M::Vaddps
            | M::Vaddpd
            | M::Vsubps
            | M::Vsubpd
            | M::Vmulps
            | M::Vmulpd
            | M::Vdivps
            | M::Vdivpd
            | M::Vminps
            | M::Vminpd
            | M::Vmaxps
            | M::Vmaxpd
            | M::Vpaddb
            | M::Vpaddw
            | M::Vpaddd
            | M::Vpaddq
            | M::Vpsubb
            | M::Vpsubw
            | M::Vpsubd
            | M::Vpsubq
            | M::Vpandd
            | M::Vpandq
            | M::Vpord
            | M::Vporq
            | M::Vpxord
            | M::Vpxorq
            | M::Vpmulld
            | M::Vpmullq
    );
    let full_vector = instr.op_count() > 0
        && instr.op_kind(0) == OpKind::Register
        && instr.op_register(0).size() == instr.memory_size().size();
    evex_move || (elementwise && full_vector)
}

/// The #UD/#NM checks of CR0.EM/TS and CR4.OSFXSR/OSXSAVE that precede
/// any memory access of an x87/SSE/AVX instruction. (The guest's XCR0 is
/// not known here; the host's applies.)
pub(super) fn check_vector_enabled(
    cpu: &CpuState,
    instr: &Instruction,
    class: Class,
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
    } else {
        if em || cpu.cr4 & CR4_OSFXSR == 0 {
            return Err(Exception::ud().into());
        }
        if class.vex && cpu.cr4 & CR4_OSXSAVE == 0 {
            return Err(Exception::ud().into());
        }
    }
    if ts {
        return Err(Exception::nm().into());
    }
    Ok(())
}
