//! MOVDIR64B (`emulator/direct.rs`): RAM and MMIO, alignment, faults and
//! address sizes, against the CPU where it has the instruction.

use super::*;

/// An emulator that completes MOVDIR64B whatever the host has: the
/// completion is a pure data move, so it runs (and is tested) on hosts
/// without the instruction; `emulate` itself gives #UD there (see
/// `movdir64b_is_ud_where_the_host_lacks_it`).
fn movdir_emul() -> Emulator {
    let mut e = emul();
    e.host_movdir64b = true;
    e
}

/// `movdir64b rdi, [rsi]`
const MOVDIR64B_RDI_RSI: [u8; 5] = [0x66, 0x0f, 0x38, 0xf8, 0x3e];

fn pattern(seed: u8) -> [u8; 64] {
    core::array::from_fn(|i| seed.wrapping_add(i as u8 * 3))
}

/// The (gpa, len) of every platform write in the log.
fn writes(mem: &MockPlatform) -> Vec<(u64, usize)> {
    mem.log
        .iter()
        .filter(|&&(w, ..)| w)
        .map(|&(_, gpa, len)| (gpa, len))
        .collect()
}

fn page_fault(o: &Outcome) -> (u32, u64) {
    match o {
        Outcome::Exception {
            vector: VEC_PF,
            error_code: Some(code),
            cr2: Some(addr),
        } => (*code, *addr),
        _ => panic!("expected #PF, got {o:?}"),
    }
}

#[test]
fn movdir64b_is_classified_as_a_direct_store() {
    for bytes in [
        &MOVDIR64B_RDI_RSI[..],
        &[0x67, 0x66, 0x0f, 0x38, 0xf8, 0x3e],
    ] {
        let i = iced_x86::Decoder::new(64, bytes, 0).decode();
        assert_eq!(i.mnemonic(), iced_x86::Mnemonic::Movdir64b);
        let class = classify(&i).unwrap();
        assert_eq!(class.kind, crate::classify::Kind::DirectStore);
        assert!(!class.vector, "no vector state needed");
    }
}

/// RAM to RAM: the 64 source bytes (unaligned source) land at the aligned
/// destination with one 64-byte write; registers and flags unchanged, RIP
/// past the instruction, the destination page dirty.
#[test]
fn movdir64b_ram_to_ram() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    let src = DATA + 0x13;
    let dst = DATA + 0x1040;
    mem.ram[src as usize..src as usize + 64].copy_from_slice(&pattern(1));
    mem.ram[dst as usize - 8..dst as usize + 72].fill(0xcc);
    cpu.gprs.rsi = src;
    cpu.gprs.rdi = dst;
    cpu.gprs.rflags = 0x2 | 0x1; // CF set: must survive
    let before = cpu.gprs;
    let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
    assert_eq!(
        o,
        Outcome::Done {
            mnemonic: iced_x86::Mnemonic::Movdir64b
        }
    );
    assert_eq!(mem.ram[dst as usize..dst as usize + 64], pattern(1));
    assert_eq!(mem.ram[dst as usize - 8..dst as usize], [0xcc; 8]);
    assert_eq!(mem.ram[dst as usize + 64..dst as usize + 72], [0xcc; 8]);
    assert_eq!(cpu.gprs, before);
    assert_eq!(cpu.rip, CODE + MOVDIR64B_RDI_RSI.len() as u64);
    let data_writes: Vec<_> = writes(&mem)
        .into_iter()
        .filter(|&(gpa, _)| gpa >= DATA)
        .collect();
    assert_eq!(data_writes, [(dst, 64)], "one 64-byte store");
    assert_eq!(mem.leaf(CR3, 4, dst) & 0x60, 0x60, "A and D on the leaf");
    assert_eq!(mem.leaf(CR3, 4, src) & 0x60, 0x20, "source: A only");
}

/// A source crossing a page boundary is read from both pages (each
/// translated on its own: the second page maps elsewhere).
#[test]
fn movdir64b_source_split_across_pages() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    let lin = 0x50_0000u64;
    let (first, second) = (DATA + 0x2000, DATA + 0x1000); // reversed
    mem.map(CR3, 4, lin, first, RW);
    mem.map(CR3, 4, lin + 0x1000, second, RW);
    let src = lin + 0x1000 - 24;
    let p = pattern(7);
    mem.ram[(first + 0x1000 - 24) as usize..(first + 0x1000) as usize].copy_from_slice(&p[..24]);
    mem.ram[second as usize..second as usize + 40].copy_from_slice(&p[24..]);
    cpu.gprs.rsi = src;
    cpu.gprs.rdi = DATA + 0x3000;
    done(&e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[(DATA + 0x3000) as usize..(DATA + 0x3040) as usize],
        p
    );
}

