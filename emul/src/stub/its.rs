//! Deciding whether generated code must avoid RETs in the lower half of a
//! cache line (Indirect Target Selection, CVE-2024-28956).

use std::fmt;
use std::fs;
use std::str::FromStr;

/// Where Linux reports the host's ITS status.
pub const ITS_SYSFS_PATH: &str =
    "/sys/devices/system/cpu/vulnerabilities/indirect_target_selection";

/// How the VMM was asked to treat ITS.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum ItsMode {
    /// Follow the host: sysfs when the kernel reports it, else CPUID.
    #[default]
    Auto,
    /// Always use the return thunk where a RET would be unsafe.
    On,
    /// Always use plain RETs.
    Off,
}

/// The outcome of [`ItsMode::resolve`], with the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItsDecision {
    /// Whether stubs use the ITS-safe return thunk.
    pub enabled: bool,
    /// Why, for the log.
    pub reason: String,
}

impl fmt::Display for ItsDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.enabled { "on" } else { "off" };
        write!(f, "ITS mitigation {state}: {}", self.reason)
    }
}

/// An unknown `--its` value.
#[derive(Debug, thiserror::Error)]
#[error("unknown ITS mode {0:?} (expected auto, on or off)")]
pub struct ParseItsModeError(String);

impl FromStr for ItsMode {
    type Err = ParseItsModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ItsMode::Auto),
            "on" => Ok(ItsMode::On),
            "off" => Ok(ItsMode::Off),
            other => Err(ParseItsModeError(other.to_owned())),
        }
    }
}

impl ItsMode {
    /// Turns the mode into a decision, probing the host for `Auto`.
    pub fn resolve(self) -> ItsDecision {
        match self {
            ItsMode::On => ItsDecision {
                enabled: true,
                reason: "forced on".into(),
            },
            ItsMode::Off => ItsDecision {
                enabled: false,
                reason: "forced off".into(),
            },
            ItsMode::Auto => detect(),
        }
    }
}

/// Probes the host: the kernel's verdict when it has one, else the CPU model.
pub fn detect() -> ItsDecision {
    match fs::read_to_string(ITS_SYSFS_PATH) {
        Ok(status) => decide_from_sysfs(&status),
        Err(err) => {
            let id = CpuId::read();
            let mut decision = decide_from_cpuid(&id);
            decision.reason = format!("{ITS_SYSFS_PATH} unreadable ({err}); {}", decision.reason);
            decision
        }
    }
}

/// The kernel's status line: anything but "Not affected" means the CPU has
/// the bug (whatever the kernel does about it for itself, our stubs are
/// not covered by its mitigation).
pub fn decide_from_sysfs(status: &str) -> ItsDecision {
    let status = status.trim();
    ItsDecision {
        enabled: status != "Not affected",
        reason: format!("kernel reports {status:?}"),
    }
}

/// The identity of the host CPU as far as the ITS list needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuId {
    /// CPUID vendor string ("GenuineIntel", "AuthenticAMD").
    pub vendor: [u8; 12],
    /// Display family (base + extended).
    pub family: u32,
    /// Display model (extended model << 4 | base model).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
}

impl CpuId {
    /// Reads leaf 0 and leaf 1.
    pub fn read() -> Self {
        use core::arch::x86_64::__cpuid;
        let leaf0 = __cpuid(0);
        let leaf1 = __cpuid(1);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
        Self::from_signature(vendor, leaf1.eax)
    }

    /// Decodes the CPUID.1:EAX signature.
    pub fn from_signature(vendor: [u8; 12], eax: u32) -> Self {
        let base_family = (eax >> 8) & 0xf;
        let base_model = (eax >> 4) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0x6 || base_family == 0xf {
            ((eax >> 16) & 0xf) << 4 | base_model
        } else {
            base_model
        };
        CpuId {
            vendor,
            family,
            model,
            stepping: eax & 0xf,
        }
    }
}

/// An ITS-affected Intel family 6 model, affected from `min_stepping` on.
struct AffectedModel {
    model: u32,
    min_stepping: u32,
    name: &'static str,
}

