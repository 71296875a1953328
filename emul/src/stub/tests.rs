//! Tests of the whole machinery: running stubs, the ITS invariant, W^X,
//! bounds, register round trips and fault recovery. They need no KVM.

use core::arch::asm;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic};

use super::regs::{RFLAGS_CF, RFLAGS_OF, RFLAGS_SF, RFLAGS_ZF};
use super::*;

/// Assembles one instruction with iced.
fn encode(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(0).unwrap()
}

/// A NOP of exactly `len` bytes (1..=15): the recommended multi-byte NOPs,
/// padded with operand-size prefixes.
fn nop(len: usize) -> Vec<u8> {
    const BASE: [&[u8]; 9] = [
        &[0x90],
        &[0x66, 0x90],
        &[0x0f, 0x1f, 0x00],
        &[0x0f, 0x1f, 0x40, 0x00],
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
        &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    ];
    let base = BASE[len.min(9) - 1];
    let mut v = vec![0x66; len - base.len()];
    v.extend_from_slice(base);
    v
}

fn decode(ip: u64, code: &[u8]) -> Vec<iced_x86::Instruction> {
    Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
        .into_iter()
        .collect()
}

/// Checks generated code: it decodes cleanly, has no indirect branch, and
/// (with ITS on) every RET is in the upper half of its cache line.
/// Returns the RET addresses.
fn check_code(ip: u64, code: &[u8], its_on: bool) -> Vec<u64> {
    let insns = decode(ip, code);
    assert_eq!(
        insns.iter().map(|i| i.len()).sum::<usize>(),
        code.len(),
        "code must decode to its end"
    );
    let mut rets = Vec::new();
    for i in &insns {
        assert!(!i.is_invalid(), "invalid instruction at {:#x}", i.ip());
        assert!(
            !matches!(
                i.flow_control(),
                FlowControl::IndirectBranch | FlowControl::IndirectCall
            ),
            "indirect branch at {:#x}",
            i.ip()
        );
        if i.mnemonic() == Mnemonic::Ret {
            assert!(
                !its_on || its_safe(i.ip()),
                "RET at {:#x} (line offset {}) with ITS on",
                i.ip(),
                i.ip() % 64
            );
            rets.push(i.ip());
        }
    }
    rets
}

/// Whether the host is QEMU's TCG with departure `d` from the SDM (see
/// `probe`): the checks it affects then expect what that CPU does.
fn tcg_has(d: probe::Deviation) -> bool {
    let cpu = probe::probe().expect("CPU probes run");
    cpu.is_tcg() && cpu.has(d)
}

/// Every self-test case passed, or failed only as the host CPU itself
/// departs from the SDM (QEMU's TCG), which is printed.
fn assert_selftest_ok(cases: &[selftest::SelftestCase]) {
    let cpu = probe::probe().expect("CPU probes run");
    for c in cases.iter().filter(|c| !c.passed()) {
        let d = selftest::explained_by(c, &cpu);
        assert!(d.is_some(), "{c}");
        println!("{c}: as this CPU does ({})", d.unwrap());
    }
}

#[test]
fn selftest_passes_both_modes() {
    for its_on in [true, false] {
        let cases = selftest::run(its_on);
        for c in &cases {
            println!("{c}");
        }
        assert_eq!(cases.len(), 7);
        assert_selftest_ok(&cases);
    }
}

#[test]
fn selftest_is_fast_after_init() {
    let mut buf = StubBuf::new(true).unwrap();
    selftest::run_with(&mut buf);
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            let cases = selftest::run_with(&mut buf);
            let t = t.elapsed();
            assert_selftest_ok(&cases);
            t
        })
        .min()
        .unwrap();
    println!("selftest (7 cases, 6 faults): {best:?}");
    if probe::probe().expect("CPU probes run").is_tcg() {
        // Every fault is a signal through an emulated CPU: time means nothing.
        println!("time not checked: the CPU is QEMU's TCG");
        return;
    }
    assert!(best < Duration::from_millis(1), "selftest took {best:?}");
}

