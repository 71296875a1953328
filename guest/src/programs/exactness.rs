//! What a guest can see of an exception's side state, the same three ways
//! the differential test uses: at CPL 0 on RAM (on PVM hosts KVM hands
//! every SIMD/x87 instruction there to the VMM), at CPL 3 on MMIO (the VMM
//! completes it on every kind of KVM), and at CPL 3 on RAM, natively: the
//! ground truth. The test compares the first two with the third.
//!
//! Also the KVM-owned defects the differential test found: instructions
//! KVM's own emulator runs without ever exiting to the VMM, so only KVM can
//! fix them; `kvm-defects` shows each one for an upstream report.

use super::{assemble, expect, LOAD_ADDR, MMIO_BASE, MMIO_SIZE};
use crate::rt::kernel64::{sys_exit, sys_print, sys_report, Kernel64};
use crate::rt::{status_of, Asm, AsmResult, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Values each way records (see `emit_way`).
pub const EXACTNESS_VALUES: usize = 7;
/// The names of those values, for the test's messages.
pub const EXACTNESS_NAMES: [&str; EXACTNESS_VALUES] = [
    "#XM vector",
    "MXCSR after #XM",
    "#MF vector",
    "FSW after fdiv",
    "FOP",
    "FIP - fdiv address",
    "FDP - operand address",
];

/// Operand block: +0 MXCSR with ZM clear, +4 1.0f, +8 0.0f, +12 FCW with
/// ZM clear, +16 MXCSR default; 64 bytes, on RAM or MMIO.
const OPS_MXCSR: i32 = 0;
const OPS_ONE: i32 = 4;
const OPS_ZERO: i32 = 8;
const OPS_FCW: i32 = 12;
const OPS_MXCSR_DEFAULT: i32 = 16;

/// Writes the operand block at RBX (plain stores: KVM completes them on
/// MMIO too).
fn fill_operands(a: &mut Asm) -> AsmResult {
    a.mov(dword_ptr(rbx + OPS_MXCSR), 0x1d80u32)?;
    a.mov(dword_ptr(rbx + OPS_ONE), 1.0f32.to_bits())?;
    a.mov(dword_ptr(rbx + OPS_ZERO), 0u32)?;
    a.mov(dword_ptr(rbx + OPS_FCW), 0x37bu32)?;
    a.mov(dword_ptr(rbx + OPS_MXCSR_DEFAULT), 0x1f80u32)
}

/// One way: operands at RBX, results to the table at RDI, scratch (FNSTENV
/// area, MXCSR store) at RSI (RAM). Exceptions resume through the
/// kernel's `resume_rip`.
fn emit_way(a: &mut Asm, k: &Kernel64) -> AsmResult {
    fill_operands(a)?;
    // #XM: 1.0 / 0.0 with ZM clear (the first LDMXCSR is the one issue 10
    // saw lost at CPL 0 while the XMM registers are all zero).
    a.ldmxcsr(dword_ptr(rbx + OPS_MXCSR))?;
    a.movss(xmm0, dword_ptr(rbx + OPS_ONE))?;
    let mut after_xm = a.create_label();
    a.lea(rax, ptr(after_xm))?;
    a.mov(qword_ptr(k.resume_rip), rax)?;
    a.mov(qword_ptr(k.exc_vector), 0xff)?;
    a.divss(xmm0, dword_ptr(rbx + OPS_ZERO))?;
    a.set_label(&mut after_xm)?;
    a.mov(qword_ptr(k.resume_rip), 0)?;
    a.mov(rax, qword_ptr(k.exc_vector))?;
    a.mov(qword_ptr(rdi), rax)?;
    a.stmxcsr(dword_ptr(rsi))?;
    a.mov(eax, dword_ptr(rsi))?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    a.ldmxcsr(dword_ptr(rbx + OPS_MXCSR_DEFAULT))?;

    // x87: fdiv by zero with ZM clear leaves the exception pending, FWAIT
    // raises #MF, and the environment still names fdiv (FOP, FIP, FDP).
    a.fninit()?;
    a.fldcw(word_ptr(rbx + OPS_FCW))?;
    a.fld1()?;
    let mut fdiv = a.create_label();
    a.set_label(&mut fdiv)?;
    a.fdiv(dword_ptr(rbx + OPS_ZERO))?;
    // FWAIT before FNSTENV: FNSTENV masks every exception once it stored
    // the environment, so a later FWAIT would not fault.
    let mut after_mf = a.create_label();
    a.lea(rax, ptr(after_mf))?;
    a.mov(qword_ptr(k.resume_rip), rax)?;
    a.mov(qword_ptr(k.exc_vector), 0xff)?;
    a.wait()?;
    a.set_label(&mut after_mf)?;
    a.mov(qword_ptr(k.resume_rip), 0)?;
    a.fnstenv(ptr(rsi + 64))?;
    a.mov(rax, qword_ptr(k.exc_vector))?;
    a.mov(qword_ptr(rdi + 16), rax)?;
    a.movzx(eax, word_ptr(rsi + 64 + 4))?; // FSW
    a.mov(qword_ptr(rdi + 24), rax)?;
    a.movzx(eax, word_ptr(rsi + 64 + 18))?; // FOP (11 bits)
    a.and(eax, 0x7ff)?;
    a.mov(qword_ptr(rdi + 32), rax)?;
    a.mov(eax, dword_ptr(rsi + 64 + 12))?; // FIP offset
    a.lea(rcx, ptr(fdiv))?;
    a.sub(eax, ecx)?;
    a.mov(qword_ptr(rdi + 40), rax)?;
    a.mov(eax, dword_ptr(rsi + 64 + 20))?; // FDP offset
    a.lea(rcx, qword_ptr(rbx + OPS_ZERO))?;
    a.sub(eax, ecx)?;
    a.mov(qword_ptr(rdi + 48), rax)?;
    a.fninit()
}

/// `exactness`: #XM's MXCSR flags, a pending x87 exception's FSW, FOP, FIP
/// and FDP and the #MF it raises, three ways; then at CPL 0 a VEX load
/// after XSETBV turned AVX state off (#UD, as the CPU gives).
pub fn exactness() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut table = a.create_label();
        let mut scratch = a.create_label();
        let mut ram_ops = a.create_label();
        let mut user = a.create_label();
        k.setup(a)?;
        // Way 1: CPL 0, operands in RAM.
        a.lea(rbx, ptr(ram_ops))?;
        a.lea(rdi, ptr(table))?;
        a.lea(rsi, ptr(scratch))?;
        emit_way(a, &k)?;
        // XCR0 = x87|SSE, then a 256-bit load: #UD. Restore XCR0 from
        // CPUID leaf 0xD (what the VMM entered with).
        a.xor(ecx, ecx)?;
        a.mov(eax, 3)?;
        a.xor(edx, edx)?;
        a.xsetbv()?;
        let mut after_ud = a.create_label();
        a.lea(rax, ptr(after_ud))?;
        a.mov(qword_ptr(k.resume_rip), rax)?;
        a.mov(qword_ptr(k.exc_vector), 0xff)?;
        a.vmovups(ymm1, ptr(rbx))?;
        a.set_label(&mut after_ud)?;
        a.mov(qword_ptr(k.resume_rip), 0)?;
        a.mov(rax, qword_ptr(k.exc_vector))?;
        a.lea(rdi, ptr(table))?;
        a.mov(qword_ptr(rdi + 3 * 8 * EXACTNESS_VALUES as i32), rax)?;
        a.mov(eax, 0xd)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.xor(ecx, ecx)?;
        a.xsetbv()?;
        k.enter_user(a, user)?;

        a.set_label(&mut user)?;
        // Way 2: CPL 3, operands on MMIO.
        a.mov(rbx, MMIO_BASE)?;
        a.lea(rdi, ptr(table))?;
        a.add(rdi, 8 * EXACTNESS_VALUES as i32)?;
        a.lea(rsi, ptr(scratch))?;
        emit_way(a, &k)?;
        // Way 3: CPL 3, operands in RAM: the CPU's own answer.
        a.lea(rbx, ptr(ram_ops))?;
        a.lea(rdi, ptr(table))?;
        a.add(rdi, 2 * 8 * EXACTNESS_VALUES as i32)?;
        a.lea(rsi, ptr(scratch))?;
        emit_way(a, &k)?;
        a.lea(rdi, ptr(table))?;
        for i in 0..3 * EXACTNESS_VALUES + 1 {
            a.mov(rax, qword_ptr(rdi + 8 * i as i32))?;
            a.push(rdi)?;
            sys_report(a, rax)?;
            a.pop(rdi)?;
        }
        sys_print(a, "exactness recorded\n")?;
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)?;
        a.set_label(&mut ram_ops)?;
        a.dq(&[0; 8])?;
        a.set_label(&mut scratch)?;
        a.dq(&[0; 32])?;
        a.set_label(&mut table)?;
        a.dq(&[0; 3 * EXACTNESS_VALUES + 1])
    })?;
    Ok(Program::new(
        "exactness",
        "#XM MXCSR flags, pending x87 exception state (FSW/FOP/FIP/FDP, #MF) at CPL 0 and on MMIO vs native; VEX #UD after XSETBV drops AVX",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(status_of(EXIT_PASS), "exactness recorded", None),
    )
    .with_mmio_ram(vec![(MMIO_BASE, MMIO_SIZE)]))
}