/// Linux's list (arch/x86/kernel/cpu/common.c, cpu_vuln_blacklist entries
/// carrying ITS): pre-Alder Lake parts with enhanced IBRS.
const ITS_AFFECTED: &[AffectedModel] = &[
    AffectedModel {
        model: 0x55,
        min_stepping: 6,
        name: "Cascade Lake/Cooper Lake (Skylake-X stepping >= 6)",
    },
    AffectedModel {
        model: 0x8e,
        min_stepping: 0xc,
        name: "Kaby Lake L / Whiskey Lake / Amber Lake / Comet Lake L (stepping >= 0xc)",
    },
    AffectedModel {
        model: 0x9e,
        min_stepping: 0xd,
        name: "Coffee Lake (stepping >= 0xd)",
    },
    AffectedModel {
        model: 0xa5,
        min_stepping: 0,
        name: "Comet Lake",
    },
    AffectedModel {
        model: 0xa6,
        min_stepping: 0,
        name: "Comet Lake L",
    },
    AffectedModel {
        model: 0x7e,
        min_stepping: 0,
        name: "Ice Lake L",
    },
    AffectedModel {
        model: 0x6c,
        min_stepping: 0,
        name: "Ice Lake D",
    },
    AffectedModel {
        model: 0x6a,
        min_stepping: 0,
        name: "Ice Lake X",
    },
    AffectedModel {
        model: 0x8c,
        min_stepping: 0,
        name: "Tiger Lake L",
    },
    AffectedModel {
        model: 0x8d,
        min_stepping: 0,
        name: "Tiger Lake",
    },
    AffectedModel {
        model: 0xa7,
        min_stepping: 0,
        name: "Rocket Lake",
    },
];

/// The model-list fallback for kernels without the sysfs file. It cannot
/// see IA32_ARCH_CAPABILITIES.ITS_NO (a hypervisor may set it on an
/// affected model), so it errs on the side of the mitigation.
pub fn decide_from_cpuid(id: &CpuId) -> ItsDecision {
    let vendor = String::from_utf8_lossy(&id.vendor);
    let signature = format!(
        "{vendor} family {:#x} model {:#x} stepping {:#x}",
        id.family, id.model, id.stepping
    );
    if &id.vendor != b"GenuineIntel" || id.family != 6 {
        return ItsDecision {
            enabled: false,
            reason: format!("{signature} is not an Intel family 6 CPU"),
        };
    }
    match ITS_AFFECTED
        .iter()
        .find(|m| m.model == id.model && id.stepping >= m.min_stepping)
    {
        Some(m) => ItsDecision {
            enabled: true,
            reason: format!("{signature} ({}) is on the ITS list", m.name),
        },
        None => ItsDecision {
            enabled: false,
            reason: format!("{signature} is not on the ITS list"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intel(model: u32, stepping: u32) -> CpuId {
        CpuId {
            vendor: *b"GenuineIntel",
            family: 6,
            model,
            stepping,
        }
    }

    #[test]
    fn sysfs_status() {
        assert!(!decide_from_sysfs("Not affected\n").enabled);
        assert!(decide_from_sysfs("Mitigation: Aligned branch/return thunks\n").enabled);
        assert!(decide_from_sysfs("Vulnerable").enabled);
        assert!(decide_from_sysfs("Vulnerable, KVM: Not affected").enabled);
    }

    #[test]
    fn model_list() {
        assert!(!decide_from_cpuid(&intel(0x55, 4)).enabled, "Skylake-X");
        assert!(decide_from_cpuid(&intel(0x55, 7)).enabled, "Cascade Lake");
        assert!(decide_from_cpuid(&intel(0x6a, 6)).enabled, "Ice Lake X");
        assert!(decide_from_cpuid(&intel(0xa7, 1)).enabled, "Rocket Lake");
        assert!(!decide_from_cpuid(&intel(0x9e, 0xc)).enabled);
        assert!(decide_from_cpuid(&intel(0x9e, 0xd)).enabled);
        assert!(
            !decide_from_cpuid(&intel(0x8f, 8)).enabled,
            "Sapphire Rapids"
        );
        assert!(!decide_from_cpuid(&intel(0x97, 2)).enabled, "Alder Lake");
        let amd = CpuId {
            vendor: *b"AuthenticAMD",
            family: 0x19,
            model: 0x55,
            stepping: 7,
        };
        assert!(!decide_from_cpuid(&amd).enabled);
    }

    #[test]
    fn signature_decoding() {
        // Sapphire Rapids: family 6, model 0x8f, stepping 8.
        let id = CpuId::from_signature(*b"GenuineIntel", 0x000806f8);
        assert_eq!((id.family, id.model, id.stepping), (6, 0x8f, 8));
    }

    #[test]
    fn modes() {
        assert!(ItsMode::On.resolve().enabled);
        assert!(!ItsMode::Off.resolve().enabled);
        assert_eq!("auto".parse::<ItsMode>().unwrap(), ItsMode::Auto);
        assert!("maybe".parse::<ItsMode>().is_err());
        // Auto must produce some reason on any host.
        assert!(!ItsMode::Auto.resolve().reason.is_empty());
    }
}
