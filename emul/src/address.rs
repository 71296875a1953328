//! Linear address of an instruction's memory operand: segment base,
//! address-size wrap, RIP-relative, index*scale; canonical checks in
//! 64-bit mode and segment limit/type checks elsewhere.

use iced_x86::{CodeSize, Register, UsedMemory};

use crate::cpu::{CpuState, Segment, CR0_PE};
use crate::exception::Exception;
use crate::paging::is_canonical;
use crate::stub::GuestGprs;

/// Value of a general-purpose register (any width), or `None` for anything
/// else.
pub fn gpr_value(gprs: &GuestGprs, reg: Register) -> Option<u64> {
    let full = reg.full_register();
    if !full.is_gpr64() {
        return None;
    }
    let n = full.number();
    let regs = [
        gprs.rax, gprs.rcx, gprs.rdx, gprs.rbx, gprs.rsp, gprs.rbp, gprs.rsi, gprs.rdi, gprs.r8,
        gprs.r9, gprs.r10, gprs.r11, gprs.r12, gprs.r13, gprs.r14, gprs.r15,
    ];
    let value = *regs.get(n)?;
    Some(match reg.size() {
        1 if reg.is_gpr8() && (Register::AH..=Register::BH).contains(&reg) => (value >> 8) & 0xff,
        1 => value & 0xff,
        2 => value & 0xffff,
        4 => value & 0xffff_ffff,
        _ => value,
    })
}

pub(crate) fn segment_of(cpu: &CpuState, reg: Register) -> Option<&Segment> {
    Some(match reg {
        Register::ES => &cpu.es,
        Register::CS => &cpu.cs,
        Register::SS => &cpu.ss,
        Register::DS => &cpu.ds,
        Register::FS => &cpu.fs,
        Register::GS => &cpu.gs,
        _ => return None,
    })
}

/// Computes the linear address of `mem` for an access of `size` bytes
/// (`write`: the instruction writes it), or the #GP(0)/#SS(0) the guest
/// would get. `bitness` is the code size (16/32/64).
pub fn linear_address(
    cpu: &CpuState,
    bitness: u32,
    mem: &UsedMemory,
    size: u64,
    write: bool,
) -> Result<u64, Exception> {
    let reg = |r: Register| -> u64 {
        if r == Register::None {
            0
        } else {
            gpr_value(&cpu.gprs, r).unwrap_or(0)
        }
    };
    let addr_mask = match mem.address_size() {
        CodeSize::Code16 => 0xffff,
        CodeSize::Code32 => 0xffff_ffff,
        _ => u64::MAX,
    };
    // Relative to RIP, iced already resolved the displacement against the
    // next instruction's address (the decoder ran at the guest's RIP).
    let ea = reg(mem.base())
        .wrapping_add(reg(mem.index()).wrapping_mul(u64::from(mem.scale())))
        .wrapping_add(mem.displacement())
        & addr_mask;
    linear_from_effective(cpu, bitness, mem.segment(), ea, size, write)
}

/// The linear address of effective address `ea` (already wrapped to the
/// address size) in `segment`, for an access of `size` bytes, with the
/// canonical or segment checks of [`linear_address`].
pub fn linear_from_effective(
    cpu: &CpuState,
    bitness: u32,
    segment: Register,
    ea: u64,
    size: u64,
    write: bool,
) -> Result<u64, Exception> {
    let is_ss = segment == Register::SS;
    let last = size.saturating_sub(1);

    if bitness == 64 {
        let base = match segment {
            Register::FS => cpu.fs.base,
            Register::GS => cpu.gs.base,
            _ => 0,
        };
        let lin = base.wrapping_add(ea);
        if !is_canonical(cpu, lin) || !is_canonical(cpu, lin.wrapping_add(last)) {
            return Err(Exception::segment_fault(is_ss));
        }
        return Ok(lin);
    }

    let seg = segment_of(cpu, segment).ok_or(Exception::gp0())?;
    let protected = cpu.cr0 & CR0_PE != 0;
    if protected {
        if seg.unusable || !seg.present {
            return Err(Exception::segment_fault(is_ss));
        }
        let code = seg.type_ & 0x8 != 0;
        let writable = !code && seg.type_ & 0x2 != 0;
        let readable = !code || seg.type_ & 0x2 != 0;
        if (write && !writable) || (!write && !readable) {
            return Err(Exception::segment_fault(is_ss));
        }
    }
    let limit = u64::from(seg.limit);
    let end = ea + last; // ea < 2^32, so no overflow
    let within = if protected && seg.type_ & 0xc == 0x4 {
        // Expand-down data: valid offsets are above the limit.
        let top = if seg.db { 0xffff_ffff } else { 0xffff };
        ea > limit && end <= top
    } else {
        end <= limit
    };
    if !within {
        return Err(Exception::segment_fault(is_ss));
    }
    Ok(seg.base.wrapping_add(ea) & 0xffff_ffff)
}