#[test]
fn its_invariant_holds_for_all_generated_code() {
    let buf = StubBuf::new(true).unwrap();
    let (ip, code) = buf.helper_code();
    let rets = check_code(ip, code, true);
    // The thunk's RET is one of them; helpers whose RET happens to fall in
    // an upper half keep a plain RET (check_code proved them safe).
    assert!(rets.contains(&buf.thunk_addr()));
    assert_eq!(buf.thunk_addr() % 64, 32);

    let mut buf = buf;
    for len in 1..=MAX_INSN_LEN {
        let insn = nop(len);
        assert_eq!(decode(0, &insn).len(), 1, "nop({len}) is one instruction");
        for start in 0..64 {
            let stub = buf.build_at(start, &insn).unwrap();
            let (ip, code) = buf.stub_code(&stub);
            let rets = check_code(ip, code, true);
            let last = decode(ip, code);
            let tail = &last[last.len() - 1];
            if rets.is_empty() {
                // Ends in JMP thunk; INT3.
                let jmp = &last[last.len() - 2];
                assert_eq!(jmp.mnemonic(), Mnemonic::Jmp);
                assert_eq!(jmp.near_branch_target(), buf.thunk_addr());
                assert_eq!(tail.mnemonic(), Mnemonic::Int3);
            } else {
                assert_eq!(tail.mnemonic(), Mnemonic::Ret);
            }
            // And it runs, through the thunk where there is one.
            let mut gprs = GuestGprs {
                rax: len as u64,
                ..Default::default()
            };
            buf.run_at(start, &insn, &mut gprs).unwrap();
            assert_eq!(gprs.rax, len as u64);
        }
    }
}

#[test]
fn plain_ret_with_its_off() {
    let mut buf = StubBuf::new(false).unwrap();
    let (ip, code) = buf.helper_code();
    // Thunk (the no-op vector switch), load, save, landing and, with
    // XSAVE, the two vector switches each end in a plain RET.
    let vec_helpers = if buf.vector_mask() != 0 { 2 } else { 0 };
    assert_eq!(check_code(ip, code, false).len(), 4 + vec_helpers);
    for start in 0..64 {
        let stub = buf.build_at(start, &nop(3)).unwrap();
        let (ip, code) = buf.stub_code(&stub);
        assert_eq!(*code.last().unwrap(), RET);
        assert_eq!(check_code(ip, code, false), [ip + code.len() as u64 - 1]);
    }
}

#[test]
fn no_mapping_is_writable_and_executable() {
    let buf = StubBuf::new(true).unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let perms_at = |addr: u64| {
        maps.lines()
            .find_map(|line| {
                let (range, rest) = line.split_once(' ')?;
                let (lo, hi) = range.split_once('-')?;
                let lo = u64::from_str_radix(lo, 16).ok()?;
                let hi = u64::from_str_radix(hi, 16).ok()?;
                (lo..hi)
                    .contains(&addr)
                    .then(|| rest.split(' ').next().unwrap_or("").to_owned())
            })
            .unwrap_or_else(|| panic!("{addr:#x} not mapped"))
    };
    for line in maps.lines() {
        let perms = line.split(' ').nth(1).unwrap();
        assert!(
            !(perms.contains('w') && perms.contains('x')),
            "W+X mapping: {line}"
        );
    }
    let region = buf.region();
    assert_eq!(perms_at(buf.stub_exec_addr()), "r-xs");
    assert_eq!(perms_at(region.stub_write_addr()), "rw-s");
    assert_eq!(perms_at(buf.helper_code().0), "r-xs");
    assert_eq!(perms_at(buf.bounce_exec_addr()), "rw-s");
    assert_eq!(
        perms_at(buf.bounce_exec_addr() + BOUNCE_SIZE as u64 - 1),
        "rw-s"
    );
}

