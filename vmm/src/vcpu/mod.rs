//! One vCPU thread: KVM_RUN, decode the exit, serve it, repeat.
//!
//! The hot path (PIO and MMIO) makes no register ioctl, does not allocate,
//! and only reads the clock when `--stats` or `--trace` asked for it.
//!
//! What KVM copies into the run page on every exit (KVM_CAP_SYNC_REGS) is
//! kept to what exits use, because each class costs on every exit (see
//! `sync.rs`): GPRs and SREGS only while the guest keeps emulating, SREGS
//! only for exits that may be emulation failures, events never (injecting
//! an exception reads them with KVM_GET_VCPU_EVENTS and writes them back
//! through the run page). Rare paths (error messages, HLT, the halt probe)
//! fetch GPRs by ioctl when they are not synced.

mod diagnose;
mod emulate;
pub mod exit;
mod platform;
mod sync;

use crate::kvm::run_page::{self, Exit};
use crate::status;
use crate::trace::TraceRecord;
use crate::vm::{Shared, VmEnd};
use exit::{handle_exit, ExitAction};
use kvm_bindings::{
    kvm_regs, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{SyncReg, VcpuFd};
use std::sync::Arc;
use std::time::Instant;

use crate::bus::BusAction;
use emulate::Completion;
pub use emulate::{warm_up_tables, Emulator, OnUnsupported};

const RFLAGS_IF: u64 = 1 << 9;

/// vCPU state ioctls made while serving exits (`VmOutcome::ioctls`): the
/// per-exit costs the README's Performance section names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoctlCounts {
    pub get_regs: u64,
    pub get_sregs: u64,
    pub get_events: u64,
    pub get_xsave: u64,
    pub set_xsave: u64,
    pub get_xcrs: u64,
}

impl IoctlCounts {
    pub fn add(&mut self, o: &IoctlCounts) {
        self.get_regs += o.get_regs;
        self.get_sregs += o.get_sregs;
        self.get_events += o.get_events;
        self.get_xsave += o.get_xsave;
        self.set_xsave += o.set_xsave;
        self.get_xcrs += o.get_xcrs;
    }
}

use sync::RegSync;
pub use sync::{QUIET_AFTER, SYNC_IDLE_EXITS};

pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    shared: Arc<Shared>,
    emulator: Emulator,
    stats: Option<crate::stats::ExitStats>,
    sync: RegSync,
    ioctls: IoctlCounts,
}

impl Vcpu {
    pub fn new(id: u8, mut fd: VcpuFd, shared: Arc<Shared>, emulator: Emulator) -> Self {
        fd.clear_sync_valid_reg(SyncReg::VcpuEvents);
        let stats = shared.stats.then(crate::stats::ExitStats::new);
        let sync = RegSync::new(&mut fd, shared.tracer.is_some());
        Vcpu {
            id,
            fd,
            shared,
            emulator,
            stats,
            sync,
            ioctls: IoctlCounts::default(),
        }
    }

    /// The state ioctls this vCPU made while serving exits.
    pub fn ioctl_counts(&self) -> IoctlCounts {
        let mut c = self.ioctls;
        c.add(&self.emulator.ioctl_counts());
        c
    }

    /// KVM_RUNs that had SREGS copied into the run page.
    pub fn sregs_copies(&self) -> u64 {
        self.sync.sregs_copies
    }

    /// This vCPU's exit latencies and emulated instructions per mnemonic
    /// (when `--stats` asked for them).
    pub fn take_stats(
        &mut self,
    ) -> Option<(crate::stats::ExitStats, Vec<(iced_x86::Mnemonic, u64)>)> {
        let s = self.stats.take()?;
        Some((s, self.emulator.mnemonic_counts()))
    }

    /// RIP as of the last KVM_RUN return: from the run page while GPRs are
    /// synced, else by KVM_GET_REGS (0 if that fails).
    pub fn rip(&mut self) -> u64 {
        self.regs().map_or(0, |r| r.rip)
    }

