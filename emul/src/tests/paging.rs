//! Linear addresses and page walks: segments, modes, permissions,
//! reserved bits, accessed/dirty updates racing another vCPU, page-crossing
//! accesses, and which fault comes first.

use super::*;

#[test]
fn walk_faults_and_permissions() {
    let (mut cpu, mut mem) = setup();
    let ro = 0x70_0000;
    mem.map(CR3, 4, ro, ro, 0x1); // present, read-only, supervisor
    let user_nx = 0x71_0000;
    mem.map(CR3, 4, user_nx, user_nx, 0x7 | 1 << 63);
    let w = Access {
        write: true,
        ..Default::default()
    };
    let pf = |r: Result<u64, WalkError>| match r {
        Err(WalkError::Fault(e)) => (e.vector, e.error_code.unwrap(), e.cr2.unwrap()),
        other => panic!("{other:?}"),
    };
    // Not present.
    assert_eq!(
        pf(translate(&cpu, 0x7f_0000, Access::default(), &mut mem)),
        (VEC_PF, 0, 0x7f_0000)
    );
    // Write to read-only with WP; allowed for the supervisor without WP.
    assert_eq!(
        pf(translate(&cpu, ro + 8, w, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_W, ro + 8)
    );
    cpu.cr0 &= !CR0_WP;
    assert_eq!(translate(&cpu, ro + 8, w, &mut mem), Ok(ro + 8));
    // User access to a supervisor page.
    let user = Access {
        user: true,
        ..Default::default()
    };
    assert_eq!(
        pf(translate(&cpu, ro, user, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_U, ro)
    );
    // NX fetch.
    let fetch = Access {
        fetch: true,
        ..Default::default()
    };
    assert_eq!(
        pf(translate(&cpu, user_nx, fetch, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_ID, user_nx)
    );
    // SMAP: a supervisor read of a user page faults unless RFLAGS.AC.
    let user_page = 0x72_0000;
    mem.map(CR3, 4, user_page, user_page, 0x7);
    assert_eq!(
        translate(&cpu, user_page, Access::default(), &mut mem),
        Ok(user_page)
    );
    cpu.cr4 |= CR4_SMAP;
    assert_eq!(
        pf(translate(&cpu, user_page + 4, Access::default(), &mut mem)),
        (VEC_PF, PFEC_P, user_page + 4)
    );
    cpu.gprs.rflags |= RFLAGS_AC;
    assert_eq!(
        translate(&cpu, user_page, Access::default(), &mut mem),
        Ok(user_page)
    );
    // ... and never applies to user-mode accesses.
    cpu.gprs.rflags &= !RFLAGS_AC;
    assert_eq!(translate(&cpu, user_page, user, &mut mem), Ok(user_page));
    cpu.cr4 &= !CR4_SMAP;
    // SMEP: a supervisor fetch from a user page faults, with I/D set.
    cpu.cr4 |= CR4_SMEP;
    assert_eq!(
        pf(translate(&cpu, user_page, fetch, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_ID, user_page)
    );
    cpu.cr4 &= !CR4_SMEP;
    // NX without EFER.NXE is a reserved bit.
    cpu.efer &= !EFER_NXE;
    assert_eq!(
        pf(translate(&cpu, user_nx, user, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_RSVD | PFEC_U, user_nx)
    );
}

/// The walker sets accessed/dirty bits with a locked compare-and-exchange
/// and walks again when the entry changed: an entry another vCPU cleared
/// stays clear (a plain write of `entry | A` would map the page again
/// behind the guest's back), and a remapped one is used as it is now.
#[test]
fn walk_restarts_when_another_vcpu_changes_an_entry() {
    let (cpu, mut mem) = setup();
    let slot = mem.leaf_slot(CR3, 4, DATA);
    let before = mem.u64_at(slot);
    assert_eq!(before & 0x20, 0, "the walk has an accessed bit to set");
    let read = Access::default();

    // Unmapped under the walk: not present, and it stays unmapped.
    let mut racing = RacingVcpu::new(&mut mem, slot, vec![0]);
    match translate(&cpu, DATA + 0x10, read, &mut racing) {
        Err(WalkError::Fault(e)) => {
            assert_eq!(
                (e.vector, e.error_code, e.cr2),
                (VEC_PF, Some(0), Some(DATA + 0x10))
            )
        }
        other => panic!("expected #PF, got {other:?}"),
    }
    assert_eq!(racing.attempts, 1);
    assert_eq!(mem.u64_at(slot), 0, "the cleared entry was written back");

    // Remapped under the walk: the new frame, with its accessed bit.
    mem.set_u64(slot, before);
    let moved = 0x9000 | RW;
    let mut racing = RacingVcpu::new(&mut mem, slot, vec![moved]);
    assert_eq!(translate(&cpu, DATA + 0x10, read, &mut racing), Ok(0x9010));
    assert_eq!(mem.u64_at(slot), moved | 0x20);

    // An entry that changes before every update: after a bounded number of
    // walks the instruction goes back to the guest to retry, with no guess
    // made and nothing written.
    mem.set_u64(slot, before);
    // Flips an ignored bit, so each value differs from the last.
    let flips = (1..=2000).map(|i| before ^ ((i & 1) << 9)).collect();
    let mut racing = RacingVcpu::new(&mut mem, slot, flips);
    match translate(&cpu, DATA, read, &mut racing) {
        Err(WalkError::Contended { gpa }) => assert_eq!(gpa, slot),
        other => panic!("expected contention, got {other:?}"),
    }
    assert!(racing.attempts > 1 && racing.attempts < 2000);

    // 32-bit paging, a write: the 4-byte leaf is remapped under the walk;
    // the new frame comes back with A and D, the next entry untouched.
    let cpu32 = CpuState {
        cr0: CR0_PE | CR0_PG,
        cr3: 0x2000,
        ..Default::default()
    };
    let lin = 0x0080_5678u64;
    mem.set_u32(0x2000 + 4 * 2, 0x3000 | 0x23); // PDE: P, RW, A
    let pte = 0x3000 + 4 * 5;
    mem.set_u32(pte, 0x5000 | 0x3);
    mem.set_u32(pte + 4, 0x7000 | 0x3);
    let write = Access {
        write: true,
        ..Default::default()
    };
    let mut racing = RacingVcpu::new(&mut mem, pte, vec![0x6000 | 0x3]);
    assert_eq!(translate(&cpu32, lin, write, &mut racing), Ok(0x6678));
    assert_eq!(racing.attempts, 2);
    assert_eq!(mem.u64_at(pte), (0x7003 << 32) | 0x6063);
}

#[test]
fn walk_modes_pae_legacy32_and_5level() {
    let mut mem = MockPlatform::new();
    // 32-bit paging with a 4 MiB page and a 4 KiB page.
    let mut cpu = CpuState {
        cr0: CR0_PE | CR0_PG,
        cr3: 0x2000,
        cr4: CR4_PSE,
        ..Default::default()
    };
    mem.set_u32(0x2000 + 4, 0x0040_0000 | 0x83); // 4 MiB at 4 MiB
    mem.set_u32(0x2000 + 4 * 2, 0x3000 | 0x3); // PT for 8 MiB..
    mem.set_u32(0x3000 + 4 * 5, 0x0055_5000 | 0x3);
    let r = Access::default();
    assert_eq!(translate(&cpu, 0x0041_2345, r, &mut mem), Ok(0x0041_2345));
    assert_eq!(translate(&cpu, 0x0080_5678, r, &mut mem), Ok(0x0055_5678));
    assert_eq!(mem.ram[0x2000 + 4] & 0x20, 0x20, "A on the 4 MiB PDE");

    // PAE: PDPTE -> PD with a 2 MiB page.
    cpu.cr4 = CR4_PAE;
    cpu.cr3 = 0x4000;
    mem.set_u64(0x4000 + 8, 0x5000 | 1);
    mem.set_u64(0x5000 + 8 * 3, 0x0060_0000 | 0x83);
    let lin = (1 << 30) | (3 << 21) | 0x1abc;
    assert_eq!(translate(&cpu, lin, r, &mut mem), Ok(0x0060_1abc));

    // 5-level.
    let mut cpu5 = CpuState::long_mode(0x8000);
    cpu5.cr4 |= CR4_LA57;
    let lin = 0x00ff_1234_5678_9000u64 & 0x01ff_ffff_ffff_f000;
    mem.map(0x8000, 5, lin, 0x7000, RW);
    assert_eq!(translate(&cpu5, lin | 0x10, r, &mut mem), Ok(0x7010));
    assert!(crate::paging::is_canonical(&cpu5, lin));
}

#[test]
fn addresses_rip_relative_fs_16bit_and_faults() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    // RIP-relative: relative to the next instruction.
    let code = vec![0x01, 0x1d, 0, 0, 0, 0]; // add [rip+disp32], ebx
    let mut cpu2 = cpu;
    // Put the code near DATA so the target is mapped: decode at DATA.
    cpu2.rip = DATA;
    cpu2.gprs.rbx = 5;
    let mut bytes = code.clone();
    bytes[2..6].copy_from_slice(&0x100i32.to_le_bytes());
    done(&e.emulate(&mut cpu2, &bytes, &mut NoVectorState, &mut mem));
    assert_eq!(mem.u64_at(DATA + 6 + 0x100) as u32, 5);

    // FS base applies in 64-bit mode, DS base does not.
    cpu.fs.base = DATA;
    cpu.ds.base = 0x1000;
    let code = asm64(|a| a.mov(dword_ptr(rax).fs(), ebx));
    cpu.gprs.rax = 0x20;
    cpu.gprs.rbx = 0xabcd;
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(mem.u64_at(DATA + 0x20) as u32, 0xabcd);

    // Non-canonical: #GP(0), or #SS(0) through RBP/RSP.
    cpu.rip = CODE;
    cpu.gprs.rax = 0x8000_0000_0000_0000;
    let code = asm64(|a| a.add(dword_ptr(rax), ebx));
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem)),
        (VEC_GP, Some(0))
    );
    cpu.gprs.rbp = 0x8000_0000_0000_0000;
    let code = asm64(|a| a.add(dword_ptr(rbp), ebx));
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem)),
        (VEC_SS, Some(0))
    );

    // 16-bit real mode: [bx+si+4] with DS base; limit 0xffff.
    let mut real = CpuState {
        cs: Segment {
            base: 0,
            limit: 0xffff,
            type_: 0xb,
            present: true,
            ..Default::default()
        },
        ds: Segment {
            base: DATA,
            limit: 0xffff,
            type_: 0x3,
            present: true,
            ..Default::default()
        },
        rip: 0x100,
        ..Default::default()
    };
    real.gprs.rbx = 0x10;
    real.gprs.rsi = 0x20;
    real.gprs.rax = 3;
    let code = [0x01, 0x40, 0x04]; // add [bx+si+4], ax
    done(&e.emulate(&mut real, &code, &mut NoVectorState, &mut mem));
    assert_eq!(mem.u64_at(DATA + 0x34) as u16, 3);
    assert_eq!(real.rip, 0x103);
    // Past the limit: #GP(0).
    real.rip = 0x100;
    real.ds.limit = 0x30;
    assert_eq!(
        exc(&e.emulate(&mut real, &code, &mut NoVectorState, &mut mem)),
        (VEC_GP, Some(0))
    );
}