/// Values `kvm-defects` reports: per case the CPL 0 result, then the
/// native CPL 3 one.
pub const DEFECT_NAMES: [&str; 4] = [
    "lzcnt eax, ebx (ebx = 1)",
    "tzcnt eax, ebx (ebx = 0)",
    "movbe eax, [mem] (vector or value)",
    "failed cmpxchg ebx, ecx: rbx",
];

/// One pass over the defect cases, results to the table at RDI.
fn emit_defects(a: &mut Asm, k: &Kernel64, data: CodeLabel) -> AsmResult {
    a.mov(ebx, 1)?;
    a.lzcnt(eax, ebx)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.xor(ebx, ebx)?;
    // BSF (KVM's reading) leaves the destination alone on a zero source.
    a.mov(eax, 0x55)?;
    a.tzcnt(eax, ebx)?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    let mut after = a.create_label();
    a.lea(rax, ptr(after))?;
    a.mov(qword_ptr(k.resume_rip), rax)?;
    a.mov(qword_ptr(k.exc_vector), 0)?;
    a.xor(eax, eax)?;
    a.movbe(eax, dword_ptr(data))?;
    a.set_label(&mut after)?;
    a.mov(qword_ptr(k.resume_rip), 0)?;
    // A #UD shows as 0x1_0000_0006, a value as itself.
    a.mov(rcx, qword_ptr(k.exc_vector))?;
    a.shl(rcx, 32)?;
    a.or(rax, rcx)?;
    a.mov(qword_ptr(rdi + 16), rax)?;
    // A failed compare with a register destination: RBX keeps its upper
    // half on the CPU (a 32-bit destination write would clear it).
    a.mov(rbx, 0x1234_5678_0000_0001u64)?;
    a.mov(eax, 2)?;
    a.mov(ecx, 3)?;
    a.cmpxchg(ebx, ecx)?;
    a.mov(qword_ptr(rdi + 24), rbx)?;
    Ok(())
}

