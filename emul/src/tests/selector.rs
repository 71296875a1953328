//! LAR, LSL, VERR, VERW and ARPL (`emulator/selector.rs`): the checks
//! against a guest GDT and LDT, hand-derived from the SDM and the APM;
//! what the instructions write, as measured on the host; operand and table
//! faults; and every code and data descriptor this process can install in
//! its own LDT compared with the CPU's answer.

use super::*;
use crate::cpu::DescriptorTable;
use crate::stub::shape::HostShape;

const GDT: u64 = DATA;
const LDT: u64 = DATA + 0x1000;
/// A user page holding selectors for the memory forms.
const SELECTORS: u64 = DATA + 0x2000;

/// A descriptor from its base, 20-bit limit, access byte (P, DPL, S,
/// type) and flags nibble (G, D/B, L, AVL).
fn seg(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let (base, limit) = (u64::from(base), u64::from(limit));
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | u64::from(access) << 40
        | (limit >> 16 & 0xf) << 48
        | u64::from(flags & 0xf) << 52
        | (base >> 24) << 56
}

/// GDT entries 0-15 (entry 11 is the upper half of the TSS at 10) and an
/// LDT of two entries, in a 64-bit guest at `cpl`.
fn tables(cpl: u8) -> (CpuState, MockPlatform) {
    let (mut cpu, mut mem) = setup();
    mem.map(CR3, 4, SELECTORS, SELECTORS, 0x7);
    let gdt = [
        0,
        seg(0, 0xfffff, 0x9b, 0xa),           // 0x08 code, DPL 0
        seg(0, 0xfffff, 0x93, 0xc),           // 0x10 data, DPL 0
        seg(0, 0xfffff, 0xfb, 0xa),           // 0x18 code, DPL 3
        seg(0, 0xfffff, 0xf3, 0xc),           // 0x20 data, DPL 3
        seg(0x1234_5678, 0x12345, 0xf1, 0x4), // 0x28 read-only data, DPL 3, bytes
        seg(0, 0xfffff, 0x9f, 0xa),           // 0x30 conforming readable code, DPL 0
        seg(0, 0xfffff, 0x9d, 0xa),           // 0x38 conforming execute-only code, DPL 0
        seg(0, 0xfffff, 0xf9, 0xa),           // 0x40 execute-only code, DPL 3
        seg(0, 0xfffff, 0x73, 0xc),           // 0x48 data, DPL 3, not present
        seg(0x9000, 0x67, 0x89, 0),           // 0x50 64-bit TSS, DPL 0
        0,                                    // 0x58 its upper half
        seg(LDT as u32, 15, 0xe2, 0),         // 0x60 LDT, DPL 3
        seg(0x1000, 0, 0xec, 0),              // 0x68 call gate, DPL 3
        seg(0x1000, 0, 0xee, 0),              // 0x70 interrupt gate, DPL 3
        seg(0, 0xfffff, 0xd3, 0xc),           // 0x78 data, DPL 2
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.set_u64(GDT + 8 * i as u64, *d);
    }
    mem.set_u64(LDT, seg(0, 0xfff, 0xf3, 0x4)); // 0x04 data, DPL 3
    mem.set_u64(LDT + 8, seg(0, 0xfffff, 0xfb, 0xa)); // 0x0c code, DPL 3
    cpu.gdtr = DescriptorTable {
        base: GDT,
        limit: 16 * 8 - 1,
    };
    cpu.ldtr = Segment {
        selector: 0x60,
        base: LDT,
        limit: 15,
        type_: 2,
        present: true,
        ..Segment::default()
    };
    cpu.cpl = cpl;
    cpu.cs.dpl = cpl;
    cpu.ss.dpl = cpl;
    (cpu, mem)
}

/// An emulator with the APM's LAR (bits 19:16 kept) whatever the host
/// does (QEMU's TCG clears them): the hand-derived values below are
/// written for it; `lar_limit_bits_follow_the_host` and
/// `ldt_descriptors_match_the_cpu` cover the host's own choice.
fn apm_emul() -> Emulator {
    let mut e = emul();
    e.set_host_shape(HostShape::default());
    e
}

const ZF: u64 = 1 << 6;
const GARBAGE: u64 = 0xdead_beef_cafe_babe;

/// What an instruction does with one selector.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// ZF cleared, the destination untouched.
    Fail,
    /// ZF set; for LAR/LSL the 32-bit result.
    Pass(u32),
    /// The emulator refuses (the manuals disagree).
    Refused,
}
use Want::*;

/// Runs `code` with RCX = `selector` (upper bits set: only 16 count),
/// RAX = GARBAGE and ZF the opposite of the outcome's, and reads the
/// outcome back as a [`Want`] (LAR/LSL: EAX; VERR/VERW: Pass(0)).
fn outcome(cpu: &CpuState, mem: &mut MockPlatform, code: &[u8], selector: u16) -> Want {
    let mut e = apm_emul();
    let mut c = *cpu;
    c.gprs.rcx = 0xffff_0000 | u64::from(selector);
    for zf_before in [0, ZF] {
        c.gprs.rax = GARBAGE;
        c.gprs.rflags = 0x2 | zf_before;
        let mut run = c;
        match e.emulate(&mut run, code, &mut NoVectorState, mem) {
            Outcome::Done { .. } => {}
            Outcome::Unsupported { .. } => return Refused,
            o => panic!("selector {selector:#x}: {o:?}"),
        }
        assert_eq!(run.rip, c.rip + code.len() as u64);
        let zf = run.gprs.rflags & ZF != 0;
        // Only ZF moves.
        assert_eq!(run.gprs.rflags & !ZF, 0x2, "selector {selector:#x}");
        if !zf {
            assert_eq!(run.gprs.rax, GARBAGE, "a failed check writes nothing");
            if zf_before == ZF {
                return Fail;
            }
        } else if zf_before == 0 {
            if run.gprs.rax == GARBAGE {
                return Pass(0);
            }
            assert_eq!(run.gprs.rax >> 32, 0, "32-bit results are zero-extended");
            return Pass(run.gprs.rax as u32);
        }
    }
    unreachable!()
}

