//! Guests for `vmm bench`: each runs one exit-causing instruction `iters`
//! times in a tight loop, then ends through isa-debug-exit with
//! [`EXIT_PASS`].
//!
//! The loops are `insn; loop l` (two instructions per iteration) because
//! CPL 0 code is interpreted on PVM hosts at about 1 us per instruction:
//! every extra loop instruction would be paid inside each measured round
//! trip. The iteration count is baked into the image so that a VM run
//! through the normal VMM (which cannot preset registers) ends by itself.
//!
//! Catalogued under names starting with [`BENCH_PREFIX`]; the catalogue
//! test skips them (their outcome depends on what the VMM can emulate, and
//! `bench-cpuid` never ends).

use super::{assemble, expect, LOAD_ADDR};
use crate::rt::kernel64::{sys_exit, Kernel64};
use crate::rt::{exit, status_of, Asm, AsmResult, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Names of bench programs start with this.
pub const BENCH_PREFIX: &str = "bench-";
/// The port the PIO loop writes to (free in the VMM's port map).
pub const BENCH_PORT: u16 = 0x5a0;
/// The MMIO address the MMIO and emulation loops use; outside RAM.
pub const BENCH_MMIO: u64 = 0xd000_0000;
pub const BENCH_MMIO_SIZE: u64 = 0x1000;
/// RAM the AVX2 loop reads (beyond any bench image).
pub const SIMD_DATA: u64 = 0x20_0000;
/// The iteration count of the catalogued variants.
pub const CATALOGUE_ITERS: u32 = 1000;
/// `bench-cpuid` runs this many cpuids per KVM_RUN (a multiple of 10).
pub const CPUID_PER_EXIT: u32 = 1000;
/// The process status of a bench guest that ran all its iterations.
pub const BENCH_DONE_STATUS: i32 = status_of(EXIT_PASS);

/// CPL 0: `out dx, al` to [`BENCH_PORT`].
pub fn pio(iters: u32) -> Result<Program, IcedError> {
    cpl0(
        "bench-pio",
        "bench: CPL 0 loop of out dx,al to port 0x5a0",
        iters,
        false,
        |a| {
            a.mov(dx, u32::from(BENCH_PORT))?;
            Ok(())
        },
        |a| a.out(dx, al),
    )
}

/// CPL 0: a 4-byte MMIO store to [`BENCH_MMIO`].
pub fn mmio(iters: u32) -> Result<Program, IcedError> {
    cpl0(
        "bench-mmio",
        "bench: CPL 0 loop of a 4-byte MMIO store to 0xd0000000",
        iters,
        false,
        |a| a.mov(rbx, BENCH_MMIO),
        |a| a.mov(dword_ptr(rbx), eax),
    )
}

/// CPL 0: `lock cmpxchg16b` on MMIO RAM (KVM's emulator refuses it).
pub fn cmpxchg16b(iters: u32) -> Result<Program, IcedError> {
    cpl0(
        "bench-cmpxchg16b",
        "bench: CPL 0 loop of lock cmpxchg16b on --mmio-ram 0xd0000000",
        iters,
        true,
        |a| a.mov(rsi, BENCH_MMIO),
        |a| a.lock().cmpxchg16b(xmmword_ptr(rsi)),
    )
}

/// CPL 0: register-only `adcx` (completed in a stub, no memory operand).
pub fn adcx(iters: u32) -> Result<Program, IcedError> {
    cpl0(
        "bench-adcx",
        "bench: CPL 0 loop of adcx rax,rbx (register-only emulation)",
        iters,
        false,
        |_| Ok(()),
        |a| a.adcx(rax, rbx),
    )
}

/// CPL 0: a 32-byte AVX load from MMIO RAM (needs guest vector state).
pub fn vmovdqu(iters: u32) -> Result<Program, IcedError> {
    cpl0(
        "bench-vmovdqu",
        "bench: CPL 0 loop of vmovdqu ymm0 from --mmio-ram 0xd0000000",
        iters,
        true,
        |a| a.mov(rsi, BENCH_MMIO),
        |a| a.vmovdqu(ymm0, ymmword_ptr(rsi)),
    )
}

/// CPL 0: the load of [`vmovdqu`] from MMIO RAM holding non-zero bytes
/// (written once before the loop).
pub fn vmovdqu_nonzero(iters: u32) -> Result<Program, IcedError> {
    cpl0(
        "bench-vmovdqu-nonzero",
        "bench: CPL 0 loop of vmovdqu ymm0 from --mmio-ram 0xd0000000 holding non-zero data",
        iters,
        true,
        |a| {
            a.mov(rsi, BENCH_MMIO)?;
            a.mov(rax, 0x0123_4567_89ab_cdefu64)?;
            for off in (0..32).step_by(8) {
                a.mov(qword_ptr(rsi + off), rax)?;
            }
            Ok(())
        },
        |a| a.vmovdqu(ymm0, ymmword_ptr(rsi)),
    )
}

/// The components the whole-state loops save and restore: x87, SSE, AVX
/// (832 bytes in the standard format; the MMIO window is 4 KiB).
const STATE_COMPONENTS: u32 = 0b111;

/// CPL 0: `xsave64 [mmio]` of x87, SSE and AVX state, a whole-state store
/// the VMM completes (KVM's emulator has no XSAVE).
pub fn xsave(iters: u32) -> Result<Program, IcedError> {
    cpl0(
        "bench-xsave",
        "bench: CPL 0 loop of xsave64 (x87, SSE, AVX) to --mmio-ram 0xd0000000",
        iters,
        true,
        |a| {
            a.mov(rsi, BENCH_MMIO)?;
            a.mov(eax, STATE_COMPONENTS)?;
            a.xor(edx, edx)
        },
        |a| a.xsave64(ptr(rsi)),
    )
}

/// CPL 0: `xrstor64 [mmio]` of the image one `xsave64` wrote there first.
pub fn xrstor(iters: u32) -> Result<Program, IcedError> {
    cpl0(
        "bench-xrstor",
        "bench: CPL 0 loop of xrstor64 (x87, SSE, AVX) from --mmio-ram 0xd0000000",
        iters,
        true,
        |a| {
            a.mov(rsi, BENCH_MMIO)?;
            a.mov(eax, STATE_COMPONENTS)?;
            a.xor(edx, edx)?;
            a.xsave64(ptr(rsi))
        },
        |a| a.xrstor64(ptr(rsi)),
    )
}

/// CPL 0: AVX2 arithmetic on RAM; on PVM every instruction reaches the VMM.
pub fn simd_cpl0(iters: u32) -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        // Zero-filled RAM above the image; VEX loads need no alignment.
        a.mov(rbx, SIMD_DATA)?;
        counted_loop(a, iters, |a| a.vpaddd(ymm0, ymm0, ymmword_ptr(rbx)))?;
        exit(a, EXIT_PASS)
    })?;
    Ok(program(
        "bench-simd-cpl0",
        "bench: CPL 0 loop of vpaddd ymm0,ymm0,[ram]",
        image,
        false,
    ))
}

