//! Guest-controlled input through the whole emulation path: random
//! instruction bytes, random register state, random paging modes and random
//! page-table contents. The emulator must never panic, never complete an
//! instruction outside the allow-list, only touch guest memory through the
//! platform, and always return (a hang fails the test by its time bound).
//!
//! `FUZZ_CASES` sets the number of cases (default 30,000) and `FUZZ_SEED`
//! the seed; the README records the largest run.

use emul::cpu::*;
use emul::stub::GuestGprs;
use emul::{
    CpuState, DescriptorTable, Emulator, Outcome, Platform, PlatformError, Segment, XsaveImage,
};
use std::time::{Duration, Instant};

/// Guest RAM of the mock VM; everything above is "MMIO".
const RAM: usize = 4 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, in_n: u64) -> bool {
        self.below(in_n) == 0
    }
}

/// RAM with random contents (so page walks read random entries), and an
/// MMIO space that records writes and reads as a fixed pattern.
struct FuzzPlatform {
    ram: Vec<u8>,
    mmio_writes: usize,
    bad_access: Option<(u64, usize)>,
}

impl Platform for FuzzPlatform {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        self.check(gpa, buf.len());
        match self.ram_slice(gpa, buf.len()) {
            Some(r) => buf.copy_from_slice(&self.ram[r]),
            None => buf.fill(0x5a),
        }
        Ok(())
    }

    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
        self.check(gpa, buf.len());
        match self.ram_slice(gpa, buf.len()) {
            Some(r) => self.ram[r].copy_from_slice(buf),
            None => self.mmio_writes += 1,
        }
        Ok(())
    }
}

impl FuzzPlatform {
    fn ram_slice(&self, gpa: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(gpa).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.ram.len()).then_some(start..end)
    }

    /// The emulator promises accesses that stay within one page (an
    /// operand piece, up to a page of a whole-state area, or a page-table
    /// entry).
    fn check(&mut self, gpa: u64, len: usize) {
        let crosses_page = (gpa & 0xfff) + len as u64 > 0x1000;
        if len == 0 || crosses_page {
            self.bad_access.get_or_insert((gpa, len));
        }
    }
}

fn random_cpu(rng: &mut Rng) -> CpuState {
    let mut cpu = CpuState::long_mode(rng.below(RAM as u64) & !0xfff);
    // MAXPHYADDR as CPUs report it (36 to 52 bits).
    cpu.max_phys_bits = 36 + rng.below(17) as u8;
    // Paging mode: 4-level, 5-level, PAE, 32-bit, or off (real/protected).
    match rng.below(6) {
        0 => cpu.cr4 |= CR4_LA57,
        1 => {
            cpu.efer &= !EFER_LMA;
            cpu.cs.l = false;
            cpu.cs.db = true;
            cpu.cr3 &= 0xffff_ffe0;
        }
        2 => {
            cpu.efer &= !EFER_LMA;
            cpu.cr4 &= !CR4_PAE;
            cpu.cr4 |= CR4_PSE;
            cpu.cs.l = false;
            cpu.cs.db = true;
        }
        3 => {
            cpu.efer &= !EFER_LMA;
            cpu.cr0 &= !CR0_PG;
            cpu.cs.l = false;
            cpu.cs.db = rng.chance(2);
        }
        4 => {
            cpu.efer &= !EFER_LMA;
            cpu.cr0 &= !(CR0_PG | CR0_PE);
            cpu.cs.l = false;
            cpu.cs.db = false;
            for s in [
                &mut cpu.cs,
                &mut cpu.ds,
                &mut cpu.es,
                &mut cpu.ss,
                &mut cpu.fs,
                &mut cpu.gs,
            ] {
                s.base = rng.below(0x10_0000) & !0xf;
                s.limit = 0xffff;
            }
        }
        _ => {}
    }
    if rng.chance(3) {
        cpu.cpl = 3;
        cpu.ss.dpl = 3;
        cpu.cs.dpl = 3;
    }
    if rng.chance(4) {
        cpu.cr0 &= !CR0_WP;
    }
    if rng.chance(4) {
        cpu.efer &= !EFER_NXE;
    }
    if rng.chance(4) {
        cpu.cr4 |= CR4_SMAP | CR4_SMEP;
    }
    if rng.chance(2) {
        cpu.cr0 |= CR0_AM;
    }
    if rng.chance(8) {
        // Odd segments: limits, bases, unusable.
        let seg: &mut Segment = match rng.below(3) {
            0 => &mut cpu.ds,
            1 => &mut cpu.ss,
            _ => &mut cpu.fs,
        };
        seg.limit = rng.next() as u32;
        seg.base = rng.next();
        seg.unusable = rng.chance(2);
    }
    let reg = |rng: &mut Rng| match rng.below(4) {
        0 => rng.next(),
        1 => rng.below(RAM as u64),
        2 => 0xd000_0000 + rng.below(0x4000),
        _ => rng.below(0x100),
    };
    cpu.gprs = GuestGprs {
        rax: reg(rng),
        rcx: reg(rng),
        rdx: reg(rng),
        rbx: reg(rng),
        rsp: reg(rng),
        rbp: reg(rng),
        rsi: reg(rng),
        rdi: reg(rng),
        r8: reg(rng),
        r9: reg(rng),
        r10: reg(rng),
        r11: reg(rng),
        r12: reg(rng),
        r13: reg(rng),
        r14: reg(rng),
        r15: reg(rng),
        // Arithmetic flags, sometimes AC (alignment checking with CR0.AM).
        rflags: 0x2 | (rng.next() & 0x8d5) | if rng.chance(3) { 1 << 18 } else { 0 },
    };
    cpu.rip = rng.below(RAM as u64);
    // Descriptor tables for LAR/LSL/VERR/VERW, taken from registers already
    // drawn (no new draws, so a seed's other cases, and the counts of runs
    // before the tables existed, stay comparable): often in RAM (the page
    // tables are random, so anywhere), any limit, LDTR usable or not.
    let g = cpu.gprs;
    cpu.gdtr = DescriptorTable {
        base: g.r14,
        limit: g.r15 as u16,
    };
    cpu.ldtr = Segment {
        selector: g.r11 as u16,
        base: g.r13,
        limit: g.r12 as u32 & 0xf_ffff,
        type_: 2,
        present: g.r11 & 0x1_0000 != 0,
        unusable: g.r11 & 0x2_0000 != 0,
        ..Segment::default()
    };
    cpu
}

