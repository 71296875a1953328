//! The cache family (`emulator/cache.rs`): cache-line instructions and hints,
//! CLZERO, undefined opcodes.

use super::*;

/// Cache-line instructions check and translate their address like a read
/// and touch nothing; hints never fault. (The host CPU: a CLFLUSH of a
/// PROT_NONE page faults with SEGV_MAPERR-like #PF, a PREFETCH does not;
/// `stub::tests::cache_instructions_on_the_host`.)
#[test]
fn cache_lines_walk_and_hints_never_fault() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let missing = 0x7f_0000u64;
    let run = |e: &mut Emulator, cpu: &mut CpuState, mem: &mut MockPlatform, code: &[u8]| {
        cpu.rip = CODE;
        mem.log.retain(|_| false);
        e.emulate(cpu, code, &mut NoVectorState, mem)
    };
    let line: [(&str, Vec<u8>); 3] = [
        ("clflush", asm64(|a| a.clflush(byte_ptr(rsi)))),
        ("clflushopt", asm64(|a| a.clflushopt(byte_ptr(rsi)))),
        ("clwb", asm64(|a| a.clwb(byte_ptr(rsi)))),
    ];
    for (name, code) in &line {
        cpu.gprs.rsi = MMIO_BASE + 0x40;
        let o = run(&mut e, &mut cpu, &mut mem, code);
        assert!(matches!(o, Outcome::Done { .. }), "{name}: {o:?}");
        assert_eq!(cpu.rip, CODE + code.len() as u64, "{name}");
        let data: Vec<_> = mem.log.iter().filter(|l| l.1 >= MMIO_BASE).collect();
        assert!(data.is_empty(), "{name} touched the device: {data:?}");
        cpu.gprs.rsi = missing + 0x40;
        let o = run(&mut e, &mut cpu, &mut mem, code);
        assert_eq!(exc(&o), (VEC_PF, Some(0)), "{name}");
        cpu.gprs.rsi = 0x8000_0000_0000_0000;
        let o = run(&mut e, &mut cpu, &mut mem, code);
        assert_eq!(exc(&o), (VEC_GP, Some(0)), "{name} non-canonical");
    }
    let hints: [(&str, Vec<u8>); 3] = [
        ("prefetcht0", asm64(|a| a.prefetcht0(byte_ptr(rsi)))),
        ("prefetchnta", asm64(|a| a.prefetchnta(byte_ptr(rsi)))),
        ("prefetchw", asm64(|a| a.prefetchw(byte_ptr(rsi)))),
    ];
    for (name, code) in &hints {
        for addr in [missing, 0x8000_0000_0000_0000] {
            cpu.gprs.rsi = addr;
            let o = run(&mut e, &mut cpu, &mut mem, code);
            assert!(matches!(o, Outcome::Done { .. }), "{name} {addr:#x}: {o:?}");
            assert!(mem.log.is_empty(), "{name}: no walk, no access");
        }
    }
}

/// CLZERO (AMD) zeroes the whole 64-byte line holding rAX, as a store
/// (checked against the host CPU when it has CLZERO); UD0/UD1/UD2 are #UD.
#[test]
fn clzero_and_undefined_opcodes() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    if cpu_has_clzero() {
        let mut native = [0xaau8; 192];
        let base = native.as_mut_ptr() as usize;
        let line = (base + 64) & !63;
        // SAFETY: CLZERO writes the 64-byte line at `line`, inside `native`.
        unsafe { core::arch::asm!("clzero", in("rax") line + 13) };
        let off = line - base;
        assert!(native[off..off + 64].iter().all(|&b| b == 0));
        assert!(native[..off].iter().all(|&b| b == 0xaa));
    }
    mem.mmio[0x40..0xc0].fill(0xaa);
    cpu.gprs.rax = MMIO_BASE + 0x40 + 13;
    done(&e.emulate(&mut cpu, &[0x0f, 0x01, 0xfc], &mut NoVectorState, &mut mem));
    assert!(mem.mmio[0x40..0x80].iter().all(|&b| b == 0));
    assert!(mem.mmio[0x80..0xc0].iter().all(|&b| b == 0xaa));
    cpu.rip = CODE;
    cpu.gprs.rax = 0x7f_0000;
    assert_eq!(
        exc(&e.emulate(&mut cpu, &[0x0f, 0x01, 0xfc], &mut NoVectorState, &mut mem)).0,
        VEC_PF
    );
    for ud in [&[0x0f, 0x0b][..], &[0x0f, 0xb9, 0x00], &[0x0f, 0xff, 0x00]] {
        cpu.rip = CODE;
        assert_eq!(
            exc(&e.emulate(&mut cpu, ud, &mut NoVectorState, &mut mem)),
            (VEC_UD, None)
        );
    }
}

fn cpu_has_clzero() -> bool {
    core::arch::x86_64::__cpuid(0x8000_0008).ebx & 1 != 0
}
