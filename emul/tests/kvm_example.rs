//! Runs `examples/kvm_vector_mmio.rs`, the self-contained VMM that shows how
//! to use this crate from another VMM: it must complete the guest's SSE
//! arithmetic on MMIO through `Emulator::emulate` and see the right result.
//! Needs read-write /dev/kvm, like the workspace's other VM tests.

use std::path::PathBuf;
use std::process::Command;

/// The example binary, built with the cargo and profile that built this
/// test (a `cargo test --test kvm_example` run does not build examples).
fn example_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "emul",
        "--example",
        "kvm_vector_mmio",
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo build for the example");
    assert!(st.success(), "cargo build --example kvm_vector_mmio failed");
    profile_dir.join("examples").join("kvm_vector_mmio")
}

#[test]
fn example_vmm_completes_sse_arithmetic_on_mmio() {
    let o = Command::new(example_bin())
        .output()
        .expect("run the example");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(0),
        "the example failed (status 2 means /dev/kvm is missing or not read-write):\n{out}{err}"
    );
    // Both `addps xmm0, [mmio]` went through Emulator::emulate, and the
    // `movups` store of their sum reached the device.
    assert_eq!(out.matches("emulated Addps").count(), 2, "{out}");
    assert!(
        out.contains("device received [2.0, 4.0, 6.0, 8.0]"),
        "{out}"
    );
}
