//! Building a VM from a [`VmConfig`] and running it to its end.

use crate::boot::{self, EntryMode};
use crate::bus::{BusError, MmioBus, PioBus};
use crate::config::{TestDevice, VmConfig};
use crate::devices::mmio_ram::{MmioRam, MmioRamError, MAX_MMIO_RAM_TOTAL};
use crate::devices::{acpi_pm1, debug_exit, i8042, rtc, serial, test_report};
use crate::halt_probe::HaltProbe;
use crate::kvm::{self, cpuid, ioctl_err, KvmError};
use crate::layout;
use crate::loader::{self, ImageFormat, LoadError, LoadRequest};
use crate::stats::ExitStats;
use crate::status;
use crate::trace::Tracer;
use crate::vcpu::{Emulator, IoctlCounts, Vcpu};
use kvm_bindings::kvm_xcrs;
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] crate::kvm::memory::MemoryError),
    #[error("image {name}: {err}")]
    Load { name: String, err: LoadError },
    #[error("initrd {name}: {err}")]
    Initrd { name: String, err: LoadError },
    #[error(
        "the Multiboot command line ({cmdline_len} bytes; --cmdline, default the image path) \
         and module names do not fit the Multiboot information area: {err}"
    )]
    MultibootInfo { cmdline_len: usize, err: LoadError },
    #[error("entry state: {0}")]
    Boot(#[from] boot::BootError),
    #[error("device set-up: {0}")]
    Bus(#[from] BusError),
    #[error("--mmio-ram {addr:#x}+{size:#x} overlaps guest RAM")]
    WindowOverRam { addr: u64, size: u64 },
    #[error("--mmio-ram {addr:#x}+{size:#x} overlaps the in-kernel IOAPIC or LAPIC page")]
    WindowOverIrqchip { addr: u64, size: u64 },
    #[error(
        "--mmio-ram windows span {total:#x} bytes together; at most {:#x} ({} GiB) are allowed",
        MAX_MMIO_RAM_TOTAL,
        MAX_MMIO_RAM_TOTAL >> 30
    )]
    WindowsTooLarge { total: u64 },
    #[error(transparent)]
    MmioRam(MmioRamError),
    #[error("--mem {0:#x} is not a multiple of 4 KiB (KVM maps guest RAM in whole pages)")]
    MemNotPageAligned(u64),
    #[error("--cpus must be between 1 and 255, not {0}")]
    Cpus(u8),
    #[error("cannot install the vCPU kick signal handler (errno {0})")]
    Signal(i32),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("ACPI tables: {0}")]
    Acpi(crate::acpi::AcpiError),
    #[error("cannot create trace file: {0}")]
    Trace(std::io::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot set up the emulator's stub buffer: {0}")]
    Stub(emul::EmulError),
    #[error("BIOS state: {0}")]
    Bios(#[from] crate::bios::BiosError),
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
    /// The first vCPU to end the VM records why.
    end: Mutex<Option<VmEnd>>,
    /// Halt probes (VMs with an in-kernel irqchip, where HLT never exits):
    /// the current probe round, and per vCPU the last round it answered
    /// and whether it was parked for good then.
    pub probe: HaltProbe,
    /// The thread waiting for the VM's end (unparked when it comes).
    waiter: std::thread::Thread,
    /// vCPU threads still inside their run loop.
    running: std::sync::atomic::AtomicUsize,
    /// ACPI sleep states (with the acpi-pm device).
    pub power: Option<Power>,
}

/// What a vCPU needs to put the VM to sleep and wake it (ACPI S3).
pub struct Power {
    pub sleep: Arc<acpi_pm1::SleepRequest>,
    pub pm1: Arc<Mutex<acpi_pm1::Pm1>>,
    pub rtc: Arc<Mutex<rtc::Rtc>>,
    pub cpus: u8,
}

impl Shared {
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Wakes the thread waiting for the VM's end (to look at the halt
    /// probe's answers).
    pub fn wake_waiter(&self) {
        self.waiter.unpark();
    }

    /// Records how the VM ended (the first end wins) and tells every vCPU
    /// to stop.
    fn finish(&self, end: VmEnd) {
        let mut slot = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(end);
        }
        drop(slot);
        self.stop.store(true, Ordering::SeqCst);
        self.waiter.unpark();
    }
}