#[test]
fn page_crossing_access_is_split() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rax = MMIO_BASE + 0xffc;
    cpu.gprs.rbx = 0x1122_3344_5566_7788;
    let code = asm64(|a| a.mov(qword_ptr(rax), rbx));
    mem.log.clear();
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    let mmio: Vec<_> = mem
        .log
        .iter()
        .filter(|l| l.1 >= MMIO_BASE)
        .copied()
        .collect();
    assert_eq!(
        mmio,
        [(true, MMIO_BASE + 0xffc, 4), (true, MMIO_BASE + 0x1000, 4)]
    );
    assert_eq!(
        &mem.mmio[0xffc..0x1004],
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
}

#[test]
fn write_fault_has_no_side_effect() {
    let (mut cpu, mut mem) = setup();
    let ro = 0x70_0000;
    mem.map(CR3, 4, ro, ro, 0x1);
    cpu.gprs.rax = ro + 0xff8;
    let code = asm64(|a| a.add(qword_ptr(rax), rbx));
    let o = emul().emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
    assert_eq!(
        o,
        Outcome::Exception {
            vector: VEC_PF,
            error_code: Some(PFEC_P | PFEC_W),
            cr2: Some(ro + 0xff8)
        }
    );
    assert!(mem.log.iter().all(|l| !l.0 || l.1 < 0x10_0000 + 0x10000));
}

