//! Multiboot v1 images in the a.out-kludge form: a 32-byte header at the
//! start of a flat image, then 32-bit code entered in flat protected mode
//! with EAX = 0x2BADB002 and EBX = the Multiboot information structure.

use super::{Asm, AsmResult};
use iced_x86::code_asm::{CodeAssembler, CodeLabel};
use iced_x86::{BlockEncoderOptions, IcedError};

pub const HEADER_MAGIC: u32 = 0x1bad_b002;
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Flags: memory information wanted (bit 1), addresses in the header (bit 16).
const FLAGS: u32 = (1 << 1) | (1 << 16);
const HEADER_LEN: u64 = 32;

/// Where the code behind the header starts: 32-bit CodeAssembler code
/// cannot take label addresses, so things a program must point at (an
/// interrupt handler, a trampoline) go first, at this fixed address.
pub const fn code_start(load_addr: u32) -> u32 {
    load_addr + HEADER_LEN as u32
}

/// Assembles `body` (32-bit code) behind a Multiboot header; the image loads
/// at `load_addr`. `body` returns the label of the entry point, which the
/// header's entry_addr names.
pub fn image(
    load_addr: u32,
    body: impl FnOnce(&mut Asm) -> AsmResult<CodeLabel>,
) -> Result<Vec<u8>, IcedError> {
    let start = code_start(load_addr);
    let mut a = CodeAssembler::new(32)?;
    let main = body(&mut a)?;
    let result = a.assemble_options(
        u64::from(start),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let entry = result.label_ip(&main)? as u32;
    let code = result.inner.code_buffer;
    let header = [
        HEADER_MAGIC,
        FLAGS,
        0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(FLAGS)),
        load_addr, // header_addr
        load_addr, // load_addr
        0,         // load_end_addr: the whole file
        0,         // bss_end_addr: no bss
        entry,
    ];
    let mut out: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.extend_from_slice(&code);
    Ok(out)
}