/// Instruction bytes: random, or a random prefix/VEX/EVEX lead-in followed
/// by random bytes (so vector forms are reached often).
fn random_bytes(rng: &mut Rng, out: &mut [u8; 15]) {
    for b in out.iter_mut() {
        *b = rng.next() as u8;
    }
    // A memory ModRM (mod != 3) with a SIB byte, for the forms below.
    let mem_modrm = |rng: &mut Rng| (rng.below(3) as u8) << 6 | (rng.next() as u8 & 7) << 3 | 0b100;
    match rng.below(9) {
        0 => out[0] = 0xc5, // VEX2
        1 => out[0] = 0xc4, // VEX3
        2 => out[0] = 0x62, // EVEX
        3 => out[..2].copy_from_slice(&[0x0f, rng.next() as u8]),
        // 0F AE /0-/7 with memory: FXSAVE, FXRSTOR, LDMXCSR, STMXCSR,
        // XSAVE, XRSTOR, XSAVEOPT/CLWB, CLFLUSH(OPT); sometimes REX.W.
        4 => {
            let rex = if rng.chance(2) { 0x48 } else { 0x40 };
            // [base] with no SIB and no displacement, mostly.
            let modrm = if rng.chance(4) {
                mem_modrm(rng)
            } else {
                (rng.next() as u8 & 7) << 3 | [0, 1, 2, 3, 6, 7][rng.below(6) as usize]
            };
            out[..4].copy_from_slice(&[rex, 0x0f, 0xae, modrm]);
        }
        // VEX gathers: C4 E2 (W, vvvv, L, pp=01) 90-93, VSIB memory.
        5 => {
            let byte2 = (rng.next() as u8 & 0xfc) | 0x01;
            let op = 0x90 + rng.below(4) as u8;
            let modrm = mem_modrm(rng);
            out[..5].copy_from_slice(&[0xc4, 0xe2 | (rng.next() as u8 & 0x1f), byte2, op, modrm]);
        }
        // MASKMOVDQU / MASKMOVQ (register ModRM) and x87 environment forms.
        6 => {
            let modrm = 0xc0 | rng.next() as u8 & 0x3f;
            out[..4].copy_from_slice(&[0x66, 0x0f, 0xf7, modrm]);
            if rng.chance(2) {
                out[0] = 0x40 | rng.next() as u8 & 0xf;
            }
        }
        7 => {
            let (op, reg) = [(0xd9, 4), (0xd9, 6), (0xdd, 4), (0xdd, 6)][rng.below(4) as usize];
            let modrm = mem_modrm(rng) & !0x38 | reg << 3;
            out[..2].copy_from_slice(&[op, modrm]);
        }
        // MOVDIR64B r, m512, sometimes with a 32-bit address size (67h).
        8 => {
            let modrm = mem_modrm(rng);
            let at = usize::from(rng.chance(3));
            out[0] = 0x67;
            out[at..at + 5].copy_from_slice(&[0x66, 0x0f, 0x38, 0xf8, modrm]);
        }
        _ => {}
    }
}

