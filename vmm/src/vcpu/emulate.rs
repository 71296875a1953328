//! Emulation-failure exits: KVM's emulator gave up on the instruction at
//! RIP. The `emul` crate completes it in an ITS-safe host stub; this module
//! translates between KVM's register state and the emulator's.

use super::platform::GuestPhys;
use super::IoctlCounts;
use crate::kvm::xsave::{KvmVectorState, XsaveBuf};
use crate::vm::Shared;
use emul::{CpuState, Outcome, Segment};
use iced_x86::Mnemonic;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
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
    /// Nothing changed: resume the vCPU at the same instruction (another
    /// vCPU kept winning a race the emulator needed; see
    /// [`emul::Outcome::Retry`]).
    Retry,
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
    ioctls: IoctlCounts,
    /// The CPU reaches a VEX/EVEX access under the guest's XCR0 before it
    /// can exit (hardware KVM), so the XCR0 #UD check needs no ioctl. Not
    /// on PVM: CPL 0 code is interpreted, and CPL 3 code runs under the
    /// host's control state (see [`host_controls`]).
    cpu_checks_xcr0: bool,
    /// On PVM, the host's XCR0 (what 64-bit CPL 3 code runs under) within
    /// the components the VMM switches (see [`host_controls`]).
    pvm_user_xcr0: Option<u64>,
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
            ioctls: IoctlCounts::default(),
            cpu_checks_xcr0: !crate::kvm::is_pvm(),
            pvm_user_xcr0: crate::kvm::is_pvm()
                .then(|| emul::stub::host_xcr0() & emul::stub::VECTOR_XFEATURES),
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
    /// cases that did not match. A case the host CPU itself gets wrong
    /// (QEMU's TCG, see [`crate::selftest::host_cpu`]) is logged, not fatal:
    /// guests see that CPU's behaviour natively too.
    pub fn selftest(&mut self) -> Result<(), String> {
        let cases = emul::stub::selftest::run_with(self.emu.stub_mut());
        if emul::stub::selftest::all_passed(&cases) {
            return Ok(());
        }
        let cpu = crate::selftest::host_cpu();
        let mut unexplained = Vec::new();
        for c in cases.iter().filter(|c| !c.passed()) {
            match emul::stub::selftest::explained_by(c, cpu) {
                Some(d) => log::warn!("{c}: the host CPU's own behaviour ({d})"),
                None => unexplained.push(c.to_string()),
            }
        }
        if unexplained.is_empty() {
            Ok(())
        } else {
            Err(unexplained.join("\n"))
        }
    }

    /// The XSAVE ioctls made so far.
    pub fn ioctl_counts(&self) -> IoctlCounts {
        self.ioctls
    }

    /// Completes the instruction at RIP. `regs` and `sregs` are the vCPU's
    /// registers; on `Done` the GPRs and RIP in `regs` are updated.
    pub fn complete(
        &mut self,
        vcpu: u8,
        fd: &VcpuFd,
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
        bytes: &[u8],
        shared: &Shared,
    ) -> Completion {
        let mut cpu = cpu_state(regs, sregs, self.max_phys_bits);
        let mut phys = GuestPhys {
            mem: &shared.mem,
            mmio: &shared.buses.mmio,
            stop: None,
        };
        let xcr0_in_force = self
            .pvm_user_xcr0
            .filter(|_| cpu.cpl == 3 && cpu.bitness() == 64);
        if let Some(xcr0) = xcr0_in_force {
            host_controls(&mut cpu, xcr0);
        }
        let mut vec = KvmVectorState::new(fd, &mut self.xsave, self.cpu_checks_xcr0, xcr0_in_force);
        let outcome = self.emu.emulate(&mut cpu, bytes, &mut vec, &mut phys);
        self.ioctls.get_xsave += u64::from(vec.fetched());
        self.ioctls.get_xcrs += u64::from(vec.read_xcr0());
        match vec.write_back() {
            Ok(wrote) => self.ioctls.set_xsave += u64::from(wrote),
            Err(e) => {
                return Completion::Stop(format!(
                    "vcpu {vcpu}: KVM_SET_XSAVE failed at rip {:#x}: {e}",
                    regs.rip
                ))
            }
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
                write_gprs(&cpu, regs);
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
                    regs.rip,
                    cpu.bitness(),
                    hex(bytes)
                )),
                OnUnsupported::InjectUd => {
                    log::warn!(
                        "vcpu {vcpu}: unsupported `{text}` at rip {:#x}: injecting #UD",
                        regs.rip
                    );
                    Completion::Inject {
                        vector: 6,
                        error_code: None,
                        cr2: None,
                    }
                }
            },
            Outcome::Platform(e) => {
                Completion::Stop(format!("vcpu {vcpu}: at rip {:#x}: {e}", regs.rip))
            }
            Outcome::Retry => Completion::Retry,
            Outcome::SoftwareInterrupt { vector } => {
                write_gprs(&cpu, regs);
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
                write_gprs(&cpu, regs);
                Completion::FlushTlb
            }
        }
    }

    /// Builds now what the first emulated instruction would otherwise
    /// build while the guest waits (~0.6 ms): iced-x86's decoder and
    /// instruction-info tables (built on first use, once per process),
    /// the stub's bounce and XSAVE pages, this vCPU's XSAVE
    /// buffer and KVM's XSAVE path. Runs a GPR, a vector and a fetched
    /// instruction on a mock guest (32-bit flat, no paging) and reads the
    /// vCPU's XSAVE image once. Called on the vCPU's own thread (the stub's
    /// fault recovery is per thread) before its first KVM_RUN.
    pub fn warm_up(&mut self, fd: &VcpuFd) {
        let mut vec = KvmVectorState::new(fd, &mut self.xsave, false, None);
        if let Err(e) = emul::VectorState::image(&mut vec) {
            log::debug!("warm-up: {e}");
        }
        let mut image = emul::XsaveImage::new();
        let mut mem = WarmUpMemory(vec![0u8; 3 * 4096]);
        // lock cmpxchg8b [esi]; vmovdqu ymm0, [esi]; adcx eax, ebx
        let code: [&[u8]; 3] = [
            &[0xf0, 0x0f, 0xc7, 0x0e],
            &[0xc5, 0xfe, 0x6f, 0x06],
            &[0x66, 0x0f, 0x38, 0xf6, 0xc3],
        ];
        mem.0[WARM_UP_CODE as usize..][..5].copy_from_slice(code[2]);
        for (i, insn) in code.iter().chain([&[][..]].iter()).enumerate() {
            // The last one is fetched from the mock's memory.
            for _ in 0..2 {
                let mut cpu = warm_up_cpu();
                let out = self.emu.emulate(&mut cpu, insn, &mut image, &mut mem);
                if !matches!(out, Outcome::Done { .. }) {
                    log::debug!("warm-up instruction {i}: {out:?}");
                }
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

/// Builds iced-x86's process-wide tables (decoder, instruction info) and
/// the emulator's allow-list view of them, for instructions of each
/// encoding the emulator meets (legacy, VEX, EVEX). About 1 ms on first
/// use; [`crate::vm::run`] runs this before the first KVM_RUN, so no guest
/// instruction waits for it. (The emulator needs no encoder tables: it
/// patches the guest's own bytes, see `emul::reencode`.)
pub fn warm_up_tables() {
    use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory};
    // lock cmpxchg16b [rsi]; vmovdqu ymm0, [rsi]; vpaddd zmm0{k1}, zmm1,
    // [rsi]; adcx rax, rbx; fld dword [rsi]
    let code: [&[u8]; 5] = [
        &[0xf0, 0x48, 0x0f, 0xc7, 0x0e],
        &[0xc5, 0xfe, 0x6f, 0x06],
        &[0x62, 0xf1, 0x75, 0x49, 0xfe, 0x06],
        &[0x66, 0x48, 0x0f, 0x38, 0xf6, 0xc3],
        &[0xd9, 0x06],
    ];
    let mut info = InstructionInfoFactory::new();
    for bytes in code {
        let insn = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode();
        let _ = info.info(&insn).used_memory().len();
        let _ = emul::classify::classify(&insn);
    }
}

/// Where the warm-up's mock guest has its code and its data.
const WARM_UP_CODE: u64 = 0x1000;
const WARM_UP_DATA: u64 = 0x2000;

/// The warm-up's mock guest memory: all RAM.
struct WarmUpMemory(Vec<u8>);

impl emul::Platform for WarmUpMemory {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), emul::PlatformError> {
        let src = usize::try_from(gpa)
            .ok()
            .and_then(|at| self.0.get(at..at + buf.len()))
            .ok_or(emul::PlatformError {
                gpa,
                len: buf.len(),
                reason: "outside the warm-up memory",
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), emul::PlatformError> {
        let dst = usize::try_from(gpa)
            .ok()
            .and_then(|at| self.0.get_mut(at..at + buf.len()))
            .ok_or(emul::PlatformError {
                gpa,
                len: buf.len(),
                reason: "outside the warm-up memory",
            })?;
        dst.copy_from_slice(buf);
        Ok(())
    }
}

/// 32-bit flat protected mode without paging, CPL 0, SSE and XSAVE on.
fn warm_up_cpu() -> CpuState {
    use emul::cpu::{CR0_MP, CR0_PE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE};
    let data = Segment::flat_data();
    let mut cpu = CpuState {
        rip: WARM_UP_CODE,
        cr0: CR0_PE | CR0_MP,
        cr4: CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE,
        cs: Segment { type_: 0xb, ..data },
        ss: data,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ..CpuState::default()
    };
    cpu.max_phys_bits = 52;
    cpu.gprs.rsi = WARM_UP_DATA;
    cpu.gprs.rflags = 0x2;
    cpu
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
        gdtr: emul::DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        ldtr: segment(&s.ldt),
        // CPL is SS.DPL in protected mode (CS.DPL differs for conforming
        // code); always 0 in real mode.
        cpl: if s.cr0 & CR0_PE != 0 { s.ss.dpl } else { 0 },
        max_phys_bits,
    }
}

/// PVM runs 64-bit CPL 3 code natively under the host's CR0 (EM, TS, AM),
/// CR4 (OSFXSR, OSXMMEXCPT, OSXSAVE) and XCR0, whatever the guest's kernel
/// set (kvm-facts.md). Measured on AMD EPYC Zen 3 under PVM by the
/// xcr0-user, ts-user, em-user and controls-user guests: XGETBV at CPL 3
/// returns the host's 0x207 after the kernel's XSETBV of 3; SSE, AVX and
/// x87 loads from RAM complete with CR0.TS or CR0.EM set; `divss` by zero
/// from RAM raises #XM with CR4.OSXMMEXCPT clear; a misaligned `fld` with
/// RFLAGS.AC raises #AC with CR0.AM clear. An instruction the VMM completes
/// for that code sees the same control state, so its MMIO accesses end as
/// its RAM accesses do; the stub runs under the host's state anyway, so
/// what the host raises the guest gets. XCR0 is the host's within the
/// components the VMM switches: a native XSAVE there also saves PKRU, which
/// the emulator's XSAVE leaves out (README: Behaviours that differ).
fn host_controls(cpu: &mut CpuState, host_xcr0: u64) {
    use emul::cpu::{CR0_AM, CR0_EM, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE};
    cpu.cr0 = (cpu.cr0 & !(CR0_EM | CR0_TS)) | CR0_AM;
    cpu.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
    if host_xcr0 != 0 {
        cpu.cr4 |= CR4_OSXSAVE;
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
