//! The VMM's instruction completion seen end to end: refusals, injected
//! page faults, per-mnemonic statistics.
//!
//! `unsupported-insn` and `regonly-cpl0` run their instructions at CPL 0:
//! on PVM hosts they reach the VMM, on hardware KVM they run natively
//! without an exit, and the tests check that instead.

mod common;

use common::{config_for, program, run_config};
use vmm::vcpu::OnUnsupported;

/// On hardware KVM `xsaves` at CPL 0 runs natively and never reaches the
/// VMM: it completes, or the CPU raises #UD where it lacks XSAVES (QEMU
/// TCG's `-cpu max`), which the guest's handler reports.
fn cpl0_xsaves_runs_natively(cfg: &vmm::config::VmConfig) {
    let (out, serial) = run_config(cfg);
    let pass = guest::rt::status_of(guest::rt::EXIT_PASS);
    let ud = guest::programs::emulation::UD_STATUS;
    assert!(
        out.status == pass || out.status == ud,
        "status {}: {}: {serial}",
        out.status,
        out.message
    );
    if out.status == pass {
        assert!(serial.contains("xsaves completed"), "{serial}");
    } else {
        assert!(
            serial.contains("exception vector=0000000000000006"),
            "{serial}"
        );
    }
    println!(
        "hardware KVM: xsaves at CPL 0 ran natively (status {})",
        out.status
    );
}

#[test]
fn unsupported_instruction_stops_with_its_text() {
    if common::kvm_kind().cpl0_native() {
        return cpl0_xsaves_runs_natively(&config_for(&program("unsupported-insn")));
    }
    let (out, serial) = common::check_program("unsupported-insn");
    assert_eq!(out.status, vmm::status::UNSUPPORTED_INSTRUCTION);
    assert!(out.message.contains("xsaves"), "{}", out.message);
    assert!(out.message.contains("rip 0x"), "{}", out.message);
    assert!(!serial.contains("xsaves completed"));
}

#[test]
fn unsupported_instruction_can_raise_ud() {
    let p = program("unsupported-insn");
    let mut cfg = config_for(&p);
    cfg.on_unsupported = OnUnsupported::InjectUd;
    if common::kvm_kind().cpl0_native() {
        return cpl0_xsaves_runs_natively(&cfg);
    }
    let (out, serial) = run_config(&cfg);
    assert_eq!(
        out.status,
        guest::programs::emulation::UD_STATUS,
        "{}: {serial}",
        out.message
    );
    assert!(
        serial.contains("exception vector=0000000000000006"),
        "{serial}"
    );
    assert_eq!(out.reports.first(), Some(&6), "the guest's handler saw #UD");
}

#[test]
fn unsupported_ud_flag_through_the_binary() {
    let o = common::vmm_program(&program("unsupported-insn"), &["--on-unsupported", "ud"]);
    let st = common::status(&o);
    if common::kvm_kind().cpl0_native() {
        // xsaves runs natively: it completes, or the CPU itself raises #UD.
        let pass = guest::rt::status_of(guest::rt::EXIT_PASS);
        assert!(
            st == pass || st == guest::programs::emulation::UD_STATUS,
            "{st}"
        );
    } else {
        assert_eq!(st, guest::programs::emulation::UD_STATUS);
    }
}

#[test]
fn page_faults_from_the_emulators_walk_reach_the_guest() {
    common::check_program("emul-page-fault");
}

#[test]
fn stats_count_emulated_instructions_per_mnemonic() {
    let p = program("regonly-cpl0");
    let mut cfg = config_for(&p);
    cfg.stats = true;
    let (out, _) = run_config(&cfg);
    assert_eq!(out.status, p.expect.status);
    if common::kvm_kind().cpl0_native() {
        // CPL 0 code runs natively: nothing reaches the emulator.
        assert!(out.emulated.is_empty(), "{:?}", out.emulated);
        println!("hardware KVM: regonly-cpl0 ran natively, no emulated instruction");
        return;
    }
    let count = |m: iced_x86::Mnemonic| {
        out.emulated
            .iter()
            .find(|(x, _)| *x == m)
            .map_or(0, |e| e.1)
    };
    // Each case runs with two flag inputs, at CPL 0 only.
    assert_eq!(count(iced_x86::Mnemonic::Adcx), 2, "{:?}", out.emulated);
    assert_eq!(count(iced_x86::Mnemonic::Popcnt), 4, "{:?}", out.emulated);
    assert_eq!(count(iced_x86::Mnemonic::Crc32), 4, "{:?}", out.emulated);
    let stats = out.stats.expect("stats").report();
    assert!(stats.contains("emulation"), "{stats}");
}