/// The instruction families with their own completion path, counted so a
/// run shows it reached them.
const FAMILIES: [&str; 7] = [
    "whole state",
    "gather",
    "cache",
    "masked implicit",
    "x87 env",
    "direct store",
    "selector",
];

fn family_of(m: iced_x86::Mnemonic) -> Option<usize> {
    use iced_x86::Mnemonic as M;
    Some(match m {
        M::Fxsave
        | M::Fxsave64
        | M::Fxrstor
        | M::Fxrstor64
        | M::Xsave
        | M::Xsave64
        | M::Xsaveopt
        | M::Xsaveopt64
        | M::Xsavec
        | M::Xsavec64
        | M::Xrstor
        | M::Xrstor64 => 0,
        M::Vpgatherdd
        | M::Vpgatherdq
        | M::Vpgatherqd
        | M::Vpgatherqq
        | M::Vgatherdps
        | M::Vgatherdpd
        | M::Vgatherqps
        | M::Vgatherqpd => 1,
        M::Clflush
        | M::Clflushopt
        | M::Clwb
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw => 2,
        M::Maskmovq | M::Maskmovdqu | M::Vmaskmovdqu => 3,
        M::Fnstenv | M::Fldenv | M::Fnsave | M::Frstor => 4,
        M::Movdir64b => 5,
        M::Lar | M::Lsl | M::Verr | M::Verw | M::Arpl => 6,
        _ => return None,
    })
}

