//! Fetching instruction bytes from guest memory at CS:RIP, when the
//! hypervisor reported none or too few.

use super::Stop;
use crate::cpu::CpuState;
use crate::exception::Exception;
use crate::paging::{is_canonical, translate, Access, WalkError};
use crate::platform::Platform;
use crate::stub::MAX_INSN_LEN;

const PAGE_SIZE: u64 = super::PAGE_SIZE;

/// Fetches up to 15 instruction bytes at CS:RIP. Returns how many were
/// readable and, when fewer than 15, the fault the next page gives (raised
/// only if the instruction turns out to need those bytes).
pub(super) fn fetch(
    cpu: &CpuState,
    bitness: u32,
    out: &mut [u8; MAX_INSN_LEN],
    mem: &mut dyn Platform,
) -> Result<(usize, Option<Exception>), Stop> {
    let lin = if bitness == 64 {
        cpu.rip
    } else {
        cpu.cs.base.wrapping_add(cpu.rip) & 0xffff_ffff
    };
    if bitness == 64 && !is_canonical(cpu, lin) {
        return Err(Exception::gp0().into());
    }
    let access = Access {
        write: false,
        fetch: true,
        user: cpu.cpl == 3,
    };
    let first = MAX_INSN_LEN.min((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize);
    let gpa = translate(cpu, lin, access, mem)?;
    mem.read_phys(gpa, &mut out[..first])?;
    if first == MAX_INSN_LEN {
        return Ok((first, None));
    }
    let mut next = lin.wrapping_add(first as u64);
    if bitness != 64 {
        next &= 0xffff_ffff;
    }
    let next_ok = bitness != 64 || is_canonical(cpu, next);
    match translate(cpu, next, access, mem) {
        Ok(gpa) if next_ok => {
            mem.read_phys(gpa, &mut out[first..])?;
            Ok((MAX_INSN_LEN, None))
        }
        Ok(_) => Ok((first, Some(Exception::gp0()))),
        Err(WalkError::Fault(f)) => Ok((first, Some(f))),
        Err(WalkError::Platform(p)) => Err(p.into()),
    }
}
