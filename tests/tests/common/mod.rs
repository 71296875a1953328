//! Shared helpers: run a scripted guest in-process or through the built
//! `vmm` binary.

#![allow(dead_code)]

use guest::Program;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use vmm::config::VmConfig;
use vmm::vm::VmOutcome;

/// Fails the test with one line when KVM is unusable: these tests must never
/// pass silently on a machine without /dev/kvm.
pub fn require_kvm() {
    if let Err(e) = vmm::vm::kvm_available() {
        panic!("KVM is required for this test: {e}");
    }
}

/// Which kind of KVM `/dev/kvm` is: the tests expect different things
/// from CPL 0 guest code on each (README, "Hardware KVM").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// PVM (`kvm_pvm`): KVM interprets all CPL 0 guest code, so every
    /// x87/SSE/AVX instruction and `xgetbv` at CPL 0 reaches the VMM.
    Pvm,
    /// Hardware virtualization (`kvm_amd`, `kvm_intel`): CPL 0 guest code
    /// runs natively; only MMIO, port I/O and what KVM's emulator gives up
    /// on reach the VMM.
    Hardware,
}

impl KvmKind {
    /// Whether guest CPL 0 code runs natively (without exits).
    pub fn cpl0_native(self) -> bool {
        self == KvmKind::Hardware
    }
}

/// The kind of KVM this host has, from the loaded modules (PVM hosts have
/// `kvm_pvm` and no SVM/VMX flag), printed once so every test log says it.
pub fn kvm_kind() -> KvmKind {
    static KIND: std::sync::OnceLock<KvmKind> = std::sync::OnceLock::new();
    *KIND.get_or_init(|| {
        let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let has_flag = |f: &str| {
            cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == f))
        };
        let kind = if module("kvm_pvm") {
            KvmKind::Pvm
        } else if module("kvm_amd") || module("kvm_intel") || has_flag("svm") || has_flag("vmx") {
            KvmKind::Hardware
        } else {
            panic!("cannot tell the KVM kind: no kvm_pvm, kvm_amd or kvm_intel module and no svm/vmx flag")
        };
        eprintln!("KVM kind: {kind:?}");
        kind
    })
}

/// A serial sink the test can read afterwards.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The VM configuration a program asks for: its `vmm run` arguments go
/// through the real command-line parser, so in-process runs and binary runs
/// mean the same thing.
pub fn config_for(p: &Program) -> VmConfig {
    use clap::Parser;
    let img = write_image(p);
    let mut argv = vec!["vmm".to_string(), "run".to_string()];
    argv.extend(p.vmm_args());
    argv.push(img.display().to_string());
    let cli = vmm::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{}: bad vmm arguments {argv:?}: {e}", p.name));
    let vmm::cli::Command::Run(args) = cli.command else {
        panic!("not a run command");
    };
    let mut cfg = args.to_config(cli.its).expect("config");
    cfg.image_name = p.name.to_string();
    cfg
}

/// Runs `cfg` in this process; returns the outcome and the serial output.
pub fn run_config(cfg: &VmConfig) -> (VmOutcome, String) {
    require_kvm();
    let cap = Capture::default();
    let out = vmm::vm::run(cfg, Box::new(cap.clone()))
        .unwrap_or_else(|e| panic!("VM set-up failed: {e}"));
    (out, cap.text())
}

pub fn program(name: &str) -> Program {
    guest::by_name(name).unwrap_or_else(|| panic!("no guest program {name}"))
}

/// Runs a catalogued program in-process and checks its stated outcome.
pub fn check_program(name: &str) -> (VmOutcome, String) {
    check_program_with(name, |_| {})
}

/// [`check_program`] with `tweak` applied to the program's configuration
/// (`--stats`, say).
pub fn check_program_with(name: &str, tweak: impl FnOnce(&mut VmConfig)) -> (VmOutcome, String) {
    let p = program(name);
    let mut cfg = config_for(&p);
    tweak(&mut cfg);
    let (out, serial) = run_config(&cfg);
    let expect = p.expect_for(kvm_kind().cpl0_native());
    assert_eq!(
        out.status, expect.status,
        "{name}: status ({}); serial:\n{serial}",
        out.message
    );
    assert!(
        serial.contains(expect.serial),
        "{name}: serial lacks {:?}:\n{serial}",
        expect.serial
    );
    if let Some(r) = &expect.reports {
        assert_eq!(
            &out.reports, r,
            "{name}: reports (as hex: {:x?})",
            out.reports
        );
    }
    (out, serial)
}

