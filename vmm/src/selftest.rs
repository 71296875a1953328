//! `vmm selftest` and the start-up check: the stub machinery must turn every
//! fault into the expected exception, with the ITS mitigation on and off,
//! before the VMM trusts it with a guest.

use crate::status;

/// Runs every case with ITS on and off; returns the report lines and
/// whether all matched.
pub fn run_all() -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    for its_on in [false, true] {
        let cases = emul::stub::selftest::run(its_on);
        ok &= emul::stub::selftest::all_passed(&cases);
        lines.extend(
            cases
                .iter()
                .map(|c| format!("its={}: {c}", if its_on { "on " } else { "off" })),
        );
    }
    (lines, ok)
}

/// `vmm selftest`: one line per case, status 0 only if all match.
pub fn print_and_check() -> i32 {
    let (lines, ok) = run_all();
    for l in &lines {
        println!("{l}");
    }
    if ok {
        println!("selftest: all cases passed");
        0
    } else {
        println!("selftest: FAILED");
        status::SELFTEST_FAILED
    }
}
