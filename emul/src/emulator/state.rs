//! Whole-state and x87 environment instructions: FXSAVE/FXRSTOR(64),
//! XSAVE/XSAVEOPT/XSAVEC/XRSTOR(64), FNSTENV/FLDENV and FNSAVE/FRSTOR.
//!
//! Their operands are large (14 bytes to a few KiB) and how much of it they
//! touch depends on state: XSAVE's requested-feature bitmap (EDX:EAX and the
//! guest's XCR0), XSAVEC's compaction, XRSTOR's header. The instruction still
//! runs natively in the stub against the bounce buffer, at the guest
//! address's offset modulo 64, so alignment faults and the layouts are the
//! CPU's own; around it:
//!
//! - the stub runs under the host's XCR0, so EDX:EAX is narrowed to the
//!   guest's XCR0 (and XRSTOR's header is checked against it) before the
//!   run;
//! - which bytes a save writes is found by running it twice over two
//!   different fills of the bytes it does not read: a byte that comes out
//!   the same both times was written. Only those are written back, so a
//!   device behind the MMIO bus sees exactly the CPU's stores.
//!
//! Real-mode and virtual-8086 layouts of the x87 environment differ from
//! the protected-mode one the stub (64-bit code) produces: refused there.

use iced_x86::{Instruction, Mnemonic};

use super::{map_run, Emulator, Stop, BOUNCE_BASE, PAGE_SIZE};
use crate::address::linear_address;
use crate::classify::Class;
use crate::cpu::{CpuState, CR0_EM, CR0_PE, CR0_TS, CR4_OSXSAVE};
use crate::exception::Exception;
use crate::paging::{translate, Access};
use crate::platform::{Platform, VectorState};
use crate::stub::shape::{StateChecks, StateClass};
use crate::stub::{
    BOUNCE_SIZE, MAX_INSN_LEN, VECTOR_XFEATURES, XSAVE_AREA_SIZE, XSAVE_HEADER_OFFSET,
};

/// The legacy region and the XSAVE header: the least an XSAVE area covers.
const LEGACY_AND_HEADER: usize = XSAVE_HEADER_OFFSET + 64;
/// XCOMP_BV bit 63: the area is in the compacted format.
const XCOMP_COMPACTED: u64 = 1 << 63;

/// Where each XSAVE component lives (host CPUID leaf 0xD; the guest runs
/// on the same CPU, and KVM's image uses the same standard layout).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StateLayout {
    /// (offset in the standard format, size, 64-byte aligned when
    /// compacted) of components 2..=9.
    comps: [(usize, usize, bool); 10],
}

impl StateLayout {
    pub(crate) fn from_host() -> Self {
        let mut comps = [(0, 0, false); 10];
        for (i, c) in comps.iter_mut().enumerate().skip(2) {
            let leaf = core::arch::x86_64::__cpuid_count(0xd, i as u32);
            *c = (leaf.ebx as usize, leaf.eax as usize, leaf.ecx & 2 != 0);
        }
        StateLayout { comps }
    }

    /// Size of a standard-format area holding the components in `rfbm`.
    fn standard_size(&self, rfbm: u64) -> usize {
        (2..10)
            .filter(|&i| rfbm >> i & 1 != 0)
            .map(|i| self.comps[i].0 + self.comps[i].1)
            .fold(LEGACY_AND_HEADER, usize::max)
    }

    /// Size of a compacted-format area holding the components in `bv`.
    fn compacted_size(&self, bv: u64) -> usize {
        let mut end = LEGACY_AND_HEADER;
        for i in (2..10).filter(|&i| bv >> i & 1 != 0) {
            let (_, size, align) = self.comps[i];
            if align {
                end = end.next_multiple_of(64);
            }
            end += size;
        }
        end
    }
}

/// How a whole-state instruction uses its operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// FXSAVE, FNSTENV, FNSAVE, XSAVEC: writes only.
    Save,
    /// XSAVE, XSAVEOPT: writes, after reading the header's XSTATE_BV.
    SaveMerging,
    /// FXRSTOR, FLDENV, FRSTOR, XRSTOR: reads only.
    Restore,
}

/// The operand of a whole-state instruction once sized.
struct StateOperand {
    shape: Shape,
    size: usize,
    /// The requested-feature bitmap for the XSAVE family.
    rfbm: Option<u64>,
}

