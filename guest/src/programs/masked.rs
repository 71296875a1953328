//! Fault suppression for masked vector accesses, natively vs through the
//! VMM: an AVX-512 masked move, a VMASKMOV or element-wise EVEX arithmetic
//! whose memory operand runs onto an unmapped page must fault only when a
//! selected element lies there. Every
//! case runs first at CPL 0 (each instruction completed by the VMM's
//! emulator on PVM) and then natively at CPL 3; the payload compares the
//! exception, the loaded register and the stored memory of both runs.

use super::{assemble, expect, LOAD_ADDR};
use crate::rt::kernel64::{sys_report, sys_verdict, Kernel64};
use crate::rt::{status_of, Asm, AsmResult, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// The 2 MiB page the program unmaps (PD entry 3 of the VMM's first page
/// directory at 0x4000); the page below it stays mapped.
const UNMAPPED: u64 = 0x60_0000;
const PD0: u64 = 0x4000;
/// "No exception" in the results.
const NONE: u64 = 0xff;
/// Values saved per case: exception vector, low qword of the loaded
/// register, the qword at the operand's start.
const SAVED: usize = 3;

struct Case {
    /// Bytes of the operand below the unmapped page.
    below: u64,
    k1: u64,
    body: fn(&mut Asm) -> AsmResult,
}

const CASES: &[Case] = &[
    // 32 bytes mapped, 32 not; dword elements.
    Case {
        below: 32,
        k1: 0x00ff,
        body: |a| a.vmovdqu32(zmm1.k1(), zmmword_ptr(rbx)),
    },
    Case {
        below: 32,
        k1: 0x0100,
        body: |a| a.vmovdqu32(zmm1.k1(), zmmword_ptr(rbx)),
    },
    Case {
        below: 32,
        k1: 0x00f0,
        body: |a| a.vmovdqu32(zmmword_ptr(rbx).k1(), zmm2),
    },
    Case {
        below: 32,
        k1: 0x0180,
        body: |a| a.vmovdqu32(zmmword_ptr(rbx).k1(), zmm2),
    },
    // Byte elements, zeroing.
    Case {
        below: 32,
        k1: 0xffff_ffff,
        body: |a| a.vmovdqu8(zmm1.k1().z(), zmmword_ptr(rbx)),
    },
    Case {
        below: 32,
        k1: 1 << 32,
        body: |a| a.vmovdqu8(zmm1.k1().z(), zmmword_ptr(rbx)),
    },
    // No element selected at all.
    Case {
        below: 0,
        k1: 0,
        body: |a| a.vmovups(zmm1.k1(), zmmword_ptr(rbx)),
    },
    // VMASKMOV: the mask is the sign bits of ymm3 (low four dwords set).
    Case {
        below: 16,
        k1: 0,
        body: |a| a.vmaskmovps(ymm1, ymm3, ymmword_ptr(rbx)),
    },
    Case {
        below: 16,
        k1: 0,
        body: |a| a.vmaskmovps(ymm1, ymm4, ymmword_ptr(rbx)),
    },
    Case {
        below: 16,
        k1: 0,
        body: |a| a.vmaskmovps(ymmword_ptr(rbx), ymm3, ymm2),
    },
    // Element-wise arithmetic with a masked memory source.
    Case {
        below: 32,
        k1: 0x00ff,
        body: |a| a.vaddps(zmm1.k1(), zmm2, zmmword_ptr(rbx)),
    },
    Case {
        below: 32,
        k1: 0x0100,
        body: |a| a.vaddps(zmm1.k1(), zmm2, zmmword_ptr(rbx)),
    },
    Case {
        below: 32,
        k1: 0x000f,
        body: |a| a.vmulpd(zmm1.k1().z(), zmm2, zmmword_ptr(rbx)),
    },
    Case {
        below: 32,
        k1: 0xffff_ffff,
        body: |a| a.vpaddb(zmm1.k1(), zmm2, zmmword_ptr(rbx)),
    },
    Case {
        below: 32,
        k1: 0x1_ffff_ffff,
        body: |a| a.vpaddb(zmm1.k1(), zmm2, zmmword_ptr(rbx)),
    },
    Case {
        below: 16,
        k1: 0x3,
        body: |a| a.vpandq(ymm1.k1(), ymm2, ymmword_ptr(rbx)),
    },
];

/// Emits every case, saving results at `table`.
fn emit_cases(a: &mut Asm, k: &Kernel64, table: CodeLabel, masks: CodeLabel) -> AsmResult {
    a.lea(rdi, ptr(table))?;
    // ymm3: low four dwords negative (selected); ymm4: all selected.
    a.lea(rax, ptr(masks))?;
    a.vmovdqu(ymm3, ymmword_ptr(rax))?;
    a.vmovdqu(ymm4, ymmword_ptr(rax + 32))?;
    a.vpternlogd(zmm2, zmm2, zmm2, 0xff)?; // all ones: what stores write
    for case in CASES {
        let mut resume = a.create_label();
        // Fresh memory pattern below the hole, cleared destination.
        a.mov(rbx, UNMAPPED - 64)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        for off in (0..64).step_by(8) {
            a.mov(qword_ptr(rbx + off), rax)?;
        }
        a.vpxord(zmm1, zmm1, zmm1)?;
        a.mov(rax, case.k1)?;
        a.kmovq(k1, rax)?;
        a.mov(qword_ptr(k.exc_vector), NONE as i32)?;
        a.lea(rax, ptr(resume))?;
        a.mov(qword_ptr(k.resume_rip), rax)?;
        a.mov(rbx, UNMAPPED - case.below)?;
        (case.body)(a)?;
        a.set_label(&mut resume)?;
        a.mov(qword_ptr(k.resume_rip), 0)?;
        a.mov(rax, qword_ptr(k.exc_vector))?;
        a.mov(qword_ptr(rdi), rax)?;
        a.vmovq(rax, xmm1)?;
        a.mov(qword_ptr(rdi + 8), rax)?;
        a.mov(rax, UNMAPPED - 32)?;
        a.mov(rax, qword_ptr(rax))?;
        a.mov(qword_ptr(rdi + 16), rax)?;
        a.add(rdi, (8 * SAVED) as i32)?;
    }
    Ok(())
}

pub fn masked_fault_suppression() -> Result<Program, IcedError> {
    let n = CASES.len() * SAVED;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut kernel_table = a.create_label();
        let mut user_table = a.create_label();
        let mut masks = a.create_label();
        let mut user = a.create_label();
        k.setup(a)?;
        // Unmap the 2 MiB page at UNMAPPED and flush.
        a.mov(rax, PD0)?;
        a.and(qword_ptr(rax + (UNMAPPED >> 21) * 8), -2i32)?;
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?;
        // CPL 0 first, before the guest ever runs at CPL 3 (PVM interprets
        // it, so each vector instruction is completed by the VMM).
        emit_cases(a, &k, kernel_table, masks)?;
        k.enter_user(a, user)?;
        a.set_label(&mut user)?;
        emit_cases(a, &k, user_table, masks)?;
        // Compare; report the number of cases, mismatches, and the native
        // exception vector of each case.
        a.lea(rsi, ptr(kernel_table))?;
        a.lea(rdi, ptr(user_table))?;
        a.xor(r12d, r12d)?;
        a.xor(ecx, ecx)?;
        let mut next = a.create_label();
        let mut same = a.create_label();
        a.set_label(&mut next)?;
        a.mov(rax, qword_ptr(rsi + rcx * 8))?;
        a.cmp(rax, qword_ptr(rdi + rcx * 8))?;
        a.je(same)?;
        a.inc(r12)?;
        a.set_label(&mut same)?;
        a.inc(ecx)?;
        a.cmp(ecx, n as u32)?;
        a.jne(next)?;
        a.mov(rax, CASES.len() as u64)?;
        sys_report(a, rax)?;
        sys_report(a, r12)?;
        for i in 0..CASES.len() {
            a.lea(rdi, ptr(user_table))?;
            a.mov(rax, qword_ptr(rdi + (i * SAVED * 8) as i32))?;
            sys_report(a, rax)?;
        }
        sys_verdict(
            a,
            r12,
            "masked accesses agree\n",
            "masked accesses differ\n",
        )?;
        k.finish(a)?;
        a.set_label(&mut masks)?;
        a.dd(&[
            0x8000_0000,
            0x8000_0000,
            0x8000_0000,
            0x8000_0000,
            0,
            0,
            0,
            0,
        ])?;
        a.dd(&[0x8000_0000; 8])?;
        a.set_label(&mut kernel_table)?;
        a.dq(&vec![0; n])?;
        a.set_label(&mut user_table)?;
        a.dq(&vec![0; n])
    })?;
    // Native outcome per case: no fault (0xff) where every selected
    // element is mapped, #PF (14) otherwise.
    let mut reports = vec![CASES.len() as u64, 0];
    reports.extend([
        NONE, 14, NONE, 14, NONE, 14, NONE, NONE, 14, NONE, NONE, 14, NONE, NONE, 14, NONE,
    ]);
    Ok(Program::new(
        "masked-fault-suppression",
        "AVX-512 masked moves and VMASKMOV across an unmapped page: CPL 0 (VMM) vs native CPL 3",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(status_of(EXIT_PASS), "masked accesses agree", Some(reports)),
    )
    .with_args(vec!["--cpu", "host"]))
}
