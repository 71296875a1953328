//! Vector state the VMM writes back to KVM: MXCSR loaded at CPL 0 must
//! survive although the XMM registers are zero (KVM_SET_XSAVE takes MXCSR
//! only with the SSE or AVX bit in XSTATE_BV, which the stub's XSAVE
//! leaves clear then), and instructions that change no register must not
//! cost a KVM_SET_XSAVE.

use super::bench::{BENCH_MMIO, BENCH_MMIO_SIZE};
use super::{assemble, expect, LOAD_ADDR};
use crate::rt::kernel64::{sys_exit, sys_print_hex, sys_report, sys_verdict, Kernel64};
use crate::rt::{status_of, Asm, AsmResult, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// MXCSR with the divide-by-zero exception unmasked (ZM, bit 9, clear).
pub const MXCSR_ZM_CLEAR: u32 = 0x1f80 & !(1 << 9);
/// The #XM vector.
const VEC_XM: u64 = 19;
/// What the exception slot holds when nothing was raised.
const NONE: i32 = 0xff;
/// Values saved per run: STMXCSR after LDMXCSR, the divide's exception.
const SAVED: usize = 2;
/// Where an XSAVE area's header (XSTATE_BV first) starts.
const XSAVE_HEADER: i32 = 512;

/// One run of the case, with every XMM register zero: LDMXCSR of
/// [`MXCSR_ZM_CLEAR`], STMXCSR, then 1.0 / 0.0 with `divss` (must raise
/// #XM), saving both at `table`. Ends with MXCSR back at its default.
fn emit_case(a: &mut Asm, k: &Kernel64, table: CodeLabel, consts: CodeLabel) -> AsmResult {
    let mut resume = a.create_label();
    a.lea(rdi, ptr(table))?;
    a.lea(rsi, ptr(consts))?;
    // Zero XMM0-15 (at CPL 0 each pxor is itself completed by the VMM and
    // changes nothing).
    for r in [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ] {
        a.pxor(r, r)?;
    }
    a.mov(qword_ptr(rdi), 0)?;
    a.ldmxcsr(dword_ptr(rsi))?;
    a.stmxcsr(dword_ptr(rdi))?;
    // The divide: an unmasked #ZE raises #XM; the kernel resumes below.
    a.mov(qword_ptr(k.exc_vector), NONE)?;
    a.lea(rax, ptr(resume))?;
    a.mov(qword_ptr(k.resume_rip), rax)?;
    a.mov(eax, 1)?;
    a.cvtsi2ss(xmm0, eax)?;
    a.divss(xmm0, dword_ptr(rsi + 8))?;
    a.set_label(&mut resume)?;
    a.mov(qword_ptr(k.resume_rip), 0)?;
    a.mov(rax, qword_ptr(k.exc_vector))?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    // Back to the default, the flags the exception set cleared.
    a.ldmxcsr(dword_ptr(rsi + 4))
}

/// `mxcsr-cpl0`: the case at CPL 0 before the guest ever runs at CPL 3
/// (PVM interprets it, so the VMM completes every SSE instruction), then
/// natively at CPL 3, the ground truth; reports both runs' MXCSR and
/// exception vector, then the number of differences.
pub fn mxcsr_cpl0() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut kernel_table = a.create_label();
        let mut user_table = a.create_label();
        let mut consts = a.create_label();
        let mut user = a.create_label();
        k.setup(a)?;
        emit_case(a, &k, kernel_table, consts)?;
        k.enter_user(a, user)?;
        a.set_label(&mut user)?;
        emit_case(a, &k, user_table, consts)?;
        a.lea(rsi, ptr(kernel_table))?;
        a.lea(rdi, ptr(user_table))?;
        a.xor(r12d, r12d)?;
        for i in 0..SAVED as i32 {
            let mut same = a.create_label();
            a.mov(rax, qword_ptr(rsi + 8 * i))?;
            a.cmp(rax, qword_ptr(rdi + 8 * i))?;
            a.je(same)?;
            a.inc(r12)?;
            a.set_label(&mut same)?;
        }
        for table in [kernel_table, user_table] {
            a.lea(rbx, ptr(table))?;
            for i in 0..SAVED as i32 {
                a.mov(rax, qword_ptr(rbx + 8 * i))?;
                sys_report(a, rax)?;
            }
        }
        sys_report(a, r12)?;
        sys_verdict(a, r12, "cpl0 and cpl3 agree\n", "cpl0 and cpl3 differ\n")?;
        k.finish(a)?;
        a.set_label(&mut consts)?;
        // MXCSR to load, the default MXCSR, 0.0f.
        a.dd(&[MXCSR_ZM_CLEAR, 0x1f80, 0])?;
        a.set_label(&mut kernel_table)?;
        a.dq(&[0; SAVED])?;
        a.set_label(&mut user_table)?;
        a.dq(&[0; SAVED])
    })?;
    let m = u64::from(MXCSR_ZM_CLEAR);
    Ok(Program::new(
        "mxcsr-cpl0",
        "LDMXCSR with ZM clear at CPL 0 while XMM0-15 are zero: STMXCSR reads it back and 1.0/0.0 raises #XM, as natively at CPL 3",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "cpl0 and cpl3 agree",
            Some(vec![m, VEC_XM, m, VEC_XM, 0]),
        ),
    ))
}