/// The real `vmm` binary (target/<profile>/vmm). Cargo only builds another
/// package's binaries for that package's own tests, so the first caller
/// builds it with the same cargo and profile that built this test.
pub fn vmm_bin() -> PathBuf {
    // Runners without cargo (scripts/hwkvm's initramfs) name the binary.
    if let Some(bin) = std::env::var_os("VMM_BIN") {
        return bin.into();
    }
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    BUILD.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "vmm", "--bin", "vmm"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build for the vmm binary");
        assert!(st.success(), "cargo build -p vmm failed");
    });
    dir.join("vmm")
}

/// A scratch directory for this test.
pub fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-tests-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Writes `p`'s image to a file of its own: tests of one binary run in
/// parallel, and one rewriting a shared path (truncate, then write) while
/// another's VM reads it gave "image file is empty".
fn write_image(p: &Program) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let img = scratch(p.name).join(format!("{}-{n}.bin", p.name));
    std::fs::write(&img, &p.image).expect("write image");
    img
}

/// Runs the `vmm` binary with `args`.
pub fn vmm(args: &[&str]) -> Output {
    require_kvm();
    Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("run vmm")
}

/// Writes `p` to a file and runs it through the binary with `extra` flags.
pub fn vmm_program(p: &Program, extra: &[&str]) -> Output {
    let img = write_image(p);
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(p.vmm_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(img.display().to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    vmm(&argv)
}

pub fn status(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// A minimal little-endian ELF executable with the given PT_LOAD segments
/// (paddr, bytes, memsz), 64- or 32-bit.
pub fn elf(class64: bool, entry: u64, segs: &[(u64, &[u8], u64)]) -> Vec<u8> {
    let (ehsize, phsize) = if class64 {
        (64usize, 56usize)
    } else {
        (52, 32)
    };
    let mut data_off = ehsize + phsize * segs.len();
    let mut out = vec![0u8; data_off];
    out[0..4].copy_from_slice(b"\x7fELF");
    out[4] = if class64 { 2 } else { 1 };
    out[5] = 1;
    out[6] = 1;
    let put16 =
        |o: &mut Vec<u8>, at: usize, v: u16| o[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |o: &mut Vec<u8>, at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut out, 16, 2); // ET_EXEC
    put16(&mut out, 18, if class64 { 62 } else { 3 });
    put32(&mut out, 20, 1);
    let mut file_data = Vec::new();
    for (i, (paddr, bytes, memsz)) in segs.iter().enumerate() {
        let ph = ehsize + i * phsize;
        if class64 {
            put32(&mut out, ph, 1);
            put32(&mut out, ph + 4, 7);
            put64(&mut out, ph + 8, data_off as u64);
            put64(&mut out, ph + 16, *paddr);
            put64(&mut out, ph + 24, *paddr);
            put64(&mut out, ph + 32, bytes.len() as u64);
            put64(&mut out, ph + 40, *memsz);
            put64(&mut out, ph + 48, 0x1000);
        } else {
            put32(&mut out, ph, 1);
            put32(&mut out, ph + 4, data_off as u32);
            put32(&mut out, ph + 8, *paddr as u32);
            put32(&mut out, ph + 12, *paddr as u32);
            put32(&mut out, ph + 16, bytes.len() as u32);
            put32(&mut out, ph + 20, *memsz as u32);
            put32(&mut out, ph + 24, 7);
            put32(&mut out, ph + 28, 0x1000);
        }
        file_data.extend_from_slice(bytes);
        data_off += bytes.len();
    }
    if class64 {
        put64(&mut out, 24, entry);
        put64(&mut out, 32, ehsize as u64);
        put16(&mut out, 52, ehsize as u16);
        put16(&mut out, 54, phsize as u16);
        put16(&mut out, 56, segs.len() as u16);
    } else {
        put32(&mut out, 24, entry as u32);
        put32(&mut out, 28, ehsize as u32);
        put16(&mut out, 40, ehsize as u16);
        put16(&mut out, 42, phsize as u16);
        put16(&mut out, 44, segs.len() as u16);
    }
    out.extend_from_slice(&file_data);
    out
}
