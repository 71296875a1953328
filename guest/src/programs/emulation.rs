//! The VMM's emulator seen from the guest: what happens to an instruction
//! outside the allow-list, and page faults raised by the emulator's own
//! page walk, injected into the guest with the right error code and CR2.

use super::{assemble, expect, LOAD_ADDR};
use crate::rt::kernel64::Kernel64;
use crate::rt::{exit, print, report_rax, status_of, EXIT_EXCEPTION, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// `xsaves` at CPL 0: KVM cannot emulate it and the VMM's allow-list
/// refuses it (supervisor state the VMM does not switch; `xgetbv`, used
/// here before, is now completed by `emul::system`). With `--on-unsupported stop` (default) the VMM stops with
/// status 10; with `--on-unsupported ud` the guest's #UD handler runs.
pub fn unsupported_insn() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        k.setup(a)?;
        print(a, "running xsaves\n")?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.xsaves64(ptr(rsp - 0x1000))?;
        print(a, "xsaves completed\n")?;
        exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(Program::new(
        "unsupported-insn",
        "xsaves at CPL 0: stops the VM (status 10), or #UD with --on-unsupported ud (status 0x7f)",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(10, "running xsaves", Some(vec![])),
    ))
}

/// The 2 MiB page the test unmaps, and the one it makes read-only.
const UNMAPPED: u64 = 0x40_0000;
const READ_ONLY: u64 = 0x60_0000;
/// The VMM's first page directory (README memory map).
const PD0: u64 = 0x4000;

/// Vector instructions at CPL 0 (each completed by the VMM) touching a
/// not-present page and, with CR0.WP set, writing a read-only one: the
/// emulator's page walk raises #PF, the VMM injects it, and the guest's
/// handler sees vector 14 with the error code; CR2 holds the address. A
/// misaligned `addps` on the not-present page gets #GP(0) instead, as on
/// the CPU (alignment before the walk: `emul`'s stub tests measure it).
pub fn emul_page_fault() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        k.setup(a)?;
        // Not present: clear P of the 2 MiB page; read-only: clear R/W.
        a.mov(rbx, PD0)?;
        a.and(qword_ptr(rbx + (UNMAPPED >> 21) * 8), -2i32)?;
        a.and(qword_ptr(rbx + (READ_ONLY >> 21) * 8), -3i32)?;
        a.mov(rax, cr0)?;
        a.or(eax, 1 << 16)?; // WP: supervisor writes honour R/W
        a.mov(cr0, rax)?;
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?;
        // Last, a misaligned aligned-only operand on the not-present page:
        // alignment is checked before the walk, so #GP(0), CR2 unchanged.
        for (addr, store) in [
            (UNMAPPED + 0x120, false),
            (READ_ONLY + 0x40, true),
            (UNMAPPED + 0x123, false),
        ] {
            let mut resume = a.create_label();
            a.lea(rax, ptr(resume))?;
            a.mov(qword_ptr(k.resume_rip), rax)?;
            a.mov(rsi, addr)?;
            if store {
                a.movups(xmmword_ptr(rsi), xmm0)?;
            } else {
                a.addps(xmm0, xmmword_ptr(rsi))?;
            }
            a.set_label(&mut resume)?;
            a.mov(rax, qword_ptr(k.exc_vector))?;
            report_rax(a)?;
            a.mov(rax, qword_ptr(k.exc_error))?;
            report_rax(a)?;
            a.mov(rax, cr2)?;
            report_rax(a)?;
        }
        print(a, "page faults injected\n")?;
        exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(Program::new("emul-page-fault", "CPL 0 addps from a not-present page and movups to a read-only one (WP=1): #PF injected with error code and CR2; a misaligned addps there: #GP(0)", Mode::Long, LOAD_ADDR, image, expect(
            status_of(EXIT_PASS),
            "page faults injected",
            // #PF, error 0 (not present, read, supervisor), CR2; then
            // #PF, error 3 (present, write), CR2; then #GP(0), CR2 as before.
            Some(vec![
                14,
                0,
                UNMAPPED + 0x120,
                14,
                3,
                READ_ONLY + 0x40,
                13,
                0,
                READ_ONLY + 0x40,
            ]),
        )))
}

/// The exit code `unsupported-insn` ends with under `--on-unsupported ud`.
pub const UD_STATUS: i32 = status_of(EXIT_EXCEPTION);

/// `bursts` times: `pio` port writes (to the unassigned port 0x5a0), then
/// one `adcx` the VMM completes. With more than 32 writes per burst the
/// VMM has dropped the registers from the run page's sync set by the time
/// the `adcx` comes, so each one fetches them (`vmm::vcpu::SYNC_IDLE_EXITS`).
pub fn emulation_after_pio_bursts(bursts: u32, pio: u32) -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        a.mov(dx, 0x5a0u32)?;
        a.mov(r8d, bursts.max(1))?;
        let mut burst = a.create_label();
        a.set_label(&mut burst)?;
        let mut write = a.create_label();
        a.mov(ecx, pio.max(1))?;
        a.set_label(&mut write)?;
        a.out(dx, al)?;
        a.loop_(write)?;
        a.adcx(rax, rbx)?;
        a.dec(r8d)?;
        a.jnz(burst)?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "emulation-after-pio-bursts",
        "bursts of port writes, each followed by one adcx completed by the VMM",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(status_of(EXIT_PASS), "", None),
    ))
}
