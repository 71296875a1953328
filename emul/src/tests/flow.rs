//! The emulation flow end to end: decoding and fetching, the allow-list,
//! integer instructions, locked read-modify-writes, length limits.

use super::*;

#[test]
fn add_to_memory_advances_rip_and_sets_accessed_dirty() {
    let (mut cpu, mut mem) = setup();
    let code = asm64(|a| a.add(dword_ptr(rax), ebx));
    mem.set_u32(DATA + 8, 40);
    cpu.gprs.rax = DATA + 8;
    cpu.gprs.rbx = 2;
    let o = emul().emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
    assert_eq!(
        o,
        Outcome::Done {
            mnemonic: iced_x86::Mnemonic::Add
        }
    );
    assert_eq!(mem.u64_at(DATA + 8) as u32, 42);
    assert_eq!(cpu.rip, CODE + code.len() as u64);
    let leaf = mem.leaf(CR3, 4, DATA);
    assert_eq!(leaf & 0x60, 0x60, "A and D on the leaf");
    assert_eq!(mem.u64_at(CR3) & 0x20, 0x20, "A on the PML4E");
}

#[test]
fn bytes_are_fetched_when_absent_or_short() {
    let (mut cpu, mut mem) = setup();
    let code = asm64(|a| a.add(dword_ptr(rax + 0x1234), 7));
    mem.ram[CODE as usize..CODE as usize + code.len()].copy_from_slice(&code);
    cpu.gprs.rax = DATA;
    let mut e = emul();
    done(&e.emulate(&mut cpu, &[], &mut NoVectorState, &mut mem));
    cpu.rip = CODE;
    done(&e.emulate(&mut cpu, &code[..2], &mut NoVectorState, &mut mem));
    assert_eq!(mem.u64_at(DATA + 0x1234) as u32, 14);
}

#[test]
fn allow_list_decisions() {
    let decide = |f: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>| {
        let bytes = asm64(|a| f(a));
        let mut d = iced_x86::Decoder::new(64, &bytes, 0);
        classify(&d.decode())
    };
    assert!(decide(&|a| a.push(rax)).is_err());
    assert!(decide(&|a| a.jmp(0x1000u64)).is_err());
    assert!(decide(&|a| a.in_(al, dx)).is_err());
    assert!(decide(&|a| a.syscall()).is_err());
    assert_eq!(
        decide(&|a| a.xsave(ptr(rax))).unwrap().kind,
        crate::classify::Kind::WholeState
    );
    assert!(decide(&|a| a.xsaves(ptr(rax))).is_err(), "privileged");
    assert!(decide(&|a| a.wrfsbase(rax)).is_err());
    // vpgatherdd xmm0, [rax+xmm1*1], xmm2
    let gather = [0xc4, 0xe2, 0x69, 0x90, 0x04, 0x08];
    assert_eq!(
        classify(&iced_x86::Decoder::new(64, &gather, 0).decode()).map(|c| c.kind),
        Ok(crate::classify::Kind::Vsib)
    );
    assert!(decide(&|a| a.mov(rsp, rax)).is_err());
    assert!(decide(&|a| a.cpuid()).is_err());
    assert!(decide(&|a| a.rdrand(eax)).is_err());
    assert!(decide(&|a| a.fnstenv(ptr(rax))).unwrap().x87_mmx);
    assert!(decide(&|a| a.movsb()).is_err());
    assert!(decide(&|a| a.vaddps(ymm0, ymm1, ptr(rax))).unwrap().vector);
    assert!(!decide(&|a| a.cmpxchg16b(ptr(rax))).unwrap().vector);
    assert!(decide(&|a| a.adcx(eax, dword_ptr(rax))).is_ok());
    assert!(decide(&|a| a.fld(qword_ptr(rax))).unwrap().x87_mmx);
}

#[test]
fn cmpxchg16b_and_misaligned_gp() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let code = asm64(|a| a.lock().cmpxchg16b(xmmword_ptr(rsi)));
    mem.set_u64(DATA + 0x40, 1);
    mem.set_u64(DATA + 0x48, 2);
    cpu.gprs = crate::stub::GuestGprs {
        rsi: DATA + 0x40,
        rax: 1,
        rdx: 2,
        rbx: 0x33,
        rcx: 0x44,
        ..Default::default()
    };
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(
        (mem.u64_at(DATA + 0x40), mem.u64_at(DATA + 0x48)),
        (0x33, 0x44)
    );
    assert_ne!(cpu.gprs.rflags & 0x40, 0, "ZF");
    cpu.rip = CODE;
    cpu.gprs.rsi = DATA + 0x48;
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem)),
        (VEC_GP, Some(0))
    );
    assert_eq!(cpu.rip, CODE, "no RIP advance on a fault");
}

