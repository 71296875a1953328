//! Thin layers over kvm-ioctls: opening KVM, the CPUID the guest sees, and
//! decoding the `kvm_run` page after an exit.

pub mod cpuid;
pub mod memory;
pub mod run_page;
pub mod xsave;

use kvm_ioctls::Kvm;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    Open(kvm_ioctls::Error),
    #[error("KVM lacks {0}, which this VMM needs")]
    MissingCap(&'static str),
    #[error("{op} failed: {err}")]
    Ioctl {
        op: &'static str,
        err: kvm_ioctls::Error,
    },
}

/// Wraps a failed KVM call with the name of the operation.
pub fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |err| KvmError::Ioctl { op, err }
}

/// Opens /dev/kvm with a one-line explanation when it is missing.
pub fn open() -> Result<Kvm, KvmError> {
    Kvm::new().map_err(KvmError::Open)
}
