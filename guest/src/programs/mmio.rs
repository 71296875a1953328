//! MMIO on `--mmio-ram`: every width at CPL 0, 16-byte SSE moves at CPL 3
//! (KVM splits them in two exits), and an access that crosses from RAM into
//! MMIO.

use super::{assemble, expect, LOAD_ADDR, MMIO_BASE, MMIO_SIZE};
use crate::rt::kernel64::{sys_exit, sys_print, sys_report, Kernel64};
use crate::rt::{exit, print, report_rax, status_of, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// 1-, 2-, 4- and 8-byte stores and loads at CPL 0 (served by KVM's
/// emulator, one MMIO exit each).
pub fn mmio_widths() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        a.mov(rbx, MMIO_BASE)?;
        a.mov(byte_ptr(rbx), 0x11u32)?;
        a.mov(word_ptr(rbx + 2), 0x2233u32)?;
        a.mov(dword_ptr(rbx + 4), 0x4455_6677u32)?;
        a.mov(rax, 0x8899_aabb_ccdd_eeffu64)?;
        a.mov(qword_ptr(rbx + 8), rax)?;
        a.movzx(eax, byte_ptr(rbx))?;
        report_rax(a)?;
        a.movzx(eax, word_ptr(rbx + 2))?;
        report_rax(a)?;
        a.mov(eax, dword_ptr(rbx + 4))?;
        report_rax(a)?;
        a.mov(rax, qword_ptr(rbx + 8))?;
        report_rax(a)?;
        a.mov(rax, qword_ptr(rbx))?;
        report_rax(a)?;
        // Unwritten MMIO-RAM reads zero; unbacked space reads all-ones.
        a.mov(rax, qword_ptr(rbx + 0x100))?;
        report_rax(a)?;
        a.mov(rcx, MMIO_BASE + 0x10_0000)?;
        a.mov(rax, qword_ptr(rcx))?;
        report_rax(a)?;
        print(a, "mmio ok\n")?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "mmio-widths",
        "MMIO stores and loads of 1, 2, 4 and 8 bytes at CPL 0; unbacked MMIO reads all-ones",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "mmio ok",
            Some(vec![
                0x11,
                0x2233,
                0x4455_6677,
                0x8899_aabb_ccdd_eeff,
                0x4455_6677_2233_0011,
                0,
                u64::MAX,
            ]),
        ),
    )
    .with_mmio_ram(vec![(MMIO_BASE, MMIO_SIZE)]))
}

/// A CPL 3 payload moves 16 bytes to and from MMIO with SSE.
pub fn mmio_user_sse() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        let mut pattern = a.create_label();
        k.start(a, user)?;
        a.set_label(&mut pattern)?;
        a.dq(&[0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908])?;
        a.set_label(&mut user)?;
        a.mov(rbx, MMIO_BASE)?;
        a.movdqu(xmm0, xmmword_ptr(pattern))?;
        a.movdqu(xmmword_ptr(rbx + 0x40), xmm0)?;
        a.movdqu(xmm1, xmmword_ptr(rbx + 0x40))?;
        a.movq(rax, xmm1)?;
        sys_report(a, rax)?;
        a.pextrq(rax, xmm1, 1)?;
        sys_report(a, rax)?;
        // The halves also read back one by one with integer loads.
        a.mov(rax, qword_ptr(rbx + 0x48))?;
        sys_report(a, rax)?;
        sys_print(a, "sse mmio ok\n")?;
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(Program::new(
        "mmio-user-sse",
        "CPL 3: movdqu store and load of 16 bytes on MMIO",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "sse mmio ok",
            Some(vec![
                0x0706_0504_0302_0100,
                0x0f0e_0d0c_0b0a_0908,
                0x0f0e_0d0c_0b0a_0908,
            ]),
        ),
    )
    .with_mmio_ram(vec![(MMIO_BASE, MMIO_SIZE)]))
}

