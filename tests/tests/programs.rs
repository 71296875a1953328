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
    "spin",
    "multiboot-info",
    "testdev-ports",
    "unsupported-insn",
    "emul-page-fault",
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
    testdev_irq => "testdev-irq",
    smp_2 => "smp-2",
    smp_4 => "smp-4",
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
