//! A tiny 64-bit CPL 0 kernel that runs a payload at CPL 3.
//!
//! On PVM hosts only 64-bit CPL 3 code runs natively (see kvm-facts), so every
//! payload that tests instructions or measures anything runs in user mode.
//! The kernel sets up a GDT with user segments, a TSS with RSP0, an IDT whose
//! handlers report vector, error code and RIP, and a `syscall` entry that
//! serves print/report/exit and returns with `iretq`; then it drops to the
//! payload with `iretq`.
//!
//! Usage: `let k = Kernel64::new(&mut a)?; k.start(&mut a, payload)?;`, then
//! emit the payload at `payload` with [`sys_print`], [`sys_report`], ...,
//! and finally `k.finish(&mut a)?` to emit the kernel's code and data.

use super::{exit, report_rax, Asm, AsmResult, COM1, EXIT_EXCEPTION};
use iced_x86::code_asm::*;

/// Where the kernel and user stacks live (inside the first 2 MiB page of
/// RAM above the image).
pub const KSTACK_TOP: u64 = 0x1f_0000;
pub const USTACK_TOP: u64 = 0x1e_0000;
/// The syscall entry's own stack. It must differ from TSS.RSP0: PVM runs the
/// entry natively at hardware CPL 3, so its `ud2` trap frame lands at RSP0.
pub const SYSCALL_STACK_TOP: u64 = 0x1e_8000;

pub const KERNEL_CS: u32 = 0x08;
pub const KERNEL_DS: u32 = 0x10;
pub const USER_DS: u32 = 0x18 | 3;
pub const USER_CS: u32 = 0x20 | 3;
pub const TSS_SEL: u32 = 0x28;

/// System call numbers (RAX); arguments in RDI, RSI.
pub const SYS_WRITE: u32 = 1;
pub const SYS_REPORT: u32 = 2;
pub const SYS_EXIT: u32 = 3;
pub const SYS_PRINT_HEX: u32 = 4;

/// Gates 0..31: the exceptions.
const IDT_ENTRIES: u16 = 32;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_FMASK: u32 = 0xc000_0084;
/// LME | LMA | NXE (as the VMM enters long mode) | SCE.
const EFER_VALUE: u32 = 0xd01;

/// Labels of the kernel's code and data, emitted by [`Kernel64::finish`].
pub struct Kernel64 {
    gdt: CodeLabel,
    gdtr: CodeLabel,
    idt: CodeLabel,
    idtr: CodeLabel,
    tss: CodeLabel,
    handlers: CodeLabel,
    exc_common: CodeLabel,
    syscall_entry: CodeLabel,
    service: CodeLabel,
    service_trap: CodeLabel,
    print_hex: CodeLabel,
    saved_user_rsp: CodeLabel,
    /// When non-zero, an exception resumes here instead of ending the VM.
    pub resume_rip: CodeLabel,
    /// Vector and error code of the last resumed exception.
    pub exc_vector: CodeLabel,
    pub exc_error: CodeLabel,
}

impl Kernel64 {
    pub fn new(a: &mut Asm) -> AsmResult<Self> {
        Ok(Kernel64 {
            gdt: a.create_label(),
            gdtr: a.create_label(),
            idt: a.create_label(),
            idtr: a.create_label(),
            tss: a.create_label(),
            handlers: a.create_label(),
            exc_common: a.create_label(),
            syscall_entry: a.create_label(),
            service: a.create_label(),
            service_trap: a.create_label(),
            print_hex: a.create_label(),
            saved_user_rsp: a.create_label(),
            resume_rip: a.create_label(),
            exc_vector: a.create_label(),
            exc_error: a.create_label(),
        })
    }

