//! Re-encoding an allowed instruction for the stub: as 64-bit code, with
//! its memory operand turned into `[rip + disp32]` pointing into the
//! bounce buffer, segment overrides and HLE/REP hints dropped.

use iced_x86::{Decoder, DecoderOptions, Encoder, Instruction, OpKind, Register};

use crate::stub::MAX_INSN_LEN;

/// Why an instruction could not be re-encoded.
pub type ReencodeError = &'static str;

/// Keeps the encoder's buffer between calls, so re-encoding does not
/// allocate after the first instruction.
pub struct Reencoder {
    encoder: Encoder,
}

impl Default for Reencoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Reencoder {
    /// A re-encoder for 64-bit stub code.
    pub fn new() -> Self {
        Reencoder {
            encoder: Encoder::new(64),
        }
    }

    /// Encodes `instr` to run at `exec_ip`, its memory operand (if any)
    /// redirected to absolute address `operand_addr`. Writes the bytes to
    /// `out` and returns their length. The result is decoded again and
    /// must be the same instruction (same `Code`, one memory operand at
    /// the target), so nothing else can reach the stub.
    pub fn encode(
        &mut self,
        instr: &Instruction,
        exec_ip: u64,
        operand_addr: Option<u64>,
        out: &mut [u8; MAX_INSN_LEN],
    ) -> Result<usize, ReencodeError> {
        let mut insn = *instr;
        insn.set_segment_prefix(Register::None);
        insn.set_has_xacquire_prefix(false);
        insn.set_has_xrelease_prefix(false);
        insn.set_has_rep_prefix(false);
        insn.set_has_repne_prefix(false);
        let has_mem = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory);
        match (has_mem, operand_addr) {
            (true, Some(target)) => {
                insn.set_memory_base(Register::RIP);
                insn.set_memory_index(Register::None);
                insn.set_memory_index_scale(1);
                insn.set_memory_displacement64(target);
                insn.set_memory_displ_size(8);
            }
            (false, None) => {}
            _ => return Err("memory operand mismatch"),
        }
        let mut buf = self.encoder.take_buffer();
        buf.clear();
        self.encoder.set_buffer(buf);
        let len = self
            .encoder
            .encode(&insn, exec_ip)
            .map_err(|_| "not encodable as 64-bit code")?;
        let buf = self.encoder.take_buffer();
        let ok = len <= MAX_INSN_LEN && buf.len() == len;
        if ok {
            out[..len].copy_from_slice(&buf[..len]);
        }
        self.encoder.set_buffer(buf);
        if !ok {
            return Err("re-encoded instruction too long");
        }

        // Check what will actually run.
        let mut decoder = Decoder::with_ip(64, &out[..len], exec_ip, DecoderOptions::NONE);
        let check = decoder.decode();
        let same_target = match operand_addr {
            Some(t) => check.memory_base() == Register::RIP && check.memory_displacement64() == t,
            None => true,
        };
        if check.code() != instr.code() || check.len() != len || !same_target {
            return Err("re-encoding changed the instruction");
        }
        Ok(len)
    }
}
