//! Locked read-modify-writes: LOCK-prefixed instructions and XCHG with a
//! memory operand, which the CPU makes atomic against every other CPU.
//!
//! The stub runs the instruction on the bounce buffer, and its result
//! reaches guest memory with one compare-and-exchange against the bytes
//! it started from ([`Platform::compare_exchange_phys`]). When another
//! vCPU wrote the operand in between, the instruction runs again on what
//! memory holds now, as KVM's emulator does for CMPXCHG: every vCPU sees
//! the one atomic read-modify-write the CPU makes. After
//! `LOCKED_ATTEMPTS` lost races the guest retries the instruction
//! ([`Outcome::Retry`](crate::Outcome::Retry)). An operand split across
//! two pages is written piece by piece, not atomically: the CPU locks the
//! bus for it, which nothing here can.

use iced_x86::{Instruction, Mnemonic};

use super::operand::Operand;
use super::{map_run, Emulator, Stop, MAX_OPERAND};
use crate::cpu::CpuState;
use crate::platform::Platform;
use crate::stub::GuestGprs;

/// How many times the instruction runs again because another vCPU wrote
/// its operand first, before it is handed back to the guest to retry
/// ([`Outcome::Retry`](crate::Outcome::Retry)): the CPU never gives up,
/// and neither does the guest's retry, but it lets this thread see the VM
/// stop meanwhile.
const LOCKED_ATTEMPTS: usize = 64;

/// Whether `instr`'s memory operand is written as one atomic
/// read-modify-write on the CPU.
pub(super) fn is_locked_rmw(instr: &Instruction) -> bool {
    instr.has_lock_prefix() || instr.mnemonic() == Mnemonic::Xchg
}

impl Emulator {
    /// Runs the stub `code` on the operand staged at `bounce_off` and
    /// stores the result with a compare-and-exchange, running again on
    /// the operand's new value when another vCPU changed it. `op` reads
    /// and writes one page piece. On success `gprs` holds the registers
    /// of the run whose result was stored.
    pub(super) fn run_locked(
        &mut self,
        cpu: &CpuState,
        code: &[u8],
        gprs: &mut GuestGprs,
        op: &Operand,
        bounce_off: usize,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let (gpa, n) = op.pieces[0];
        let range = bounce_off..bounce_off + n;
        let start = *gprs;
        let mut before = [0u8; MAX_OPERAND];
        for _ in 0..LOCKED_ATTEMPTS {
            before[..n].copy_from_slice(&self.stub.bounce()[range.clone()]);
            *gprs = start;
            map_run(cpu, self.stub.run(code, gprs))?;
            if mem.compare_exchange_phys(gpa, &before[..n], &self.stub.bounce()[range.clone()])? {
                return Ok(());
            }
            // Another vCPU wrote the operand: run on its value now.
            mem.read_phys(gpa, &mut self.stub.bounce_mut()[range.clone()])?;
        }
        Err(Stop::Contended)
    }
}