/// AVX-512 masked moves and VMASKMOV across an unmapped page: the VMM
/// faults exactly where the CPU does natively (only on selected elements),
/// and loads and stores the same bytes.
#[test]
fn masked_accesses_fault_like_the_cpu() {
    if !std::arch::is_x86_feature_detected!("avx512bw") {
        eprintln!("skipped: the host has no AVX-512BW, the program's payload needs it");
        return;
    }
    common::check_program("masked-fault-suppression");
}

/// Issue 10: LDMXCSR at CPL 0 while XMM0-15 are zero used to be lost (the
/// written-back image lacked the SSE bit KVM_SET_XSAVE needs to take
/// MXCSR): STMXCSR read 0x1f80 and the unmasked divide raised nothing.
/// The guest compares both with the same code run natively at CPL 3.
#[test]
fn mxcsr_loaded_at_cpl0_with_zero_xmm_is_kept() {
    let cpu = emul::stub::probe::probe().expect("CPU probes run");
    if cpu.is_tcg() && cpu.has(emul::stub::probe::Deviation::NoXm) {
        // QEMU's TCG raises no #XM: the guest sees none (0xff) where it
        // reports the vector, and the MXCSR values still match.
        let p = program("mxcsr-cpl0");
        let (out, serial) = run_config(&config_for(&p));
        assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
        let want = p
            .expect
            .reports
            .clone()
            .expect("reports")
            .iter()
            .map(|&v| if v == 19 { 0xff } else { v })
            .collect::<Vec<_>>();
        assert_eq!(out.reports, want, "as this CPU does (no-xm)");
        println!("no #XM, as this CPU does (no-xm)");
        return;
    }
    let (out, _) = common::check_program("mxcsr-cpl0");
    // Not a no-op guest: the values went by and were compared.
    assert_eq!(
        out.reports.first(),
        Some(&u64::from(guest::programs::xstate::MXCSR_ZM_CLEAR))
    );
}

/// Vector instructions that change no register (loads of the value
/// already there, stores) fetch the XSAVE image but never write it back.
#[test]
fn unchanged_vector_registers_cost_no_set_xsave() {
    const N: u32 = 200;
    let p = guest::programs::xstate::vector_unchanged(N).unwrap();
    let (out, serial) = run_config(&config_for(&p));
    assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
    assert!(
        out.ioctls.get_xsave >= 2 * u64::from(N),
        "every completed vector instruction reads the image: {:?}",
        out.ioctls
    );
    assert_eq!(out.ioctls.set_xsave, 0, "{:?}", out.ioctls);
}

/// The catalogued variant runs and ends as stated.
#[test]
fn vector_unchanged_runs() {
    common::check_program("vector-unchanged");
}

/// A loop loading the same non-zero data into YMM0 changes it once: one
/// KVM_SET_XSAVE, not one per load.
#[test]
fn a_repeated_load_writes_the_vector_state_once() {
    let p = guest::programs::bench::vmovdqu_nonzero(300).unwrap();
    let (out, serial) = run_config(&config_for(&p));
    assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
    assert_eq!(out.ioctls.get_xsave, 300, "{:?}", out.ioctls);
    assert_eq!(out.ioctls.set_xsave, 1, "{:?}", out.ioctls);
}