/// Counts a vCPU thread out of its run loop and wakes the waiting thread,
/// however the loop ends (also by a panic).
struct WakeOnExit<'a>(&'a Shared);

impl Drop for WakeOnExit<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.waiter.unpark();
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
    /// Instructions the VMM completed for the guest, per mnemonic, most
    /// frequent first (with `stats`).
    pub emulated: Vec<(iced_x86::Mnemonic, u64)>,
    /// Guest memory copied out at the end, one per `VmConfig::dump_ranges`.
    pub dumps: Vec<Vec<u8>>,
    /// vCPU state ioctls made while serving exits, all vCPUs together.
    pub ioctls: IoctlCounts,
    /// KVM_RUNs that asked KVM to copy SREGS into the run page (~170 ns
    /// each), all vCPUs together.
    pub sregs_copies: u64,
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
    if cfg.cpus == 0 {
        return Err(VmError::Cpus(cfg.cpus));
    }
    if !cfg.mem_size.is_multiple_of(4096) || cfg.mem_size == 0 {
        return Err(VmError::MemNotPageAligned(cfg.mem_size));
    }
    crate::signals::install_kick().map_err(|e| VmError::Signal(e.errno()))?;
    let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
    kvm::enable_exit_on_emulation_failure(&vm)?;
    let vm = Arc::new(vm);
    if cfg.irqchip() {
        create_irqchip(&vm)?;
    }
    let mem = crate::kvm::memory::create_guest_memory(&vm, cfg.mem_size)?;
    if cfg.irqchip() {
        // Interrupts can arrive: leave the IVT a BIOS would (the image,
        // loaded next, may overwrite it).
        crate::bios::write_real_mode_vectors(&mem)?;
    }

    let reports = test_report::Reports::default();
    let (buses, power) = build_buses(cfg, &vm, &mem, serial_out, reports.clone())?;
    let boot = load_guest(cfg, &mem, &buses)?;

    let its_on = resolve_its(cfg.its);
    let base_cpuid = cpuid::build(&kvm, cfg.cpu)?;
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
        end: Mutex::new(None),
        probe: HaltProbe::new(usize::from(cfg.cpus)),
        power,
        waiter: std::thread::current(),
        running: std::sync::atomic::AtomicUsize::new(usize::from(cfg.cpus)),
    });

    // iced-x86's tables take ~1 ms to build: now, not in front of the
    // first emulated instruction. (A helper thread overlapping the VM's
    // set-up measured slower on a loaded 2-vCPU host.)
    crate::vcpu::warm_up_tables();
    let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
    for id in 0..cfg.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&base_cpuid, id);
        fd.set_cpuid2(&cpuid).map_err(ioctl_err("KVM_SET_CPUID2"))?;
        // Application processors keep their reset state: with the in-kernel
        // irqchip they wait for the guest's INIT/SIPI.
        if id == 0 {
            set_boot_state(&fd, &shared.mem, cfg.mem_size, &boot, &cpuid)?;
        }
        let mut emulator = Emulator::new(
            its_on,
            cpuid::max_phys_bits(&cpuid),
            cfg.on_unsupported,
            cfg.stats,
        )
        .map_err(VmError::Stub)?;
        let features = cpuid::system_features(&cpuid);
        log::debug!("vcpu {id}: system instructions per CPUID: {features:?}");
        emulator.set_system_features(features);
        // Xen-style: prove this vCPU's stub buffer turns faults into
        // exceptions before trusting it with a guest.
        let t = std::time::Instant::now();
        emulator.selftest().map_err(VmError::Selftest)?;
        log::debug!(
            "vcpu {id}: stub self-test passed in {} us",
            t.elapsed().as_micros()
        );
        vcpus.push(Vcpu::new(id, fd, shared.clone(), emulator));
    }

    let mut handles = Vec::with_capacity(vcpus.len());
    let bare = cfg.bare_loop;
    for mut vcpu in vcpus {
        let shared = shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            .spawn(move || {
                let end = {
                    let _wake = WakeOnExit(&shared);
                    if bare {
                        vcpu.run_bare()
                    } else {
                        vcpu.run()
                    }
                };
                if let Some(end) = end {
                    shared.finish(end);
                }
                // The ioctls serving exits took (before `rip` may add one).
                let ioctls = vcpu.ioctl_counts();
                let sregs_copies = vcpu.sregs_copies();
                // Where it stopped, for an end no vCPU reported itself
                // (SIGINT/SIGTERM).
                (vcpu.take_stats(), vcpu.id, vcpu.rip(), ioctls, sregs_copies)
            })
            .map_err(VmError::Thread)?;
        handles.push(h);
    }
    wait_for_end(&shared, &handles, cfg.irqchip());

    let mut stats = cfg.stats.then(ExitStats::new);
    let mut emulated: Vec<(iced_x86::Mnemonic, u64)> = Vec::new();
    let mut ioctls = IoctlCounts::default();
    let mut sregs_copies = 0;
    let mut stopped_at = Vec::with_capacity(handles.len());
    for h in handles {
        let joined = h.join().map(|(stats, id, rip, vcpu_ioctls, copies)| {
            stopped_at.push(format!("vcpu {id} at rip {rip:#x}"));
            ioctls.add(&vcpu_ioctls);
            sregs_copies += copies;
            stats
        });
        match joined {
            Ok(Some((s, counts))) => {
                if let Some(all) = &mut stats {
                    all.merge(&s);
                }
                for (m, n) in counts {
                    match emulated.iter_mut().find(|(x, _)| *x == m) {
                        Some(e) => e.1 += n,
                        None => emulated.push((m, n)),
                    }
                }
            }
            Ok(None) => {}
            Err(_) => shared.finish(VmEnd::new(
                status::UNHANDLED_EXIT,
                "a vCPU thread panicked".into(),
            )),
        }
    }
    if let Some(t) = &shared.tracer {
        // A failed write was reported (once) when it happened.
        let _ = t.flush();
    }
    let mut end = shared
        .end
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_else(|| VmEnd::new(status::INTERRUPTED, "stopped".into()));
    if end.status == status::INTERRUPTED {
        end.message = format!("{} ({})", end.message, stopped_at.join(", "));
    }
    let reports = reports.lock().unwrap_or_else(|p| p.into_inner()).clone();
    emulated.sort_by_key(|e| std::cmp::Reverse(e.1));
    let dumps = cfg
        .dump_ranges
        .iter()
        .map(|&(gpa, len)| {
            let mut v = vec![0u8; len as usize];
            // Ranges outside RAM come back as zeros.
            let _ = shared.mem.read_slice(&mut v, GuestAddress(gpa));
            v
        })
        .collect();
    Ok(VmOutcome {
        status: end.status,
        message: end.message,
        reports,
        stats,
        emulated,
        dumps,
        ioctls,
        sregs_copies,
    })
}

