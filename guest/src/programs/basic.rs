//! Entry in each mode, and the ways a VM ends.

use super::{assemble, expect, LOAD_ADDR, REAL_LOAD_ADDR};
use crate::rt::{exit, print, report_eax, report_imm, report_rax, status_of, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Real mode at 0000:7c00: prints, reports CS (0) and a marker, exits.
pub fn hello_real() -> Result<Program, IcedError> {
    let image = assemble(Mode::Real, REAL_LOAD_ADDR, |a| {
        print(a, "hello from real mode\n")?;
        a.xor(eax, eax)?;
        a.mov(ax, cs)?;
        report_eax(a)?;
        report_imm(a, 0x1616)?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "hello-real",
        "real mode: print on COM1, report CS and 0x1616, exit 0x10",
        Mode::Real,
        REAL_LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "hello from real mode",
            Some(vec![0, 0x1616]),
        ),
    ))
}

/// Flat 32-bit protected mode: reports CS (0x08), CR0.PE|PG bits, a marker.
pub fn hello_protected() -> Result<Program, IcedError> {
    let image = assemble(Mode::Protected, LOAD_ADDR, |a| {
        print(a, "hello from protected mode\n")?;
        a.xor(eax, eax)?;
        a.mov(ax, cs)?;
        report_eax(a)?;
        a.mov(eax, cr0)?;
        a.and(eax, 0x8000_0001u32)?;
        report_eax(a)?;
        report_imm(a, 0x3232)?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "hello-protected",
        "32-bit protected mode: report CS, CR0.PG|PE, 0x3232, exit 0x10",
        Mode::Protected,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "hello from protected mode",
            Some(vec![0x08, 1, 0x3232]),
        ),
    ))
}

/// 64-bit mode: reports EFER.LMA|NXE, CR4.OSXSAVE, RSP alignment, a marker.
pub fn hello_long() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        print(a, "hello from long mode\n")?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.and(eax, 0xc00)?; // LMA | NXE
        report_eax(a)?;
        a.mov(rax, cr4)?;
        a.and(eax, 0x4_0620)?; // OSXSAVE | OSXMMEXCPT | OSFXSR | PAE
        report_eax(a)?;
        a.mov(rax, rsp)?;
        a.and(eax, 0xf)?;
        report_eax(a)?;
        a.mov(rax, 0x0123_4567_89ab_cdefu64)?;
        report_rax(a)?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "hello-long",
        "64-bit mode: report EFER.LMA|NXE, CR4 bits, RSP%16, a 64-bit marker; exit 0x10",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "hello from long mode",
            Some(vec![0xc00, 0x4_0620, 0, 0x0123_4567_89ab_cdef]),
        ),
    ))
}

/// HLT with interrupts off: the VMM ends with status 0.
pub fn halt() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        print(a, "halting\n")?;
        a.cli()?;
        a.hlt()
    })?;
    Ok(Program::new(
        "halt",
        "print, then HLT with interrupts off (status 0)",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(0, "halting", Some(vec![])),
    ))
}

/// 0xFE to port 0x64: the i8042 resets the machine, the VMM ends with 0.
pub fn i8042_reset() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        print(a, "resetting\n")?;
        a.mov(al, 0xfeu32)?;
        a.out(0x64, al)?;
        exit(a, 0x3e)
    })?;
    Ok(Program::new(
        "i8042-reset",
        "reset through the i8042 (status 0)",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(0, "resetting", Some(vec![])),
    ))
}

/// An exception with an empty IDT: #GP, #DF, then a triple fault.
pub fn triple_fault() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let mut idtr = a.create_label();
        print(a, "faulting\n")?;
        a.lidt(ptr(idtr))?;
        a.ud2()?;
        a.set_label(&mut idtr)?;
        a.dw(&[0])?;
        a.dq(&[0])
    })?;
    Ok(Program::new(
        "triple-fault",
        "ud2 with a zero-length IDT: triple fault (status 4)",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(4, "faulting", Some(vec![])),
    ))
}

/// Spins forever at CPL 0 after printing: for stopping a VM from outside
/// (SIGINT/SIGTERM).
pub fn spin() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        print(a, "spinning\n")?;
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.pause()?;
        a.jmp(l)
    })?;
    Ok(Program::new(
        "spin",
        "print, then spin forever (stop it with SIGINT/SIGTERM: status 14)",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(14, "spinning", Some(vec![])),
    ))
}

/// Reports CPUID leaf 1 ECX/EDX and leaf 7 EBX/ECX as the guest sees them
/// (`--cpu kvm` vs `--cpu host`).
pub fn cpuid_leaves() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        for (leaf, regs) in [(1u32, [ecx, edx]), (7, [ebx, ecx])] {
            for r in regs {
                a.mov(eax, leaf)?;
                a.xor(ecx, ecx)?;
                a.cpuid()?;
                a.mov(eax, r)?;
                report_eax(a)?;
            }
        }
        print(a, "cpuid read\n")?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "cpuid-leaves",
        "reports CPUID.1:ECX, CPUID.1:EDX, CPUID.7.0:EBX, CPUID.7.0:ECX (compare --cpu kvm and --cpu host)",
        Mode::Long,
        LOAD_ADDR,
        image,
        // The values depend on the host; the test compares them with it.
        expect(status_of(EXIT_PASS), "cpuid read", None),
    ))
}
