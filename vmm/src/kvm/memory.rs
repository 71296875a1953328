//! Guest RAM: anonymous mappings (vm-memory) registered as KVM memory slots.

use super::{ioctl_err, KvmError};
use crate::layout;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {0} bytes of guest memory: {1}")]
    Allocate(u64, vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

/// Allocates `size` bytes of guest RAM laid out by [`layout::ram_regions`]
/// and registers each region with the VM.
///
/// The caller must keep the returned memory alive for as long as any vCPU
/// of `vm` may run.
pub fn create_guest_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Allocate(size, e))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| KvmError::MissingCap("a host mapping for guest RAM"))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the slot describes a live anonymous mapping of exactly
        // `memory_size` bytes owned by `mem`; KVM only touches it while a
        // vCPU runs, and the caller keeps `mem` alive until every vCPU
        // thread has stopped.
        unsafe { vm.set_user_memory_region(r) }.map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

/// CMPXCHG16B on the 16 bytes of guest RAM `slice` holds (the locked
/// write of an emulated `lock cmpxchg16b`): `Some(true)` if they held
/// `current` and now hold `new`, `Some(false)` if they held something
/// else (left as it was), `None` if `slice` is not 16 bytes aligned to 16
/// or the host CPU lacks the instruction.
pub fn compare_exchange_16(
    slice: &vm_memory::VolatileSlice<'_, ()>,
    current: &[u8],
    new: &[u8],
) -> Option<bool> {
    let int = |b: &[u8]| -> Option<u128> { Some(u128::from_le_bytes(b.try_into().ok()?)) };
    let (current, new) = (int(current)?, int(new)?);
    let guard = slice.ptr_guard_mut();
    let ptr = guard.as_ptr();
    if guard.len() != 16
        || !(ptr as usize).is_multiple_of(16)
        || !std::is_x86_feature_detected!("cmpxchg16b")
    {
        return None;
    }
    let swapped: u8;
    // SAFETY: `ptr` is 16 bytes of guest RAM, mapped while `guard` lives
    // and aligned to 16 (checked above), and the CPU has CMPXCHG16B. Other
    // vCPUs access these bytes concurrently, which is the point: the
    // locked instruction is atomic against them. RBX is reserved by the
    // compiler, so `new`'s low half is swapped into it and RBX restored.
    unsafe {
        std::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "sete {swapped}",
            "mov rbx, {new_lo}",
            ptr = in(reg) ptr,
            new_lo = inout(reg) new as u64 => _,
            swapped = out(reg_byte) swapped,
            inout("rax") current as u64 => _,
            inout("rdx") (current >> 64) as u64 => _,
            in("rcx") (new >> 64) as u64,
            options(nostack),
        );
    }
    Some(swapped != 0)
}