    /// The GPRs: from the run page while synced, else by KVM_GET_REGS
    /// (only rare paths call this outside emulation).
    fn regs(&mut self) -> Result<kvm_regs, kvm_ioctls::Error> {
        if self.sync.synced {
            return Ok(self.fd.sync_regs_mut().regs);
        }
        self.ioctls.get_regs += 1;
        self.fd.get_regs()
    }

    /// Runs until the VM ends: `Some` when this vCPU ended it, `None` when
    /// another one did (or SIGINT/SIGTERM) and this one was told to stop.
    pub fn run(&mut self) -> Option<VmEnd> {
        let timing = self.stats.is_some() || self.shared.tracer.is_some();
        let id = self.id;
        // On this thread: the stub's fault recovery is per thread.
        let t = Instant::now();
        self.emulator.warm_up(&self.fd);
        log::debug!(
            "vcpu {id}: emulator warmed up in {} us",
            t.elapsed().as_micros()
        );
        loop {
            if self.shared.stopping() {
                return None;
            }
            self.sync.before_run(&mut self.fd);
            let t0 = timing.then(Instant::now);
            if let Err(e) = self.fd.run() {
                if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN {
                    self.answer_halt_probe();
                    continue;
                }
                return Some(VmEnd::new(
                    status::KVM_FAILURE,
                    format!("vcpu {}: KVM_RUN failed at rip {:#x}: {e}", id, self.rip()),
                ));
            }
            // The RIP the exit happened at (only to group an emulated
            // instruction's exits in the statistics; free while synced).
            let exit_rip = (timing && self.sync.synced).then(|| self.fd.sync_regs_mut().regs.rip);
            // Where the exit happened, for the SREGS guess (free while synced).
            let rip = self.sync.synced.then(|| self.fd.sync_regs().regs.rip);
            let exit = run_page::decode(self.fd.get_kvm_run());
            let reason = exit.reason();
            let site = rip.map(|rip| sync::site(rip, &exit));
            let mut rec = self.shared.tracer.as_ref().map(|_| TraceRecord::of(&exit));
            let action = handle_exit(exit, &self.shared.buses);
            self.sync.after_exit(
                &mut self.fd,
                matches!(action, ExitAction::Emulate { .. }),
                site,
            );
            if let Some(rec) = &mut rec {
                let s = self.fd.sync_regs_mut();
                rec.set_regs(&s.regs, &s.sregs);
            }
            let end = match action {
                ExitAction::Resume => self.check_sleep(),
                ExitAction::Interrupted => None,
                ExitAction::Stop { status, reason } => Some(VmEnd::new(
                    status,
                    format!("vcpu {}: {} (status {status})", id, reason.describe()),
                )),
                ExitAction::Halt => self.halt(),
                ExitAction::Shutdown => Some(VmEnd::new(
                    status::TRIPLE_FAULT,
                    format!(
                        "vcpu {}: triple fault (KVM shutdown) at rip {:#x}: {}",
                        id,
                        self.rip(),
                        self.triple_fault_clue()
                    ),
                )),
                ExitAction::Emulate { bytes, len } => self.emulate(&bytes[..len]),
                ExitAction::Unhandled(what) => Some(VmEnd::new(
                    status::UNHANDLED_EXIT,
                    format!("vcpu {}: {what} at rip {:#x}", id, self.rip()),
                )),
            };
            if let Some(t0) = t0 {
                let ns = t0.elapsed().as_nanos() as u64;
                if let Some(mut rec) = rec {
                    if let Exit::Io {
                        out: false, data, ..
                    }
                    | Exit::Mmio {
                        write: false, data, ..
                    } = run_page::decode(self.fd.get_kvm_run())
                    {
                        rec.set_data(data);
                    }
                    if let Some(t) = &self.shared.tracer {
                        t.write(self.id, &rec, ns);
                    }
                }
                if let Some(s) = &mut self.stats {
                    s.record(reason, exit_rip, ns);
                }
            }
            if end.is_some() {
                return end;
            }
        }
    }