/// One selector's expected outcome for LAR, LSL, VERR, VERW.
struct Case {
    selector: u16,
    cpl: u8,
    lar: Want,
    lsl: Want,
    verr: bool,
    verw: bool,
}

/// The checks of the SDM and the APM, case by case: null and out-of-limit
/// selectors, DPL against CPL and RPL, conforming code, readable and
/// writable types, the present bit (never checked), system descriptors in
/// IA-32e mode, the LDT.
#[test]
fn checks_follow_the_descriptor_tables() {
    let case = |selector, cpl, lar, lsl, verr, verw| Case {
        selector,
        cpl,
        lar,
        lsl,
        verr,
        verw,
    };
    let all = u32::MAX;
    let cases = [
        case(0x00, 3, Fail, Fail, false, false),
        case(0x03, 0, Fail, Fail, false, false),
        case(0x0b, 3, Fail, Fail, false, false),
        case(0x08, 0, Pass(0x00af_9b00), Pass(all), true, false),
        case(0x13, 3, Fail, Fail, false, false),
        case(0x1b, 3, Pass(0x00af_fb00), Pass(all), true, false),
        case(0x23, 3, Pass(0x00cf_f300), Pass(all), true, true),
        // Base bits masked out; byte granular limit.
        case(0x2b, 3, Pass(0x0041_f100), Pass(0x12345), true, false),
        // Conforming code: visible at any CPL and RPL.
        case(0x33, 3, Pass(0x00af_9f00), Pass(all), true, false),
        case(0x3b, 3, Pass(0x00af_9d00), Pass(all), false, false),
        case(0x43, 3, Pass(0x00af_f900), Pass(all), false, false),
        // Not present: none of them checks P.
        case(0x4b, 3, Pass(0x00cf_7300), Pass(all), true, true),
        // A 64-bit TSS (its upper half zero): invisible at CPL 3, valid
        // for LAR and LSL in both manuals at CPL 0.
        case(0x53, 3, Fail, Fail, false, false),
        case(0x50, 0, Pass(0x0000_8900), Pass(0x67), false, false),
        // The upper half of the TSS (type 0): invalid for LAR everywhere,
        // valid for LSL in the SDM only; DPL 0.
        case(0x58, 0, Fail, Refused, false, false),
        case(0x5b, 3, Fail, Fail, false, false),
        // The LDT: invalid for LAR in the SDM, valid in the APM; for LSL
        // valid in both, but its upper half (the call gate's bytes) is
        // malformed, which only the APM checks.
        case(0x63, 3, Refused, Refused, false, false),
        // Call gate: LAR only; its upper half (the interrupt gate) is
        // malformed too.
        case(0x6b, 3, Refused, Fail, false, false),
        case(0x73, 3, Fail, Fail, false, false),
        // DPL 2: RPL and CPL both count.
        case(0x7b, 3, Fail, Fail, false, false),
        case(0x7b, 0, Fail, Fail, false, false),
        case(0x7a, 0, Pass(0x00cf_d300), Pass(all), true, true),
        case(0x7a, 2, Pass(0x00cf_d300), Pass(all), true, true),
        // Offset 0x80 + 7 is past the limit 0x7f.
        case(0x80, 0, Fail, Fail, false, false),
        case(0x07, 3, Pass(0x0040_f300), Pass(0xfff), true, true),
        case(0x0f, 3, Pass(0x00af_fb00), Pass(all), true, false),
        case(0x17, 0, Fail, Fail, false, false),
    ];
    let lar = asm64(|a| a.lar(eax, ecx));
    let lsl = asm64(|a| a.lsl(eax, ecx));
    let verr = asm64(|a| a.verr(cx));
    let verw = asm64(|a| a.verw(cx));
    for c in cases {
        let (cpu, mut mem) = tables(c.cpl);
        let s = c.selector;
        let ctx = format!("selector {s:#x} at CPL {}", c.cpl);
        assert_eq!(outcome(&cpu, &mut mem, &lar, s), c.lar, "LAR, {ctx}");
        assert_eq!(outcome(&cpu, &mut mem, &lsl, s), c.lsl, "LSL, {ctx}");
        let flag = |pass| if pass { Pass(0) } else { Fail };
        assert_eq!(
            outcome(&cpu, &mut mem, &verr, s),
            flag(c.verr),
            "VERR, {ctx}"
        );
        assert_eq!(
            outcome(&cpu, &mut mem, &verw, s),
            flag(c.verw),
            "VERW, {ctx}"
        );
    }
}

