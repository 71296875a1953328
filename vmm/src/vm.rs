//! Building a VM from a [`VmConfig`] and running it to its end.

use crate::boot::{self, EntryMode};
use crate::bus::{BusError, MmioBus, PioBus};
use crate::config::VmConfig;
use crate::devices::{debug_exit, i8042, mmio_ram::MmioRam, serial, test_report};
use crate::kvm::{self, cpuid, ioctl_err, KvmError};
use crate::layout;
use crate::loader::{self, LoadError, LoadRequest};
use crate::stats::ExitStats;
use crate::status;
use crate::trace::Tracer;
use crate::vcpu::{Emulator, Vcpu};
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, kvm_xcrs};
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// KVM_CAP_EXIT_ON_EMULATION_FAILURE: every emulation failure exits to
/// userspace instead of KVM queueing #UD at CPL > 0.
const KVM_CAP_EXIT_ON_EMULATION_FAILURE: u32 = 204;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("cannot allocate {0} bytes of guest memory: {1}")]
    Memory(u64, vm_memory::mmap::FromRangesError),
    #[error("image {name}: {err}")]
    Load { name: String, err: LoadError },
    #[error("entry state: {0}")]
    Boot(#[from] boot::BootError),
    #[error("device set-up: {0}")]
    Bus(#[from] BusError),
    #[error("--mmio-ram {addr:#x}+{size:#x} overlaps guest RAM")]
    WindowOverRam { addr: u64, size: u64 },
    #[error("cannot create trace file: {0}")]
    Trace(std::io::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot set up the emulator's stub buffer: {0}")]
    Stub(emul::stub::StubError),
    #[error("stub self-test failed; refusing to run guests:\n{0}")]
    Selftest(String),
}

impl VmError {
    /// The process status for a VM that never ran.
    pub fn status(&self) -> i32 {
        match self {
            VmError::Selftest(_) => status::SELFTEST_FAILED,
            _ => status::SETUP_ERROR,
        }
    }
}

/// The PIO and MMIO buses of a VM.
pub struct Buses {
    pub pio: PioBus,
    pub mmio: MmioBus,
}

impl Default for Buses {
    fn default() -> Self {
        Buses {
            pio: PioBus::new_pio(),
            mmio: MmioBus::new_mmio(),
        }
    }
}

/// What every vCPU thread shares.
pub struct Shared {
    pub buses: Buses,
    pub mem: GuestMemoryMmap,
    pub tracer: Option<Tracer>,
    pub stats: bool,
    stop: AtomicBool,
}

impl Shared {
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// How a VM (or one vCPU's part in it) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEnd {
    pub status: i32,
    pub message: String,
}

impl VmEnd {
    pub fn new(status: i32, message: String) -> Self {
        VmEnd { status, message }
    }

    /// A vCPU that stopped because another one ended the VM.
    pub fn kicked() -> Self {
        VmEnd::new(status::INTERRUPTED, "stopped".into())
    }
}

/// The result of running a VM to its end.
#[derive(Debug)]
pub struct VmOutcome {
    /// The process exit status the VM's end calls for.
    pub status: i32,
    /// One line saying why it ended.
    pub message: String,
    /// Values the guest wrote to the test-report port.
    pub reports: Vec<u64>,
    /// Exit latency histograms of all vCPUs, when `stats` was asked for.
    pub stats: Option<ExitStats>,
}

/// Builds the VM described by `cfg` and runs it; the guest's serial output
/// goes to `serial_out`.
pub fn run(cfg: &VmConfig, serial_out: serial::SerialOut) -> Result<VmOutcome, VmError> {
    let kvm = kvm::open()?;
    for (cap, name) in [
        (Cap::SyncRegs, "KVM_CAP_SYNC_REGS"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name).into());
        }
    }
    let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
    enable_exit_on_emulation_failure(&vm)?;
    let mem = create_memory(&vm, cfg.mem_size)?;

    let reports = test_report::Reports::default();
    let buses = build_buses(cfg, &mem, serial_out, reports.clone())?;

    let mut reserved: Vec<(u64, u64)> = boot::reserved_ranges(cfg.mode);
    reserved.extend(buses.mmio.iter());
    let image = loader::load(
        &mem,
        &LoadRequest {
            image: &cfg.image,
            format: cfg.format,
            load_addr: cfg.load_addr,
            reserved: &reserved,
        },
    )
    .map_err(|err| VmError::Load {
        name: cfg.image_name.clone(),
        err,
    })?;
    let entry = cfg.entry.unwrap_or(image.entry);
    log::info!(
        "loaded {} ({:?}, {} segment(s)), entry {entry:#x}, {:?} mode",
        cfg.image_name,
        image.kind,
        image.segments.len(),
        cfg.mode
    );

    let its_on = resolve_its(cfg.its)?;
    let base_cpuid = cpuid::build(&kvm, cfg.cpu)?;
    let low_ram_end = cfg.mem_size.min(layout::RAM_32BIT_END);
    let vcpu_fd = vm.create_vcpu(0).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
    let cpuid = cpuid::for_vcpu(&base_cpuid, 0);
    vcpu_fd
        .set_cpuid2(&cpuid)
        .map_err(ioctl_err("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu_fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
    let mut regs = vcpu_fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
    boot::setup_entry(&mem, cfg.mode, entry, low_ram_end, &mut sregs, &mut regs)?;
    let xcr0 = cpuid::xcr0_for(&cpuid);
    if cfg.mode != EntryMode::Long || (xcr0 == 0 && std::env::var_os("VMM_FORCE_OSXSAVE").is_none())
    {
        sregs.cr4 &= !boot::CR4_OSXSAVE;
    }
    vcpu_fd
        .set_sregs(&sregs)
        .map_err(ioctl_err("KVM_SET_SREGS"))?;
    vcpu_fd.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))?;
    if cfg.mode == EntryMode::Long && xcr0 != 0 {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        vcpu_fd.set_xcrs(&xcrs).map_err(ioctl_err("KVM_SET_XCRS"))?;
    }

    let tracer = match &cfg.trace {
        Some(p) => Some(Tracer::create(p).map_err(VmError::Trace)?),
        None => None,
    };
    let shared = Arc::new(Shared {
        buses,
        mem,
        tracer,
        stats: cfg.stats,
        stop: AtomicBool::new(false),
    });

    let mut emulator = Emulator::new(its_on).map_err(VmError::Stub)?;
    // Xen-style: prove the stub machinery turns faults into exceptions
    // before trusting it with a guest.
    let t = std::time::Instant::now();
    emulator.selftest().map_err(VmError::Selftest)?;
    log::info!("stub self-test passed in {} us", t.elapsed().as_micros());
    let mut vcpu = Vcpu::new(0, vcpu_fd, shared.clone(), emulator);
    let handle = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            let end = vcpu.run();
            (end, vcpu.take_stats())
        })
        .map_err(VmError::Thread)?;
    let (end, stats) = match handle.join() {
        Ok(r) => r,
        Err(_) => (
            VmEnd::new(status::UNHANDLED_EXIT, "vcpu 0 thread panicked".into()),
            None,
        ),
    };
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(t) = &shared.tracer {
        t.flush();
    }
    let stats = stats.map(|s| {
        let mut all = ExitStats::new();
        all.merge(&s);
        all
    });
    let reports = reports.lock().unwrap_or_else(|p| p.into_inner()).clone();
    drop(vm);
    Ok(VmOutcome {
        status: end.status,
        message: end.message,
        reports,
        stats,
    })
}