#[test]
fn random_instructions_registers_and_page_tables() {
    let cases: u64 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x2545_f491_4f6c_dd1d);
    let mut rng = Rng(seed | 1);
    let mut emu = Emulator::new(true).expect("stub buffer");
    let mut plat = FuzzPlatform {
        ram: vec![0; RAM],
        mmio_writes: 0,
        bad_access: None,
    };
    let mut img = XsaveImage::new();
    let (mut done, mut exceptions, mut unsupported) = (0u64, 0u64, 0u64);
    let mut families = [0u64; FAMILIES.len()];
    let t0 = Instant::now();
    let mut last: Option<(u64, [u8; 15], CpuState)> = None;
    for case in 0..cases {
        // Fresh random RAM (and so page tables) every 500 cases.
        if case % 500 == 0 {
            for chunk in plat.ram.chunks_exact_mut(8) {
                let mut v = rng.next();
                // Make many entries present and point inside RAM.
                if v & 1 == 1 {
                    v = (v & 0xfff) | ((v % RAM as u64) & !0xfff) | 1;
                }
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        let mut cpu = random_cpu(&mut rng);
        let mut bytes = [0u8; 15];
        random_bytes(&mut rng, &mut bytes);
        // Whole-state areas must be 16- or 64-byte aligned to complete:
        // point the 0F AE forms' base registers at aligned RAM half the time.
        if bytes[1..3] == [0x0f, 0xae] && rng.chance(2) {
            let aligned = rng.below(RAM as u64) & !63;
            for r in [
                &mut cpu.gprs.rax,
                &mut cpu.gprs.rcx,
                &mut cpu.gprs.rdx,
                &mut cpu.gprs.rbx,
            ] {
                *r = aligned;
            }
            for r in [&mut cpu.gprs.rsi, &mut cpu.gprs.rdi, &mut cpu.gprs.rbp] {
                *r = aligned;
            }
        }
        // MOVDIR64B's destination must be 64-byte aligned to complete.
        let movdir = |b: &[u8]| b.starts_with(&[0x66, 0x0f, 0x38, 0xf8]);
        if (movdir(&bytes) || movdir(&bytes[1..])) && rng.chance(2) {
            let aligned = rng.below(RAM as u64) & !63;
            for r in [&mut cpu.gprs.rax, &mut cpu.gprs.rcx, &mut cpu.gprs.rdi] {
                *r = aligned;
            }
        }
        // Often repeat the previous instruction (same RIP, bytes and mode)
        // with new registers: the emulator's decoded-instruction cache hits.
        if let Some((rip, b, prev)) = last.filter(|_| rng.chance(3)) {
            let gprs = cpu.gprs;
            cpu = prev;
            cpu.gprs = gprs;
            cpu.rip = rip;
            bytes = b;
        }
        last = Some((cpu.rip, bytes, cpu));
        let before = cpu;
        // Sometimes give no bytes: the emulator fetches through the walk.
        let given = if rng.chance(4) {
            &bytes[..rng.below(15) as usize]
        } else {
            &bytes[..]
        };
        let t = Instant::now();
        let outcome = emu.emulate(&mut cpu, given, &mut img, &mut plat);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "case {case} took {:?}",
            t.elapsed()
        );
        if let Some((gpa, len)) = plat.bad_access {
            panic!("case {case}: platform access of {len} bytes at {gpa:#x}");
        }
        match outcome {
            Outcome::Done { .. } => {
                done += 1;
                if let Some(f) = family_of(emu.last_mnemonic()) {
                    families[f] += 1;
                }
                // What completed must be allow-listed: decode the bytes the
                // guest really had at RIP (the given ones when complete).
                let mut d = iced_x86::Decoder::with_ip(before.bitness(), &bytes, before.rip, 0);
                let instr = d.decode();
                if given.len() == 15 {
                    assert!(
                        emul::classify::classify(&instr).is_ok()
                            || emul::system::handles(&instr),
                        "case {case}: completed a denied instruction {instr} (bitness {}, emulator saw {:?}, bytes {:02x?}, given {})",
                        before.bitness(), emu.last_mnemonic(), bytes, given.len()
                    );
                }
                // Only LAR/LSL/ARPL may write RSP, as their destination;
                // the stub families never run with RSP as an operand. Which
                // instruction ran is the emulator's word: with bytes cut
                // short it fetched the rest from (random) guest memory.
                // With all 15 given, the decoded destination must be RSP.
                let selector_insn = matches!(
                    emu.last_mnemonic(),
                    iced_x86::Mnemonic::Lar | iced_x86::Mnemonic::Lsl | iced_x86::Mnemonic::Arpl
                );
                let rsp_is_destination = given.len() < 15
                    || instr.op0_register().full_register() == iced_x86::Register::RSP;
                if cpu.gprs.rsp != before.gprs.rsp {
                    assert!(
                        selector_insn && rsp_is_destination,
                        "case {case}: RSP changed by {:?} ({instr})",
                        emu.last_mnemonic()
                    );
                }
            }
            Outcome::Exception { .. } => {
                exceptions += 1;
                assert_eq!(
                    cpu, before,
                    "case {case}: state changed although an exception was raised"
                );
            }
            Outcome::Unsupported { .. } => {
                unsupported += 1;
                assert_eq!(cpu, before, "case {case}: state changed on a refusal");
            }
            Outcome::Platform(e) => panic!("case {case}: platform error {e}"),
            Outcome::Retry => panic!("case {case}: a retry without another vCPU"),
            // System instructions: only RIP (and nothing else) moves.
            Outcome::SoftwareInterrupt { .. } | Outcome::FlushTlb { .. } => {
                done += 1;
                assert_eq!(
                    CpuState {
                        rip: before.rip,
                        ..cpu
                    },
                    before,
                    "case {case}: a software interrupt or INVPCID changed registers"
                );
            }
        }
    }
    eprintln!(
        "fuzz: {cases} cases in {:?}: {done} completed, {exceptions} exceptions, {unsupported} refused, {} MMIO writes",
        t0.elapsed(),
        plat.mmio_writes
    );
    eprintln!(
        "fuzz: completed per family: {:?}",
        FAMILIES.iter().zip(families).collect::<Vec<_>>()
    );
    assert!(
        done > cases / 100,
        "too few completions ({done}) to mean anything"
    );
}
