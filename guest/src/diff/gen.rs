//! Instruction forms from iced-x86's opcode tables, made concrete.
//!
//! Every `Code` valid in 64-bit mode whose CPUID features the host has is
//! considered; whether the VMM's allow-list accepts it does not matter for
//! forms with a memory operand (what the VMM refuses is measured, not
//! skipped). Register-only forms are generated only where `emul::classify`
//! accepts them: they exercise the CPL 0 completion of register forms, and
//! are not part of the memory-operand denominator.
//!
//! Operands are fixed: GPR operands from RCX, RDX, RSI, RDI (RBX and RAX
//! keep their roles as implicit operands, RBP is the memory base, RSP is
//! never touched), vector operands from register 1 upwards, opmask operands
//! K2..K4 (K1 is the write mask), MMX operands MM1.., ST(1) for `st(i)`, the
//! memory operand `[rbp]` and imm8 0x1b. EVEX forms also run with merge or
//! zero masking and, where the form has one, with embedded broadcast;
//! lockable forms also run with LOCK; forms whose memory operand must be
//! aligned also run misaligned (`[rbp+8]`), where PVM's native #UD differs
//! from the SDM's #GP(0).
//!
//! Operand kinds beyond `[rbp]`:
//! - VSIB (gathers, scatters): `[rbp+xmm0/ymm0/zmm0*1]`; register 0's
//!   initial value holds small element offsets (see
//!   [`super::program::VSIB_INDEX`]) so every element lands inside the
//!   64-byte operand window, some of them on the same bytes (scatters then
//!   show which element wins).
//! - moffs: the absolute address of the way's operand buffer, so the form
//!   has one encoding for the RAM buffer and one for the MMIO buffer.
//! - implicit rSI/rDI/rBX/rAX (string instructions, MASKMOVQ/MASKMOVDQU,
//!   XLAT, CLZERO, MONITORX, MOVDIR64B's destination register): loaded with
//!   an address inside the operand window by `lea` right before the
//!   instruction (LEA leaves the flags alone).
//! - far pointers (`jmp/call far`, `lfs/lgs/lss`, `mov sreg`): the
//!   selector in the window is not a valid descriptor, so every way must
//!   fault the same way.
//! - whole-state operands (FXSAVE/FXRSTOR, XSAVE family, FNSAVE/FRSTOR,
//!   FNSTENV/FLDENV): the window grows to the operand's size (the host's
//!   XSAVE size from CPUID for the XSAVE family) and starts as a valid
//!   state image.
//! - explicit memory with a stack access (`push/pop m`): the stack pointer
//!   is put back after the instruction.

use super::host;
use super::operands::*;
use iced_x86::{
    Code, CpuidFeature, Decoder, DecoderOptions, Encoder, EncodingKind, Instruction, Mnemonic,
    OpCodeOperandKind as K, OpKind, Register,
};
use std::collections::BTreeMap;

