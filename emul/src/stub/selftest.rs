//! A boot-time check that stubs run and that faults in them are recovered,
//! one case per exception the machinery must survive.

use std::fmt;

use super::buf::StubBuf;
use super::error::StubRunError;
use super::fault::{EXC_BP, EXC_DE, EXC_GP, EXC_SS, EXC_UD, EXC_XM};
use super::probe::{Deviation, HostCpu};
use super::regs::{GuestGprs, ARITH_FLAGS_MASK, RFLAGS_AF, RFLAGS_OF, RFLAGS_PF, RFLAGS_SF};

/// What a case did, or should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction completed with this RAX and these arithmetic flags.
    Completed {
        /// RAX after the instruction.
        rax: u64,
        /// The arithmetic flags after it (CF, PF, AF, ZF, SF, OF).
        arith_flags: u64,
    },
    /// The instruction raised this exception.
    Fault {
        /// Exception vector.
        vector: u8,
        /// Error code (0 for vectors without one).
        error_code: u64,
    },
    /// The stub could not be built or the buffer not set up.
    Error(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Completed { rax, arith_flags } => {
                write!(f, "rax={rax:#x} flags={arith_flags:#x}")
            }
            Outcome::Fault { vector, error_code } => {
                let fault = super::fault::StubFault {
                    vector: *vector,
                    error_code: *error_code,
                    fault_addr: None,
                };
                write!(f, "{fault}")
            }
            Outcome::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// One self-test case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelftestCase {
    /// What the case runs.
    pub name: &'static str,
    /// Whether the stub was built with the ITS-safe return.
    pub its_on: bool,
    /// What the CPU must do.
    pub expected: Outcome,
    /// What the stub did.
    pub seen: Outcome,
}

impl SelftestCase {
    /// Whether the stub did what the CPU must.
    pub fn passed(&self) -> bool {
        self.expected == self.seen
    }
}

impl fmt::Display for SelftestCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let its = if self.its_on { "on" } else { "off" };
        let verdict = if self.passed() { "ok" } else { "FAILED" };
        write!(
            f,
            "stub selftest {} (ITS {its}): expected {} vs seen {} [{verdict}]",
            self.name, self.expected, self.seen
        )
    }
}

/// Whether every case passed.
pub fn all_passed(cases: &[SelftestCase]) -> bool {
    cases.iter().all(SelftestCase::passed)
}

/// The host CPU's departure from the SDM that explains a failed case, on
/// QEMU's TCG only (an emulator, where the cases that check the CPU's
/// choice of exception fail with no fault in the stub machinery: #GP for
/// #SS, no #XM). On any other CPU a failed case is never explained.
pub fn explained_by(case: &SelftestCase, cpu: &HostCpu) -> Option<Deviation> {
    if case.passed() || !cpu.is_tcg() {
        return None;
    }
    let d = match case.name {
        "non-canonical stack load" => Deviation::GpForSs,
        "unmasked SIMD exception" => Deviation::NoXm,
        _ => return None,
    };
    cpu.has(d).then_some(d)
}

/// A non-canonical address: bit 63 set, bits 62..47 clear. Added to any
/// user-space RSP it stays non-canonical.
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;

/// MXCSR with every exception masked except invalid-operation (IM, bit 7).
const MXCSR_UNMASK_INVALID: u32 = 0x1f00;
/// A quiet NaN: converting it to an integer is an invalid operation.
const F32_QNAN: u32 = 0x7fc0_0000;

struct Case {
    name: &'static str,
    insn: Insn,
    gprs: GuestGprs,
    expected: Outcome,
}

