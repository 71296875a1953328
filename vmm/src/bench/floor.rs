//! The floor: a bare loop around KVM_RUN, written directly on kvm-ioctls,
//! with the same guest entry state as the VMM but no bus, no statistics and
//! no logging. It times each round trip like the VMM's run loop does: an
//! `Instant` taken before KVM_RUN, read after the exit has been served.

use super::{BenchError, Measure};
use crate::boot::{self, EntryMode};
use crate::kvm::run_page::{self, Exit};
use crate::kvm::xsave::XsaveBuf;
use crate::kvm::{self, cpuid, ioctl_err};
use crate::loader::{self, ImageFormat, LoadRequest};
use crate::stats::InstructionChain;
use crate::stats::LatencyHistogram;
use guest::Program;
use iced_x86::{Decoder, DecoderOptions};
use kvm_ioctls::{Kvm, SyncReg, VcpuFd, VmFd};
use std::time::Instant;
use vm_memory::GuestMemoryMmap;

const DEBUG_EXIT_PORT: u16 = crate::devices::debug_exit::DEBUG_EXIT_PORT;
const GUEST_RAM: u64 = 128 << 20;

/// What the floor does to serve an emulation-failure exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Nothing to serve beyond re-entering (PIO, MMIO).
    Bare,
    /// Skip the instruction: RIP += length through the synced registers.
    SkipRip,
    /// Skip it and round-trip the vector state: KVM_GET_XSAVE + KVM_SET_XSAVE.
    SkipRipXsave,
}

/// A VM and vCPU ready to run `program` from its entry point.
pub struct FloorVm {
    vcpu: VcpuFd,
    xsave: XsaveBuf,
    // Kept alive for the vCPU: the VM fd and the memory it maps.
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    _kvm: Kvm,
}