/// Why a code yields no form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// The host CPU (or OS) lacks a CPUID feature the form needs: no
    /// ground truth on this machine.
    HostLacks,
    /// Cannot run at CPL 3 natively, or its CPL 3 result says nothing about
    /// CPL 0 (the reason): no ground truth.
    NoGroundTruth(&'static str),
    /// An operand kind the generator does not build yet (the reason).
    NotBuilt(&'static str),
    /// A register-only form outside the allow-list (not in the
    /// memory-operand denominator).
    RegisterOnly,
}

impl Skip {
    pub fn label(self) -> String {
        match self {
            Skip::HostLacks => "host lacks feature".into(),
            Skip::NoGroundTruth(why) => format!("no ground truth: {why}"),
            Skip::NotBuilt(why) => format!("operands not built: {why}"),
            Skip::RegisterOnly => "register-only, not allow-listed".into(),
        }
    }
}

/// One concrete instruction to run.
#[derive(Debug, Clone)]
pub struct Form {
    pub code: Code,
    /// The encoded instruction (position independent: no RIP-relative
    /// operand).
    pub bytes: Vec<u8>,
    /// For moffs forms: the encoding used when the operand buffer is the
    /// MMIO window (`bytes` addresses the RAM buffer).
    pub mmio_bytes: Option<Vec<u8>>,
    /// Code run after the prologue, right before the instruction (`lea`s
    /// loading implicit address registers; they leave the flags alone).
    pub pre: Vec<u8>,
    /// Code run right after the instruction when it does not fault (puts
    /// the stack pointer back after `push/pop m`).
    pub post: Vec<u8>,
    /// Intel-syntax text.
    pub text: String,
    /// Reporting class: the most specific CPUID feature.
    pub class: String,
    /// Touches x87/SSE/AVX state: records then hold FXSAVE and vector
    /// registers.
    pub vector: bool,
    /// Loads and saves K1..K4 (EVEX forms, opmask instructions, XRSTOR).
    pub kregs: bool,
    /// The memory operand is deliberately misaligned for a form that
    /// requires alignment.
    pub misaligned: bool,
    pub has_memory: bool,
    /// Bytes of the operand window that are compared (a multiple of 64, at
    /// least 64).
    pub mem_len: usize,
    /// The window starts as a valid x87/SSE/XSAVE state image instead of
    /// the 64-byte data pattern (whole-state and environment forms).
    pub state_image: bool,
    /// (offset in the window, bytes) of stored x87 data pointers (FDP in
    /// FXSAVE/XSAVE images and FNSTENV/FNSAVE environments): an address in
    /// the window, compared relative to each way's buffer.
    pub addr_fields: Vec<(usize, usize)>,
    /// (offset in the window, bytes) of stored x87 selectors (FCS, FDS):
    /// not compared. Natively under PVM they hold the host's user
    /// selectors, not the guest's.
    pub selector_fields: Vec<(usize, usize)>,
}

/// What [`generate`] produced.
#[derive(Debug, Default)]
pub struct Generated {
    pub forms: Vec<Form>,
    /// Per reporting class and reason: how many codes yield no form.
    pub skipped: BTreeMap<(String, Skip), usize>,
    /// Per reporting class: codes with a memory operand the host runs
    /// (the denominator, counted in codes as the skips are).
    pub memory_codes: BTreeMap<String, usize>,
    /// Every code that yields no form, with the reason (for listings).
    pub skipped_codes: Vec<(Code, Skip)>,
}

/// The CPUID features that only say "x86" and name no extension.
fn is_base(f: CpuidFeature) -> bool {
    use CpuidFeature as F;
    matches!(
        f,
        F::INTEL8086 | F::INTEL186 | F::INTEL286 | F::INTEL386 | F::INTEL486 | F::X64
    )
}

/// The reporting class of `code`: its most specific CPUID feature
/// (AVX512VL and the base ISA say little when another feature is listed).
pub fn class_of(code: Code) -> String {
    let fs = code.cpuid_features();
    let pick = fs
        .iter()
        .find(|f| !is_base(**f) && **f != CpuidFeature::AVX512VL)
        .or_else(|| fs.iter().find(|f| !is_base(**f)))
        .or(fs.first());
    match pick {
        Some(f) if is_base(*f) => "base".to_string(),
        Some(f) => format!("{f:?}"),
        None => "none".to_string(),
    }
}

/// Whether a feature's instructions touch x87/MMX/SSE/AVX state.
fn is_vector_feature(f: CpuidFeature) -> bool {
    let name = format!("{f:?}");
    [
        "FPU", "MMX", "SSE", "AVX", "FMA", "F16C", "AES", "PCLMUL", "SHA", "GFNI", "FXSR", "XSAVE",
        "3DNOW", "XOP",
    ]
    .iter()
    .any(|p| name.contains(p))
}

/// Whole-state and environment instructions: their operand is the state
/// image, so the window starts as a valid one.
fn is_state_mnemonic(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Xsave
            | M::Xsave64
            | M::Xsaveopt
            | M::Xsaveopt64
            | M::Xsavec
            | M::Xsavec64
            | M::Xrstor
            | M::Xrstor64
            | M::Fsave
            | M::Fnsave
            | M::Frstor
            | M::Fstenv
            | M::Fnstenv
            | M::Fldenv
    )
}

/// `fcom qword ptr [rbp+16]`: sets FIP, FOP and FDP (to the window) and
/// the condition codes, nothing else.
const FCOM_RBP16: [u8; 3] = [0xdc, 0x55, 0x10];

