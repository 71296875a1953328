//! The allow-list: which decoded instructions may run in a stub.
//!
//! Structural rules first (no control flow, stack, privileged or string
//! instructions, at most one explicit memory operand and no implicit one,
//! no RSP or system registers), then each CPUID feature the instruction
//! needs must be in an allowed family; integer and x87 instructions also
//! need an explicitly listed mnemonic, because those families contain
//! system instructions too.

use iced_x86::{CpuidFeature, FlowControl, Instruction, Mnemonic, OpKind, Register};

/// What the rest of the emulator needs to know about an allowed
/// instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// Touches x87/MMX/SSE/AVX/AVX-512 state (needs the XSAVE image).
    pub vector: bool,
    /// An x87 or MMX instruction (CR0.EM gives #NM/#UD differently).
    pub x87_mmx: bool,
    /// Has a VEX/EVEX/XOP encoding (needs CR4.OSXSAVE).
    pub vex: bool,
    /// How the emulator completes it.
    pub kind: Kind,
}

/// The instruction families the emulator completes in different ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One instruction run in the stub with its operand (at most 64
    /// bytes) staged in the bounce buffer.
    Plain,
    /// CLFLUSH, CLFLUSHOPT, CLWB: the address is checked and translated,
    /// nothing is read or written.
    CacheLine,
    /// PREFETCHh, PREFETCHW(T1), PREFETCH, CLDEMOTE: hints that never
    /// fault.
    CacheHint,
    /// CLZERO (AMD): zeroes the 64-byte line holding DS:rAX.
    CacheZero,
    /// UD0, UD1, UD2: #UD, whatever their operands.
    Undefined,
    /// FXSAVE/FXRSTOR, the XSAVE family and the x87 environment
    /// instructions: operands of 14 bytes to a few KiB whose extent depends
    /// on state.
    WholeState,
    /// Gathers and scatters: one access per mask-selected element.
    Vsib,
    /// MASKMOVQ, (V)MASKMOVDQU: byte-masked stores through DS:rDI.
    MaskedImplicit,
    /// MOVDIR64B: 64 bytes from memory to ES:rReg as one store, completed
    /// without a stub (#UD where the host lacks it).
    DirectStore,
    /// LAR, LSL, VERR, VERW (a selector checked against the guest's GDT or
    /// LDT) and ARPL: completed without a stub (a stub would read the
    /// host's tables; ARPL does not exist in 64-bit code).
    Selector,
}

/// The whole-state family (XSAVES/XRSTORS are privileged and refused
/// before this is asked).
fn whole_state(mnemonic: Mnemonic) -> Option<Class> {
    let x87_env = matches!(
        mnemonic,
        M::Fnstenv | M::Fstenv | M::Fldenv | M::Fnsave | M::Fsave | M::Frstor
    );
    let other = matches!(
        mnemonic,
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
    );
    (x87_env || other).then_some(Class {
        vector: true,
        x87_mmx: x87_env,
        vex: false,
        kind: Kind::WholeState,
    })
}

/// The cache-control family, allowed whatever the feature lists say.
fn cache_kind(mnemonic: Mnemonic) -> Option<Kind> {
    match mnemonic {
        M::Clflush | M::Clflushopt | M::Clwb => Some(Kind::CacheLine),
        M::Clzero => Some(Kind::CacheZero),
        // Multi-byte and reserved NOPs: a ModRM operand, never an access.
        M::Nop | M::Reservednop => Some(Kind::CacheHint),
        M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw
        | M::Prefetchwt1
        | M::Prefetch
        | M::Cldemote => Some(Kind::CacheHint),
        _ => None,
    }
}

/// Why an instruction is refused.
pub type Deny = &'static str;

use Mnemonic as M;