/// A case's instruction bytes: fixed, or encoded against the buffer's
/// addresses (RIP-relative operands).
enum Insn {
    Fixed(&'static [u8]),
    Generated(fn(&StubBuf) -> Vec<u8>),
}

fn cases() -> Vec<Case> {
    let fault = |vector| Outcome::Fault {
        vector,
        error_code: 0,
    };
    vec![
        Case {
            name: "ud1",
            insn: Insn::Fixed(&[0x0f, 0xb9, 0xc0]), // ud1 eax, eax
            gprs: GuestGprs::default(),
            expected: fault(EXC_UD),
        },
        Case {
            name: "non-canonical load",
            insn: Insn::Fixed(&[0x02, 0x00]), // add al, [rax]
            gprs: GuestGprs {
                rax: NON_CANONICAL,
                ..Default::default()
            },
            expected: fault(EXC_GP),
        },
        Case {
            name: "non-canonical stack load",
            insn: Insn::Fixed(&[0x02, 0x04, 0x04]), // add al, [rsp+rax]
            gprs: GuestGprs {
                rax: NON_CANONICAL,
                ..Default::default()
            },
            expected: fault(EXC_SS),
        },
        Case {
            name: "int3",
            insn: Insn::Fixed(&[0xcc]),
            gprs: GuestGprs::default(),
            expected: fault(EXC_BP),
        },
        Case {
            name: "divide by zero",
            insn: Insn::Fixed(&[0x48, 0xf7, 0xf1]), // div rcx
            gprs: GuestGprs {
                rax: 1,
                rcx: 0,
                ..Default::default()
            },
            expected: fault(EXC_DE),
        },
        Case {
            name: "unmasked SIMD exception",
            insn: Insn::Generated(simd_invalid),
            gprs: GuestGprs::default(),
            expected: fault(EXC_XM),
        },
        Case {
            name: "add rax, rbx",
            insn: Insn::Fixed(&[0x48, 0x01, 0xd8]), // add rax, rbx
            gprs: GuestGprs {
                rax: 0x7fff_ffff_ffff_ffff,
                rbx: 1,
                ..Default::default()
            },
            expected: Outcome::Completed {
                rax: 0x8000_0000_0000_0000,
                arith_flags: RFLAGS_OF | RFLAGS_SF | RFLAGS_AF | RFLAGS_PF,
            },
        },
    ]
}

/// `ldmxcsr [rip+a]; cvttss2si eax, [rip+b]` with an MXCSR that unmasks
/// invalid-operation at `a` and a NaN at `b`, both in the bounce buffer:
/// one stub instruction stream that raises #XM whatever the XMM registers
/// hold. The stub restores the host's MXCSR afterwards.
fn simd_invalid(buf: &StubBuf) -> Vec<u8> {
    let insn = buf.insn_exec_addr();
    let bounce = buf.bounce_exec_addr();
    let rel = |next_ip: u64, target: u64| (target.wrapping_sub(next_ip) as i32).to_le_bytes();
    let mut code = vec![0x0f, 0xae, 0x15]; // ldmxcsr [rip+disp32]
    code.extend_from_slice(&rel(insn + 7, bounce));
    code.extend_from_slice(&[0xf3, 0x0f, 0x2c, 0x05]); // cvttss2si eax, [rip+disp32]
    code.extend_from_slice(&rel(insn + 15, bounce + 4));
    code
}

/// Runs every case in a fresh buffer of the given ITS mode.
pub fn run(its_on: bool) -> Vec<SelftestCase> {
    match StubBuf::new(its_on) {
        Ok(mut buf) => run_with(&mut buf),
        Err(e) => vec![SelftestCase {
            name: "stub buffer setup",
            its_on,
            expected: Outcome::Completed {
                rax: 0,
                arith_flags: 0,
            },
            seen: Outcome::Error(e.to_string()),
        }],
    }
}

/// Runs every case in `buf` (cheap once the buffer exists).
pub fn run_with(buf: &mut StubBuf) -> Vec<SelftestCase> {
    let bounce = buf.bounce_mut();
    bounce[..4].copy_from_slice(&MXCSR_UNMASK_INVALID.to_le_bytes());
    bounce[4..8].copy_from_slice(&F32_QNAN.to_le_bytes());
    cases()
        .into_iter()
        .map(|case| {
            let insn = match case.insn {
                Insn::Fixed(bytes) => bytes.to_vec(),
                Insn::Generated(encode) => encode(buf),
            };
            let mut gprs = case.gprs;
            let seen = match buf.run(&insn, &mut gprs) {
                Ok(()) => Outcome::Completed {
                    rax: gprs.rax,
                    arith_flags: gprs.rflags & ARITH_FLAGS_MASK,
                },
                Err(StubRunError::Fault(f)) => Outcome::Fault {
                    vector: f.vector,
                    error_code: f.error_code,
                },
                Err(e) => Outcome::Error(e.to_string()),
            };
            SelftestCase {
                name: case.name,
                its_on: buf.its_on(),
                expected: case.expected,
                seen,
            }
        })
        .collect()
}