/// `iters` loads of zeros into YMM0 (already zero) from MMIO at CPL 0,
/// then `iters` stores of YMM0 to MMIO at CPL 3: every one is completed by
/// the VMM and none changes a register, so none needs KVM_SET_XSAVE.
pub fn vector_unchanged(iters: u32) -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        k.setup(a)?;
        a.mov(rsi, BENCH_MMIO)?;
        counted(a, iters, |a| a.vmovdqu(ymm0, ymmword_ptr(rsi)))?;
        k.enter_user(a, user)?;
        a.set_label(&mut user)?;
        a.mov(rsi, BENCH_MMIO)?;
        counted(a, iters, |a| a.vmovdqu(ymmword_ptr(rsi), ymm0))?;
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(Program::new(
        "vector-unchanged",
        "vmovdqu ymm0 loads of zeros from MMIO at CPL 0 and stores to MMIO at CPL 3: no register changes",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(status_of(EXIT_PASS), "", Some(vec![])),
    )
    .with_mmio_ram(vec![(BENCH_MMIO, BENCH_MMIO_SIZE)]))
}

/// The catalogued variant of [`vector_unchanged`].
pub fn catalogue_vector_unchanged() -> Result<Program, IcedError> {
    vector_unchanged(100)
}

/// `body` `iters` times (R8 counts; the body may use RCX).
fn counted(a: &mut Asm, iters: u32, body: impl Fn(&mut Asm) -> AsmResult) -> AsmResult {
    let mut top = a.create_label();
    a.mov(r8d, iters.max(1))?;
    a.set_label(&mut top)?;
    body(a)?;
    a.dec(r8d)?;
    a.jnz(top)
}