/// Integer instructions (base ISA and the integer extensions) that may run.
const INTEGER: &[Mnemonic] = &[
    M::Add,
    M::Adc,
    M::Sub,
    M::Sbb,
    M::And,
    M::Or,
    M::Xor,
    M::Cmp,
    M::Test,
    M::Inc,
    M::Dec,
    M::Neg,
    M::Not,
    M::Mul,
    M::Imul,
    M::Div,
    M::Idiv,
    M::Mov,
    M::Movzx,
    M::Movsx,
    M::Movsxd,
    M::Movbe,
    M::Bt,
    M::Bts,
    M::Btr,
    M::Btc,
    M::Bsf,
    M::Bsr,
    M::Xchg,
    M::Xadd,
    M::Cmpxchg,
    M::Cmpxchg8b,
    M::Cmpxchg16b,
    M::Shl,
    M::Shr,
    M::Sar,
    M::Sal,
    M::Rol,
    M::Ror,
    M::Rcl,
    M::Rcr,
    M::Shld,
    M::Shrd,
    M::Andn,
    M::Bextr,
    M::Blsi,
    M::Blsmsk,
    M::Blsr,
    M::Bzhi,
    M::Mulx,
    M::Pdep,
    M::Pext,
    M::Rorx,
    M::Sarx,
    M::Shlx,
    M::Shrx,
    M::Adcx,
    M::Adox,
    // A plain 4- or 8-byte store (direct store only concerns caching).
    M::Movdiri,
    M::Crc32,
    M::Popcnt,
    M::Lzcnt,
    M::Tzcnt,
    M::Cbw,
    M::Cwde,
    M::Cdqe,
    M::Cwd,
    M::Cdq,
    M::Cqo,
    M::Bswap,
    M::Clc,
    M::Stc,
    M::Cmc,
    M::Lahf,
    M::Sahf,
    M::Cmova,
    M::Cmovae,
    M::Cmovb,
    M::Cmovbe,
    M::Cmove,
    M::Cmovg,
    M::Cmovge,
    M::Cmovl,
    M::Cmovle,
    M::Cmovne,
    M::Cmovno,
    M::Cmovnp,
    M::Cmovns,
    M::Cmovo,
    M::Cmovp,
    M::Cmovs,
    M::Seta,
    M::Setae,
    M::Setb,
    M::Setbe,
    M::Sete,
    M::Setg,
    M::Setge,
    M::Setl,
    M::Setle,
    M::Setne,
    M::Setno,
    M::Setnp,
    M::Setns,
    M::Seto,
    M::Setp,
    M::Sets,
    M::Nop,
    M::Wait,
];

/// x87 instructions that are refused: the 287's protected-mode and
/// 8087 interrupt controls, which a 64-bit stub cannot model.
const X87_DENIED: &[Mnemonic] = &[
    M::Fsetpm,
    M::Fnsetpm,
    M::Frstpm,
    M::Feni,
    M::Fneni,
    M::Fdisi,
    M::Fndisi,
];

/// SIMD instructions refused despite an allowed feature: state management
/// the system family handles.
const SIMD_DENIED: &[Mnemonic] = &[M::Xgetbv];

