//! A complete, minimal VMM on kvm-ioctls that uses `emul` to finish what
//! KVM's own instruction emulator cannot: an SSE arithmetic instruction
//! whose operand is MMIO.
//!
//! The guest (64-bit, CPL 0) runs
//!
//! ```text
//! mov    ebx, 0x10000000          ; a 32-byte MMIO device
//! addps  xmm0, [rbx]              ; KVM cannot emulate this: emulation-failure exit
//! addps  xmm0, [rbx]              ;   (completed here by emul::Emulator::emulate)
//! movups [rbx+0x10], xmm0         ; a plain SSE move: KVM's own MMIO exits
//! hlt
//! ```
//!
//! The device's first 16 bytes hold the floats 1, 2, 3, 4, so the device
//! must receive 2, 4, 6, 8 at offset 0x10. The example prints what it saw
//! and exits 0 when that holds, 1 when not, 2 when KVM is missing.
//!
//! Run it with `cargo run -p emul --example kvm_vector_mmio` (needs
//! read-write /dev/kvm).
//!
//! For clarity this VMM reads and writes registers with KVM_GET/SET_REGS
//! and SREGS; a VMM that cares about exit latency uses KVM_CAP_SYNC_REGS
//! instead, as the `vmm` crate of this workspace does.

use emul::{CpuState, Emulator, GuestGprs, Outcome, Platform, PlatformError, Segment, VectorState};
use kvm_bindings::{
    kvm_enable_cap, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_xsave,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use std::process::ExitCode;

/// Guest RAM: 2 MiB at guest-physical 0.
const RAM_SIZE: usize = 2 << 20;
/// Page tables: PML4, PDPT, one page directory (2 MiB pages, 1 GiB mapped).
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
/// Where the guest code is loaded and entered.
const CODE: u64 = 0x8000;
/// The MMIO device: 32 bytes, outside RAM but inside the identity map.
const DEVICE: u64 = 0x1000_0000;
const DEVICE_LEN: u64 = 32;

const GUEST_CODE: &[u8] = &[
    0xbb, 0x00, 0x00, 0x00, 0x10, // mov ebx, 0x10000000
    0x0f, 0x58, 0x03, // addps xmm0, [rbx]
    0x0f, 0x58, 0x03, // addps xmm0, [rbx]
    0x0f, 0x11, 0x43, 0x10, // movups [rbx+0x10], xmm0
    0xf4, // hlt
];

/// KVM_CAP_EXIT_ON_EMULATION_FAILURE (Linux 5.15+): every instruction KVM's
/// emulator gives up on exits to userspace, with its bytes, instead of KVM
/// injecting #UD into the guest.
const KVM_CAP_EXIT_ON_EMULATION_FAILURE: u32 = 204;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kvm_vector_mmio: {e}");
            ExitCode::from(2)
        }
    }
}

/// Guest RAM, an anonymous mapping KVM also maps into the guest.
struct GuestRam {
    host: *mut u8,
}

impl GuestRam {
    fn new() -> Result<Self, String> {
        // SAFETY: an anonymous private mapping; no existing memory is
        // touched, and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err("cannot map guest RAM".into());
        }
        Ok(GuestRam { host: p.cast() })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `host` is a live RAM_SIZE mapping owned by `self`; the
        // vCPU only runs inside `VcpuFd::run`, never while this borrow lives
        // (one thread).
        unsafe { std::slice::from_raw_parts_mut(self.host, RAM_SIZE) }
    }

    fn write(&mut self, gpa: u64, data: &[u8]) {
        let at = gpa as usize;
        self.bytes()[at..at + data.len()].copy_from_slice(data);
    }
}

/// The MMIO device: 32 bytes of registers.
struct Device {
    regs: [u8; DEVICE_LEN as usize],
}

impl Device {
    fn read(&self, addr: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = addr + i as u64 - DEVICE;
            *b = self.regs.get(off as usize).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(r) = self.regs.get_mut((addr + i as u64 - DEVICE) as usize) {
                *r = *b;
            }
        }
    }
}

/// What `emul` sees of guest-physical memory: RAM, else the device, else an
/// open bus (all-ones, writes dropped). The emulator never crosses a page.
struct Phys<'a> {
    ram: &'a mut GuestRam,
    device: &'a mut Device,
}

impl Platform for Phys<'_> {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        if gpa + buf.len() as u64 <= RAM_SIZE as u64 {
            let at = gpa as usize;
            buf.copy_from_slice(&self.ram.bytes()[at..at + buf.len()]);
        } else if (DEVICE..DEVICE + DEVICE_LEN).contains(&gpa) {
            self.device.read(gpa, buf);
        } else {
            buf.fill(0xff);
        }
        Ok(())
    }

    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
        if gpa + buf.len() as u64 <= RAM_SIZE as u64 {
            self.ram.write(gpa, buf);
        } else if (DEVICE..DEVICE + DEVICE_LEN).contains(&gpa) {
            self.device.write(gpa, buf);
        }
        Ok(())
    }
}