/// Each exit pays only for the state it uses (README, Performance): PIO
/// exits make no state ioctl; GPRs and SREGS start synced, leave the sync
/// set after a stretch without emulation and are fetched once when
/// emulation comes back (a CPL 3 payload after the CPL 0 set-up's port
/// I/O); injecting an exception reads the events once per injection.
#[test]
fn state_ioctls_only_where_an_exit_needs_them() {
    use guest::programs::bench;
    let run = |p: guest::Program| {
        let (out, serial) = run_config(&config_for(&p));
        assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
        out.ioctls
    };
    assert_eq!(
        run(bench::pio(500).unwrap()),
        vmm::vcpu::IoctlCounts::default()
    );
    // Emulating from the start: the registers are synced all along.
    let emul = run(bench::adcx(500).unwrap());
    assert_eq!(emul, vmm::vcpu::IoctlCounts::default());
    // 100 port writes before each adcx: dropped, fetched again each time.
    let p = guest::programs::emulation::emulation_after_pio_bursts(5, 100).unwrap();
    let bursts = run(p);
    if common::kvm_kind().cpl0_native() {
        // Hardware KVM runs the CPL 0 adcx natively: nothing is fetched,
        // and the CPU itself raises emul-page-fault's exceptions.
        assert_eq!(bursts, vmm::vcpu::IoctlCounts::default());
        println!("hardware KVM: CPL 0 adcx ran natively, no state ioctl");
        return;
    }
    assert_eq!((bursts.get_regs, bursts.get_sregs), (5, 5), "{bursts:?}");
    // 10 writes: within the stretch, synced all along.
    let p = guest::programs::emulation::emulation_after_pio_bursts(5, 10).unwrap();
    assert_eq!(run(p), vmm::vcpu::IoctlCounts::default());
    // Two of its three exceptions come from the VMM (the addps #PF, with
    // CR2 through the synced SREGS, and the misaligned addps #GP); KVM's
    // own emulator runs the movups store and injects its #PF itself.
    let (out, _) = common::check_program("emul-page-fault");
    assert_eq!(out.ioctls.get_events, 2, "{:?}", out.ioctls);
}

/// SREGS are copied only for exits that may be emulation failures: `lock
/// cmpxchg16b [mmio]` makes KVM exit for its two 8-byte MMIO reads before
/// it gives up at the same RIP, and once the guess has learnt that (after
/// QUIET_AFTER iterations) those MMIO exits go without SREGS while every
/// failure still has them, without a single KVM_GET_SREGS. Bursts of port
/// writes with an emulation among every few exits keep SREGS synced (no
/// wrong guess either).
#[test]
fn sregs_are_copied_only_for_exits_that_may_emulate() {
    use guest::programs::bench;
    const N: u64 = 1000;
    let mut cfg = config_for(&bench::cmpxchg16b(N as u32).unwrap());
    cfg.stats = true;
    let (out, serial) = run_config(&cfg);
    assert_eq!(
        out.status,
        bench::BENCH_DONE_STATUS,
        "{}: {serial}",
        out.message
    );
    let stats = out.stats.as_ref().expect("stats");
    let count = |r| stats.histogram(r).map_or(0, |h| h.count());
    let failures = count(vmm::kvm::run_page::ExitReason::Emulation);
    let mmio = count(vmm::kvm::run_page::ExitReason::MmioRead);
    println!(
        "{failures} emulation failures, {mmio} MMIO reads, SREGS copied {} times, {:?}",
        out.sregs_copies, out.ioctls
    );
    assert!(failures >= N, "every cmpxchg16b is completed by the VMM");
    assert_eq!(
        (out.ioctls.get_regs, out.ioctls.get_sregs),
        (0, 0),
        "{:?}",
        out.ioctls
    );
    let learning = 3 * u64::from(vmm::vcpu::QUIET_AFTER) + 10;
    assert!(
        out.sregs_copies <= failures + learning,
        "SREGS copied {} times for {failures} failures and {mmio} MMIO exits",
        out.sregs_copies
    );
    // An emulation after every 10 port writes: synced all along.
    let p = guest::programs::emulation::emulation_after_pio_bursts(20, 10).unwrap();
    let (out, serial) = run_config(&config_for(&p));
    assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
    assert_eq!(out.ioctls, vmm::vcpu::IoctlCounts::default());
}

