//! One VM image per chunk of forms.
//!
//! Layout of the image (loaded at [`LOAD_ADDR`]): a jump over a data block
//! at fixed addresses (initial FXSAVE image, vector and opmask values, the
//! operand buffer's initial bytes, variables), then the driver, the shared
//! prologues and epilogues, and one short routine per form:
//!
//! ```text
//! case_i: lea rax,[resume_i]; mov [kernel.resume_rip],rax
//!         call prologue_X        ; buffer, FXRSTOR, ZMM, K, GPRs, RFLAGS
//!         <the instruction>
//! resume_i:
//!         call epilogue_X        ; RFLAGS, GPRs, exception, buffer, FXSAVE, ZMM, K
//!         ret
//! ```
//!
//! The same routines run in all four ways: the driver only changes the
//! operand buffer's address (RBP) and the result table pointer. Shared
//! prologues keep the per-form code small, so chunks of hundreds of forms
//! fit below the kernel's stacks.

use super::record::*;
use super::{host, Form, Way};
use crate::rt::kernel64::{sys_exit, Kernel64};
use crate::rt::{Asm, AsmResult, EXIT_PASS};
use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};

pub const LOAD_ADDR: u64 = 0x10_0000;
/// The image must end below the user stack's lowest use.
pub const IMAGE_LIMIT: u64 = 0x1c_0000;

/// Fixed addresses of the data block (right after the entry jump).
const INIT_FX: u64 = LOAD_ADDR + 0x40;
const INIT_VREGS: u64 = INIT_FX + 512;
const INIT_K: u64 = INIT_VREGS + 64 * VREG_COUNT as u64;
const INIT_MEM: u64 = INIT_K + 8 * KREG_COUNT as u64;
const VAR_MEM_BASE: u64 = INIT_MEM + MEM_LEN as u64;
const VAR_CUR_REC: u64 = VAR_MEM_BASE + 8;
const VAR_SCRATCH: u64 = VAR_CUR_REC + 8;
/// RSP at the form's instruction: the epilogue records how far the stack
/// moved, and the case restores it, so a form that faults with its stack
/// moved (QEMU TCG's near CALL to a non-canonical target pushes first)
/// cannot unbalance the cases after it.
const VAR_CASE_RSP: u64 = VAR_SCRATCH + 8;
/// The state image whole-state forms start from (its length depends on the
/// host's XSAVE size), 64-byte aligned.
const INIT_STATE: u64 = (VAR_CASE_RSP + 8 + 63) & !63;

/// Element offsets in vector register 0, the VSIB index of every gather and
/// scatter: dword lanes 2i hold `VSIB_INDEX[i]`, odd dword lanes hold 0, so
/// read as dwords or as qwords the indices are small and every element of
/// a 4- or 8-byte gather lands in the 64-byte window. Several lanes (all
/// odd dword lanes, and qword lane 7) point at offset 0: overlapping
/// scatter elements show which one wins.
pub const VSIB_INDEX: [u32; 8] = [52, 8, 44, 20, 36, 28, 4, 0];

/// Initial GPRs (RAX..R15 in encoding order; RSP and RBP are not loaded).
/// Distinct patterns, CL a small shift count, and RAX/RDX equal to the
/// first two qwords of the buffer, so CMPXCHG* take their equal path.
pub const INIT_GPRS: [u64; 16] = [
    0x0123_4567_89ab_cdef,
    0xfedc_ba98_7654_320d,
    0x0000_0000_0000_7ffe,
    0x0f0e_0d0c_0b0a_0908,
    0,
    0,
    0x8000_0000_0000_0001,
    0x0000_0000_ffff_fffe,
    0x1111_2222_3333_4444,
    0x5555_6666_7777_8888,
    0x9999_aaaa_bbbb_cccc,
    0xdddd_eeee_ffff_0000,
    0x0000_0000_0000_0005,
    0xffff_ffff_ffff_ffff,
    0x3ff0_0000_0000_0000,
    0x4000_0000_3f80_0000,
];
/// RFLAGS before each form: CF, AF, SF, OF set; PF, ZF clear.
pub const INIT_FLAGS: u32 = 0x893;
/// K1 (the write mask) .. K4.
pub const INIT_K_VALUES: [u64; KREG_COUNT] = [
    0xa5a5_5a5a_c3c3_3c3c,
    0x0f0f_0f0f_f0f0_f0f0,
    0x3333_cccc_5555_aaaa,
    0xffff_0000_ffff_0000,
];