/// `kvm-defects`: instructions KVM's own emulator gets wrong at CPL 0 on
/// PVM hosts (it interprets all CPL 0 code there and never exits to the
/// VMM for these), next to the CPU's answer at CPL 3. On hardware KVM the
/// CPL 0 run is native and both agree.
pub fn kvm_defects() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut table = a.create_label();
        let mut data = a.create_label();
        let mut user = a.create_label();
        k.setup(a)?;
        a.lea(rdi, ptr(table))?;
        emit_defects(a, &k, data)?;
        k.enter_user(a, user)?;
        a.set_label(&mut user)?;
        a.lea(rdi, ptr(table))?;
        a.add(rdi, 8 * DEFECT_NAMES.len() as i32)?;
        emit_defects(a, &k, data)?;
        a.lea(rdi, ptr(table))?;
        for i in 0..2 * DEFECT_NAMES.len() {
            a.mov(rax, qword_ptr(rdi + 8 * i as i32))?;
            a.push(rdi)?;
            sys_report(a, rax)?;
            a.pop(rdi)?;
        }
        sys_print(a, "defects recorded\n")?;
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)?;
        a.set_label(&mut data)?;
        a.dd(&[0x1122_3344])?;
        a.set_label(&mut table)?;
        a.dq(&[0; 2 * DEFECT_NAMES.len()])
    })?;
    Ok(Program::new(
        "kvm-defects",
        "LZCNT/TZCNT, MOVBE and a failed CMPXCHG r32 at CPL 0 (KVM's emulator on PVM) vs natively at CPL 3",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(status_of(EXIT_PASS), "defects recorded", None),
    ))
}
