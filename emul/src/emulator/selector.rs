//! Instructions on segment selectors, which KVM's emulator does not
//! implement (emulate.c leaves 0F 02, 0F 03, 0F 00 /4 /5 and, outside
//! 64-bit mode, 63 empty), so on hardware KVM each one with an MMIO operand,
//! and on PVM each one in interpreted code, ends here. None runs in a stub:
//! LAR, LSL, VERR and VERW would read the host's descriptor tables, and
//! ARPL does not exist in 64-bit code. They are completed in software, from
//! the Intel SDM and the AMD APM (vol. 3), checked against the host CPU
//! where it can be: `tests/selector.rs` installs code and data descriptors
//! in this process's LDT and compares LAR, LSL, VERR and VERW with the
//! CPU's own answers.
//!
//! ARPL raises the destination selector's RPL to the source's (ZF set), or
//! changes nothing (ZF clear). Measured on AMD EPYC Zen 3 in 32-bit code:
//! only the low 16 bits of a 32-bit register destination change; an ARPL
//! that changes nothing neither faults on a read-only page nor raises #GP
//! on a read-only data segment (so it does not write), one that changes
//! the selector there raises #GP. So the memory form is a read, and a
//! write with its own checks only when the RPL rises. Its memory
//! operand is read like LAR's (step 2 below). Both manuals list "#GP(0)
//! if the destination is in a non-writable segment" without that
//! condition, and Bochs checks writability first: an Intel CPU may do so
//! too, which no Intel host has measured yet.
//!
//! LAR, LSL, VERR, VERW, in the order the CPU takes its steps:
//! 1. #UD in real and virtual-8086 mode, and with LOCK (ARPL too);
//! 2. the source selector: a register's low 16 bits, or a 2-byte read
//!    (#GP(0)/#SS(0), then #AC at CPL 3 with CR0.AM and RFLAGS.AC on an
//!    odd address, before the walk: measured on AMD EPYC Zen 3, `lar eax,
//!    [odd address on an unmapped page]` raises #AC, not #PF; then #PF);
//! 3. a null selector, or one whose 8 bytes lie past the table's limit
//!    (or in an LDT while LDTR is unusable), clears ZF. LDTR's cached
//!    state decides, not its selector: after reset it holds selector 0
//!    with a present, 64 KiB table at 0, which the CPU reads;
//! 4. the descriptor is read as an implicit supervisor access (SMAP
//!    applies whatever RFLAGS.AC; #PF with U/S clear), no accessed bit set;
//! 5. the type and privilege checks clear or set ZF; on success LAR and
//!    LSL write the destination. Nothing else changes: on failure the
//!    destination keeps all 64 bits, and no flag but ZF moves (measured
//!    on the host).
//!
//! System descriptors in IA-32e mode are 16 bytes, and the manuals differ.
//! Valid in both: a 64-bit TSS and a call gate for LAR, the LDT and a TSS
//! for LSL; the APM adds that in 64-bit mode (for a call gate, in all of
//! long mode) the upper 8 bytes must lie within the limit with bits 12:8
//! of their second dword zero, which the SDM does not mention. So those
//! pass when the upper half is well formed (both manuals agree), and the
//! rest is refused instead of guessed: a malformed or out-of-limit upper
//! half, LAR of an LDT (the SDM: invalid; the APM: valid) and LSL of type
//! 0 (the SDM: valid, as the upper half of a 16-byte descriptor; the APM:
//! invalid), when visible. No host can show which is right: its own
//! system descriptors all have DPL 0 and its LDT holds code and data only.
//! An invisible or invalid descriptor clears ZF under every reading, and
//! so does it here.

use iced_x86::{Instruction, Mnemonic, OpKind, Register, UsedMemory};

use super::{Emulator, Stop};
use crate::address::gpr_value;
use crate::cpu::{CpuState, CR0_AM, CR0_PE, EFER_LMA, RFLAGS_AC};
use crate::exception::{Exception, VEC_AC};
use crate::paging::{is_canonical, translate_span, Access};
use crate::platform::Platform;

/// RFLAGS.ZF
const RFLAGS_ZF: u64 = 1 << 6;
/// RFLAGS.VM
const RFLAGS_VM: u64 = 1 << 17;

/// Whether `m` is one of this module's instructions.
pub(crate) fn is_selector_instruction(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Lar | Mnemonic::Lsl | Mnemonic::Verr | Mnemonic::Verw | Mnemonic::Arpl
    )
}

/// A descriptor's two dwords.
#[derive(Clone, Copy)]
struct Descriptor {
    low: u32,
    high: u32,
}

