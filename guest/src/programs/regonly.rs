//! Register-only instructions KVM's emulator cannot complete (ADX, BMI1/2,
//! CRC32, POPCNT), run first at CPL 0 (interpreted by PVM, so each one
//! reaches the VMM) and then natively at CPL 3; the payload compares every
//! result register and the arithmetic flags of both runs.

use super::{assemble, expect, LOAD_ADDR};
use crate::rt::kernel64::{sys_report, sys_verdict, Kernel64};
use crate::rt::{status_of, Asm, AsmResult, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Inputs loaded into RAX, RBX, RCX, RDX before every case.
const INPUTS: [u64; 4] = [
    0xfedc_ba98_7654_3210,
    0x0123_4567_89ab_cdef,
    0x0000_0000_0000_0a08,
    0x1111_2222_3333_4444,
];
/// RFLAGS before every case: all arithmetic flags set, then all clear.
const FLAGS_IN: [u64; 2] = [0x8d7, 0x2];
/// Values saved per case: RAX, RBX, RCX, RDX, RFLAGS.
const SAVED: usize = 5;
/// The arithmetic flags (CF PF AF ZF SF OF).
const ARITH: u64 = 0x8d5;

type Case = fn(&mut Asm) -> AsmResult;

/// Every instruction under test, register forms only.
const CASES: &[(&str, Case)] = &[
    ("adcx", |a| a.adcx(rax, rbx)),
    ("adox", |a| a.adox(rax, rbx)),
    ("andn", |a| a.andn(rax, rbx, rcx)),
    ("andn32", |a| a.andn(eax, ebx, ecx)),
    ("bextr", |a| a.bextr(rax, rbx, rcx)),
    ("blsi", |a| a.blsi(rax, rbx)),
    ("blsr", |a| a.blsr(rax, rbx)),
    ("bzhi", |a| a.bzhi(rax, rbx, rcx)),
    ("pdep", |a| a.pdep(rax, rbx, rcx)),
    ("pext", |a| a.pext(rax, rbx, rcx)),
    ("shlx", |a| a.shlx(rax, rbx, rcx)),
    ("sarx", |a| a.sarx(rax, rax, rcx)),
    ("shrx", |a| a.shrx(rax, rbx, rcx)),
    ("rorx", |a| a.rorx(rax, rbx, 13)),
    ("mulx", |a| a.mulx(rax, rbx, rcx)),
    ("crc32b", |a| a.crc32(eax, bl)),
    ("crc32q", |a| a.crc32(rax, rbx)),
    ("popcnt", |a| a.popcnt(rax, rbx)),
    ("popcnt16", |a| a.popcnt(ax, bx)),
];

/// Emits every case for every flag input, saving results at RDI.
fn emit_cases(a: &mut Asm, table: CodeLabel) -> AsmResult {
    a.lea(rdi, ptr(table))?;
    for (_, case) in CASES {
        for flags in FLAGS_IN {
            a.mov(rax, INPUTS[0])?;
            a.mov(rbx, INPUTS[1])?;
            a.mov(rcx, INPUTS[2])?;
            a.mov(rdx, INPUTS[3])?;
            a.push(flags as i32)?;
            a.popfq()?;
            case(a)?;
            a.pushfq()?;
            a.pop(r8)?;
            for (i, r) in [rax, rbx, rcx, rdx, r8].into_iter().enumerate() {
                a.mov(qword_ptr(rdi + 8 * i as i32), r)?;
            }
            a.add(rdi, (8 * SAVED) as i32)?;
        }
    }
    Ok(())
}

pub fn regonly_cpl0() -> Result<Program, IcedError> {
    let n = CASES.len() * FLAGS_IN.len() * SAVED;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut kernel_table = a.create_label();
        let mut user_table = a.create_label();
        let mut user = a.create_label();
        // CPL 0 first, before the guest ever runs at CPL 3: PVM interprets
        // it, so each case is an emulation-failure exit the VMM completes.
        emit_cases(a, kernel_table)?;
        k.start(a, user)?;
        a.set_label(&mut user)?;
        emit_cases(a, user_table)?;
        // Compare: R12 counts mismatches, R13 holds the first bad index + 1.
        a.lea(rsi, ptr(kernel_table))?;
        a.lea(rdi, ptr(user_table))?;
        a.xor(r12d, r12d)?;
        a.xor(r13d, r13d)?;
        a.xor(ecx, ecx)?;
        let mut next = a.create_label();
        let mut same = a.create_label();
        a.set_label(&mut next)?;
        a.mov(rax, qword_ptr(rsi + rcx * 8))?;
        a.mov(rbx, qword_ptr(rdi + rcx * 8))?;
        // Every fifth value is RFLAGS: compare the arithmetic flags only.
        a.mov(rax, rcx)?;
        a.xor(edx, edx)?;
        a.mov(r8d, SAVED as u32)?;
        a.div(r8)?;
        a.mov(rax, qword_ptr(rsi + rcx * 8))?;
        a.cmp(edx, (SAVED - 1) as u32)?;
        let mut not_flags = a.create_label();
        a.jne(not_flags)?;
        a.and(rax, ARITH as i32)?;
        a.and(rbx, ARITH as i32)?;
        a.set_label(&mut not_flags)?;
        a.cmp(rax, rbx)?;
        a.je(same)?;
        a.inc(r12)?;
        a.test(r13, r13)?;
        let mut keep_first = a.create_label();
        a.jnz(keep_first)?;
        a.lea(r13, qword_ptr(rcx + 1))?;
        a.set_label(&mut keep_first)?;
        a.nop()?;
        a.set_label(&mut same)?;
        a.inc(ecx)?;
        a.cmp(ecx, n as u32)?;
        a.jne(next)?;
        a.mov(rax, CASES.len() as u64)?;
        sys_report(a, rax)?;
        sys_report(a, r12)?;
        sys_report(a, r13)?;
        // One sample result, so a test can see real values went by.
        a.lea(rsi, ptr(kernel_table))?;
        a.mov(rax, qword_ptr(rsi))?;
        sys_report(a, rax)?;
        sys_verdict(a, r12, "cpl0 and cpl3 agree\n", "cpl0 and cpl3 differ\n")?;
        k.finish(a)?;
        a.set_label(&mut kernel_table)?;
        a.dq(&vec![0; n])?;
        a.set_label(&mut user_table)?;
        a.dq(&vec![0; n])
    })?;
    // adcx with CF set: A + B + 1.
    let adcx = INPUTS[0].wrapping_add(INPUTS[1]).wrapping_add(1);
    Ok(Program::new("regonly-cpl0", "ADX/BMI1/BMI2/CRC32/POPCNT on registers at CPL 0 (completed by the VMM) vs natively at CPL 3", Mode::Long, LOAD_ADDR, image, expect(
            status_of(EXIT_PASS),
            "cpl0 and cpl3 agree",
            Some(vec![CASES.len() as u64, 0, 0, adcx]),
        )))
}