#[test]
fn bounce_is_within_rel32_of_the_stub() {
    let mut buf = StubBuf::new(true).unwrap();
    let insn_addr = buf.insn_exec_addr();
    // Far end of the bounce buffer: a 64-byte operand at offset 4095+.
    let offset = BOUNCE_SIZE - 64;
    let target = buf.bounce_exec_addr() + offset as u64;
    let value = 0x0123_4567_89ab_cdefu64;
    buf.bounce_mut()[offset..offset + 8].copy_from_slice(&value.to_le_bytes());

    // mov rax, [rip+disp32]; mov [rip+disp32+8], rax would need two
    // instructions' worth of addresses; do a load, then a store.
    let disp = |len: u64, t: u64| ((t.wrapping_sub(insn_addr + len)) as i32).to_le_bytes();
    let mut load = vec![0x48, 0x8b, 0x05];
    load.extend_from_slice(&disp(7, target));
    let mut gprs = GuestGprs::default();
    buf.run(&load, &mut gprs).unwrap();
    assert_eq!(gprs.rax, value);

    let mut store = vec![0x48, 0x89, 0x1d]; // mov [rip+disp32], rbx
    store.extend_from_slice(&disp(7, target + 8));
    gprs.rbx = !value;
    buf.run(&store, &mut gprs).unwrap();
    assert_eq!(
        buf.bounce()[offset + 8..offset + 16],
        (!value).to_le_bytes()
    );
}

#[test]
fn oversized_stubs_are_refused() {
    let mut buf = StubBuf::new(true).unwrap();
    let mut gprs = GuestGprs::default();
    assert!(matches!(
        buf.run(&[0x90; 16], &mut gprs),
        Err(StubRunError::Build(StubError::BadInsnLength(16)))
    ));
    assert!(matches!(
        buf.build_at(0, &[]),
        Err(StubError::BadInsnLength(0))
    ));
    assert!(matches!(
        buf.build_at(90, &nop(15)),
        Err(StubError::TooLong { .. })
    ));
    assert!(matches!(
        buf.run_at(100, &nop(15), &mut gprs),
        Err(StubRunError::Build(StubError::TooLong { .. }))
    ));
    assert!(matches!(
        buf.build_at(STUB_BUF_SIZE / 2, &nop(1)),
        Err(StubError::BadStartOffset(_))
    ));
    // The largest stub at the last allowed offset still fits.
    let stub = buf.build_at(63, &nop(15)).unwrap();
    assert!(stub.start + stub.len <= STUB_BUF_SIZE / 2);
    assert!(stub.len <= MAX_STUB_LEN);
}

fn distinct_gprs() -> GuestGprs {
    let v = |n: u64| 0x1111_1111_1111_1111u64.wrapping_mul(n) ^ (n << 56);
    GuestGprs {
        rax: v(1),
        rcx: v(2),
        rdx: v(3),
        rbx: v(4),
        rsp: v(5),
        rbp: v(6),
        rsi: v(7),
        rdi: v(8),
        r8: v(9),
        r9: v(10),
        r10: v(11),
        r11: v(12),
        r12: v(13),
        r13: v(14),
        r14: v(15),
        r15: v(0x10),
        rflags: 0x2 | 0x200 | ARITH_FLAGS_MASK,
    }
}

fn gpr_mut(g: &mut GuestGprs, n: usize) -> &mut u64 {
    [
        &mut g.rax, &mut g.rcx, &mut g.rdx, &mut g.rbx, &mut g.rsp, &mut g.rbp, &mut g.rsi,
        &mut g.rdi, &mut g.r8, &mut g.r9, &mut g.r10, &mut g.r11, &mut g.r12, &mut g.r13,
        &mut g.r14, &mut g.r15,
    ]
    .into_iter()
    .nth(n)
    .unwrap()
}

