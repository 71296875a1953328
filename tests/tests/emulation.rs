//! The VMM's instruction completion seen end to end: refusals, injected
//! page faults, per-mnemonic statistics.
//!
//! `unsupported-insn` and `regonly-cpl0` run their instructions at CPL 0:
//! on PVM hosts they reach the VMM, on hardware KVM they run natively
//! without an exit, and the tests check that instead.

mod common;

use common::{config_for, program, run_config};
use vmm::vcpu::OnUnsupported;

/// On hardware KVM `xgetbv` at CPL 0 runs natively: the guest completes
/// (its native-CPL0 expectation) and the VMM sees no emulation exit.
fn xgetbv_runs_natively(cfg: &vmm::config::VmConfig) {
    let (out, serial) = run_config(cfg);
    assert_eq!(
        out.status,
        guest::rt::status_of(guest::rt::EXIT_PASS),
        "{}: {serial}",
        out.message
    );
    assert!(serial.contains("xgetbv completed"), "{serial}");
    println!("hardware KVM: xgetbv at CPL 0 ran natively");
}

#[test]
fn unsupported_instruction_stops_with_its_text() {
    if common::kvm_kind().cpl0_native() {
        return xgetbv_runs_natively(&config_for(&program("unsupported-insn")));
    }
    let (out, serial) = common::check_program("unsupported-insn");
    assert_eq!(out.status, vmm::status::UNSUPPORTED_INSTRUCTION);
    assert!(out.message.contains("xgetbv"), "{}", out.message);
    assert!(out.message.contains("rip 0x"), "{}", out.message);
    assert!(!serial.contains("xgetbv completed"));
}

#[test]
fn unsupported_instruction_can_raise_ud() {
    let p = program("unsupported-insn");
    let mut cfg = config_for(&p);
    cfg.on_unsupported = OnUnsupported::InjectUd;
    if common::kvm_kind().cpl0_native() {
        return xgetbv_runs_natively(&cfg);
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
    let want = if common::kvm_kind().cpl0_native() {
        guest::rt::status_of(guest::rt::EXIT_PASS) // xgetbv runs natively
    } else {
        guest::programs::emulation::UD_STATUS
    };
    assert_eq!(common::status(&o), want);
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