    /// The same-image floor of `vmm bench`: KVM_RUN on this very VM (the
    /// VMM's own set-up, image and run page) with nothing served and no
    /// register synced: PIO and MMIO exits re-enter at once (a read sees
    /// whatever is in the run page), a write to isa-debug-exit ends the
    /// run, anything else stops it. Each exit is timed as in [`Self::run`]
    /// (into the `--stats` histograms, which the bench turns on).
    pub fn run_bare(&mut self) -> Option<VmEnd> {
        let id = self.id;
        self.sync.drop_all(&mut self.fd);
        loop {
            if self.shared.stopping() {
                return None;
            }
            let t0 = Instant::now();
            if let Err(e) = self.fd.run() {
                if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN {
                    continue;
                }
                return Some(VmEnd::new(
                    status::KVM_FAILURE,
                    format!("vcpu {id}: KVM_RUN failed: {e}"),
                ));
            }
            let exit = run_page::decode(self.fd.get_kvm_run());
            let reason = exit.reason();
            let end = match exit {
                Exit::Io {
                    port,
                    out: true,
                    data,
                    ..
                } if port == crate::devices::debug_exit::DEBUG_EXIT_PORT => {
                    let v = data.first().copied().map_or(0, i32::from);
                    Some(VmEnd::new(
                        (v << 1) | 1,
                        format!("vcpu {id}: debug exit (bare loop)"),
                    ))
                }
                Exit::Io { .. } | Exit::Mmio { .. } => None,
                other => Some(VmEnd::new(
                    status::UNHANDLED_EXIT,
                    format!("vcpu {id}: bare loop: exit {}", other.reason().name()),
                )),
            };
            let ns = t0.elapsed().as_nanos() as u64;
            if let Some(s) = &mut self.stats {
                s.record(reason, None, ns);
            }
            if end.is_some() {
                return end;
            }
        }
    }