impl Emulator {
    /// Completes a whole-state or x87 environment instruction (RIP is
    /// advanced by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn whole_state(
        &mut self,
        cpu: &mut CpuState,
        bitness: u32,
        instr: &Instruction,
        class: Class,
        vec: &mut dyn VectorState,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        use Mnemonic as M;
        let m = instr.mnemonic();
        let xsave_family = matches!(
            m,
            M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 | M::Xsavec | M::Xsavec64
        ) || matches!(m, M::Xrstor | M::Xrstor64);
        // #UD/#NM before anything touches memory.
        if xsave_family {
            if cpu.cr4 & CR4_OSXSAVE == 0 {
                return Err(Exception::ud().into());
            }
        } else if cpu.cr0 & CR0_EM != 0 {
            return Err(Exception::nm().into());
        }
        if cpu.cr0 & CR0_TS != 0 {
            return Err(Exception::nm().into());
        }
        if class.x87_mmx && cpu.cr0 & CR0_PE == 0 {
            return Err(Stop::Unsupported(
                "x87 environment in real mode (layout differs from the stub's)",
            ));
        }
        let used = self
            .used_memory(instr)?
            .ok_or(Stop::Unsupported("whole-state instruction without memory"))?;
        let rfbm = if xsave_family {
            let requested = (cpu.gprs.rdx << 32) | (cpu.gprs.rax & 0xffff_ffff);
            let rfbm = requested & vec.xcr0()?;
            if rfbm & !VECTOR_XFEATURES != 0 {
                return Err(Stop::Unsupported(
                    "XSAVE of a component the VMM does not switch (PKRU, AMX)",
                ));
            }
            Some(rfbm)
        } else {
            None
        };
        let mut op = match m {
            M::Fxsave | M::Fxsave64 => (Shape::Save, 512),
            M::Fxrstor | M::Fxrstor64 => (Shape::Restore, 512),
            M::Fnstenv | M::Fstenv | M::Fnsave | M::Fsave => {
                (Shape::Save, used.memory_size().size())
            }
            M::Fldenv | M::Frstor => (Shape::Restore, used.memory_size().size()),
            M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 => (
                Shape::SaveMerging,
                self.state_layout.standard_size(rfbm.unwrap_or(0)),
            ),
            M::Xsavec | M::Xsavec64 => (
                Shape::Save,
                self.state_layout.compacted_size(rfbm.unwrap_or(0)),
            ),
            // Sized from the header below.
            M::Xrstor | M::Xrstor64 => (Shape::Restore, LEGACY_AND_HEADER),
            _ => return Err(Stop::Unsupported("not a whole-state instruction")),
        };
        if op.1 == 0 {
            return Err(Stop::Unsupported("whole-state operand of unknown size"));
        }
        let lin = linear_address(cpu, bitness, &used, op.1 as u64, op.0 != Shape::Restore)?;
        let bounce_off = BOUNCE_BASE + (lin & 63) as usize;
        // Alignment before any walk or access (`alignment.rs`): FXSAVE and
        // FXRSTOR want 16 bytes, the XSAVE family 64, the x87 environments
        // nothing; the CPU itself decides, in a run on zeros.
        let align = match m {
            M::Fxsave | M::Fxsave64 | M::Fxrstor | M::Fxrstor64 => 16,
            M::Fnstenv | M::Fstenv | M::Fnsave | M::Fsave | M::Fldenv | M::Frstor => 1,
            _ => 64,
        };
        if lin & (align - 1) != 0 {
            if let Some(super::alignment::Probe::Gp) =
                self.probe_alignment(cpu, instr, class, lin, vec)
            {
                return Err(Exception::gp0().into());
            }
        }
        // The bytes the host CPU checks before the rest (so a fault reports
        // the CR2 it would): measured per class by the shape probes.
        let state_class = match m {
            M::Fxsave | M::Fxsave64 | M::Fxrstor | M::Fxrstor64 => StateClass::Fx,
            M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 | M::Xsavec | M::Xsavec64 => {
                StateClass::Xsave
            }
            M::Xrstor | M::Xrstor64 => StateClass::Xrstor,
            _ => StateClass::X87Env,
        };
        let mut checks = self.shape.state_checks[state_class as usize];
        if state_class == StateClass::Xrstor && checks.first {
            // XRSTOR checks its first byte before it reads the header.
            let first_only = StateChecks {
                first: true,
                ..Default::default()
            };
            if let Err(e) = self.check_state_bytes(cpu, lin, op.1, false, first_only, mem) {
                return Err(self.state_fault(cpu, instr, class, lin, e, vec));
            }
            checks.first = false;
        }