/// Where a state or environment store puts the x87 data pointer (FDP) and
/// the selectors (FCS, FDS), as (offset, bytes). FXSAVE/XSAVE: FDP at 16,
/// 8 bytes with REX.W (no selectors), else 4 with FCS at 12 and FDS at 20;
/// FNSTENV/FNSAVE 32-bit layout: FDP at 20, FCS at 16, FDS at 24; 16-bit
/// layout: FDP at 10, FCS at 8, FDS at 12.
type X87Pointers = ((usize, usize), Vec<(usize, usize)>);

fn stored_x87_pointers(dec: &Instruction) -> Option<X87Pointers> {
    use iced_x86::MemorySize as S;
    use Mnemonic as M;
    match dec.mnemonic() {
        M::Fxsave | M::Xsave | M::Xsaveopt | M::Xsavec => Some(((16, 4), vec![(12, 2), (20, 2)])),
        M::Fxsave64 | M::Xsave64 | M::Xsaveopt64 | M::Xsavec64 => Some(((16, 8), Vec::new())),
        M::Fnstenv | M::Fnsave => match dec.memory_size() {
            S::FpuEnv14 | S::FpuState94 => Some(((10, 2), vec![(8, 2), (12, 2)])),
            _ => Some(((20, 4), vec![(16, 2), (24, 2)])),
        },
        _ => None,
    }
}

/// FXSAVE/FXRSTOR (16 bytes) and the XSAVE family (64 bytes): #GP(0) on a
/// misaligned operand.
fn needs_state_alignment(m: Mnemonic) -> bool {
    use Mnemonic as M;
    is_xsave_family(m) || matches!(m, M::Fxsave | M::Fxsave64 | M::Fxrstor | M::Fxrstor64)
}

fn is_xsave_family(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Xsave
            | M::Xsave64
            | M::Xsaveopt
            | M::Xsaveopt64
            | M::Xsavec
            | M::Xsavec64
            | M::Xrstor
            | M::Xrstor64
    )
}

/// Instructions the host runs at CPL 3 whose result there tells nothing
/// about the same instruction at CPL 0: compared across CPLs they would
/// differ by design, not by a fault of the VMM.
fn no_ground_truth(ins: &Instruction) -> Option<&'static str> {
    use Mnemonic as M;
    if ins.is_privileged() {
        return Some("privileged or IOPL-sensitive (#GP at CPL 3)");
    }
    match ins.mnemonic() {
        M::Sgdt | M::Sidt | M::Sldt | M::Str | M::Smsw => {
            Some("stores a descriptor-table register (UMIP: #GP at CPL 3 on the host)")
        }
        M::Mov if ins.code().op_code().op_kinds().get(1) == Some(&K::seg_reg) => {
            Some("stores a segment selector (CPL 0 and CPL 3 selectors differ)")
        }
        _ => None,
    }
}

/// Forms whose memory operand must be aligned (the SDM's #GP(0) when it is
/// not). Legacy SSE 16-byte operands other than the explicitly unaligned
/// moves; among VEX/EVEX forms only the aligned and non-temporal moves.
fn requires_alignment(ins: &Instruction) -> bool {
    use Mnemonic as M;
    let m = ins.mnemonic();
    match ins.encoding() {
        EncodingKind::Legacy => {
            ins.memory_size().size() == 16
                && !matches!(m, M::Movups | M::Movupd | M::Movdqu | M::Lddqu)
                && !matches!(m, M::Cmpxchg16b | M::Fld | M::Fstp)
                && ins
                    .cpuid_features()
                    .iter()
                    .any(|f| !is_base(*f) && host_simd(*f))
        }
        EncodingKind::VEX | EncodingKind::EVEX => matches!(
            m,
            M::Vmovaps
                | M::Vmovapd
                | M::Vmovdqa
                | M::Vmovdqa32
                | M::Vmovdqa64
                | M::Vmovntps
                | M::Vmovntpd
                | M::Vmovntdq
                | M::Vmovntdqa
        ),
        _ => false,
    }
}

/// SSE-family features (for the legacy alignment rule above).
fn host_simd(f: CpuidFeature) -> bool {
    use CpuidFeature as F;
    matches!(
        f,
        F::SSE
            | F::SSE2
            | F::SSE3
            | F::SSSE3
            | F::SSE4_1
            | F::SSE4_2
            | F::AES
            | F::PCLMULQDQ
            | F::SHA
            | F::GFNI
    )
}