/// Issue 10's side state, end to end: #XM leaves its MXCSR flag, a pending
/// x87 exception leaves FSW, FOP, FIP and FDP naming the guest's own fdiv,
/// and FWAIT then raises #MF, at CPL 0 (completed by the VMM on PVM hosts)
/// and at CPL 3 on MMIO (completed by the VMM everywhere) exactly as the
/// CPU gives them natively at CPL 3; a VEX load after XSETBV turned AVX
/// state off is #UD.
#[test]
fn exception_side_state_matches_the_cpu() {
    use guest::programs::exactness::{EXACTNESS_NAMES, EXACTNESS_VALUES};
    let p = common::program("exactness");
    let (out, serial) = common::run_config(&common::config_for(&p));
    assert_eq!(
        out.status, p.expect.status,
        "{}; serial:\n{serial}",
        out.message
    );
    let r = &out.reports;
    assert_eq!(r.len(), 3 * EXACTNESS_VALUES + 1, "reports {r:x?}");
    let native = &r[2 * EXACTNESS_VALUES..3 * EXACTNESS_VALUES];
    let mut bad = Vec::new();
    // QEMU's TCG (the hardware-KVM lane) keeps its own x87 pointers.
    let cpu = emul::stub::probe::probe().expect("CPU probes run");
    let stale_pointers = cpu.is_tcg() && cpu.has(emul::stub::probe::Deviation::StaleFip);
    for (way, name) in [(0, "CPL 0 on RAM"), (1, "CPL 3 on MMIO")] {
        let got = &r[way * EXACTNESS_VALUES..(way + 1) * EXACTNESS_VALUES];
        for i in 0..EXACTNESS_VALUES {
            let pointer =
                EXACTNESS_NAMES[i].starts_with("FIP") || EXACTNESS_NAMES[i].starts_with("FDP");
            if stale_pointers && pointer {
                println!(
                    "{}: not compared, this CPU's are stale (stale-fip)",
                    EXACTNESS_NAMES[i]
                );
                continue;
            }
            if got[i] != native[i] {
                bad.push(format!(
                    "{name}: {}: {:#x}, natively {:#x}",
                    EXACTNESS_NAMES[i], got[i], native[i]
                ));
            }
        }
    }
    eprintln!("native: {native:x?}");
    assert!(bad.is_empty(), "differs from the CPU:\n{}", bad.join("\n"));
    assert_eq!(r[3 * EXACTNESS_VALUES], 6, "vmovups ymm with XCR0 = 3: #UD");
}

/// The KVM-owned defects (README, Differential coverage): each CPL 0
/// result is either the CPU's (hardware KVM runs CPL 0 natively) or
/// exactly KVM's known mistake (PVM hosts interpret CPL 0 code with KVM's
/// emulator, which never exits to the VMM for these instructions).
#[test]
fn kvm_defects_are_kvms_own() {
    use guest::programs::exactness::DEFECT_NAMES;
    let p = common::program("kvm-defects");
    let (out, serial) = common::run_config(&common::config_for(&p));
    assert_eq!(
        out.status, p.expect.status,
        "{}; serial:\n{serial}",
        out.message
    );
    let r = &out.reports;
    let n = DEFECT_NAMES.len();
    assert_eq!(r.len(), 2 * n, "reports {r:x?}");
    // KVM's readings: LZCNT as BSR (bsr 1 = 0), TZCNT as BSF (a zero
    // source leaves EAX = 0x55), MOVBE #UD (6 << 32), CMPXCHG writing a
    // 32-bit destination on failure (upper half cleared).
    let kvm = [0, 0x55, 6 << 32, 1];
    // The CPU (measured natively at CPL 3, the same run).
    let cpu = &r[n..];
    assert_eq!(
        cpu,
        [31, 32, 0x4433_2211, 0x1234_5678_0000_0001],
        "native results"
    );
    for i in 0..n {
        let seen = r[i];
        let whose = if seen == cpu[i] {
            "the CPU's"
        } else if seen == kvm[i] {
            "KVM's known defect"
        } else {
            panic!(
                "{}: CPL 0 gave {seen:#x}, neither the CPU's {:#x} nor KVM's {:#x}",
                DEFECT_NAMES[i], cpu[i], kvm[i]
            );
        };
        eprintln!("{}: {seen:#x} ({whose})", DEFECT_NAMES[i]);
    }
}

/// Exception vector a guest reports when nothing was raised.
const NO_EXCEPTION: u64 = 0xff;