fn resolve_its(mode: emul::stub::ItsMode) -> Result<bool, VmError> {
    let decision = mode.resolve();
    log::info!("ITS mitigation for stubs: {decision}");
    Ok(decision.enabled)
}

fn enable_exit_on_emulation_failure(vm: &VmFd) -> Result<(), VmError> {
    if vm.check_extension_raw(u64::from(KVM_CAP_EXIT_ON_EMULATION_FAILURE)) <= 0 {
        return Err(KvmError::MissingCap("KVM_CAP_EXIT_ON_EMULATION_FAILURE").into());
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(ioctl_err("KVM_ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)"))?;
    Ok(())
}

fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(size, e))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| KvmError::MissingCap("a host mapping for guest RAM"))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live anonymous mapping of `memory_size`
        // bytes owned by `mem`, which the VM's `Shared` keeps alive until
        // after the VM fd is closed.
        unsafe { vm.set_user_memory_region(r) }.map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

fn build_buses(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    serial_out: serial::SerialOut,
    reports: test_report::Reports,
) -> Result<Buses, VmError> {
    let mut b = Buses::default();
    let com1 = serial::SerialPort::new(serial::SerialIrq(None), serial_out);
    b.pio.register(
        serial::COM1_PORT,
        serial::COM1_LEN,
        Arc::new(Mutex::new(com1)),
    )?;
    b.pio.register(
        debug_exit::DEBUG_EXIT_PORT,
        debug_exit::DEBUG_EXIT_LEN,
        Arc::new(Mutex::new(debug_exit::DebugExit)),
    )?;
    b.pio.register(
        i8042::I8042_BASE,
        i8042::I8042_LEN,
        Arc::new(Mutex::new(i8042::I8042::default())),
    )?;
    b.pio.register(
        test_report::TEST_REPORT_PORT,
        test_report::TEST_REPORT_LEN,
        Arc::new(Mutex::new(test_report::TestReport::new(reports))),
    )?;
    for d in &cfg.extra_pio {
        b.pio.insert(u64::from(d.base), u64::from(d.len), d.device.clone())?;
    }
    for d in &cfg.extra_mmio {
        b.mmio.insert(d.base, d.len, d.device.clone())?;
    }
    for &(addr, size) in &cfg.mmio_ram {
        let over_ram = mem.iter().any(|r| {
            let (s, e) = (r.start_addr().0, r.start_addr().0 + r.len());
            addr < e && s < addr + size
        });
        if over_ram {
            return Err(VmError::WindowOverRam { addr, size });
        }
        b.mmio.register(
            addr,
            size,
            Arc::new(Mutex::new(MmioRam::new(size as usize))),
        )?;
    }
    Ok(b)
}

/// Whether this host can run VMs at all (for tests that must fail loudly
/// when /dev/kvm is missing).
pub fn kvm_available() -> Result<Kvm, KvmError> {
    kvm::open()
}
