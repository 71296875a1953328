//! `place_ret`: the one way generated code ends with a return.
//!
//! On CPUs with Indirect Target Selection an indirect branch or RET whose
//! last byte sits in the lower half of a 64-byte cache line (address bit 5
//! clear) may be predicted to the target of a branch in the upper half. A
//! RET is one byte, so its own address decides. When the mitigation is on
//! and the RET would land in the lower half, we emit a direct `JMP rel32`
//! to a shared return thunk whose RET sits in an upper half instead; direct
//! branches are not affected.

use super::cursor::{CodeCursor, INT3};
use super::error::StubError;

/// `ret`
pub const RET: u8 = 0xc3;

/// Address bit that must be set for a RET to be ITS-safe: bytes 32..63 of a
/// 64-byte cache line.
pub const ITS_SAFE_BIT: u64 = 1 << 5;

/// Length of the longest sequence `place_ret` writes: `jmp rel32; int3`.
pub const PLACE_RET_MAX_LEN: usize = 6;

/// Whether a RET (or the last byte of an indirect branch) at executable
/// address `addr` is safe from ITS.
pub const fn its_safe(addr: u64) -> bool {
    addr & ITS_SAFE_BIT != 0
}

/// How generated code returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetPolicy {
    /// ITS mitigation off: always a plain RET.
    Plain,
    /// ITS mitigation on: a RET where it is safe, else a jump to the thunk
    /// at this executable address (whose RET must itself be safe).
    Thunk(u64),
}

/// Writes a return at `pos` in `window` (a slice of a writable alias whose
/// first byte executes at `exec_base`) and returns the position after it.
///
/// Writes a plain RET when the policy is [`RetPolicy::Plain`] or the RET's
/// executable address is ITS-safe; otherwise `JMP rel32` to the thunk
/// followed by INT3, which stops straight-line speculation past the jump.
pub fn place_ret(
    window: &mut [u8],
    exec_base: u64,
    pos: usize,
    policy: RetPolicy,
) -> Result<usize, StubError> {
    let mut cur = CodeCursor::new(window, exec_base);
    cur.seek(pos)?;
    emit_ret(&mut cur, policy)?;
    Ok(cur.pos())
}

/// [`place_ret`] at a cursor.
pub(crate) fn emit_ret(cur: &mut CodeCursor<'_>, policy: RetPolicy) -> Result<(), StubError> {
    match policy {
        RetPolicy::Thunk(thunk) if !its_safe(cur.exec_pos()) => {
            debug_assert!(its_safe(thunk), "return thunk's RET must be ITS-safe");
            // Check the room for the whole sequence first so that a refusal
            // leaves no half-written jump behind.
            if cur.remaining() < PLACE_RET_MAX_LEN {
                return Err(StubError::TooLong {
                    limit: cur.capacity(),
                });
            }
            cur.jmp(thunk)?;
            cur.emit(&[INT3])
        }
        _ => cur.emit(&[RET]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x7f00_0000_0000;
    const THUNK: u64 = BASE + 0x1000 + 32;

    #[test]
    fn plain_ret_everywhere_when_off() {
        for pos in 0..64 {
            let mut w = [INT3; 128];
            let next = place_ret(&mut w, BASE, pos, RetPolicy::Plain).unwrap();
            assert_eq!(next, pos + 1);
            assert_eq!(w[pos], RET);
        }
    }

    #[test]
    fn ret_or_thunk_jump_at_every_offset_when_on() {
        for pos in 0..64 {
            let mut w = [INT3; 128];
            let next = place_ret(&mut w, BASE, pos, RetPolicy::Thunk(THUNK)).unwrap();
            if pos >= 32 {
                assert_eq!(next, pos + 1, "offset {pos}");
                assert_eq!(w[pos], RET);
            } else {
                assert_eq!(next, pos + 6, "offset {pos}");
                assert_eq!(w[pos], 0xe9);
                let rel = i32::from_le_bytes(w[pos + 1..pos + 5].try_into().unwrap());
                let target = (BASE + pos as u64 + 5).wrapping_add_signed(rel.into());
                assert_eq!(target, THUNK);
                assert_eq!(w[pos + 5], INT3);
            }
        }
    }

    #[test]
    fn decision_uses_the_exec_address_not_the_window() {
        // The window starts 32 bytes into a cache line of the exec alias:
        // window offset 0 is already in the upper half.
        let mut w = [INT3; 16];
        let next = place_ret(&mut w, BASE + 32, 0, RetPolicy::Thunk(THUNK)).unwrap();
        assert_eq!((next, w[0]), (1, RET));
    }

    #[test]
    fn refuses_without_room_for_the_jump() {
        let mut w = [INT3; 8];
        assert!(matches!(
            place_ret(&mut w, BASE, 4, RetPolicy::Thunk(THUNK)),
            Err(StubError::TooLong { .. })
        ));
        assert_eq!(w, [INT3; 8]);
    }
}
