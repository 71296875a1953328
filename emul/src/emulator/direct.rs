//! MOVDIR64B: 64 bytes from a memory operand to ES:rReg as one 64-byte
//! direct store. A pure data move, completed without a stub: the source is
//! read piece by piece (the SDM gives its load no atomicity), the
//! destination is written with one 64-byte [`Platform::write_phys`], the
//! nearest a device on the MMIO bus gets to the CPU's single 64-byte
//! write transaction.
//!
//! A host without MOVDIR64B gives the guest #UD, as the stub does for every
//! other instruction the host lacks: this VMM hands the guest the host's
//! CPUID leaf 7, so the guest's CPUID.07H.0H:ECX.MOVDIR64B\[bit 28\] is 0
//! there, which is the SDM's #UD condition. (The emulator could copy the
//! bytes anywhere, but no guest on such a host can rely on the instruction.)
//!
//! Fault order. The SDM's exception lists (vol. 2B, MOVDIR64B) name the
//! faults but no order among them. Measured on the host CPU
//! (`stub::tests::movdir64b_fault_order_on_the_host`, Intel Xeon family 6
//! model 207): the source is checked and walked before anything about the
//! destination, as the SDM's Operation reads (`DEST := SRC`), so a source
//! #PF wins over a misaligned or non-canonical destination; a misaligned
//! destination is #GP(0) even on a missing page. So:
//! 1. the source as a read: #GP(0)/#SS(0) (segment, canonical), then #PF
//!    on either of its pages (it may cross one);
//! 2. the destination: #GP(0) when not 64-byte aligned, or outside ES's
//!    limit, not writable or non-canonical (all #GP(0): their order does
//!    not show);
//! 3. the destination's walk as a write: #PF with W set.
//!
//! Nothing is written before all of them passed.

use iced_x86::{Instruction, Mnemonic, OpAccess, Register};

use super::{Emulator, Stop};
use crate::address::{gpr_value, linear_address, linear_from_effective};
use crate::cpu::CpuState;
use crate::exception::Exception;
use crate::paging::{translate, translate_span, Access};
use crate::platform::Platform;

/// The size of MOVDIR64B's source and of its store.
const DIRECT_STORE_SIZE: usize = 64;

/// Whether `m` is one of this module's instructions.
pub(crate) fn is_direct_store_64(m: Mnemonic) -> bool {
    m == Mnemonic::Movdir64b
}

/// CPUID.07H.0H:ECX.MOVDIR64B\[bit 28\] of the host.
pub(crate) fn host_has_movdir64b() -> bool {
    use core::arch::x86_64::__cpuid_count;
    __cpuid_count(0, 0).eax >= 7 && __cpuid_count(7, 0).ecx & (1 << 28) != 0
}

impl Emulator {
    /// Completes MOVDIR64B (RIP is advanced by the caller).
    pub(super) fn direct_store_64(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        instr: &Instruction,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        if !self.host_movdir64b {
            return Err(Exception::ud().into());
        }
        // iced names the destination register at the address size (r16,
        // r32 or r64; the 32-bit form is zero-extended in 64-bit mode).
        let dest_reg = instr.op0_register();
        let dest_ea = match dest_reg.size() {
            2 | 4 | 8 => gpr_value(&cpu.gprs, dest_reg).unwrap_or(0),
            _ => return Err(Stop::Unsupported("destination is not a register")),
        };
        // The source: the one memory operand iced reports as read.
        let info = self.info.info(instr);
        let Some(&src) = info
            .used_memory()
            .iter()
            .find(|u| u.access() == OpAccess::Read)
        else {
            return Err(Stop::Unsupported("no source operand"));
        };
        let user = cpu.cpl == 3;
        let read = Access {
            write: false,
            fetch: false,
            user,
        };
        let src_lin = linear_address(cpu, bitness, &src, DIRECT_STORE_SIZE as u64, false)?;
        let source = translate_span(cpu, src_lin, DIRECT_STORE_SIZE, bitness != 64, read, mem)?;

        // The SDM asks for an aligned register value; outside 64-bit mode
        // ES's base is added too, and a base off a 64-byte boundary would
        // make the one 64-byte store straddle lines (and maybe pages), so
        // it is refused the same way (as Xen does: it checks the linear
        // address). In 64-bit mode ES's base is 0 and both are the same.
        let es_base = if bitness == 64 { 0 } else { cpu.es.base };
        if (dest_ea | es_base) & (DIRECT_STORE_SIZE as u64 - 1) != 0 {
            return Err(Exception::gp0().into());
        }

        let dest_lin = linear_from_effective(
            cpu,
            bitness,
            Register::ES,
            dest_ea,
            DIRECT_STORE_SIZE as u64,
            true,
        )?;
        let write = Access {
            write: true,
            fetch: false,
            user,
        };
        let dest_gpa = translate(cpu, dest_lin, write, mem)?;

        let mut data = [0u8; DIRECT_STORE_SIZE];
        let mut at = 0;
        for (gpa, n) in source.into_iter().filter(|&(_, n)| n != 0) {
            mem.read_phys(gpa, &mut data[at..at + n])?;
            at += n;
        }
        mem.write_phys(dest_gpa, &data)?;
        Ok(())
    }
}