/// CPL 3: a 4-byte MMIO store to [`BENCH_MMIO`], natively.
pub fn user_mmio(iters: u32) -> Result<Program, IcedError> {
    user(
        "bench-user-mmio",
        "bench: CPL 3 loop of a 4-byte MMIO store to 0xd0000000",
        iters,
        false,
        |a| a.mov(dword_ptr(rbx), eax),
    )
}

/// CPL 3: a 32-byte AVX load from MMIO RAM (KVM gives up on it).
pub fn user_vmovdqu(iters: u32) -> Result<Program, IcedError> {
    user(
        "bench-user-vmovdqu",
        "bench: CPL 3 loop of vmovdqu ymm0 from --mmio-ram 0xd0000000",
        iters,
        true,
        |a| a.vmovdqu(ymm0, ymmword_ptr(rbx)),
    )
}

/// CPL 0, forever: [`CPUID_PER_EXIT`] cpuids (handled inside KVM), then one
/// `out` to [`BENCH_PORT`], so each KVM_RUN times a known number of them.
pub fn cpuid() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let mut outer = a.create_label();
        let mut inner = a.create_label();
        a.set_label(&mut outer)?;
        a.mov(r8d, CPUID_PER_EXIT / 10)?;
        a.set_label(&mut inner)?;
        // Unrolled so the loop's own instructions are a fifth of the cost
        // they would be with one cpuid per iteration.
        for _ in 0..10 {
            a.cpuid()?;
        }
        a.dec(r8d)?;
        a.jnz(inner)?;
        a.mov(dx, u32::from(BENCH_PORT))?;
        a.out(dx, al)?;
        a.jmp(outer)
    })?;
    let mut p = program(
        "bench-cpuid",
        "bench: CPL 0 cpuid loop (never leaves the kernel), an out every 1000; never ends",
        image,
        false,
    );
    p.expect = expect(-1, "", None);
    Ok(p)
}

