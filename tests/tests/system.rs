//! System instructions at CPL 0 (`system-cpl0`): software interrupts reach
//! the guest's IDT with the return address after the instruction, and
//! XGETBV, CLAC/STAC, WBINVD, INVPCID and RDPRU behave as the guest's CPUID
//! says, with both CPUID models. LAR, LSL, VERR and VERW
//! (`descriptor-checks`) answer from the guest's own GDT and LDT.

mod common;

use guest::programs::system::{DESCRIPTOR_GARBAGE, DESCRIPTOR_SELECTORS, NO_VECTOR};
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

/// The guest's GDT and LDT (guest/src/programs/system.rs) read at CPL 0,
/// hand-derived from the SDM: per selector, LAR's and LSL's 32-bit results
/// (`None`: ZF clear, RAX kept) and VERR's and VERW's ZF. The register
/// and the MMIO forms must agree, which on hardware KVM compares the CPU
/// (register forms run natively at CPL 0) with the VMM (MMIO forms). LAR's
/// bits 19:16 are undefined in the SDM (AMD keeps the limit's top bits,
/// QEMU's TCG clears them), so they are compared between the forms only.
/// LAR's and LSL's 32-bit results (`None`: ZF clear), VERR's and VERW's ZF.
type Checks = (Option<u32>, Option<u32>, bool, bool);

#[test]
fn descriptor_checks_read_the_guests_tables() {
    let all = Some(0xffff_ffff);
    let fail = (None, None, false, false);
    let want: [(u16, Checks); 16] = [
        (0x00, fail),
        (0x08, (Some(0x00cf_9300), all, true, true)),
        (0x0b, fail),
        (0x10, (Some(0x0041_f100), Some(0x12345), true, false)),
        (0x18, (Some(0x00af_9b00), all, true, false)),
        (0x23, (Some(0x00af_9d00), all, false, false)),
        (0x28, (Some(0x00af_9900), all, false, false)),
        (0x32, (Some(0x00cf_d300), all, true, true)),
        (0x33, fail),
        (0x38, (Some(0x00cf_1300), all, true, true)),
        (0x43, fail),
        (0x50, (Some(0x0000_8900), Some(0x67), false, false)),
        (0x60, fail),
        (0x04, (Some(0x00cf_9300), all, true, true)),
        (0x0c, (Some(0x00af_9b00), all, true, false)),
        (0x14, fail),
    ];
    let p = common::program("descriptor-checks");
    let cfg = common::config_for(&p);
    let (out, serial) = common::run_config(&cfg);
    assert_eq!(out.status, p.expect.status, "{serial}");
    let r = out.reports;
    assert_eq!(r.len(), 8 * want.len(), "{serial}");
    let value = |v: Option<u32>| v.map_or(DESCRIPTOR_GARBAGE, u64::from);
    for (k, (sel, (lar, lsl, verr, verw))) in want.into_iter().enumerate() {
        assert_eq!(sel, DESCRIPTOR_SELECTORS[k]);
        let got = &r[8 * k..8 * k + 8];
        for (pair, what) in [(0, "LAR"), (2, "LSL"), (4, "VERR"), (6, "VERW")] {
            assert_eq!(
                got[pair],
                got[pair + 1],
                "{what} {sel:#x}: register against MMIO form"
            );
        }
        let limit_bits = if lar.is_some() { 0xf_0000 } else { 0 };
        assert_eq!(
            got[0] & !limit_bits,
            value(lar) & !limit_bits,
            "LAR {sel:#x}"
        );
        assert_eq!(got[2], value(lsl), "LSL {sel:#x}");
        assert_eq!(got[4], u64::from(verr), "VERR {sel:#x}");
        assert_eq!(got[6], u64::from(verw), "VERW {sel:#x}");
    }
}
