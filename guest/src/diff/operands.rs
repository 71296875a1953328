//! Operands of the generated forms: the fixed registers, the memory
//! operand kinds (plain, VSIB, moffs, implicit registers) and the short
//! flag-neutral set-up code (`lea`, mask and index set-ups) that runs right
//! before an instruction.

use iced_x86::{
    Code, Encoder, Instruction, InstructionInfoFactory, MemoryOperand, Mnemonic,
    OpCodeOperandKind as K, OpKind, Register,
};

/// imm8 used by every form (selects behaviour for shuffles, compares...).
pub const IMM8: u8 = 0x1b;

pub(super) const GPR8: [Register; 4] = [Register::CL, Register::DL, Register::SIL, Register::DIL];
pub(super) const GPR16: [Register; 4] = [Register::CX, Register::DX, Register::SI, Register::DI];
pub(super) const GPR32: [Register; 4] =
    [Register::ECX, Register::EDX, Register::ESI, Register::EDI];
pub(super) const GPR64: [Register; 4] =
    [Register::RCX, Register::RDX, Register::RSI, Register::RDI];
pub(super) const XMM: [Register; 4] = [
    Register::XMM1,
    Register::XMM2,
    Register::XMM3,
    Register::XMM4,
];
pub(super) const YMM: [Register; 4] = [
    Register::YMM1,
    Register::YMM2,
    Register::YMM3,
    Register::YMM4,
];
pub(super) const ZMM: [Register; 4] = [
    Register::ZMM1,
    Register::ZMM2,
    Register::ZMM3,
    Register::ZMM4,
];
pub(super) const KREG: [Register; 3] = [Register::K2, Register::K3, Register::K4];
pub(super) const MM: [Register; 3] = [Register::MM1, Register::MM2, Register::MM3];

/// The value of AL every form starts with (low byte of RAX in
/// `program::INIT_GPRS`): XLAT's RBX is placed so that RBX+AL is inside
/// the window.
pub(super) const INIT_AL: i32 = 0xef;

/// EAX (the low half of the requested-feature bitmap) for the XSAVE
/// family: RAX's usual pattern without PKRU (bit 9) and the AMX and APX
/// components (bits 17-19). Natively at CPL 3 the host's XCR0 applies,
/// which may enable those; the guest's XCR0 (the components KVM saves)
/// never does, so requesting them would compare two different XCR0s, not
/// the VMM against the CPU. Bits the XCR0s share or both lack stay.
pub const XSAVE_RFBM_LOW: u32 = 0x89ab_cdef & !((1 << 9) | (0b111 << 17));

/// The bit offset BT* forms with a register offset test: bit 5 of byte 45,
/// inside the 64-byte window (the register would otherwise reach up to
/// 2^(n-3) bytes away, outside what is compared).
pub(super) const BT_BIT_OFFSET: u32 = 45 * 8 + 5;

/// RCX for REP-prefixed string instructions: three elements of up to 8
/// bytes from `[rbp]` and to `[rbp+32]` stay inside the 64-byte window.
pub(super) const STRING_COUNT: u32 = 3;

/// Operand choices of one code.
#[derive(Default)]
pub(super) struct Slots {
    gpr: usize,
    vec: usize,
    k: usize,
    mm: usize,
}

/// The memory operand `[rbp]`.
pub(super) fn set_rbp_mem(ins: &mut Instruction, i: u32) {
    ins.set_op_kind(i, OpKind::Memory);
    ins.set_memory_base(Register::RBP);
    ins.set_memory_displ_size(1);
}