/// At CPL 3 with CR0.AM and RFLAGS.AC, a misaligned operand raises #AC(0)
/// natively in the stub (the bounce buffer keeps the offset mod 64); the
/// guest's AC bit survives a completed instruction.
#[test]
fn alignment_check_at_cpl3() {
    let (mut cpu, mut mem) = setup();
    let user = DATA + 0x3000;
    mem.map(CR3, 4, user, user, 0x7);
    cpu.cpl = 3;
    cpu.cr0 |= CR0_AM;
    cpu.gprs.rflags = 0x2 | RFLAGS_AC;
    let code = asm64(|a| a.add(dword_ptr(rax), ebx));
    let mut e = emul();
    cpu.gprs.rax = user + 1;
    let host = crate::stub::probe::probe().expect("CPU probes run");
    if host.is_tcg() && host.has(crate::stub::probe::Deviation::NoAc) {
        // The stub runs the access natively: this CPU raises no #AC.
        println!("misaligned access completes, as this CPU does (no-ac)");
        done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
        cpu.rip = CODE;
    } else {
        assert_eq!(
            exc(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem)),
            (VEC_AC, Some(0))
        );
        assert_eq!(cpu.rip, CODE, "no RIP advance on a fault");
    }
    cpu.gprs.rax = user + 4;
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_ne!(cpu.gprs.rflags & RFLAGS_AC, 0, "guest AC kept");
    // Without AC (or at CPL 0) the same misaligned access completes.
    for (cpl, ac) in [(3, false), (0, true)] {
        cpu.rip = CODE;
        cpu.cpl = cpl;
        cpu.gprs.rflags = 0x2 | if ac { RFLAGS_AC } else { 0 };
        cpu.gprs.rax = user + 1;
        done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    }
}

