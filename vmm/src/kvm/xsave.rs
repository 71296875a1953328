//! The guest's x87/SSE/AVX state for the emulator: fetched with
//! KVM_GET_XSAVE only when an instruction touches it, written back with
//! KVM_SET_XSAVE only when the instruction changed a register (compared by
//! value, see `emul::xstate`; the image then always carries MXCSR).

use emul::{PlatformError, VectorState};
use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;

/// Size of the legacy KVM_GET_XSAVE area.
pub const XSAVE_SIZE: usize = 4096;

/// A per-vCPU XSAVE image buffer, reused across exits (no allocation on the
/// exit path).
pub struct XsaveBuf {
    bytes: Box<[u8; XSAVE_SIZE]>,
}

impl Default for XsaveBuf {
    fn default() -> Self {
        XsaveBuf {
            bytes: Box::new([0; XSAVE_SIZE]),
        }
    }
}

/// One exit's lazy view of the vector state.
pub struct KvmVectorState<'a> {
    fd: &'a VcpuFd,
    buf: &'a mut XsaveBuf,
    fetched: bool,
    dirty: bool,
}

impl<'a> KvmVectorState<'a> {
    pub fn new(fd: &'a VcpuFd, buf: &'a mut XsaveBuf) -> Self {
        KvmVectorState {
            fd,
            buf,
            fetched: false,
            dirty: false,
        }
    }

    /// Whether this exit fetched the image (one KVM_GET_XSAVE).
    pub fn fetched(&self) -> bool {
        self.fetched
    }

    /// Writes the image back if the instruction changed a register
    /// (`Ok(true)`: one KVM_SET_XSAVE).
    pub fn write_back(self) -> Result<bool, kvm_ioctls::Error> {
        if !self.dirty {
            return Ok(false);
        }
        let mut x = kvm_xsave::default();
        for (word, chunk) in x.region.iter_mut().zip(self.buf.bytes.chunks_exact(4)) {
            *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        // SAFETY: `x` is a complete legacy 4096-byte kvm_xsave; the VM never
        // enabled XSAVE2-sized state (AMX), so KVM reads nothing beyond it.
        unsafe { self.fd.set_xsave(&x) }.map(|()| true)
    }
}

impl VectorState for KvmVectorState<'_> {
    fn image(&mut self) -> Result<&mut [u8], PlatformError> {
        if !self.fetched {
            let x = self.fd.get_xsave().map_err(|_| PlatformError {
                gpa: 0,
                len: XSAVE_SIZE,
                reason: "KVM_GET_XSAVE failed",
            })?;
            for (chunk, word) in self.buf.bytes.chunks_exact_mut(4).zip(x.region.iter()) {
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            self.fetched = true;
        }
        Ok(&mut self.buf.bytes[..])
    }

    fn mark_dirty(&mut self) {
        self.dirty = true;
    }
}
