//! Port I/O: every width, and string I/O with REP.

use super::{assemble, expect, LOAD_ADDR};
use crate::rt::{exit, print, report_eax, report_rax, status_of, EXIT_PASS, TEST_REPORT};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// 1-, 2- and 4-byte `out` and `in` on the test-report latch (0x4f0-0x4f7).
pub fn pio_widths() -> Result<Program, IcedError> {
    let p = TEST_REPORT as u32;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        a.mov(dx, p)?;
        a.mov(al, 0x11u32)?;
        a.out(dx, al)?;
        a.mov(dx, p + 1)?;
        a.mov(al, 0x22u32)?;
        a.out(dx, al)?;
        a.mov(dx, p + 2)?;
        a.mov(ax, 0x4433u32)?;
        a.out(dx, ax)?;
        // Read back at each width before any report overwrites the latch.
        a.mov(dx, p)?;
        a.in_(eax, dx)?;
        a.mov(r8d, eax)?;
        a.mov(dx, p + 1)?;
        a.xor(eax, eax)?;
        a.in_(ax, dx)?;
        a.mov(r9d, eax)?;
        a.mov(dx, p + 1)?;
        a.xor(eax, eax)?;
        a.in_(al, dx)?;
        a.mov(r10d, eax)?;
        // A 4-byte write covering the last byte records the whole latch.
        a.mov(dx, p + 4)?;
        a.mov(eax, 0x8877_6655u32)?;
        a.out(dx, eax)?;
        a.in_(eax, dx)?;
        a.mov(r11d, eax)?;
        for r in [r8d, r9d, r10d, r11d] {
            a.mov(eax, r)?;
            report_eax(a)?;
        }
        print(a, "pio ok\n")?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "pio-widths",
        "out/in of 1, 2 and 4 bytes on the test-report latch",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "pio ok",
            Some(vec![
                0x8877_6655_4433_2211,
                0x4433_2211,
                0x3322,
                0x22,
                0x8877_6655,
            ]),
        ),
    ))
}

/// `rep outsb` to COM1 and `rep insb` from the latch.
pub fn rep_string_io() -> Result<Program, IcedError> {
    const TEXT: &str = "string io via rep outsb\n";
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let mut text = a.create_label();
        let mut buf = a.create_label();
        let mut code = a.create_label();
        a.jmp(code)?;
        a.set_label(&mut text)?;
        a.db(TEXT.as_bytes())?;
        a.set_label(&mut buf)?;
        a.dq(&[0, 0])?;
        a.set_label(&mut code)?;
        a.cld()?;
        a.lea(rsi, ptr(text))?;
        a.mov(ecx, TEXT.len() as u32)?;
        a.mov(dx, 0x3f8u32)?;
        a.rep().outsb()?;
        a.mov(rax, rcx)?; // 0 when every byte went out
        report_rax(a)?;
        a.mov(dx, TEST_REPORT as u32)?;
        a.mov(al, 0xabu32)?;
        a.out(dx, al)?;
        a.lea(rdi, ptr(buf))?;
        a.mov(ecx, 8)?;
        a.rep().insb()?;
        a.lea(rbx, ptr(buf))?;
        a.mov(rax, qword_ptr(rbx))?;
        report_rax(a)?;
        a.mov(rax, qword_ptr(rbx + 8))?; // untouched beyond the count
        report_rax(a)?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "rep-string-io",
        "rep outsb of a string to COM1, rep insb of 8 bytes from the latch",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "string io via rep outsb",
            Some(vec![0, 0xabab_abab_abab_abab, 0]),
        ),
    ))
}
