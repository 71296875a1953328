//! What to say when the guest triple-faults: every beginner mistake (no
//! IDT, a wrong entry point, an unmapped address) ends there, so the end
//! line names what the guest last did: the exception KVM last recorded (if
//! any), the IDT, and the instruction at RIP, fetched through the guest's
//! page tables and decoded.

use super::platform::GuestPhys;
use emul::paging::{self, Access, WalkError};
use emul::{CpuState, Platform, PlatformError};
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use kvm_bindings::kvm_sync_regs;

/// Guest memory for the diagnosis: reads only, so the page walk's accessed
/// bits are not written into a guest that is being torn down.
struct ReadOnly<'a, 'b>(&'a mut GuestPhys<'b>);

impl Platform for ReadOnly<'_, '_> {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        self.0.read_ram(gpa, buf)
    }
    fn write_phys(&mut self, _gpa: u64, _buf: &[u8]) -> Result<(), PlatformError> {
        Ok(())
    }
}

/// SDM mnemonics of the architectural exception vectors.
fn vector_name(v: u8) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    ];
    NAMES.get(usize::from(v)).copied().unwrap_or("")
}

/// The clue line for a triple fault of the vCPU whose state is `sync`.
pub fn triple_fault_clue(sync: &kvm_sync_regs, cpu: &CpuState, phys: &mut GuestPhys) -> String {
    let mut parts = Vec::new();
    let e = &sync.events.exception;
    if e.injected != 0 || e.pending != 0 {
        let code = if e.has_error_code != 0 {
            format!(", error code {:#x}", e.error_code)
        } else {
            String::new()
        };
        parts.push(format!(
            "last exception KVM recorded: vector {} {}{code}",
            e.nr,
            vector_name(e.nr)
        ));
    }
    let idt = &sync.sregs.idt;
    let present = present_exception_gates(cpu, idt.base, idt.limit, phys);
    if present == 0 && cpu.cr0 & 1 != 0 {
        parts.push(format!(
            "the IDT (base {:#x}, limit {:#x}) has no present gate for vectors 0-31, \
             so any exception (#UD, #GP, #PF...) triple-faults",
            idt.base, idt.limit
        ));
    } else {
        parts.push(format!(
            "IDT base {:#x} limit {:#x}, {present} of vectors 0-31 present",
            idt.base, idt.limit
        ));
    }
    parts.push(instruction_at_rip(cpu, phys));
    parts.join("; ")
}

/// How many of the exception vectors 0-31 have a gate with P set inside
/// the IDT's limit (protected and long mode).
fn present_exception_gates(cpu: &CpuState, base: u64, limit: u16, phys: &mut GuestPhys) -> usize {
    let size: u64 = if cpu.efer & (1 << 10) != 0 { 16 } else { 8 };
    (0..32u64)
        .filter(|v| {
            let at = base.wrapping_add(v * size);
            if v * size + size - 1 > u64::from(limit) {
                return false;
            }
            let mut gate = [0u8; 8];
            read_linear(cpu, at, &mut gate, phys).is_ok() && gate[5] & 0x80 != 0
        })
        .count()
}

/// Reads `buf.len()` bytes (within one page) at linear `at`, through the
/// guest's page tables, from RAM.
fn read_linear(cpu: &CpuState, at: u64, buf: &mut [u8], phys: &mut GuestPhys) -> Result<(), ()> {
    let gpa = paging::translate(cpu, at, Access::default(), &mut ReadOnly(phys)).map_err(|_| ())?;
    phys.read_ram(gpa, buf).map_err(|_| ())
}

/// `instruction at rip: `text` (bytes ...)`, or why it could not be read.
fn instruction_at_rip(cpu: &CpuState, phys: &mut GuestPhys) -> String {
    let bitness = cpu.bitness();
    let lin = if bitness == 64 {
        cpu.rip
    } else {
        cpu.cs.base.wrapping_add(cpu.rip) & 0xffff_ffff
    };
    let access = Access {
        fetch: true,
        user: cpu.cpl == 3,
        ..Access::default()
    };
    let mut bytes = [0u8; 15];
    let mut got = 0;
    // Up to 15 bytes, one page piece at a time; a piece that does not
    // translate or is not RAM ends the fetch.
    let mut fail = None;
    while got < bytes.len() {
        let at = lin.wrapping_add(got as u64);
        let n = ((0x1000 - (at & 0xfff)) as usize).min(bytes.len() - got);
        let gpa = match paging::translate(cpu, at, access, &mut ReadOnly(phys)) {
            Ok(gpa) => gpa,
            Err(WalkError::Fault(x)) => {
                let code = x.error_code.map_or(String::new(), |c| format!(" {c:#x}"));
                fail = Some(format!(
                    "fetching at linear {at:#x} raises {}{code}: the code is not mapped there",
                    vector_name(x.vector)
                ));
                break;
            }
            Err(WalkError::Platform(p)) => {
                fail = Some(format!("the page walk for {at:#x} failed: {p}"));
                break;
            }
            Err(WalkError::Contended { gpa }) => {
                fail = Some(format!(
                    "the page walk for {at:#x} kept losing the entry at {gpa:#x} to another vCPU"
                ));
                break;
            }
        };
        if phys.read_ram(gpa, &mut bytes[got..got + n]).is_err() {
            fail = Some(format!(
                "linear {at:#x} is guest-physical {gpa:#x}, which is not RAM"
            ));
            break;
        }
        got += n;
    }
    let mut d = Decoder::with_ip(bitness, &bytes[..got], cpu.rip, DecoderOptions::NONE);
    let insn = d.decode();
    if got == 0 || insn.is_invalid() {
        let why = fail.unwrap_or_else(|| "they do not decode".into());
        return format!(
            "no instruction at rip {:#x} ({bitness}-bit; bytes {}): {why}",
            cpu.rip,
            hex(&bytes[..got])
        );
    }
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    format!(
        "instruction at rip {:#x} ({bitness}-bit): `{text}` (bytes {})",
        cpu.rip,
        hex(&bytes[..insn.len()])
    )
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
