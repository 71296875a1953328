//! Payloads at CPL 3 through the mini kernel.

use super::{assemble, expect, LOAD_ADDR};
use crate::rt::kernel64::{sys_exit, sys_print, sys_report, Kernel64};
use crate::rt::{status_of, EXIT_EXCEPTION, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// SSE and AVX arithmetic natively at CPL 3; reports CPL and the results.
pub fn user_simd() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        let mut ones = a.create_label();
        let mut tens = a.create_label();
        k.start(a, user)?;
        a.set_label(&mut ones)?;
        a.dd_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])?;
        a.set_label(&mut tens)?;
        a.dd_f32(&[10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0])?;
        a.set_label(&mut user)?;
        a.xor(eax, eax)?;
        a.mov(ax, cs)?;
        a.and(eax, 3)?;
        sys_report(a, rax)?;
        // SSE: [1,2,3,4] + [10,20,30,40], low two lanes as bits.
        a.movups(xmm0, xmmword_ptr(ones))?;
        a.movups(xmm1, xmmword_ptr(tens))?;
        a.addps(xmm0, xmm1)?;
        a.movq(rax, xmm0)?;
        sys_report(a, rax)?;
        // AVX: 8 lanes, report lanes 6 and 7 (77.0, 88.0).
        a.vmovups(ymm2, ymmword_ptr(ones))?;
        a.vaddps(ymm2, ymm2, ymmword_ptr(tens))?;
        a.vextractf128(xmm3, ymm2, 1)?;
        a.vpextrq(rax, xmm3, 1)?;
        sys_report(a, rax)?;
        sys_print(a, "simd at cpl3 ok\n")?;
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    let bits = |lo: f32, hi: f32| u64::from(lo.to_bits()) | (u64::from(hi.to_bits()) << 32);
    Ok(Program::new(
        "user-simd",
        "CPL 3 payload: SSE addps and AVX vaddps natively; reports CPL and results",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "simd at cpl3 ok",
            Some(vec![3, bits(11.0, 22.0), bits(77.0, 88.0)]),
        ),
    ))
}

/// ud2 at CPL 3: the kernel's handler reports vector 6, error 0 and the RIP.
pub fn user_exception() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        k.start(a, user)?;
        a.set_label(&mut user)?;
        sys_print(a, "about to ud2\n")?;
        a.ud2()?;
        k.finish(a)
    })?;
    Ok(Program::new(
        "user-exception",
        "CPL 3 ud2: the kernel reports #UD (vector, error code, RIP) and exits 0x3f",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_EXCEPTION),
            "exception vector=0000000000000006",
            None,
        ),
    ))
}