#[test]
fn every_gpr_round_trips() {
    let regs = [
        rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
    ];
    for its_on in [true, false] {
        let mut buf = StubBuf::new(its_on).unwrap();
        let mut gprs = distinct_gprs();
        buf.run(&nop(1), &mut gprs).unwrap();
        assert_eq!(gprs, distinct_gprs(), "nop changes nothing");

        for (n, reg) in regs.iter().enumerate() {
            if n == 4 {
                continue; // RSP is never loaded
            }
            let mut gprs = distinct_gprs();
            buf.run(&encode(|a| a.not(*reg)), &mut gprs).unwrap();
            let mut expected = distinct_gprs();
            let r = gpr_mut(&mut expected, n);
            *r = !*r;
            assert_eq!(gprs, expected, "not {reg:?}");
        }
    }
}

#[test]
fn arithmetic_flags_are_loaded_and_saved() {
    let mut buf = StubBuf::new(true).unwrap();
    // Guest's non-arithmetic bits, DF and TF included, must not reach the
    // real RFLAGS but must survive in the register file (AC is loaded on
    // purpose: see RFLAGS_AC; it has its own test).
    let other = 0x2 | 0x200 | 0x400;
    for arith in [
        0,
        ARITH_FLAGS_MASK,
        RFLAGS_CF,
        RFLAGS_ZF | RFLAGS_OF,
        0x4 | 0x10 | 0x80,
    ] {
        // pushfq; pop rax: RAX = the real flags inside the stub.
        let mut gprs = GuestGprs {
            rflags: other | arith,
            ..Default::default()
        };
        buf.run(&[0x9c, 0x58], &mut gprs).unwrap();
        assert_eq!(gprs.rax & ARITH_FLAGS_MASK, arith, "loaded {arith:#x}");
        assert_eq!(gprs.rax & (0x400 | 0x100), 0, "DF/TF not loaded");
        assert_eq!(gprs.rflags, other | arith);

        // push rax; popfq: the instruction sets the flags from RAX.
        let mut gprs = GuestGprs {
            rax: 0x2 | arith,
            rflags: other | (!arith & ARITH_FLAGS_MASK),
            ..Default::default()
        };
        buf.run(&[0x50, 0x9d], &mut gprs).unwrap();
        assert_eq!(gprs.rflags, other | arith, "saved {arith:#x}");
    }
}

