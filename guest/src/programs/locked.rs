//! Locked read-modify-writes the VMM completes while other vCPUs run: two
//! vCPUs at CPL 0 in long mode increment one 16-byte counter in RAM with
//! `lock cmpxchg16b` loops. KVM's emulator gives up on CMPXCHG16B, so on
//! PVM (which interprets CPL 0 code) every one reaches the VMM, and the
//! emulator's compare-and-exchange decides whether a write lands: a plain
//! write-back of the result would lose the other vCPU's increments.

use super::{assemble, expect, LOAD_ADDR};
use crate::rt::{exit, print, report_rax, status_of, Asm, AsmResult, EXIT_PASS};
use crate::{Mode, Program};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// The AP's real-mode start (SIPI vector 8) and its long-mode code.
const TRAMPOLINE: u64 = 0x8000;
const AP_LONG: u64 = 0x8100;
/// The AP's GDTR: the VMM's boot GDT (README memory map), whose 64-bit
/// code selector is 0x18.
const AP_GDTR: u64 = 0x80f0;
const BOOT_GDT: u32 = 0x1000;
const BOOT_PML4: u32 = 0x2000;
const CODE64: u16 = 0x18;
/// The 16-byte counter both halves of which every increment adds one to,
/// and the AP's "done" flag.
const COUNTER: u64 = 0x9000;
const AP_DONE: u64 = 0x9010;
const LAPIC: u64 = 0xfee0_0000;
/// Increments per vCPU.
const INCREMENTS: u32 = 2000;
/// Increments against a native writer (each costs ~100 emulations on PVM:
/// see `smp_cmpxchg16b_native_writer`).
const WRITER_INCREMENTS: u32 = 300;
/// The native writer's stores: ~0.1 s natively, seconds under TCG.
const WRITER_STORES: u32 = 100_000_000;

/// `n` times: read the counter, add one to both halves and store it with
/// `lock cmpxchg16b`, again from the value it found on a miss.
fn increment_loop(a: &mut Asm, n: u32) -> AsmResult {
    a.mov(rsi, COUNTER)?;
    a.mov(r8d, n)?;
    let mut next = a.create_label();
    let mut retry = a.create_label();
    a.set_label(&mut next)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.mov(rdx, qword_ptr(rsi + 8))?;
    a.set_label(&mut retry)?;
    a.lea(rbx, ptr(rax + 1))?;
    a.lea(rcx, ptr(rdx + 1))?;
    a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
    a.jnz(retry)?;
    a.dec(r8d)?;
    a.jnz(next)
}

/// Waits until the AP sets `AP_DONE`, for at most 2^34 TSC ticks (seconds
/// on any host, however slowly its threads are scheduled).
fn wait_for_ap(a: &mut Asm) -> AsmResult {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r9, rax)?;
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut wait)?;
    a.cmp(dword_ptr(AP_DONE), 0)?;
    a.jne(done)?;
    a.pause()?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, r9)?;
    a.shr(rax, 34)?;
    a.jz(wait)?;
    a.set_label(&mut done)
}

/// The BSP's start: the counter and `AP_DONE` cleared, the AP's code
/// (carried in the image) copied to `TRAMPOLINE`, and the AP started.
fn start_ap(a: &mut Asm, ap: &[u8]) -> AsmResult {
    let mut ap_code = a.create_label();
    let mut main = a.create_label();
    a.jmp(main)?;
    a.set_label(&mut ap_code)?;
    a.db(ap)?;
    a.set_label(&mut main)?;
    a.xor(eax, eax)?;
    a.mov(qword_ptr(COUNTER), rax)?;
    a.mov(qword_ptr(COUNTER + 8), rax)?;
    a.mov(dword_ptr(AP_DONE), eax)?;
    a.cld()?;
    a.lea(rsi, ptr(ap_code))?;
    a.mov(edi, TRAMPOLINE as u32)?;
    a.mov(ecx, ap.len() as u32)?;
    a.rep().movsb()?;
    // INIT to all but self, then SIPI twice, as the MP spec asks.
    a.mov(rdi, LAPIC)?;
    a.mov(dword_ptr(rdi + 0xf0), 0x1ffu32)?;
    a.mov(dword_ptr(rdi + 0x310), 0u32)?;
    a.mov(dword_ptr(rdi + 0x300), 0x000c_4500u32)?;
    for _ in 0..2 {
        a.mov(
            dword_ptr(rdi + 0x300),
            0x000c_4600u32 | (TRAMPOLINE >> 12) as u32,
        )?;
    }
    Ok(())
}

