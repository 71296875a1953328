//! Which KVM the tests run on, and where the CPU under them departs from
//! the SDM: printed first by the hardware-KVM lane (scripts/hwkvm), so every
//! expectation that depends on either is named in its output.

mod common;

#[test]
fn report_kvm_kind_and_host_cpu() {
    common::require_kvm();
    let kind = common::kvm_kind();
    println!(
        "KVM kind: {kind:?} (guest CPL 0 code runs natively: {})",
        kind.cpl0_native()
    );
    let cpu = emul::stub::probe::probe().expect("CPU probes run");
    println!(
        "CPU: hypervisor signature {:?}, QEMU TCG: {}",
        cpu.hypervisor.as_deref().unwrap_or("none"),
        cpu.is_tcg()
    );
    for d in &cpu.deviations {
        println!("CPU departs from the SDM: {d}");
    }
    // Only an emulated CPU may depart; tests excuse departures there only.
    assert!(
        cpu.deviations.is_empty() || cpu.is_tcg(),
        "a CPU that is not QEMU's TCG departs from the SDM: {:?}",
        cpu.deviations
    );
}
