//! Instruction forms from iced-x86's opcode tables, made concrete.
//!
//! Every `Code` valid in 64-bit mode is given fixed operands: GPR operands
//! from RCX, RDX, RSI, RDI (RBX and RAX keep their roles as implicit
//! operands, RBP is the memory base, RSP is never touched), vector operands
//! from register 1 upwards, opmask operands K2..K4 (K1 is the write mask),
//! MMX operands MM1.., ST(1) for `st(i)`, the memory operand `[rbp]` and
//! imm8 0x1b. EVEX forms also run with merge or zero masking and, where the
//! form has one, with embedded broadcast; lockable forms also run with
//! LOCK; forms whose memory operand must be aligned also run misaligned
//! (`[rbp+8]`), where PVM's native #UD differs from the SDM's #GP(0).

use super::host;
use iced_x86::{
    Code, CpuidFeature, Decoder, DecoderOptions, Encoder, EncodingKind, Instruction, Mnemonic,
    OpCodeOperandKind as K, OpKind, Register,
};
use std::collections::BTreeMap;

/// Why a form is not generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// The host CPU (or OS) lacks a CPUID feature the form needs.
    HostLacks,
    /// `emul::classify` refuses it.
    NotAllowed,
    /// An operand kind the generator does not build (segment, control,
    /// bound or tile registers, VSIB, moffs, branch targets...).
    Operands,
}

