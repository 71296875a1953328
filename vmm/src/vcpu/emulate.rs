//! Emulation-failure exits: KVM's emulator gave up on the instruction at
//! RIP. The `emul` crate completes it in an ITS-safe host stub; this module
//! translates between KVM's register state and the emulator's.

use super::platform::GuestPhys;
use crate::kvm::xsave::{KvmVectorState, XsaveBuf};
use crate::vm::Shared;
use emul::{CpuState, Outcome, Segment};
use iced_x86::Mnemonic;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_sync_regs};
use kvm_ioctls::VcpuFd;

/// What to do with an instruction outside the emulator's allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnsupported {
    /// Report it and stop the VM.
    Stop,
    /// Inject #UD, as a CPU without the instruction would.
    InjectUd,
}

/// What the run loop must do after an emulation.
pub enum Completion {
    /// Registers changed (write back GPRs through sync regs).
    Done,
    /// Inject this exception (events, and CR2 for #PF, through sync regs).
    Inject {
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
    },
    /// Registers changed, and `vector` must be delivered through the guest's
    /// IDT (INT n, INT3, INTO) with RIP, already past the instruction, as
    /// the return address.
    Interrupt { vector: u8 },
    /// Registers changed, and the guest's TLB must be flushed (INVPCID).
    FlushTlb,
    /// End the VM with this message.
    Stop(String),
    /// A device asked to end the VM during an emulated MMIO access.
    DeviceStop(crate::bus::BusAction),
}

/// Per-vCPU instruction completion.
pub struct Emulator {
    emu: emul::Emulator,
    xsave: XsaveBuf,
    /// The guest's MAXPHYADDR, from its CPUID (fixed for the VM's life).
    max_phys_bits: u8,
    on_unsupported: OnUnsupported,
    /// Emulated instructions per mnemonic (`--stats`), indexed by
    /// `Mnemonic as usize`; allocated once.
    per_mnemonic: Option<Vec<u64>>,
}

impl Emulator {
    pub fn new(
        its_on: bool,
        max_phys_bits: u8,
        on_unsupported: OnUnsupported,
        stats: bool,
    ) -> Result<Self, emul::EmulError> {
        Ok(Emulator {
            emu: emul::Emulator::new(its_on)?,
            xsave: XsaveBuf::default(),
            max_phys_bits,
            on_unsupported,
            per_mnemonic: stats.then(|| vec![0; Mnemonic::values().count()]),
        })
    }

    /// What the guest's CPUID offers of the system instructions.
    pub fn set_system_features(&mut self, f: emul::system::SystemFeatures) {
        self.emu.set_system_features(f);
    }

    /// The guest's MAXPHYADDR this emulator walks page tables with.
    pub fn max_phys_bits(&self) -> u8 {
        self.max_phys_bits
    }

    /// Runs the stub self-test on this vCPU's own buffer; `Err` lists the
    /// cases that did not match.
    pub fn selftest(&mut self) -> Result<(), String> {
        let cases = emul::stub::selftest::run_with(self.emu.stub_mut());
        if emul::stub::selftest::all_passed(&cases) {
            Ok(())
        } else {
            Err(cases
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join("\n"))
        }
    }

