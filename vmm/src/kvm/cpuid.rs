//! The CPUID the guest sees (`--cpu kvm|host`).
//!
//! `kvm` is KVM_GET_SUPPORTED_CPUID as is (plus the hypervisor bit). On PVM
//! hosts that list hides SSE3+, AVX, XSAVE and BMI although CPL 3 guest code
//! runs them natively and the VMM's emulator completes them at CPL 0. `host`
//! replaces leaves 1, 7 and 0xD with the host's own values, the way QEMU's
//! `-cpu host` means it, keeping from KVM what only KVM can know (APIC ids,
//! x2APIC, TSC deadline) and only the XSAVE components KVM can save.

use super::{ioctl_err, KvmError};
use core::arch::x86_64::__cpuid_count;
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuModel {
    Kvm,
    Host,
}

impl FromStr for CpuModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(CpuModel::Kvm),
            "host" => Ok(CpuModel::Host),
            _ => Err(format!("unknown CPU model '{s}' (expected kvm or host)")),
        }
    }
}

const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_SMX: u32 = 1 << 6;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0xD.1 EAX: XSAVES needs IA32_XSS, which the VMM does not manage.
const LEAFD1_EAX_XSAVES: u32 = 1 << 3;

/// Builds the guest's CPUID for `model`. Per-vCPU fields (APIC id) are
/// filled in by [`for_vcpu`].
pub fn build(kvm: &Kvm, model: CpuModel) -> Result<CpuId, KvmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    if model == CpuModel::Host {
        apply_host_leaves(&mut entries);
    }
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= LEAF1_ECX_HYPERVISOR;
    }
    CpuId::from_entries(&entries).map_err(|_| KvmError::MissingCap("room for the CPUID entries"))
}

/// The guest CPUID for vCPU `id`: leaf 1 EBX\[31:24\] and leaf 0xB EDX carry the
/// APIC id.
pub fn for_vcpu(base: &CpuId, id: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

/// The XCR0 value offering every state component leaf 0xD advertises.
/// KVM's own list on PVM hosts offers components in leaf 0xD while leaf 1
/// hides XSAVE; KVM still accepts XCR0 and CR4.OSXSAVE there, so leaf 0xD
/// alone decides.
pub fn xcr0_for(cpuid: &CpuId) -> u64 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        .unwrap_or(0)
}

/// The guest's physical-address width (MAXPHYADDR) from leaf 0x80000008;
/// 36 (the architectural default without that leaf) when it is absent.
/// What the guest's CPUID offers of the system instructions the emulator
/// completes (CLAC/STAC, INVPCID, RDPRU, XGETBV with ECX = 1): the
/// instruction raises #UD exactly when the CPUID the guest reads lacks it.
///
/// On PVM hosts that is not the CPUID the VMM set: measured on the AMD
/// development host, a CPL 0 guest's CPUID returned the host's own leaves
/// with PCID (leaf 1 `ECX[17]`) and INVPCID (leaf 7 `EBX[10]`) cleared (leaf 7
/// EBX 0x219c03ab against the host's 0x219c07ab and KVM_SET_CPUID2's
/// 0x01800002). There the host's leaves, minus INVPCID, decide.
pub fn system_features(cpuid: &CpuId) -> emul::system::SystemFeatures {
    if super::is_pvm() {
        let mut f = emul::system::SystemFeatures::from_cpuid(|leaf, sub| {
            let (a, b, c, d) = host_cpuid(leaf, sub);
            Some([a, b, c, d])
        });
        f.invpcid = false;
        return f;
    }
    emul::system::SystemFeatures::from_cpuid(|leaf, sub| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0))
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
    })
}

pub fn max_phys_bits(cpuid: &CpuId) -> u8 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|&bits| bits != 0)
        .unwrap_or(36)
}

fn host_cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    // SAFETY-free: `__cpuid_count` is safe on every x86_64 CPU.
    let r = __cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

fn apply_host_leaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    let kvm_xcr0 = entries
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        .unwrap_or(0x3);

    // Leaf 1: host features, minus nested virtualization, keeping KVM's view
    // of the APIC-related bits and letting KVM compute OSXSAVE from CR4.
    if let Some(e) = entries.iter_mut().find(|e| e.function == 1) {
        let (_, _, hecx, hedx) = host_cpuid(1, 0);
        let kvm_keep = LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE;
        e.ecx = (hecx & !(LEAF1_ECX_VMX | LEAF1_ECX_SMX | LEAF1_ECX_OSXSAVE | kvm_keep))
            | (e.ecx & kvm_keep);
        e.edx = hedx;
    }

    // Leaf 7: every subleaf the host has.
    let (max7, ..) = host_cpuid(7, 0);
    entries.retain(|e| e.function != 7);
    for sub in 0..=max7.min(2) {
        let (eax, ebx, ecx, edx) = host_cpuid(7, sub);
        entries.push(entry(7, sub, eax, ebx, ecx, edx, true));
    }

    // Leaf 0xD: the host's layout, limited to components KVM can save.
    let (eax0, _, _, edx0) = host_cpuid(0xd, 0);
    let xcr0 = (u64::from(eax0) | (u64::from(edx0) << 32)) & kvm_xcr0;
    entries.retain(|e| e.function != 0xd);
    let max_size = (2..64)
        .filter(|i| xcr0 & (1 << i) != 0)
        .map(|i| {
            let (size, offset, ..) = host_cpuid(0xd, i);
            size + offset
        })
        .max()
        .unwrap_or(576)
        .max(576);
    entries.push(entry(
        0xd,
        0,
        xcr0 as u32,
        max_size,
        max_size,
        (xcr0 >> 32) as u32,
        true,
    ));
    let (eax1, ..) = host_cpuid(0xd, 1);
    entries.push(entry(0xd, 1, eax1 & !LEAFD1_EAX_XSAVES, 0, 0, 0, true));
    for i in (2..64).filter(|i| xcr0 & (1 << i) != 0) {
        let (a, b, c, d) = host_cpuid(0xd, i);
        entries.push(entry(0xd, i, a, b, c, d, true));
    }
    entries.truncate(KVM_MAX_CPUID_ENTRIES);
}

fn entry(
    function: u32,
    index: u32,
    eax: u32,
    ebx: u32,
    ecx: u32,
    edx: u32,
    indexed: bool,
) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: if indexed {
            kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}