/// Waits until some vCPU ended the VM (or SIGINT/SIGTERM asked for it), then
/// kicks every vCPU thread out of KVM_RUN until all have returned.
///
/// The waiting thread sleeps until woken: [`Shared::finish`] and every
/// vCPU thread's end unpark it, and SIGINT/SIGTERM interrupt its sleep.
/// With an in-kernel irqchip it also probes every `HALT_PROBE_PERIOD` for
/// vCPUs halted with interrupts off (see [`HaltProbe`]).
fn wait_for_end<T>(shared: &Shared, handles: &[std::thread::JoinHandle<T>], irqchip: bool) {
    use std::time::{Duration, Instant};
    use vmm_sys_util::signal::Killable;
    const HALT_PROBE_PERIOD: Duration = Duration::from_millis(100);
    // Only a backstop: a signal can land just before the sleep starts.
    const SIGNAL_BACKSTOP: Duration = Duration::from_millis(250);
    let kick_all = || {
        for h in handles {
            let _ = h.kill(crate::signals::kick_signal());
        }
    };
    let mut next_probe = Instant::now() + HALT_PROBE_PERIOD;
    let mut probing: Option<u64> = None;
    let all_returned = || shared.running.load(Ordering::Acquire) == 0;
    while !shared.stopping() && !all_returned() {
        if crate::signals::stop_requested() {
            shared.finish(VmEnd::new(
                status::INTERRUPTED,
                "stopped by SIGINT/SIGTERM".into(),
            ));
            break;
        }
        let mut sleep = SIGNAL_BACKSTOP;
        if irqchip {
            let now = Instant::now();
            match probing {
                None if now >= next_probe => {
                    probing = Some(shared.probe.start());
                    kick_all();
                    // Each answer unparks this thread; without all of
                    // them by then, kick again.
                    next_probe = now + HALT_PROBE_PERIOD;
                }
                Some(round) => match shared.probe.result(round) {
                    Some(true) => {
                        shared.finish(VmEnd::new(
                            status::GUEST_DONE,
                            "every vCPU halted with interrupts off (or never started)".into(),
                        ));
                        break;
                    }
                    Some(false) => {
                        probing = None;
                        next_probe = now + HALT_PROBE_PERIOD;
                    }
                    // A vCPU that has not answered yet missed the kick
                    // (it was between exits): kick it again.
                    None if now >= next_probe => {
                        kick_all();
                        next_probe = now + HALT_PROBE_PERIOD;
                    }
                    None => {}
                },
                None => {}
            }
            sleep = sleep.min(next_probe.saturating_duration_since(Instant::now()));
        }
        std::thread::park_timeout(sleep);
    }
    shared.stop.store(true, Ordering::SeqCst);
    // Each vCPU thread unparks this one when its run loop returns; the
    // caller then joins them.
    let retry = Duration::from_millis(2);
    while !all_returned() {
        for h in handles.iter().filter(|h| !h.is_finished()) {
            // A vCPU between exits sees the flag; one inside KVM_RUN (halted,
            // or waiting for SIPI) needs the signal. Repeat until it returns.
            let _ = h.kill(crate::signals::kick_signal());
        }
        std::thread::park_timeout(retry);
    }
}

