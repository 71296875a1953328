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

/// One locked compare-and-exchange on the guest RAM `slice` covers (the
/// locked write of an emulated instruction, or the page walker's
/// accessed/dirty update): `Some(true)` if the bytes held `current` and
/// now hold `new`, `Some(false)` if they held something else (left as
/// they were), `None` for a size no locked instruction has, a misaligned
/// 16 bytes, or a host CPU without CMPXCHG16B.
///
/// LOCK CMPXCHG of 1, 2, 4 or 8 bytes at any alignment, as the guest's
/// own instruction would be (Rust's atomics need natural alignment;
/// across a cache line it is a split lock, which the stub already made
/// on the bounce buffer at the same offset), and CMPXCHG16B for 16.
pub fn compare_exchange(
    slice: &vm_memory::VolatileSlice<'_, ()>,
    current: &[u8],
    new: &[u8],
) -> Option<bool> {
    let guard = slice.ptr_guard_mut();
    let (ptr, len) = (guard.as_ptr(), guard.len());
    if len > 16 || current.len() != len || new.len() != len {
        return None;
    }
    let int = |b: &[u8]| {
        let mut le = [0u8; 16];
        le[..b.len()].copy_from_slice(b);
        u128::from_le_bytes(le)
    };
    let (cur, new) = (int(current), int(new));
    let swapped: u8;
    // Every block below: `ptr` is `len` bytes of guest RAM, mapped
    // while `guard` lives. Other vCPUs access these bytes concurrently,
    // which is the point: the locked instruction is atomic against them.
    // x86 allows LOCK CMPXCHG at any alignment; CMPXCHG16B is only run
    // aligned to 16 and where the CPU has it (checked below). Flags and
    // memory are clobbered (no `preserves_flags`, no `nomem`).
    /// LOCK CMPXCHG of one width: `$class` and `$reg` name the register
    /// class and template modifier of `new`, `$acc` the accumulator.
    macro_rules! lock_cmpxchg {
        ($ty:ty, $width:literal, $class:ident, $reg:literal, $acc:tt) => {
            std::arch::asm!(
                concat!("lock cmpxchg ", $width, " ptr [{ptr}], {new", $reg, "}"),
                "sete {swapped}",
                ptr = in(reg) ptr,
                new = in($class) new as $ty,
                swapped = out(reg_byte) swapped,
                inout($acc) cur as $ty => _,
                options(nostack),
            )
        };
    }
    match len {
        // SAFETY: as said above the match.
        1 => unsafe { lock_cmpxchg!(u8, "byte", reg_byte, "", "al") },
        // SAFETY: as said above the match.
        2 => unsafe { lock_cmpxchg!(u16, "word", reg, ":x", "ax") },
        // SAFETY: as said above the match.
        4 => unsafe { lock_cmpxchg!(u32, "dword", reg, ":e", "eax") },
        // SAFETY: as said above the match.
        8 => unsafe { lock_cmpxchg!(u64, "qword", reg, ":r", "rax") },
        // SAFETY: as said above the match; aligned, and the CPU has it.
        16 if (ptr as usize).is_multiple_of(16) && std::is_x86_feature_detected!("cmpxchg16b") => unsafe {
            // RBX is reserved by the compiler: `new`'s low half is swapped
            // into it and RBX restored.
            std::arch::asm!(
                "xchg {new_lo}, rbx",
                "lock cmpxchg16b xmmword ptr [{ptr}]",
                "sete {swapped}",
                "mov rbx, {new_lo}",
                ptr = in(reg) ptr,
                new_lo = inout(reg) new as u64 => _,
                swapped = out(reg_byte) swapped,
                inout("rax") cur as u64 => _,
                inout("rdx") (cur >> 64) as u64 => _,
                in("rcx") (new >> 64) as u64,
                options(nostack),
            );
        },
        _ => return None,
    }
    Some(swapped != 0)
}