/// CRC-32C (Castagnoli, reflected), what the `crc32` instruction computes.
fn crc32c_u64(mut crc: u32, v: u64) -> u32 {
    for byte in v.to_le_bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[test]
fn instructions_match_native_results() {
    let mut buf = StubBuf::new(true).unwrap();
    let values = [
        0u64,
        1,
        0xffff_ffff_ffff_ffff,
        0x8000_0000_0000_0001,
        0x1234_5678_9abc_def0,
    ];
    for &a in &values {
        for &b in &values {
            for cf in [0, 1] {
                // adcx: RAX += RBX + CF; only CF changes.
                let before = RFLAGS_OF | RFLAGS_SF | cf | 0x2;
                let mut g = GuestGprs {
                    rax: a,
                    rbx: b,
                    rflags: before,
                    ..Default::default()
                };
                buf.run(&encode(|x| x.adcx(rax, rbx)), &mut g).unwrap();
                let (s1, c1) = a.overflowing_add(b);
                let (sum, c2) = s1.overflowing_add(cf);
                assert_eq!(g.rax, sum);
                assert_eq!(g.rflags, (before & !RFLAGS_CF) | u64::from(c1 || c2));
            }

            // popcnt: ZF from the source, the other arithmetic flags cleared.
            let mut g = GuestGprs {
                rbx: b,
                rflags: ARITH_FLAGS_MASK | 0x2,
                ..Default::default()
            };
            buf.run(&encode(|x| x.popcnt(rax, rbx)), &mut g).unwrap();
            assert_eq!(g.rax, u64::from(b.count_ones()));
            assert_eq!(g.rflags, 0x2 | if b == 0 { RFLAGS_ZF } else { 0 });

            // mulx: RAX:RCX = RDX * RBX, flags untouched.
            let mut g = GuestGprs {
                rdx: a,
                rbx: b,
                rflags: 0x2 | RFLAGS_CF,
                ..Default::default()
            };
            buf.run(&encode(|x| x.mulx(rax, rcx, rbx)), &mut g).unwrap();
            let product = u128::from(a) * u128::from(b);
            assert_eq!((g.rax, g.rcx), ((product >> 64) as u64, product as u64));
            assert_eq!(g.rflags, 0x2 | RFLAGS_CF);

            // crc32 rax, rbx (CRC-32C).
            let crc = a as u32;
            let mut g = GuestGprs {
                rax: a,
                rbx: b,
                rflags: 0x2,
                ..Default::default()
            };
            buf.run(&encode(|x| x.crc32(rax, rbx)), &mut g).unwrap();
            assert_eq!(g.rax, u64::from(crc32c_u64(crc, b)));
        }
    }
}

fn host_mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: stmxcsr writes four bytes to a live local.
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn host_fcw() -> u16 {
    let mut v = 0u16;
    // SAFETY: fnstcw writes two bytes to a live local.
    unsafe { asm!("fnstcw [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn host_df_clear() -> bool {
    let flags: u64;
    // SAFETY: pushfq/pop is balanced and touches only the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags) };
    flags & 0x400 == 0
}

/// Fault cases beyond the selftest's: #PF, #MF, #AC.
fn extra_fault_cases(buf: &mut StubBuf) -> Vec<(&'static str, Vec<u8>, GuestGprs, u8)> {
    let insn = buf.insn_exec_addr();
    let bounce = buf.bounce_exec_addr();
    // x87 control word with zero-divide unmasked, at bounce + 64.
    buf.bounce_mut()[64..66].copy_from_slice(&0x037bu16.to_le_bytes());
    let mut mf = vec![0xd9, 0x2d]; // fldcw [rip+disp32]
    mf.extend_from_slice(&((bounce + 64).wrapping_sub(insn + 6) as i32).to_le_bytes());
    mf.extend_from_slice(&[0xd9, 0xe8, 0xd9, 0xee, 0xde, 0xf9, 0x9b]); // fld1; fldz; fdivp; fwait
                                                                       // pushfq; or qword [rsp], AC; popfq; mov eax, [rcx] (misaligned)
    let ac = vec![0x9c, 0x48, 0x81, 0x0c, 0x24, 0, 0, 4, 0, 0x9d, 0x8b, 0x01];
    vec![
        (
            "page fault",
            vec![0x48, 0x8b, 0x01],
            GuestGprs {
                rcx: 0x10,
                ..Default::default()
            },
            EXC_PF,
        ),
        ("x87 zero divide", mf, GuestGprs::default(), EXC_MF),
        (
            "alignment check",
            ac,
            GuestGprs {
                rcx: bounce + 129,
                ..Default::default()
            },
            EXC_AC,
        ),
        ("ud2", vec![0x0f, 0x0b], GuestGprs::default(), EXC_UD),
    ]
}

#[test]
fn faults_are_recovered_with_host_state_intact() {
    for its_on in [true, false] {
        let mut buf = StubBuf::new(its_on).unwrap();
        let (mxcsr, fcw) = (host_mxcsr(), host_fcw());
        for (name, insn, gprs, vector) in extra_fault_cases(&mut buf) {
            let mut g = gprs;
            if vector == EXC_AC && tcg_has(probe::Deviation::NoAc) {
                // This CPU raises no #AC: the access completes, AC stays set.
                println!(
                    "{name}: completes, as this CPU does ({})",
                    probe::Deviation::NoAc
                );
                buf.run(&insn, &mut g).expect(name);
                let clear_ac = [0x9c, 0x48, 0x81, 0x24, 0x24, 0xff, 0xff, 0xfb, 0xff, 0x9d];
                buf.run(&clear_ac, &mut GuestGprs::default()).unwrap();
                continue;
            }
            let err = buf.run(&insn, &mut g).unwrap_err();
            let StubRunError::Fault(fault) = err else {
                panic!("{name}: {err}");
            };
            println!("{name}: {fault}");
            assert_eq!(fault.vector, vector, "{name}: {fault}");
            if vector == EXC_PF {
                assert_eq!(fault.fault_addr, Some(0x10));
                assert_eq!(fault.error_code & 0x4, 0x4, "user-mode access");
                assert_eq!(fault.error_code & 0x1, 0, "not present");
            }
            assert_eq!((host_mxcsr(), host_fcw()), (mxcsr, fcw), "{name}");
            assert!(host_df_clear());
            // The buffer keeps working after a fault.
            let mut g = GuestGprs {
                rax: 1,
                rbx: 2,
                ..Default::default()
            };
            buf.run(&[0x48, 0x01, 0xd8], &mut g).unwrap();
            assert_eq!(g.rax, 3);
        }
        // The selftest's #XM case unmasks an MXCSR exception.
        assert_selftest_ok(&selftest::run_with(&mut buf));
        assert_eq!((host_mxcsr(), host_fcw()), (mxcsr, fcw));
    }
}

#[test]
fn faults_are_recovered_on_concurrent_threads() {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut buf = StubBuf::new(t % 2 == 0).unwrap();
                for i in 0..300u64 {
                    let mut g = GuestGprs {
                        rax: i,
                        rbx: t,
                        ..Default::default()
                    };
                    match i % 3 {
                        0 => {
                            buf.run(&[0x48, 0x01, 0xd8], &mut g).unwrap();
                            assert_eq!(g.rax, i + t);
                        }
                        1 => {
                            let e = buf.run(&[0x0f, 0x0b], &mut g).unwrap_err();
                            assert!(matches!(e, StubRunError::Fault(f) if f.vector == EXC_UD));
                        }
                        _ => {
                            g.rcx = 0;
                            let e = buf.run(&[0x48, 0xf7, 0xf1], &mut g).unwrap_err();
                            assert!(matches!(e, StubRunError::Fault(f) if f.vector == EXC_DE));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn stub_buf_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<StubBuf>();
}

/// Set in a child copy of this test binary, which must die of the signal.
const CHILD_ENV: &str = "EMUL_STUB_FAULT_CHILD";

#[test]
fn fault_outside_a_stub_is_not_swallowed() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    match std::env::var(CHILD_ENV).as_deref() {
        Ok("segv") => {
            let _buf = StubBuf::new(true).unwrap();
            // SAFETY: deliberately reads an unmapped address to die.
            unsafe { asm!("mov {0}, [{1}]", out(reg) _, in(reg) 16usize) };
            unreachable!("the load must kill the process");
        }
        Ok("trap") => {
            let _buf = StubBuf::new(true).unwrap();
            // SAFETY: INT3 outside any stub must kill the process.
            unsafe { asm!("int3") };
            unreachable!("int3 must kill the process");
        }
        Ok("overflow") => {
            let _buf = StubBuf::new(true).unwrap();
            // Rust's guard-page handler, installed before ours, must still
            // report the overflow (and abort).
            fn recurse(depth: u64) -> u64 {
                if depth == u64::MAX {
                    return 0;
                }
                let pad = std::hint::black_box([depth; 64]);
                pad[(depth % 64) as usize] + recurse(depth + 1)
            }
            std::hint::black_box(recurse(0));
            unreachable!("the recursion must overflow");
        }
        Ok(_) => unreachable!(),
        Err(_) => {}
    }
    let exe = std::env::current_exe().unwrap();
    let modes = [
        ("segv", libc::SIGSEGV),
        ("trap", libc::SIGTRAP),
        ("overflow", libc::SIGABRT),
    ];
    for (mode, signal) in modes {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "stub::tests::fault_outside_a_stub_is_not_swallowed",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, mode)
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(signal), "{mode}: {out:?}");
        if mode == "overflow" {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("overflowed its stack"), "{stderr}");
        }
    }
}

#[test]
fn vector_run_switches_the_guest_xsave_image() {
    let mut buf = StubBuf::new(true).unwrap();
    if buf.vector_mask() == 0 {
        eprintln!("skipped: host has no XSAVE");
        return;
    }
    let img = buf.guest_xsave_mut();
    img.fill(0);
    img[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR default
    img[512] = 0b10; // XSTATE_BV: SSE
    img[160..176].fill(0x11); // XMM0
    let mut gprs = GuestGprs::default();
    // paddb xmm0, xmm0
    buf.run_with_vector(&[0x66, 0x0f, 0xfc, 0xc0], &mut gprs)
        .unwrap();
    assert!(buf.guest_xsave()[160..176].iter().all(|&b| b == 0x22));
    // A corrupt header is refused before anything runs.
    buf.guest_xsave_mut()[520] = 1;
    assert!(buf
        .run_with_vector(&[0x66, 0x0f, 0xfc, 0xc0], &mut gprs)
        .is_err());
}

/// A page of host memory with no access, unmapped on drop: the host's
/// own not-present page for measuring what the CPU does.
struct NoAccessPage(*mut libc::c_void);

impl NoAccessPage {
    fn new() -> Self {
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        NoAccessPage(page)
    }

    fn addr(&self) -> u64 {
        self.0 as u64
    }
}

impl Drop for NoAccessPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.0, 4096) };
    }
}