    /// After a kick: tells the VM whether this vCPU is parked for good
    /// (halted with interrupts off, or an application processor that was
    /// never started), if a halt probe is running.
    fn answer_halt_probe(&mut self) {
        let round = self.shared.probe.round();
        if round == 0 {
            return;
        }
        let parked = match self.fd.get_mp_state() {
            Ok(s) if s.mp_state == KVM_MP_STATE_HALTED => {
                self.regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0)
            }
            Ok(s) => matches!(
                s.mp_state,
                KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED
            ),
            Err(_) => false,
        };
        self.shared.probe.answer(self.id, round, parked);
        self.shared.wake_waiter();
    }

    /// After a port or MMIO write: did the guest ask for an ACPI sleep
    /// state?
    #[inline]
    fn check_sleep(&mut self) -> Option<VmEnd> {
        let typ = self.shared.power.as_ref()?.sleep.take()?;
        self.sleep(typ)
    }

    /// Enters ACPI sleep type `typ`: S3 waits for the RTC alarm (the only
    /// wake-up event here), then restarts this vCPU in real mode at the
    /// FACS firmware waking vector; any other type powers the VM off.
    #[cold]
    fn sleep(&mut self, typ: u8) -> Option<VmEnd> {
        use crate::devices::acpi_pm1::{PM1_RTC, PM1_WAK_STS, SLP_TYP_S3};
        let id = self.id;
        let shared = self.shared.clone();
        let power = shared.power.as_ref()?;
        if typ != SLP_TYP_S3 {
            return Some(VmEnd::new(
                status::GUEST_DONE,
                format!("vcpu {id}: ACPI sleep type {typ} (power off)"),
            ));
        }
        if power.cpus > 1 {
            log::warn!("vcpu {id}: S3 is supported with one vCPU only; request ignored");
            return None;
        }
        let rtc_wake = power.pm1.lock().unwrap_or_else(|p| p.into_inner()).enable() & PM1_RTC != 0;
        let wait = if rtc_wake {
            power
                .rtc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next_alarm()
        } else {
            None
        };
        let Some(wait) = wait else {
            return Some(VmEnd::new(
                status::GUEST_DONE,
                format!("vcpu {id}: entered S3 with no wake-up event (RTC alarm) enabled"),
            ));
        };
        log::info!(
            "vcpu {id}: S3 until the RTC alarm in {} ms",
            wait.as_millis()
        );
        let until = Instant::now() + wait;
        loop {
            if shared.stopping() {
                return None;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(std::time::Duration::from_millis(10)));
        }
        power
            .pm1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .raise(PM1_WAK_STS | PM1_RTC);
        let vector: u32 = vm_memory::Bytes::read_obj(
            &shared.mem,
            vm_memory::GuestAddress(
                crate::acpi::FACS_ADDR + crate::acpi::FACS_FIRMWARE_WAKING_VECTOR,
            ),
        )
        .unwrap_or(0);
        if vector == 0 || vector >= 0x10_0000 {
            return Some(VmEnd::new(
                status::GUEST_DONE,
                format!("vcpu {id}: woke from S3 with no usable waking vector ({vector:#x})"),
            ));
        }
        // As the BIOS does on resume: real mode, CS:IP = vector >> 4 : vector & 0xf.
        // The run page's registers must be current before they are rewritten.
        if let Err((op, e)) = self.sync.ensure(&mut self.fd, &mut self.ioctls) {
            return Some(self.kvm_failure(op, e));
        }
        let s = self.fd.sync_regs_mut();
        if let Err(e) = crate::boot::setup_entry(
            &shared.mem,
            crate::boot::EntryMode::Real,
            0,
            0,
            &mut s.sregs,
            &mut s.regs,
        ) {
            return Some(VmEnd::new(
                status::KVM_FAILURE,
                format!("vcpu {id}: resume from S3: {e}"),
            ));
        }
        s.sregs.cs.selector = (vector >> 4) as u16;
        s.sregs.cs.base = u64::from(vector & !0xf);
        s.regs.rip = u64::from(vector & 0xf);
        s.sregs.cr3 = 0;
        s.sregs.idt.base = 0;
        s.sregs.idt.limit = 0x3ff;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
        log::info!("vcpu {id}: resumed from S3 at {vector:#x}");
        None
    }

    /// Flushes the guest's TLB (all PCIDs, global pages included). KVM has
    /// no ioctl for it; KVM_SET_SREGS resets the MMU context (unloading
    /// the shadow or TDP roots and flushing the current context on reload)
    /// whenever CR4 changes, so CR4.PGE is toggled and restored, as a guest
    /// kernel flushes global pages.
    #[cold]
    fn flush_guest_tlb(&mut self) -> Option<VmEnd> {
        const CR4_PGE: u64 = 1 << 7;
        let result = self.fd.get_sregs().and_then(|sregs| {
            let mut toggled = sregs;
            toggled.cr4 ^= CR4_PGE;
            self.fd.set_sregs(&toggled)?;
            self.fd.set_sregs(&sregs)
        });
        result.err().map(|e| {
            VmEnd::new(
                status::KVM_FAILURE,
                format!(
                    "vcpu {}: TLB flush through KVM_SET_SREGS failed: {e}",
                    self.id
                ),
            )
        })
    }

    /// What the guest last did before a triple fault (see `diagnose`).
    fn triple_fault_clue(&mut self) -> String {
        // The run page's registers may be from an earlier exit (SREGS are
        // not synced on every one); a failed fetch leaves them as they are.
        let _ = self.sync.ensure(&mut self.fd, &mut self.ioctls);
        // Events are never synced: read them for the clue (not written back).
        if let Ok(events) = self.fd.get_vcpu_events() {
            self.ioctls.get_events += 1;
            self.fd.sync_regs_mut().events = events;
        }
        let sync = self.fd.sync_regs();
        let cpu = emulate::cpu_state(&sync.regs, &sync.sregs, self.emulator.max_phys_bits());
        let mut phys = platform::GuestPhys {
            mem: &self.shared.mem,
            mmio: &self.shared.buses.mmio,
            stop: None,
        };
        diagnose::triple_fault_clue(&sync, &cpu, &mut phys)
    }

    fn halt(&mut self) -> Option<VmEnd> {
        let regs = match self.regs() {
            Ok(r) => r,
            Err(e) => return Some(self.kvm_failure("KVM_GET_REGS", e)),
        };
        let msg = if regs.rflags & RFLAGS_IF == 0 {
            format!(
                "vcpu {}: halted with interrupts off at rip {:#x}",
                self.id, regs.rip
            )
        } else {
            // Without an in-kernel irqchip nothing could ever wake it.
            format!(
                "vcpu {}: halted at rip {:#x} with interrupts on but no interrupt source",
                self.id, regs.rip
            )
        };
        Some(VmEnd::new(status::GUEST_DONE, msg))
    }

    fn emulate(&mut self, bytes: &[u8]) -> Option<VmEnd> {
        if let Err((op, e)) = self.sync.ensure(&mut self.fd, &mut self.ioctls) {
            return Some(self.kvm_failure(op, e));
        }
        // Copies: the emulator also needs the vCPU fd (for XSAVE state).
        let sync = self.fd.sync_regs_mut();
        let (mut regs, sregs) = (sync.regs, sync.sregs);
        match self
            .emulator
            .complete(self.id, &self.fd, &mut regs, &sregs, bytes, &self.shared)
        {
            Completion::Done => {
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                None
            }
            Completion::Retry => None,
            Completion::Inject {
                vector,
                error_code,
                cr2,
            } => {
                // Events are not synced on every exit: read them now, write
                // them back through the run page with the next KVM_RUN.
                let mut events = match self.fd.get_vcpu_events() {
                    Ok(e) => e,
                    Err(e) => return Some(self.kvm_failure("KVM_GET_VCPU_EVENTS", e)),
                };
                self.ioctls.get_events += 1;
                let e = &mut events.exception;
                e.injected = 1;
                e.pending = 0;
                e.nr = vector;
                e.has_error_code = u8::from(error_code.is_some());
                e.error_code = error_code.unwrap_or(0);
                let s = self.fd.sync_regs_mut();
                s.events = events;
                if let Some(cr2) = cr2 {
                    // `ensure` made the run page's SREGS current.
                    s.sregs.cr2 = cr2;
                    self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                }
                self.fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
                None
            }
            Completion::Interrupt { vector } => {
                // Delivered as an injected interrupt, not an exception:
                // KVM's exception fields take vectors below 32 only and
                // model faults (return address at the instruction), while
                // an injected interrupt pushes the RIP set here, past the
                // INT. Injection skips the IF check, as INT n does. Events
                // are not synced on every exit: read them now.
                let mut events = match self.fd.get_vcpu_events() {
                    Ok(e) => e,
                    Err(e) => return Some(self.kvm_failure("KVM_GET_VCPU_EVENTS", e)),
                };
                self.ioctls.get_events += 1;
                let irq = &mut events.interrupt;
                irq.injected = 1;
                irq.nr = vector;
                irq.soft = 0;
                irq.shadow = 0;
                let s = self.fd.sync_regs_mut();
                s.regs = regs;
                s.events = events;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                self.fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
                None
            }
            Completion::FlushTlb => {
                self.fd.sync_regs_mut().regs = regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
                self.flush_guest_tlb()
            }
            Completion::Stop(msg) => Some(VmEnd::new(status::UNSUPPORTED_INSTRUCTION, msg)),
            Completion::DeviceStop(BusAction::Stop { status, reason }) => Some(VmEnd::new(
                status,
                format!("vcpu {}: {} (status {status})", self.id, reason.describe()),
            )),
            Completion::DeviceStop(BusAction::Continue) => None,
        }
    }

    fn kvm_failure(&mut self, op: &str, e: kvm_ioctls::Error) -> VmEnd {
        let rip = self.rip();
        VmEnd::new(
            status::KVM_FAILURE,
            format!("vcpu {}: {op} failed at rip {rip:#x}: {e}", self.id),
        )
    }
}
