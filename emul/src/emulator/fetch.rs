//! Instruction bytes: fetched from guest memory at CS:RIP when the
//! hypervisor reported none or too few, and the exception for bytes that
//! do not decode.

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
        Err(e) => Err(e.into()),
    }
}

/// Legacy prefixes (groups 1-4).
const LEGACY_PREFIXES: [u8; 11] = [
    0xf0, 0xf2, 0xf3, 0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65, 0x66, 0x67,
];

/// A legacy prefix, or a REX prefix in 64-bit code.
pub(super) fn is_prefix(b: u8, bitness: u32) -> bool {
    LEGACY_PREFIXES.contains(&b) || (bitness == 64 && b & 0xf0 == 0x40)
}

/// The exception for bytes the decoder rejected: #GP(0) when the
/// instruction is merely longer than 15 bytes (the CPU's limit, reached
/// with redundant prefixes), else #UD.
///
/// The decoder stops at 15 bytes either way, so the prefixes are folded
/// (each distinct prefix kept once, at its last position; a REX only
/// directly before the opcode) and the result decoded again: if that
/// instruction, with the folded prefixes counted back in, needs more than
/// 15 bytes, the CPU would have stopped on the length.
pub(super) fn undecodable(bytes: &[u8], bitness: u32) -> Exception {
    let n_prefix = bytes.iter().take_while(|&&b| is_prefix(b, bitness)).count();
    if n_prefix == 0 {
        return Exception::ud();
    }
    let prefixes = &bytes[..n_prefix];
    let mut folded = [0u8; 2 * MAX_INSN_LEN];
    let mut len = 0;
    for (i, &b) in prefixes.iter().enumerate() {
        let last = !prefixes[i + 1..].contains(&b);
        let rex = bitness == 64 && b & 0xf0 == 0x40;
        if last && (!rex || i + 1 == n_prefix) {
            folded[len] = b;
            len += 1;
        }
    }
    let rest = &bytes[n_prefix..];
    folded[len..len + rest.len()].copy_from_slice(rest);
    let folded_prefixes = len;
    len += rest.len();
    let mut d = iced_x86::Decoder::new(bitness, &folded[..len], iced_x86::DecoderOptions::NONE);
    let i = d.decode();
    let needed = if d.last_error() == iced_x86::DecoderError::NoMoreBytes {
        // The opcode runs past the bytes the CPU would look at.
        usize::MAX
    } else {
        i.len().saturating_sub(folded_prefixes) + n_prefix
    };
    if needed > MAX_INSN_LEN {
        Exception::gp0()
    } else {
        Exception::ud()
    }
}
