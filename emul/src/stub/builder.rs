//! Building one stub: save host registers, load the guest's, the
//! instruction, save the guest's, restore the host's, return.
//!
//! ```text
//!   push rbx; push rbp; push r12; push r13; push r14; push r15
//!   call load_guest_vec    (XRSTOR guest image, or a bare RET)
//!   call load_guest_gprs
//!   <instruction bytes>
//!   call save_guest_gprs
//!   call save_guest_vec    (XSAVE guest image, or a bare RET)
//!   pop r15; pop r14; pop r13; pop r12; pop rbp; pop rbx
//!   place_ret            (RET, or JMP thunk; INT3)
//! ```

use super::cursor::{CodeCursor, INT3};
use super::error::StubError;
use super::helpers::{emit_host_restore, emit_host_save, HelperLayout, HOST_SAVE_LEN};
use super::ret::{emit_ret, RetPolicy, PLACE_RET_MAX_LEN};

/// Size of one vCPU's stub buffer. Stubs are built in the first half; the
/// second half stays INT3 so that anything running off the end traps.
pub const STUB_BUF_SIZE: usize = 256;

/// The architectural limit on an x86 instruction's length.
pub const MAX_INSN_LEN: usize = 15;

const CALL_REL32_LEN: usize = 5;

/// Offset of the instruction from the stub's first byte.
pub const STUB_PROLOGUE_LEN: usize = HOST_SAVE_LEN + 2 * CALL_REL32_LEN;

/// The longest stub: prologue, the longest instruction, the save call,
/// epilogue and a thunk jump.
pub const MAX_STUB_LEN: usize =
    STUB_PROLOGUE_LEN + MAX_INSN_LEN + 2 * CALL_REL32_LEN + HOST_SAVE_LEN + PLACE_RET_MAX_LEN;

/// The largest start offset a caller may choose: any position in a cache
/// line, so tests can cover every alignment of the RET.
pub const MAX_STUB_START: usize = 63;

const _: () = assert!(MAX_STUB_LEN <= STUB_BUF_SIZE / 2);
const _: () = assert!(MAX_STUB_START + MAX_STUB_LEN <= STUB_BUF_SIZE / 2);

/// A stub ready to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltStub {
    /// Executable address of the first byte.
    pub entry: u64,
    /// Executable address of the instruction bytes.
    pub insn_addr: u64,
    /// Offset of the stub in the buffer and its length in bytes.
    pub start: usize,
    /// Length of the stub in bytes.
    pub len: usize,
}

/// Where the instruction of a stub starting at `start` will execute.
pub(crate) fn insn_exec_addr(stub_exec: u64, start: usize) -> u64 {
    stub_exec + (start + STUB_PROLOGUE_LEN) as u64
}

/// Builds a stub for `insn` at `start` in `buf` (the stub buffer's writable
/// alias, `STUB_BUF_SIZE` bytes executing at `stub_exec`).
pub(crate) fn build(
    buf: &mut [u8],
    stub_exec: u64,
    start: usize,
    insn: &[u8],
    helpers: &HelperLayout,
    policy: RetPolicy,
    with_vec: bool,
) -> Result<BuiltStub, StubError> {
    if insn.is_empty() || insn.len() > MAX_INSN_LEN {
        return Err(StubError::BadInsnLength(insn.len()));
    }
    let half = STUB_BUF_SIZE / 2;
    if start >= half {
        return Err(StubError::BadStartOffset(start));
    }
    let buf = buf
        .get_mut(..STUB_BUF_SIZE)
        .ok_or(StubError::TooLong { limit: 0 })?;
    // A fresh stub replaces whatever ran before, filler included.
    buf.fill(INT3);

    let mut cur = CodeCursor::new(&mut buf[..half], stub_exec);
    cur.seek(start)?;
    // Without vector state the calls go to the thunk's bare RET, so the
    // instruction sits at the same offset either way.
    let (load_vec, save_vec) = if with_vec {
        (helpers.load_guest_vec, helpers.save_guest_vec)
    } else {
        (helpers.thunk, helpers.thunk)
    };
    emit_host_save(&mut cur)?;
    cur.call(load_vec)?;
    cur.call(helpers.load_guest_gprs)?;
    let insn_addr = cur.exec_pos();
    cur.emit(insn)?;
    cur.call(helpers.save_guest_gprs)?;
    cur.call(save_vec)?;
    emit_host_restore(&mut cur)?;
    emit_ret(&mut cur, policy)?;
    let end = cur.pos();

    // The cursor cannot pass its window, but check the finished stub again
    // before anyone jumps to it: nothing past the half may be executed.
    if end > half || insn_addr != insn_exec_addr(stub_exec, start) {
        return Err(StubError::TooLong { limit: half });
    }
    Ok(BuiltStub {
        entry: stub_exec + start as u64,
        insn_addr,
        start,
        len: end - start,
    })
}