        // XRSTOR: the header decides the format, the size and whether the
        // guest's XCR0 allows the request (the stub's host XCR0 may not
        // fault where the guest's CPU would).
        if matches!(m, M::Xrstor | M::Xrstor64) {
            let mut header = [0u8; 64];
            if lin & 63 == 0 {
                let hdr_lin = lin.wrapping_add(XSAVE_HEADER_OFFSET as u64);
                let pieces = self.walk(cpu, hdr_lin, 64, false, mem)?;
                read_pieces(&pieces, &mut header, mem)?;
            }
            let word = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap_or([0; 8]));
            let (xstate_bv, xcomp_bv) = (word(0), word(8));
            let xcr0 = vec.xcr0()?;
            if xcomp_bv & XCOMP_COMPACTED != 0 {
                if xcomp_bv & !(xcr0 | XCOMP_COMPACTED) != 0 || xstate_bv & !xcomp_bv != 0 {
                    return Err(Exception::gp0().into());
                }
                op.1 = self
                    .state_layout
                    .compacted_size(xcomp_bv & !XCOMP_COMPACTED);
            } else {
                if xstate_bv & !xcr0 != 0 {
                    return Err(Exception::gp0().into());
                }
                op.1 = self.state_layout.standard_size(rfbm.unwrap_or(0));
            }
        }
        let op = StateOperand {
            shape: op.0,
            size: op.1,
            rfbm,
        };
        if bounce_off + op.size > BOUNCE_SIZE || op.size > 2 * PAGE_SIZE as usize {
            return Err(Stop::Unsupported(
                "whole-state operand larger than the bounce buffer",
            ));
        }

        let write = op.shape != Shape::Restore;
        let walked = self
            .check_state_bytes(cpu, lin, op.size, write, checks, mem)
            .and_then(|()| self.walk(cpu, lin, op.size, write, mem));
        let pieces = match walked {
            Ok(p) => p,
            Err(e) => return Err(self.state_fault(cpu, instr, class, lin, e, vec)),
        };

        let mut code = [0u8; MAX_INSN_LEN];
        let target = self.stub.bounce_exec_addr() + bounce_off as u64;
        let len = self
            .reencode(instr, Some(target), &mut code)
            .map_err(Stop::Unsupported)?;
        let mut gprs = cpu.gprs;
        if let Some(rfbm) = op.rfbm {
            gprs.rax = rfbm & 0xffff_ffff;
            gprs.rdx = rfbm >> 32;
        }
        // AC only where the guest's CPU checks alignment (see execute).
        if !(cpu.cpl == 3
            && cpu.cr0 & crate::cpu::CR0_AM != 0
            && cpu.gprs.rflags & crate::cpu::RFLAGS_AC != 0)
        {
            gprs.rflags &= !crate::cpu::RFLAGS_AC;
        }

        let image = vec.image()?;
        let n = image.len().min(XSAVE_AREA_SIZE);
        let range = bounce_off..bounce_off + op.size;
        // The bytes the guest's memory supplies: all of them for a restore,
        // the header's XSTATE_BV for a merging save, none otherwise.
        let mut staged = [0u8; 2 * PAGE_SIZE as usize];
        let staged = &mut staged[..op.size];
        match op.shape {
            Shape::Restore => read_pieces(&pieces, staged, mem)?,
            Shape::SaveMerging => {
                let hdr = XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8;
                read_range(&pieces, staged, hdr, mem)?;
            }
            Shape::Save => {}
        }
        let is_read = |i: usize| match op.shape {
            Shape::Restore => true,
            Shape::SaveMerging => (XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8).contains(&i),
            Shape::Save => false,
        };

        // One run per fill of the unread bytes (two for a save).
        let runs: &[u8] = if op.shape == Shape::Restore {
            &[0]
        } else {
            &[0x00, 0xff]
        };
        let mut first = [0u8; 2 * PAGE_SIZE as usize];
        for (k, &fill) in runs.iter().enumerate() {
            {
                let bounce = &mut self.stub.bounce_mut()[range.clone()];
                for (i, b) in bounce.iter_mut().enumerate() {
                    *b = if is_read(i) { staged[i] } else { fill };
                }
            }
            let area = self.stub.guest_xsave_mut();
            area[..n].copy_from_slice(&image[..n]);
            area[n..].fill(0);
            let mut g = gprs;
            let ran = self.stub.run_with_vector(&code[..len], &mut g);
            map_run(cpu, ran)?;
            if k == 0 {
                first[..op.size].copy_from_slice(&self.stub.bounce()[range.clone()]);
            }
        }
        let after = &self.stub.guest_xsave()[..n];
        if crate::xstate::registers_differ(&image[..n], after) {
            image[..n].copy_from_slice(after);
            crate::xstate::keep_mxcsr(&mut image[..n]);
            vec.mark_dirty();
        }

        if op.shape != Shape::Restore {
            let second = &self.stub.bounce()[range];
            // Runs of written bytes, each stored with one platform write
            // per page piece.
            let written = |i: usize| first[i] == second[i];
            let mut i = 0;
            while i < op.size {
                if !written(i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < op.size && written(i) {
                    i += 1;
                }
                write_range(&pieces, &second[start..i], start, mem)?;
            }
        }
        // The instruction changes no GPR or flag.
        Ok(())
    }

    /// Translates the operand bytes the host CPU checks before the rest
    /// (its first and last byte, in the measured order).
    fn check_state_bytes(
        &mut self,
        cpu: &CpuState,
        lin: u64,
        size: usize,
        write: bool,
        checks: StateChecks,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let access = Access {
            write,
            fetch: false,
            user: cpu.cpl == 3,
        };
        let last = lin.wrapping_add(size.saturating_sub(1) as u64);
        let order = [
            (checks.last_first, last),
            (checks.first, lin),
            (checks.last_after_first, last),
        ];
        for (on, addr) in order {
            if on {
                translate(cpu, addr, access, mem)?;
            }
        }
        Ok(())
    }

    /// A walk's fault, after the checks hardware makes before any walk
    /// (alignment).
    fn state_fault(
        &mut self,
        cpu: &CpuState,
        instr: &Instruction,
        class: Class,
        lin: u64,
        stop: Stop,
        vec: &mut dyn VectorState,
    ) -> Stop {
        match stop {
            Stop::Exception(pf) => self
                .fault_before_walk(cpu, instr, class, lin, pf, vec)
                .into(),
            other => other,
        }
    }

    /// Translates `size` bytes at `lin` page by page (at most 3 pieces).
    fn walk(
        &mut self,
        cpu: &CpuState,
        lin: u64,
        size: usize,
        write: bool,
        mem: &mut dyn Platform,
    ) -> Result<[(u64, usize); 3], Stop> {
        let access = Access {
            write,
            fetch: false,
            user: cpu.cpl == 3,
        };
        let mut pieces = [(0u64, 0usize); 3];
        let mut at = 0usize;
        for p in pieces.iter_mut() {
            if at == size {
                break;
            }
            let addr = lin.wrapping_add(at as u64);
            let n = (size - at).min((PAGE_SIZE - (addr & (PAGE_SIZE - 1))) as usize);
            *p = (translate(cpu, addr, access, mem)?, n);
            at += n;
        }
        Ok(pieces)
    }
}