/// With LDTR unusable (a null LLDT) or not present, every LDT selector
/// fails; the GDT still answers. LDTR's cached state decides, not its
/// selector: KVM's reset state (selector 0, base 0, limit 0xffff, present)
/// is a table the CPU reads.
#[test]
fn ldtr_usability_decides_ldt_selectors() {
    let lar = asm64(|a| a.lar(eax, ecx));
    let (mut cpu, mut mem) = tables(3);
    for ldtr in [
        Segment {
            unusable: true,
            ..Segment::default()
        },
        Segment {
            base: LDT,
            limit: 15,
            present: false,
            ..Segment::default()
        },
    ] {
        cpu.ldtr = ldtr;
        assert_eq!(outcome(&cpu, &mut mem, &lar, 0x07), Fail, "{ldtr:?}");
        assert_eq!(outcome(&cpu, &mut mem, &lar, 0x23), Pass(0x00cf_f300));
    }
    cpu.ldtr = Segment {
        selector: 0,
        base: LDT,
        limit: 0xffff,
        type_: 2,
        present: true,
        ..Segment::default()
    };
    assert_eq!(outcome(&cpu, &mut mem, &lar, 0x07), Pass(0x0040_f300));
}

/// The limit check covers all 8 bytes of the descriptor: entry 0x80 needs
/// a limit of at least 0x87.
#[test]
fn the_limit_covers_the_whole_descriptor() {
    let lar = asm64(|a| a.lar(eax, ecx));
    let (mut cpu, mut mem) = tables(0);
    mem.set_u64(GDT + 0x80, seg(0, 0xfffff, 0x93, 0xc));
    for (limit, want) in [(0x83, Fail), (0x86, Fail), (0x87, Pass(0x00cf_9300))] {
        cpu.gdtr.limit = limit;
        assert_eq!(
            outcome(&cpu, &mut mem, &lar, 0x80),
            want,
            "limit {limit:#x}"
        );
    }
}

/// IA-32e system descriptors the manuals judge alike pass only with a
/// well-formed upper half inside the limit (the APM's check); in
/// compatibility mode a TSS's upper half is not read (the APM checks it in
/// 64-bit mode only), a call gate's is.
#[test]
fn ia32e_system_descriptors_and_their_upper_half() {
    let lar = asm64(|a| a.lar(eax, ecx));
    let lsl = asm64(|a| a.lsl(eax, ecx));
    let (mut cpu, mut mem) = tables(0);
    // The TSS at 0x50 with the GDT ending after its first half.
    cpu.gdtr.limit = 0x57;
    assert_eq!(outcome(&cpu, &mut mem, &lar, 0x50), Refused);
    cpu.gdtr.limit = 0x7f;
    // Its upper half with type bits set.
    mem.set_u64(GDT + 0x58, 0x0000_0100_0000_0000);
    assert_eq!(outcome(&cpu, &mut mem, &lsl, 0x50), Refused);
    // Compatibility mode (32-bit code, IA-32e): the TSS's upper half is
    // not checked, the call gate's is (its upper half, the interrupt gate
    // at 0x70, is malformed).
    cpu.cs.l = false;
    cpu.cs.db = true;
    let lar32 = [0x0f, 0x02, 0xc1];
    let lsl32 = [0x0f, 0x03, 0xc1];
    assert_eq!(outcome(&cpu, &mut mem, &lar32, 0x50), Pass(0x0000_8900));
    assert_eq!(outcome(&cpu, &mut mem, &lsl32, 0x50), Pass(0x67));
    assert_eq!(outcome(&cpu, &mut mem, &lar32, 0x68), Refused);
    mem.set_u64(GDT + 0x70, 0);
    assert_eq!(outcome(&cpu, &mut mem, &lar32, 0x68), Pass(0x0000_ec00));
}

/// A table base the guest can only set through KVM (LGDT refuses it in
/// 64-bit mode): non-canonical is #GP(0), not a read.
#[test]
fn a_non_canonical_table_is_gp() {
    let lar = asm64(|a| a.lar(eax, ecx));
    let (mut cpu, mut mem) = tables(0);
    cpu.gdtr.base = 0x8000_0000_0000_0000;
    let mut c = cpu;
    c.gprs.rcx = 0x08;
    let o = apm_emul().emulate(&mut c, &lar, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_GP, Some(0)));
}

/// Outside IA-32e mode linear addresses wrap at 4 GiB: a GDT based at
/// 0xffff_fff8 has entry 1 at 0, and one based at 0xffff_fff4 has entry
/// 1 straddling the top of the address space (its second dword at 0).
#[test]
fn legacy_table_addresses_wrap_at_4_gib() {
    /// Guest-physical 0xffff_f000.. is the mock's last RAM page.
    struct TopPage<'a>(&'a mut MockPlatform);
    const TOP: u64 = 0xffff_f000;
    const BACKING: u64 = RAM_SIZE as u64 - 0x1000;
    let back = |gpa: u64| if gpa >= TOP { gpa - TOP + BACKING } else { gpa };
    impl Platform for TopPage<'_> {
        fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
            let gpa = if gpa >= TOP { gpa - TOP + BACKING } else { gpa };
            self.0.read_phys(gpa, buf)
        }
        fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
            let gpa = if gpa >= TOP { gpa - TOP + BACKING } else { gpa };
            self.0.write_phys(gpa, buf)
        }
    }
    let (mut cpu, mut mem) = legacy();
    let lar = [0x0f, 0x02, 0xc1];
    let d = seg(0, 0xfffff, 0x93, 0xc);
    let run = |cpu: &CpuState, mem: &mut MockPlatform| {
        let mut c = *cpu;
        c.gprs.rcx = 0x08;
        let o = apm_emul().emulate(&mut c, &lar, &mut NoVectorState, &mut TopPage(mem));
        done(&o);
        c.gprs.rax
    };
    cpu.gdtr.base = 0xffff_fff8;
    mem.set_u64(0, d);
    assert_eq!(run(&cpu, &mut mem), 0x00cf_9300);
    cpu.gdtr.base = 0xffff_fff4;
    mem.set_u32(back(0xffff_fffc), d as u32);
    mem.set_u32(0, (d >> 32) as u32 & !0xff00 | 0xf300);
    assert_eq!(run(&cpu, &mut mem), 0x00cf_f300);
}