/// CPL 3 vector loads from MMIO end as the same loads from RAM after the
/// kernel's XSETBV turned AVX state off (xcr0-user), and XSAVE to MMIO
/// saves what XSAVE to RAM does. Where the CPU applies the guest's XCR0
/// (hardware KVM) both VEX loads raise #UD before they could exit; PVM
/// runs 64-bit CPL 3 code under the host's XCR0, so there they complete
/// and the VMM completes their MMIO twins without reading the guest's
/// XCR0 (no KVM_GET_XCRS). Before, the VMM raised #UD for them on PVM:
/// measured on AMD EPYC Zen 3 under PVM, RAM loads 0xff, MMIO loads 6, and
/// the MMIO XSAVE's XSTATE_BV 0x2 against RAM's 0x6.
#[test]
fn cpl3_vector_loads_and_xsave_on_mmio_end_as_on_ram_after_xsetbv() {
    const DATA: u64 = 0x0bad_cafe_f00d_d00d;
    let p = common::program("xcr0-user");
    let (out, serial) = run_config(&config_for(&p));
    assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
    let r = &out.reports;
    assert_eq!(r.len(), 12, "reports {r:x?}");
    let (xcr0, ram, mmio, low, bv_ram, bv_mmio) = (r[0], &r[1..4], &r[4..7], r[7], r[8], r[9]);
    let (bv_all_ram, bv_all_mmio) = (r[10], r[11]);
    println!(
        "CPL 3 XGETBV {xcr0:#x}; RAM {ram:x?}; MMIO {mmio:x?}; XSTATE_BV RAM {bv_ram:#x} \
         MMIO {bv_mmio:#x}; with 0x2e7 RAM {bv_all_ram:#x} MMIO {bv_all_mmio:#x}"
    );
    assert_eq!(ram[0], NO_EXCEPTION, "a legacy SSE load needs no AVX state");
    if common::kvm_kind().cpl0_native() {
        if xcr0 != 3 && emul::stub::probe::probe().is_ok_and(|c| c.is_tcg()) {
            // README, Hardware KVM: QEMU 7.2's SVM does not intercept
            // XSETBV, so KVM re-enters the guest with its own XCR0 while
            // KVM's record of the guest's says 3: the XSAVE family then
            // disagrees (QEMU 10 intercepts it and gives the CPU's answer).
            println!("QEMU TCG without an XSETBV intercept: CPL 3 XCR0 {xcr0:#x}");
            assert_eq!(mmio, ram, "MMIO loads against RAM loads");
            return;
        }
        assert_eq!(xcr0, 3, "the CPU runs CPL 3 code under the guest's XCR0");
        assert_eq!(ram[1..], [6, 6], "VEX loads from RAM raise #UD");
    } else {
        // What the VMM relies on: PVM's CPL 3 runs under the host's XCR0.
        assert_eq!(
            xcr0,
            emul::stub::host_xcr0(),
            "PVM: CPL 3 XCR0 is the host's"
        );
        assert_eq!(out.ioctls.get_xcrs, 0, "{:?}", out.ioctls);
    }
    assert_eq!(mmio, ram, "MMIO loads against RAM loads");
    if mmio[2] == NO_EXCEPTION {
        assert_eq!(low, DATA, "the completed loads' data");
    }
    assert_eq!(
        bv_mmio, bv_ram,
        "XSTATE_BV of XSAVE to MMIO against XSAVE to RAM"
    );
    // Asking for PKRU completes too (the VMM switches x87, SSE, AVX and
    // AVX-512 only): on PVM the native XSAVE also saves the host's PKRU,
    // the one component the emulated one leaves out (README, Behaviours
    // that differ); the guest's XCR0 used to leave out AVX as well.
    // Hi16_ZMM's bit is not compared either: on Intel a native XSAVE was
    // seen to report it in use with zero registers where KVM's image has
    // it clear (session 4's Intel run; open in issue 9).
    const PKRU: u64 = 1 << 9;
    const HI16_ZMM: u64 = 1 << 7;
    assert_eq!(
        bv_all_mmio & !HI16_ZMM,
        bv_all_ram & !(PKRU | HI16_ZMM),
        "XSTATE_BV of XSAVE 0x2e7 to MMIO against RAM (PKRU and Hi16_ZMM aside)"
    );
}

