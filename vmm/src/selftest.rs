//! `vmm selftest` and the start-up check: the stub machinery must turn every
//! fault into the expected exception, with the ITS mitigation on and off,
//! before the VMM trusts it with a guest.

use crate::status;
use emul::stub::probe::HostCpu;

/// The host CPU's departures from the SDM, probed once per process. A
/// probe that cannot run reports none (so nothing is excused).
pub fn host_cpu() -> &'static HostCpu {
    static CPU: std::sync::OnceLock<HostCpu> = std::sync::OnceLock::new();
    CPU.get_or_init(|| emul::stub::probe::probe().unwrap_or_default())
}

/// Runs every case with ITS on and off; returns the report lines and
/// whether all matched.
pub fn run_all() -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    for its_on in [false, true] {
        let cases = emul::stub::selftest::run(its_on);
        ok &= emul::stub::selftest::all_passed(&cases);
        lines.extend(cases.iter().map(|c| {
            let its = if its_on { "on " } else { "off" };
            match emul::stub::selftest::explained_by(c, host_cpu()) {
                Some(d) => format!("its={its}: {c} (the host CPU's own behaviour: {d})"),
                None => format!("its={its}: {c}"),
            }
        }));
    }
    (lines, ok)
}

/// `vmm selftest`: one line per case, status 0 only if all match.
pub fn print_and_check() -> i32 {
    let (lines, ok) = run_all();
    for l in &lines {
        println!("{l}");
    }
    let cpu = host_cpu();
    if !cpu.deviations.is_empty() {
        let names: Vec<String> = cpu.deviations.iter().map(|d| d.to_string()).collect();
        println!(
            "host CPU (hypervisor signature {:?}) departs from the SDM: {}",
            cpu.hypervisor.as_deref().unwrap_or("none"),
            names.join(", ")
        );
        if cpu.is_tcg() {
            println!("selftest: QEMU TCG's departures are accepted by `vmm run`; guests see them natively too");
        }
    }
    if ok {
        println!("selftest: all cases passed");
        0
    } else {
        println!("selftest: FAILED");
        status::SELFTEST_FAILED
    }
}