impl Descriptor {
    /// S: a code or data segment (else a system descriptor or gate).
    fn is_segment(self) -> bool {
        self.high & (1 << 12) != 0
    }
    fn type_(self) -> u32 {
        (self.high >> 8) & 0xf
    }
    fn dpl(self) -> u8 {
        ((self.high >> 13) & 3) as u8
    }
    fn is_code(self) -> bool {
        self.is_segment() && self.type_() & 0b1000 != 0
    }
    fn is_conforming_code(self) -> bool {
        self.is_code() && self.type_() & 0b0100 != 0
    }
    /// Readable code, or any data segment.
    fn is_readable(self) -> bool {
        !self.is_code() || self.type_() & 0b0010 != 0
    }
    /// Writable data.
    fn is_writable_data(self) -> bool {
        self.is_segment() && !self.is_code() && self.type_() & 0b0010 != 0
    }
    /// The limit in bytes (granularity applied).
    fn limit(self) -> u32 {
        let raw = (self.low & 0xffff) | (self.high & 0xf_0000);
        if self.high & (1 << 23) != 0 {
            (raw << 12) | 0xfff
        } else {
            raw
        }
    }
}

/// What the checks decided.
enum Verdict {
    /// ZF cleared, nothing written.
    Fail,
    /// ZF set; LAR and LSL write their result from the descriptor.
    Pass(Descriptor),
    /// A pass if the upper half of this 16-byte system descriptor is well
    /// formed; refused otherwise (the manuals disagree).
    PassIfUpperHalfValid(Descriptor),
}

/// Where a descriptor lies: its linear address, and whether the table
/// holds 16 bytes from it (the upper half of an IA-32e system descriptor).
#[derive(Clone, Copy)]
struct Slot {
    lin: u64,
    room_for_16: bool,
}

/// Refusal text for what the SDM and the APM answer differently.
const DISPUTED: &str =
    "a visible system descriptor in IA-32e mode that the SDM and the APM judge differently";

impl Emulator {
    /// Completes LAR, LSL, VERR, VERW or ARPL (RIP is advanced by the
    /// caller).
    pub(super) fn selector_instruction(
        &mut self,
        cpu: &mut CpuState,
        bitness: u32,
        instr: &Instruction,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let v86 = cpu.gprs.rflags & RFLAGS_VM != 0;
        if cpu.cr0 & CR0_PE == 0 || v86 || instr.has_lock_prefix() {
            return Err(Exception::ud().into());
        }
        let mnemonic = instr.mnemonic();
        if mnemonic == Mnemonic::Arpl {
            return self.arpl(cpu, bitness, instr, mem);
        }
        // LAR/LSL: destination, source; VERR/VERW: the source alone.
        let src = if matches!(mnemonic, Mnemonic::Lar | Mnemonic::Lsl) {
            1
        } else {
            0
        };
        let selector = match instr.op_kind(src) {
            OpKind::Register => gpr_value(&cpu.gprs, instr.op_register(src))
                .ok_or(Stop::Unsupported("selector operand"))?
                as u16,
            OpKind::Memory => self.read_selector(cpu, bitness, instr, mem)?.0,
            _ => return Err(Stop::Unsupported("selector operand")),
        };
        let verdict = match read_descriptor(cpu, selector, mem)? {
            None => Verdict::Fail,
            Some((desc, slot)) => match check(cpu, bitness, mnemonic, selector, desc)? {
                Verdict::PassIfUpperHalfValid(desc) => {
                    if !slot.room_for_16 {
                        return Err(Stop::Unsupported(DISPUTED));
                    }
                    let upper = read_table(cpu, slot.lin.wrapping_add(8), mem)?;
                    if (upper >> 40) & 0x1f != 0 {
                        return Err(Stop::Unsupported(DISPUTED));
                    }
                    Verdict::Pass(desc)
                }
                v => v,
            },
        };
        let Verdict::Pass(desc) = verdict else {
            cpu.gprs.rflags &= !RFLAGS_ZF;
            return Ok(());
        };
        let dest = instr.op0_register();
        let value = match mnemonic {
            Mnemonic::Lar if dest.size() == 2 => Some(u64::from(desc.high & 0xff00)),
            // Bits 19:16 (the limit's top) are "undefined" in the SDM and
            // kept by AMD: the host's own choice, probed once.
            Mnemonic::Lar if self.shape.lar_keeps_limit_bits => {
                Some(u64::from(desc.high & 0x00ff_ff00))
            }
            Mnemonic::Lar => Some(u64::from(desc.high & 0x00f0_ff00)),
            Mnemonic::Lsl => Some(u64::from(desc.limit())),
            _ => None,
        };
        if let Some(value) = value {
            write_gpr(cpu, dest, value)?;
        }
        cpu.gprs.rflags |= RFLAGS_ZF;
        Ok(())
    }

