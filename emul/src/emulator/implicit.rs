//! Byte-masked stores through an implicit DS:rDI operand: MASKMOVQ (MMX,
//! 8 bytes), MASKMOVDQU and VMASKMOVDQU (16 bytes). Each byte of the data
//! register is stored where the same byte of the mask register has its top
//! bit set.
//!
//! The instruction runs in the stub (so MMX's switch of the x87 tag word
//! and TOP happens as on the CPU) with RDI pointing into the bounce buffer
//! at the guest address's offset modulo 64; only the selected bytes are
//! written back. Each walks its whole destination whatever the mask where
//! the host CPU faults there ([`HostShape`](crate::stub::shape::HostShape);
//! AMD and Intel do), else only the pages holding a selected byte.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::{map_run, Emulator, Stop, BOUNCE_BASE, PAGE_SIZE};
use crate::address::{gpr_value, linear_from_effective};
use crate::cpu::CpuState;
use crate::paging::{translate, Access};
use crate::platform::{Platform, VectorState};
use crate::stub::MAX_INSN_LEN;
use crate::vregs::read_vec;

/// Where MMX register n lives in the legacy region (ST(n)'s mantissa).
const MM0_OFFSET: usize = 32;

/// Whether `m` is one of this module's instructions.
pub(crate) fn is_masked_implicit_store(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Maskmovq | Mnemonic::Maskmovdqu | Mnemonic::Vmaskmovdqu
    )
}

impl Emulator {
    /// Completes a byte-masked implicit store (RIP is advanced by the
    /// caller).
    pub(super) fn masked_implicit_store(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        instr: &Instruction,
        vec: &mut dyn VectorState,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let mmx = instr.mnemonic() == Mnemonic::Maskmovq;
        let size = if mmx { 8 } else { 16 };
        let mask_reg = instr.op_register(2);
        let image = vec.image()?;
        let mask: [u8; 16] = if mmx {
            // The MMX register file aliases the x87 data registers in
            // physical order, which XSAVE's legacy region also uses.
            let off = MM0_OFFSET + 16 * (mask_reg as usize - Register::MM0 as usize);
            let mut m = [0u8; 16];
            m[..8].copy_from_slice(&image[off..off + 8]);
            m
        } else {
            let v = read_vec(image, self.layout, mask_reg);
            let mut m = [0u8; 16];
            m.copy_from_slice(&v[..16]);
            m
        };
        let selected = |i: usize| mask[i] & 0x80 != 0;

        // DS:rDI (a segment override applies), at the address size.
        let (addr_reg, addr_mask) = match instr.op_kind(0) {
            OpKind::MemorySegEDI => (Register::EDI, 0xffff_ffffu64),
            OpKind::MemorySegDI => (Register::DI, 0xffff),
            _ => (Register::RDI, u64::MAX),
        };
        let ea = gpr_value(&cpu.gprs, addr_reg).unwrap_or(0) & addr_mask;
        let lin = linear_from_effective(cpu, bitness, instr.memory_segment(), ea, size, true)?;
        let access = Access {
            write: true,
            fetch: false,
            user: cpu.cpl == 3,
        };
        let first = size.min(PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize;
        let next = lin.wrapping_add(first as u64);
        let mut pieces = [None; 2];
        // (V)MASKMOVDQU and MASKMOVQ fault on their whole destination
        // whatever the mask, as the host CPU does (masked_native: AMD Zen 3
        // with an all-zero mask faults at the first byte of the missing
        // page; Intel Sapphire Rapids, MASKMOVDQU, at RDI + 8 when RDI
        // starts the missing page).
        let unmasked_fault = if mmx {
            self.shape.maskmovq_unmasked_fault
        } else {
            self.shape.maskmovdqu_unmasked_fault
        };
        if let Some(at) = unmasked_fault {
            let at = u64::from(at).min(size - 1);
            translate(cpu, lin.wrapping_add(at), access, mem)?;
            pieces[0] = Some(translate(cpu, lin, access, mem)?);
            if first < size as usize {
                pieces[1] = Some(translate(cpu, next, access, mem)?);
            }
        } else {
            if (0..first).any(selected) {
                pieces[0] = Some(translate(cpu, lin, access, mem)?);
            }
            if (first..size as usize).any(selected) {
                pieces[1] = Some(translate(cpu, next, access, mem)?);
            }
        }

        // Run it with RDI at the bounce buffer (64-bit addressing, no
        // segment override: the stub is 64-bit code).
        let off = BOUNCE_BASE + (lin & 63) as usize;
        let mut insn = *instr;
        insn.set_op0_kind(OpKind::MemorySegRDI);
        let mut code = [0u8; MAX_INSN_LEN];
        let len = self
            .reencode(&insn, None, &mut code)
            .map_err(Stop::Unsupported)?;
        self.stub.bounce_mut()[off..off + size as usize].fill(0);
        let mut gprs = cpu.gprs;
        gprs.rdi = self.stub.bounce_exec_addr() + off as u64;
        gprs.rflags &= !crate::cpu::RFLAGS_AC;
        let n = self.stub.load_guest_image(image);
        let ran = self.stub.run_with_vector(&code[..len], &mut gprs);
        map_run(cpu, ran)?;
        let after = &self.stub.guest_xsave()[..n];
        if after != &image[..n] {
            image[..n].copy_from_slice(after);
            vec.mark_dirty();
        }

        // Write back runs of selected bytes, per page piece.
        let stored = &self.stub.bounce()[off..off + size as usize];
        let mut i = 0;
        while i < size as usize {
            if !selected(i) {
                i += 1;
                continue;
            }
            let start = i;
            let piece_end = if i < first { first } else { size as usize };
            while i < piece_end && selected(i) {
                i += 1;
            }
            let (gpa, base) = if start < first {
                (pieces[0], 0)
            } else {
                (pieces[1], first)
            };
            if let Some(gpa) = gpa {
                mem.write_phys(gpa + (start - base) as u64, &stored[start..i])?;
            }
        }
        Ok(())
    }
}