/// The host CPU's own answer for the emulator's exception priority: an
/// aligned-only SSE operand (MOVAPS, ADDPS m128) that is misaligned and
/// lies on a page with no access raises #GP (SIGSEGV with SI_KERNEL), an
/// aligned one #PF (the page-fault signal with its address). The emulator
/// gives the guest the same (`tests::misaligned_operand_on_a_missing_page_is_gp_not_pf`).
/// Measured here on AMD EPYC (Zen 3) and in kvm-facts on AMD EPYC with
/// AVX-512; the SDM orders #GP before #PF for every vendor.
#[test]
fn alignment_comes_before_the_walk() {
    let mut buf = StubBuf::new(false).unwrap();
    let page = NoAccessPage::new();
    let base = page.addr();
    let movaps = encode(|a| a.movaps(xmm0, xmmword_ptr(rax)));
    let addps = encode(|a| a.addps(xmm0, xmmword_ptr(rax)));
    for insn in [&movaps, &addps] {
        for (addr, want) in [(base + 8, EXC_GP), (base, EXC_PF)] {
            let mut g = GuestGprs {
                rax: addr,
                ..Default::default()
            };
            match buf.run(insn, &mut g) {
                Err(StubRunError::Fault(f)) => assert_eq!(f.vector, want, "{addr:#x}: {f}"),
                other => panic!("{addr:#x}: {other:?}"),
            }
        }
    }
}