/// What the boot vCPU needs from the loaded image.
pub(crate) struct BootInfo {
    pub mode: EntryMode,
    pub entry: u64,
    /// EAX and EBX for a Multiboot kernel.
    pub multiboot: Option<(u32, u32)>,
}

fn load_guest(cfg: &VmConfig, mem: &GuestMemoryMmap, buses: &Buses) -> Result<BootInfo, VmError> {
    let load_err = |err| VmError::Load {
        name: cfg.image_name.clone(),
        err,
    };
    let multiboot = match cfg.format {
        ImageFormat::Multiboot => true,
        ImageFormat::Auto => loader::detect(&cfg.image) == ImageFormat::Multiboot,
        _ => false,
    };
    // A Multiboot kernel is entered in protected mode whatever --mode says.
    let mode = if multiboot {
        EntryMode::Protected
    } else {
        cfg.mode
    };
    let mut reserved: Vec<(u64, u64)> = boot::reserved_ranges(mode);
    reserved.extend(buses.mmio.iter());
    if multiboot || cfg.acpi() {
        reserved.extend(loader::boot_reserved());
    }
    let image = loader::load(
        mem,
        &LoadRequest {
            image: &cfg.image,
            format: cfg.format,
            load_addr: cfg.load_addr,
            reserved: &reserved,
        },
    )
    .map_err(load_err)?;
    let entry = cfg.entry.unwrap_or(image.entry);
    log::info!(
        "loaded {} ({:?}, {} segment(s)), entry {entry:#x}, {:?} mode",
        cfg.image_name,
        image.kind,
        image.segments.len(),
        mode
    );
    let mut mb = None;
    if image.kind.is_multiboot() {
        let initrd_name = cfg.initrd.as_ref().map(|(n, _)| n.as_str()).unwrap_or("");
        let module = match &cfg.initrd {
            Some((name, data)) => Some(
                loader::load_module(mem, image.end(), data, &reserved).map_err(|err| {
                    VmError::Initrd {
                        name: name.clone(),
                        err,
                    }
                })?,
            ),
            None => None,
        };
        let modules: Vec<loader::MultibootModule> = module
            .iter()
            .map(|&(start, end)| loader::MultibootModule {
                start,
                end,
                cmdline: initrd_name,
            })
            .collect();
        let cmdline = cfg
            .cmdline
            .clone()
            .unwrap_or_else(|| cfg.image_name.clone());
        let info = loader::write_multiboot_info(
            mem,
            &loader::MultibootInfoRequest {
                mem_size: cfg.mem_size,
                cmdline: Some(&cmdline),
                modules: &modules,
            },
        )
        .map_err(|err| VmError::MultibootInfo {
            cmdline_len: cmdline.len(),
            err,
        })?;
        mb = Some((loader::MULTIBOOT_BOOTLOADER_MAGIC, info as u32));
    } else if cfg.initrd.is_some() {
        log::warn!("--initrd is only passed to Multiboot kernels; ignored");
    }
    if cfg.acpi() {
        crate::acpi::write_tables(
            mem,
            &crate::acpi::AcpiConfig {
                nb_cpus: u16::from(cfg.cpus),
            },
        )
        .map_err(VmError::Acpi)?;
    }
    Ok(BootInfo {
        mode,
        entry,
        multiboot: mb,
    })
}