    /// ARPL: the destination's RPL raised to the source's.
    fn arpl(
        &mut self,
        cpu: &mut CpuState,
        bitness: u32,
        instr: &Instruction,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let src = gpr_value(&cpu.gprs, instr.op1_register())
            .ok_or(Stop::Unsupported("selector operand"))? as u16;
        let (dest, at) = match instr.op0_kind() {
            OpKind::Register => {
                let v = gpr_value(&cpu.gprs, instr.op0_register())
                    .ok_or(Stop::Unsupported("selector operand"))?;
                (v as u16, None)
            }
            OpKind::Memory => {
                let (v, used) = self.read_selector(cpu, bitness, instr, mem)?;
                (v, Some(used))
            }
            _ => return Err(Stop::Unsupported("selector operand")),
        };
        if dest & 3 >= src & 3 {
            cpu.gprs.rflags &= !RFLAGS_ZF;
            return Ok(());
        }
        let new = (dest & !3) | (src & 3);
        match at {
            None => {
                let full = instr.op0_register().full_register();
                let old = gpr_value(&cpu.gprs, full).unwrap_or(0);
                write_gpr(cpu, full, (old & !0xffff) | u64::from(new))?;
            }
            Some(used) => {
                // The write's own checks: a writable segment, then the walk
                // as a write (dirty bits).
                let lin = crate::address::linear_address(cpu, bitness, &used, 2, true)?;
                let access = Access {
                    write: true,
                    fetch: false,
                    user: cpu.cpl == 3,
                };
                write_linear(cpu, bitness == 64, lin, access, &new.to_le_bytes(), mem)?;
            }
        }
        cpu.gprs.rflags |= RFLAGS_ZF;
        Ok(())
    }

    /// The 2-byte selector of a memory operand, and the operand.
    fn read_selector(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        instr: &Instruction,
        mem: &mut dyn Platform,
    ) -> Result<(u16, UsedMemory), Stop> {
        let used = self
            .used_memory(instr)?
            .ok_or(Stop::Unsupported("selector operand"))?;
        let lin = crate::address::linear_address(cpu, bitness, &used, 2, false)?;
        let alignment_check =
            cpu.cpl == 3 && cpu.cr0 & CR0_AM != 0 && cpu.gprs.rflags & RFLAGS_AC != 0;
        if alignment_check && lin & 1 != 0 {
            return Err(Exception::new(VEC_AC, Some(0)).into());
        }
        let access = Access {
            write: false,
            fetch: false,
            user: cpu.cpl == 3,
        };
        let mut bytes = [0u8; 2];
        read_linear(cpu, bitness == 64, lin, access, &mut bytes, mem)?;
        Ok((u16::from_le_bytes(bytes), used))
    }
}

