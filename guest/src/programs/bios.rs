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