/// Fills operand `i` of kind `kind`; `mem` says whether an `*_or_mem`
/// operand becomes the memory operand. Returns why a kind is not built.
pub(super) fn fill(
    ins: &mut Instruction,
    i: u32,
    kind: K,
    mem: bool,
    s: &mut Slots,
) -> Result<(), &'static str> {
    let reg = |set: &[Register], n: &mut usize| -> Option<Register> {
        let r = set.get(*n).copied();
        *n += 1;
        r
    };
    let vsib = |ins: &mut Instruction, index: Register| {
        set_rbp_mem(ins, i);
        ins.set_memory_index(index);
        ins.set_memory_index_scale(1);
    };
    let r = match kind {
        k if mem && is_or_mem(k) => {
            set_rbp_mem(ins, i);
            return Ok(());
        }
        K::mem => {
            set_rbp_mem(ins, i);
            return Ok(());
        }
        K::mem_vsib32x | K::mem_vsib64x => {
            vsib(ins, Register::XMM0);
            return Ok(());
        }
        K::mem_vsib32y | K::mem_vsib64y => {
            vsib(ins, Register::YMM0);
            return Ok(());
        }
        K::mem_vsib32z | K::mem_vsib64z => {
            vsib(ins, Register::ZMM0);
            return Ok(());
        }
        // Filled in by the caller (absolute address per buffer).
        K::mem_offs => {
            ins.set_op_kind(i, OpKind::Memory);
            return Ok(());
        }
        // Implicit operands: the registers are loaded by `pre`.
        K::seg_rSI => {
            ins.set_op_kind(i, OpKind::MemorySegRSI);
            return Ok(());
        }
        K::es_rDI => {
            ins.set_op_kind(i, OpKind::MemoryESRDI);
            return Ok(());
        }
        K::seg_rDI => {
            ins.set_op_kind(i, OpKind::MemorySegRDI);
            return Ok(());
        }
        K::seg_rBX_al => {
            ins.set_op_kind(i, OpKind::Memory);
            ins.set_memory_base(Register::RBX);
            ins.set_memory_index(Register::AL);
            return Ok(());
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
        // Segment loads (`mov es, m16`): ES is unused in 64-bit mode.
        K::seg_reg => Some(Register::ES),
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
        K::mem_mpx | K::mem_mib | K::bnd_or_mem_mpx | K::bnd_reg => {
            return Err("MPX bound operand")
        }
        K::r32_or_mem_mpx | K::r64_or_mem_mpx => return Err("MPX bound operand"),
        K::sibmem | K::tmm_reg | K::tmm_rm | K::tmm_vvvv => return Err("AMX tile operand"),
        K::cr_reg | K::dr_reg | K::tr_reg => return Err("control/debug register"),
        K::kp1_reg | K::xmmp3_vvvv | K::zmmp3_vvvv => {
            return Err("register block (4FMAPS/VP2INTERSECT)")
        }
        _ => return Err("branch target or other operand"),
    };
    match r {
        Some(r) => {
            ins.set_op_kind(i, OpKind::Register);
            ins.set_op_register(i, r);
            Ok(())
        }
        None => Err("more register operands than the fixed set"),
    }
}

pub(super) fn imm(ins: &mut Instruction, i: u32, kind: OpKind, v: u64) -> Result<(), &'static str> {
    ins.set_op_kind(i, kind);
    ins.try_set_immediate_u64(i, v)
        .map_err(|_| "immediate out of range")
}

pub(super) fn is_or_mem(k: K) -> bool {
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
            | K::r32_or_mem_mpx
            | K::r64_or_mem_mpx
            | K::bnd_or_mem_mpx
    )
}

/// An operand kind that is always a memory operand (explicit or implicit).
pub(super) fn is_memory_kind(k: K) -> bool {
    matches!(
        k,
        K::mem
            | K::mem_offs
            | K::mem_mpx
            | K::mem_mib
            | K::mem_vsib32x
            | K::mem_vsib64x
            | K::mem_vsib32y
            | K::mem_vsib64y
            | K::mem_vsib32z
            | K::mem_vsib64z
            | K::seg_rSI
            | K::es_rDI
            | K::seg_rDI
            | K::seg_rBX_al
            | K::sibmem
    )
}