/// CR4.OSXMMEXCPT and CR0.AM (controls-user): an unmasked SSE exception
/// from MMIO and a misaligned x87 load with RFLAGS.AC end as from RAM.
/// Measured on AMD EPYC Zen 3 under PVM, whose CPL 3 runs under the host's
/// CR0 and CR4: RAM `divss` #XM (0x13) with the guest's OSXMMEXCPT clear,
/// where the VMM raised #UD for the MMIO twin before; `fld` #AC (0x11) with
/// the guest's CR0.AM clear on both (the CPU checks alignment before the
/// access can exit). On hardware KVM the guest's bits apply to both.
#[test]
fn cpl3_simd_exception_and_alignment_check_on_mmio_end_as_on_ram() {
    let p = common::program("controls-user");
    let (out, serial) = run_config(&config_for(&p));
    assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
    let r = &out.reports;
    assert_eq!(r.len(), 4, "reports {r:x?}");
    println!(
        "divss RAM {:#x} MMIO {:#x}; fld RAM {:#x} MMIO {:#x}",
        r[0], r[1], r[2], r[3]
    );
    if common::kvm_kind().cpl0_native() {
        // The guest's CR0.AM is clear. (Its OSXMMEXCPT decides #UD for
        // divss, except on QEMU's TCG, which raises no #XM at all.)
        assert_eq!(r[2], NO_EXCEPTION, "the guest's CR0 applies");
    }
    assert_eq!(r[1], r[0], "divss by zero: MMIO against RAM");
    assert_eq!(r[3], r[2], "misaligned fld with AC: MMIO against RAM");
}

/// The same for CR0.TS and CR0.EM (ts-user, em-user): AVX and x87 loads
/// from MMIO end as the same loads from RAM. On PVM the host's CR0 applies
/// to CPL 3 code and all of them complete; before, the VMM raised #NM (TS)
/// or #NM for x87 (EM) for the MMIO twins (measured on AMD EPYC Zen 3
/// under PVM: RAM 0xff 0xff 0xff, MMIO 7 7 7 and 6 0xff 7). The legacy SSE
/// load from MMIO is KVM's own (its emulator does SSE moves) and on PVM it
/// applies the guest's CR0 (#NM, #UD) where native CPL 3 code does not: a
/// PVM quirk the VMM never sees, compared only on hardware KVM.
#[test]
fn cpl3_loads_on_mmio_end_as_on_ram_with_cr0_ts_or_em_set() {
    for name in ["ts-user", "em-user"] {
        let p = common::program(name);
        let (out, serial) = run_config(&config_for(&p));
        assert_eq!(
            out.status, p.expect.status,
            "{name}: {}: {serial}",
            out.message
        );
        let r = &out.reports;
        assert_eq!(r.len(), 6, "{name}: reports {r:x?}");
        let (ram, mmio) = (&r[..3], &r[3..]);
        println!("{name}: RAM {ram:x?}, MMIO {mmio:x?}");
        if !common::kvm_kind().cpl0_native() {
            // What the VMM relies on: PVM's CPL 3 ignores the guest's CR0.
            assert_eq!(
                ram, [NO_EXCEPTION; 3],
                "{name}: PVM runs CPL 3 under the host's CR0"
            );
        }
        if common::kvm_kind().cpl0_native() {
            assert_eq!(mmio, ram, "{name}: MMIO loads against RAM loads");
        } else {
            assert_eq!(mmio[1..], ram[1..], "{name}: MMIO loads against RAM loads");
        }
    }
}

/// Where the CPU checked XCR0 before a VEX access could exit (hardware
/// KVM), or ran it under the host's XCR0 (PVM's CPL 3), completing vector
/// loads reads no XCR0; PVM's interpreted CPL 0 code reads it once per
/// VEX completion.
#[test]
fn xcr0_is_read_only_where_the_cpu_did_not_check_it() {
    const N: u32 = 100;
    let user = guest::programs::bench::user_vmovdqu(N).unwrap();
    let kernel = guest::programs::bench::vmovdqu(N).unwrap();
    for (p, cpl3) in [(user, true), (kernel, false)] {
        let (out, serial) = run_config(&config_for(&p));
        assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
        assert!(out.ioctls.get_xsave >= u64::from(N), "{:?}", out.ioctls);
        let want = if cpl3 || common::kvm_kind().cpl0_native() {
            0
        } else {
            u64::from(N)
        };
        assert_eq!(out.ioctls.get_xcrs, want, "{}: {:?}", p.name, out.ioctls);
    }
}