/// `vector-across-exits`: at CPL 3, vector registers written natively and
/// by the VMM's emulator keep their values across the exits that follow
/// (an MMIO read KVM completes, a vector load the VMM completes). Each of
/// four steps reloads YMM1, changes it (natively from YMM2 or from MMIO by
/// the emulator), takes an MMIO exit and stores YMM1; the guest reports
/// the low and the upper-lane quadwords of each store.
pub fn vector_across_exits() -> Result<Program, IcedError> {
    const A: [u64; 4] = [
        0x1111_1111_1111_1101,
        0x1111_1111_1111_1102,
        0x1111_1111_1111_1103,
        0x1111_1111_1111_1104,
    ];
    const B: [u64; 4] = [
        0x2222_2222_2222_2201,
        0x2222_2222_2222_2202,
        0x2222_2222_2222_2203,
        0x2222_2222_2222_2204,
    ];
    const M: [u64; 2] = [0x3333_3333_3333_3301, 0x3333_3333_3333_3302];
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        let mut va = a.create_label();
        let mut vb = a.create_label();
        let mut out = a.create_label();
        k.start(a, user)?;
        a.set_label(&mut va)?;
        a.dq(&A)?;
        a.set_label(&mut vb)?;
        a.dq(&B)?;
        a.set_label(&mut out)?;
        a.dq(&[0u64; 16])?;
        a.set_label(&mut user)?;
        a.mov(rbx, BENCH_MMIO)?;
        a.mov(rax, M[0])?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(rax, M[1])?;
        a.mov(qword_ptr(rbx + 8), rax)?;
        a.lea(r12, ptr(out))?;
        a.vmovdqu(ymm2, ymmword_ptr(vb))?;
        for step in 0..4 {
            a.vmovdqu(ymm1, ymmword_ptr(va))?;
            if step % 2 == 0 {
                a.vmovups(xmm1, xmm2)?;
            } else {
                a.vmovups(xmm1, xmmword_ptr(rbx))?;
            }
            a.mov(rcx, qword_ptr(rbx))?;
            a.vmovdqu(ymmword_ptr(r12 + 32 * step), ymm1)?;
        }
        // Print and report each value; count those that differ.
        a.xor(r13d, r13d)?;
        for step in 0..4 {
            for (at, want) in [(0, if step % 2 == 0 { B[0] } else { M[0] }), (16, 0)] {
                let mut same = a.create_label();
                a.mov(r14, qword_ptr(r12 + 32 * step + at))?;
                sys_print_hex(a, r14)?;
                sys_report(a, r14)?;
                a.mov(rax, want)?;
                a.cmp(r14, rax)?;
                a.je(same)?;
                a.inc(r13)?;
                a.set_label(&mut same)?;
            }
        }
        sys_verdict(
            a,
            r13,
            "vector state kept across exits\n",
            "vector state lost across exits\n",
        )?;
        k.finish(a)
    })?;
    let mut reports = Vec::new();
    for step in 0..4 {
        reports.push(if step % 2 == 0 { B[0] } else { M[0] });
        reports.push(0);
    }
    Ok(Program::new(
        "vector-across-exits",
        "CPL 3: YMM1 written natively or by the emulator survives the MMIO exits after it",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "vector state kept across exits",
            Some(reports),
        ),
    )
    .with_mmio_ram(vec![(BENCH_MMIO, BENCH_MMIO_SIZE)]))
}

/// A long-mode program with MMIO RAM at [`BENCH_MMIO`] whose outcomes the
/// platform decides: tests/tests/emulation.rs compares each MMIO outcome
/// with its RAM twin's, so only the exit status is expected here.
fn mmio_against_ram(name: &'static str, what: &'static str, image: Vec<u8>) -> Program {
    Program::new(
        name,
        what,
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(status_of(EXIT_PASS), "", None),
    )
    .with_mmio_ram(vec![(BENCH_MMIO, BENCH_MMIO_SIZE)])
}

/// Writes `data` to the four quadwords (32 bytes) at `base` (through RAX).
fn fill_32(a: &mut Asm, base: AsmRegister64, data: u64) -> AsmResult {
    a.mov(rax, data)?;
    for i in 0..4 {
        a.mov(qword_ptr(base + 8 * i), rax)?;
    }
    Ok(())
}

/// Runs what `emit` emits with the kernel set to resume after an exception
/// it raises, then reports that exception's vector ([`NONE`] when none).
/// RFLAGS.AC is cleared first at the resume point: the kernel's variables
/// are not aligned.
fn report_exception(
    a: &mut Asm,
    k: &Kernel64,
    emit: impl FnOnce(&mut Asm) -> AsmResult,
) -> AsmResult {
    let mut resume = a.create_label();
    a.mov(qword_ptr(k.exc_vector), NONE)?;
    a.lea(rax, ptr(resume))?;
    a.mov(qword_ptr(k.resume_rip), rax)?;
    emit(a)?;
    a.set_label(&mut resume)?;
    a.pushfq()?;
    a.and(qword_ptr(rsp), !(1i32 << 18))?;
    a.popfq()?;
    a.mov(qword_ptr(k.resume_rip), 0)?;
    a.mov(rax, qword_ptr(k.exc_vector))?;
    sys_report(a, rax)
}