/// Encodes one helper instruction for `pre`.
pub(super) fn encode_helper(ins: Result<Instruction, iced_x86::IcedError>) -> Vec<u8> {
    let ins = ins.expect("helper instruction is valid");
    let mut enc = Encoder::new(64);
    enc.encode(&ins, 0).expect("helper instruction encodes");
    enc.take_buffer()
}

/// The mask set-ups of an AVX2 gather (VEX, mask in a vector register):
/// every element (all ones), and only the elements in the low 8 bytes of
/// each 128-bit lane (all ones shifted right by 8 bytes). Both leave the
/// flags alone.
pub(super) fn gather_masks(dec: &Instruction) -> Vec<(&'static str, Vec<u8>)> {
    let mask = dec.op2_register();
    let ymm = mask.is_ymm();
    let (all, shift) = if ymm {
        (
            Code::VEX_Vpcmpeqd_ymm_ymm_ymmm256,
            Code::VEX_Vpsrldq_ymm_ymm_imm8,
        )
    } else {
        (
            Code::VEX_Vpcmpeqd_xmm_xmm_xmmm128,
            Code::VEX_Vpsrldq_xmm_xmm_imm8,
        )
    };
    let ones = encode_helper(Instruction::with3(all, mask, mask, mask));
    let mut half = ones.clone();
    half.extend(encode_helper(Instruction::with3(shift, mask, mask, 8)));
    vec![
        ("mask: all elements", ones),
        ("mask: half the elements", half),
    ]
}

/// The window of a gather or scatter whose indices were multiplied by 128:
/// the largest index (52 * 128) plus an 8-byte element, rounded up; it
/// spans two pages.
pub const VSIB_FAR_WINDOW: usize = (52 * 128 + 8usize).div_ceil(64) * 64;

/// Shifts the VSIB index register left by 7 (flags untouched), so the
/// elements land up to 6.5 KiB apart.
pub(super) fn spread_index(dec: &Instruction) -> Vec<u8> {
    let index = dec.memory_index();
    let qword = dec.is_vsib64();
    let code = match (index.is_zmm(), index.is_ymm(), qword) {
        (true, _, false) => Code::EVEX_Vpslld_zmm_k1z_zmmm512b32_imm8,
        (true, _, true) => Code::EVEX_Vpsllq_zmm_k1z_zmmm512b64_imm8,
        (false, true, false) => Code::VEX_Vpslld_ymm_ymm_imm8,
        (false, true, true) => Code::VEX_Vpsllq_ymm_ymm_imm8,
        (false, false, false) => Code::VEX_Vpslld_xmm_xmm_imm8,
        (false, false, true) => Code::VEX_Vpsllq_xmm_xmm_imm8,
    };
    encode_helper(Instruction::with3(code, index, index, 7))
}

/// `lea reg, [base + disp]`: loads an address without touching the flags.
pub(super) fn lea(reg: Register, base: Register, disp: i64) -> Vec<u8> {
    let ins = Instruction::with2(
        Code::Lea_r64_m,
        reg,
        MemoryOperand::with_base_displ(base, disp),
    )
    .expect("lea r64, m is a valid form");
    let mut enc = Encoder::new(64);
    enc.encode(&ins, 0).expect("lea encodes");
    enc.take_buffer()
}

/// The register an implicit memory operand (of a code with no memory
/// operand kind) is addressed by, if any: CLZERO and MONITORX use rAX.
/// `None` with `Some(stack)` means the only implicit memory is the stack.
pub(super) fn implicit_memory_base(ins: &Instruction) -> Option<Register> {
    use Mnemonic as M;
    // iced's instruction info leaves these out for an operand-less
    // instruction: the address is rAX.
    if matches!(ins.mnemonic(), M::Clzero | M::Monitorx | M::Monitor) {
        return Some(Register::RAX);
    }
    let mut f = InstructionInfoFactory::new();
    let info = f.info(ins);
    info.used_memory()
        .iter()
        .map(|m| m.base())
        .find(|b| *b != Register::None)
}
