//! Alignment before anything else: the CPU checks an aligned-only form's
//! operand (MOVAPS, ADDPS m128, VMOVDQA, CMPXCHG16B, FXSAVE...) before it
//! walks the page tables or touches memory, so a misaligned one raises
//! #GP(0) with no #PF, no accessed bit set and no device read (measured on
//! the host: `stub::tests::alignment_comes_before_the_walk`).
//!
//! Rather than keep a table of aligned-only forms, the instruction runs
//! once on a zeroed operand at the same offset modulo 64 and its #GP is
//! kept; its results are discarded. Zeros pass every data-dependent check
//! (LDMXCSR's reserved bits, XRSTOR's header), so only the alignment check
//! can fire. A form that ran misaligned once is remembered, so a
//! misaligned MOVUPS pays the probe once, not per access (not while AMD's
//! MXCSR.MM is set: legacy SSE forms then run misaligned, and would be
//! remembered wrongly once the guest clears it). The whole-state family
//! (`state.rs`) makes the same check before its own walks.

use iced_x86::{Code, Instruction};

use super::{Emulator, Stop, BOUNCE_BASE};
use crate::classify::Class;
use crate::cpu::{CpuState, RFLAGS_AC};
use crate::exception::{Exception, VEC_GP};
use crate::platform::VectorState;
use crate::stub::{StubRunError, MAX_INSN_LEN};

/// Where MXCSR sits in an XSAVE image; its bit 17 is AMD's MM
/// (misaligned SSE mode).
const MXCSR: usize = 24;

/// What a run on a zeroed, misaligned operand showed.
pub(super) enum Probe {
    /// #GP(0): an aligned-only form.
    Gp,
    /// No #GP, with the guest's MXCSR.MM as it was (vector forms).
    Ran { mxcsr_mm: bool },
}

/// A set of instruction forms (iced-x86 `Code`s), one bit each.
pub(super) struct FormSet(Box<[u64]>);

impl FormSet {
    pub(super) fn new() -> Self {
        FormSet(vec![0; Code::values().count().div_ceil(64)].into_boxed_slice())
    }

    fn contains(&self, code: Code) -> bool {
        let i = code as usize;
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 != 0)
    }

    fn insert(&mut self, code: Code) {
        let i = code as usize;
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
}

impl Emulator {
    /// #GP(0) before the walk when `instr`'s operand of `size` bytes at
    /// `lin` (16 bytes or more: smaller operands are never aligned-only)
    /// is misaligned and the form is aligned-only.
    pub(super) fn check_alignment_first(
        &mut self,
        cpu: &CpuState,
        instr: &Instruction,
        class: Class,
        lin: u64,
        size: usize,
        vec: &mut dyn VectorState,
    ) -> Result<(), Stop> {
        let size = size as u64;
        if size < 16 || lin & (size.min(64) - 1) == 0 || self.misaligned_ok.contains(instr.code()) {
            return Ok(());
        }
        match self.probe_alignment(cpu, instr, class, lin, vec) {
            Some(Probe::Gp) => Err(Exception::gp0().into()),
            // Under AMD's MXCSR.MM legacy SSE forms run misaligned; the
            // answer only holds while it is set, so it is not remembered.
            Some(Probe::Ran { mxcsr_mm: true }) => Ok(()),
            // Any other outcome (no fault, #XM on the zeros, #UD where the
            // host lacks the form) means the alignment check passed.
            Some(Probe::Ran { mxcsr_mm: false }) => {
                self.misaligned_ok.insert(instr.code());
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The exception for an operand whose page walk failed with `pf`:
    /// #GP(0) instead where the form is aligned-only and the operand at
    /// `lin` misaligned (an operand under 16 bytes, which the check above
    /// skips, comes here too).
    pub(super) fn fault_before_walk(
        &mut self,
        cpu: &CpuState,
        instr: &Instruction,
        class: Class,
        lin: u64,
        pf: Exception,
        vec: &mut dyn VectorState,
    ) -> Exception {
        match self.probe_alignment(cpu, instr, class, lin, vec) {
            Some(Probe::Gp) => Exception::gp0(),
            _ => pf,
        }
    }

    /// Runs `instr` once on a zeroed operand at `lin`'s offset modulo 64;
    /// `None` if it could not run (no image, no stub copy) or `lin` is
    /// aligned to 64.
    pub(super) fn probe_alignment(
        &mut self,
        cpu: &CpuState,
        instr: &Instruction,
        class: Class,
        lin: u64,
        vec: &mut dyn VectorState,
    ) -> Option<Probe> {
        if lin & 63 == 0 {
            return None;
        }
        let off = BOUNCE_BASE + (lin & 63) as usize;
        let mut code = [0u8; MAX_INSN_LEN];
        let target = self.stub.bounce_exec_addr() + off as u64;
        let len = self.reencode(instr, Some(target), &mut code).ok()?;
        self.stub.bounce_mut().fill(0);
        let mut gprs = cpu.gprs;
        gprs.rflags &= !RFLAGS_AC;
        let mut mxcsr_mm = false;
        let ran = if class.vector {
            let image = vec.image().ok()?;
            mxcsr_mm = image.get(MXCSR + 2).is_some_and(|b| b & 0x02 != 0);
            self.stub.load_guest_image(image);
            self.stub.run_with_vector(&code[..len], &mut gprs)
        } else {
            self.stub.run(&code[..len], &mut gprs)
        };
        Some(match ran {
            Err(StubRunError::Fault(f)) if f.vector == VEC_GP => Probe::Gp,
            _ => Probe::Ran { mxcsr_mm },
        })
    }
}