/// A locked instruction is stored with a compare-and-exchange against the
/// operand it ran on; when another vCPU wrote the operand first, it runs
/// again on the new value, so the other vCPU's store is never lost (a
/// plain write-back would put 0x33:0x44 over it).
#[test]
fn locked_instruction_runs_again_when_another_vcpu_wrote_its_operand() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let code = asm64(|a| a.lock().cmpxchg16b(xmmword_ptr(rsi)));
    let at = DATA + 0x40;
    mem.set_u64(at, 1);
    mem.set_u64(at + 8, 2);
    let start = crate::stub::GuestGprs {
        rsi: at,
        rax: 1,
        rdx: 2,
        rbx: 0x33,
        rcx: 0x44,
        ..Default::default()
    };
    cpu.gprs = start;
    // The other vCPU's store lands between our read and our write.
    let mut racing = RacingVcpu::new(&mut mem, at, vec![7]);
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut racing));
    assert_eq!(racing.attempts, 2, "stored on the second run");
    // The second run compared 1:2 against 7:2: no match, memory kept.
    assert_eq!((mem.u64_at(at), mem.u64_at(at + 8)), (7, 2));
    assert_eq!((cpu.gprs.rax, cpu.gprs.rdx), (7, 2));
    assert_eq!(cpu.gprs.rflags & 0x40, 0, "ZF clear");
    assert_eq!(cpu.rip, CODE + code.len() as u64);

    // XCHG with memory is locked without a prefix.
    let xchg = asm64(|a| a.xchg(qword_ptr(rsi), rbx));
    cpu.rip = CODE;
    cpu.gprs = start;
    let mut racing = RacingVcpu::new(&mut mem, at, vec![9]);
    done(&e.emulate(&mut cpu, &xchg, &mut NoVectorState, &mut racing));
    assert_eq!((mem.u64_at(at), cpu.gprs.rbx), (0x33, 9));

    // An operand another vCPU rewrites before every store: after a bounded
    // number of runs the guest retries it; memory as the other vCPU left
    // it, and nothing else changed.
    cpu.rip = CODE;
    cpu.gprs = start;
    let mut racing = RacingVcpu::new(&mut mem, at, (1..=2000).collect());
    let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut racing);
    assert_eq!(o, Outcome::Retry);
    let attempts = racing.attempts;
    assert!(attempts > 1 && attempts < 2000);
    // Store i is i + 1: the last one is still there.
    assert_eq!(mem.u64_at(at), attempts as u64);
    assert_eq!((cpu.rip, cpu.gprs), (CODE, start), "nothing completed");
}

#[test]
fn adcx_popcnt_and_x87() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rax = u64::from(u32::MAX);
    cpu.gprs.rbx = 1;
    cpu.gprs.rflags = 0x2 | 0x800; // OF stays
    let code = asm64(|a| a.adcx(eax, ebx));
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(cpu.gprs.rax, 0);
    assert_eq!(cpu.gprs.rflags & 0x801, 0x801, "CF set, OF untouched");

    cpu.rip = CODE;
    mem.set_u64(DATA, 0xf0f0);
    cpu.gprs.rsi = DATA;
    let code = asm64(|a| a.popcnt(rcx, qword_ptr(rsi)));
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(cpu.gprs.rcx, 8);

    // fld1; fadd qword [rsi]; fstp qword [rsi+8]
    let mut img = XsaveImage::new();
    mem.set_u64(DATA, 2.5f64.to_bits());
    for code in [
        asm64(|a| a.fld1()),
        asm64(|a| a.fadd(qword_ptr(rsi))),
        asm64(|a| a.fstp(qword_ptr(rsi + 8))),
    ] {
        cpu.rip = CODE;
        done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
    }
    assert_eq!(f64::from_bits(mem.u64_at(DATA + 8)), 3.5);
}

#[test]
fn unsupported_names_the_instruction() {
    let (mut cpu, mut mem) = setup();
    let code = asm64(|a| a.push(rax));
    match emul().emulate(&mut cpu, &code, &mut NoVectorState, &mut mem) {
        Outcome::Unsupported { text } => assert!(text.starts_with("push rax"), "{text}"),
        o => panic!("{o:?}"),
    }
}