/// Every bench program with the catalogue's iteration count.
pub fn catalogue_pio() -> Result<Program, IcedError> {
    pio(CATALOGUE_ITERS)
}
pub fn catalogue_mmio() -> Result<Program, IcedError> {
    mmio(CATALOGUE_ITERS)
}
pub fn catalogue_cmpxchg16b() -> Result<Program, IcedError> {
    cmpxchg16b(CATALOGUE_ITERS)
}
pub fn catalogue_adcx() -> Result<Program, IcedError> {
    adcx(CATALOGUE_ITERS)
}
pub fn catalogue_vmovdqu() -> Result<Program, IcedError> {
    vmovdqu(CATALOGUE_ITERS)
}
pub fn catalogue_vmovdqu_nonzero() -> Result<Program, IcedError> {
    vmovdqu_nonzero(CATALOGUE_ITERS)
}
pub fn catalogue_xsave() -> Result<Program, IcedError> {
    xsave(CATALOGUE_ITERS)
}
pub fn catalogue_xrstor() -> Result<Program, IcedError> {
    xrstor(CATALOGUE_ITERS)
}
pub fn catalogue_simd_cpl0() -> Result<Program, IcedError> {
    simd_cpl0(CATALOGUE_ITERS)
}
pub fn catalogue_user_mmio() -> Result<Program, IcedError> {
    user_mmio(CATALOGUE_ITERS)
}
pub fn catalogue_user_vmovdqu() -> Result<Program, IcedError> {
    user_vmovdqu(CATALOGUE_ITERS)
}

/// `body` `iters` times with `loop` (RCX is the counter), iters >= 1.
fn counted_loop(a: &mut Asm, iters: u32, body: impl Fn(&mut Asm) -> AsmResult) -> AsmResult {
    let mut top = a.create_label();
    a.mov(ecx, iters.max(1))?;
    a.set_label(&mut top)?;
    body(a)?;
    a.loop_(top)
}

fn cpl0(
    name: &'static str,
    description: &'static str,
    iters: u32,
    mmio_ram: bool,
    prologue: impl FnOnce(&mut Asm) -> AsmResult,
    body: impl Fn(&mut Asm) -> AsmResult,
) -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        prologue(a)?;
        counted_loop(a, iters, body)?;
        exit(a, EXIT_PASS)
    })?;
    Ok(program(name, description, image, mmio_ram))
}

/// The mini kernel sets up at CPL 0 (interpreted, slow), marks the end of
/// that with one `out` to [`BENCH_PORT`] so the first measured exit does not
/// include it, then runs the loop at CPL 3 and ends with `sys_exit`.
fn user(
    name: &'static str,
    description: &'static str,
    iters: u32,
    mmio_ram: bool,
    body: impl Fn(&mut Asm) -> AsmResult,
) -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let k = Kernel64::new(a)?;
        let mut payload = a.create_label();
        k.setup(a)?;
        a.mov(dx, u32::from(BENCH_PORT))?;
        a.out(dx, al)?;
        k.enter_user(a, payload)?;
        a.set_label(&mut payload)?;
        a.mov(rbx, BENCH_MMIO)?;
        counted_loop(a, iters, body)?;
        sys_exit(a, EXIT_PASS)?;
        k.finish(a)
    })?;
    Ok(program(name, description, image, mmio_ram))
}

fn program(
    name: &'static str,
    description: &'static str,
    image: Vec<u8>,
    mmio_ram: bool,
) -> Program {
    let p = Program::new(
        name,
        description,
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(BENCH_DONE_STATUS, "", None),
    );
    if mmio_ram {
        p.with_mmio_ram(vec![(BENCH_MMIO, BENCH_MMIO_SIZE)])
    } else {
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    /// The measured instruction is the first of the loop, right before `loop`.
    #[test]
    fn loops_hold_the_measured_instruction() {
        for (p, m) in [
            (pio(5), Mnemonic::Out),
            (mmio(5), Mnemonic::Mov),
            (cmpxchg16b(5), Mnemonic::Cmpxchg16b),
            (adcx(5), Mnemonic::Adcx),
            (vmovdqu(5), Mnemonic::Vmovdqu),
            (vmovdqu_nonzero(5), Mnemonic::Vmovdqu),
            (xsave(5), Mnemonic::Xsave64),
            (xrstor(5), Mnemonic::Xrstor64),
            (simd_cpl0(5), Mnemonic::Vpaddd),
        ] {
            let p = p.unwrap();
            let insns: Vec<_> = Decoder::with_ip(64, &p.image, LOAD_ADDR, DecoderOptions::NONE)
                .into_iter()
                .collect();
            let at = insns
                .iter()
                .position(|i| i.mnemonic() == Mnemonic::Loop)
                .unwrap_or_else(|| panic!("{}: no loop", p.name));
            assert_eq!(insns[at - 1].mnemonic(), m, "{}", p.name);
            assert!(p.name.starts_with(BENCH_PREFIX));
        }
    }
}