    /// Completes the instruction at RIP. `sync` holds the vCPU's registers
    /// (from KVM_CAP_SYNC_REGS); on `Done` its GPRs and RIP are updated.
    pub fn complete(
        &mut self,
        vcpu: u8,
        fd: &VcpuFd,
        sync: &mut kvm_sync_regs,
        bytes: &[u8],
        shared: &Shared,
    ) -> Completion {
        let mut cpu = cpu_state(&sync.regs, &sync.sregs, self.max_phys_bits);
        let mut phys = GuestPhys {
            mem: &shared.mem,
            mmio: &shared.buses.mmio,
            stop: None,
        };
        let mut vec = KvmVectorState::new(fd, &mut self.xsave);
        let outcome = self.emu.emulate(&mut cpu, bytes, &mut vec, &mut phys);
        if let Err(e) = vec.write_back() {
            return Completion::Stop(format!(
                "vcpu {vcpu}: KVM_SET_XSAVE failed at rip {:#x}: {e}",
                sync.regs.rip
            ));
        }
        if let Some(stop) = phys.stop {
            return Completion::DeviceStop(stop);
        }
        match outcome {
            Outcome::Done { mnemonic } => {
                if let Some(counts) = &mut self.per_mnemonic {
                    if let Some(c) = counts.get_mut(mnemonic as usize) {
                        *c += 1;
                    }
                }
                write_gprs(&cpu, &mut sync.regs);
                Completion::Done
            }
            Outcome::Exception {
                vector,
                error_code,
                cr2,
            } => Completion::Inject {
                vector,
                error_code,
                cr2,
            },
            Outcome::Unsupported { text } => match self.on_unsupported {
                OnUnsupported::Stop => Completion::Stop(format!(
                    "vcpu {vcpu}: unsupported instruction `{text}` at rip {:#x} ({}-bit, bytes {})",
                    sync.regs.rip,
                    cpu.bitness(),
                    hex(bytes)
                )),
                OnUnsupported::InjectUd => {
                    log::warn!(
                        "vcpu {vcpu}: unsupported `{text}` at rip {:#x}: injecting #UD",
                        sync.regs.rip
                    );
                    Completion::Inject {
                        vector: 6,
                        error_code: None,
                        cr2: None,
                    }
                }
            },
            Outcome::Platform(e) => {
                Completion::Stop(format!("vcpu {vcpu}: at rip {:#x}: {e}", sync.regs.rip))
            }
            Outcome::SoftwareInterrupt { vector } => {
                write_gprs(&cpu, &mut sync.regs);
                Completion::Interrupt { vector }
            }
            Outcome::FlushTlb { mnemonic } => {
                if let Some(c) = self
                    .per_mnemonic
                    .as_mut()
                    .and_then(|c| c.get_mut(mnemonic as usize))
                {
                    *c += 1;
                }
                write_gprs(&cpu, &mut sync.regs);
                Completion::FlushTlb
            }
        }
    }

    /// Emulated instructions per mnemonic, most frequent first.
    pub fn mnemonic_counts(&self) -> Vec<(Mnemonic, u64)> {
        let Some(counts) = &self.per_mnemonic else {
            return Vec::new();
        };
        let mut v: Vec<(Mnemonic, u64)> = Mnemonic::values()
            .filter_map(|m| counts.get(m as usize).filter(|c| **c > 0).map(|c| (m, *c)))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }
}

fn segment(s: &kvm_segment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        type_: s.type_,
        dpl: s.dpl,
        db: s.db != 0,
        l: s.l != 0,
        present: s.present != 0,
        unusable: s.unusable != 0,
    }
}

/// The emulator's view of the vCPU.
pub fn cpu_state(r: &kvm_regs, s: &kvm_sregs, max_phys_bits: u8) -> CpuState {
    const CR0_PE: u64 = 1;
    CpuState {
        gprs: emul::stub::GuestGprs {
            rax: r.rax,
            rcx: r.rcx,
            rdx: r.rdx,
            rbx: r.rbx,
            rsp: r.rsp,
            rbp: r.rbp,
            rsi: r.rsi,
            rdi: r.rdi,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rflags: r.rflags,
        },
        rip: r.rip,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        cs: segment(&s.cs),
        ss: segment(&s.ss),
        ds: segment(&s.ds),
        es: segment(&s.es),
        fs: segment(&s.fs),
        gs: segment(&s.gs),
        // CPL is SS.DPL in protected mode (CS.DPL differs for conforming
        // code); always 0 in real mode.
        cpl: if s.cr0 & CR0_PE != 0 { s.ss.dpl } else { 0 },
        max_phys_bits,
    }
}

fn write_gprs(cpu: &CpuState, r: &mut kvm_regs) {
    let g = &cpu.gprs;
    r.rax = g.rax;
    r.rcx = g.rcx;
    r.rdx = g.rdx;
    r.rbx = g.rbx;
    r.rbp = g.rbp;
    r.rsi = g.rsi;
    r.rdi = g.rdi;
    r.r8 = g.r8;
    r.r9 = g.r9;
    r.r10 = g.r10;
    r.r11 = g.r11;
    r.r12 = g.r12;
    r.r13 = g.r13;
    r.r14 = g.r14;
    r.r15 = g.r15;
    r.rflags = g.rflags;
    r.rip = cpu.rip;
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