    /// Kernel set-up at CPL 0 (GDT, TSS, IDT, syscall MSRs). Guests that
    /// want to run CPL 0 code first call this, run it, then [`Self::enter_user`].
    pub fn setup(&self, a: &mut Asm) -> AsmResult {
        // GDT: the TSS descriptor needs the TSS's run-time address.
        a.lea(rax, ptr(self.tss))?;
        a.mov(rbx, rax)?;
        a.and(ebx, 0x00ff_ffff)?;
        a.shl(rbx, 16)?;
        a.mov(rcx, rax)?;
        a.shr(rcx, 24)?;
        a.shl(rcx, 56)?;
        a.or(rbx, rcx)?;
        a.mov(rcx, 0x0000_8900_0000_0067u64)?; // present, 64-bit TSS, limit 103
        a.or(rbx, rcx)?;
        a.lea(r15, ptr(self.gdt))?;
        a.mov(qword_ptr(r15 + 0x28), rbx)?;
        a.shr(rax, 32)?;
        a.mov(qword_ptr(r15 + 0x30), rax)?;
        a.lea(rax, ptr(self.gdt))?;
        a.lea(r15, ptr(self.gdtr))?;
        a.mov(qword_ptr(r15 + 2), rax)?;
        a.lgdt(ptr(self.gdtr))?;
        // Reload CS with a far return, then the data segments.
        let mut reloaded = a.create_label();
        a.push(KERNEL_CS as i32)?;
        a.lea(rax, ptr(reloaded))?;
        a.push(rax)?;
        a.db(&[0x48, 0xcb])?; // retfq
        a.set_label(&mut reloaded)?;
        a.mov(eax, KERNEL_DS)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(rsp, KSTACK_TOP)?;
        // TSS: RSP0 for exceptions taken at CPL 3; no I/O bitmap.
        a.mov(rax, KSTACK_TOP)?;
        a.lea(r15, ptr(self.tss))?;
        a.mov(qword_ptr(r15 + 4), rax)?;
        a.mov(word_ptr(r15 + 102), 104u32)?;
        a.mov(eax, TSS_SEL)?;
        a.ltr(ax)?;
        // IDT: 32 interrupt gates to the 16-byte handler stubs.
        a.lea(rsi, ptr(self.handlers))?;
        a.lea(rdi, ptr(self.idt))?;
        a.xor(ecx, ecx)?;
        let mut fill = a.create_label();
        a.set_label(&mut fill)?;
        emit_gate(a)?;
        a.add(rsi, 16)?;
        a.add(rdi, 16)?;
        a.inc(ecx)?;
        a.cmp(ecx, 32)?;
        a.jne(fill)?;
        // #BP and the like may be raised by user code with int3.
        a.lea(rax, ptr(self.idt))?;
        a.or(byte_ptr(rax + (3 * 16 + 5)), 0x60u32)?;
        a.lea(r15, ptr(self.idtr))?;
        a.mov(qword_ptr(r15 + 2), rax)?;
        a.lidt(ptr(self.idtr))?;
        // syscall: CS/SS from STAR, entry from LSTAR, mask TF IF DF AC.
        wrmsr_imm(a, MSR_EFER, 0, EFER_VALUE)?;
        wrmsr_imm(a, MSR_STAR, (0x10 << 16) | KERNEL_CS, 0)?;
        wrmsr_imm(a, MSR_FMASK, 0, 0x4_7700)?;
        a.lea(rax, ptr(self.syscall_entry))?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 32)?;
        a.mov(ecx, MSR_LSTAR)?;
        a.wrmsr()
    }

    /// Drops to CPL 3 at `user_entry` with the user stack.
    pub fn enter_user(&self, a: &mut Asm, user_entry: CodeLabel) -> AsmResult {
        a.push(USER_DS as i32)?;
        a.mov(rax, USTACK_TOP)?;
        a.push(rax)?;
        a.push(0x2i32)?; // RFLAGS: interrupts off
        a.push(USER_CS as i32)?;
        a.lea(rax, ptr(user_entry))?;
        a.push(rax)?;
        a.iretq()
    }

    /// `setup` then `enter_user`.
    pub fn start(&self, a: &mut Asm, user_entry: CodeLabel) -> AsmResult {
        self.setup(a)?;
        self.enter_user(a, user_entry)
    }

    /// Emits the kernel's handlers, syscall entry and data.
    pub fn finish(mut self, a: &mut Asm) -> AsmResult {
        self.emit_exception_handlers(a)?;
        self.emit_syscall_entry(a)?;
        self.emit_print_hex(a)?;
        a.set_label(&mut self.gdt)?;
        a.dq(&[
            0,
            0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
            0x00cf_9300_0000_ffff, // 0x10 kernel data
            0x00cf_f300_0000_ffff, // 0x18 user data, DPL 3
            0x00af_fb00_0000_ffff, // 0x20 user code, 64-bit, DPL 3
            0,
            0, // 0x28 TSS, filled in at run time
        ])?;
        a.set_label(&mut self.gdtr)?;
        a.dw(&[7 * 8 - 1])?;
        a.dq(&[0])?;
        a.set_label(&mut self.idt)?;
        a.dq(&[0; IDT_ENTRIES as usize * 2])?;
        a.set_label(&mut self.idtr)?;
        a.dw(&[IDT_ENTRIES * 16 - 1])?;
        a.dq(&[0])?;
        a.set_label(&mut self.tss)?;
        a.db(&[0; 104])?;
        a.set_label(&mut self.saved_user_rsp)?;
        a.dq(&[0])?;
        a.set_label(&mut self.resume_rip)?;
        a.dq(&[0])?;
        a.set_label(&mut self.exc_vector)?;
        a.dq(&[0])?;
        a.set_label(&mut self.exc_error)?;
        a.dq(&[0])
    }

    fn emit_exception_handlers(&mut self, a: &mut Asm) -> AsmResult {
        // Vectors that push an error code: #DF #TS #NP #SS #GP #PF #AC #CP.
        const WITH_ERROR: [u32; 8] = [8, 10, 11, 12, 13, 14, 17, 21];
        // Every stub is exactly 16 bytes (push imm8, push imm8, jmp rel32,
        // padding) so the IDT set-up can step through them.
        a.set_label(&mut self.handlers)?;
        for v in 0..32u32 {
            if WITH_ERROR.contains(&v) {
                a.db(&[0x90, 0x90])?;
            } else {
                a.db(&[0x6a, 0x00])?; // push 0
            }
            a.db(&[0x6a, v as u8])?; // push v
            a.set_prefer_short_branch(false);
            a.jmp(self.exc_common)?;
            a.set_prefer_short_branch(true);
            a.db(&[0x90; 7])?;
        }
        // Stack: vector, error, rip, cs, rflags, rsp, ss.
        a.set_label(&mut self.exc_common)?;
        a.push(rax)?;
        // The syscall entry's #UD at `service_trap` asks for the service.
        let mut not_service = a.create_label();
        a.cmp(qword_ptr(rsp + 8), 6)?;
        a.jne(not_service)?;
        a.lea(rax, ptr(self.service_trap))?;
        a.cmp(qword_ptr(rsp + 24), rax)?;
        a.jne(not_service)?;
        a.pop(rax)?;
        a.add(qword_ptr(rsp + 16), 2)?;
        a.add(rsp, 16)?;
        a.jmp(self.service)?;
        a.set_label(&mut not_service)?;
        a.mov(rax, qword_ptr(self.resume_rip))?;
        a.test(rax, rax)?;
        let mut fatal = a.create_label();
        a.jz(fatal)?;
        a.mov(qword_ptr(rsp + 24), rax)?;
        a.mov(qword_ptr(self.resume_rip), 0)?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.mov(qword_ptr(self.exc_vector), rax)?;
        a.mov(rax, qword_ptr(rsp + 16))?;
        a.mov(qword_ptr(self.exc_error), rax)?;
        a.pop(rax)?;
        a.add(rsp, 16)?;
        a.iretq()?;
        a.set_label(&mut fatal)?;
        super::print(a, "\nexception vector=")?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.call(self.print_hex)?;
        super::print(a, " error=")?;
        a.mov(rax, qword_ptr(rsp + 16))?;
        a.call(self.print_hex)?;
        super::print(a, " rip=")?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.call(self.print_hex)?;
        super::print(a, "\n")?;
        for off in [8, 16, 24] {
            a.mov(rax, qword_ptr(rsp + off))?;
            report_rax(a)?;
        }
        exit(a, EXIT_EXCEPTION)
    }

    /// `syscall` lands here. PVM runs this entry natively, where `out` and
    /// `int n` fault, so the entry traps once more with `ud2` at
    /// `service_trap`: the #UD handler recognises that address and runs the
    /// service routine, which PVM interprets at CPL 0, where port I/O works.
    /// On hardware KVM the detour is merely slower.
    fn emit_syscall_entry(&mut self, a: &mut Asm) -> AsmResult {
        a.set_label(&mut self.syscall_entry)?;
        a.mov(qword_ptr(self.saved_user_rsp), rsp)?;
        a.mov(rsp, SYSCALL_STACK_TOP)?;
        a.push(rcx)?;
        a.push(r11)?;
        a.set_label(&mut self.service_trap)?;
        a.ud2()?;
        a.pop(r11)?;
        a.pop(rcx)?;
        a.push(USER_DS as i32)?;
        a.push(qword_ptr(self.saved_user_rsp))?;
        a.push(r11)?;
        a.push(USER_CS as i32)?;
        a.push(rcx)?;
        a.iretq()?;

        a.set_label(&mut self.service)?;
        a.push(rdx)?;
        a.push(rsi)?;
        a.push(rdi)?;
        let mut done = a.create_label();
        let mut not_write = a.create_label();
        let mut not_report = a.create_label();
        let mut not_exit = a.create_label();
        a.cmp(eax, SYS_WRITE)?;
        a.jne(not_write)?;
        let mut next = a.create_label();
        a.mov(dx, COM1 as u32)?;
        a.test(rsi, rsi)?;
        a.jz(done)?;
        a.set_label(&mut next)?;
        a.mov(al, byte_ptr(rdi))?;
        a.out(dx, al)?;
        a.inc(rdi)?;
        a.dec(rsi)?;
        a.jnz(next)?;
        a.jmp(done)?;
        a.set_label(&mut not_write)?;
        a.cmp(eax, SYS_REPORT)?;
        a.jne(not_report)?;
        a.mov(rax, rdi)?;
        report_rax(a)?;
        a.jmp(done)?;
        a.set_label(&mut not_report)?;
        a.cmp(eax, SYS_EXIT)?;
        a.jne(not_exit)?;
        a.mov(eax, edi)?;
        a.mov(dx, super::DEBUG_EXIT as u32)?;
        a.out(dx, eax)?;
        a.hlt()?;
        a.set_label(&mut not_exit)?;
        a.cmp(eax, SYS_PRINT_HEX)?;
        a.jne(done)?;
        a.mov(rax, rdi)?;
        a.call(self.print_hex)?;
        a.set_label(&mut done)?;
        a.pop(rdi)?;
        a.pop(rsi)?;
        a.pop(rdx)?;
        a.iretq()
    }

    /// Prints RAX as 16 hex digits. Clobbers RAX; keeps the others.
    fn emit_print_hex(&mut self, a: &mut Asm) -> AsmResult {
        a.set_label(&mut self.print_hex)?;
        a.push(rbx)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.mov(rbx, rax)?;
        a.mov(ecx, 16)?;
        a.mov(dx, COM1 as u32)?;
        let mut digit = a.create_label();
        let mut letter = a.create_label();
        let mut emit = a.create_label();
        a.set_label(&mut digit)?;
        a.rol(rbx, 4)?;
        a.mov(eax, ebx)?;
        a.and(eax, 0xf)?;
        a.cmp(eax, 10)?;
        a.jae(letter)?;
        a.add(eax, b'0' as u32)?;
        a.jmp(emit)?;
        a.set_label(&mut letter)?;
        a.add(eax, (b'a' - 10) as u32)?;
        a.set_label(&mut emit)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(digit)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rbx)?;
        a.ret()
    }
}

