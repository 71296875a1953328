//! A bounded writer for generated code.
//!
//! Bytes go into the *writable* alias; every position-dependent value is
//! computed from the matching *executable* address, because that is where the
//! CPU will fetch them. The cursor refuses to write past its window rather
//! than spilling into the neighbouring code.

use super::error::StubError;

/// Writes machine code into `window` (a slice of the writable alias) whose
/// first byte executes at `exec_base`.
pub(crate) struct CodeCursor<'a> {
    window: &'a mut [u8],
    exec_base: u64,
    pos: usize,
}

impl<'a> CodeCursor<'a> {
    pub(crate) fn new(window: &'a mut [u8], exec_base: u64) -> Self {
        CodeCursor {
            window,
            exec_base,
            pos: 0,
        }
    }

    /// Offset of the next byte within the window.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// Moves to `pos` (which may lie behind or ahead of the current position)
    /// without writing; the skipped bytes keep their INT3 filler.
    pub(crate) fn seek(&mut self, pos: usize) -> Result<(), StubError> {
        if pos > self.window.len() {
            return Err(self.too_long());
        }
        self.pos = pos;
        Ok(())
    }

    /// Bytes left before the end of the window.
    pub(crate) fn remaining(&self) -> usize {
        self.window.len() - self.pos
    }

    /// Size of the window.
    pub(crate) fn capacity(&self) -> usize {
        self.window.len()
    }

    /// Executable address of the next byte.
    pub(crate) fn exec_pos(&self) -> u64 {
        self.exec_base + self.pos as u64
    }

    fn too_long(&self) -> StubError {
        StubError::TooLong {
            limit: self.window.len(),
        }
    }