/// Encodes `ins` and decodes it back: the decoded instruction is what the
/// emulator will see, and a round trip that changes the code means the
/// operand choice is not a valid encoding of this form.
fn encode(ins: &Instruction) -> Option<(Vec<u8>, Instruction)> {
    let mut enc = Encoder::new(64);
    enc.encode(ins, 0).ok()?;
    let bytes = enc.take_buffer();
    let mut dec = Decoder::new(64, &bytes, DecoderOptions::NONE);
    let back = dec.decode();
    (back.code() == ins.code() && back.len() == bytes.len()).then_some((bytes, back))
}

/// Why `code` has no encoding that decodes back to it.
fn no_encoding_reason(code: Code) -> &'static str {
    let m = code.mnemonic();
    use Mnemonic as M;
    if matches!(
        m,
        M::Fstenv | M::Fsave | M::Fstcw | M::Fstsw | M::Fclex | M::Finit
    ) {
        "FWAIT + the no-wait form: two instructions, each generated"
    } else if matches!(m, M::Call | M::Jmp) {
        "16-bit near branch: decoded as the 64-bit one (Intel; AMD honours 66h)"
    } else if m == M::Reservednop {
        "reserved-NOP encoding decoded as PREFETCH/NOP"
    } else {
        "no valid encoding with these operands"
    }
}

/// The variants of an EVEX form: (opmask, zeroing, broadcast).
fn evex_variants(op: &iced_x86::OpCodeInfo, has_mem: bool) -> Vec<(bool, bool, bool)> {
    let mut v = Vec::new();
    if !op.require_op_mask_register() {
        v.push((false, false, false));
    }
    if op.can_use_op_mask_register() {
        // Merge-masking always; zeroing too where the form allows it (not
        // for a memory destination: masked stores merge).
        v.push((true, false, false));
        if op.can_use_zeroing_masking() {
            v.push((true, true, false));
        }
    }
    if has_mem && op.can_broadcast() {
        v.push((op.can_use_op_mask_register(), false, true));
    }
    v
}

/// Where the RAM and the MMIO operand buffers are, for moffs forms.
pub struct Buffers {
    pub ram: u64,
    pub mmio: u64,
}

