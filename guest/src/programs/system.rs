//! System instructions run at CPL 0 before the guest ever drops to CPL 3
//! (so on PVM hosts KVM's emulator meets them and the VMM completes them):
//! INT3 and INT 0x20 through the guest's own IDT, XGETBV, CLAC/STAC,
//! WBINVD, INVPCID and RDPRU, each answered as the guest's CPUID says;
//! LAR, LSL, VERR and VERW against the guest's own GDT and LDT.

use super::{assemble, expect, LOAD_ADDR, MMIO_BASE, MMIO_SIZE};
use crate::rt::{exit, print, report_eax, report_rax, status_of, Asm, AsmResult, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// The VMM's long-mode code selector.
const CS: u64 = 0x18;
/// Vectors with a handler: #BP, #UD, #GP, and one software-only vector.
const VECTORS: [u8; 4] = [3, 6, 13, 0x20];
const IDT_LEN: usize = 0x21;
/// What `last_vector` holds before an instruction that may fault.
pub const NO_VECTOR: u64 = 0xff;

/// Reports, in order (each a 64-bit value):
///  0. vector taken by `int3` (3)
///  1. its return RIP minus the address after `int3` (0)
///  2. vector taken by `int 0x20` (0x20)
///  3. its return RIP minus the address after `int 0x20` (0)
///  4. XGETBV(0) EDX:EAX
///  5. CPUID.(0Dh,0) EDX:EAX
///  6. vector raised by XGETBV(2) (13, #GP)
///  7. CPUID.(7,0):EBX
///  8. vector after STAC (0xff: none, 6: #UD)
///  9. RFLAGS.AC after STAC
/// 10. vector after CLAC
/// 11. RFLAGS.AC after CLAC
/// 12. vector after WBINVD (0xff)
/// 13. vector after INVPCID type 2 (0xff, or 6 without INVPCID)
/// 14. CPUID.8000_0008h:EBX
/// 15. vector after RDPRU (6 without RDPRU)
pub fn system_cpl0() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let mut idt = a.create_label();
        let mut idtr = a.create_label();
        let mut last_vector = a.create_label();
        let mut last_rip = a.create_label();
        let mut resume = a.create_label();
        let mut common = a.create_label();
        let mut main = a.create_label();
        let mut stubs: Vec<CodeLabel> = VECTORS.iter().map(|_| a.create_label()).collect();
        a.jmp(main)?;

        // Handler stubs: push a dummy error code where the CPU pushes none,
        // then the vector.
        for (i, &v) in VECTORS.iter().enumerate() {
            a.set_label(&mut stubs[i])?;
            if v != 13 {
                a.push(0)?;
            }
            a.push(i32::from(v))?;
            a.jmp(common)?;
        }
        // Stack: vector, error, rip, cs, rflags, rsp, ss. Record vector and
        // return RIP; a fault resumes at `resume` when one is set.
        a.set_label(&mut common)?;
        a.push(rax)?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.mov(qword_ptr(last_vector), rax)?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.mov(qword_ptr(last_rip), rax)?;
        a.mov(rax, qword_ptr(resume))?;
        let mut keep = a.create_label();
        a.test(rax, rax)?;
        a.jz(keep)?;
        a.mov(qword_ptr(rsp + 24), rax)?;
        a.mov(qword_ptr(resume), 0)?;
        a.set_label(&mut keep)?;
        a.pop(rax)?;
        a.add(rsp, 16)?;
        a.iretq()?;

        a.set_label(&mut main)?;
        for (i, &v) in VECTORS.iter().enumerate() {
            // 64-bit interrupt gate, DPL 0, CS 0x18.
            a.lea(rax, ptr(stubs[i]))?;
            a.lea(rdi, ptr(idt))?;
            a.add(rdi, i32::from(v) * 16)?;
            a.mov(rbx, rax)?;
            a.and(ebx, 0xffff)?;
            a.mov(rcx, 0x0000_8e00_0000_0000u64 | (CS << 16))?;
            a.or(rbx, rcx)?;
            a.mov(rcx, rax)?;
            a.shr(rcx, 16)?;
            a.shl(rcx, 48)?;
            a.or(rbx, rcx)?;
            a.mov(qword_ptr(rdi), rbx)?;
            a.shr(rax, 32)?;
            a.mov(qword_ptr(rdi + 8), rax)?;
        }
        a.lea(rax, ptr(idt))?;
        a.lea(rdi, ptr(idtr))?;
        a.mov(qword_ptr(rdi + 2), rax)?;
        a.lidt(ptr(idtr))?;

        // Software interrupts: the vector and where they return.
        for insn in [0xccu8, 0x20] {
            let mut after = a.create_label();
            a.mov(qword_ptr(last_vector), NO_VECTOR as i32)?;
            if insn == 0xcc {
                a.int3()?;
            } else {
                a.int(0x20)?;
            }
            a.set_label(&mut after)?;
            a.mov(rax, qword_ptr(last_vector))?;
            report_rax(a)?;
            a.mov(rax, qword_ptr(last_rip))?;
            a.lea(rcx, ptr(after))?;
            a.sub(rax, rcx)?;
            report_rax(a)?;
        }

        // XGETBV(0) against CPUID leaf 0xD (the VMM's XCR0 at entry).
        a.xor(ecx, ecx)?;
        a.xgetbv()?;
        combine_edx_eax(a)?;
        report_rax(a)?;
        a.mov(eax, 0xd)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        combine_edx_eax(a)?;
        report_rax(a)?;
        faulting(a, &mut resume, &mut last_vector, |a| {
            a.mov(ecx, 2)?;
            a.xgetbv()
        })?;

        // CLAC/STAC as CPUID.7 says.
        a.mov(eax, 7)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(eax, ebx)?;
        report_rax(a)?;
        for stac in [true, false] {
            faulting(a, &mut resume, &mut last_vector, |a| {
                if stac {
                    a.stac()
                } else {
                    a.clac()
                }
            })?;
            a.pushfq()?;
            a.pop(rax)?;
            a.shr(rax, 18)?;
            a.and(eax, 1)?;
            report_rax(a)?;
        }

        faulting(a, &mut resume, &mut last_vector, |a| a.wbinvd())?;

        // INVPCID type 2 (all contexts, globals too) on a zero descriptor.
        a.sub(rsp, 16)?;
        a.mov(qword_ptr(rsp), 0)?;
        a.mov(qword_ptr(rsp + 8), 0)?;
        faulting(a, &mut resume, &mut last_vector, |a| {
            a.mov(ebx, 2)?;
            a.invpcid(rbx, ptr(rsp))
        })?;
        a.add(rsp, 16)?;

        a.mov(eax, 0x8000_0008u32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(eax, ebx)?;
        report_rax(a)?;
        faulting(a, &mut resume, &mut last_vector, |a| {
            a.xor(ecx, ecx)?;
            a.rdpru()
        })?;

        print(a, "system instructions done\n")?;
        exit(a, EXIT_PASS)?;

        a.set_label(&mut last_vector)?;
        a.dq(&[0])?;
        a.set_label(&mut last_rip)?;
        a.dq(&[0])?;
        a.set_label(&mut resume)?;
        a.dq(&[0])?;
        a.set_label(&mut idtr)?;
        a.dw(&[(IDT_LEN * 16 - 1) as u16])?;
        a.dq(&[0])?;
        a.set_label(&mut idt)?;
        a.dq(&[0; IDT_LEN * 2])
    })?;
    Ok(Program::new(
        "system-cpl0",
        "INT3, INT 0x20, XGETBV, CLAC/STAC, WBINVD, INVPCID, RDPRU at CPL 0 through the guest's IDT",
        Mode::Long,
        LOAD_ADDR,
        image,
        // The vectors of CLAC/STAC/INVPCID/RDPRU follow the guest's CPUID;
        // tests/tests/system.rs checks them against it.
        expect(status_of(EXIT_PASS), "system instructions done", None),
    ))
}