fn feature_family(f: CpuidFeature) -> Option<Family> {
    use CpuidFeature as F;
    Some(match f {
        F::INTEL8086
        | F::INTEL186
        | F::INTEL286
        | F::INTEL386
        | F::INTEL486
        | F::X64
        | F::CMOV
        | F::CX8
        | F::CMPXCHG16B
        | F::MOVBE
        | F::POPCNT
        | F::LZCNT
        | F::BMI1
        | F::BMI2
        | F::ADX
        | F::MOVDIRI
        | F::MULTIBYTENOP => Family::Integer,
        F::FPU | F::FPU287 | F::FPU387 | F::MMX => Family::X87Mmx,
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
        | F::SSE4A => Family::Sse,
        F::AVX
        | F::AVX2
        | F::FMA
        | F::F16C
        | F::VAES
        | F::VPCLMULQDQ
        | F::AVX_VNNI
        | F::AVX_IFMA
        | F::AVX_NE_CONVERT
        | F::AVX_VNNI_INT8
        | F::AVX_VNNI_INT16
        | F::AVX512F
        | F::AVX512BW
        | F::AVX512DQ
        | F::AVX512VL
        | F::AVX512CD
        | F::AVX512_VBMI
        | F::AVX512_VBMI2
        | F::AVX512_VNNI
        | F::AVX512_BITALG
        | F::AVX512_VPOPCNTDQ
        | F::AVX512_IFMA
        | F::AVX512_BF16
        | F::AVX512_FP16 => Family::Avx,
        _ => return None,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Integer,
    X87Mmx,
    Sse,
    Avx,
}

fn is_stack_pointer(reg: Register) -> bool {
    reg != Register::None && reg.full_register() == Register::RSP
}

fn is_system_register(reg: Register) -> bool {
    reg.is_segment_register()
        || reg.is_cr()
        || reg.is_dr()
        || reg.is_tr()
        || reg.is_bnd()
        || reg.is_tmm()
}

/// Decides whether `instr` may run in a stub.
pub fn classify(instr: &Instruction) -> Result<Class, Deny> {
    if instr.is_invalid() {
        return Err("invalid instruction");
    }
    if matches!(instr.mnemonic(), M::Ud0 | M::Ud1 | M::Ud2) {
        return Ok(Class {
            vector: false,
            x87_mmx: false,
            vex: false,
            kind: Kind::Undefined,
        });
    }
    if crate::emulator::is_selector_instruction(instr.mnemonic()) {
        return Ok(Class {
            vector: false,
            x87_mmx: false,
            vex: false,
            kind: Kind::Selector,
        });
    }
    if instr.flow_control() != FlowControl::Next {
        return Err(
            if instr.is_jmp_far_indirect() || instr.is_call_far_indirect() {
                "far transfer through memory (a segment load)"
            } else {
                "control flow"
            },
        );
    }
    if instr.is_stack_instruction() || instr.stack_pointer_increment() != 0 {
        return Err("uses the stack");
    }
    if instr.is_privileged() {
        return Err("privileged");
    }
    if instr.is_string_instruction() {
        return Err("string instruction (implicit memory)");
    }
    if instr.is_vsib() {
        if !crate::emulator::is_vsib_move(instr.mnemonic()) {
            return Err("prefetch gather/scatter (Xeon Phi)");
        }
        return Ok(Class {
            vector: true,
            x87_mmx: false,
            vex: true,
            kind: Kind::Vsib,
        });
    }
    if crate::emulator::is_masked_implicit_store(instr.mnemonic()) {
        return Ok(Class {
            vector: true,
            x87_mmx: instr.mnemonic() == M::Maskmovq,
            vex: instr.mnemonic() == M::Vmaskmovdqu,
            kind: Kind::MaskedImplicit,
        });
    }
    if crate::emulator::is_direct_store_64(instr.mnemonic()) {
        return Ok(Class {
            vector: false,
            x87_mmx: false,
            vex: false,
            kind: Kind::DirectStore,
        });
    }
    if let Some(class) = whole_state(instr.mnemonic()) {
        return Ok(class);
    }
    if let Some(kind) = cache_kind(instr.mnemonic()) {
        return Ok(Class {
            vector: false,
            x87_mmx: false,
            vex: false,
            kind,
        });
    }
    let mut memory_ops = 0;
    for i in 0..instr.op_count() {
        match instr.op_kind(i) {
            OpKind::Memory => memory_ops += 1,
            OpKind::Register => {
                let reg = instr.op_register(i);
                if is_stack_pointer(reg) {
                    return Err("RSP operand");
                }
                if is_system_register(reg) {
                    return Err("system or segment register operand");
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {}
            _ => return Err("implicit memory or branch operand"),
        }
    }
    if memory_ops > 1 {
        return Err("more than one memory operand");
    }
    let mnemonic = instr.mnemonic();
    if memory_ops == 1 && mnemonic == M::Lea {
        return Err("address-only memory operand");
    }
    // BT* with a register bit offset reach beyond the operand.
    if memory_ops == 1
        && matches!(mnemonic, M::Bt | M::Bts | M::Btr | M::Btc)
        && instr.op_kind(1) == OpKind::Register
    {
        return Err("bit string with register offset");
    }
    if mnemonic == M::Xlatb {
        return Err("implicit memory");
    }

    let mut class = Class {
        vector: false,
        x87_mmx: false,
        vex: false,
        kind: Kind::Plain,
    };
    for &f in instr.cpuid_features() {
        match feature_family(f).ok_or("CPUID feature not allowed")? {
            Family::Integer => {
                if !INTEGER.contains(&mnemonic) {
                    return Err("integer instruction not allow-listed");
                }
                // FWAIT raises a pending x87 exception: it needs the state.
                if mnemonic == M::Wait {
                    class.vector = true;
                    class.x87_mmx = true;
                }
            }
            Family::X87Mmx => {
                if X87_DENIED.contains(&mnemonic) {
                    return Err("x87 environment instruction");
                }
                class.vector = true;
                class.x87_mmx = true;
            }
            Family::Sse | Family::Avx => {
                if SIMD_DENIED.contains(&mnemonic) {
                    return Err("SIMD instruction not allow-listed");
                }
                // CRC32 is listed under SSE4.2 but is integer-only.
                class.vector |= mnemonic != M::Crc32;
            }
        }
    }
    class.vex = matches!(
        instr.encoding(),
        iced_x86::EncodingKind::VEX | iced_x86::EncodingKind::EVEX | iced_x86::EncodingKind::XOP
    );
    if matches!(
        instr.encoding(),
        iced_x86::EncodingKind::XOP | iced_x86::EncodingKind::MVEX | iced_x86::EncodingKind::D3NOW
    ) {
        return Err("encoding not allowed");
    }
    Ok(class)
}