/// Real mode to long mode on the VMM's page tables, then `body`.
fn application_processor(body: fn(&mut Asm) -> AsmResult) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.lgdt(ptr(AP_GDTR))?;
    a.mov(eax, 0x20u32)?; // CR4.PAE
    a.mov(cr4, eax)?;
    a.mov(eax, BOOT_PML4)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xc000_0080u32)?; // EFER.LME
    a.rdmsr()?;
    a.or(eax, 0x100)?;
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0001u32)?; // PG, PE
    a.mov(cr0, eax)?;
    // jmp far CODE64:AP_LONG (32-bit offset).
    let [s0, s1] = CODE64.to_le_bytes();
    let [o0, o1, o2, o3] = (AP_LONG as u32).to_le_bytes();
    a.db(&[0x66, 0xea, o0, o1, o2, o3, s0, s1])?;
    let mut real = a.assemble(TRAMPOLINE)?;
    real.resize((AP_GDTR - TRAMPOLINE) as usize, 0xcc);
    real.extend_from_slice(&0x1fu16.to_le_bytes());
    real.extend_from_slice(&BOOT_GDT.to_le_bytes());
    real.resize((AP_LONG - TRAMPOLINE) as usize, 0xcc);

    let mut a = CodeAssembler::new(64)?;
    body(&mut a)?;
    real.extend(a.assemble(AP_LONG)?);
    Ok(real)
}

/// The AP of `smp-cmpxchg16b`: the loop, then "done" and halt.
fn increment_then_halt(a: &mut Asm) -> AsmResult {
    increment_loop(a, INCREMENTS)?;
    a.lock().inc(dword_ptr(AP_DONE))?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)
}

/// The AP's own GDT (kernel code and data, user data 0x1b, user code
/// 0x23), in the trampoline page past the real-mode code, and its GDTR.
const USER_GDT: u64 = 0x80a0;
const USER_GDTR: u64 = 0x80d8;
/// The AP's stack for the IRETQ frame, and its CPL 3 stack.
const AP_STACK: u32 = 0x7800;
const AP_USER_STACK: u32 = 0x7000;

/// Drops to CPL 3 (where PVM and hardware KVM both run code natively) and
/// stores to the counter's high half in a tight loop, `WRITER_STORES`
/// times, then spins: while it writes, every emulated CMPXCHG16B of the
/// other vCPU races a native writer (which first sets `AP_DONE`, so the
/// race starts with the increments). Finite, because the emulator cannot
/// promise a locked instruction progress against a writer whose thread
/// the host never preempts (the CPU can: it holds the cache line); on
/// this host preemption lets most increments through anyway.
fn native_writer(a: &mut Asm) -> AsmResult {
    a.mov(esp, AP_STACK)?;
    let gdt: [u64; 5] = [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_f200_0000_ffff,
        0x00af_fa00_0000_ffff,
    ];
    a.mov(edi, USER_GDT as u32)?;
    for (i, d) in gdt.iter().enumerate() {
        a.mov(rax, *d)?;
        a.mov(qword_ptr(rdi + 8 * i as i32), rax)?;
    }
    a.mov(eax, (gdt.len() * 8 - 1) as u32)?;
    a.mov(word_ptr(USER_GDTR), ax)?;
    a.mov(qword_ptr(USER_GDTR + 2), rdi)?;
    a.lgdt(ptr(USER_GDTR))?;
    let mut user = a.create_label();
    // IRETQ frame: SS, RSP, RFLAGS, CS, RIP.
    for v in [0x1b, AP_USER_STACK, 0x2, 0x23] {
        a.mov(eax, v)?;
        a.push(rax)?;
    }
    a.lea(rax, ptr(user))?;
    a.push(rax)?;
    a.iretq()?;
    a.set_label(&mut user)?;
    // Writing now: the other vCPU starts its increments.
    a.mov(dword_ptr(AP_DONE), 1)?;
    a.mov(edi, (COUNTER + 8) as u32)?;
    a.mov(r8d, WRITER_STORES)?;
    let mut again = a.create_label();
    a.set_label(&mut again)?;
    a.inc(rcx)?;
    a.mov(qword_ptr(rdi), rcx)?;
    a.dec(r8d)?;
    a.jnz(again)?;
    // HLT would fault at CPL 3 (and, without an IDT, end the VM).
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)
}