/// No descriptor read, no accessed bit: the tables are left as they were.
#[test]
fn the_descriptor_is_read_not_marked_accessed() {
    let (cpu, mut mem) = tables(3);
    let lar = asm64(|a| a.lar(eax, ecx));
    // Entry 4 (data, DPL 3) without its accessed bit.
    mem.set_u64(GDT + 0x20, seg(0, 0xfffff, 0xf2, 0xc));
    mem.log.clear();
    assert_eq!(outcome(&cpu, &mut mem, &lar, 0x23), Pass(0x00cf_f200));
    assert_eq!(mem.u64_at(GDT + 0x20), seg(0, 0xfffff, 0xf2, 0xc));
    assert!(mem
        .log
        .iter()
        .any(|&(w, gpa, len)| !w && gpa == GDT + 0x20 && len == 8));
    assert!(
        mem.log.iter().all(|&(w, gpa, _)| !w || gpa < 0x40_0000),
        "only page-table entries are written (accessed bits): {:?}",
        mem.log
    );
}

/// What the destination gets, as measured on AMD EPYC Zen 3 at CPL 3 on
/// the host's user data selector (descriptor 0x00cff300_0000ffff): `lar
/// ax` keeps bits 63:16 (0xdeadbeefcafef300), `lar eax` and `lar rax`
/// give 0xcff300 zero-extended, `lsl ax` 0x...ffff, `lsl eax`
/// 0xffffffff; a failed check leaves all 64 bits. Flags other than ZF
/// are kept (0x8d5 in, 0xad7 out with IF).
#[test]
fn lar_and_lsl_write_like_the_cpu() {
    let (cpu, mut mem) = tables(3);
    let run = |mem: &mut MockPlatform, code: Vec<u8>, selector: u16| {
        let mut c = cpu;
        c.gprs.rax = GARBAGE;
        c.gprs.rcx = u64::from(selector);
        c.gprs.rflags = 0x8d5 | 0x200;
        done(&apm_emul().emulate(&mut c, &code, &mut NoVectorState, mem));
        (c.gprs.rax, c.gprs.rflags)
    };
    let ok = 0x8d5 | 0x200 | ZF;
    let cases = [
        (asm64(|a| a.lar(ax, cx)), 0xdead_beef_cafe_f300),
        (asm64(|a| a.lar(eax, ecx)), 0x00cf_f300),
        (asm64(|a| a.lar(rax, rcx)), 0x00cf_f300),
        (asm64(|a| a.lsl(ax, cx)), 0xdead_beef_cafe_ffff),
        (asm64(|a| a.lsl(eax, ecx)), 0xffff_ffff),
        (asm64(|a| a.lsl(rax, rcx)), 0xffff_ffff),
    ];
    for (code, want) in cases {
        assert_eq!(run(&mut mem, code, 0x23), (want, ok));
    }
    let failed = (GARBAGE, (0x8d5 | 0x200) & !ZF);
    for code in [asm64(|a| a.lar(eax, ecx)), asm64(|a| a.lsl(rax, rcx))] {
        assert_eq!(run(&mut mem, code, 0x10), failed);
    }
}

/// Where the host's LAR clears the limit bits (QEMU's TCG), the emulator
/// does too.
#[test]
fn lar_limit_bits_follow_the_host() {
    let (cpu, mut mem) = tables(3);
    let code = asm64(|a| a.lar(eax, ecx));
    for (keeps, want) in [(true, 0x00cf_f300), (false, 0x00c0_f300)] {
        let mut e = emul();
        e.set_host_shape(HostShape {
            lar_keeps_limit_bits: keeps,
            ..HostShape::default()
        });
        let mut c = cpu;
        c.gprs.rcx = 0x23;
        done(&e.emulate(&mut c, &code, &mut NoVectorState, &mut mem));
        assert_eq!(c.gprs.rax, want);
    }
}