/// RAM ends at 128 MiB and an MMIO window starts right there: an 8-byte
/// store and load at 128 MiB - 4 cross the page into MMIO.
pub fn mmio_cross_page() -> Result<Program, IcedError> {
    const RAM: u64 = 128 << 20;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut user = a.create_label();
        k.start(a, user)?;
        a.set_label(&mut user)?;
        a.mov(rbx, RAM - 4)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(eax, dword_ptr(rbx))?;
        sys_report(a, rax)?;
        a.mov(eax, dword_ptr(rbx + 4))?;
        sys_report(a, rax)?;
        a.mov(rax, qword_ptr(rbx))?;
        sys_report(a, rax)?;
        sys_print(a, "cross-page ok\n")?;
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(Program::new(
        "mmio-cross-page",
        "CPL 3: an 8-byte store and load crossing from the last RAM page into MMIO",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "cross-page ok",
            Some(vec![0x5566_7788, 0x1122_3344, 0x1122_3344_5566_7788]),
        ),
    )
    .with_mmio_ram(vec![(RAM, 0x1000)])
    .with_mem(RAM))
}

/// Two adjacent `--mmio-ram` windows, 0xd0000000:0x10 and 0xd0000010:0x20,
/// and accesses that straddle them or start in unassigned space: KVM's own
/// 8-byte MMIO exits and the VMM-emulated 32-byte AVX moves are split
/// across the windows and the gaps (reads all-ones, writes dropped) byte by
/// byte, as a bus's address decoder would. Needs AVX2 on the host.
pub fn mmio_split_windows() -> Result<Program, IcedError> {
    const W1: u64 = MMIO_BASE;
    const W2: u64 = MMIO_BASE + 0x10;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let mut pattern = a.create_label();
        let mut code = a.create_label();
        a.jmp(code)?;
        a.set_label(&mut pattern)?;
        a.db(&(0u8..32).collect::<Vec<u8>>())?;
        a.set_label(&mut code)?;
        // KVM exit: 8 bytes at W1+0xc, 4 in each window.
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(rbx, W1 + 0xc)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(rbx, W1 + 8)?;
        a.mov(rax, qword_ptr(rbx))?;
        report_rax(a)?;
        a.mov(rbx, W2)?;
        a.mov(eax, dword_ptr(rbx))?;
        report_rax(a)?;
        // From unassigned space into W1: the first 4 bytes are dropped /
        // read all-ones, the rest reach the window.
        a.mov(rcx, 0xaabb_ccdd_eeff_0011u64)?;
        a.mov(rbx, W1 - 4)?;
        a.mov(qword_ptr(rbx), rcx)?;
        a.mov(rax, qword_ptr(rbx))?;
        report_rax(a)?;
        // The emulator's path: a 32-byte AVX store at W1+8 (8 bytes to W1,
        // 24 to W2), read back by plain loads; a 32-byte load at W2+0x10
        // (16 bytes of W2, then 16 unassigned).
        a.vmovdqu(ymm0, ymmword_ptr(pattern))?;
        a.mov(rbx, W1 + 8)?;
        a.vmovdqu(ymmword_ptr(rbx), ymm0)?;
        a.mov(rax, qword_ptr(rbx))?;
        report_rax(a)?;
        a.mov(rbx, W2 + 0x10)?;
        a.mov(rax, qword_ptr(rbx))?;
        report_rax(a)?;
        a.vmovdqu(ymm1, ymmword_ptr(rbx))?;
        a.vmovq(rax, xmm1)?;
        report_rax(a)?;
        a.vextracti128(xmm2, ymm1, 1)?;
        a.vmovq(rax, xmm2)?;
        report_rax(a)?;
        print(a, "split ok\n")?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "mmio-split-windows",
        "8-byte MMIO stores and 32-byte AVX moves across two adjacent MMIO windows and unassigned space (needs AVX2)",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "split ok",
            Some(vec![
                0x5566_7788_0000_0000,
                0x1122_3344,
                0xaabb_ccdd_ffff_ffff,
                0x0706_0504_0302_0100,
                0x1f1e_1d1c_1b1a_1918,
                0x1f1e_1d1c_1b1a_1918,
                u64::MAX,
            ]),
        ),
    )
    .with_mmio_ram(vec![(W1, 0x10), (W2, 0x20)]))
}
