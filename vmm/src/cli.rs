//! The command line: `vmm run`, `vmm selftest`, `vmm bench`.

use crate::boot::EntryMode;
use crate::config::{parse_addr, parse_size, parse_window, TestDevice, VmConfig};
use crate::kvm::cpuid::CpuModel;
use crate::loader::ImageFormat;
use crate::vcpu::OnUnsupported;
use clap::{Args, Parser, Subcommand};
use emul::stub::ItsMode;
use std::path::{Path, PathBuf};

#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM micro-VMM that completes the guest instructions KVM cannot emulate"
)]
pub struct Cli {
    /// More logging (info; twice for debug). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// ITS mitigation for the emulator's stubs.
    #[arg(long, global = true, default_value = "auto", value_parser = parse_its)]
    pub its: ItsMode,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a guest image.
    #[command(after_help = crate::status::HELP)]
    Run(RunArgs),
    /// Build and run the stub self-test cases with ITS on and off.
    Selftest,
    /// Measure the round trip per exit of each path against a bare KVM_RUN floor.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Exits per run and path.
    #[arg(long, default_value_t = crate::bench::DEFAULT_ITERS, value_parser = clap::value_parser!(u32).range(1..))]
    pub iters: u32,
    /// Floor/VMM alternations per path.
    #[arg(long, default_value_t = crate::bench::DEFAULT_RUNS, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Write the results as JSON to FILE.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the latency spread of every path as SVG to FILE.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Run only the groups holding these paths (comma-separated names as
    /// the report prints them; a path brings its floors along).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

impl BenchArgs {
    pub fn to_options(&self, its: ItsMode) -> crate::bench::BenchOptions {
        crate::bench::BenchOptions {
            iters: self.iters,
            runs: self.runs,
            json: self.json.clone(),
            svg: self.svg.clone(),
            its,
            only: self.only.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest RAM (K/M/G suffixes), a multiple of 4 KiB; the image and
    /// --initrd must each fit in it.
    #[arg(long, default_value = "128M", value_parser = parse_mem)]
    pub mem: u64,
    /// Image format: auto, flat, elf, multiboot.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    pub format: ImageFormat,
    /// Load address of flat images.
    #[arg(long, default_value = "0x100000", value_parser = parse_addr)]
    pub load_addr: u64,
    /// Entry point (default: the load address, or the image's entry point).
    #[arg(long, value_parser = parse_addr)]
    pub entry: Option<u64>,
    /// CPU state at entry: real, protected, long.
    #[arg(long, default_value = "long", value_parser = parse_mode)]
    pub mode: EntryMode,
    /// A RAM-like MMIO window ADDR:SIZE (repeatable; backed lazily, 4 GiB in
    /// all at most).
    #[arg(long = "mmio-ram", value_parser = parse_window)]
    pub mmio_ram: Vec<(u64, u64)>,
    /// Write one JSON line per exit to FILE.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Print exit counts and latency percentiles on stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// Guest CPUID: kvm (KVM's supported list) or host (the host's leaves 1, 7, 0xD).
    #[arg(long, default_value = "kvm", value_parser = parse_cpu)]
    pub cpu: CpuModel,
    /// Number of vCPUs (application processors start on INIT/SIPI).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub cpus: u8,
    /// Multiboot command line (by convention its first word is the program name).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// A file passed to a Multiboot kernel as module 0.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// A QEMU-compatible test device: pc-testdev, fw_cfg, acpi-pm (repeatable).
    #[arg(long = "device", value_parser = parse_device)]
    pub devices: Vec<TestDevice>,
    /// Every test device kvm-unit-tests expects (pc-testdev, fw_cfg, acpi-pm).
    #[arg(long)]
    pub testdev: bool,
    /// An instruction outside the emulator's allow-list: stop the VM, or
    /// inject #UD.
    #[arg(long, default_value = "stop", value_parser = parse_on_unsupported)]
    pub on_unsupported: OnUnsupported,
    /// The guest image.
    pub image: PathBuf,
}

fn parse_its(s: &str) -> Result<ItsMode, String> {
    match s {
        "auto" => Ok(ItsMode::Auto),
        "on" => Ok(ItsMode::On),
        "off" => Ok(ItsMode::Off),
        _ => Err(format!("unknown ITS mode '{s}' (expected auto, on or off)")),
    }
}

/// `--mem`: a size KVM can map, in whole 4 KiB pages.
fn parse_mem(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if !size.is_multiple_of(4096) {
        return Err(format!(
            "{size:#x} bytes is not a multiple of 4 KiB (KVM maps guest RAM in whole pages)"
        ));
    }
    Ok(size)
}

fn parse_format(s: &str) -> Result<ImageFormat, String> {
    s.parse()
        .map_err(|e: crate::loader::UnknownImageFormat| e.to_string())
}

fn parse_on_unsupported(s: &str) -> Result<OnUnsupported, String> {
    match s {
        "stop" => Ok(OnUnsupported::Stop),
        "ud" => Ok(OnUnsupported::InjectUd),
        _ => Err(format!(
            "unknown --on-unsupported '{s}' (expected stop or ud)"
        )),
    }
}

fn parse_device(s: &str) -> Result<TestDevice, String> {
    s.parse()
}

fn parse_mode(s: &str) -> Result<EntryMode, String> {
    s.parse()
}

fn parse_cpu(s: &str) -> Result<CpuModel, String> {
    s.parse()
}

impl RunArgs {
    /// The VM description, with the image read from disk.
    pub fn to_config(&self, its: ItsMode) -> Result<VmConfig, String> {
        // Nothing larger than guest RAM can be loaded: refuse it before
        // reading, and stop reading there for files whose size the metadata
        // does not tell (/dev/zero, pipes).
        let image = read_bounded(&self.image, "image", self.mem)?;
        let mut cfg = VmConfig::new(image);
        cfg.image_name = self.image.display().to_string();
        cfg.mem_size = self.mem;
        cfg.format = self.format;
        cfg.load_addr = self.load_addr;
        cfg.entry = self.entry;
        cfg.mode = self.mode;
        cfg.mmio_ram = self.mmio_ram.clone();
        cfg.trace = self.trace.clone();
        cfg.stats = self.stats;
        cfg.cpu = self.cpu;
        cfg.its = its;
        cfg.cpus = self.cpus;
        cfg.on_unsupported = self.on_unsupported;
        cfg.cmdline = self.cmdline.clone();
        if let Some(p) = &self.initrd {
            let data = read_bounded(p, "initrd", self.mem)?;
            cfg.initrd = Some((p.display().to_string(), data));
        }
        cfg.test_devices = if self.testdev {
            TestDevice::ALL.to_vec()
        } else {
            let mut d = self.devices.clone();
            d.dedup();
            d
        };
        Ok(cfg)
    }
}

/// Reads the file at `path`, refusing one of more than `limit` bytes (the
/// guest's RAM) before reading it, and reading at most `limit + 1` bytes of
/// files that do not know their size.
pub fn read_bounded(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let name = path.display();
    let too_large = || {
        format!(
            "{what} {name} is larger than guest RAM ({limit:#x} bytes, --mem); it cannot be loaded"
        )
    };
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {what} {name}: {e}"))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > limit {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(len as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read {what} {name}: {e}"))?;
    if data.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(data)
}
