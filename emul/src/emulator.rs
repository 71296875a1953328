//! The emulator: fetch, decode, classify, translate, stage the operand in
//! the bounce buffer, run the instruction in a stub, write back.

use iced_x86::{
    CpuidFeature, Decoder, DecoderError, DecoderOptions, Formatter, Instruction,
    InstructionInfoFactory, IntelFormatter, Mnemonic, OpAccess, OpKind, Register, UsedMemory,
};

use crate::address::linear_address;
use crate::classify::{classify, Class};
use crate::cpu::{
    CpuState, CR0_AM, CR0_EM, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, RFLAGS_AC,
};
use crate::exception::{Exception, VEC_AC, VEC_GP, VEC_PF, VEC_SS, VEC_XM};
use crate::paging::{is_canonical, translate, Access, WalkError};
use crate::platform::{Platform, PlatformError, VectorState};
use crate::reencode::Reencoder;
use crate::stub::{
    StubBuf, StubError, StubRunError, BOUNCE_SIZE, MAX_INSN_LEN, STUB_BUF_SIZE, XSAVE_AREA_SIZE,
};
use crate::writeback::{element_mask, masked_store, ElementMask, XsaveLayout};

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
    Done { mnemonic: Mnemonic },
    /// Inject this exception; nothing was changed (RIP still points at the
    /// instruction).
    Exception {
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
    },
    /// The instruction is outside the allow-list (or cannot be staged);
    /// `text` names it in Intel syntax and says why. Nothing was changed.
    Unsupported { text: String },
    /// A memory or vector-state access through the VMM failed.
    Platform(PlatformError),
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
    Stub(#[from] StubError),
}

/// The memory operand of the instruction being emulated, once translated.
#[derive(Debug, Clone, Copy)]
struct Operand {
    lin: u64,
    size: usize,
    /// Guest-physical address and length of each page piece.
    pieces: [(u64, usize); 2],
    reads: bool,
    writes: bool,
    /// Only some elements are written (masked store).
    masked: bool,
    /// Page pieces holding no mask-selected element: never translated nor
    /// accessed (AVX-512 and VMASKMOV suppress faults on masked-out
    /// elements).
    skip: [bool; 2],
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
    reencoder: Reencoder,
    layout: XsaveLayout,
    max_phys_bits: u8,
    last_mnemonic: Mnemonic,
    cached: Option<Decoded>,
}

impl Emulator {
    /// `its_on`: build ITS-safe stubs (see [`crate::stub::detect`]).
    pub fn new(its_on: bool) -> Result<Self, EmulError> {
        Ok(Emulator {
            stub: StubBuf::new(its_on)?,
            info: InstructionInfoFactory::new(),
            reencoder: Reencoder::new(),
            layout: XsaveLayout::from_host(),
            max_phys_bits: 52,
            last_mnemonic: Mnemonic::INVALID,
            cached: None,
        })
    }