/// MAXPHYADDR comes from the guest (`CpuState::max_phys_bits`): an entry
/// bit between it and 51 is reserved (#PF with RSVD, as KVM's own walk and
/// the CPU give), while the same bit is an address bit for a wider guest.
#[test]
fn reserved_bits_follow_the_guests_maxphyaddr() {
    let (mut cpu, mut mem) = setup();
    let page = 0x72_0000u64;
    // Leaf with physical-address bit 40 set: above a 39-bit guest's width.
    mem.map(CR3, 4, page, page | 1 << 40, RW);
    let code = asm64(|a| a.add(qword_ptr(page), rcx)).to_vec();
    cpu.max_phys_bits = 39;
    let mut e = emul();
    let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_PF, Some(PFEC_P | PFEC_W | PFEC_RSVD)));
    // A 46-bit guest has that bit as an address bit: the walk succeeds and
    // the access reaches guest-physical page | 1 << 40 (the mock platform
    // reports it as out of range, which is the platform's answer, not #PF).
    cpu.max_phys_bits = 46;
    let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
    assert!(
        !matches!(o, Outcome::Exception { .. }),
        "a 46-bit guest must not fault: {o:?}"
    );
}

/// Alignment is checked before the page walk: a misaligned aligned-only
/// operand on a not-present page raises #GP(0), an aligned one #PF (the
/// host CPU does the same: `stub::tests::alignment_comes_before_the_walk`).
#[test]
fn misaligned_operand_on_a_missing_page_is_gp_not_pf() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let missing = 0x7f_0000u64;
    let mut img = XsaveImage::new();
    for (addr, want) in [
        (missing + 8, (VEC_GP, Some(0))),
        (missing, (VEC_PF, Some(0))),
        // Split operand, second page missing, start misaligned.
        (missing - 8, (VEC_GP, Some(0))),
    ] {
        mem.map(CR3, 4, missing - 0x1000, missing - 0x1000, RW);
        cpu.gprs.rsi = addr;
        cpu.rip = CODE;
        let code = asm64(|a| a.movaps(xmm0, xmmword_ptr(rsi)));
        assert_eq!(
            exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
            want,
            "{addr:#x}"
        );
        cpu.rip = CODE;
        let code = asm64(|a| a.addps(xmm0, xmmword_ptr(rsi)));
        assert_eq!(
            exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
            want,
            "{addr:#x}"
        );
    }
    // An unaligned-access form faults on the walk.
    cpu.rip = CODE;
    cpu.gprs.rsi = missing + 8;
    let code = asm64(|a| a.movups(xmm0, xmmword_ptr(rsi)));
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)).0,
        VEC_PF
    );
    assert!(!img.dirty);
}