/// The destination on MMIO gets exactly one 64-byte write; a source on
/// MMIO is read from the device.
#[test]
fn movdir64b_to_and_from_mmio() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    mem.ram[DATA as usize + 5..DATA as usize + 69].copy_from_slice(&pattern(9));
    cpu.gprs.rsi = DATA + 5;
    cpu.gprs.rdi = MMIO_BASE + 0x80;
    done(&e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem));
    assert_eq!(mem.mmio[0x80..0xc0], pattern(9));
    let mmio_writes: Vec<_> = writes(&mem)
        .into_iter()
        .filter(|&(gpa, _)| gpa >= MMIO_BASE)
        .collect();
    assert_eq!(mmio_writes, [(MMIO_BASE + 0x80, 64)]);

    // MMIO to RAM.
    cpu.rip = CODE;
    mem.mmio[0x203..0x243].copy_from_slice(&pattern(0x40));
    cpu.gprs.rsi = MMIO_BASE + 0x203;
    cpu.gprs.rdi = DATA + 0x1c0;
    mem.log.clear();
    done(&e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[DATA as usize + 0x1c0..DATA as usize + 0x200],
        pattern(0x40)
    );
    assert!(mem
        .log
        .iter()
        .any(|&(w, gpa, len)| !w && gpa == MMIO_BASE + 0x203 && len == 64));
}

/// A destination off a 64-byte boundary is #GP(0), even on a missing
/// page, but only once the source checked out: a source #PF wins (SDM:
/// #GP(0) "if address in destination (register) operand is not aligned to
/// a 64-byte boundary"; the order as the CPU,
/// `stub::tests::movdir64b_fault_order_on_the_host`). Nothing is written,
/// RIP stays.
#[test]
fn movdir64b_misaligned_destination_is_gp0() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    mem.mmio[..0x100].fill(0xcc);
    for dst in [DATA + 0x1008, MMIO_BASE + 0x20, 0x7f_0000 + 0x40 + 1] {
        cpu.rip = CODE;
        cpu.gprs.rsi = DATA;
        cpu.gprs.rdi = dst;
        mem.log.clear();
        let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
        assert_eq!(exc(&o), (VEC_GP, Some(0)), "{dst:#x}");
        assert!(
            !writes(&mem).iter().any(|&(gpa, _)| gpa >= DATA),
            "{:?}",
            mem.log
        );
        assert_eq!(cpu.rip, CODE);
    }
    assert_eq!(mem.mmio[..0x100], [0xcc; 0x100]);
    // Non-canonical destination: #GP(0) too.
    cpu.gprs.rdi = 0x8000_0000_0000_0000;
    let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_GP, Some(0)));
    // The source's #PF comes first.
    for dst in [DATA + 0x1008, 0x8000_0000_0000_0008] {
        cpu.gprs.rsi = 0x7f_0000 + 8;
        cpu.gprs.rdi = dst;
        let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
        assert_eq!(page_fault(&o), (0, 0x7f_0008), "{dst:#x}");
    }
}

/// Page faults: a source on a missing page (CR2 the first missing byte,
/// error code of a read), then a destination on a missing or read-only
/// page (W set). The destination is never written.
#[test]
fn movdir64b_page_faults() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    let missing = 0x7f_0000u64;
    let dst = DATA + 0x2000;
    mem.ram[dst as usize..dst as usize + 64].fill(0xcc);
    let mut run = |cpu: &mut CpuState, mem: &mut MockPlatform, src: u64, dst: u64| {
        cpu.rip = CODE;
        cpu.gprs.rsi = src;
        cpu.gprs.rdi = dst;
        let o = e.emulate(cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, mem);
        assert_eq!(cpu.rip, CODE);
        page_fault(&o)
    };
    // Source wholly on a missing page.
    assert_eq!(
        run(&mut cpu, &mut mem, missing + 0x10, dst),
        (0, missing + 0x10)
    );
    // Source crossing from the last data page into a missing one.
    let edge = DATA + 0x4000;
    assert_eq!(run(&mut cpu, &mut mem, edge - 8, dst), (0, edge));
    // At CPL 3 on a supervisor page: present, user.
    cpu.cpl = 3;
    assert_eq!(run(&mut cpu, &mut mem, DATA, dst), (PFEC_P | PFEC_U, DATA));
    cpu.cpl = 0;
    assert_eq!(mem.ram[dst as usize..dst as usize + 64], [0xcc; 64]);
    // Destination missing: a write fault, after the source checked out.
    assert_eq!(run(&mut cpu, &mut mem, DATA, missing), (PFEC_W, missing));
    // Both missing: the source's fault comes first.
    assert_eq!(
        run(&mut cpu, &mut mem, missing + 0x1000, missing),
        (0, missing + 0x1000)
    );
    // Destination read-only (CR0.WP at CPL 0).
    let ro = 0x70_0000u64;
    mem.map(CR3, 4, ro, DATA + 0x3000, 0x1);
    mem.log.clear();
    assert_eq!(run(&mut cpu, &mut mem, DATA, ro), (PFEC_P | PFEC_W, ro));
    assert!(
        !writes(&mem).iter().any(|&(gpa, _)| gpa >= DATA),
        "{:?}",
        mem.log
    );
}

