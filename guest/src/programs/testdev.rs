//! Multiboot kernels that exercise the QEMU-compatible test devices the way
//! kvm-unit-tests does: the Multiboot information, fw_cfg, the pc-testdev
//! latch, MMIO buffer and IRQ lines, the ACPI PM timer, and SMP start-up
//! through INIT/SIPI.

use super::{expect, LOAD_ADDR};
use crate::rt::multiboot::{self, BOOTLOADER_MAGIC};
use crate::rt::{exit, print, report_eax, status_of, Asm, AsmResult, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

const FW_CFG_SEL: u32 = 0x510;
const FW_CFG_DATA: u32 = 0x511;
const TESTDEV_LATCH: u32 = 0xe0;
const TESTDEV_IRQ: u32 = 0x2000;
const TESTDEV_IOMEM: u32 = 0xff00_0000;
const PM_TMR: u32 = 0x608;
const LAPIC: u32 = 0xfee0_0000;
const IOAPIC: u32 = 0xfec0_0000;

/// The command line and module the `multiboot-info` test passes.
pub const MB_CMDLINE: &str = "mbtest arg1";
/// The module `multiboot-info` expects as `--initrd` (it checks the size
/// and the first four bytes).
pub const MB_INITRD: &[u8] = b"INITRD0123456789";
pub const MB_MEM: u64 = 64 << 20;

fn program(
    name: &'static str,
    description: &'static str,
    image: Vec<u8>,
    extra_args: Vec<&'static str>,
    expect: crate::Expect,
) -> Program {
    Program::new(name, description, Mode::Protected, LOAD_ADDR, image, expect).with_args(extra_args)
}

/// Reports the Multiboot magic and information fields.
pub fn multiboot_info() -> Result<Program, IcedError> {
    let image = multiboot::image(LOAD_ADDR as u32, |a| {
        let mut main = a.create_label();
        a.set_label(&mut main)?;
        a.mov(esi, ebx)?;
        report_eax(a)?; // magic
        for off in [0, 4, 8] {
            // flags, mem_lower, mem_upper
            a.mov(eax, dword_ptr(esi + off))?;
            report_eax(a)?;
        }
        a.mov(edi, dword_ptr(esi + 16))?; // cmdline
        a.mov(eax, dword_ptr(edi))?;
        report_eax(a)?;
        a.mov(eax, dword_ptr(esi + 20))?; // mods_count
        report_eax(a)?;
        a.mov(edi, dword_ptr(esi + 24))?; // mods_addr
        a.mov(eax, dword_ptr(edi + 4))?;
        a.sub(eax, dword_ptr(edi))?; // module length
        report_eax(a)?;
        a.mov(edi, dword_ptr(edi))?;
        a.mov(eax, dword_ptr(edi))?; // first bytes of the module
        report_eax(a)?;
        a.mov(edi, dword_ptr(esi + 48))?; // mmap_addr
        for off in [4, 12, 20] {
            // first entry: base_addr low, length low, type
            a.mov(eax, dword_ptr(edi + off))?;
            report_eax(a)?;
        }
        print(a, "multiboot info read\n")?;
        exit(a, EXIT_PASS)?;
        Ok(main)
    })?;
    let cmd = u32::from_le_bytes([b'm', b'b', b't', b'e']);
    Ok(program(
        "multiboot-info",
        "Multiboot kernel: reports EAX and the info structure (needs --initrd with \"INITRD..\", 16 bytes)",
        image,
        vec!["--format", "multiboot", "--mem", "64M", "--cmdline", MB_CMDLINE],
        expect(
            status_of(EXIT_PASS),
            "multiboot info read",
            Some(vec![
                u64::from(BOOTLOADER_MAGIC),
                // mem, cmdline, mods, mmap, loader name
                (1 | 4 | 8 | 64 | 512),
                640,
                (MB_MEM - (1 << 20)) >> 10,
                u64::from(cmd),
                1,
                16,
                u64::from(u32::from_le_bytes(*b"INIT")),
                0,
                0x9_fc00,
                1,
            ]),
        ),
    )
    .with_initrd(MB_INITRD.to_vec()))
}

/// fw_cfg, the pc-testdev latch and MMIO buffer, and the PM timer.
pub fn testdev_ports() -> Result<Program, IcedError> {
    let image = multiboot::image(LOAD_ADDR as u32, |a| {
        let mut main = a.create_label();
        a.set_label(&mut main)?;
        fw_cfg_read(a, 0x0000, 4)?; // signature
        report_eax(a)?;
        fw_cfg_read(a, 0x0005, 2)?; // NB_CPUS
        report_eax(a)?;
        fw_cfg_read(a, 0x0003, 4)?; // RAM size, low half
        report_eax(a)?;
        a.mov(eax, 0x1234_5678u32)?;
        a.out(TESTDEV_LATCH as i32, eax)?;
        a.xor(eax, eax)?;
        a.in_(eax, TESTDEV_LATCH as i32)?;
        report_eax(a)?;
        a.mov(ebx, TESTDEV_IOMEM)?;
        a.mov(dword_ptr(ebx + 0xfff0), 0xcafe_babeu32)?;
        a.mov(eax, dword_ptr(ebx + 0xfff0))?;
        report_eax(a)?;
        // The PM timer runs at 3.58 MHz: two reads ~100 instructions apart
        // (each ~1 us when interpreted) differ.
        a.mov(dx, PM_TMR)?;
        a.in_(eax, dx)?;
        a.mov(esi, eax)?;
        a.mov(ecx, 100)?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.dec(ecx)?;
        a.jnz(spin)?;
        a.in_(eax, dx)?;
        a.sub(eax, esi)?;
        report_eax(a)?;
        print(a, "testdev ports ok\n")?;
        exit(a, EXIT_PASS)?;
        Ok(main)
    })?;
    Ok(program(
        "testdev-ports",
        "fw_cfg signature/CPUs/RAM, pc-testdev latch and MMIO buffer, PM timer delta (--testdev --cpus 2)",
        image,
        vec!["--format", "multiboot", "--testdev", "--cpus", "2"],
        // The PM timer delta is checked by the test, not here.
        expect(status_of(EXIT_PASS), "testdev ports ok", None),
    ))
}

/// Selects fw_cfg `key` and reads `len` (<= 4) bytes into EAX.
fn fw_cfg_read(a: &mut Asm, key: u32, len: u32) -> AsmResult {
    a.mov(dx, FW_CFG_SEL)?;
    a.mov(ax, key)?;
    a.out(dx, ax)?;
    a.mov(dx, FW_CFG_DATA)?;
    a.xor(ebx, ebx)?;
    for i in 0..len {
        a.in_(al, dx)?;
        a.movzx(ecx, al)?;
        a.shl(ecx, 8 * i)?;
        a.or(ebx, ecx)?;
    }
    a.mov(eax, ebx)
}

/// Raises GSI 10 through pc-testdev's IRQ port: the IOAPIC routes it to
/// vector 0x40, whose handler reports it. Runs in 64-bit mode because KVM's
/// emulator (which runs all CPL 0 code on PVM hosts) implements IRET only in
/// real mode and IRETQ in long mode, not a 32-bit IRETD.
pub fn testdev_irq() -> Result<Program, IcedError> {
    const GSI: u32 = 10;
    const VECTOR: u32 = 0x40;
    let image = super::assemble(Mode::Long, LOAD_ADDR, |a| {
        let mut idt = a.create_label();
        let mut idtr = a.create_label();
        let mut handler = a.create_label();
        let mut hits = a.create_label();
        let mut main = a.create_label();
        a.jmp(main)?;
        a.set_label(&mut handler)?;
        a.push(rax)?;
        a.push(rdx)?;
        a.inc(dword_ptr(hits))?;
        a.mov(eax, VECTOR)?;
        report_eax(a)?;
        a.mov(rdx, u64::from(LAPIC) + 0xb0)?;
        a.mov(dword_ptr(rdx), 0)?; // EOI
        a.pop(rdx)?;
        a.pop(rax)?;
        a.iretq()?;
        a.set_label(&mut main)?;
        // 64-bit interrupt gate for VECTOR, CS 0x18 (the VMM's long-mode CS).
        a.lea(rax, ptr(handler))?;
        a.lea(rdi, ptr(idt))?;
        a.add(rdi, (VECTOR * 16) as i32)?;
        a.mov(rbx, rax)?;
        a.and(ebx, 0xffff)?;
        a.mov(rcx, 0x0000_8e00_0018_0000u64)?;
        a.or(rbx, rcx)?;
        a.mov(rcx, rax)?;
        a.shr(rcx, 16)?;
        a.shl(rcx, 48)?;
        a.or(rbx, rcx)?;
        a.mov(qword_ptr(rdi), rbx)?;
        a.shr(rax, 32)?;
        a.mov(qword_ptr(rdi + 8), rax)?;
        a.lea(rax, ptr(idt))?;
        a.lea(rdi, ptr(idtr))?;
        a.mov(qword_ptr(rdi + 2), rax)?;
        a.lidt(ptr(idtr))?;
        // Mask both 8259s: the BSP's LAPIC starts in virtual-wire mode, so
        // the PIT (and GSI 10 on the slave PIC) would otherwise interrupt too.
        a.mov(al, 0xffu32)?;
        a.out(0x21, al)?;
        a.out(0xa1, al)?;
        // LAPIC on (spurious vector 0xff); IOAPIC: GSI -> VECTOR, edge,
        // fixed, physical destination APIC 0, unmasked.
        a.mov(rbx, u64::from(LAPIC))?;
        a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32)?;
        a.mov(rbx, u64::from(IOAPIC))?;
        a.mov(dword_ptr(rbx), 0x10 + 2 * GSI)?;
        a.mov(dword_ptr(rbx + 0x10), VECTOR)?;
        a.mov(dword_ptr(rbx), 0x11 + 2 * GSI)?;
        a.mov(dword_ptr(rbx + 0x10), 0u32)?;
        a.sti()?;
        a.mov(dx, TESTDEV_IRQ + GSI)?;
        a.mov(al, 1u32)?;
        a.out(dx, al)?;
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.mov(ecx, 100_000)?;
        a.set_label(&mut wait)?;
        a.cmp(dword_ptr(hits), 0)?;
        a.jne(done)?;
        a.dec(ecx)?;
        a.jnz(wait)?;
        a.set_label(&mut done)?;
        a.cli()?;
        a.mov(dx, TESTDEV_IRQ + GSI)?;
        a.mov(al, 0u32)?;
        a.out(dx, al)?;
        a.mov(eax, dword_ptr(hits))?;
        report_eax(a)?;
        print(a, "irq line done\n")?;
        exit(a, EXIT_PASS)?;
        a.set_label(&mut hits)?;
        a.dd(&[0])?;
        a.set_label(&mut idtr)?;
        a.dw(&[(VECTOR as u16 + 1) * 16 - 1])?;
        a.dq(&[0])?;
        a.set_label(&mut idt)?;
        a.dq(&[0; 2 * (VECTOR as usize + 1)])
    })?;
    Ok(Program::new(
        "testdev-irq",
        "pc-testdev IRQ line 10 -> IOAPIC -> vector 0x40 handler (--testdev)",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "irq line done",
            Some(vec![u64::from(VECTOR), 1]),
        ),
    )
    .with_args(vec!["--testdev"]))
}