/// Random bytes through the whole path: no panic, and whatever ran was
/// allow-listed (the emulator re-decodes what it built; here we check the
/// decision independently on the guest's decode).
#[test]
fn fuzz_random_instructions() {
    let (cpu0, mut mem) = setup();
    let mut e = emul();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut ran = 0;
    for case in 0..20_000 {
        let mut bytes = [0u8; 15];
        for b in bytes.iter_mut() {
            *b = next() as u8;
        }
        let mut cpu = cpu0;
        cpu.gprs = crate::stub::GuestGprs {
            rax: DATA + (next() & 0x3fff),
            rbx: DATA + 0x100,
            rcx: next() & 0xff,
            rdx: 1,
            rsi: DATA + 0x200,
            rdi: DATA + 0x300,
            rbp: DATA + 0x400,
            r8: next(),
            rflags: 2,
            ..Default::default()
        };
        if case % 3 == 1 {
            cpu.cs.l = false;
            cpu.cs.db = true;
        }
        let bitness = cpu.bitness();
        let mut d = iced_x86::Decoder::with_ip(bitness, &bytes, cpu.rip, 0);
        let instr = d.decode();
        let mut img = XsaveImage::new();
        let o = e.emulate(&mut cpu, &bytes, &mut img, &mut mem);
        if matches!(o, Outcome::Done { .. }) {
            ran += 1;
            assert!(
                classify(&instr).is_ok() || crate::system::handles(&instr),
                "ran a denied instruction: {instr}"
            );
            assert_eq!(
                cpu.rip & 0xffff_ffff,
                (cpu0.rip + instr.len() as u64) & 0xffff_ffff
            );
        }
    }
    assert!(ran > 1000, "only {ran} instructions ran");
}

/// Host-side cost of a simple instruction (run with `--ignored --nocapture`
/// in release).
#[test]
#[ignore]
fn bench_add_to_memory() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let code = asm64(|a| a.add(dword_ptr(rax), ebx));
    cpu.gprs.rax = DATA;
    let mut samples = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        cpu.rip = CODE;
        mem.log.clear();
        let t = std::time::Instant::now();
        let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
        samples.push(t.elapsed().as_nanos());
        assert!(matches!(o, Outcome::Done { .. }));
    }
    samples.sort_unstable();
    eprintln!(
        "emulate add [rax], ebx: median {} ns",
        samples[samples.len() / 2]
    );
}

/// The CPU stops at 15 bytes: a longer instruction (redundant prefixes)
/// raises #GP(0), a 15-byte one runs, and an unknown opcode is #UD.
#[test]
fn instructions_longer_than_15_bytes_raise_gp() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rax = DATA;
    let add = [0x01u8, 0x08]; // add [rax], ecx
    let with_prefixes = |n: usize| [vec![0x66u8; n], add.to_vec()].concat();
    // KVM reports at most 15 bytes; the emulator reads on from guest memory.
    let mut run = |bytes: &[u8]| {
        mem.ram[CODE as usize..CODE as usize + 32].fill(0x90);
        mem.ram[CODE as usize..CODE as usize + bytes.len()].copy_from_slice(bytes);
        cpu.rip = CODE;
        e.emulate(
            &mut cpu,
            &bytes[..bytes.len().min(15)],
            &mut NoVectorState,
            &mut mem,
        )
    };
    assert_eq!(exc(&run(&with_prefixes(14))), (VEC_GP, Some(0)), "16 bytes");
    assert_eq!(exc(&run(&[0x66; 16])), (VEC_GP, Some(0)), "prefixes only");
    let o = run(&with_prefixes(13));
    assert!(matches!(o, Outcome::Done { .. }), "15 bytes: {o:?}");
    assert_eq!(
        exc(&run(&[0x66, 0x0f, 0x04])),
        (VEC_UD, None),
        "invalid opcode"
    );
}

/// Multi-byte and reserved NOPs with a memory operand never access it or
/// fault (the CPU: `nop [unmapped]` runs); LAR's memory operand, by
/// contrast, is read (`tests/selector.rs` has the family).
#[test]
fn memory_nops_and_descriptor_reads() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rsi = 0x7f_0000; // not mapped
    for code in [
        asm64(|a| a.nop_1(dword_ptr(rsi))),
        vec![0x0f, 0x1d, 0x0e],
        vec![0x90],
    ] {
        cpu.rip = CODE;
        mem.log.clear();
        let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
        assert!(matches!(o, Outcome::Done { .. }), "{code:02x?}: {o:?}");
        assert_eq!(cpu.rip, CODE + code.len() as u64);
        assert!(mem.log.is_empty());
    }
    cpu.rip = CODE;
    let o = e.emulate(
        &mut cpu,
        &asm64(|a| a.lar(ecx, word_ptr(rsi))),
        &mut NoVectorState,
        &mut mem,
    );
    assert_eq!(
        o,
        Outcome::Exception {
            vector: VEC_PF,
            error_code: Some(0),
            cr2: Some(0x7f_0000)
        }
    );
}