/// RAX = EDX:EAX.
fn combine_edx_eax(a: &mut Asm) -> AsmResult {
    a.shl(rdx, 32)?;
    a.mov(eax, eax)?;
    a.or(rax, rdx)
}

/// Runs `body` with `last_vector` = NO_VECTOR and a fault resuming right
/// after it, then reports `last_vector`.
fn faulting(
    a: &mut Asm,
    resume: &mut CodeLabel,
    last_vector: &mut CodeLabel,
    body: impl FnOnce(&mut Asm) -> AsmResult,
) -> AsmResult {
    let mut after = a.create_label();
    a.mov(qword_ptr(*last_vector), NO_VECTOR as i32)?;
    a.lea(rax, ptr(after))?;
    a.mov(qword_ptr(*resume), rax)?;
    body(a)?;
    a.set_label(&mut after)?;
    a.mov(qword_ptr(*resume), 0)?;
    a.mov(rax, qword_ptr(*last_vector))?;
    report_rax(a)
}

/// `descriptor-checks`' GDT (entry i at selector 8i; entries 8-9, an LDT
/// descriptor DPL 0, are filled in at run time; entries 10-11 a 64-bit
/// TSS, [`DESCRIPTOR_TSS`]), as (base, limit, access byte, flags nibble).
/// Entry 3 is the code segment the guest runs in.
const DESCRIPTOR_GDT: [(u32, u32, u8, u8); 8] = [
    (0, 0, 0, 0),
    (0, 0xfffff, 0x93, 0xc),           // 0x08 data, DPL 0
    (0x1234_5678, 0x12345, 0xf1, 0x4), // 0x10 read-only data, DPL 3, byte granular
    (0, 0xfffff, 0x9b, 0xa),           // 0x18 64-bit code, DPL 0
    (0, 0xfffff, 0x9d, 0xa),           // 0x20 conforming execute-only code, DPL 0
    (0, 0xfffff, 0x99, 0xa),           // 0x28 execute-only code, DPL 0
    (0, 0xfffff, 0xd3, 0xc),           // 0x30 data, DPL 2
    (0, 0xfffff, 0x13, 0xc),           // 0x38 data, DPL 0, not present
];
/// The 64-bit TSS descriptor at 0x50 (DPL 0, upper half zero): LAR and LSL
/// take it in IA-32e mode under both the SDM and the APM.
const DESCRIPTOR_TSS: (u32, u32, u8, u8) = (0x9000, 0x67, 0x89, 0);
/// Its LDT: 0x04 data DPL 0, 0x0c code DPL 0.
const DESCRIPTOR_LDT: [(u32, u32, u8, u8); 2] = [(0, 0xfffff, 0x93, 0xc), (0, 0xfffff, 0x9b, 0xa)];

