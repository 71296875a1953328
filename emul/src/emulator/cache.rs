//! Cache-line and hint instructions with a memory operand: CLFLUSH,
//! CLFLUSHOPT, CLWB (the address is checked and translated like a read:
//! segment limit, canonical form, page walk with its #PF), and PREFETCHh,
//! PREFETCHW, PREFETCHWT1, AMD's PREFETCH and CLDEMOTE, which are hints and
//! never fault. Nothing is flushed on the guest's behalf: guest RAM is
//! ordinary host memory the guest's own caches already see coherently, and
//! a device behind the MMIO bus has no cache line. The instruction still
//! runs in the stub, on the bounce buffer, so a host without it raises the
//! guest's #UD as the CPU would.

use iced_x86::Instruction;

use super::{map_run, Emulator, Stop, BOUNCE_BASE};
use crate::address::{linear_address, linear_from_effective};
use crate::classify::Kind;
use crate::cpu::CpuState;
use crate::paging::{translate, Access};
use crate::platform::Platform;
use crate::stub::MAX_INSN_LEN;

impl Emulator {
    /// CLZERO: the 64-byte line holding DS:rAX (at the address size) is
    /// written with zeros, as a store: segment checks, the walk for a
    /// write, then one platform write.
    pub(super) fn cache_zero(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        instr: &Instruction,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        // iced names the address register (AX, EAX or RAX) as operand 0.
        let mask = match instr.op_register(0).size() {
            2 => 0xffff,
            4 => 0xffff_ffff,
            _ => u64::MAX,
        };
        let ea = cpu.gprs.rax & mask & !63;
        let lin = linear_from_effective(cpu, bitness, instr.memory_segment(), ea, 64, true)?;
        let access = Access {
            write: true,
            fetch: false,
            user: cpu.cpl == 3,
        };
        let gpa = translate(cpu, lin, access, mem)?;
        mem.write_phys(gpa, &[0; 64])?;
        Ok(())
    }

    /// Completes a cache instruction (RIP is advanced by the caller).
    pub(super) fn cache_line(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        instr: &Instruction,
        kind: Kind,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let used = self.used_memory(instr)?;
        let mut offset = BOUNCE_BASE;
        if let (Kind::CacheLine, Some(used)) = (kind, used) {
            // The line's one byte is enough for the limit and the walk.
            let lin = linear_address(cpu, bitness, &used, 1, false)?;
            let access = Access {
                write: false,
                fetch: false,
                user: cpu.cpl == 3,
            };
            translate(cpu, lin, access, mem)?;
            offset += (lin & 63) as usize;
        }
        let mut code = [0u8; MAX_INSN_LEN];
        // Hints and NOPs may name memory they never access (no used memory).
        let has_mem = (0..instr.op_count()).any(|i| instr.op_kind(i) == iced_x86::OpKind::Memory);
        let target = has_mem.then(|| self.stub.bounce_exec_addr() + offset as u64);
        let len = self
            .reencode(instr, target, &mut code)
            .map_err(Stop::Unsupported)?;
        let mut gprs = cpu.gprs;
        map_run(cpu, self.stub.run(&code[..len], &mut gprs))
    }
}
