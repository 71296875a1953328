//! `host-emul`: the VMM's per-instruction work with no KVM involved:
//! decode, translate (page walk), stage, re-encode, build and run the stub,
//! write back, on a mock guest (a `Vec` of RAM with an identity map and an
//! MMIO window).

use super::report::PathResult;
use crate::stats::LatencyHistogram;
use emul::{CpuState, Emulator, Outcome, Platform, PlatformError, XsaveImage};
use iced_x86::code_asm::*;
use std::time::Instant;

const RAM_SIZE: u64 = 4 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD_LOW: u64 = 0x3000;
const PD_3G: u64 = 0x4000;
const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const MMIO: u64 = 0xd000_0000;
const MMIO_SIZE: u64 = 0x1000;

/// RAM at 0 and an MMIO window served from a `Vec`, like `--mmio-ram`.
struct MockGuest {
    ram: Vec<u8>,
    mmio: Vec<u8>,
}

impl MockGuest {
    fn new() -> Self {
        let mut g = MockGuest {
            ram: vec![0; RAM_SIZE as usize],
            mmio: vec![0; MMIO_SIZE as usize],
        };
        // Identity map of the first and the fourth GiB in 2 MiB pages, as
        // the VMM's long-mode entry state has it.
        const P_RW: u64 = 0x3;
        const PS: u64 = 0x80;
        g.put(PML4, PDPT | P_RW);
        g.put(PDPT, PD_LOW | P_RW);
        g.put(PDPT + 3 * 8, PD_3G | P_RW);
        for i in 0..512u64 {
            g.put(PD_LOW + i * 8, (i << 21) | P_RW | PS);
            g.put(PD_3G + i * 8, ((3 << 30) + (i << 21)) | P_RW | PS);
        }
        g
    }

    fn put(&mut self, gpa: u64, v: u64) {
        let at = gpa as usize;
        self.ram[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn slot(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], PlatformError> {
        let err = PlatformError {
            gpa,
            len,
            reason: "unbacked",
        };
        let (buf, off) = if (MMIO..MMIO + MMIO_SIZE).contains(&gpa) {
            (&mut self.mmio, gpa - MMIO)
        } else {
            (&mut self.ram, gpa)
        };
        let off = off as usize;
        buf.get_mut(off..off + len).ok_or(err)
    }
}

impl Platform for MockGuest {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        buf.copy_from_slice(self.slot(gpa, buf.len())?);
        Ok(())
    }
    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
        self.slot(gpa, buf.len())?.copy_from_slice(buf);
        Ok(())
    }
}

type Emit = fn(&mut CodeAssembler) -> Result<(), IcedError>;

/// The mix: GPR and vector instructions on RAM and MMIO, and a
/// register-only one.
const MIX: &[(&str, Emit)] = &[
    ("add [rax], ebx", |a| a.add(dword_ptr(rax), ebx)),
    ("mov [rsi], eax (mmio)", |a| a.mov(dword_ptr(rsi), eax)),
    ("lock cmpxchg16b [rsi] (mmio)", |a| {
        a.lock().cmpxchg16b(xmmword_ptr(rsi))
    }),
    ("adcx rax, rbx", |a| a.adcx(rax, rbx)),
    ("vmovdqu ymm0, [rsi] (mmio)", |a| {
        a.vmovdqu(ymm0, ymmword_ptr(rsi))
    }),
    ("vpaddd ymm0, ymm0, [rax]", |a| {
        a.vpaddd(ymm0, ymm0, ymmword_ptr(rax))
    }),
];

/// Times `emul::Emulator::emulate` per instruction over the mix.
pub fn host_emul(iters: u32, runs: u32, its: emul::stub::ItsMode) -> PathResult {
    let mut hist = LatencyHistogram::default();
    let r = measure(iters, runs, its.resolve().enabled, &mut hist);
    let (error, notes) = match r {
        Ok(skipped) => {
            let mut notes = format!(
                "emul::Emulator::emulate on a mock guest (RAM + MMIO window, XSAVE image in memory), \
                 per instruction, no KVM; mix: {}",
                MIX.iter().map(|(n, _)| *n).collect::<Vec<_>>().join("; ")
            );
            if !skipped.is_empty() {
                notes.push_str(&format!(
                    "; not completed, left out: {}",
                    skipped.join("; ")
                ));
            }
            (None, notes)
        }
        Err(e) => (Some(e), String::new()),
    };
    let mut p = PathResult::from_side("host-emul", None, &hist, error);
    p.notes = (!notes.is_empty()).then_some(notes);
    p
}

/// Returns the mix entries the emulator did not complete.
fn measure(
    iters: u32,
    runs: u32,
    its_on: bool,
    hist: &mut LatencyHistogram,
) -> Result<Vec<String>, String> {
    let mut emu = Emulator::new(its_on).map_err(|e| e.to_string())?;
    let mut guest = MockGuest::new();
    let mut xsave = XsaveImage::new();
    let mut base = CpuState::long_mode(PML4);
    base.rip = CODE;
    base.gprs.rax = DATA;
    base.gprs.rsi = MMIO;
    let mut mix = Vec::new();
    let mut skipped = Vec::new();
    for (name, emit) in MIX {
        let mut a = CodeAssembler::new(64).map_err(|e| e.to_string())?;
        emit(&mut a).map_err(|e| e.to_string())?;
        let bytes = a.assemble(CODE).map_err(|e| e.to_string())?;
        let mut cpu = base;
        match emu.emulate(&mut cpu, &bytes, &mut xsave, &mut guest) {
            Outcome::Done { .. } => mix.push(bytes),
            other => skipped.push(format!("{name} ({other:?})")),
        }
    }
    if mix.is_empty() {
        return Err(format!(
            "the emulator completed none of the mix: {skipped:?}"
        ));
    }
    let per_insn = (iters as usize / mix.len()).max(1);
    for _ in 0..runs {
        for _ in 0..per_insn {
            for bytes in &mix {
                let mut cpu = base;
                let t0 = Instant::now();
                let o = emu.emulate(&mut cpu, bytes, &mut xsave, &mut guest);
                let ns = t0.elapsed().as_nanos() as u64;
                if !matches!(o, Outcome::Done { .. }) {
                    return Err(format!("emulation stopped completing: {o:?}"));
                }
                hist.record(ns);
            }
        }
    }
    Ok(skipped)
}