/// The memory forms read 2 bytes like any operand: the selector on RAM
/// and on MMIO, #GP(0) for a non-canonical address, #AC before the walk at
/// CPL 3 (AMD EPYC Zen 3, natively: `lar eax, [odd address]` raises #AC on
/// a mapped page, on an unmapped one and across into one, #GP(0) when
/// non-canonical), #PF with U/S set for a missing page.
#[test]
fn selector_operand_in_memory() {
    let (mut cpu, mut mem) = tables(3);
    let code = asm64(|a| a.lar(eax, word_ptr(rsi)));
    let run = |cpu: &CpuState, mem: &mut MockPlatform, addr: u64| {
        let mut c = *cpu;
        c.gprs.rsi = addr;
        let o = apm_emul().emulate(&mut c, &code, &mut NoVectorState, mem);
        (o, c.gprs.rax)
    };
    mem.ram[SELECTORS as usize + 0x11..][..2].copy_from_slice(&0x23u16.to_le_bytes());
    mem.mmio[0x20..0x22].copy_from_slice(&0x1bu16.to_le_bytes());
    mem.map(CR3, 4, MMIO_BASE, MMIO_BASE, 0x7);
    let (o, eax_out) = run(&cpu, &mut mem, SELECTORS + 0x11);
    done(&o);
    assert_eq!(eax_out, 0x00cf_f300);
    let (o, eax_out) = run(&cpu, &mut mem, MMIO_BASE + 0x20);
    done(&o);
    assert_eq!(eax_out, 0x00af_fb00);
    assert_eq!(
        exc(&run(&cpu, &mut mem, 0x8000_0000_0000_0001).0),
        (VEC_GP, Some(0))
    );
    let unmapped = DATA + 0x10_0000;
    let (o, _) = run(&cpu, &mut mem, unmapped);
    assert_eq!(exc(&o), (VEC_PF, Some(PFEC_U)));
    // Alignment checking: CPL 3, CR0.AM, RFLAGS.AC.
    cpu.cr0 |= CR0_AM;
    cpu.gprs.rflags |= RFLAGS_AC;
    for addr in [SELECTORS + 0x11, unmapped + 1, SELECTORS + 0xfff] {
        assert_eq!(
            exc(&run(&cpu, &mut mem, addr).0),
            (VEC_AC, Some(0)),
            "{addr:#x}"
        );
    }
    assert_eq!(
        exc(&run(&cpu, &mut mem, 0x8000_0000_0000_0001).0),
        (VEC_GP, Some(0))
    );
    let (o, _) = run(&cpu, &mut mem, unmapped);
    assert_eq!(exc(&o), (VEC_PF, Some(PFEC_U)), "aligned: the walk faults");
    // Not at CPL 0.
    cpu.cpl = 0;
    done(&run(&cpu, &mut mem, SELECTORS + 0x11).0);
}

/// The descriptor read is an implicit supervisor access: a missing table
/// page is #PF without U/S (CR2 at the first missing byte, also when the
/// descriptor straddles into it), and SMAP forbids a table on a user page
/// even with RFLAGS.AC set.
#[test]
fn table_reads_are_implicit_supervisor_accesses() {
    let code = asm64(|a| a.lar(eax, ecx));
    let run = |cpu: &CpuState, mem: &mut MockPlatform| {
        let mut c = *cpu;
        c.gprs.rcx = 0x23;
        apm_emul().emulate(&mut c, &code, &mut NoVectorState, mem)
    };
    let missing = DATA + 0x10_0000;
    let (mut cpu, mut mem) = tables(3);
    cpu.gdtr.base = missing;
    let o = run(&cpu, &mut mem);
    assert_eq!(exc(&o), (VEC_PF, Some(0)));
    assert!(matches!(o, Outcome::Exception { cr2: Some(a), .. } if a == missing + 0x20));
    // Entry 4 straddling the end of the last mapped DATA page.
    cpu.gdtr.base = DATA + 0x4000 - 0x24;
    let o = run(&cpu, &mut mem);
    assert!(
        matches!(o, Outcome::Exception { vector: VEC_PF, cr2: Some(a), .. } if a == DATA + 0x4000)
    );
    // The GDT on a user page under SMAP, at CPL 0 with AC set, then at
    // CPL 3: #PF (present, supervisor).
    let (mut cpu, mut mem) = tables(0);
    mem.map(CR3, 4, GDT, GDT, 0x7);
    cpu.cr4 |= CR4_SMAP;
    cpu.gprs.rflags |= RFLAGS_AC;
    assert_eq!(exc(&run(&cpu, &mut mem)), (VEC_PF, Some(PFEC_P)));
    cpu.cpl = 3;
    assert_eq!(exc(&run(&cpu, &mut mem)), (VEC_PF, Some(PFEC_P)));
    cpu.cr4 &= !CR4_SMAP;
    done(&run(&cpu, &mut mem));
}

/// #UD in real mode, in virtual-8086 mode and with LOCK.
#[test]
fn real_mode_v86_and_lock_are_ud() {
    let (cpu, mut mem) = tables(0);
    let lar = asm64(|a| a.lar(eax, ecx));
    let mut real = cpu;
    real.cr0 &= !CR0_PE;
    real.cr0 &= !CR0_PG;
    real.efer = 0;
    real.cs.l = false;
    real.cs.db = false;
    // `lar ax, cx` and `arpl dx, cx` in 16-bit code.
    for code in [&[0x0f, 0x02, 0xc1][..], &ARPL_DX_CX] {
        let mut c = real;
        let o = emul().emulate(&mut c, code, &mut NoVectorState, &mut mem);
        assert_eq!(exc(&o).0, VEC_UD, "{code:02x?}");
    }
    let mut v86 = cpu;
    v86.gprs.rflags |= 1 << 17;
    assert_eq!(
        exc(&emul().emulate(&mut v86, &lar, &mut NoVectorState, &mut mem)).0,
        VEC_UD
    );
    // ARPL with RFLAGS.VM in 32-bit code.
    let mut v86 = cpu;
    v86.cs.l = false;
    v86.cs.db = true;
    v86.gprs.rflags |= 1 << 17;
    let o = emul().emulate(&mut v86, &ARPL_DX_CX, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o).0, VEC_UD);
    let locked = [&[0xf0][..], &lar].concat();
    let mut c = cpu;
    assert_eq!(
        exc(&emul().emulate(&mut c, &locked, &mut NoVectorState, &mut mem)).0,
        VEC_UD
    );
}