/// `xcr0-user`: the kernel turns AVX state off (XSETBV, XCR0 = x87|SSE),
/// then at CPL 3 the payload reads XCR0 with XGETBV and runs the same three
/// loads (legacy SSE, VEX.128, VEX.256) first from RAM, natively, then from
/// MMIO, where the VMM completes them. The MMIO loads must end as the RAM
/// loads did: #UD on a CPU that enforces the guest's XCR0, completion where
/// the CPU runs CPL 3 code under another XCR0 (PVM). Reports the CPL 3
/// XGETBV, the three RAM outcomes, the three MMIO outcomes (exception
/// vectors, 0xff: none), the low quadword the last MMIO load left, and the
/// XSTATE_BV of an XSAVE to RAM, then to MMIO, with EDX:EAX = x87|SSE|AVX,
/// then 0x2e7 (also AVX-512 and PKRU).
pub fn xcr0_user() -> Result<Program, IcedError> {
    const DATA: u64 = 0x0bad_cafe_f00d_d00d;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        k.setup(a)?;
        a.mov(rbx, BENCH_MMIO)?;
        fill_32(a, rbx, DATA)?;
        a.xor(ecx, ecx)?;
        a.mov(eax, 3)?;
        a.xor(edx, edx)?;
        a.xsetbv()?;
        k.enter_user(a, user)?;
        a.set_label(&mut user)?;
        a.xor(ecx, ecx)?;
        a.xgetbv()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        sys_report(a, rax)?;
        // 32 bytes of RAM on the user stack.
        a.sub(rsp, 32)?;
        fill_32(a, rsp, DATA)?;
        a.mov(rsi, rsp)?;
        for base in [rsi, rbx] {
            a.pxor(xmm1, xmm1)?;
            for load in 0..3 {
                report_exception(a, &k, |a| match load {
                    0 => a.movups(xmm1, xmmword_ptr(base)),
                    1 => a.vmovups(xmm1, xmmword_ptr(base)),
                    _ => a.vmovups(ymm1, ymmword_ptr(base)),
                })?;
            }
        }
        a.movq(rax, xmm1)?;
        sys_report(a, rax)?;
        // XSAVE of x87, SSE and AVX as far as XCR0 allows, to RAM then to
        // MMIO: the XSTATE_BV each wrote (AVX's bit only if XCR0 has it;
        // YMM1's upper half is non-zero if a VEX.256 load completed: the
        // last load of each round is the VEX.256 one).
        // Then with PKRU and the AVX-512 components asked for too (0x2e7,
        // no AMX: its 8 KiB would not fit): the host's XCR0 has PKRU.
        a.and(rsp, -64)?;
        a.sub(rsp, 4096)?;
        for rfbm in [7, 0x2e7] {
            for base in [rsp, rbx] {
                a.mov(eax, rfbm)?;
                a.xor(edx, edx)?;
                a.xsave64(ptr(base))?;
                a.mov(rax, qword_ptr(base + XSAVE_HEADER))?;
                sys_report(a, rax)?;
            }
        }
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(mmio_against_ram("xcr0-user", "CPL 3 after XSETBV turned AVX off: VEX and SSE loads from MMIO end as the same loads from RAM", image))
}

