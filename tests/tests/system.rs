//! System instructions at CPL 0 (`system-cpl0`): software interrupts reach
//! the guest's IDT with the return address after the instruction, and
//! XGETBV, CLAC/STAC, WBINVD, INVPCID and RDPRU behave as the guest's CPUID
//! says, with both CPUID models.

mod common;

use guest::programs::system::NO_VECTOR;
use vmm::kvm::cpuid::CpuModel;

const UD: u64 = 6;
const GP: u64 = 13;

fn run(model: CpuModel) -> Vec<u64> {
    let p = common::program("system-cpl0");
    let mut cfg = common::config_for(&p);
    cfg.cpu = model;
    let (out, serial) = common::run_config(&cfg);
    assert_eq!(out.status, p.expect.status, "{model:?}: {serial}");
    assert_eq!(out.reports.len(), 16, "{model:?}: {serial}");
    out.reports
}

#[test]
fn system_instructions_follow_the_sdm_and_the_guest_cpuid() {
    for model in [CpuModel::Kvm, CpuModel::Host] {
        let r = run(model);
        assert_eq!(r[0], 3, "{model:?}: int3 vector");
        assert_eq!(r[1], 0, "{model:?}: int3 returns after itself");
        assert_eq!(r[2], 0x20, "{model:?}: int 0x20 vector");
        assert_eq!(r[3], 0, "{model:?}: int 0x20 returns after itself");
        assert_eq!(r[4], r[5], "{model:?}: XGETBV(0) is the XCR0 set at entry");
        assert_ne!(r[4] & 1, 0, "{model:?}: XCR0.x87");
        assert_eq!(r[6], GP, "{model:?}: XGETBV(2) raises #GP");
        let smap = r[7] >> 20 & 1 != 0;
        if smap {
            assert_eq!((r[8], r[9]), (NO_VECTOR, 1), "{model:?}: STAC sets AC");
            assert_eq!((r[10], r[11]), (NO_VECTOR, 0), "{model:?}: CLAC clears AC");
        } else {
            assert_eq!((r[8], r[9]), (UD, 0), "{model:?}: STAC without SMAP");
            assert_eq!((r[10], r[11]), (UD, 0), "{model:?}: CLAC without SMAP");
        }
        assert_eq!(r[12], NO_VECTOR, "{model:?}: WBINVD completes at CPL 0");
        let invpcid = r[7] >> 10 & 1 != 0;
        let want = if invpcid { NO_VECTOR } else { UD };
        assert_eq!(r[13], want, "{model:?}: INVPCID (CPUID has it: {invpcid})");
        let rdpru = r[14] >> 4 & 1 != 0;
        if !rdpru {
            assert_eq!(r[15], UD, "{model:?}: RDPRU without the CPUID bit");
        }
    }
}