    /// Appends raw bytes, or fails without writing anything if they would
    /// not fit.
    pub(crate) fn emit(&mut self, bytes: &[u8]) -> Result<(), StubError> {
        let end = self
            .pos
            .checked_add(bytes.len())
            .filter(|&end| end <= self.window.len())
            .ok_or_else(|| self.too_long())?;
        self.window[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    /// The rel32 that reaches `target` from an instruction ending at `next_ip`.
    pub(crate) fn rel32(next_ip: u64, target: u64) -> Result<i32, StubError> {
        let delta = target.wrapping_sub(next_ip) as i64;
        i32::try_from(delta).map_err(|_| StubError::OutOfRange {
            from: next_ip,
            target,
        })
    }

    /// An instruction `prefix` followed by a disp32/rel32 that reaches
    /// `target` from the end of the instruction (`suffix` bytes, e.g. an
    /// immediate, follow the displacement).
    pub(crate) fn emit_rel(
        &mut self,
        prefix: &[u8],
        target: u64,
        suffix: &[u8],
    ) -> Result<(), StubError> {
        let len = prefix.len() + 4 + suffix.len();
        let next_ip = self.exec_pos() + len as u64;
        let rel = Self::rel32(next_ip, target)?;
        let mut insn = [0u8; 16];
        insn[..prefix.len()].copy_from_slice(prefix);
        insn[prefix.len()..prefix.len() + 4].copy_from_slice(&rel.to_le_bytes());
        insn[prefix.len() + 4..len].copy_from_slice(suffix);
        self.emit(&insn[..len])
    }

    /// `call rel32`
    pub(crate) fn call(&mut self, target: u64) -> Result<(), StubError> {
        self.emit_rel(&[0xe8], target, &[])
    }

    /// `jmp rel32`
    pub(crate) fn jmp(&mut self, target: u64) -> Result<(), StubError> {
        self.emit_rel(&[0xe9], target, &[])
    }

    /// `mov [rip + target], r64`
    pub(crate) fn store_rip(&mut self, target: u64, reg: u8) -> Result<(), StubError> {
        self.emit_rel(&[rex_w(reg, 0), 0x89, modrm(0b00, reg, 0b101)], target, &[])
    }

    /// `mov r64, [rip + target]`
    pub(crate) fn load_rip(&mut self, reg: u8, target: u64) -> Result<(), StubError> {
        self.emit_rel(&[rex_w(reg, 0), 0x8b, modrm(0b00, reg, 0b101)], target, &[])
    }

    /// `mov [base + disp], r64` (base is not RSP/R12, which would need a SIB)
    pub(crate) fn store_base(&mut self, base: u8, disp: i32, reg: u8) -> Result<(), StubError> {
        self.base_disp(0x89, reg, base, disp)
    }

    /// `mov r64, [base + disp]` (base is not RSP/R12)
    pub(crate) fn load_base(&mut self, reg: u8, base: u8, disp: i32) -> Result<(), StubError> {
        self.base_disp(0x8b, reg, base, disp)
    }

    fn base_disp(&mut self, opcode: u8, reg: u8, base: u8, disp: i32) -> Result<(), StubError> {
        debug_assert!(base & 7 != 4, "RSP/R12 as base needs a SIB byte");
        let rex = rex_w(reg, base);
        match i8::try_from(disp) {
            Ok(d8) => self.emit(&[rex, opcode, modrm(0b01, reg, base), d8 as u8]),
            Err(_) => {
                let d = disp.to_le_bytes();
                self.emit(&[rex, opcode, modrm(0b10, reg, base), d[0], d[1], d[2], d[3]])
            }
        }
    }

    /// `push r64`
    pub(crate) fn push(&mut self, reg: u8) -> Result<(), StubError> {
        self.push_pop(0x50, reg)
    }

    /// `pop r64`
    pub(crate) fn pop(&mut self, reg: u8) -> Result<(), StubError> {
        self.push_pop(0x58, reg)
    }

    fn push_pop(&mut self, opcode: u8, reg: u8) -> Result<(), StubError> {
        if reg >= 8 {
            self.emit(&[0x41, opcode + (reg & 7)])
        } else {
            self.emit(&[opcode + reg])
        }
    }

    /// Pads with INT3 up to the next multiple of `align` (of the executable
    /// address).
    pub(crate) fn align_to(&mut self, align: u64, phase: u64) -> Result<(), StubError> {
        while self.exec_pos() % align != phase {
            self.emit(&[INT3])?;
        }
        Ok(())
    }
}

/// The INT3 opcode, used as filler: a stray jump into unused stub space
/// traps instead of running leftovers.
pub(crate) const INT3: u8 = 0xcc;

/// REX.W with the R and B extension bits for a ModRM `reg` and `rm`.
const fn rex_w(reg: u8, rm: u8) -> u8 {
    0x48 | ((reg >> 3) & 1) << 2 | ((rm >> 3) & 1)
}

const fn modrm(md: u8, reg: u8, rm: u8) -> u8 {
    (md << 6) | ((reg & 7) << 3) | (rm & 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_pass_the_end() {
        let mut window = [INT3; 4];
        let mut cur = CodeCursor::new(&mut window, 0x1000);
        cur.emit(&[0x90; 3]).unwrap();
        assert!(matches!(
            cur.emit(&[0x90; 2]),
            Err(StubError::TooLong { limit: 4 })
        ));
        // A refused write leaves the window untouched.
        assert_eq!(cur.pos(), 3);
        assert_eq!(window, [0x90, 0x90, 0x90, INT3]);
    }

    #[test]
    fn rel32_is_relative_to_the_exec_address() {
        let mut window = [INT3; 8];
        let mut cur = CodeCursor::new(&mut window, 0x7000_0000);
        cur.call(0x7000_0100).unwrap();
        // next ip = base + 5, so rel = 0x100 - 5
        assert_eq!(window[..5], [0xe8, 0xfb, 0x00, 0x00, 0x00]);
    }

    #[test]
    fn encodings_match_the_decoder() {
        use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
        let mut window = [INT3; 128];
        let base = 0x1000;
        let mut cur = CodeCursor::new(&mut window, base);
        cur.store_rip(0x2000, 7).unwrap();
        cur.load_rip(13, 0x2000).unwrap();
        cur.store_base(7, 128, 15).unwrap();
        cur.load_base(9, 7, 8).unwrap();
        cur.push(12).unwrap();
        cur.pop(3).unwrap();
        let len = cur.pos();
        let mut out = Vec::new();
        let mut fmt = IntelFormatter::new();
        let mut dec = Decoder::with_ip(64, &window[..len], base, DecoderOptions::NONE);
        for insn in &mut dec {
            let mut s = String::new();
            fmt.format(&insn, &mut s);
            out.push(s);
        }
        assert_eq!(
            out,
            [
                "mov [2000h],rdi",
                "mov r13,[2000h]",
                "mov [rdi+80h],r15",
                "mov r9,[rdi+8]",
                "push r12",
                "pop rbx"
            ]
        );
    }
}