/// The selectors `descriptor-checks` checks, in report order.
pub const DESCRIPTOR_SELECTORS: [u16; 16] = [
    0x00, 0x08, 0x0b, 0x10, 0x18, 0x23, 0x28, 0x32, 0x33, 0x38, 0x43, 0x50, 0x60, 0x04, 0x0c, 0x14,
];
/// What RAX holds before each LAR/LSL (kept where the check fails).
pub const DESCRIPTOR_GARBAGE: u64 = 0xdead_beef_cafe_babe;

fn descriptor(&(base, limit, access, flags): &(u32, u32, u8, u8)) -> u64 {
    let (base, limit) = (u64::from(base), u64::from(limit));
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | u64::from(access) << 40
        | (limit >> 16 & 0xf) << 48
        | u64::from(flags) << 52
        | (base >> 24) << 56
}

/// LAR, LSL, VERR, VERW at CPL 0 on the guest's own GDT and LDT: each
/// selector of [`DESCRIPTOR_SELECTORS`] from a register and from the MMIO
/// window. Reports, per selector: LAR reg, LAR mem, LSL reg, LSL mem (the
/// 32-bit result, or [`DESCRIPTOR_GARBAGE`] when ZF is clear), VERR reg,
/// VERR mem, VERW reg, VERW mem (ZF). The one visible system descriptor is
/// a 64-bit TSS, which the SDM and the APM both accept (the VMM refuses
/// those they judge differently).
pub fn descriptor_checks() -> Result<Program, IcedError> {
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        let mut gdt = a.create_label();
        let mut gdtr = a.create_label();
        let mut ldt = a.create_label();
        let mut main = a.create_label();
        a.jmp(main)?;
        a.set_label(&mut main)?;
        a.lea(rax, ptr(gdt))?;
        a.lea(rdi, ptr(gdtr))?;
        a.mov(qword_ptr(rdi + 2), rax)?;
        a.lgdt(ptr(gdtr))?;
        // The LDT descriptor (16 bytes in IA-32e mode): limit 15, the LDT's
        // address (below 16 MiB) as base, type 2, present, DPL 0.
        a.lea(rax, ptr(ldt))?;
        a.shl(rax, 16)?;
        a.or(rax, 15)?;
        a.mov(rcx, 0x82u64 << 40)?;
        a.or(rax, rcx)?;
        a.lea(rdi, ptr(gdt))?;
        a.mov(qword_ptr(rdi + 0x40), rax)?;
        a.mov(qword_ptr(rdi + 0x48), 0)?;
        a.mov(eax, 0x40)?;
        a.lldt(ax)?;

        a.mov(rsi, MMIO_BASE)?;
        for (k, &sel) in DESCRIPTOR_SELECTORS.iter().enumerate() {
            a.mov(word_ptr(rsi + 2 * k as i32), u32::from(sel))?;
        }
        for (k, &sel) in DESCRIPTOR_SELECTORS.iter().enumerate() {
            let mem = word_ptr(rsi + 2 * k as i32);
            for lsl in [false, true] {
                for from_memory in [false, true] {
                    a.mov(rax, DESCRIPTOR_GARBAGE)?;
                    a.mov(ecx, u32::from(sel))?;
                    match (lsl, from_memory) {
                        (false, false) => a.lar(eax, ecx)?,
                        (false, true) => a.lar(eax, mem)?,
                        (true, false) => a.lsl(eax, ecx)?,
                        (true, true) => a.lsl(eax, mem)?,
                    }
                    report_rax(a)?;
                }
            }
            for verw in [false, true] {
                for from_memory in [false, true] {
                    a.mov(ecx, u32::from(sel))?;
                    match (verw, from_memory) {
                        (false, false) => a.verr(cx)?,
                        (false, true) => a.verr(mem)?,
                        (true, false) => a.verw(cx)?,
                        (true, true) => a.verw(mem)?,
                    }
                    a.setz(al)?;
                    a.movzx(eax, al)?;
                    report_rax(a)?;
                }
            }
        }
        print(a, "descriptor checks done\n")?;
        exit(a, EXIT_PASS)?;

        a.set_label(&mut gdtr)?;
        a.dw(&[0x5f])?;
        a.dq(&[0])?;
        a.set_label(&mut gdt)?;
        let gdt_entries: Vec<u64> = DESCRIPTOR_GDT.iter().map(descriptor).collect();
        a.dq(&gdt_entries)?;
        a.dq(&[0, 0, descriptor(&DESCRIPTOR_TSS), 0])?;
        a.set_label(&mut ldt)?;
        let ldt_entries: Vec<u64> = DESCRIPTOR_LDT.iter().map(descriptor).collect();
        a.dq(&ldt_entries)
    })?;
    Ok(Program::new(
        "descriptor-checks",
        "LAR, LSL, VERR, VERW at CPL 0 on the guest's own GDT and LDT, from registers and MMIO",
        Mode::Long,
        LOAD_ADDR,
        image,
        // The values (LAR's bits 19:16 are the CPU's choice) are checked
        // by tests/tests/system.rs.
        expect(status_of(EXIT_PASS), "descriptor checks done", None),
    )
    .with_mmio_ram(vec![(MMIO_BASE, MMIO_SIZE)]))
}