/// Real-mode trampoline for the application processors, copied to 0x7000
/// (SIPI vector 7): mark this CPU's APIC id in a bitmap, count, halt.
const TRAMPOLINE: u32 = 0x7000;
const AP_COUNT: u32 = 0x6ff0;
const AP_BITMAP: u32 = 0x6ff4;
const AP_SUM: u32 = 0x6ff8;
/// Bits set in the value each AP counts with POPCNT.
const AP_POPCNT_INPUT: u32 = 0x00ff_00ff;

fn trampoline() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(eax, 1)?;
    a.cpuid()?;
    a.shr(ebx, 24)?;
    a.lock().bts(dword_ptr(AP_BITMAP), ebx)?;
    // An instruction KVM cannot emulate, in 16-bit mode: every AP's vCPU
    // thread completes it in its own stub, possibly at the same time.
    a.mov(ebx, AP_POPCNT_INPUT)?;
    a.popcnt(eax, ebx)?;
    a.lock().add(dword_ptr(AP_SUM), eax)?;
    a.lock().inc(word_ptr(AP_COUNT))?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.assemble(0)
}

/// Starts every application processor with INIT/SIPI; each reports in.
pub fn smp(cpus: u32) -> Result<Program, IcedError> {
    let tramp = trampoline()?;
    let image = multiboot::image(LOAD_ADDR as u32, |a| {
        let mut main = a.create_label();
        // The trampoline's bytes come first, at code_start().
        a.db(&tramp)?;
        a.set_label(&mut main)?;
        a.mov(dword_ptr(AP_COUNT as u64), 0u32)?;
        a.mov(dword_ptr(AP_BITMAP as u64), 1u32)?; // the BSP, APIC id 0
        a.mov(dword_ptr(AP_SUM as u64), 0u32)?;
        a.cld()?;
        a.mov(esi, multiboot::code_start(LOAD_ADDR as u32))?;
        a.mov(edi, TRAMPOLINE)?;
        a.mov(ecx, tramp.len() as u32)?;
        a.rep().movsb()?;
        a.mov(dword_ptr(LAPIC as u64 + 0xf0), 0x1ffu32)?;
        a.mov(dword_ptr(LAPIC as u64 + 0x310), 0u32)?;
        // INIT to all but self, then SIPI twice, as the MP spec asks.
        a.mov(dword_ptr(LAPIC as u64 + 0x300), 0x000c_4500u32)?;
        for _ in 0..2 {
            a.mov(
                dword_ptr(LAPIC as u64 + 0x300),
                0x000c_4600u32 | (TRAMPOLINE >> 12),
            )?;
        }
        // Wait for cpus-1 reports (bounded).
        a.mov(ecx, 200_000)?;
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut wait)?;
        a.movzx(eax, word_ptr(AP_COUNT as u64))?;
        a.cmp(eax, cpus - 1)?;
        a.jae(done)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(wait)?;
        a.set_label(&mut done)?;
        a.movzx(eax, word_ptr(AP_COUNT as u64))?;
        report_eax(a)?;
        a.mov(eax, dword_ptr(AP_BITMAP as u64))?;
        report_eax(a)?;
        a.mov(eax, dword_ptr(AP_SUM as u64))?;
        report_eax(a)?;
        print(a, "smp done\n")?;
        exit(a, EXIT_PASS)?;
        Ok(main)
    })?;
    let (name, description, args): (&'static str, &'static str, Vec<&'static str>) = match cpus {
        2 => (
            "smp-2",
            "two vCPUs: the AP starts on INIT/SIPI, completes a POPCNT through the VMM and reports in",
            vec!["--format", "multiboot", "--cpus", "2"],
        ),
        _ => (
            "smp-4",
            "four vCPUs: every AP starts on INIT/SIPI, completes a POPCNT through the VMM and reports in",
            vec!["--format", "multiboot", "--cpus", "4"],
        ),
    };
    Ok(program(
        name,
        description,
        image,
        args,
        expect(
            status_of(EXIT_PASS),
            "smp done",
            Some(vec![
                u64::from(cpus - 1),
                (1u64 << cpus) - 1,
                u64::from((cpus - 1) * AP_POPCNT_INPUT.count_ones()),
            ]),
        ),
    ))
}

pub fn smp2() -> Result<Program, IcedError> {
    smp(2)
}

pub fn smp4() -> Result<Program, IcedError> {
    smp(4)
}