/// Writes `buf` at `lin` (two pages at most, both walked first).
fn write_linear(
    cpu: &CpuState,
    long: bool,
    lin: u64,
    access: Access,
    buf: &[u8],
    mem: &mut dyn Platform,
) -> Result<(), Stop> {
    let mut at = 0;
    let span = translate_span(cpu, lin, buf.len(), !long, access, mem)?;
    for (gpa, n) in span.into_iter().filter(|&(_, n)| n != 0) {
        mem.write_phys(gpa, &buf[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `lin` (two pages at most, both walked
/// first).
fn read_linear(
    cpu: &CpuState,
    long: bool,
    lin: u64,
    access: Access,
    buf: &mut [u8],
    mem: &mut dyn Platform,
) -> Result<(), Stop> {
    let mut at = 0;
    let span = translate_span(cpu, lin, buf.len(), !long, access, mem)?;
    for (gpa, n) in span.into_iter().filter(|&(_, n)| n != 0) {
        mem.read_phys(gpa, &mut buf[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// The descriptor `selector` names and where it lies, or `None` where the
/// CPU clears ZF without reading one: a null selector, an offset past the
/// table's limit, an LDT selector while LDTR is unusable.
fn read_descriptor(
    cpu: &CpuState,
    selector: u16,
    mem: &mut dyn Platform,
) -> Result<Option<(Descriptor, Slot)>, Stop> {
    if selector & 0xfffc == 0 {
        return Ok(None);
    }
    let (base, limit) = if selector & 4 == 0 {
        (cpu.gdtr.base, u32::from(cpu.gdtr.limit))
    } else if cpu.ldtr.unusable || !cpu.ldtr.present {
        return Ok(None);
    } else {
        (cpu.ldtr.base, cpu.ldtr.limit)
    };
    let offset = u32::from(selector & 0xfff8);
    if offset + 7 > limit {
        return Ok(None);
    }
    let lin = base.wrapping_add(u64::from(offset));
    let q = read_table(cpu, lin, mem)?;
    let slot = Slot {
        lin,
        room_for_16: offset + 15 <= limit,
    };
    let desc = Descriptor {
        low: q as u32,
        high: (q >> 32) as u32,
    };
    Ok(Some((desc, slot)))
}

/// Reads 8 bytes of a descriptor table at `lin` as an implicit supervisor
/// access: SMAP applies whatever RFLAGS.AC says. Outside IA-32e mode the
/// address wraps at 4 GiB.
fn read_table(cpu: &CpuState, lin: u64, mem: &mut dyn Platform) -> Result<u64, Stop> {
    let long = cpu.efer & EFER_LMA != 0;
    let lin = if long { lin } else { lin & 0xffff_ffff };
    // A table base the guest could only have set from outside (KVM's
    // SREGS; LGDT/LLDT refuse it in 64-bit mode).
    if long && (!is_canonical(cpu, lin) || !is_canonical(cpu, lin.wrapping_add(7))) {
        return Err(Exception::gp0().into());
    }
    let mut system = *cpu;
    system.gprs.rflags &= !RFLAGS_AC;
    let access = Access {
        write: false,
        fetch: false,
        user: false,
    };
    let mut bytes = [0u8; 8];
    read_linear(&system, long, lin, access, &mut bytes, mem)?;
    Ok(u64::from_le_bytes(bytes))
}

/// The type and privilege checks of `mnemonic` on `desc`.
fn check(
    cpu: &CpuState,
    bitness: u32,
    mnemonic: Mnemonic,
    selector: u16,
    desc: Descriptor,
) -> Result<Verdict, Stop> {
    let rpl = (selector & 3) as u8;
    let visible = desc.dpl() >= cpu.cpl && desc.dpl() >= rpl;
    let pass = match mnemonic {
        Mnemonic::Verr => {
            desc.is_segment() && desc.is_readable() && (desc.is_conforming_code() || visible)
        }
        Mnemonic::Verw => desc.is_writable_data() && visible,
        // LAR, LSL on code and data: DPL is ignored for conforming code.
        _ if desc.is_segment() => desc.is_conforming_code() || visible,
        _ if cpu.efer & EFER_LMA != 0 => {
            let lar = mnemonic == Mnemonic::Lar;
            let ty = desc.type_();
            let (agreed, disputed) = match (lar, ty) {
                (true, 9 | 0xb | 0xc) | (false, 2 | 9 | 0xb) => (true, false),
                (true, 2) | (false, 0) => (false, true),
                _ => (false, false),
            };
            if !visible || !(agreed || disputed) {
                false
            } else if disputed {
                return Err(Stop::Unsupported(DISPUTED));
            } else if ty == 0xc || bitness == 64 {
                return Ok(Verdict::PassIfUpperHalfValid(desc));
            } else {
                true
            }
        }
        _ => {
            // Legacy protected mode: TSSs and the LDT for both; gates
            // (16-bit and 32-bit call, task) for LAR only.
            let valid = match desc.type_() {
                1 | 2 | 3 | 9 | 0xb => true,
                4 | 5 | 0xc => mnemonic == Mnemonic::Lar,
                _ => false,
            };
            valid && visible
        }
    };
    Ok(if pass {
        Verdict::Pass(desc)
    } else {
        Verdict::Fail
    })
}

/// Writes a LAR/LSL result: a 16-bit destination keeps bits 63:16, a
/// 32-bit one is zero-extended.
fn write_gpr(cpu: &mut CpuState, reg: Register, value: u64) -> Result<(), Stop> {
    let g = &mut cpu.gprs;
    let slot = match reg.full_register() {
        Register::RAX => &mut g.rax,
        Register::RCX => &mut g.rcx,
        Register::RDX => &mut g.rdx,
        Register::RBX => &mut g.rbx,
        Register::RSP => &mut g.rsp,
        Register::RBP => &mut g.rbp,
        Register::RSI => &mut g.rsi,
        Register::RDI => &mut g.rdi,
        Register::R8 => &mut g.r8,
        Register::R9 => &mut g.r9,
        Register::R10 => &mut g.r10,
        Register::R11 => &mut g.r11,
        Register::R12 => &mut g.r12,
        Register::R13 => &mut g.r13,
        Register::R14 => &mut g.r14,
        Register::R15 => &mut g.r15,
        _ => return Err(Stop::Unsupported("destination is not a register")),
    };
    *slot = match reg.size() {
        2 => (*slot & !0xffff) | (value & 0xffff),
        4 => value & 0xffff_ffff,
        _ => value,
    };
    Ok(())
}