/// `ts-user` and `em-user`: the kernel sets CR0.TS (or CR0.EM), then at
/// CPL 3 an SSE, an AVX and an x87 load run from RAM, natively, then from
/// MMIO, where the VMM completes them. Each MMIO load must end as its RAM
/// twin did: the fault CR0 asks for (#NM for TS; #UD for SSE and #NM for
/// x87 under EM) on a CPU that applies the guest's CR0 to CPL 3 code,
/// completion where the CPU runs CPL 3 code under the host's (PVM).
/// Reports the six outcomes (exception vectors, 0xff: none), RAM first.
fn cr0_user(name: &'static str, cr0_bit: u32, what: &'static str) -> Result<Program, IcedError> {
    const DATA: u64 = 0x3ff0_0000_0000_0000; // 1.0: a valid x87 load.
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        k.setup(a)?;
        a.mov(rbx, BENCH_MMIO)?;
        fill_32(a, rbx, DATA)?;
        a.mov(rax, cr0)?;
        a.or(eax, cr0_bit)?;
        a.mov(cr0, rax)?;
        k.enter_user(a, user)?;
        a.set_label(&mut user)?;
        a.sub(rsp, 32)?;
        fill_32(a, rsp, DATA)?;
        a.mov(rsi, rsp)?;
        for base in [rsi, rbx] {
            for load in 0..3 {
                report_exception(a, &k, |a| match load {
                    0 => a.movups(xmm1, xmmword_ptr(base)),
                    1 => a.vmovups(ymm1, ymmword_ptr(base)),
                    _ => a.fld(qword_ptr(base)),
                })?;
            }
        }
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(mmio_against_ram(name, what, image))
}

/// CR0.TS (bit 3): SSE, AVX and x87 loads from MMIO end as from RAM.
pub fn ts_user() -> Result<Program, IcedError> {
    cr0_user(
        "ts-user",
        1 << 3,
        "CPL 3 after the kernel set CR0.TS: SSE, AVX and x87 loads from MMIO end as the same loads from RAM",
    )
}

/// CR0.EM (bit 2): SSE, AVX and x87 loads from MMIO end as from RAM.
pub fn em_user() -> Result<Program, IcedError> {
    cr0_user(
        "em-user",
        1 << 2,
        "CPL 3 after the kernel set CR0.EM: SSE, AVX and x87 loads from MMIO end as the same loads from RAM",
    )
}

/// `controls-user`: the kernel clears CR4.OSXMMEXCPT (CR0.AM is already
/// clear at entry), then at CPL 3, first from RAM, natively, then from
/// MMIO: `divss` by 0.0 with ZM unmasked (#XM with OSXMMEXCPT, #UD
/// without), and with RFLAGS.AC set a misaligned `fld` (#AC only with
/// CR0.AM). Each MMIO outcome must equal its RAM twin's. Reports the four
/// exception vectors (0xff: none): divss RAM, divss MMIO, fld RAM, fld MMIO.
pub fn controls_user() -> Result<Program, IcedError> {
    const ONE_F32: u32 = 0x3f80_0000;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        k.setup(a)?;
        a.mov(rbx, BENCH_MMIO)?;
        fill_32(a, rbx, 0)?;
        a.mov(rax, cr4)?;
        a.and(eax, !(1u32 << 10) as i32)?;
        a.mov(cr4, rax)?;
        k.enter_user(a, user)?;
        a.set_label(&mut user)?;
        a.sub(rsp, 64)?;
        a.and(rsp, -64)?;
        fill_32(a, rsp, 0)?;
        a.mov(rsi, rsp)?;
        for base in [rsi, rbx] {
            report_exception(a, &k, |a| {
                a.mov(eax, ONE_F32)?;
                a.movd(xmm1, eax)?;
                a.mov(dword_ptr(rsp + 32), MXCSR_ZM_CLEAR)?;
                a.ldmxcsr(dword_ptr(rsp + 32))?;
                a.divss(xmm1, dword_ptr(base))
            })?;
            a.mov(dword_ptr(rsp + 32), 0x1f80)?;
            a.ldmxcsr(dword_ptr(rsp + 32))?;
        }
        for base in [rsi, rbx] {
            report_exception(a, &k, |a| {
                a.pushfq()?;
                a.or(qword_ptr(rsp), 1 << 18)?;
                a.popfq()?;
                a.fld(qword_ptr(base + 1))
            })?;
            a.fninit()?;
        }
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(mmio_against_ram(
        "controls-user",
        "CPL 3 with CR4.OSXMMEXCPT and CR0.AM clear: #XM/#UD and #AC from MMIO end as from RAM",
        image,
    ))
}
