//! The emulator: fetch, decode, classify, translate, stage the operand in
//! the bounce buffer, run the instruction in a stub, write back.

use iced_x86::{
    Decoder, DecoderError, DecoderOptions, Formatter, Instruction, InstructionInfoFactory,
    IntelFormatter, Mnemonic, UsedMemory,
};

use crate::address::linear_address;
use crate::classify::{classify, Class, Kind};
use crate::cpu::{CpuState, CR0_AM, CR4_OSXMMEXCPT, RFLAGS_AC};
use crate::exception::{Exception, VEC_AC, VEC_GP, VEC_PF, VEC_SS, VEC_XM};
use crate::paging::WalkError;
use crate::platform::{Platform, PlatformError, VectorState};
use crate::stub::shape::HostShape;
use crate::stub::{StubBuf, StubError, StubRunError, MAX_INSN_LEN};
use crate::writeback::{element_mask, XsaveLayout};

mod alignment;
mod cache;
mod direct;
mod fetch;
mod gather;
mod implicit;
mod locked;
mod operand;
mod selector;
mod state;
mod vector;

#[cfg(test)]
pub(crate) use direct::host_has_movdir64b;
pub(crate) use direct::is_direct_store_64;
use fetch::{fetch, undecodable};
pub(crate) use gather::is_vsib_move;
pub(crate) use implicit::is_masked_implicit_store;
pub(crate) use selector::is_selector_instruction;
use vector::{check_vector_enabled, is_masked_access};

const PAGE_SIZE: u64 = 4096;
/// Where staged operands start in the bounce buffer; the operand sits at
/// this plus the guest address modulo 64, so alignment faults (#GP for
/// movaps/vmovdqa/cmpxchg16b) happen natively.
const BOUNCE_BASE: usize = 64;
/// The largest memory operand an allowed instruction has (a ZMM register).
const MAX_OPERAND: usize = 64;

/// The result of [`Emulator::emulate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction completed: registers, memory, vector state and RIP
    /// are updated.
    Done {
        /// What completed (for statistics and traces).
        mnemonic: Mnemonic,
    },
    /// Inject this exception; nothing was changed (RIP still points at the
    /// instruction).
    Exception {
        /// Exception vector.
        vector: u8,
        /// Error code, for vectors that push one.
        error_code: Option<u32>,
        /// For #PF: the faulting linear address, to load into CR2.
        cr2: Option<u64>,
    },
    /// The instruction is outside the allow-list (or cannot be staged);
    /// `text` names it in Intel syntax and says why. Nothing was changed.
    Unsupported {
        /// The instruction in Intel syntax and why it was refused.
        text: String,
    },
    /// A memory or vector-state access through the VMM failed.
    Platform(PlatformError),
    /// Another vCPU kept changing memory the instruction depends on (a
    /// page-table entry whose accessed/dirty update, or a locked operand
    /// whose compare-and-exchange, lost the race every time the emulator
    /// tried). RIP is at the instruction and nothing was changed, except
    /// what a fault at the same point keeps (a gather's completed
    /// elements and their cleared mask bits, in the vector state marked
    /// dirty): write the vector state back if dirty and resume the vCPU,
    /// which runs into the instruction again, as the CPU would keep trying.
    Retry,
    /// INT n, INT3 or a taken INTO ([`crate::system`]): GPRs and RIP are
    /// updated (RIP is the return address, past the instruction); the VMM
    /// delivers `vector` through the guest's IDT.
    SoftwareInterrupt {
        /// The IDT vector to deliver.
        vector: u8,
    },
    /// INVPCID completed (RIP updated); the VMM must flush the guest's TLB.
    FlushTlb {
        /// The instruction (for per-mnemonic statistics).
        mnemonic: Mnemonic,
    },
}

impl From<Exception> for Outcome {
    fn from(e: Exception) -> Self {
        Outcome::Exception {
            vector: e.vector,
            error_code: e.error_code,
            cr2: e.cr2,
        }
    }
}