/// MOVDIR64B's fault order on the host CPU (the emulator's model in
/// `emulator/direct.rs`, tested in `tests::movdir64b_page_faults` and
/// `tests::movdir64b_misaligned_destination_is_gp0`). Measured on Intel
/// Xeon family 6 model 207 (Emerald Rapids): the source is checked and
/// walked first, so its #PF wins over a misaligned or non-canonical
/// destination; then the destination: #GP(0) when misaligned, even on a
/// missing page, then its #PF as a write.
#[test]
fn movdir64b_fault_order_on_the_host() {
    let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
    if core::arch::x86_64::__cpuid(0).eax < 7 || leaf7.ecx & (1 << 28) == 0 {
        println!("skipped: host has no MOVDIR64B (CPUID.07H.0H:ECX[28] = 0)");
        return;
    }
    let mut buf = StubBuf::new(false).unwrap();
    let (src_page, dst_page) = (NoAccessPage::new(), NoAccessPage::new());
    let data = vec![0u8; 256];
    let line = (data.as_ptr() as u64 + 63) & !63;
    let insn = encode(|a| a.movdir64b(rdi, ptr(rsi)));
    let (src_missing, dst_missing) = (src_page.addr() + 8, dst_page.addr());
    let non_canonical = 0x8000_0000_0000_0000u64;
    // (what, source, destination, expected vector, expected CR2)
    let cases = [
        (
            "src missing, dst misaligned",
            src_missing,
            line + 8,
            EXC_PF,
            Some(src_missing),
        ),
        (
            "src missing, dst aligned",
            src_missing,
            line,
            EXC_PF,
            Some(src_missing),
        ),
        (
            "src missing, dst missing",
            src_missing,
            dst_missing,
            EXC_PF,
            Some(src_missing),
        ),
        (
            "src missing, dst non-canonical",
            src_missing,
            non_canonical,
            EXC_PF,
            Some(src_missing),
        ),
        (
            "src missing, dst misaligned non-canonical",
            src_missing,
            non_canonical + 8,
            EXC_PF,
            Some(src_missing),
        ),
        (
            "src non-canonical, dst missing",
            non_canonical,
            dst_missing,
            EXC_GP,
            None,
        ),
        (
            "src ok, dst misaligned on a missing page",
            line,
            dst_missing + 8,
            EXC_GP,
            None,
        ),
        (
            "src ok, dst non-canonical",
            line,
            non_canonical,
            EXC_GP,
            None,
        ),
        (
            "src ok, dst missing",
            line,
            dst_missing,
            EXC_PF,
            Some(dst_missing),
        ),
    ];
    let mut seen = Vec::new();
    for (what, src, dst, ..) in cases {
        let mut g = GuestGprs {
            rsi: src,
            rdi: dst,
            ..Default::default()
        };
        let got = match buf.run(&insn, &mut g) {
            Err(StubRunError::Fault(f)) => f,
            other => panic!("{what}: {other:?}"),
        };
        println!("{what}: {got} (error code {:#x})", got.error_code);
        seen.push(got);
    }
    for ((what, _, _, vector, addr), got) in cases.iter().zip(&seen) {
        assert_eq!(
            (got.vector, got.fault_addr),
            (*vector, *addr),
            "{what}: {got}"
        );
    }
    assert_ne!(seen[8].error_code & 2, 0, "a write: {}", seen[8]);
    drop(data);
}

/// What the host CPU does with cache instructions on an inaccessible page
/// (the emulator's model in `tests::cache_lines_walk_and_hints_never_fault`):
/// CLFLUSH faults with #PF like a read, PREFETCHT0 never faults.
#[test]
fn cache_instructions_on_the_host() {
    let mut buf = StubBuf::new(false).unwrap();
    let page = NoAccessPage::new();
    let mut g = GuestGprs {
        rax: page.addr() + 0x40,
        ..Default::default()
    };
    match buf.run(&encode(|a| a.clflush(byte_ptr(rax))), &mut g) {
        Err(StubRunError::Fault(f)) => assert_eq!(f.vector, EXC_PF, "{f}"),
        Ok(()) if tcg_has(probe::Deviation::ClflushNoFault) => {
            println!("clflush completes, as this CPU does (clflush-no-fault)")
        }
        other => panic!("clflush: {other:?}"),
    }
    assert!(buf
        .run(&encode(|a| a.prefetcht0(byte_ptr(rax))), &mut g)
        .is_ok());
    g.rax = 0x8000_0000_0000_0000;
    assert!(buf
        .run(&encode(|a| a.prefetcht0(byte_ptr(rax))), &mut g)
        .is_ok());
}
