//! The guest runtime: port numbers shared with the VMM, mode-independent
//! helpers (print to COM1, report a value, exit), and the 64-bit mini kernel
//! that runs payloads at CPL 3.

pub mod kernel64;
pub mod multiboot;

use iced_x86::code_asm::*;

pub type Asm = CodeAssembler;
pub type AsmResult<T = ()> = Result<T, IcedError>;

pub const COM1: u16 = 0x3f8;
pub const DEBUG_EXIT: u16 = 0xf4;
/// The VMM's test-report latch: 8 bytes; writing the last byte records it.
pub const TEST_REPORT: u16 = 0x4f0;

/// Prints `s` on COM1 with one `out` per byte: no data, no loop, so it
/// works in every mode and at any address.
pub fn print(a: &mut Asm, s: &str) -> AsmResult {
    a.mov(dx, COM1 as u32)?;
    for b in s.bytes() {
        a.mov(al, b as u32)?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Reports EAX (zero-extended) on the test-report port. Clobbers EAX, DX.
pub fn report_eax(a: &mut Asm) -> AsmResult {
    a.mov(dx, TEST_REPORT as u32)?;
    a.out(dx, eax)?;
    a.xor(eax, eax)?;
    a.mov(dx, (TEST_REPORT + 4) as u32)?;
    a.out(dx, eax)
}

/// Reports an immediate 32-bit value. Clobbers EAX, DX.
pub fn report_imm(a: &mut Asm, v: u32) -> AsmResult {
    a.mov(eax, v)?;
    report_eax(a)
}

/// 64-bit mode only: reports RAX. Clobbers RAX, DX.
pub fn report_rax(a: &mut Asm) -> AsmResult {
    a.mov(dx, TEST_REPORT as u32)?;
    a.out(dx, eax)?;
    a.shr(rax, 32)?;
    a.mov(dx, (TEST_REPORT + 4) as u32)?;
    a.out(dx, eax)
}

/// Ends the VM through isa-debug-exit: the VMM exits with `(code << 1) | 1`.
pub fn exit(a: &mut Asm, code: u32) -> AsmResult {
    a.mov(dx, DEBUG_EXIT as u32)?;
    a.mov(eax, code)?;
    a.out(dx, eax)?;
    // Not reached; a halt keeps a broken exit port from running on.
    a.cli()?;
    a.hlt()
}

/// Exit code a program uses when its own check failed (status 0x7d).
pub const EXIT_CHECK_FAILED: u32 = 0x3e;
/// Exit code of the kernel's handler for an unexpected exception (status 0x7f).
pub const EXIT_EXCEPTION: u32 = 0x3f;
/// Exit code programs use for success (status 0x21).
pub const EXIT_PASS: u32 = 0x10;

/// The process status `vmm` exits with for debug-exit `code`.
pub const fn status_of(code: u32) -> i32 {
    (((code << 1) | 1) & 0xff) as i32
}