/// Every form of every code that the host runs. `allow` (the test passes
/// `emul::classify`) only decides which register-only forms are generated;
/// it returns whether the instruction touches vector state, or why it is
/// refused.
pub fn generate(
    allow: &dyn Fn(&Instruction) -> Result<bool, &'static str>,
    buffers: &Buffers,
) -> Generated {
    let mut out = Generated::default();
    let xsave_len = host::xsave_size().div_ceil(64) * 64;
    for code in Code::values() {
        let op = code.op_code();
        if !op.is_instruction() || !op.mode64() {
            continue;
        }
        let class = class_of(code);
        let mut skip = |why: Skip| {
            *out.skipped.entry((class.clone(), why)).or_default() += 1;
            out.skipped_codes.push((code, why));
        };
        if !code.cpuid_features().iter().all(|f| host::has(*f)) {
            skip(Skip::HostLacks);
            continue;
        }
        let kinds = op.op_kinds();
        let mut probe = Instruction::default();
        probe.set_code(code);
        let implicit_base = if kinds.iter().any(|k| is_memory_kind(*k) || is_or_mem(*k)) {
            None
        } else {
            implicit_memory_base(&probe)
        };
        // Stack instructions (LEAVE reads [rbp] too) break the harness's
        // own stack: their memory is the stack, not a data operand.
        let implicit_mem = implicit_base.is_some_and(|b| b.full_register() != Register::RSP)
            && !probe.is_stack_instruction()
            && probe.stack_pointer_increment() == 0;
        let memory_code = kinds.iter().any(|k| is_memory_kind(*k) || is_or_mem(*k)) || implicit_mem;
        if memory_code {
            *out.memory_codes.entry(class.clone()).or_default() += 1;
            if let Some(why) = no_ground_truth(&probe) {
                skip(Skip::NoGroundTruth(why));
                continue;
            }
        }
        let rm_choices: &[bool] = if kinds.iter().any(|k| is_or_mem(*k)) {
            &[false, true]
        } else {
            &[false]
        };
        let vector_code = code.cpuid_features().iter().any(|f| is_vector_feature(*f))
            || matches!(probe.mnemonic(), Mnemonic::Wait);
        for &use_mem in rm_choices {
            let mut base = Instruction::default();
            base.set_code(code);
            let mut s = Slots::default();
            if let Err(why) = kinds
                .iter()
                .enumerate()
                .try_for_each(|(i, k)| fill(&mut base, i as u32, *k, use_mem, &mut s))
            {
                skip(if memory_code {
                    Skip::NotBuilt(why)
                } else {
                    Skip::RegisterOnly
                });
                break;
            }
            let explicit_mem = (0..base.op_count()).any(|i| {
                matches!(
                    base.op_kind(i),
                    OpKind::Memory
                        | OpKind::MemorySegRSI
                        | OpKind::MemoryESRDI
                        | OpKind::MemorySegRDI
                )
            }) || kinds.contains(&K::seg_rBX_al);
            let has_mem = explicit_mem || implicit_mem;
            if !has_mem {
                // Register-only: only where the allow-list accepts it.
                let Some((_, dec)) = encode(&base) else {
                    continue;
                };
                if allow(&dec).is_err() {
                    skip(Skip::RegisterOnly);
                    continue;
                }
            }
            let moffs = kinds.contains(&K::mem_offs);
            if moffs {
                base.set_memory_displ_size(8);
                base.set_memory_displacement64(buffers.ram);
            }
            let mut variants: Vec<Instruction> = Vec::new();
            if op.encoding() == EncodingKind::EVEX {
                for (mask, zero, bcst) in evex_variants(op, has_mem) {
                    let mut v = base;
                    if mask {
                        v.set_op_mask(Register::K1);
                    }
                    v.set_zeroing_masking(zero);
                    v.set_is_broadcast(bcst);
                    variants.push(v);
                }
            } else {
                variants.push(base);
                if has_mem && op.can_use_lock_prefix() {
                    let mut v = base;
                    v.set_has_lock_prefix(true);
                    variants.push(v);
                }
                // String instructions also with their repeat prefixes (RCX
                // is set to a small count by `pre`).
                if kinds.contains(&K::seg_rSI) || kinds.contains(&K::es_rDI) {
                    if op.can_use_rep_prefix() {
                        let mut v = base;
                        v.set_has_rep_prefix(true);
                        variants.push(v);
                    }
                    if op.can_use_repne_prefix() {
                        let mut v = base;
                        v.set_has_repne_prefix(true);
                        variants.push(v);
                    }
                }
            }
            let mut first = true;
            for v in variants {
                let Some((bytes, dec)) = encode(&v) else {
                    if first {
                        skip(Skip::NotBuilt(no_encoding_reason(code)));
                        break;
                    }
                    // A variant this operand choice cannot take (zeroing
                    // with a memory destination): the others still run.
                    continue;
                };
                first = false;
                let vector = if has_mem {
                    vector_code
                } else {
                    allow(&dec).unwrap_or(vector_code)
                };
                let m = dec.mnemonic();
                let kregs = op.encoding() == EncodingKind::EVEX
                    || (0..dec.op_count())
                        .any(|i| dec.op_kind(i) == OpKind::Register && dec.op_register(i).is_k())
                    || (is_xsave_family(m) && host::avx512());
                let mem_len = if is_xsave_family(m) {
                    xsave_len
                } else if m == Mnemonic::Movdir64b {
                    128
                } else {
                    dec.memory_size().size().div_ceil(64).max(1) * 64
                };
                // Every byte of a larger window starts defined (the data
                // pattern only covers 64 bytes).
                let state_image = is_state_mnemonic(m) || mem_len > 64;
                // Implicit address registers, loaded right before the
                // instruction.
                let mut pre = Vec::new();
                if kinds.contains(&K::seg_rSI) {
                    pre.extend(lea(Register::RSI, Register::RBP, 0));
                }
                if kinds.contains(&K::es_rDI) {
                    let off = if kinds.contains(&K::seg_rSI) { 32 } else { 0 };
                    pre.extend(lea(Register::RDI, Register::RBP, off));
                }
                if kinds.contains(&K::seg_rDI) {
                    pre.extend(lea(Register::RDI, Register::RBP, 0));
                }
                if is_xsave_family(m) {
                    // mov eax, XSAVE_RFBM_LOW (flags untouched).
                    pre.push(0xb8);
                    pre.extend_from_slice(&XSAVE_RFBM_LOW.to_le_bytes());
                }
                if dec.has_rep_prefix() || dec.has_repne_prefix() {
                    // mov ecx, STRING_COUNT (MOV leaves the flags alone).
                    pre.push(0xb9);
                    pre.extend_from_slice(&STRING_COUNT.to_le_bytes());
                }
                if kinds.contains(&K::seg_rBX_al) {
                    pre.extend(lea(Register::RBX, Register::RBP, 8 - INIT_AL as i64));
                }
                if let Some(b) = implicit_base.filter(|_| implicit_mem) {
                    pre.extend(lea(b.full_register(), Register::RBP, 0));
                }
                // BT* with a register bit offset address memory up to
                // 2^(n-3) bytes away: keep the bit inside the window, or
                // each way would test bytes outside what is compared.
                if matches!(
                    m,
                    Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
                ) && explicit_mem
                    && dec.op_kind(1) == iced_x86::OpKind::Register
                {
                    // mov r32, BT_BIT_OFFSET (flags untouched; zero-extends).
                    let n = dec.op1_register().full_register().number() as u8;
                    if n >= 8 {
                        pre.push(0x41);
                    }
                    pre.push(0xb8 + (n & 7));
                    pre.extend_from_slice(&BT_BIT_OFFSET.to_le_bytes());
                }
                if m == Mnemonic::Movdir64b {
                    // The destination register addresses the second half.
                    pre.extend(lea(dec.op0_register().full_register(), Register::RBP, 64));
                }
                // push/pop m: put RSP back (without touching the flags).
                let mut post = Vec::new();
                let inc = dec.stack_pointer_increment();
                if explicit_mem && inc != 0 && dec.flow_control() == iced_x86::FlowControl::Next {
                    post.extend(lea(Register::RSP, Register::RSP, -(inc as i64)));
                }
                let mmio_bytes = if moffs {
                    let mut alt = v;
                    alt.set_memory_displacement64(buffers.mmio);
                    encode(&alt).map(|(b, _)| b)
                } else {
                    None
                };
                let form = Form {
                    code,
                    text: format!("{dec}"),
                    bytes: bytes.clone(),
                    mmio_bytes,
                    pre,
                    post,
                    class: class.clone(),
                    vector,
                    kregs,
                    misaligned: false,
                    has_memory: has_mem,
                    mem_len,
                    state_image,
                    addr_fields: Vec::new(),
                    selector_fields: Vec::new(),
                };
                // Environment and state stores: an x87 memory access right
                // before them gives FIP/FOP/FDP guest values to store.
                let form = match stored_x87_pointers(&dec) {
                    Some((fdp, selectors)) => {
                        let mut pre = form.pre.clone();
                        pre.extend_from_slice(&FCOM_RBP16);
                        Form {
                            pre,
                            addr_fields: vec![fdp],
                            selector_fields: selectors,
                            ..form
                        }
                    }
                    None => form,
                };
                if dec.is_vsib() {
                    // AVX2: the initial mask register is arbitrary, so the
                    // gather runs with a full and with a partial mask.
                    // AVX-512: K1 is the mask.
                    let masks = if op.encoding() == EncodingKind::VEX {
                        gather_masks(&dec)
                    } else {
                        vec![("", Vec::new())]
                    };
                    for (what, setup) in masks {
                        let mut pre = form.pre.clone();
                        pre.extend(setup);
                        let text = if what.is_empty() {
                            form.text.clone()
                        } else {
                            format!("{} ; {what}", form.text)
                        };
                        // Elements far apart, on two pages: the indices
                        // times 128.
                        let mut far = pre.clone();
                        far.extend(spread_index(&dec));
                        out.forms.push(Form {
                            text: format!("{text} ; index x128"),
                            pre: far,
                            mem_len: VSIB_FAR_WINDOW,
                            state_image: true,
                            ..form.clone()
                        });
                        out.forms.push(Form {
                            text,
                            pre,
                            ..form.clone()
                        });
                    }
                    continue;
                }
                if explicit_mem && !moffs && (requires_alignment(&dec) || needs_state_alignment(m))
                {
                    let mut mis = v;
                    mis.set_memory_displacement64(8);
                    if let Some((mb, md)) = encode(&mis) {
                        // A whole-state operand 8 bytes in needs a larger
                        // window.
                        let mem_len = if form.mem_len > 64 {
                            form.mem_len + 64
                        } else {
                            form.mem_len
                        };
                        out.forms.push(Form {
                            text: format!("{md}"),
                            bytes: mb,
                            misaligned: true,
                            mem_len,
                            addr_fields: form
                                .addr_fields
                                .iter()
                                .map(|(at, n)| (at + 8, *n))
                                .collect(),
                            selector_fields: form
                                .selector_fields
                                .iter()
                                .map(|(at, n)| (at + 8, *n))
                                .collect(),
                            ..form.clone()
                        });
                    }
                }
                out.forms.push(form);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Generated {
        generate(
            &|_| Err("register forms not needed here"),
            &Buffers {
                ram: 0x1f_0000,
                mmio: 0xd000_0000,
            },
        )
    }

    fn find<'a>(g: &'a Generated, text: &str) -> Option<&'a Form> {
        g.forms.iter().find(|f| f.text == text)
    }

    #[test]
    fn builds_the_operand_kinds_beyond_rbp() {
        let g = all();
        // Implicit rSI/rDI/rBX: an address register loaded right before.
        let by_code = |c: Code| g.forms.iter().find(|f| f.code == c);
        let movsb = by_code(Code::Movsb_m8_m8).expect("movsb");
        assert!(!movsb.pre.is_empty());
        assert!(g.forms.iter().any(|f| f.text.starts_with("rep movsq")));
        assert!(g.forms.iter().any(|f| f.text.starts_with("repne scasb")));
        let xlat = by_code(Code::Xlat_m8).expect("xlatb");
        assert!(!xlat.pre.is_empty());
        let maskmovq = by_code(Code::Maskmovq_rDI_mm_mm).expect("maskmovq");
        assert!(maskmovq.has_memory && !maskmovq.pre.is_empty());
        // moffs: one encoding per buffer.
        let moffs = by_code(Code::Mov_AL_moffs8).expect("mov al, moffs");
        assert!(moffs.mmio_bytes.is_some());
        assert_ne!(moffs.mmio_bytes.as_ref(), Some(&moffs.bytes));
        // Whole-state operands: the window is the operand.
        let fxsave = find(&g, "fxsave64 [rbp]").expect("fxsave64");
        assert_eq!(fxsave.mem_len, 512);
        assert!(fxsave.state_image);
        let fnsave = find(&g, "fnsave [rbp]").expect("fnsave");
        assert_eq!(fnsave.mem_len, 128);
        if host::has(CpuidFeature::XSAVE) {
            let xsave = find(&g, "xsave64 [rbp]").expect("xsave64");
            assert!(xsave.mem_len >= 576 && xsave.mem_len.is_multiple_of(64));
        }
        if host::has(CpuidFeature::AVX2) {
            let gathers: Vec<&Form> = g
                .forms
                .iter()
                .filter(|f| f.text.starts_with("vpgatherdd xmm1,[rbp+xmm0],xmm2"))
                .collect();
            assert_eq!(gathers.len(), 4, "full and partial mask, near and far");
            assert!(gathers
                .iter()
                .any(|f| f.mem_len == VSIB_FAR_WINDOW && f.state_image));
            assert!(gathers.iter().all(|f| f.vector && !f.pre.is_empty()));
        }
        if host::has(CpuidFeature::CLZERO) {
            let clzero = by_code(Code::Clzeroq).expect("clzero");
            assert!(clzero.has_memory && !clzero.pre.is_empty());
        }
        // push/pop m put RSP back.
        let push = find(&g, "push qword ptr [rbp]").expect("push m64");
        assert!(!push.post.is_empty());
    }

    #[test]
    fn system_instructions_are_counted_not_run() {
        let g = all();
        assert!(g.forms.iter().all(|f| !f.text.starts_with("lgdt")));
        assert!(g
            .skipped_codes
            .iter()
            .any(|(c, w)| *c == Code::Lgdt_m1664 && matches!(w, Skip::NoGroundTruth(_))));
    }
}