/// Why the emulation path stopped early.
enum Stop {
    Exception(Exception),
    Unsupported(&'static str),
    Platform(PlatformError),
    /// Another vCPU kept winning a race ([`Outcome::Retry`]).
    Contended,
}

impl From<Exception> for Stop {
    fn from(e: Exception) -> Self {
        Stop::Exception(e)
    }
}

impl From<WalkError> for Stop {
    fn from(e: WalkError) -> Self {
        match e {
            WalkError::Fault(x) => Stop::Exception(x),
            WalkError::Platform(p) => Stop::Platform(p),
            WalkError::Contended { .. } => Stop::Contended,
        }
    }
}

impl From<PlatformError> for Stop {
    fn from(e: PlatformError) -> Self {
        Stop::Platform(e)
    }
}

/// Errors setting up an [`Emulator`].
#[derive(Debug, thiserror::Error)]
pub enum EmulError {
    #[error("stub buffer: {0}")]
    /// The stub buffer could not be set up.
    Stub(#[from] StubError),
}

/// The last instruction emulated, decoded, classified and re-encoded.
/// Guests repeat instructions (a loop over MMIO); right after a VM exit the
/// decoder's and encoder's code and tables are cold, so skipping them is
/// most of the host-side cost. Keyed by RIP (RIP-relative operands depend on
/// it), bitness and the instruction's bytes (self-modifying code misses).
#[derive(Clone, Copy)]
struct Decoded {
    rip: u64,
    bitness: u32,
    bytes: [u8; MAX_INSN_LEN],
    instr: Instruction,
    class: Class,
    used: Option<UsedMemory>,
    /// The re-encoded instruction and the bounce offset it targets.
    code: [u8; MAX_INSN_LEN],
    code_len: usize,
    code_for: Option<usize>,
}

impl Decoded {
    fn matches(&self, rip: u64, bitness: u32, insn: &[u8]) -> bool {
        let len = self.instr.len();
        self.rip == rip && self.bitness == bitness && insn.get(..len) == self.bytes.get(..len)
    }
}

/// One vCPU's instruction emulator. Not `Sync`; keep one per vCPU thread.
pub struct Emulator {
    stub: StubBuf,
    info: InstructionInfoFactory,
    /// The bytes of the instruction being completed, which the stub's
    /// copy of it is patched from ([`crate::reencode`]).
    insn_bytes: [u8; MAX_INSN_LEN],
    layout: XsaveLayout,
    state_layout: state::StateLayout,
    last_mnemonic: Mnemonic,
    cached: Option<Decoded>,
    system: crate::system::SystemFeatures,
    /// The host has MOVDIR64B (else the guest gets #UD; see `direct.rs`).
    pub(crate) host_movdir64b: bool,
    /// How the host CPU shapes partial accesses and x87 pointers, which
    /// the emulator reproduces where it completes instructions itself.
    shape: HostShape,
    /// Instruction forms seen to run on a misaligned operand
    /// ([`alignment`]).
    misaligned_ok: alignment::FormSet,
}

impl Emulator {
    /// Reproduce another host's shape (tests replaying one vendor's
    /// measurements on the other's CPU).
    #[cfg(test)]
    pub(crate) fn set_host_shape(&mut self, shape: HostShape) {
        self.shape = shape;
    }

    /// `its_on`: build ITS-safe stubs (see [`crate::stub::detect`]).
    pub fn new(its_on: bool) -> Result<Self, EmulError> {
        let mut stub = StubBuf::new(its_on)?;
        let shape = HostShape::host(&mut stub);
        Ok(Emulator {
            stub,
            shape,
            info: InstructionInfoFactory::new(),
            insn_bytes: [0; MAX_INSN_LEN],
            layout: XsaveLayout::from_host(),
            state_layout: state::StateLayout::from_host(),
            last_mnemonic: Mnemonic::INVALID,
            cached: None,
            system: Default::default(),
            host_movdir64b: direct::host_has_movdir64b(),
            misaligned_ok: alignment::FormSet::new(),
        })
    }

    /// The stub's copy of `instr` (the instruction being completed, or
    /// it with an operand kind changed), its memory operand at the
    /// absolute address `target`: see [`crate::reencode`].
    fn reencode(
        &self,
        instr: &Instruction,
        target: Option<u64>,
        code: &mut [u8; MAX_INSN_LEN],
    ) -> Result<usize, crate::reencode::ReencodeError> {
        crate::reencode::reencode(
            instr,
            &self.insn_bytes,
            self.stub.insn_exec_addr(),
            target,
            code,
        )
    }

    /// What the guest's CPUID offers of the system instructions
    /// [`crate::system`] completes (default: none, so they raise #UD).
    pub fn set_system_features(&mut self, f: crate::system::SystemFeatures) {
        self.system = f;
    }

