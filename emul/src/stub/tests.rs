//! Tests of the whole machinery: running stubs, the ITS invariant, W^X,
//! fault recovery.

use super::*;

#[test]
fn selftest_passes_both_modes() {
    for its_on in [true, false] {
        let cases = selftest::run(its_on);
        for c in &cases {
            println!("{c}");
        }
        assert!(selftest::all_passed(&cases));
    }
}