/// Writes the interrupt gate for handler RSI into the IDT slot at RDI.
/// Clobbers RAX, RDX.
fn emit_gate(a: &mut Asm) -> AsmResult {
    a.mov(rax, rsi)?;
    a.and(eax, 0xffff)?;
    a.mov(rdx, 0x0000_8e00_0008_0000u64)?; // present, DPL 0, interrupt gate, CS 0x08
    a.or(rax, rdx)?;
    a.mov(rdx, rsi)?;
    a.shr(rdx, 16)?;
    a.and(edx, 0xffff)?;
    a.shl(rdx, 48)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rax, rsi)?;
    a.shr(rax, 32)?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    Ok(())
}

fn wrmsr_imm(a: &mut Asm, msr: u32, edx_v: u32, eax_v: u32) -> AsmResult {
    a.mov(ecx, msr)?;
    a.mov(edx, edx_v)?;
    a.mov(eax, eax_v)?;
    a.wrmsr()
}

/// User-mode helpers: each is a `syscall` into the kernel above. They
/// clobber RAX, RCX, R11 (the syscall ABI) and the argument registers.
pub fn sys_report(a: &mut Asm, value: AsmRegister64) -> AsmResult {
    if value != rdi {
        a.mov(rdi, value)?;
    }
    a.mov(eax, SYS_REPORT)?;
    a.syscall()
}

