//! The guest's x87/SSE/AVX state for the emulator: fetched with
//! KVM_GET_XSAVE only when an instruction touches it, written back with
//! KVM_SET_XSAVE only when the instruction changed a register (compared by
//! value, see `emul::xstate`; the image then always carries MXCSR).

use emul::{PlatformError, VectorState};
use kvm_bindings::{kvm_xsave, KVMIO};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_ior_nr;
use zerocopy::IntoBytes;

// kvm-ioctls' `get_xsave` returns the image by value: KVM writes it to a
// temporary wherever that lands on the stack, and it is copied again.
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);

/// Size of the legacy KVM_GET_XSAVE area.
pub const XSAVE_SIZE: usize = 4096;

/// A per-vCPU XSAVE image buffer, reused across exits (no allocation on the
/// exit path). It is KVM's own `kvm_xsave`, which the emulator reads and
/// writes as bytes in place (zerocopy): no conversion after KVM_GET_XSAVE
/// or before KVM_SET_XSAVE.
#[derive(Default)]
pub struct XsaveBuf {
    xsave: Box<PageAligned>,
}

/// KVM_GET_XSAVE copies 4 KiB from a 64-byte aligned kernel buffer with
/// `rep movsb`, which on AMD Zen 3 runs many times slower into a
/// destination that is not as aligned (glibc avoids it there for that
/// reason, BZ 30994): measured here, a misaligned destination put that copy
/// at 9% of a vector emulation's time against 1%, ~2 us per instruction.
/// A page also keeps the image in one TLB entry.
#[derive(Default)]
#[repr(C, align(4096))]
struct PageAligned(kvm_xsave);

impl XsaveBuf {
    /// KVM_GET_XSAVE straight into this buffer.
    pub fn fetch(&mut self, fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: KVM_GET_XSAVE writes exactly one kvm_xsave (4096 bytes;
        // the kernel refuses with EINVAL when the guest's state would not
        // fit) into the buffer, which the mutable borrow owns for the call.
        let ret = unsafe { ioctl_with_mut_ref(fd, KVM_GET_XSAVE(), &mut self.xsave.0) };
        if ret != 0 {
            return Err(kvm_ioctls::Error::last());
        }
        Ok(())
    }

    /// KVM_SET_XSAVE from this buffer, as [`fetch`](Self::fetch) filled
    /// it and the emulator may have changed it (by register value, keeping
    /// the header valid: see `emul::xstate`).
    pub fn store(&self, fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: the buffer is a complete legacy 4096-byte kvm_xsave; the VM
        // never enabled XSAVE2-sized state (AMX), so KVM reads nothing beyond it.
        unsafe { fd.set_xsave(&self.xsave.0) }
    }
}

/// One exit's lazy view of the vector state.
pub struct KvmVectorState<'a> {
    fd: &'a VcpuFd,
    buf: &'a mut XsaveBuf,
    fetched: bool,
    dirty: bool,
    /// XCR0, once KVM_GET_XCRS read it during this exit.
    xcr0: Option<u64>,
    /// The exit came from code the CPU ran natively (see
    /// [`VectorState::xcr0_checked_natively`]).
    native: bool,
    /// The XCR0 the code ran under when it is not the guest's (PVM runs
    /// 64-bit CPL 3 code under the host's): answered without KVM_GET_XCRS.
    xcr0_in_force: Option<u64>,
}

impl<'a> KvmVectorState<'a> {
    /// `native`: the exiting instruction ran natively up to its memory
    /// access under the guest's XCR0 (hardware KVM), so the CPU checked it.
    /// `xcr0_in_force`: the XCR0 it ran under when that is not the guest's.
    pub fn new(
        fd: &'a VcpuFd,
        buf: &'a mut XsaveBuf,
        native: bool,
        xcr0_in_force: Option<u64>,
    ) -> Self {
        KvmVectorState {
            fd,
            buf,
            fetched: false,
            dirty: false,
            xcr0: None,
            native,
            xcr0_in_force,
        }
    }

    /// Whether this exit fetched the image (one KVM_GET_XSAVE).
    pub fn fetched(&self) -> bool {
        self.fetched
    }

    /// Whether this exit read XCR0 (one KVM_GET_XCRS).
    pub fn read_xcr0(&self) -> bool {
        self.xcr0.is_some()
    }

    /// Writes the image back if the instruction changed a register
    /// (`Ok(true)`: one KVM_SET_XSAVE).
    pub fn write_back(self) -> Result<bool, kvm_ioctls::Error> {
        if !self.dirty {
            return Ok(false);
        }
        self.buf.store(self.fd).map(|()| true)
    }
}

impl VectorState for KvmVectorState<'_> {
    fn image(&mut self) -> Result<&mut [u8], PlatformError> {
        if !self.fetched {
            self.buf.fetch(self.fd).map_err(|_| PlatformError {
                gpa: 0,
                len: XSAVE_SIZE,
                reason: "KVM_GET_XSAVE failed",
            })?;
            self.fetched = true;
        }
        Ok(self.buf.xsave.0.region.as_mut_bytes())
    }

    fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    fn xcr0_checked_natively(&self) -> bool {
        self.native
    }

    fn xcr0(&mut self) -> Result<u64, PlatformError> {
        if let Some(xcr0) = self.xcr0.or(self.xcr0_in_force) {
            return Ok(xcr0);
        }
        let xcrs = self.fd.get_xcrs().map_err(|_| PlatformError {
            gpa: 0,
            len: 0,
            reason: "KVM_GET_XCRS failed",
        })?;
        let xcr0 = xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value);
        self.xcr0 = Some(xcr0);
        Ok(xcr0)
    }
}