    /// This emulator's stub buffer (for running the stub self-test on it).
    pub fn stub_mut(&mut self) -> &mut StubBuf {
        &mut self.stub
    }

    /// The mnemonic of the last decoded instruction (for per-mnemonic
    /// statistics), `Mnemonic::INVALID` if decoding failed.
    pub fn last_mnemonic(&self) -> Mnemonic {
        self.last_mnemonic
    }

    /// Emulates the instruction at `cpu.rip`.
    ///
    /// `insn` holds the bytes the hypervisor reported (may be empty or cut
    /// short: the rest is fetched from guest memory at CS:RIP through the
    /// page tables). `vec` is asked for the guest's XSAVE image only when
    /// the instruction touches x87/SSE/AVX state, and told when it changed.
    /// On [`Outcome::Done`], `cpu.gprs` (GPRs, arithmetic flags) and
    /// `cpu.rip` hold the new values; otherwise `cpu` is unchanged.
    pub fn emulate(
        &mut self,
        cpu: &mut CpuState,
        insn: &[u8],
        vec: &mut dyn VectorState,
        mem: &mut dyn Platform,
    ) -> Outcome {
        self.last_mnemonic = Mnemonic::INVALID;
        let bitness = cpu.bitness();
        let hit = self.cached.filter(|c| c.matches(cpu.rip, bitness, insn));
        // Only instructions decoded from the reported bytes are cached: the
        // key is those bytes.
        let mut raw = [0u8; MAX_INSN_LEN];
        let (instr, cacheable) = match hit {
            Some(c) => {
                raw = c.bytes;
                (c.instr, true)
            }
            None => match self.decode(cpu, bitness, insn, &mut raw, mem) {
                Ok(decoded) => decoded,
                Err(stop) => return self.outcome(stop, None),
            },
        };
        self.last_mnemonic = instr.mnemonic();
        self.insn_bytes = raw;
        if let Some(out) = crate::system::emulate(&self.system, cpu, &instr, vec, mem) {
            return out;
        }
        match self.execute(cpu, bitness, &instr, hit, cacheable, &raw, vec, mem) {
            Ok(()) => Outcome::Done {
                mnemonic: instr.mnemonic(),
            },
            Err(stop) => self.outcome(stop, Some(&instr)),
        }
    }

    fn outcome(&self, stop: Stop, instr: Option<&Instruction>) -> Outcome {
        match stop {
            Stop::Exception(e) => e.into(),
            Stop::Platform(p) => Outcome::Platform(p),
            Stop::Contended => Outcome::Retry,
            Stop::Unsupported(why) => {
                let mut text = String::new();
                if let Some(i) = instr {
                    IntelFormatter::new().format(i, &mut text);
                    text.push_str(": ");
                }
                text.push_str(why);
                Outcome::Unsupported { text }
            }
        }
    }