    /// The guest's MAXPHYADDR (default 52): page-table entry bits from it
    /// up to 51 are reserved.
    pub fn set_max_phys_bits(&mut self, bits: u8) {
        self.max_phys_bits = bits;
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
        let (instr, cacheable) = match hit {
            Some(c) => (c.instr, true),
            None => match self.decode(cpu, bitness, insn, mem) {
                Ok(decoded) => decoded,
                Err(stop) => return self.outcome(stop, None),
            },
        };
        self.last_mnemonic = instr.mnemonic();
        match self.execute(cpu, bitness, &instr, hit, cacheable, insn, vec, mem) {
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
    /// reported bytes were used.
    fn decode(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        insn: &[u8],
        mem: &mut dyn Platform,
    ) -> Result<(Instruction, bool), Stop> {
        let given = &insn[..insn.len().min(MAX_INSN_LEN)];
        if !given.is_empty() {
            let mut d = Decoder::with_ip(bitness, given, cpu.rip, DecoderOptions::NONE);
            let i = d.decode();
            if d.last_error() != DecoderError::NoMoreBytes {
                return if i.is_invalid() {
                    Err(Exception::ud().into())
                } else {
                    Ok((i, true))
                };
            }
        }
        let mut bytes = [0u8; MAX_INSN_LEN];
        let (len, pending) = fetch(cpu, bitness, self.max_phys_bits, &mut bytes, mem)?;
        let mut d = Decoder::with_ip(bitness, &bytes[..len], cpu.rip, DecoderOptions::NONE);
        let i = d.decode();
        match (d.last_error(), pending) {
            (DecoderError::NoMoreBytes, Some(fault)) => Err(fault.into()),
            _ if i.is_invalid() => Err(Exception::ud().into()),
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
        insn: &[u8],
        vec: &mut dyn VectorState,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let (class, used) = match hit {
            Some(c) => (c.class, c.used),
            None => (
                classify(instr).map_err(Stop::Unsupported)?,
                self.used_memory(instr)?,
            ),
        };
        check_vector_enabled(cpu, instr, class)?;
        // A masked access only touches its selected elements: the mask
        // (from the vector state) decides which pages it may fault on.
        let selected = match used {
            Some(_) if class.vector && is_masked_access(instr) => {
                element_mask(instr, vec.image()?, self.layout)
            }
            _ => None,
        };
        let operand = self.operand(cpu, bitness, instr, used, selected, mem)?;

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
                self.reencoder
                    .encode(instr, self.stub.insn_exec_addr(), target, &mut code)
                    .map_err(Stop::Unsupported)?
            }
        };
        if cacheable {
            let mut bytes = [0u8; MAX_INSN_LEN];
            let n = instr.len().min(MAX_INSN_LEN);
            bytes[..n].copy_from_slice(&insn[..n]);
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
        if class.vector {
            let image = vec.image()?;
            let n = image.len().min(XSAVE_AREA_SIZE);
            let area = self.stub.guest_xsave_mut();
            area[..n].copy_from_slice(&image[..n]);
            area[n..].fill(0);
            let ran = self.stub.run_with_vector(&code[..len], &mut gprs);
            map_run(cpu, ran)?;
            self.fix_x87_pointers(cpu, bitness, used, operand);
            let after = &self.stub.guest_xsave()[..n];
            if crate::xstate::registers_differ(&image[..n], after) {
                image[..n].copy_from_slice(after);
                crate::xstate::keep_mxcsr(&mut image[..n]);
                vec.mark_dirty();
            }
        } else {
            map_run(cpu, self.stub.run(&code[..len], &mut gprs))?;
        }

        if let Some(op) = operand.filter(|o| o.writes) {
            self.write_back(instr, &op, bounce_off, mem)?;
        }
        gprs.rflags = (gprs.rflags & !RFLAGS_AC) | (cpu.gprs.rflags & RFLAGS_AC);
        cpu.gprs = gprs;
        let next = cpu.rip.wrapping_add(instr.len() as u64);
        cpu.rip = match bitness {
            64 => next,
            32 => next & 0xffff_ffff,
            _ => next & 0xffff,
        };
        Ok(())
    }

    /// A non-control x87 instruction records its own address (FIP) and its
    /// operand's (FDP) in the x87 state. Run in the stub, those are the
    /// stub's and the bounce buffer's; the guest must see its RIP and its
    /// operand's effective address. (Control instructions leave both
    /// alone, so they still hold the guest's earlier values.)
    fn fix_x87_pointers(
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

    /// The instruction's one memory access, if any.
    fn used_memory(&mut self, instr: &Instruction) -> Result<Option<UsedMemory>, Stop> {
        let info = self.info.info(instr);
        match info.used_memory() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            _ => Err(Stop::Unsupported("several memory accesses")),
        }
    }

    /// Finds, checks and translates the memory operand (before anything
    /// runs, so a fault has no side effect).
    fn operand(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        instr: &Instruction,
        used: Option<UsedMemory>,
        selected: Option<ElementMask>,
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
        let access = Access {
            write: writes,
            fetch: false,
            user: cpu.cpl == 3,
        };
        let first = size.min((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize);
        let mut pieces = [(0u64, 0usize); 2];
        let mut skip = [false; 2];
        // Only pages holding a selected element are walked: a masked-out
        // element on an unmapped page does not fault, as on hardware.
        let wanted = |from: usize, to: usize| selected.is_none_or(|m| m.selects_any(from, to));
        if wanted(0, first) {
            pieces[0] = (translate(cpu, lin, access, self.max_phys_bits, mem)?, first);
        } else {
            pieces[0] = (0, first);
            skip[0] = true;
        }
        if first < size {
            let mut next = lin.wrapping_add(first as u64);
            if bitness != 64 {
                next &= 0xffff_ffff;
            }
            if wanted(first, size) {
                pieces[1] = (
                    translate(cpu, next, access, self.max_phys_bits, mem)?,
                    size - first,
                );
            } else {
                pieces[1] = (0, size - first);
                skip[1] = true;
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
    fn write_back(
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

/// A masked access whose mask bits select memory elements one to one, so
/// masked-out elements never fault: EVEX-masked moves, VMASKMOV, and
/// element-wise EVEX arithmetic whose memory operand is a full vector of
/// the destination's element type. Other masked instructions (broadcasts,
/// inserts, shifts by a memory count, conversions, mixed element sizes such
/// as VPMULTISHIFTQB or VPDPBUSD) do not map mask bits to memory elements
/// that way, so their whole operand is translated (`masked-fault-suppression`
/// checks the listed forms against the CPU).
fn is_masked_access(instr: &Instruction) -> bool {
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

/// The #UD/#NM checks of CR0.EM/TS and CR4.OSFXSR/OSXSAVE that precede
/// any memory access of an x87/SSE/AVX instruction. (The guest's XCR0 is
/// not known here; the host's applies.)
fn check_vector_enabled(cpu: &CpuState, instr: &Instruction, class: Class) -> Result<(), Stop> {
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

/// Fetches up to 15 instruction bytes at CS:RIP. Returns how many were
/// readable and, when fewer than 15, the fault the next page gives (raised
/// only if the instruction turns out to need those bytes).
fn fetch(
    cpu: &CpuState,
    bitness: u32,
    max_phys_bits: u8,
    out: &mut [u8; MAX_INSN_LEN],
    mem: &mut dyn Platform,
) -> Result<(usize, Option<Exception>), Stop> {
    let lin = if bitness == 64 {
        cpu.rip
    } else {
        cpu.cs.base.wrapping_add(cpu.rip) & 0xffff_ffff
    };
    if bitness == 64 && !is_canonical(cpu, lin) {
        return Err(Exception::gp0().into());
    }
    let access = Access {
        write: false,
        fetch: true,
        user: cpu.cpl == 3,
    };
    let first = MAX_INSN_LEN.min((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize);
    let gpa = translate(cpu, lin, access, max_phys_bits, mem)?;
    mem.read_phys(gpa, &mut out[..first])?;
    if first == MAX_INSN_LEN {
        return Ok((first, None));
    }
    let mut next = lin.wrapping_add(first as u64);
    if bitness != 64 {
        next &= 0xffff_ffff;
    }
    let next_ok = bitness != 64 || is_canonical(cpu, next);
    match translate(cpu, next, access, max_phys_bits, mem) {
        Ok(gpa) if next_ok => {
            mem.read_phys(gpa, &mut out[first..])?;
            Ok((MAX_INSN_LEN, None))
        }
        Ok(_) => Ok((first, Some(Exception::gp0()))),
        Err(WalkError::Fault(f)) => Ok((first, Some(f))),
        Err(WalkError::Platform(p)) => Err(p.into()),
    }
}