/// Legacy protected mode (32-bit, no IA-32e): system descriptors follow
/// the tables both manuals agree on. LAR takes TSSs, the LDT and call and
/// task gates; LSL TSSs and the LDT; neither takes interrupt or trap
/// gates; VERR/VERW none.
#[test]
fn legacy_mode_system_descriptors() {
    let (mut cpu, mut mem) = legacy();
    cpu.rip = 0x1000;
    // Entries 10-15 of the 64-bit GDT are replaced with 32-bit system
    // descriptors of DPL 0.
    let system = [
        (0x50u16, 0x89u8, Pass(0x0000_8900), Pass(0x67)), // available 32-bit TSS
        (0x58, 0x8b, Pass(0x0000_8b00), Pass(0x67)),      // busy 32-bit TSS
        (0x60, 0x82, Pass(0x0000_8200), Pass(0x67)),      // LDT
        (0x68, 0x8c, Pass(0x0000_8c00), Fail),            // 32-bit call gate
        (0x70, 0x85, Pass(0x0000_8500), Fail),            // task gate
        (0x78, 0x8e, Fail, Fail),                         // interrupt gate
    ];
    for (sel, access, ..) in system {
        mem.set_u64(GDT + u64::from(sel), seg(0x9000, 0x67, access, 0));
    }
    // The code is decoded as 32-bit: `lar eax, ecx`, `lsl eax, ecx`.
    let lar = [0x0f, 0x02, 0xc1];
    let lsl = [0x0f, 0x03, 0xc1];
    for (sel, _, want_lar, want_lsl) in system {
        assert_eq!(outcome(&cpu, &mut mem, &lar, sel), want_lar, "LAR {sel:#x}");
        assert_eq!(outcome(&cpu, &mut mem, &lsl, sel), want_lsl, "LSL {sel:#x}");
        // DPL 0 against RPL 3.
        assert_eq!(
            outcome(&cpu, &mut mem, &lar, sel | 3),
            Fail,
            "LAR {sel:#x} RPL 3"
        );
    }
}

/// Every code and data descriptor Linux lets a process put in its LDT
/// (`modify_ldt`: DPL 3, each content type, read-only/execute-only,
/// present or not, byte or page granular, 16/32-bit, L, AVL), with every
/// RPL, plus selectors past the LDT's limit: LAR (16/32/64-bit), LSL
/// (16/32-bit), VERR and VERW run natively at CPL 3 and emulated on a
/// guest LDT holding the same bytes; destination and ZF must agree.
#[test]
fn ldt_descriptors_match_the_cpu() {
    let Some(raw) = native::install_ldt() else {
        eprintln!("skipped: modify_ldt is not available to this process");
        return;
    };
    let entries = raw.len();
    let (mut cpu, mut mem) = tables(3);
    for (i, d) in raw.iter().enumerate() {
        mem.set_u64(LDT + 8 * i as u64, *d);
    }
    cpu.ldtr.limit = 8 * entries as u32 - 1;
    let forms: [(&str, Vec<u8>); 8] = [
        ("lar ax", asm64(|a| a.lar(ax, cx))),
        ("lar eax", asm64(|a| a.lar(eax, ecx))),
        ("lar rax", asm64(|a| a.lar(rax, rcx))),
        ("lsl ax", asm64(|a| a.lsl(ax, cx))),
        ("lsl eax", asm64(|a| a.lsl(eax, ecx))),
        ("lsl rax", asm64(|a| a.lsl(rax, rcx))),
        ("verr", asm64(|a| a.verr(cx))),
        ("verw", asm64(|a| a.verw(cx))),
    ];
    let mut compared = 0;
    for index in 0..entries as u16 + 2 {
        for rpl in 0..4 {
            let selector = index << 3 | 4 | rpl;
            for (i, (name, code)) in forms.iter().enumerate() {
                let (want_rax, want_zf) = native::run(i, selector, GARBAGE);
                let mut c = cpu;
                c.gprs.rax = GARBAGE;
                c.gprs.rcx = u64::from(selector);
                c.gprs.rflags = 0x2;
                done(&emul().emulate(&mut c, code, &mut NoVectorState, &mut mem));
                let desc = raw.get(index as usize).copied().unwrap_or(0);
                assert_eq!(
                    (c.gprs.rax, c.gprs.rflags & ZF != 0),
                    (want_rax, want_zf),
                    "{name} of {selector:#x} (descriptor {desc:#018x})"
                );
                compared += 1;
            }
        }
    }
    eprintln!("{compared} native comparisons over {entries} LDT entries");
}

/// This process's own LDT and the instructions run natively on it.
mod native {
    use core::arch::asm;

    /// `struct user_desc` of `modify_ldt(2)`.
    #[repr(C)]
    struct UserDesc {
        entry_number: u32,
        base_addr: u32,
        limit: u32,
        /// seg_32bit:1, contents:2, read_exec_only:1, limit_in_pages:1,
        /// seg_not_present:1, useable:1, lm:1
        flags: u32,
    }

