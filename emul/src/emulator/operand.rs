//! The explicit memory operand: which bytes it covers, their translation
//! page by page (skipping pages that hold no mask-selected element), and
//! the write-back of exactly the bytes the instruction stored.

use iced_x86::{Instruction, Mnemonic, OpAccess, Register, UsedMemory};

use super::{Emulator, Stop, MAX_OPERAND, PAGE_SIZE};
use crate::address::linear_address;
use crate::classify::Class;
use crate::cpu::CpuState;
use crate::paging::{translate, Access};
use crate::platform::{Platform, VectorState};
use crate::writeback::{masked_store, ElementMask};

/// The memory operand of the instruction being emulated, once translated.
#[derive(Debug, Clone, Copy)]
pub(super) struct Operand {
    pub(super) lin: u64,
    pub(super) size: usize,
    /// Guest-physical address and length of each page piece.
    pub(super) pieces: [(u64, usize); 2],
    pub(super) reads: bool,
    pub(super) writes: bool,
    /// Only some elements are written (masked store).
    pub(super) masked: bool,
    /// Page pieces holding no mask-selected element: never translated nor
    /// accessed (AVX-512 and VMASKMOV suppress faults on masked-out
    /// elements).
    pub(super) skip: [bool; 2],
}

impl Emulator {
    /// The instruction's one memory access, if any.
    pub(super) fn used_memory(&mut self, instr: &Instruction) -> Result<Option<UsedMemory>, Stop> {
        let info = self.info.info(instr);
        match info.used_memory() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            _ => Err(Stop::Unsupported("several memory accesses")),
        }
    }

    /// Finds, checks and translates the memory operand (before anything
    /// runs, so a fault has no side effect); alignment first, as the CPU
    /// checks it before it touches memory (`alignment.rs`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn operand(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        instr: &Instruction,
        class: Class,
        used: Option<UsedMemory>,
        selected: Option<ElementMask>,
        vec: &mut dyn VectorState,
        mem: &mut dyn Platform,
    ) -> Result<Option<Operand>, Stop> {
        let Some(used) = used else {
            return Ok(None);
        };
        let (reads, writes, masked) = match used.access() {
            OpAccess::Read | OpAccess::CondRead => (true, false, false),
            OpAccess::Write => (false, true, false),
            OpAccess::CondWrite => (false, true, true),
            OpAccess::ReadWrite | OpAccess::ReadCondWrite => (true, true, false),
            _ => return Err(Stop::Unsupported("memory operand without access")),
        };
        // iced reports the VEX masked stores' memory operand as a plain
        // write; only the mask-selected elements may reach memory.
        let masked = masked
            || (writes
                && matches!(
                    instr.mnemonic(),
                    Mnemonic::Vmaskmovps
                        | Mnemonic::Vmaskmovpd
                        | Mnemonic::Vpmaskmovd
                        | Mnemonic::Vpmaskmovq
                ));
        if masked
            && instr.op_mask() == Register::None
            && !matches!(
                instr.mnemonic(),
                Mnemonic::Vmaskmovps
                    | Mnemonic::Vmaskmovpd
                    | Mnemonic::Vpmaskmovd
                    | Mnemonic::Vpmaskmovq
            )
        {
            return Err(Stop::Unsupported("conditional store of unknown kind"));
        }
        let size = used.memory_size().size();
        if size == 0 || size > MAX_OPERAND {
            return Err(Stop::Unsupported("memory operand size"));
        }
        let lin = linear_address(cpu, bitness, &used, size as u64, writes)?;
        self.check_alignment_first(cpu, instr, class, lin, size, vec)?;
        let access = Access {
            write: writes,
            fetch: false,
            user: cpu.cpl == 3,
        };
        let first = size.min((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize);
        let mut pieces = [(0u64, 0usize); 2];
        let mut skip = [false; 2];
        // Only pages holding a selected element are walked: a masked-out
        // element on an unmapped page does not fault, as on hardware. The
        // walk starts at the first selected byte, which is the address a
        // fault reports (measured on AMD EPYC Zen 3: VMASKMOVPS with only
        // element 1 selected on an unmapped page faults with CR2 at that
        // element, not at the operand's start; tests/tests/masked_native.rs).
        let wrap = |a: u64| if bitness == 64 { a } else { a & 0xffff_ffff };
        let mut walk = |from: usize, to: usize| -> Result<Option<u64>, Stop> {
            let at = match selected {
                None => from,
                Some(m) => match m.first_selected(from, to) {
                    Some(at) => at,
                    None => return Ok(None),
                },
            };
            let gpa = translate(cpu, wrap(lin.wrapping_add(at as u64)), access, mem)?;
            Ok(Some(gpa - (at - from) as u64))
        };
        match walk(0, first)? {
            Some(gpa) => pieces[0] = (gpa, first),
            None => {
                pieces[0] = (0, first);
                skip[0] = true;
            }
        }
        if first < size {
            // Intel reports a masked store split across the two pages at
            // its last selected byte (masked_native on Sapphire Rapids:
            // `vmovups [page-8]{k1}, xmm1` with k1 = 0xf faults at page+7).
            let split_store = writes
                && self.shape.split_store_cr2_last
                && selected.is_some_and(|m| m.selects_any(0, first));
            let last = selected
                .filter(|_| split_store)
                .and_then(|m| m.last_selected(first, size));
            if let Some(last) = last {
                let gpa = translate(cpu, wrap(lin.wrapping_add(last as u64)), access, mem)?;
                pieces[1] = (gpa - (last - first) as u64, size - first);
            } else {
                match walk(first, size)? {
                    Some(gpa) => pieces[1] = (gpa, size - first),
                    None => {
                        pieces[1] = (0, size - first);
                        skip[1] = true;
                    }
                }
            }
        }
        Ok(Some(Operand {
            lin,
            size,
            pieces,
            reads,
            writes,
            masked,
            skip,
        }))
    }

    /// Writes the bytes the instruction stored back to guest memory.
    pub(super) fn write_back(
        &mut self,
        instr: &Instruction,
        op: &Operand,
        bounce_off: usize,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let mut bytes = [0u8; MAX_OPERAND];
        bytes[..op.size].copy_from_slice(&self.stub.bounce()[bounce_off..bounce_off + op.size]);
        if !op.masked {
            return write_range(op, &bytes, 0, op.size, mem);
        }
        let mask = masked_store(instr, self.stub.guest_xsave(), self.layout)
            .ok_or(Stop::Unsupported("masked store without mask"))?;
        let es = mask.element_size;
        let count = op.size / es;
        // Merge runs of selected elements into one write each.
        let mut i = 0;
        while i < count {
            if mask.bits >> i & 1 == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < count && mask.bits >> i & 1 != 0 {
                i += 1;
            }
            write_range(op, &bytes, start * es, i * es, mem)?;
        }
        Ok(())
    }
}

/// Writes operand bytes `from..to` to the pieces they fall in.
fn write_range(
    op: &Operand,
    bytes: &[u8],
    from: usize,
    to: usize,
    mem: &mut dyn Platform,
) -> Result<(), Stop> {
    let mut piece_start = 0;
    for (&(gpa, n), skip) in op.pieces.iter().zip(op.skip) {
        let (lo, hi) = (from.max(piece_start), to.min(piece_start + n));
        if lo < hi && !skip {
            mem.write_phys(gpa + (lo - piece_start) as u64, &bytes[lo..hi])?;
        }
        piece_start += n;
    }
    Ok(())
}
