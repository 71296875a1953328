//! Where the host CPU departs from the SDM, measured by running probe
//! instructions in a stub at CPL 3.
//!
//! The emulator runs guest instructions natively, so a guest sees whatever
//! the host CPU does. Real CPUs agree with the SDM on every probe here; an
//! emulated CPU may not (QEMU's TCG, which the project's hardware-KVM lane
//! runs on, departs on all of them: measured with QEMU 7.2 `-cpu max`). The
//! VMM names the departures at start-up; tests expect what the CPU does.

use std::fmt;

use super::buf::StubBuf;
use super::error::StubRunError;
use super::fault::{EXC_AC, EXC_GP, EXC_UD};
use super::regs::GuestGprs;
use super::selftest::{self, Outcome};

/// RFLAGS.CF.
const RFLAGS_CF: u64 = 1;

/// One way a CPU can depart from the SDM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Deviation {
    /// A non-canonical stack (RSP/RBP-based) access raises #GP, not #SS.
    GpForSs,
    /// Unmasked SIMD floating-point exceptions raise no #XM.
    NoXm,
    /// A misaligned access at CPL 3 with CR0.AM and RFLAGS.AC raises no #AC.
    NoAc,
    /// BLSI leaves CF clear for a non-zero source (the SDM sets it).
    BlsiCfClear,
    /// `test r/m, imm` encoded with the F6/F7 /1 alias raises #UD.
    TestAliasUd,
    /// FNSTENV/FNSAVE store an instruction pointer other than the one the
    /// last XRSTOR loaded (the guest's).
    StaleFip,
    /// LDMXCSR accepts reserved MXCSR bits instead of raising #GP(0).
    MxcsrReservedAccepted,
    /// CLFLUSH never faults (it does not translate its address).
    ClflushNoFault,
}

impl Deviation {
    /// Every deviation, in a fixed order.
    pub const ALL: [Deviation; 8] = [
        Deviation::GpForSs,
        Deviation::NoXm,
        Deviation::NoAc,
        Deviation::BlsiCfClear,
        Deviation::TestAliasUd,
        Deviation::StaleFip,
        Deviation::MxcsrReservedAccepted,
        Deviation::ClflushNoFault,
    ];

    /// A short stable name (used in test output).
    pub fn name(self) -> &'static str {
        match self {
            Deviation::GpForSs => "gp-for-ss",
            Deviation::NoXm => "no-xm",
            Deviation::NoAc => "no-ac",
            Deviation::BlsiCfClear => "blsi-cf-clear",
            Deviation::TestAliasUd => "test-alias-ud",
            Deviation::StaleFip => "stale-fip",
            Deviation::MxcsrReservedAccepted => "mxcsr-reserved-accepted",
            Deviation::ClflushNoFault => "clflush-no-fault",
        }
    }
}

impl fmt::Display for Deviation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Deviation::GpForSs => "#GP instead of #SS for a non-canonical stack access",
            Deviation::NoXm => "no #XM for an unmasked SIMD exception",
            Deviation::NoAc => "no #AC for a misaligned access with AC set",
            Deviation::BlsiCfClear => "BLSI leaves CF clear",
            Deviation::TestAliasUd => "#UD for TEST with the F6/F7 /1 alias",
            Deviation::StaleFip => {
                "FNSTENV/FNSAVE store stale x87 pointers (FIP, FDP), not those XRSTOR loaded"
            }
            Deviation::MxcsrReservedAccepted => "LDMXCSR accepts reserved bits",
            Deviation::ClflushNoFault => "CLFLUSH never faults",
        };
        write!(f, "{} ({what})", self.name())
    }
}

/// The host CPU as the probes found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCpu {
    /// CPUID 0x40000000's hypervisor signature, when CPUID.1:ECX.31 is set.
    pub hypervisor: Option<String>,
    /// Departures from the SDM, in [`Deviation::ALL`] order.
    pub deviations: Vec<Deviation>,
}

impl HostCpu {
    /// Whether the CPU is QEMU's TCG (signature "TCGTCGTCGTCG"): an
    /// emulator, whose departures are its own, not the VMM's.
    pub fn is_tcg(&self) -> bool {
        self.hypervisor.as_deref() == Some("TCGTCGTCGTCG")
    }

    /// Whether the probes found departure `d`.
    pub fn has(&self, d: Deviation) -> bool {
        self.deviations.contains(&d)
    }
}