pub fn sys_report_imm(a: &mut Asm, value: u64) -> AsmResult {
    a.mov(rdi, value)?;
    a.mov(eax, SYS_REPORT)?;
    a.syscall()
}

pub fn sys_exit(a: &mut Asm, code: u32) -> AsmResult {
    a.mov(edi, code)?;
    a.mov(eax, SYS_EXIT)?;
    a.syscall()
}

pub fn sys_print_hex(a: &mut Asm, value: AsmRegister64) -> AsmResult {
    if value != rdi {
        a.mov(rdi, value)?;
    }
    a.mov(eax, SYS_PRINT_HEX)?;
    a.syscall()
}

/// Prints `s` from user mode: the string is placed inline and skipped over.
pub fn sys_print(a: &mut Asm, s: &str) -> AsmResult {
    let mut text = a.create_label();
    let mut after = a.create_label();
    a.jmp(after)?;
    a.set_label(&mut text)?;
    a.db(s.as_bytes())?;
    a.set_label(&mut after)?;
    a.lea(rdi, ptr(text))?;
    a.mov(esi, s.len() as u32)?;
    a.mov(eax, SYS_WRITE)?;
    a.syscall()
}

/// Ends a self-checking payload: prints `pass` and exits with EXIT_PASS
/// when `mismatches` is zero, else prints `fail` and exits with
/// EXIT_CHECK_FAILED.
pub fn sys_verdict(a: &mut Asm, mismatches: AsmRegister64, pass: &str, fail: &str) -> AsmResult {
    let mut failed = a.create_label();
    a.test(mismatches, mismatches)?;
    a.jnz(failed)?;
    sys_print(a, pass)?;
    sys_exit(a, super::EXIT_PASS)?;
    a.set_label(&mut failed)?;
    sys_print(a, fail)?;
    sys_exit(a, super::EXIT_CHECK_FAILED)
}
