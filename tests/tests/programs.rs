//! Every scripted guest program, run in-process through the real VMM, must
//! produce the status, serial output and reported values it states.

mod common;

macro_rules! program_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                common::check_program($name);
            }
        )*

        #[test]
        fn catalogue_is_covered() {
            let tested = [$($name),*];
            for p in guest::all() {
                // `vmm bench` runs the bench guests (tests/tests/bench.rs).
                if p.name.starts_with(guest::programs::bench::BENCH_PREFIX) {
                    continue;
                }
                assert!(tested.contains(&p.name) || TESTED_ELSEWHERE.contains(&p.name), "program {} has no test", p.name);
            }
        }
    };
}

/// Programs whose tests need more than `check_program` (a module file, a
/// signal) live in other test files.
const TESTED_ELSEWHERE: &[&str] = &[
    "smp-cmpxchg16b",
    "spin",
    "multiboot-info",
    "testdev-ports",
    "unsupported-insn",
    "emul-page-fault",
    "cpuid-leaves",
    "masked-fault-suppression",
    "system-cpl0",
    "descriptor-checks",
    "bios-state",
    "mxcsr-cpl0",
    "vector-unchanged",
    "mmio-split-windows",
    "exactness",
    "kvm-defects",
    "xcr0-user",
    "ts-user",
    "em-user",
    "controls-user",
];

program_tests! {
    hello_real => "hello-real",
    hello_protected => "hello-protected",
    hello_long => "hello-long",
    halt => "halt",
    i8042_reset => "i8042-reset",
    triple_fault => "triple-fault",
    pio_widths => "pio-widths",
    rep_string_io => "rep-string-io",
    mmio_widths => "mmio-widths",
    mmio_user_sse => "mmio-user-sse",
    mmio_cross_page => "mmio-cross-page",
    user_simd => "user-simd",
    user_exception => "user-exception",
    regonly_cpl0 => "regonly-cpl0",
    arpl_protected => "arpl-protected",
    testdev_irq => "testdev-irq",
    smp_2 => "smp-2",
    smp_4 => "smp-4",
    smp_cmpxchg16b_native_writer => "smp-cmpxchg16b-native-writer",
    acpi_s3 => "acpi-s3",
    vector_across_exits => "vector-across-exits",
}

/// Two vCPUs' `lock cmpxchg16b` loops on one counter lose no increment.
/// Where CPL 0 code is interpreted (PVM) each CMPXCHG16B is completed by
/// the VMM, at least once per increment (more where a vCPU's compare
/// failed), so this checks the emulator's locked write; where it runs
/// natively (hardware KVM) it checks the program.
#[test]
fn smp_cmpxchg16b_loses_no_increment() {
    let (out, serial) = common::check_program_with("smp-cmpxchg16b", |cfg| cfg.stats = true);
    let emulated = out
        .emulated
        .iter()
        .find(|(m, _)| *m == iced_x86::Mnemonic::Cmpxchg16b)
        .map_or(0, |e| e.1);
    if common::kvm_kind().cpl0_native() {
        eprintln!("CPL 0 runs natively here: {emulated} CMPXCHG16B emulated");
    } else {
        assert!(emulated >= out.reports[1], "{emulated} emulated:\n{serial}");
    }
}

#[test]
fn user_exception_reports_vector_error_and_rip() {
    let (out, serial) = common::check_program("user-exception");
    assert_eq!(out.reports.len(), 3, "{serial}");
    assert_eq!(out.reports[0], 6, "#UD");
    assert_eq!(out.reports[1], 0, "no error code");
    let image_end = 0x10_0000 + common::program("user-exception").image.len() as u64;
    assert!(
        (0x10_0000..image_end).contains(&out.reports[2]),
        "rip {:#x} inside the image",
        out.reports[2]
    );
}

#[test]
fn mmio_traffic_is_really_exits() {
    // 16-byte SSE store and load on MMIO arrive as two 8-byte exits each.
    let p = common::program("mmio-user-sse");
    let mut cfg = common::config_for(&p);
    cfg.stats = true;
    let (out, _) = common::run_config(&cfg);
    let stats = out.stats.expect("stats report").report();
    let count = |reason: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.starts_with(reason))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("mmio-write"), 2, "{stats}");
    assert_eq!(count("mmio-read"), 3, "{stats}");
}

/// `--cpu kvm` shows KVM's supported list plus the hypervisor bit; `--cpu
/// host` shows the host's own leaves 1 and 7 (minus VMX/SMX, OSXSAVE from
/// CR4), so the guest sees everything CPL 3 code can run natively.
#[test]
fn cpu_host_exposes_the_hosts_leaves() {
    use core::arch::x86_64::__cpuid_count;
    let p = common::program("cpuid-leaves");
    let run = |model: vmm::kvm::cpuid::CpuModel| {
        let mut cfg = common::config_for(&p);
        cfg.cpu = model;
        let (out, serial) = common::run_config(&cfg);
        assert_eq!(out.status, p.expect.status, "{serial}");
        out.reports
    };
    let host1 = __cpuid_count(1, 0);
    let host7 = __cpuid_count(7, 0);
    const HYPERVISOR: u64 = 1 << 31;
    let host = run(vmm::kvm::cpuid::CpuModel::Host);
    assert_eq!(host.len(), 4);
    assert_ne!(host[0] & HYPERVISOR, 0, "hypervisor bit");
    // The features the README promises `--cpu host` passes through (KVM
    // may still filter a few others, e.g. INVPCID under PVM).
    let leaf1_ecx = [
        (12, "FMA"),
        (19, "SSE4.1"),
        (20, "SSE4.2"),
        (23, "POPCNT"),
        (26, "XSAVE"),
        (28, "AVX"),
    ];
    for (bit, name) in leaf1_ecx {
        assert_eq!(
            host[0] >> bit & 1,
            u64::from(host1.ecx >> bit & 1),
            "{name}"
        );
    }
    let leaf7_ebx = [
        (3, "BMI1"),
        (5, "AVX2"),
        (8, "BMI2"),
        (16, "AVX512F"),
        (19, "ADX"),
        (30, "AVX512BW"),
    ];
    for (bit, name) in leaf7_ebx {
        assert_eq!(
            host[2] >> bit & 1,
            u64::from(host7.ebx >> bit & 1),
            "{name}"
        );
    }
    assert_eq!(host[1] as u32, host1.edx, "leaf 1 EDX");
    let kvm = run(vmm::kvm::cpuid::CpuModel::Kvm);
    assert_ne!(kvm[0] & HYPERVISOR, 0, "hypervisor bit");
    // KVM's list is a subset of the host's features, except TSC_ADJUST
    // (leaf 7 EBX bit 1): KVM emulates the MSR and advertises it where the
    // host CPU lacks it (seen on AMD hosts and under nested SVM).
    const TSC_ADJUST: u32 = 1 << 1;
    assert_eq!(
        kvm[2] as u32 & !host7.ebx & !TSC_ADJUST,
        0,
        "leaf 7 EBX within the host's"
    );
}

/// Accesses across two adjacent MMIO windows and unassigned space are
/// split byte by byte, for KVM's exits and for the VMM's emulated AVX moves.
#[test]
fn mmio_access_is_split_across_windows() {
    if !std::arch::is_x86_feature_detected!("avx2") {
        eprintln!("skipped: the host has no AVX2, the program's vextracti128 needs it");
        return;
    }
    common::check_program("mmio-split-windows");
}