/// The operand buffer's initial bytes: RAX and RDX patterns, then floating
/// point and integer data.
pub fn init_mem() -> [u8; MEM_LEN] {
    let q: [u64; 8] = [
        INIT_GPRS[0],
        INIT_GPRS[2],
        0x3ff8_0000_0000_0000, // 1.5
        0x4049_0fdb_bfc0_0000, // pi, -1.5 (f32)
        0xc002_0000_0000_0000, // -2.25
        0x4000_c000_3c00_4248, // f16/f32 mix
        0x7f80_0001_0000_0001, // a signalling NaN (f32) and a denormal
        0x0102_0304_0506_0708,
    ];
    let mut b = [0u8; MEM_LEN];
    for (i, v) in q.iter().enumerate() {
        b[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// The FXRSTOR image every vector form starts from: FCW default (all
/// exceptions masked), TOP=6 with ST0 = 1.5 and ST1 = -2.25 valid, MXCSR
/// default, XMM0-15 patterns.
pub fn init_fx() -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    b[2..4].copy_from_slice(&(6u16 << 11).to_le_bytes());
    b[4] = 0xc0; // physical registers 6 and 7 valid
    b[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    // ST0 = 1.5, ST1 = -2.25 (80-bit: mantissa with explicit integer bit).
    b[32..40].copy_from_slice(&0xc000_0000_0000_0000u64.to_le_bytes());
    b[40..42].copy_from_slice(&0x3fffu16.to_le_bytes());
    b[48..56].copy_from_slice(&0x9000_0000_0000_0000u64.to_le_bytes());
    b[56..58].copy_from_slice(&0xc000u16.to_le_bytes());
    // The other slots (MMX registers for MMX forms): integer patterns.
    for i in 2..8 {
        let v = 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 * 0x11) ^ 0x8040_2010_0804_0201;
        b[32 + 16 * i..40 + 16 * i].copy_from_slice(&v.to_le_bytes());
    }
    for i in 0..16 {
        let lane = vreg_bytes(i, 16);
        b[160 + 16 * i..176 + 16 * i].copy_from_slice(&lane);
    }
    b
}

/// Initial bytes of vector register `r`: dword lanes alternate between
/// small floats and integer patterns; register 0 holds the VSIB indices.
fn vreg_bytes(r: usize, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    if r == 0 {
        for j in 0..len / 4 {
            let x = if j % 2 == 0 { VSIB_INDEX[j / 2 % 8] } else { 0 };
            v.extend_from_slice(&x.to_le_bytes());
        }
        return v;
    }
    for j in 0..len / 4 {
        let x: u32 = if j % 2 == 0 {
            ((r as f32 + 1.0) * (j as f32 + 1.0) * 0.75).to_bits()
        } else {
            0x9e37_79b9u32.wrapping_mul((r * 16 + j) as u32 + 1)
        };
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// The state image whole-state forms start from: a valid standard-format
/// XSAVE image (so FXRSTOR and XRSTOR load it, and FRSTOR/FLDENV read
/// well-defined bytes) whose values differ from the registers' initial
/// ones, so that a load shows in the registers.
pub fn init_state(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len.max(576)];
    b[..512].copy_from_slice(&init_fx());
    // FCW: another precision control; MXCSR: the invalid-operation flag.
    b[0..2].copy_from_slice(&0x027fu16.to_le_bytes());
    b[24..28].copy_from_slice(&0x1f81u32.to_le_bytes());
    // ST/MM slots and XMM0-15: other values.
    for x in &mut b[32..416] {
        *x ^= 0x5a;
    }
    // XSAVE header: XSTATE_BV names the components filled in below; the
    // compaction bit and the reserved bytes stay zero.
    let mut bv: u64 = 0b11;
    if host::avx() {
        bv |= 1 << 2;
    }
    if host::avx512() {
        bv |= 0b111 << 5;
    }
    for c in [2u32, 5, 6, 7] {
        if bv & (1 << c) == 0 {
            continue;
        }
        let (off, size) = host::xsave_component(c);
        if off + size > b.len() || off < 576 {
            bv &= !(1 << c);
            continue;
        }
        for (i, x) in b[off..off + size].iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(37) ^ (0xa5 + c as u8);
        }
    }
    b[512..520].copy_from_slice(&bv.to_le_bytes());
    // Past the XSAVE area (where far gather elements land): a pattern.
    let end = host::xsave_size().min(b.len());
    for (i, x) in b[end..].iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(29).wrapping_add(7);
    }
    b
}

/// A chunk's image and where each form's routine starts.
pub struct Chunk {
    pub image: Vec<u8>,
    /// Start address of each form's routine, for naming the form when a VM
    /// stops at a RIP.
    pub case_rips: Vec<u64>,
    /// Guest RAM the VM needs.
    pub mem_size: u64,
    /// Bytes of each saved vector register (64, 32, or 0 for XMM only).
    pub vreg_bytes: usize,
    /// Offset of each form's record in a way's table.
    pub record_offsets: Vec<usize>,
    /// Bytes of one way's table.
    pub table_len: usize,
}

impl Chunk {
    /// The index of the form whose routine contains `rip`.
    pub fn form_at(&self, rip: u64) -> Option<usize> {
        let i = self.case_rips.partition_point(|s| *s <= rip);
        (i > 0 && rip < self.case_rips[i - 1] + 0x1000).then(|| i - 1)
    }
}

/// What the prologue and epilogue of a form set up and save.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Vector,
    VectorK,
}