    fn modify_ldt(func: i64, ptr: *mut u8, len: usize) -> i64 {
        // SAFETY: modify_ldt reads (func 0x11) or writes (func 0) `len`
        // bytes at `ptr`, which the callers own for that length.
        unsafe { libc::syscall(libc::SYS_modify_ldt, func, ptr, len) }
    }

    /// Installs one LDT entry per combination of the flags Linux accepts
    /// and returns the LDT as the kernel holds it (`None` where the
    /// syscall is unavailable).
    pub(super) fn install_ldt() -> Option<Vec<u64>> {
        let mut n = 0u32;
        // contents: 0 data, 1 expand-down data, 2 code; 3 (conforming
        // code) is accepted only when not present.
        for contents in 0..4u32 {
            for ro in 0..2u32 {
                for pages in 0..2u32 {
                    let not_present = u32::from(contents == 3 || (ro == 1 && pages == 1));
                    let seg32 = u32::from(!n.is_multiple_of(3));
                    let lm = u32::from(contents == 2 && seg32 == 0 && n.is_multiple_of(2));
                    let useable = n % 2;
                    let mut d = UserDesc {
                        entry_number: n,
                        base_addr: 0x1000 * n,
                        limit: 0x1234 + 0x11111 * n,
                        flags: seg32
                            | contents << 1
                            | ro << 3
                            | pages << 4
                            | not_present << 5
                            | useable << 6
                            | lm << 7,
                    };
                    let len = core::mem::size_of::<UserDesc>();
                    if modify_ldt(0x11, (&mut d as *mut UserDesc).cast(), len) == 0 {
                        n += 1;
                    } else if n == 0 {
                        return None;
                    }
                }
            }
        }
        let mut raw = vec![0u64; n as usize];
        let got = modify_ldt(0, raw.as_mut_ptr().cast(), raw.len() * 8);
        (got == raw.len() as i64 * 8).then_some(raw)
    }

    /// Runs form `i` of the test's list natively on `selector` with RAX =
    /// `rax`: (RAX, ZF) after it.
    pub(super) fn run(i: usize, selector: u16, rax: u64) -> (u64, bool) {
        let sel = u64::from(selector);
        let mut out = rax;
        let zf: u8;
        // One instruction reading CX/ECX/RCX and writing AX/EAX/RAX, then ZF.
        macro_rules! form {
            ($insn:literal) => {
                asm!($insn, "setz {z}", inout("rax") out, in("rcx") sel, z = out(reg_byte) zf)
            };
        }
        // SAFETY: each form reads RCX and writes RAX and flags only.
        unsafe {
            match i {
                0 => form!("lar ax, cx"),
                1 => form!("lar eax, ecx"),
                2 => form!("lar rax, rcx"),
                3 => form!("lsl ax, cx"),
                4 => form!("lsl eax, ecx"),
                5 => form!("lsl rax, rcx"),
                6 => form!("verr cx"),
                _ => form!("verw cx"),
            }
        }
        (out, zf != 0)
    }
}

/// The tables in 32-bit protected mode at CPL 0, paging off (linear is
/// physical).
fn legacy() -> (CpuState, MockPlatform) {
    let (mut cpu, mem) = tables(0);
    cpu.efer = 0;
    cpu.cr0 &= !CR0_PG;
    cpu.cr4 = 0;
    cpu.cs.l = false;
    cpu.cs.db = true;
    (cpu, mem)
}

/// A 32-bit guest (compatibility mode, so the 4-level mock page tables
/// apply) at CPL 0, for ARPL, which 64-bit code does not have.
fn compat() -> (CpuState, MockPlatform) {
    let (mut cpu, mem) = tables(0);
    cpu.cs.l = false;
    cpu.cs.db = true;
    (cpu, mem)
}

/// `arpl dx, cx`
const ARPL_DX_CX: [u8; 2] = [0x63, 0xca];
/// `arpl [eax], cx`
const ARPL_MEM_CX: [u8; 2] = [0x63, 0x08];

/// ARPL's register form as measured on AMD EPYC Zen 3 in 32-bit code:
/// `arpl dx, cx` with EDX 0xabcd1231 and CX 3 gives 0xabcd1233 and ZF
/// (only the low 16 bits change); an RPL already as high leaves it, clears
/// ZF and keeps the other flags (0x8d5 in, 0xa97 out with IF).
#[test]
fn arpl_register_form_like_the_cpu() {
    let (cpu, mut mem) = compat();
    let run = |mem: &mut MockPlatform, dest: u64, src: u64| {
        let mut c = cpu;
        c.gprs.rdx = dest;
        c.gprs.rcx = src;
        c.gprs.rflags = 0x8d5 | 0x200;
        done(&apm_emul().emulate(&mut c, &ARPL_DX_CX, &mut NoVectorState, mem));
        assert_eq!(c.rip, cpu.rip + 2);
        (c.gprs.rdx, c.gprs.rflags)
    };
    let flags = 0x8d5 | 0x200;
    assert_eq!(
        run(&mut mem, 0x1111_2222_abcd_1231, 0xffff_0003),
        (0x1111_2222_abcd_1233, flags | ZF)
    );
    assert_eq!(
        run(&mut mem, 0x1111_2222_abcd_1233, 1),
        (0x1111_2222_abcd_1233, flags & !ZF)
    );
    // Equal RPLs: no change.
    assert_eq!(run(&mut mem, 0x1232, 2), (0x1232, flags & !ZF));
}

