//! Locked instructions in the forms and places a hostile guest picks: a
//! LOCK prefix where none is allowed, operands across pages, in device
//! memory, at the end of a window and across a cache line.

use super::*;

fn run(e: &mut Emulator, cpu: &mut CpuState, mem: &mut MockPlatform, code: &[u8]) -> Outcome {
    cpu.rip = CODE;
    e.emulate(cpu, code, &mut NoVectorState, mem)
}

fn mmio_u64(mem: &MockPlatform, gpa: u64) -> u64 {
    let off = (gpa - MMIO_BASE) as usize;
    u64::from_le_bytes(mem.mmio[off..off + 8].try_into().unwrap())
}

#[test]
fn lock_where_none_is_allowed_is_ud() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rsi = DATA;
    // lock add eax, ebx (register form); lock mov [rsi], eax.
    for code in [&[0xf0, 0x01, 0xd8][..], &[0xf0, 0x89, 0x06]] {
        assert_eq!(exc(&run(&mut e, &mut cpu, &mut mem, code)), (VEC_UD, None));
        assert_eq!(cpu.rip, CODE, "no RIP advance on a fault");
    }
    assert!(
        mem.log.iter().all(|&(write, _, _)| !write),
        "nothing written"
    );
}

#[test]
fn locked_operands_across_pages_and_in_device_memory() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let xadd = asm64(|a| a.lock().xadd(qword_ptr(rsi), rax));
    // Across two RAM pages: one read-modify-write of all 8 bytes.
    mem.set_u64(DATA + 0xffc, 0x10);
    cpu.gprs.rsi = DATA + 0xffc;
    cpu.gprs.rax = 1;
    done(&run(&mut e, &mut cpu, &mut mem, &xadd));
    assert_eq!((mem.u64_at(DATA + 0xffc), cpu.gprs.rax), (0x11, 0x10));
    // Into a page that is not mapped: #PF for a write, nothing written.
    let before = mem.u64_at(DATA + 0x3ffc);
    cpu.gprs.rsi = DATA + 0x3ffc;
    let (vector, code) = exc(&run(&mut e, &mut cpu, &mut mem, &xadd));
    assert_eq!(
        (vector, code.map(|c| c & (PFEC_P | PFEC_W))),
        (VEC_PF, Some(PFEC_W))
    );
    assert_eq!(mem.u64_at(DATA + 0x3ffc), before);
    // Across the two pages of the device window, and XCHG there.
    mem.write_phys(MMIO_BASE + 0xffc, &5u64.to_le_bytes())
        .unwrap();
    cpu.gprs.rsi = MMIO_BASE + 0xffc;
    cpu.gprs.rax = 2;
    done(&run(&mut e, &mut cpu, &mut mem, &xadd));
    assert_eq!((mmio_u64(&mem, MMIO_BASE + 0xffc), cpu.gprs.rax), (7, 5));
    let xchg = asm64(|a| a.xchg(qword_ptr(rsi), rbx));
    cpu.gprs.rbx = 0x55;
    done(&run(&mut e, &mut cpu, &mut mem, &xchg));
    assert_eq!((mmio_u64(&mem, MMIO_BASE + 0xffc), cpu.gprs.rbx), (0x55, 7));
    // CMPXCHG16B: misaligned in device memory is #GP(0) before any access
    // (a read-sensitive device must not see one); aligned in the window's
    // last 16 bytes completes.
    let cx16 = asm64(|a| a.lock().cmpxchg16b(xmmword_ptr(rsi)));
    let accesses = mem.log.len();
    cpu.gprs.rsi = MMIO_BASE + 8;
    assert_eq!(
        exc(&run(&mut e, &mut cpu, &mut mem, &cx16)),
        (VEC_GP, Some(0))
    );
    assert_eq!(cpu.rip, CODE);
    assert!(
        mem.log[accesses..]
            .iter()
            .all(|&(_, gpa, _)| gpa < MMIO_BASE),
        "the device saw no access"
    );
    let last = MMIO_BASE + MMIO_SIZE - 16;
    cpu.gprs = crate::stub::GuestGprs {
        rsi: last,
        rbx: 0x66,
        rcx: 0x77,
        ..Default::default()
    };
    done(&run(&mut e, &mut cpu, &mut mem, &cx16));
    assert_eq!(
        (mmio_u64(&mem, last), mmio_u64(&mem, last + 8)),
        (0x66, 0x77)
    );
}

/// LOCK CMPXCHG at every offset that crosses a cache line (a split lock
/// on the host; the stub makes it first, on the bounce buffer at the same
/// offset).
#[test]
fn lock_cmpxchg_across_a_cache_line() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let cmpxchg = asm64(|a| a.lock().cmpxchg(qword_ptr(rsi), rbx));
    for off in 0x39..0x40 {
        let at = DATA + off;
        mem.set_u64(at, 0x1234 + off);
        cpu.gprs.rsi = at;
        cpu.gprs.rax = 0x1234 + off;
        cpu.gprs.rbx = 0x1122_3344_5566_7700 + off;
        done(&run(&mut e, &mut cpu, &mut mem, &cmpxchg));
        assert_eq!(mem.u64_at(at), 0x1122_3344_5566_7700 + off, "at {off:#x}");
        assert_ne!(cpu.gprs.rflags & 0x40, 0, "ZF at {off:#x}");
    }
}

