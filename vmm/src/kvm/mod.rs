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
/// Whether /dev/kvm is PVM (the `kvm_pvm` module): guest CPL 0 code is
/// interpreted by KVM there, CPL 3 code runs natively. Read once.
pub fn is_pvm() -> bool {
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

pub fn open() -> Result<Kvm, KvmError> {
    Kvm::new().map_err(KvmError::Open)
}

/// KVM_CAP_EXIT_ON_EMULATION_FAILURE: every emulation failure exits to
/// userspace instead of KVM queueing #UD at CPL > 0.
const KVM_CAP_EXIT_ON_EMULATION_FAILURE: u32 = 204;

/// Makes every instruction KVM's emulator gives up on an exit to userspace.
pub fn enable_exit_on_emulation_failure(vm: &kvm_ioctls::VmFd) -> Result<(), KvmError> {
    if vm.check_extension_raw(u64::from(KVM_CAP_EXIT_ON_EMULATION_FAILURE)) <= 0 {
        return Err(KvmError::MissingCap("KVM_CAP_EXIT_ON_EMULATION_FAILURE"));
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(ioctl_err("KVM_ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)"))
}