/// The memory form reads, and writes only when the RPL rises (AMD EPYC
/// Zen 3, 32-bit code: no fault for an unchanged selector on a read-only
/// page or in a read-only data segment; #GP for a changed one in the
/// segment). Here: no write and no fault when unchanged; the write's own
/// #PF (W set) on a read-only page and #GP(0) in a read-only segment when
/// changed.
#[test]
fn arpl_memory_form_writes_only_a_change() {
    let (mut cpu, mut mem) = compat();
    let at = SELECTORS + 0x10;
    cpu.gprs.rax = at;
    let run = |cpu: &CpuState, mem: &mut MockPlatform, src: u64| {
        let mut c = *cpu;
        c.gprs.rcx = src;
        mem.log.clear();
        let o = apm_emul().emulate(&mut c, &ARPL_MEM_CX, &mut NoVectorState, mem);
        (o, c.gprs.rflags & ZF != 0)
    };
    let data_writes = |mem: &MockPlatform| {
        mem.log
            .iter()
            .filter(|&&(w, gpa, _)| w && gpa >= DATA)
            .count()
    };
    mem.ram[at as usize..at as usize + 2].copy_from_slice(&0x1231u16.to_le_bytes());
    let (o, zf) = run(&cpu, &mut mem, 3);
    done(&o);
    assert!(zf);
    assert_eq!(
        mem.ram[at as usize..at as usize + 2],
        0x1233u16.to_le_bytes()
    );
    // Unchanged: a read only.
    let (o, zf) = run(&cpu, &mut mem, 1);
    done(&o);
    assert!(!zf);
    assert_eq!(data_writes(&mem), 0);
    // A read-only page (CR0.WP applies at CPL 0).
    mem.map(CR3, 4, SELECTORS, SELECTORS, 0x5);
    let (o, _) = run(&cpu, &mut mem, 1);
    done(&o);
    assert_eq!(data_writes(&mem), 0);
    mem.ram[at as usize..at as usize + 2].copy_from_slice(&0x1230u16.to_le_bytes());
    let (o, _) = run(&cpu, &mut mem, 3);
    assert_eq!(exc(&o), (VEC_PF, Some(PFEC_P | PFEC_W)));
    assert_eq!(
        mem.ram[at as usize..at as usize + 2],
        0x1230u16.to_le_bytes()
    );
    // A read-only data segment.
    mem.map(CR3, 4, SELECTORS, SELECTORS, 0x7);
    cpu.ds.type_ = 0x1;
    let (o, zf) = run(&cpu, &mut mem, 0);
    done(&o);
    assert!(!zf);
    let (o, _) = run(&cpu, &mut mem, 2);
    assert_eq!(exc(&o), (VEC_GP, Some(0)));
    assert_eq!(data_writes(&mem), 0);
}

/// ARPL's memory operand at CPL 3 (AMD EPYC Zen 3, 32-bit code, natively:
/// #AC first on an odd address with CR0.AM and RFLAGS.AC, changed or not;
/// a write to a read-only user page is #PF with P, W and U set).
#[test]
fn arpl_at_cpl3_alignment_and_write_faults() {
    let (mut cpu, mut mem) = compat();
    cpu.cpl = 3;
    cpu.cs.dpl = 3;
    cpu.ss.dpl = 3;
    let run = |cpu: &CpuState, mem: &mut MockPlatform, at: u64, src: u64| {
        let mut c = *cpu;
        c.gprs.rax = at;
        c.gprs.rcx = src;
        apm_emul().emulate(&mut c, &ARPL_MEM_CX, &mut NoVectorState, mem)
    };
    let at = SELECTORS + 0x21;
    mem.ram[at as usize..at as usize + 2].copy_from_slice(&0x1231u16.to_le_bytes());
    cpu.cr0 |= CR0_AM;
    cpu.gprs.rflags |= RFLAGS_AC;
    for src in [0, 3] {
        assert_eq!(exc(&run(&cpu, &mut mem, at, src)), (VEC_AC, Some(0)));
    }
    cpu.gprs.rflags &= !RFLAGS_AC;
    mem.map(CR3, 4, SELECTORS, SELECTORS, 0x5);
    done(&run(&cpu, &mut mem, at, 1));
    let o = run(&cpu, &mut mem, at, 3);
    assert_eq!(exc(&o), (VEC_PF, Some(PFEC_P | PFEC_W | PFEC_U)));
}

/// In 32-bit code the operand's second byte wraps from linear 0xffff_ffff
/// to 0 (DS based at 0x1000 so the segment limit allows it; compatibility
/// mode, where the walk alone would not wrap it).
#[test]
fn arpl_operand_wraps_at_4_gib() {
    let (mut cpu, mut mem) = compat();
    let (top, bottom) = (DATA + 0x10_0000, DATA + 0x10_1000);
    mem.map(CR3, 4, 0xffff_f000, top, 0x7);
    mem.map(CR3, 4, 0, bottom, 0x7);
    mem.ram[top as usize + 0xfff] = 0x31;
    mem.ram[bottom as usize] = 0x12;
    cpu.ds.base = 0x1000;
    cpu.gprs.rax = 0xffff_efff;
    cpu.gprs.rcx = 3;
    done(&apm_emul().emulate(&mut cpu, &ARPL_MEM_CX, &mut NoVectorState, &mut mem));
    assert_eq!(
        (mem.ram[top as usize + 0xfff], mem.ram[bottom as usize]),
        (0x33, 0x12)
    );
}