/// The 32-bit address-size form (67h): EDI and the source's ESI are used
/// zero-extended, their upper halves ignored. Also in real mode: DI is an
/// offset into ES, SI into DS.
#[test]
fn movdir64b_address_size_forms() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    let code = asm64(|a| a.movdir64b(edi, ptr(esi)));
    assert_eq!(code, [0x67, 0x66, 0x0f, 0x38, 0xf8, 0x3e]);
    mem.ram[DATA as usize + 0x100..DATA as usize + 0x140].copy_from_slice(&pattern(0x21));
    cpu.gprs.rsi = 0xdead_0000_0000_0000 | (DATA + 0x100);
    cpu.gprs.rdi = 0xbeef_0000_0000_0000 | (DATA + 0x3c0);
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[DATA as usize + 0x3c0..DATA as usize + 0x400],
        pattern(0x21)
    );
    assert_eq!(cpu.rip, CODE + code.len() as u64);

    // Real mode, paging off: ES:DI <- DS:SI.
    let seg = |base: u64| Segment {
        base,
        limit: 0xffff,
        type_: 0x3,
        present: true,
        ..Default::default()
    };
    let mut real = CpuState {
        cs: Segment {
            type_: 0xb,
            ..seg(CODE)
        },
        ds: seg(DATA + 0x1000),
        es: seg(DATA + 0x2000),
        rip: 0x10,
        ..Default::default()
    };
    let mut a = CodeAssembler::new(16).unwrap();
    a.movdir64b(di, ptr(si)).unwrap();
    let code16 = a.assemble(0x10).unwrap();
    mem.ram[DATA as usize + 0x1005..DATA as usize + 0x1045].copy_from_slice(&pattern(0x55));
    real.gprs.rsi = 0x5;
    real.gprs.rdi = 0x1_0080; // DI = 0x80
    done(&e.emulate(&mut real, &code16, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[DATA as usize + 0x2080..DATA as usize + 0x20c0],
        pattern(0x55)
    );
    assert_eq!(real.rip, 0x10 + code16.len() as u64);
    // Past ES's limit: #GP(0).
    real.rip = 0x10;
    real.es.limit = 0xa0;
    assert_eq!(
        exc(&e.emulate(&mut real, &code16, &mut NoVectorState, &mut mem)),
        (VEC_GP, Some(0))
    );
}

/// A host without MOVDIR64B gives the guest #UD (its CPUID leaf 7 is the
/// host's), as does a LOCK prefix (SDM); nothing is accessed.
#[test]
fn movdir64b_is_ud_where_the_host_lacks_it() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    assert_eq!(e.host_movdir64b, crate::emulator::host_has_movdir64b());
    e.host_movdir64b = false;
    cpu.gprs.rsi = DATA;
    cpu.gprs.rdi = DATA + 0x1000;
    let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_UD, None));
    assert!(mem.log.is_empty());
    let mut e = movdir_emul();
    let locked = [0xf0, 0x66, 0x0f, 0x38, 0xf8, 0x3e];
    let o = e.emulate(&mut cpu, &locked, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_UD, None));
    assert!(mem.log.is_empty());
}

/// Against the CPU, where the host has MOVDIR64B: the same 64 bytes land
/// at the destination, nothing around it changes.
#[test]
fn movdir64b_matches_the_cpu() {
    if !crate::emulator::host_has_movdir64b() {
        eprintln!("skipped: host has no MOVDIR64B (CPUID.07H.0H:ECX[28] = 0)");
        return;
    }
    let src = pattern(0x77);
    let mut native = [0xccu8; 256];
    let base = native.as_mut_ptr() as usize;
    let dst = (base + 127) & !63; // 64 bytes or more from either end
                                  // SAFETY: MOVDIR64B reads the 64 bytes of `src` and writes the 64-byte
                                  // aligned line at `dst`, inside `native`.
    unsafe {
        core::arch::asm!(
            "movdir64b rdi, [rsi]",
            in("rsi") src.as_ptr(),
            in("rdi") dst,
            options(nostack),
        )
    };
    // The line with 64 bytes either side, natively and in the guest.
    let native = &native[dst - base - 64..dst - base + 128];
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    mem.ram[DATA as usize + 1..DATA as usize + 65].copy_from_slice(&src);
    mem.ram[DATA as usize + 0x1000..DATA as usize + 0x1000 + 192].fill(0xcc);
    cpu.gprs.rsi = DATA + 1;
    cpu.gprs.rdi = DATA + 0x1040;
    done(&e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[DATA as usize + 0x1000..DATA as usize + 0x1000 + 192],
        *native
    );
}
