//! Everything that describes one VM run, independent of how it was asked
//! for (command line or in-process tests).

use crate::boot::EntryMode;
use crate::bus::{MmioDevice, PioDevice};
use crate::kvm::cpuid::CpuModel;
use crate::layout;
use crate::loader::ImageFormat;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A device an embedder (the benchmark, tests) adds to the port bus.
#[derive(Clone)]
pub struct ExtraPio {
    pub base: u16,
    pub len: u16,
    pub device: Arc<Mutex<dyn PioDevice>>,
}

/// A device an embedder adds to the MMIO bus.
#[derive(Clone)]
pub struct ExtraMmio {
    pub base: u64,
    pub len: u64,
    pub device: Arc<Mutex<dyn MmioDevice>>,
}

impl std::fmt::Debug for ExtraPio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtraPio({:#x}+{:#x})", self.base, self.len)
    }
}

impl std::fmt::Debug for ExtraMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtraMmio({:#x}+{:#x})", self.base, self.len)
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The guest image bytes and a name for messages.
    pub image: Vec<u8>,
    pub image_name: String,
    pub mem_size: u64,
    pub format: ImageFormat,
    pub load_addr: u64,
    pub entry: Option<u64>,
    pub mode: EntryMode,
    /// `--mmio-ram` windows as (address, size).
    pub mmio_ram: Vec<(u64, u64)>,
    pub trace: Option<PathBuf>,
    pub stats: bool,
    pub cpu: CpuModel,
    pub its: emul::stub::ItsMode,
    /// Guest-physical ranges to copy out when the VM ends (tests read result
    /// tables the guest wrote there).
    pub dump_ranges: Vec<(u64, u64)>,
    /// What to do with an instruction the emulator does not allow.
    pub on_unsupported: crate::vcpu::OnUnsupported,
    /// Number of vCPUs; the application processors wait for INIT/SIPI.
    pub cpus: u8,
    /// Multiboot command line (default: the image name).
    pub cmdline: Option<String>,
    /// Multiboot module 0: (name, bytes).
    pub initrd: Option<(String, Vec<u8>)>,
    /// QEMU-compatible test devices (`--device`, `--testdev`).
    pub test_devices: Vec<TestDevice>,
    /// Devices added by an embedder, beside the standard ones.
    pub extra_pio: Vec<ExtraPio>,
    pub extra_mmio: Vec<ExtraMmio>,
    /// `vmm bench`'s same-image floor: vCPUs run a bare KVM_RUN loop
    /// (`Vcpu::run_bare`) instead of serving exits.
    pub bare_loop: bool,
}

impl VmConfig {
    /// A config with the CLI's defaults for `image`.
    pub fn new(image: Vec<u8>) -> Self {
        VmConfig {
            image,
            image_name: "<memory>".into(),
            mem_size: 128 << 20,
            format: ImageFormat::Auto,
            load_addr: layout::DEFAULT_LOAD_ADDR,
            entry: None,
            mode: EntryMode::Long,
            mmio_ram: Vec::new(),
            trace: None,
            stats: false,
            cpu: CpuModel::Kvm,
            its: emul::stub::ItsMode::Auto,
            extra_pio: Vec::new(),
            extra_mmio: Vec::new(),
            dump_ranges: Vec::new(),
            on_unsupported: crate::vcpu::OnUnsupported::Stop,
            cpus: 1,
            cmdline: None,
            initrd: None,
            test_devices: Vec::new(),
            bare_loop: false,
        }
    }

    /// The in-kernel LAPIC/IOAPIC/PIC/PIT are needed for SMP and for the
    /// test devices' interrupt lines.
    pub fn irqchip(&self) -> bool {
        self.cpus > 1 || !self.test_devices.is_empty()
    }

    /// Whether the guest gets ACPI tables (for the PM timer and the MADT).
    pub fn acpi(&self) -> bool {
        self.test_devices.contains(&TestDevice::AcpiPm)
    }
}

/// The QEMU-compatible devices kvm-unit-tests expect, named like QEMU's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestDevice {
    /// `pc-testdev`: latch on 0xe0, IRQ lines at 0x2000, MMIO buffer at 0xff000000.
    PcTestdev,
    /// `fw_cfg` on ports 0x510/0x511.
    FwCfg,
    /// ACPI tables in the BIOS area and the PM timer at port 0x608.
    AcpiPm,
}

impl TestDevice {
    pub const ALL: [TestDevice; 3] = [TestDevice::PcTestdev, TestDevice::FwCfg, TestDevice::AcpiPm];
}

impl std::str::FromStr for TestDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pc-testdev" => Ok(TestDevice::PcTestdev),
            "fw_cfg" | "fw-cfg" => Ok(TestDevice::FwCfg),
            "acpi-pm" => Ok(TestDevice::AcpiPm),
            _ => Err(format!(
                "unknown device '{s}' (expected pc-testdev, fw_cfg or acpi-pm)"
            )),
        }
    }
}

/// Parses a size with an optional K/M/G suffix ("128M", "0x1000", "4096").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.as_bytes().last() {
        Some(b'K' | b'k') => (&t[..t.len() - 1], 10),
        Some(b'M' | b'm') => (&t[..t.len() - 1], 20),
        Some(b'G' | b'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n = parse_u64(num).map_err(|_| {
        format!("invalid size '{s}' (expected a number with an optional K, M or G suffix)")
    })?;
    n.checked_mul(1u64 << shift)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("size '{s}' is zero or too large"))
}

/// Parses a hex (0x prefix) or decimal address.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    parse_u64(s.trim())
        .map_err(|_| format!("invalid address '{s}' (expected hex with a 0x prefix, or decimal)"))
}

fn parse_u64(s: &str) -> Result<u64, std::num::ParseIntError> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
}

/// Parses `ADDR:SIZE` for `--mmio-ram`.
pub fn parse_window(s: &str) -> Result<(u64, u64), String> {
    let (a, z) = s
        .split_once(':')
        .ok_or_else(|| format!("invalid window '{s}' (expected ADDR:SIZE, e.g. 0xd0000000:64K)"))?;
    let addr = parse_addr(a)?;
    let size = parse_size(z)?;
    addr.checked_add(size)
        .ok_or_else(|| format!("window '{s}' wraps around the address space"))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_addresses() {
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert_eq!(parse_addr("0x100000"), Ok(0x100000));
        assert!(parse_addr("zz").is_err());
        assert_eq!(parse_window("0xd0000000:64K"), Ok((0xd000_0000, 65536)));
        assert!(parse_window("0xd0000000").is_err());
        assert!(parse_window("0xffffffffffffffff:2").is_err());
    }
}