/// Reads the whole operand from its pieces.
fn read_pieces(
    pieces: &[(u64, usize); 3],
    out: &mut [u8],
    mem: &mut dyn Platform,
) -> Result<(), Stop> {
    let len = out.len();
    read_range(pieces, out, 0..len, mem)
}

/// Reads operand bytes `range` from the pieces they fall in.
fn read_range(
    pieces: &[(u64, usize); 3],
    out: &mut [u8],
    range: core::ops::Range<usize>,
    mem: &mut dyn Platform,
) -> Result<(), Stop> {
    let mut start = 0;
    for &(gpa, n) in pieces {
        let (lo, hi) = (range.start.max(start), range.end.min(start + n));
        if lo < hi {
            mem.read_phys(gpa + (lo - start) as u64, &mut out[lo..hi])?;
        }
        start += n;
    }
    Ok(())
}

/// Writes `bytes`, operand bytes from `from` on, to the pieces they fall in.
fn write_range(
    pieces: &[(u64, usize); 3],
    bytes: &[u8],
    from: usize,
    mem: &mut dyn Platform,
) -> Result<(), Stop> {
    let to = from + bytes.len();
    let mut start = 0;
    for &(gpa, n) in pieces {
        let (lo, hi) = (from.max(start), to.min(start + n));
        if lo < hi {
            mem.write_phys(gpa + (lo - start) as u64, &bytes[lo - from..hi - from])?;
        }
        start += n;
    }
    Ok(())
}