impl FloorVm {
    pub fn new(program: &Program) -> Result<Self, BenchError> {
        let kvm = kvm::open()?;
        let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        kvm::enable_exit_on_emulation_failure(&vm)?;
        let mem = create_memory(&vm)?;
        let image = loader::load(
            &mem,
            &LoadRequest {
                image: &program.image,
                format: ImageFormat::Flat,
                load_addr: program.load_addr,
                reserved: &boot::reserved_ranges(EntryMode::Long),
            },
        )
        .map_err(|e| BenchError::Setup(format!("{}: {e}", program.name)))?;
        let base = cpuid::build(&kvm, cpuid::CpuModel::Kvm)?;
        let vcpu = vm.create_vcpu(0).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&base, 0);
        vcpu.set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        // The same entry state the VMM gives its boot vCPU.
        let boot = crate::vm::BootInfo {
            mode: EntryMode::Long,
            entry: image.entry,
            multiboot: None,
        };
        crate::vm::set_boot_state(&vcpu, &mem, GUEST_RAM, &boot, &cpuid)
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        Ok(FloorVm {
            vcpu,
            xsave: XsaveBuf::default(),
            _vm: vm,
            _mem: mem,
            _kvm: kvm,
        })
    }

    /// Runs the guest until it writes to isa-debug-exit, recording the round
    /// trip of every exit whose reason is `measured` (as the VMM's
    /// `ExitStats` does). Returns the number of exits recorded.
    pub fn run_to_end(
        &mut self,
        measured: Measure,
        serve: Serve,
        hist: &mut LatencyHistogram,
    ) -> Result<u64, BenchError> {
        // Per instruction: the RIP of each exit comes from the synced GPRs.
        let mut chain = InstructionChain::default();
        if serve != Serve::Bare {
            self.vcpu.set_sync_valid_reg(SyncReg::Register);
        }
        let mut recorded = 0;
        // The loop's one emulated instruction: decoded once, not per exit.
        let mut insn_len: Option<(u64, u64)> = None;
        loop {
            let t0 = Instant::now();
            if !self.enter()? {
                continue;
            }
            let rip = (serve != Serve::Bare).then(|| self.vcpu.sync_regs_mut().regs.rip);
            let exit = run_page::decode(self.vcpu.get_kvm_run());
            let reason = exit.reason();
            let done = match exit {
                Exit::Io { port, out, .. } => out && port == DEBUG_EXIT_PORT,
                Exit::Mmio { .. } => false,
                Exit::EmulationFailure { bytes, len } => {
                    if serve == Serve::Bare {
                        return Err(BenchError::Guest(
                            "unexpected emulation failure in a bare floor".into(),
                        ));
                    }
                    self.skip_insn(&bytes[..len], &mut insn_len)?;
                    if serve == Serve::SkipRipXsave {
                        // The VMM's own buffer and ioctls, so the floor
                        // pays what a vector completion's ioctls cost.
                        let xsave = &mut self.xsave;
                        xsave
                            .fetch(&self.vcpu)
                            .map_err(ioctl_err("KVM_GET_XSAVE"))?;
                        xsave
                            .store(&self.vcpu)
                            .map_err(ioctl_err("KVM_SET_XSAVE"))?;
                    }
                    false
                }
                other => {
                    return Err(BenchError::Guest(format!(
                        "floor: unexpected exit {}",
                        other.reason().name()
                    )))
                }
            };
            let ns = t0.elapsed().as_nanos() as u64;
            match measured {
                Measure::Exit(r) if r == reason => {
                    hist.record(ns);
                    recorded += 1;
                }
                Measure::Exit(_) => {}
                Measure::Instruction => {
                    if let Some(total) = chain.exit(reason, rip, ns) {
                        hist.record(total);
                        recorded += 1;
                    }
                }
            }
            if done {
                return Ok(recorded);
            }
        }
    }

    /// One KVM_RUN: `Ok(true)` with an exit to serve, `Ok(false)` when a
    /// signal interrupted it.
    fn enter(&mut self) -> Result<bool, BenchError> {
        match self.vcpu.run() {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(false),
            Err(err) => Err(BenchError::Kvm(kvm::KvmError::Ioctl { op: "KVM_RUN", err })),
        }
    }

    /// Runs the guest for `runs` KVM_RUNs and returns each one's duration
    /// (for guests that do their work inside KVM between two exits).
    pub fn time_runs(&mut self, runs: usize) -> Result<Vec<u64>, BenchError> {
        let mut out = Vec::with_capacity(runs);
        while out.len() < runs {
            let t0 = Instant::now();
            if !self.enter()? {
                continue;
            }
            let ns = t0.elapsed().as_nanos() as u64;
            match run_page::decode(self.vcpu.get_kvm_run()) {
                Exit::Io { out: true, .. } => out.push(ns),
                other => {
                    return Err(BenchError::Guest(format!(
                        "floor: unexpected exit {}",
                        other.reason().name()
                    )))
                }
            }
        }
        Ok(out)
    }

    fn skip_insn(
        &mut self,
        bytes: &[u8],
        cache: &mut Option<(u64, u64)>,
    ) -> Result<(), BenchError> {
        let regs = &mut self.vcpu.sync_regs_mut().regs;
        let rip = regs.rip;
        let len = match *cache {
            Some((at, len)) if at == rip => len,
            _ => {
                let insn = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE).decode();
                if insn.is_invalid() {
                    return Err(BenchError::Guest(format!(
                        "floor: cannot decode the instruction at {rip:#x}"
                    )));
                }
                let len = insn.len() as u64;
                *cache = Some((rip, len));
                len
            }
        };
        regs.rip = rip + len;
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
        Ok(())
    }
}

fn create_memory(vm: &VmFd) -> Result<GuestMemoryMmap, BenchError> {
    kvm::memory::create_guest_memory(vm, GUEST_RAM)
        .map_err(|e| BenchError::Setup(format!("guest memory: {e}")))
}