fn kind_of(f: &Form) -> Kind {
    match (f.vector || f.kregs, f.kregs) {
        (false, _) => Kind::Integer,
        (true, false) => Kind::Vector,
        (true, true) => Kind::VectorK,
    }
}

/// Assembles the VM image running `forms` every way.
pub fn build(forms: &[Form]) -> Result<Chunk, String> {
    assemble(forms).map_err(|e| e.to_string()).and_then(|c| {
        if table_addr(Way::ALL.len(), c.table_len) > SPLIT_BUF {
            Err(format!(
                "diff result tables of {} bytes per way do not fit below the split buffer: use smaller chunks",
                c.table_len
            ))
        } else if LOAD_ADDR + c.image.len() as u64 > IMAGE_LIMIT {
            Err(format!(
                "diff chunk image of {} bytes is too large: use smaller chunks",
                c.image.len()
            ))
        } else {
            Ok(c)
        }
    })
}

fn assemble(forms: &[Form]) -> Result<Chunk, IcedError> {
    let vbytes = if host::avx512() {
        64
    } else if host::avx() {
        32
    } else {
        0
    };
    let state_len = forms
        .iter()
        .filter(|f| f.state_image)
        .map(|f| f.mem_len)
        .max()
        .unwrap_or(0);
    let mut record_offsets = Vec::with_capacity(forms.len());
    let mut table_len = 0;
    for f in forms {
        record_offsets.push(table_len);
        table_len += record_size(f.mem_len);
    }
    let mut a = CodeAssembler::new(64)?;
    let k = Kernel64::new(&mut a)?;
    let mut start = a.create_label();
    a.set_prefer_short_branch(false);
    a.jmp(start)?;
    a.set_prefer_short_branch(true);
    // Data block at fixed addresses.
    let data_end = INIT_STATE + state_len as u64;
    let mut data = vec![0u8; (data_end - LOAD_ADDR) as usize - 5];
    let put = |data: &mut Vec<u8>, addr: u64, bytes: &[u8]| {
        let at = (addr - LOAD_ADDR) as usize - 5;
        data[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut data, INIT_FX, &init_fx());
    let mut vregs = Vec::new();
    for r in 0..VREG_COUNT {
        vregs.extend(vreg_bytes(r, 64));
    }
    put(&mut data, INIT_VREGS, &vregs);
    let kb: Vec<u8> = INIT_K_VALUES.iter().flat_map(|v| v.to_le_bytes()).collect();
    put(&mut data, INIT_K, &kb);
    put(&mut data, INIT_MEM, &init_mem());
    if state_len > 0 {
        put(&mut data, INIT_STATE, &init_state(state_len)[..state_len]);
    }
    a.db(&data)?;

    let mut run_all = a.create_label();
    a.set_label(&mut start)?;
    k.setup(&mut a)?;
    let mut user = a.create_label();
    let n = forms.len();
    // CPL 0 first: PVM interprets it only before the first drop to CPL 3.
    for way in [Way::KernelRam, Way::KernelMmio] {
        drive(&mut a, way, table_len, run_all)?;
    }
    k.enter_user(&mut a, user)?;
    a.set_label(&mut user)?;
    for way in [Way::Truth, Way::UserMmio, Way::UserSplit] {
        drive(&mut a, way, table_len, run_all)?;
    }
    sys_exit(&mut a, EXIT_PASS)?;

    // Prologues (with and without the 64-byte window fill) and epilogues
    // per kind, and the copy loop.
    let kinds = [Kind::Integer, Kind::Vector, Kind::VectorK];
    let mut pro: Vec<[CodeLabel; 2]> = kinds
        .iter()
        .map(|_| [a.create_label(), a.create_label()])
        .collect();
    let mut epi: Vec<CodeLabel> = kinds.iter().map(|_| a.create_label()).collect();
    for (i, kind) in kinds.into_iter().enumerate() {
        for (fill, label) in pro[i].iter_mut().enumerate() {
            a.set_label(label)?;
            prologue(&mut a, kind, vbytes, fill == 0)?;
        }
        a.set_label(&mut epi[i])?;
        epilogue(&mut a, &k, kind, vbytes)?;
    }
    // RSI -> RDI, ECX qwords (a plain loop: KVM completes each MMIO
    // access, where a string move could be refused).
    let mut copy_qwords = a.create_label();
    {
        a.set_label(&mut copy_qwords)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rsi, 8)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(copy_qwords)?;
        a.ret()?;
    }

    let mut case_labels = Vec::with_capacity(n);
    a.set_label(&mut run_all)?;
    for _ in 0..n {
        let l = a.create_label();
        a.call(l)?;
        case_labels.push(l);
    }
    a.ret()?;
    for (f, label) in forms.iter().zip(case_labels.iter_mut()) {
        let i = match kind_of(f) {
            Kind::Integer => 0,
            Kind::Vector => 1,
            Kind::VectorK => 2,
        };
        let mut resume = a.create_label();
        a.set_label(label)?;
        a.lea(rax, ptr(resume))?;
        a.mov(qword_ptr(k.resume_rip), rax)?;
        a.mov(qword_ptr(VAR_CASE_RSP), rsp)?;
        let prologue_label = if f.state_image {
            a.mov(rbp, qword_ptr(VAR_MEM_BASE))?;
            a.mov(rsi, INIT_STATE)?;
            a.mov(rdi, rbp)?;
            a.mov(ecx, (f.mem_len / 8) as u32)?;
            a.call(copy_qwords)?;
            pro[i][1]
        } else {
            pro[i][0]
        };
        let run = |a: &mut Asm, bytes: &[u8]| -> AsmResult {
            a.call(prologue_label)?;
            for b in [&f.pre[..], bytes, &f.post[..]] {
                if !b.is_empty() {
                    a.db(b)?;
                }
            }
            Ok(())
        };
        match &f.mmio_bytes {
            // moffs: the address is in the instruction, so each buffer has
            // its own encoding. The flags are set by the prologue after
            // the comparison.
            Some(mmio) => {
                let mut on_mmio = a.create_label();
                a.mov(rax, qword_ptr(VAR_MEM_BASE))?;
                a.mov(rcx, MMIO_BASE)?;
                a.cmp(rax, rcx)?;
                a.je(on_mmio)?;
                run(&mut a, &f.bytes)?;
                a.jmp(resume)?;
                a.set_label(&mut on_mmio)?;
                run(&mut a, mmio)?;
            }
            None => run(&mut a, &f.bytes)?,
        }
        a.set_label(&mut resume)?;
        a.call(epi[i])?;
        if f.mem_len > MEM_LEN {
            // The rest of the window follows the fixed record.
            let extra = f.mem_len - MEM_LEN;
            a.lea(rsi, ptr(rbp + MEM_LEN as i32))?;
            a.mov(rdi, qword_ptr(VAR_CUR_REC))?;
            a.mov(ecx, (extra / 8) as u32)?;
            a.call(copy_qwords)?;
            a.add(qword_ptr(VAR_CUR_REC), extra as i32)?;
        }
        a.mov(rsp, qword_ptr(VAR_CASE_RSP))?;
        a.ret()?;
    }
    k.finish(&mut a)?;

    let res = a.assemble_options(
        LOAD_ADDR,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let image = res.inner.code_buffer.clone();
    let mut case_rips = Vec::with_capacity(n);
    for l in &case_labels {
        case_rips.push(res.label_ip(l)?);
    }
    Ok(Chunk {
        image,
        case_rips,
        mem_size: GUEST_RAM,
        vreg_bytes: vbytes,
        record_offsets,
        table_len,
    })
}

/// The operand buffer a way uses: guest RAM or the MMIO window.
pub fn buffer_of(way: Way) -> u64 {
    match way {
        Way::Truth | Way::KernelRam => RAM_BUF,
        Way::UserMmio | Way::KernelMmio => MMIO_BASE,
        Way::UserSplit => SPLIT_BUF,
    }
}

/// Runs every form once in `way`: sets the buffer address and the table.
fn drive(a: &mut Asm, way: Way, table_len: usize, run_all: CodeLabel) -> AsmResult {
    let buf = buffer_of(way);
    a.mov(rax, buf)?;
    a.mov(qword_ptr(VAR_MEM_BASE), rax)?;
    a.mov(rax, table_addr(way.index(), table_len))?;
    a.mov(qword_ptr(VAR_CUR_REC), rax)?;
    a.call(run_all)
}

/// Sets up a form's state; `fill_window` copies the 64-byte data pattern
/// into the operand window (whole-state forms have filled theirs).
fn prologue(a: &mut Asm, kind: Kind, vbytes: usize, fill_window: bool) -> AsmResult {
    a.mov(rbp, qword_ptr(VAR_MEM_BASE))?;
    if fill_window {
        for i in 0..(MEM_LEN / 8) as i32 {
            a.mov(rax, qword_ptr(INIT_MEM + 8 * i as u64))?;
            a.mov(qword_ptr(rbp + 8 * i), rax)?;
        }
    }
    if kind != Kind::Integer {
        // Whole x87/SSE state in one instruction, which KVM's own emulator
        // completes at CPL 0.
        a.fxrstor64(ptr(INIT_FX))?;
        // Whole-state stores save every vector register, not only the
        // compared ones: clear the upper halves (and ZMM16-31) so nothing
        // an earlier form left there reaches the window.
        if !fill_window && vbytes >= 32 {
            a.vzeroupper()?;
            if vbytes == 64 {
                for r in [
                    zmm16, zmm17, zmm18, zmm19, zmm20, zmm21, zmm22, zmm23, zmm24, zmm25, zmm26,
                    zmm27, zmm28, zmm29, zmm30, zmm31,
                ] {
                    a.vpxord(r, r, r)?;
                }
            }
        }
        for r in 0..VREG_COUNT {
            let src = INIT_VREGS + 64 * r as u64;
            match vbytes {
                64 => a.vmovdqu64(zmm_reg(r), zmmword_ptr(src))?,
                32 => a.vmovdqu(ymm_reg(r), ymmword_ptr(src))?,
                _ => {}
            }
        }
    }
    if kind == Kind::VectorK {
        for (r, kr) in [k1, k2, k3, k4].into_iter().enumerate() {
            a.kmovq(kr, qword_ptr(INIT_K + 8 * r as u64))?;
        }
        // The other opmask registers are in every XSAVE image: zero, not
        // whatever an earlier form (an XRSTOR) left, which differs between
        // the ways (seen on Intel with AVX-512).
        for kr in [k0, k5, k6, k7] {
            a.kxorq(kr, kr, kr)?;
        }
    }
    for (i, r) in gprs().into_iter().enumerate() {
        if let Some(r) = r {
            if r != rbp {
                a.mov(r, INIT_GPRS[i])?;
            }
        }
    }
    a.push(INIT_FLAGS as i32)?;
    a.popfq()?;
    a.ret()
}

fn epilogue(a: &mut Asm, k: &Kernel64, kind: Kind, vbytes: usize) -> AsmResult {
    // [rsp] is the return address; flags first, before anything changes them.
    a.pushfq()?;
    a.mov(qword_ptr(VAR_SCRATCH), rax)?;
    a.mov(rax, qword_ptr(VAR_CUR_REC))?;
    for (i, r) in gprs().into_iter().enumerate() {
        if let Some(r) = r {
            if r != rax {
                a.mov(qword_ptr(rax + (GPRS + 8 * i) as i32), r)?;
            }
        }
    }
    a.mov(rcx, qword_ptr(VAR_SCRATCH))?;
    a.mov(qword_ptr(rax + GPRS as i32), rcx)?;
    a.pop(rcx)?;
    a.mov(qword_ptr(rax + RFLAGS as i32), rcx)?;
    // RSP's slot: the stack's move since the instruction (the caller's RSP
    // is above this call's return address).
    a.lea(rcx, ptr(rsp + 8))?;
    a.sub(rcx, qword_ptr(VAR_CASE_RSP))?;
    a.mov(qword_ptr(rax + RSP_CHANGE as i32), rcx)?;
    // The exception, if any (the kernel cleared resume_rip when it took one).
    a.mov(rcx, qword_ptr(k.resume_rip))?;
    a.test(rcx, rcx)?;
    let mut none = a.create_label();
    let mut stored = a.create_label();
    a.jnz(none)?;
    a.mov(rcx, qword_ptr(k.exc_vector))?;
    a.mov(qword_ptr(rax + EXC_VECTOR as i32), rcx)?;
    a.mov(rcx, qword_ptr(k.exc_error))?;
    a.mov(qword_ptr(rax + EXC_ERROR as i32), rcx)?;
    a.jmp(stored)?;
    a.set_label(&mut none)?;
    a.mov(qword_ptr(rax + EXC_VECTOR as i32), -1)?;
    a.mov(qword_ptr(k.resume_rip), 0)?;
    a.set_label(&mut stored)?;
    for i in 0..(MEM_LEN / 8) as i32 {
        a.mov(rcx, qword_ptr(rbp + 8 * i))?;
        a.mov(qword_ptr(rax + MEM as i32 + 8 * i), rcx)?;
    }
    if kind != Kind::Integer {
        a.fxsave64(ptr(rax + FXSAVE as i32))?;
        for r in 0..VREG_COUNT {
            let dst = rax + (VREGS + vbytes * r) as i32;
            match vbytes {
                64 => a.vmovdqu64(zmmword_ptr(dst), zmm_reg(r))?,
                32 => a.vmovdqu(ymmword_ptr(dst), ymm_reg(r))?,
                _ => {}
            }
        }
    }
    if kind == Kind::VectorK {
        for (r, kr) in [k1, k2, k3, k4].into_iter().enumerate() {
            a.kmovq(qword_ptr(rax + (KREGS + 8 * r) as i32), kr)?;
        }
    }
    a.add(qword_ptr(VAR_CUR_REC), RECORD as i32)?;
    a.ret()
}

/// RAX..R15 in encoding order; `None` for RSP.
fn gprs() -> [Option<AsmRegister64>; 16] {
    [
        Some(rax),
        Some(rcx),
        Some(rdx),
        Some(rbx),
        None,
        Some(rbp),
        Some(rsi),
        Some(rdi),
        Some(r8),
        Some(r9),
        Some(r10),
        Some(r11),
        Some(r12),
        Some(r13),
        Some(r14),
        Some(r15),
    ]
}

fn zmm_reg(i: usize) -> AsmRegisterZmm {
    [zmm0, zmm1, zmm2, zmm3, zmm4][i]
}

fn ymm_reg(i: usize) -> AsmRegisterYmm {
    [ymm0, ymm1, ymm2, ymm3, ymm4][i]
}
