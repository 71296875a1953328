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