/// The hypervisor signature of CPUID leaf 0x40000000, if CPUID says a
/// hypervisor is present.
pub fn hypervisor_signature() -> Option<String> {
    use std::arch::x86_64::__cpuid;
    if __cpuid(1).ecx & (1 << 31) == 0 {
        return None;
    }
    let l = __cpuid(0x4000_0000);
    let bytes: Vec<u8> = [l.ebx, l.ecx, l.edx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    Some(
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_string(),
    )
}

/// Runs every probe in a fresh stub buffer (about a millisecond).
pub fn probe() -> Result<HostCpu, StubRunError> {
    let mut buf = StubBuf::new(false)?;
    let mut deviations = Vec::new();
    let cases = selftest::run_with(&mut buf);
    let seen = |name: &str| cases.iter().find(|c| c.name == name).map(|c| &c.seen);
    if let Some(Outcome::Fault { vector, .. }) = seen("non-canonical stack load") {
        if *vector == EXC_GP {
            deviations.push(Deviation::GpForSs);
        }
    }
    if let Some(Outcome::Completed { .. }) = seen("unmasked SIMD exception") {
        deviations.push(Deviation::NoXm);
    }
    // pushfq; or qword [rsp], AC; popfq; mov eax, [rcx] (misaligned). On a
    // CPU that raises no #AC, AC stays set: a second stub clears it
    // (pushfq; and qword [rsp], !AC; popfq).
    let ac = [0x9c, 0x48, 0x81, 0x0c, 0x24, 0, 0, 4, 0, 0x9d, 0x8b, 0x01];
    let mut g = GuestGprs {
        rcx: buf.bounce_exec_addr() + 129,
        ..Default::default()
    };
    match buf.run(&ac, &mut g) {
        Err(StubRunError::Fault(f)) if f.vector == EXC_AC => {}
        Ok(()) => {
            deviations.push(Deviation::NoAc);
            let clear_ac = [0x9c, 0x48, 0x81, 0x24, 0x24, 0xff, 0xff, 0xfb, 0xff, 0x9d];
            buf.run(&clear_ac, &mut GuestGprs::default())?;
        }
        Err(e) => return Err(e),
    }
    // blsi rax, rcx with rcx = 1: rax = 1, CF = 1 (source non-zero).
    let mut g = GuestGprs {
        rcx: 1,
        ..Default::default()
    };
    buf.run(&[0xc4, 0xe2, 0xf8, 0xf3, 0xd9], &mut g)?;
    if g.rflags & RFLAGS_CF == 0 {
        deviations.push(Deviation::BlsiCfClear);
    }
    // test eax, 1 encoded F7 /1.
    let mut g = GuestGprs::default();
    match buf.run(&[0xf7, 0xc8, 1, 0, 0, 0], &mut g) {
        Ok(()) => {}
        Err(StubRunError::Fault(f)) if f.vector == EXC_UD => {
            deviations.push(Deviation::TestAliasUd)
        }
        Err(e) => return Err(e),
    }
    // The guest's x87 state restored (XRSTOR of an image whose FIP is
    // 0x1234_5678), then fnstenv [rsp-28]; mov eax, [rsp-16]: the FIP the
    // image held. QEMU's TCG stores its own last x87 instruction's instead.
    if buf.vector_mask() != 0 {
        const FIP: u32 = 0x1234_5678;
        let img = buf.guest_xsave_mut();
        img.fill(0);
        img[0..2].copy_from_slice(&0x37fu16.to_le_bytes()); // FCW
        img[8..12].copy_from_slice(&FIP.to_le_bytes());
        img[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        img[super::buf::XSAVE_HEADER_OFFSET] = 1; // XSTATE_BV: x87
        let fnstenv = [0xd9, 0x74, 0x24, 0xe4, 0x8b, 0x44, 0x24, 0xf0];
        let mut g = GuestGprs::default();
        buf.run_with_vector(&fnstenv, &mut g)?;
        if g.rax as u32 != FIP {
            deviations.push(Deviation::StaleFip);
        }
    }
    // clflush [rax] with a non-canonical RAX: #GP(0).
    let mut g = GuestGprs {
        rax: 0x8000_0000_0000_0000,
        ..Default::default()
    };
    match buf.run(&[0x0f, 0xae, 0x38], &mut g) {
        Err(StubRunError::Fault(f)) if f.vector == EXC_GP => {}
        Ok(()) => deviations.push(Deviation::ClflushNoFault),
        Err(e) => return Err(e),
    }
    // mov dword [rsp-8], 0x11f80; ldmxcsr [rsp-8]: bit 16 is reserved, so
    // #GP(0). The stub restores the host's MXCSR either way.
    let mxcsr = [
        0xc7, 0x44, 0x24, 0xf8, 0x80, 0x1f, 0x01, 0x00, 0x0f, 0xae, 0x54, 0x24, 0xf8,
    ];
    let mut g = GuestGprs::default();
    match buf.run(&mxcsr, &mut g) {
        Err(StubRunError::Fault(f)) if f.vector == EXC_GP => {}
        Ok(()) => deviations.push(Deviation::MxcsrReservedAccepted),
        Err(e) => return Err(e),
    }
    Ok(HostCpu {
        hypervisor: hypervisor_signature(),
        deviations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probes themselves run and are consistent: on a CPU that is not
    /// QEMU's TCG none may find a departure (every real CPU follows the SDM
    /// on these); on TCG each is named.
    #[test]
    fn probes_run_and_real_cpus_follow_the_sdm() {
        let cpu = probe().expect("probes run");
        println!("hypervisor {:?}", cpu.hypervisor);
        for d in &cpu.deviations {
            println!("host CPU departs from the SDM: {d}");
        }
        if !cpu.is_tcg() {
            assert!(cpu.deviations.is_empty(), "{:?}", cpu.deviations);
        }
    }
}