/// Puts the boot vCPU in the entry state.
pub(crate) fn set_boot_state(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    mem_size: u64,
    boot: &BootInfo,
    cpuid: &kvm_bindings::CpuId,
) -> Result<(), VmError> {
    let low_ram_end = mem_size.min(layout::RAM_32BIT_END);
    let mut sregs = fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
    let mut regs = fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
    boot::setup_entry(
        mem,
        boot.mode,
        boot.entry,
        low_ram_end,
        &mut sregs,
        &mut regs,
    )?;
    if let Some((eax, ebx)) = boot.multiboot {
        regs.rax = u64::from(eax);
        regs.rbx = u64::from(ebx);
    }
    fd.set_sregs(&sregs).map_err(ioctl_err("KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))?;
    let xcr0 = cpuid::xcr0_for(cpuid);
    if boot.mode == EntryMode::Long && xcr0 != 0 {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        fd.set_xcrs(&xcrs).map_err(ioctl_err("KVM_SET_XCRS"))?;
    }
    Ok(())
}

/// The in-kernel LAPIC, IOAPIC, PIC and PIT, the PIC and PIT programmed as
/// a BIOS leaves them.
fn create_irqchip(vm: &VmFd) -> Result<(), VmError> {
    vm.create_irq_chip()
        .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_bindings::kvm_pit_config::default();
    vm.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
    crate::bios::program_irqchip(vm)?;
    Ok(())
}

/// Decides whether stubs use ITS-safe returns, and logs why.
fn resolve_its(mode: emul::stub::ItsMode) -> bool {
    let decision = mode.resolve();
    log::info!("ITS mitigation for stubs: {decision}");
    decision.enabled
}

fn build_buses(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    serial_out: serial::SerialOut,
    reports: test_report::Reports,
) -> Result<(Buses, Option<Power>), VmError> {
    let mut b = Buses::default();
    // With an irqchip, COM1's interrupt goes to ISA IRQ 4 through an irqfd.
    let com1_irq = if cfg.irqchip() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm.register_irqfd(&evt, serial::COM1_IRQ)
            .map_err(ioctl_err("KVM_IRQFD"))?;
        Some(evt)
    } else {
        None
    };
    let com1 = serial::SerialPort::new(serial::SerialIrq(com1_irq), serial_out);
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
    // Every PC has its RTC and CMOS RAM.
    let rtc = Arc::new(Mutex::new(rtc::Rtc::new(cfg.mem_size, cfg.cpus)));
    b.pio.register(rtc::RTC_PORT, rtc::RTC_LEN, rtc.clone())?;
    let mut power = None;
    b.pio.register(
        test_report::TEST_REPORT_PORT,
        test_report::TEST_REPORT_LEN,
        Arc::new(Mutex::new(test_report::TestReport::new(reports))),
    )?;
    for dev in &cfg.test_devices {
        match dev {
            TestDevice::PcTestdev => {
                use crate::devices::pc_testdev::*;
                b.pio.register(
                    TESTDEV_PORT,
                    TESTDEV_LEN,
                    Arc::new(Mutex::new(PcTestdev::new())),
                )?;
                let vm = vm.clone();
                let set_line: IrqLineFn = Box::new(move |gsi, level| {
                    if let Err(e) = vm.set_irq_line(gsi, level) {
                        log::warn!("pc-testdev: KVM_IRQ_LINE {gsi}={level}: {e}");
                    }
                });
                b.pio.register(
                    TESTDEV_IRQ_PORT,
                    TESTDEV_IRQ_LEN,
                    Arc::new(Mutex::new(TestdevIrq::new(set_line))),
                )?;
                b.mmio.register(
                    TESTDEV_IOMEM_ADDR,
                    TESTDEV_IOMEM_LEN,
                    Arc::new(Mutex::new(TestdevMmio::new().map_err(VmError::MmioRam)?)),
                )?;
            }
            TestDevice::FwCfg => {
                use crate::devices::fw_cfg::*;
                let fw = FwCfg::new(cfg.mem_size, u16::from(cfg.cpus));
                b.pio
                    .register(FW_CFG_PORT, FW_CFG_LEN, Arc::new(Mutex::new(fw)))?;
            }
            TestDevice::AcpiPm => {
                use crate::devices::pm_timer::*;
                b.pio.register(
                    PM_TMR_PORT,
                    PM_TMR_LEN,
                    Arc::new(Mutex::new(PmTimer::new())),
                )?;
                use crate::devices::acpi_pm1::*;
                let sleep = Arc::new(SleepRequest::new());
                let pm1 = Arc::new(Mutex::new(Pm1::new(sleep.clone())));
                for (port, len, first_reg) in [
                    (PM1_EVT_PORT, PM1_EVT_LEN, 0),
                    (PM1_CNT_PORT, PM1_CNT_LEN, 4),
                ] {
                    let dev = Pm1Port {
                        pm1: pm1.clone(),
                        first_reg,
                    };
                    b.pio.register(port, len, Arc::new(Mutex::new(dev)))?;
                }
                power = Some(Power {
                    sleep,
                    pm1,
                    rtc: rtc.clone(),
                    cpus: cfg.cpus,
                });
            }
        }
    }
    for d in &cfg.extra_pio {
        b.pio
            .insert(u64::from(d.base), u64::from(d.len), d.device.clone())?;
    }
    for d in &cfg.extra_mmio {
        b.mmio.insert(d.base, d.len, d.device.clone())?;
    }
    let mut total_mmio_ram = 0u64;
    for &(addr, size) in &cfg.mmio_ram {
        let over_ram = mem.iter().any(|r| {
            let (s, e) = (r.start_addr().0, r.start_addr().0 + r.len());
            addr < e && s < addr + size
        });
        if over_ram {
            return Err(VmError::WindowOverRam { addr, size });
        }
        // The in-kernel IOAPIC and LAPIC claim their pages before any exit
        // could reach the window.
        let irqchip_pages = [(layout::IOAPIC_ADDR, 0x1000), (layout::LAPIC_ADDR, 0x1000)];
        if cfg.irqchip()
            && irqchip_pages
                .iter()
                .any(|&(a, l)| addr < a + l && a < addr + size)
        {
            return Err(VmError::WindowOverIrqchip { addr, size });
        }
        total_mmio_ram = total_mmio_ram.saturating_add(size);
        if total_mmio_ram > MAX_MMIO_RAM_TOTAL {
            return Err(VmError::WindowsTooLarge {
                total: total_mmio_ram,
            });
        }
        let window = MmioRam::new(size as usize).map_err(VmError::MmioRam)?;
        b.mmio.register(addr, size, Arc::new(Mutex::new(window)))?;
    }
    Ok((b, power))
}

/// Whether this host can run VMs at all (for tests that must fail loudly
/// when /dev/kvm is missing).
pub fn kvm_available() -> Result<Kvm, KvmError> {
    kvm::open()
}
