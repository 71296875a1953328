//! A real-mode guest with the in-kernel irqchip finds what a BIOS leaves
//! (`bios-state`): SeaBIOS's 8259 masks, the 18.2 Hz timer waking `hlt`
//! through the IVT's handler, the RTC's status registers and the CMOS
//! memory size.

mod common;

#[test]
fn real_mode_guest_finds_the_bios_leftovers() {
    let p = common::program("bios-state");
    let cfg = common::config_for(&p);
    let (out, serial) = common::run_config(&cfg);
    assert_eq!(out.status, p.expect.status, "{serial}");
    let r = out.reports;
    assert_eq!(r.len(), 8, "{serial}");
    assert_eq!(r[0], 0xfa, "master IMR: IRQ 0 and 2 open");
    assert_eq!(r[1], 0xfe, "slave IMR: IRQ 8 open");
    assert!(
        r[2] >= 1,
        "two hlt wake-ups count at least one timer tick, got {}",
        r[2]
    );
    assert_eq!(r[3], 0x26, "RTC A: 32.768 kHz base, 1024 Hz rate");
    assert_eq!(r[4], 0x02, "RTC B: 24-hour BCD");
    assert_eq!(r[5], 0x80, "RTC D: valid RAM and time");
    assert_eq!(r[6], 640, "CMOS base memory, KiB");
    assert!(r[7] < 0x60 && r[7] & 0xf < 10, "BCD seconds {:#x}", r[7]);
}