/// The guest's vector state, fetched from KVM only if the instruction needs
/// it (each ioctl costs microseconds) and written back only if changed.
struct KvmVectorState<'a> {
    vcpu: &'a VcpuFd,
    image: Option<Vec<u8>>,
    dirty: bool,
}

impl VectorState for KvmVectorState<'_> {
    fn image(&mut self) -> Result<&mut [u8], PlatformError> {
        let image = match self.image.take() {
            Some(image) => image,
            None => {
                // Kept simple. A VMM on a hot path reads the image into a
                // reused, 64-byte aligned buffer instead: KVM copies it with
                // `rep movsb`, slow on AMD Zen 3 into a misaligned
                // destination (see the vmm crate's `kvm/xsave.rs`).
                let x = self.vcpu.get_xsave().map_err(|_| PlatformError {
                    gpa: 0,
                    len: 4096,
                    reason: "KVM_GET_XSAVE failed",
                })?;
                x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
            }
        };
        Ok(self.image.insert(image))
    }

    fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    fn xcr0(&mut self) -> Result<u64, PlatformError> {
        let xcrs = self.vcpu.get_xcrs().map_err(|_| PlatformError {
            gpa: 0,
            len: 0,
            reason: "KVM_GET_XCRS failed",
        })?;
        Ok(xcrs.xcrs[..xcrs.nr_xcrs as usize]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value))
    }
}