/// ARPL in 32-bit protected mode at CPL 0 (KVM's emulator lacks it: PVM
/// interprets this code, so every form reaches the VMM; on hardware KVM
/// the register and RAM forms run natively and the MMIO ones reach it).
/// Reports, in pairs (result, ZF): `arpl dx, cx` raising EDX 0xabcd1231 to
/// RPL 3 (0xabcd1233: bits 31:16 kept), the same on 0x1113 with RPL 2 (no
/// change), the RAM word 0x1230 raised to RPL 2, the MMIO word 0x5671
/// raised to RPL 3, and the same with RPL 1 (no change).
pub fn arpl_protected() -> Result<Program, IcedError> {
    // A RAM word past the image.
    const WORD: u32 = LOAD_ADDR as u32 + 0x1_0000;
    let image = assemble(Mode::Protected, LOAD_ADDR, |a| {
        // A stack below the image, for PUSHFD/POPFD.
        a.mov(esp, LOAD_ADDR as u32)?;
        // Reports EAX as `load` leaves it (without touching flags), then ZF.
        let report = |a: &mut Asm, load: &dyn Fn(&mut Asm) -> AsmResult| -> AsmResult {
            load(a)?;
            a.pushfd()?;
            report_eax(a)?;
            a.popfd()?;
            a.setz(al)?;
            a.movzx(eax, al)?;
            report_eax(a)
        };
        for (dest, rpl) in [(0xabcd_1231u32, 3u32), (0x1113, 2)] {
            a.mov(edx, dest)?;
            a.mov(ecx, rpl)?;
            a.arpl(dx, cx)?;
            report(a, &|a| a.mov(eax, edx))?;
        }
        a.mov(esi, WORD)?;
        a.mov(word_ptr(esi), 0x1230)?;
        a.mov(ebx, MMIO_BASE as u32)?;
        a.mov(word_ptr(ebx), 0x5671)?;
        for (base, rpl) in [(esi, 2u32), (ebx, 3), (ebx, 1)] {
            a.mov(ecx, rpl)?;
            a.arpl(word_ptr(base), cx)?;
            report(a, &|a| a.movzx(eax, word_ptr(base)))?;
        }
        print(a, "arpl done\n")?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "arpl-protected",
        "ARPL at CPL 0 in 32-bit protected mode on a register, RAM and MMIO",
        Mode::Protected,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "arpl done",
            Some(vec![
                0xabcd_1233,
                1,
                0x1113,
                0,
                0x1232,
                1,
                0x5673,
                1,
                0x5673,
                0,
            ]),
        ),
    )
    .with_mmio_ram(vec![(MMIO_BASE, MMIO_SIZE)]))
}