/// Two vCPUs, `INCREMENTS` locked increments each of one 16-byte counter:
/// both halves end at twice `INCREMENTS`, as on the CPU.
pub fn smp_cmpxchg16b() -> Result<Program, IcedError> {
    let ap = application_processor(increment_then_halt)?;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        start_ap(a, &ap)?;
        increment_loop(a, INCREMENTS)?;
        wait_for_ap(a)?;
        a.mov(eax, dword_ptr(AP_DONE))?;
        report_rax(a)?;
        a.mov(rax, qword_ptr(COUNTER))?;
        report_rax(a)?;
        a.mov(rax, qword_ptr(COUNTER + 8))?;
        report_rax(a)?;
        print(a, "smp cmpxchg16b done\n")?;
        exit(a, EXIT_PASS)
    })?;
    let total = 2 * u64::from(INCREMENTS);
    Ok(Program::new(
        "smp-cmpxchg16b",
        "two vCPUs at CPL 0 increment one 16-byte counter with lock cmpxchg16b loops (completed by the VMM on PVM): no increment lost",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "smp cmpxchg16b done",
            Some(vec![1, total, total]),
        ),
    )
    .with_args(vec!["--cpus", "2"]))
}

/// One vCPU's `lock cmpxchg16b` loop adds one to both halves of the
/// counter while the other vCPU, at CPL 3, stores to its high half without
/// pause (`WRITER_STORES` times). Emulated (PVM), most runs of the
/// instruction lose the race within the emulator's bounded attempts and
/// the guest retries it (`Outcome::Retry`; measured with an endless writer
/// on the development host, AMD EPYC Zen 3 with PVM: 11,000-36,000
/// emulation exits, 4,000-12,000 of them completed (most a failed
/// compare), for 300 increments, 0.4-1.1 s); every increment completes,
/// and the low half, which only this loop writes, ends at exactly
/// `WRITER_INCREMENTS`.
pub fn smp_cmpxchg16b_native_writer() -> Result<Program, IcedError> {
    let ap = application_processor(native_writer)?;
    let image = assemble(Mode::Long, LOAD_ADDR, |a| {
        start_ap(a, &ap)?;
        // The increments start once the writer writes.
        wait_for_ap(a)?;
        increment_loop(a, WRITER_INCREMENTS)?;
        a.mov(rax, qword_ptr(COUNTER))?;
        report_rax(a)?;
        print(a, "cmpxchg16b against a native writer done\n")?;
        exit(a, EXIT_PASS)
    })?;
    Ok(Program::new(
        "smp-cmpxchg16b-native-writer",
        "lock cmpxchg16b increments while another vCPU at CPL 3 stores to the operand without pause (then stops): every increment completes, none lost",
        Mode::Long,
        LOAD_ADDR,
        image,
        expect(
            status_of(EXIT_PASS),
            "cmpxchg16b against a native writer done",
            Some(vec![u64::from(WRITER_INCREMENTS)]),
        ),
    )
    .with_args(vec!["--cpus", "2"]))
}