impl Skip {
    pub fn label(self) -> &'static str {
        match self {
            Skip::HostLacks => "host lacks feature",
            Skip::NotAllowed => "not allow-listed",
            Skip::Operands => "can't build operands",
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
    /// Intel-syntax text.
    pub text: String,
    /// Reporting class: the most specific CPUID feature.
    pub class: String,
    /// Touches x87/SSE/AVX state: records then hold FXSAVE and vector
    /// registers.
    pub vector: bool,
    /// Loads and saves K1..K4 (EVEX forms and opmask instructions).
    pub kregs: bool,
    /// The memory operand is deliberately misaligned for a form that
    /// requires alignment.
    pub misaligned: bool,
    pub has_memory: bool,
}

/// What [`generate`] produced.
#[derive(Debug, Default)]
pub struct Generated {
    pub forms: Vec<Form>,
    /// Per reporting class and reason: how many codes were skipped.
    pub skipped: BTreeMap<(String, Skip), usize>,
}

/// imm8 used by every form (selects behaviour for shuffles, compares...).
pub const IMM8: u8 = 0x1b;

const GPR8: [Register; 4] = [Register::CL, Register::DL, Register::SIL, Register::DIL];
const GPR16: [Register; 4] = [Register::CX, Register::DX, Register::SI, Register::DI];
const GPR32: [Register; 4] = [Register::ECX, Register::EDX, Register::ESI, Register::EDI];
const GPR64: [Register; 4] = [Register::RCX, Register::RDX, Register::RSI, Register::RDI];
const XMM: [Register; 4] = [
    Register::XMM1,
    Register::XMM2,
    Register::XMM3,
    Register::XMM4,
];
const YMM: [Register; 4] = [
    Register::YMM1,
    Register::YMM2,
    Register::YMM3,
    Register::YMM4,
];
const ZMM: [Register; 4] = [
    Register::ZMM1,
    Register::ZMM2,
    Register::ZMM3,
    Register::ZMM4,
];
const KREG: [Register; 3] = [Register::K2, Register::K3, Register::K4];
const MM: [Register; 3] = [Register::MM1, Register::MM2, Register::MM3];

/// Operand choices of one code: `None` where the rm operand may be a
/// register or memory and this variant uses memory.
struct Slots {
    gpr: usize,
    vec: usize,
    k: usize,
    mm: usize,
}

/// Fills operand `i` of kind `kind`; `mem` says whether an `*_or_mem`
/// operand becomes the memory operand. Returns false for kinds not built.
fn fill(ins: &mut Instruction, i: u32, kind: K, mem: bool, s: &mut Slots) -> bool {
    let reg = |set: &[Register], n: &mut usize| -> Option<Register> {
        let r = set.get(*n).copied();
        *n += 1;
        r
    };
    let r = match kind {
        k if mem && is_or_mem(k) => {
            ins.set_op_kind(i, OpKind::Memory);
            ins.set_memory_base(Register::RBP);
            ins.set_memory_displ_size(1);
            return true;
        }
        K::mem => {
            ins.set_op_kind(i, OpKind::Memory);
            ins.set_memory_base(Register::RBP);
            ins.set_memory_displ_size(1);
            return true;
        }
        K::r8_or_mem | K::r8_reg | K::r8_opcode => reg(&GPR8, &mut s.gpr),
        K::r16_or_mem | K::r16_reg | K::r16_reg_mem | K::r16_rm | K::r16_opcode => {
            reg(&GPR16, &mut s.gpr)
        }
        K::r32_or_mem | K::r32_reg | K::r32_reg_mem | K::r32_rm | K::r32_opcode | K::r32_vvvv => {
            reg(&GPR32, &mut s.gpr)
        }
        K::r64_or_mem | K::r64_reg | K::r64_reg_mem | K::r64_rm | K::r64_opcode | K::r64_vvvv => {
            reg(&GPR64, &mut s.gpr)
        }
        K::xmm_or_mem | K::xmm_reg | K::xmm_rm | K::xmm_vvvv | K::xmm_is4 | K::xmm_is5 => {
            reg(&XMM, &mut s.vec)
        }
        K::ymm_or_mem | K::ymm_reg | K::ymm_rm | K::ymm_vvvv | K::ymm_is4 | K::ymm_is5 => {
            reg(&YMM, &mut s.vec)
        }
        K::zmm_or_mem | K::zmm_reg | K::zmm_rm | K::zmm_vvvv => reg(&ZMM, &mut s.vec),
        K::k_or_mem | K::k_reg | K::k_rm | K::k_vvvv => reg(&KREG, &mut s.k),
        K::mm_or_mem | K::mm_reg | K::mm_rm => reg(&MM, &mut s.mm),
        K::al => Some(Register::AL),
        K::cl => Some(Register::CL),
        K::ax => Some(Register::AX),
        K::eax => Some(Register::EAX),
        K::rax => Some(Register::RAX),
        K::dx => Some(Register::DX),
        K::st0 => Some(Register::ST0),
        K::sti_opcode => Some(Register::ST1),
        K::imm8 => return imm(ins, i, OpKind::Immediate8, IMM8 as u64),
        K::imm8_const_1 => return imm(ins, i, OpKind::Immediate8, 1),
        K::imm8sex16 => return imm(ins, i, OpKind::Immediate8to16, IMM8 as u64),
        K::imm8sex32 => return imm(ins, i, OpKind::Immediate8to32, IMM8 as u64),
        K::imm8sex64 => return imm(ins, i, OpKind::Immediate8to64, IMM8 as u64),
        K::imm16 => return imm(ins, i, OpKind::Immediate16, 0x1b2c),
        K::imm32 => return imm(ins, i, OpKind::Immediate32, 0x1b2c_3d4e),
        K::imm32sex64 => return imm(ins, i, OpKind::Immediate32to64, 0x1b2c_3d4e),
        K::imm64 => return imm(ins, i, OpKind::Immediate64, 0x1b2c_3d4e_5f60_7182),
        _ => None,
    };
    match r {
        Some(r) => {
            ins.set_op_kind(i, OpKind::Register);
            ins.set_op_register(i, r);
            true
        }
        None => false,
    }
}

fn imm(ins: &mut Instruction, i: u32, kind: OpKind, v: u64) -> bool {
    ins.set_op_kind(i, kind);
    ins.try_set_immediate_u64(i, v).is_ok()
}

fn is_or_mem(k: K) -> bool {
    matches!(
        k,
        K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::mm_or_mem
            | K::xmm_or_mem
            | K::ymm_or_mem
            | K::zmm_or_mem
            | K::k_or_mem
    )
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

/// Every form of every code that the host runs and `allow` accepts.
/// `allow` returns whether the instruction touches vector state, or why it
/// is refused (the test passes `emul::classify`).
pub fn generate(allow: &dyn Fn(&Instruction) -> Result<bool, &'static str>) -> Generated {
    let mut out = Generated::default();
    for code in Code::values() {
        let op = code.op_code();
        if !op.is_instruction() || !op.mode64() {
            continue;
        }
        // MVEX (Knights Corner), 3DNow! and XOP (AMD only) never run here.
        if matches!(
            op.encoding(),
            EncodingKind::MVEX | EncodingKind::D3NOW | EncodingKind::XOP
        ) {
            continue;
        }
        let class = class_of(code);
        let kinds = op.op_kinds();
        let rm_choices: &[bool] = if kinds.iter().any(|k| is_or_mem(*k)) {
            &[false, true]
        } else {
            &[false]
        };
        for &use_mem in rm_choices {
            let mut base = Instruction::default();
            base.set_code(code);
            let mut s = Slots {
                gpr: 0,
                vec: 0,
                k: 0,
                mm: 0,
            };
            let built = kinds
                .iter()
                .enumerate()
                .all(|(i, k)| fill(&mut base, i as u32, *k, use_mem, &mut s));
            if !built {
                *out.skipped
                    .entry((class.clone(), Skip::Operands))
                    .or_default() += 1;
                break;
            }
            let has_mem = (0..base.op_count()).any(|i| base.op_kind(i) == OpKind::Memory);
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
            }
            let mut first = true;
            for v in variants {
                let Some((bytes, dec)) = encode(&v) else {
                    if first {
                        *out.skipped
                            .entry((class.clone(), Skip::Operands))
                            .or_default() += 1;
                        break;
                    }
                    // A variant this operand choice cannot take (zeroing
                    // with a memory destination): the others still run.
                    continue;
                };
                match allow(&dec) {
                    Err(_) => {
                        if first {
                            *out.skipped
                                .entry((class.clone(), Skip::NotAllowed))
                                .or_default() += 1;
                        }
                        break;
                    }
                    Ok(vector) => {
                        if !code.cpuid_features().iter().all(|f| host::has(*f)) {
                            if first {
                                *out.skipped
                                    .entry((class.clone(), Skip::HostLacks))
                                    .or_default() += 1;
                            }
                            break;
                        }
                        let kregs = op.encoding() == EncodingKind::EVEX
                            || (0..dec.op_count()).any(|i| {
                                dec.op_kind(i) == OpKind::Register && dec.op_register(i).is_k()
                            });
                        let form = Form {
                            code,
                            text: format!("{dec}"),
                            bytes: bytes.clone(),
                            class: class.clone(),
                            vector,
                            kregs,
                            misaligned: false,
                            has_memory: has_mem,
                        };
                        if has_mem && requires_alignment(&dec) {
                            let mut m = v;
                            m.set_memory_displacement64(8);
                            if let Some((mb, md)) = encode(&m) {
                                out.forms.push(Form {
                                    text: format!("{md}"),
                                    bytes: mb,
                                    misaligned: true,
                                    ..form.clone()
                                });
                            }
                        }
                        out.forms.push(form);
                    }
                }
                first = false;
            }
        }
    }
    out
}