    /// Decodes from the reported bytes, or from guest memory when they are
    /// absent or end inside the instruction; the flag says whether the
    /// reported bytes were used. `bytes` receives the instruction's bytes.
    fn decode(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        insn: &[u8],
        bytes: &mut [u8; MAX_INSN_LEN],
        mem: &mut dyn Platform,
    ) -> Result<(Instruction, bool), Stop> {
        let given = &insn[..insn.len().min(MAX_INSN_LEN)];
        if !given.is_empty() {
            let mut d = Decoder::with_ip(bitness, given, cpu.rip, DecoderOptions::NONE);
            let i = d.decode();
            if d.last_error() != DecoderError::NoMoreBytes {
                return if i.is_invalid() {
                    Err(undecodable(given, bitness).into())
                } else {
                    bytes[..given.len()].copy_from_slice(given);
                    Ok((i, true))
                };
            }
        }
        let (len, pending) = fetch(cpu, bitness, bytes, mem)?;
        let mut d = Decoder::with_ip(bitness, &bytes[..len], cpu.rip, DecoderOptions::NONE);
        let i = d.decode();
        match (d.last_error(), pending) {
            (DecoderError::NoMoreBytes, Some(fault)) => Err(fault.into()),
            _ if i.is_invalid() => Err(undecodable(&bytes[..len], bitness).into()),
            _ => Ok((i, false)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        cpu: &mut CpuState,
        bitness: u32,
        instr: &Instruction,
        hit: Option<Decoded>,
        cacheable: bool,
        raw: &[u8; MAX_INSN_LEN],
        vec: &mut dyn VectorState,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let (class, used) = match hit {
            Some(c) => (c.class, c.used),
            None => {
                let class = classify(instr).map_err(Stop::Unsupported)?;
                match class.kind {
                    Kind::Undefined => return Err(Exception::ud().into()),
                    Kind::CacheZero => {
                        self.cache_zero(cpu, bitness, instr, mem)?;
                        advance_rip(cpu, bitness, instr);
                        return Ok(());
                    }
                    Kind::CacheLine | Kind::CacheHint => {
                        self.cache_line(cpu, bitness, instr, class.kind, mem)?;
                        advance_rip(cpu, bitness, instr);
                        return Ok(());
                    }
                    Kind::MaskedImplicit => {
                        check_vector_enabled(cpu, instr, class, vec)?;
                        self.masked_implicit_store(cpu, bitness, instr, vec, mem)?;
                        advance_rip(cpu, bitness, instr);
                        return Ok(());
                    }
                    Kind::DirectStore => {
                        self.direct_store_64(cpu, bitness, instr, mem)?;
                        advance_rip(cpu, bitness, instr);
                        return Ok(());
                    }
                    Kind::Selector => {
                        self.selector_instruction(cpu, bitness, instr, mem)?;
                        advance_rip(cpu, bitness, instr);
                        return Ok(());
                    }
                    Kind::Vsib => {
                        check_vector_enabled(cpu, instr, class, vec)?;
                        self.vsib(cpu, bitness, instr, vec, mem)?;
                        advance_rip(cpu, bitness, instr);
                        return Ok(());
                    }
                    Kind::WholeState => {
                        self.whole_state(cpu, bitness, instr, class, vec, mem)?;
                        advance_rip(cpu, bitness, instr);
                        return Ok(());
                    }
                    Kind::Plain => {}
                }
                (class, self.used_memory(instr)?)
            }
        };
        check_vector_enabled(cpu, instr, class, vec)?;
        // A masked access only touches its selected elements: the mask
        // (from the vector state) decides which pages it may fault on.
        let selected = match used {
            Some(_) if class.vector && is_masked_access(instr) => {
                element_mask(instr, vec.image()?, self.layout)
            }
            _ => None,
        };
        let operand = match self.operand(cpu, bitness, instr, class, used, selected, vec, mem) {
            Err(Stop::Exception(pf)) if pf.vector == VEC_PF => {
                // The operand's start (the fault may be on its second page).
                let lin = used.and_then(|u| {
                    let size = u.memory_size().size() as u64;
                    linear_address(cpu, bitness, &u, size, false).ok()
                });
                return Err(match lin {
                    Some(lin) => self.fault_before_walk(cpu, instr, class, lin, pf, vec),
                    None => pf,
                }
                .into());
            }
            other => other?,
        };

        // Stage the operand and build the instruction for the stub.
        let bounce_off = operand.map_or(0, |o| BOUNCE_BASE + (o.lin & 63) as usize);
        let target_off = operand.map(|_| bounce_off);
        let mut code = [0u8; MAX_INSN_LEN];
        let len = match hit.filter(|c| c.code_for == target_off && c.code_len > 0) {
            Some(c) => {
                code = c.code;
                c.code_len
            }
            None => {
                let target = target_off.map(|off| self.stub.bounce_exec_addr() + off as u64);
                self.reencode(instr, target, &mut code)
                    .map_err(Stop::Unsupported)?
            }
        };
        if cacheable {
            let mut bytes = [0u8; MAX_INSN_LEN];
            let n = instr.len().min(MAX_INSN_LEN);
            bytes[..n].copy_from_slice(&raw[..n]);
            self.cached = Some(Decoded {
                rip: cpu.rip,
                bitness,
                bytes,
                instr: *instr,
                class,
                used,
                code,
                code_len: len,
                code_for: target_off,
            });
        }
        if let Some(op) = operand {
            let staged = &mut self.stub.bounce_mut()[bounce_off..bounce_off + op.size];
            if op.reads {
                let mut at = 0;
                for (&(gpa, n), skip) in op.pieces.iter().zip(op.skip).filter(|p| p.0 .1 != 0) {
                    if skip {
                        staged[at..at + n].fill(0);
                    } else {
                        mem.read_phys(gpa, &mut staged[at..at + n])?;
                    }
                    at += n;
                }
            } else {
                staged.fill(0);
            }
            // LDMXCSR of a bit outside MXCSR_MASK is #GP(0) (after the
            // read), which an emulated host CPU may not raise itself (QEMU's
            // TCG accepts any bit: the `mxcsr-reserved-accepted` probe).
            if matches!(instr.mnemonic(), Mnemonic::Ldmxcsr | Mnemonic::Vldmxcsr) && op.size == 4 {
                let value = u32::from_le_bytes([staged[0], staged[1], staged[2], staged[3]]);
                if value & !self.stub.mxcsr_mask() != 0 {
                    return Err(Exception::gp0().into());
                }
            }
        }

        let mut gprs = cpu.gprs;
        // The stub loads RFLAGS.AC: keep it only where hardware would check
        // alignment (CPL 3, CR0.AM, RFLAGS.AC), so a misaligned operand in
        // the bounce buffer (same offset mod 64) raises #AC natively.
        let alignment_check =
            cpu.cpl == 3 && cpu.cr0 & CR0_AM != 0 && cpu.gprs.rflags & RFLAGS_AC != 0;
        if !alignment_check {
            gprs.rflags &= !RFLAGS_AC;
        }
        // Whether the result already reached memory (a locked write).
        let mut stored = false;
        if class.vector {
            let image = vec.image()?;
            let n = self.stub.load_guest_image(image);
            let ran = self.stub.run_with_vector(&code[..len], &mut gprs);
            // After #XM or #MF the image holds the state the exception left
            // (MXCSR's flags, a pending x87 exception), which the guest sees
            // too; other faults leave it as it was.
            // A faulting instruction (#MF for an earlier one's exception)
            // leaves the pointers alone.
            let ran_ok = ran.is_ok().then_some(instr);
            let mem_op = used.zip(operand);
            self.fix_x87_pointers(cpu, bitness, mem_op, raw, ran_ok, &image[..n]);
            let after = &self.stub.guest_xsave()[..n];
            if crate::xstate::registers_differ(&image[..n], after) {
                image[..n].copy_from_slice(after);
                crate::xstate::keep_mxcsr(&mut image[..n]);
                vec.mark_dirty();
            }
            map_run(cpu, ran)?;
        } else if let Some(op) = operand.filter(|o| {
            o.reads && o.writes && !o.masked && o.pieces[1].1 == 0 && locked::is_locked_rmw(instr)
        }) {
            self.run_locked(cpu, &code[..len], &mut gprs, &op, bounce_off, mem)?;
            stored = true;
        } else {
            map_run(cpu, self.stub.run(&code[..len], &mut gprs))?;
        }

        if let Some(op) = operand.filter(|o| o.writes && !stored) {
            self.write_back(instr, &op, bounce_off, mem)?;
        }
        gprs.rflags = (gprs.rflags & !RFLAGS_AC) | (cpu.gprs.rflags & RFLAGS_AC);
        cpu.gprs = gprs;
        advance_rip(cpu, bitness, instr);
        Ok(())
    }
}

/// Moves RIP past `instr`, wrapping at the code size.
fn advance_rip(cpu: &mut CpuState, bitness: u32, instr: &Instruction) {
    let next = cpu.rip.wrapping_add(instr.len() as u64);
    cpu.rip = match bitness {
        64 => next,
        32 => next & 0xffff_ffff,
        _ => next & 0xffff,
    };
}

/// Turns a stub result into the guest's view.
fn map_run(cpu: &CpuState, ran: Result<(), StubRunError>) -> Result<(), Stop> {
    let fault = match ran {
        Ok(()) => return Ok(()),
        Err(StubRunError::Build(_)) => return Err(Stop::Unsupported("stub could not be built")),
        Err(StubRunError::Fault(f)) => f,
    };
    let exc = match fault.vector {
        // Operands were translated beforehand; a #PF would be ours.
        VEC_PF => return Err(Stop::Unsupported("unexpected #PF in the stub")),
        // The host's error code describes host selectors: the guest sees 0.
        VEC_GP | VEC_SS | VEC_AC => Exception::new(fault.vector, Some(0)),
        VEC_XM if cpu.cr4 & CR4_OSXMMEXCPT == 0 => Exception::ud(),
        v @ (0 | 6 | 7 | 16 | 19) => Exception::new(v, None),
        _ => return Err(Stop::Unsupported("unexpected exception in the stub")),
    };
    Err(exc.into())
}