/// A misaligned CMPXCHG16B raises #GP(0) before the page walk: no
/// accessed bit is set and the operand is not read, in RAM or in device
/// memory. (Vector forms such as MOVAPS still walk and read first: see
/// the emulator's flow.)
#[test]
fn misaligned_cmpxchg16b_touches_nothing() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let cx16 = asm64(|a| a.lock().cmpxchg16b(xmmword_ptr(rsi)));
    for base in [DATA, MMIO_BASE] {
        let leaf = mem.leaf_slot(CR3, 4, base);
        mem.set_u64(leaf, mem.u64_at(leaf) & !0x60);
        mem.log.clear();
        cpu.gprs.rsi = base + 8;
        let o = run(&mut e, &mut cpu, &mut mem, &cx16);
        assert_eq!(exc(&o), (VEC_GP, Some(0)), "at {base:#x}");
        assert_eq!(mem.u64_at(leaf) & 0x60, 0, "no accessed bit at {base:#x}");
        assert!(mem.log.iter().all(|&(_, gpa, _)| gpa >> 12 != base >> 12));
        // Aligned: walked (accessed and dirty) and read.
        cpu.gprs.rsi = base + 16;
        done(&run(&mut e, &mut cpu, &mut mem, &cx16));
        assert_eq!(
            mem.u64_at(leaf) & 0x60,
            0x60,
            "accessed, dirty at {base:#x}"
        );
        assert!(mem.log.iter().any(|&(w, gpa, _)| !w && gpa == base + 16));
    }
}

/// A misaligned aligned-only vector access (VMOVDQA, MOVAPS) is #GP(0)
/// before the walk, as on the CPU: no accessed bit, no device read; a
/// misaligned VMOVDQU still completes.
#[test]
fn misaligned_aligned_only_vector_access_touches_nothing() {
    if !avx_ok() {
        eprintln!("skipped: host has no AVX");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = XsaveImage::new();
    let movaps = asm64(|a| a.movaps(xmm1, xmmword_ptr(rsi)));
    let vmovdqa = asm64(|a| a.vmovdqa(ymm0, ptr(rsi)));
    let vmovdqu = asm64(|a| a.vmovdqu(ymm0, ptr(rsi)));
    for base in [DATA, MMIO_BASE] {
        let leaf = mem.leaf_slot(CR3, 4, base);
        for code in [&movaps, &vmovdqa] {
            mem.set_u64(leaf, mem.u64_at(leaf) & !0x60);
            mem.log.clear();
            cpu.rip = CODE;
            cpu.gprs.rsi = base + 8;
            let o = e.emulate(&mut cpu, code, &mut img, &mut mem);
            assert_eq!(exc(&o), (VEC_GP, Some(0)), "at {base:#x}");
            assert_eq!(mem.u64_at(leaf) & 0x60, 0, "no accessed bit at {base:#x}");
            assert!(mem.log.iter().all(|&(_, gpa, _)| gpa >> 12 != base >> 12));
        }
        cpu.rip = CODE;
        done(&e.emulate(&mut cpu, &vmovdqu, &mut img, &mut mem));
        assert_ne!(mem.u64_at(leaf) & 0x20, 0, "accessed at {base:#x}");
        assert!(mem.log.iter().any(|&(w, gpa, _)| !w && gpa == base + 8));
    }
}

/// The whole-state family checks alignment first too: a misaligned
/// FXRSTOR from device memory reads nothing, a misaligned XSAVE to RAM
/// sets no accessed or dirty bit and writes nothing; aligned, both run.
#[test]
fn misaligned_whole_state_touches_nothing() {
    if !xsave_ok() {
        eprintln!("skipped: host has no XSAVE");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = state_image();
    img.xcr0 = 0b11;
    let fxrstor = asm64(|a| a.fxrstor64(ptr(rsi)));
    let xsave = asm64(|a| a.xsave64(ptr(rsi)));
    cpu.gprs.rax = 0b11;
    cpu.gprs.rdx = 0;
    for (code, base, misaligned) in [(&fxrstor, MMIO_BASE, 8), (&xsave, DATA + 0x1000, 0x20)] {
        let leaf = mem.leaf_slot(CR3, 4, base);
        mem.set_u64(leaf, mem.u64_at(leaf) & !0x60);
        mem.log.clear();
        cpu.rip = CODE;
        cpu.gprs.rsi = base + misaligned;
        let o = e.emulate(&mut cpu, code, &mut img, &mut mem);
        assert_eq!(exc(&o), (VEC_GP, Some(0)), "at {base:#x}");
        assert_eq!(mem.u64_at(leaf) & 0x60, 0, "no accessed bit at {base:#x}");
        assert!(mem.log.iter().all(|&(_, gpa, _)| gpa >> 12 != base >> 12));
        cpu.rip = CODE;
        cpu.gprs.rsi = base;
        done(&e.emulate(&mut cpu, code, &mut img, &mut mem));
        assert!(mem.log.iter().any(|&(_, gpa, _)| gpa >> 12 == base >> 12));
    }
}
