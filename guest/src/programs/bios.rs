//! What a BIOS leaves behind, seen from a real-mode guest (with the
//! in-kernel irqchip): the 8259s' masks, the timer interrupt through the
//! IVT's handler (which counts ticks in the BIOS data area), the RTC's
//! status registers and the CMOS memory size.

use super::{assemble, expect, REAL_LOAD_ADDR};
use crate::rt::{exit, print, report_eax, status_of, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Reports: master IMR, slave IMR, BIOS ticks after two `sti; hlt`
/// wake-ups (at least 1), RTC status A (UIP masked off), B, D, CMOS base
/// memory (0x15/0x16, KiB), the RTC seconds register (BCD, < 0x60).
pub fn bios_state() -> Result<Program, IcedError> {
    let image = assemble(Mode::Real, REAL_LOAD_ADDR, |a| {
        a.xor(eax, eax)?;
        a.mov(ds, ax)?;
        a.in_(al, 0x21)?;
        report_eax(a)?;
        a.xor(eax, eax)?;
        a.in_(al, 0xa1)?;
        report_eax(a)?;
        // Only the PIT's IRQ 0 is open: each wake-up is a timer tick.
        a.mov(dword_ptr(0x46c), 0)?;
        a.sti()?;
        a.hlt()?;
        a.hlt()?;
        a.cli()?;
        a.mov(eax, dword_ptr(0x46c))?;
        report_eax(a)?;
        for (reg, mask) in [(0x0au32, 0x7fu32), (0x0b, 0xff), (0x0d, 0xff)] {
            a.mov(al, reg)?;
            a.out(0x70, al)?;
            a.xor(eax, eax)?;
            a.in_(al, 0x71)?;
            a.and(eax, mask)?;
            report_eax(a)?;
        }
        a.mov(al, 0x16u32)?;
        a.out(0x70, al)?;
        a.in_(al, 0x71)?;
        a.mov(ah, al)?;
        a.mov(al, 0x15u32)?;
        a.out(0x70, al)?;
        a.in_(al, 0x71)?;
        a.movzx(eax, ax)?;
        report_eax(a)?;
        a.mov(al, 0u32)?;
        a.out(0x70, al)?;
        a.xor(eax, eax)?;
        a.in_(al, 0x71)?;
        report_eax(a)?;
        print(a, "bios state read\n")?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "bios-state",
        "real mode with the irqchip: PIC masks, timer ticks through the IVT, RTC and CMOS (--device pc-testdev)",
        Mode::Real,
        REAL_LOAD_ADDR,
        image,
        // Ticks and seconds vary; tests/tests/bios.rs checks them.
        expect(status_of(EXIT_PASS), "bios state read", None),
    )
    .with_args(vec!["--device", "pc-testdev"]))
}

/// Where the resume code of `acpi-s3` goes (the FACS waking vector).
const RESUME_ADDR: u64 = 0x1000;
/// The VMM's FACS (ACPI_AREA + 0x40) and its firmware waking vector field.
const FACS_WAKING_VECTOR: u64 = 0xe_0040 + 12;

/// Enters ACPI S3 with the RTC alarm as wake-up event, the way
/// kvm-unit-tests' `s3` does; the real-mode code at the waking vector
/// reports PM1 status (WAK_STS | RTC_STS = 0x8400) and exits with the pass
/// code. Without a resume it exits with the failure code.
pub fn acpi_s3() -> Result<Program, IcedError> {
    let resume = assemble(Mode::Real, RESUME_ADDR, |a| {
        a.xor(eax, eax)?;
        a.mov(dx, 0x600u32)?;
        a.in_(ax, dx)?;
        report_eax(a)?;
        print(a, "resumed from S3\n")?;
        exit(a, EXIT_PASS)
    })?;
    let image = assemble(Mode::Long, super::LOAD_ADDR, |a| {
        let mut code = a.create_label();
        a.lea(rsi, ptr(code))?;
        a.mov(edi, RESUME_ADDR as u32)?;
        a.mov(ecx, resume.len() as u32)?;
        a.rep().movsb()?;
        a.mov(eax, RESUME_ADDR as u32)?;
        a.mov(dword_ptr(FACS_WAKING_VECTOR), eax)?;
        // PM1 enable: RTC_EN.
        a.mov(dx, 0x602u32)?;
        a.mov(ax, 0x400u32)?;
        a.out(dx, ax)?;
        // RTC alarm on every second, alarm interrupt enabled.
        for reg in [1u32, 3, 5] {
            a.mov(al, reg)?;
            a.out(0x70, al)?;
            a.mov(al, 0xc0u32)?;
            a.out(0x71, al)?;
        }
        a.mov(al, 0x0bu32)?;
        a.out(0x70, al)?;
        a.in_(al, 0x71)?;
        a.or(al, 0x20)?;
        a.out(0x71, al)?;
        // SLP_TYP 1 (S3) | SLP_EN.
        a.mov(dx, 0x604u32)?;
        a.mov(ax, 0x2400u32)?;
        a.out(dx, ax)?;
        print(a, "S3 did not happen\n")?;
        exit(a, crate::rt::EXIT_CHECK_FAILED)?;
        a.set_label(&mut code)?;
        a.db(&resume)
    })?;
    Ok(Program::new(
        "acpi-s3",
        "ACPI S3 woken by the RTC alarm, resumed in real mode at the FACS waking vector (--device acpi-pm)",
        Mode::Long,
        super::LOAD_ADDR,
        image,
        expect(status_of(EXIT_PASS), "resumed from S3", Some(vec![0x8400])),
    )
    .with_args(vec!["--device", "acpi-pm"]))
}