impl KvmVectorState<'_> {
    fn write_back(self) -> Result<(), String> {
        let (true, Some(image)) = (self.dirty, self.image) else {
            return Ok(());
        };
        let mut x = kvm_xsave::default();
        for (w, c) in x.region.iter_mut().zip(image.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        // SAFETY: a complete legacy 4096-byte image, as KVM_GET_XSAVE gave
        // it; this VM enables no state beyond it (no AMX).
        unsafe { self.vcpu.set_xsave(&x) }.map_err(|e| format!("KVM_SET_XSAVE: {e}"))
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

/// The emulator's view of the vCPU, from KVM's registers.
fn cpu_state(r: &kvm_regs, s: &kvm_sregs, max_phys_bits: u8) -> CpuState {
    CpuState {
        gprs: GuestGprs {
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
        // CPL is SS.DPL in protected mode.
        cpl: if s.cr0 & 1 != 0 { s.ss.dpl } else { 0 },
        max_phys_bits,
    }
}

fn write_gprs(cpu: &CpuState, r: &mut kvm_regs) {
    let g = &cpu.gprs;
    (r.rax, r.rcx, r.rdx, r.rbx) = (g.rax, g.rcx, g.rdx, g.rbx);
    (r.rsp, r.rbp, r.rsi, r.rdi) = (g.rsp, g.rbp, g.rsi, g.rdi);
    (r.r8, r.r9, r.r10, r.r11) = (g.r8, g.r9, g.r10, g.r11);
    (r.r12, r.r13, r.r14, r.r15) = (g.r12, g.r13, g.r14, g.r15);
    r.rflags = g.rflags;
    r.rip = cpu.rip;
}

/// Builds the VM, runs the guest to its HLT, and checks what the device got.
fn run() -> Result<bool, String> {
    let err = |what: &'static str| move |e: kvm_ioctls::Error| format!("{what}: {e}");
    let kvm = Kvm::new().map_err(err("cannot open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
    let cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(err("KVM_ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)"))?;

    let mut ram = GuestRam::new()?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: RAM_SIZE as u64,
        userspace_addr: ram.host as u64,
    };
    // SAFETY: the region is the live mapping `ram`, which outlives the VM
    // (dropped after it at the end of this function; never unmapped).
    unsafe { vm.set_user_memory_region(region) }.map_err(err("KVM_SET_USER_MEMORY_REGION"))?;
    // Identity map of the first GiB with 2 MiB pages (present, writable).
    ram.write(PML4, &(PDPT | 3).to_le_bytes());
    ram.write(PDPT, &(PD | 3).to_le_bytes());
    for i in 0..512u64 {
        ram.write(PD + i * 8, &((i << 21) | 0x83).to_le_bytes());
    }
    ram.write(CODE, GUEST_CODE);

    let mut vcpu = vm.create_vcpu(0).map_err(err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    // The guest's MAXPHYADDR (CPUID 0x80000008 EAX[7:0]) for the page walk.
    let max_phys_bits = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(36, |e| e.eax as u8);

    let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr3 = PML4;
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10); // PAE, OSFXSR, OSXMMEXCPT
    sregs.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 31); // PE, MP, ET, NE, PG
    sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: CODE,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;

    let mut device = Device {
        regs: [0; DEVICE_LEN as usize],
    };
    for (i, f) in [1.0f32, 2.0, 3.0, 4.0].iter().enumerate() {
        device.regs[i * 4..i * 4 + 4].copy_from_slice(&f.to_le_bytes());
    }
    // ITS-safe stubs when the host needs them (its sysfs verdict, else the CPU).
    let mut emulator = Emulator::new(emul::stub::detect().enabled).map_err(|e| e.to_string())?;
    let mut completed = 0;

    loop {
        match vcpu.run().map_err(err("KVM_RUN"))? {
            VcpuExit::MmioRead(addr, data) => device.read(addr, data),
            VcpuExit::MmioWrite(addr, data) => device.write(addr, data),
            VcpuExit::Hlt => break,
            VcpuExit::InternalError => {
                // kvm-ioctls reports the exit bare: the instruction bytes are
                // in the run page.
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for
                // which the kernel fills this member of the union.
                let fail = unsafe { run.__bindgen_anon_1.emulation_failure };
                if fail.suberror != KVM_INTERNAL_ERROR_EMULATION {
                    return Err(format!("KVM internal error {}", fail.suberror));
                }
                let mut bytes = [0u8; 15];
                let mut len = 0;
                if fail.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
                {
                    // SAFETY: the flag says KVM filled the instruction bytes.
                    let insn = unsafe { fail.__bindgen_anon_1.__bindgen_anon_1 };
                    len = usize::from(insn.insn_size).min(15);
                    bytes[..len].copy_from_slice(&insn.insn_bytes[..len]);
                }
                let mut regs = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?;
                let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
                let mut cpu = cpu_state(&regs, &sregs, max_phys_bits);
                let mut vec = KvmVectorState {
                    vcpu: &vcpu,
                    image: None,
                    dirty: false,
                };
                // Short or missing bytes are fine: the emulator fetches the
                // rest through the guest's page tables.
                let outcome = emulator.emulate(
                    &mut cpu,
                    &bytes[..len],
                    &mut vec,
                    &mut Phys {
                        ram: &mut ram,
                        device: &mut device,
                    },
                );
                vec.write_back()?;
                match outcome {
                    Outcome::Done { mnemonic } => {
                        println!("emulated {mnemonic:?} at rip {:#x}", regs.rip);
                        write_gprs(&cpu, &mut regs);
                        vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
                        completed += 1;
                    }
                    Outcome::Exception {
                        vector,
                        error_code,
                        cr2,
                    } => {
                        let mut ev = vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
                        ev.exception.injected = 1;
                        ev.exception.nr = vector;
                        ev.exception.has_error_code = u8::from(error_code.is_some());
                        ev.exception.error_code = error_code.unwrap_or(0);
                        vcpu.set_vcpu_events(&ev)
                            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
                        if let Some(cr2) = cr2 {
                            let mut s = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
                            s.cr2 = cr2;
                            vcpu.set_sregs(&s).map_err(err("KVM_SET_SREGS"))?;
                        }
                    }
                    Outcome::Unsupported { text } => {
                        return Err(format!("guest instruction not completed: {text}"))
                    }
                    Outcome::Platform(e) => return Err(e.to_string()),
                    // Another vCPU kept winning a race: nothing changed,
                    // run the instruction again (one vCPU here: never).
                    Outcome::Retry => {}
                    Outcome::SoftwareInterrupt { vector } => {
                        // INT n: RIP is already past it; an injected
                        // interrupt pushes that RIP as the return address.
                        write_gprs(&cpu, &mut regs);
                        vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
                        let mut ev = vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
                        ev.interrupt.injected = 1;
                        ev.interrupt.nr = vector;
                        ev.interrupt.soft = 0;
                        vcpu.set_vcpu_events(&ev)
                            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
                    }
                    Outcome::FlushTlb { .. } => {
                        // INVPCID: KVM_SET_SREGS flushes the guest TLB when
                        // CR4 changes; toggle CR4.PGE and put it back.
                        write_gprs(&cpu, &mut regs);
                        vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
                        let s = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
                        let mut toggled = s;
                        toggled.cr4 ^= 1 << 7;
                        vcpu.set_sregs(&toggled).map_err(err("KVM_SET_SREGS"))?;
                        vcpu.set_sregs(&s).map_err(err("KVM_SET_SREGS"))?;
                    }
                }
            }
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }

    let got: Vec<f32> = device.regs[16..32]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    println!("device received {got:?} after {completed} emulated instruction(s)");
    Ok(got == [2.0, 4.0, 6.0, 8.0] && completed >= 2)
}
