//! kvm-unit-tests' view of the VMM: Multiboot loading and information, the
//! QEMU-compatible test devices, and stopping the VM from outside.

mod common;

use common::{config_for, program, run_config, scratch, status, vmm_program};
use std::time::{Duration, Instant};

const INITRD: &[u8] = b"INITRD0123456789";

#[test]
fn multiboot_info_in_process() {
    let p = program("multiboot-info");
    let mut cfg = config_for(&p);
    cfg.initrd = Some(("initrd".into(), INITRD.to_vec()));
    let (out, serial) = run_config(&cfg);
    assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
    assert_eq!(
        Some(&out.reports),
        p.expect.reports.as_ref(),
        "{:x?}",
        out.reports
    );
}

#[test]
fn multiboot_info_through_the_binary() {
    let p = program("multiboot-info");
    let dir = scratch("mb-initrd");
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, INITRD).unwrap();
    let o = vmm_program(&p, &["--initrd", initrd.to_str().unwrap()]);
    assert_eq!(
        status(&o),
        p.expect.status,
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains(p.expect.serial));
}

#[test]
fn fw_cfg_latch_iomem_and_pm_timer() {
    let p = program("testdev-ports");
    let (out, serial) = run_config(&config_for(&p));
    assert_eq!(out.status, p.expect.status, "{}: {serial}", out.message);
    let r = &out.reports;
    assert_eq!(r.len(), 6, "{r:x?}");
    assert_eq!(
        r[0],
        u64::from(u32::from_le_bytes(*b"QEMU")),
        "fw_cfg signature"
    );
    assert_eq!(r[1], 2, "fw_cfg NB_CPUS with --cpus 2");
    assert_eq!(r[2], 128 << 20, "fw_cfg RAM size");
    assert_eq!(r[3], 0x1234_5678, "pc-testdev latch");
    assert_eq!(r[4], 0xcafe_babe, "pc-testdev MMIO buffer");
    // ~100 interpreted instructions at 3.58 MHz: a few ticks to a few
    // thousand; zero would mean a stopped timer.
    assert!(r[5] > 0 && r[5] < 10_000_000, "PM timer delta {}", r[5]);
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let p = program("spin");
    let dir = scratch("spin");
    let img = dir.join("spin.bin");
    std::fs::write(&img, &p.image).unwrap();
    common::require_kvm();
    let mut child = std::process::Command::new(common::vmm_bin())
        .arg("run")
        .args(p.vmm_args())
        .arg(&img)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Signal once the guest runs (its first serial line), not after a fixed
    // delay: under an emulated CPU start-up can take longer than any guess.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert!(first.contains("spinning"), "{first}");
    // SAFETY-free: kill(2) through the libc-less std API is not available,
    // so use the `kill` command.
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "vmm did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        status(&o),
        p.expect.status,
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("SIGINT/SIGTERM"), "{err}");
    // The end line says where each vCPU was: in the spin loop, inside the
    // image at the load address.
    assert!(err.contains("vcpu 0 at rip 0x1000"), "{err}");
}

/// With the in-kernel irqchip HLT never exits to userspace; the VMM's halt
/// probe still ends a VM whose vCPUs are all halted with interrupts off
/// (here the BSP) or were never started (the AP).
#[test]
fn halt_with_irqchip_ends_the_vm() {
    let p = program("halt");
    let mut cfg = config_for(&p);
    cfg.test_devices = vmm::config::TestDevice::ALL.to_vec();
    cfg.cpus = 2;
    let t = Instant::now();
    let (out, serial) = run_config(&cfg);
    assert_eq!(out.status, 0, "{}", out.message);
    assert!(
        out.message.contains("halted with interrupts off"),
        "{}",
        out.message
    );
    assert!(serial.contains("halting"));
    assert!(t.elapsed() < Duration::from_secs(10));
}
