//! Which CPUID features the machine running the test has. A form is only
//! generated when the host runs it natively, since CPL 3 is the ground truth.
//!
//! Vector features go through `is_x86_feature_detected!`, which also checks
//! that the OS enabled the state in XCR0; the others are read from CPUID
//! directly, so AMD-only features (SSE4A, CLZERO...) count where the host is
//! an AMD CPU and Intel-only ones where it is Intel.

use iced_x86::CpuidFeature;
use std::arch::x86_64::__cpuid_count;

/// CPUID.(leaf, subleaf) as [EAX, EBX, ECX, EDX]; zeros beyond the maximum
/// basic or extended leaf.
fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let max = __cpuid_count(leaf & 0x8000_0000, 0).eax;
    if leaf > max {
        return [0; 4];
    }
    let r = __cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn bit(leaf: u32, sub: u32, reg: usize, b: u32) -> bool {
    cpuid(leaf, sub)[reg] & (1 << b) != 0
}

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

/// Whether this host (CPU and OS, including XCR0 for AVX state) runs
/// instructions that need `f`. Features not probed here count as absent:
/// such forms are counted as "host lacks feature".
pub fn has(f: CpuidFeature) -> bool {
    use CpuidFeature as F;
    macro_rules! det {
        ($s:tt) => {
            std::arch::is_x86_feature_detected!($s)
        };
    }
    match f {
        // Baseline of every x86-64 CPU.
        F::INTEL8086
        | F::INTEL186
        | F::INTEL286
        | F::INTEL386
        | F::INTEL486
        | F::X64
        | F::CMOV
        | F::CX8
        | F::FPU
        | F::FPU287
        | F::FPU387
        | F::MMX
        | F::SSE
        | F::SSE2
        | F::FXSR
        | F::MULTIBYTENOP
        | F::CPUID
        | F::PAUSE
        | F::SYSCALL
        | F::TSC
        | F::MSR => true,
        F::CMPXCHG16B => det!("cmpxchg16b"),
        F::MOVBE => det!("movbe"),
        F::POPCNT => det!("popcnt"),
        F::LZCNT => det!("lzcnt"),
        F::BMI1 => det!("bmi1"),
        F::BMI2 => det!("bmi2"),
        F::ADX => det!("adx"),
        F::SSE3 => det!("sse3"),
        F::SSSE3 => det!("ssse3"),
        F::SSE4_1 => det!("sse4.1"),
        F::SSE4_2 => det!("sse4.2"),
        F::SSE4A => det!("sse4a"),
        F::AES => det!("aes"),
        F::PCLMULQDQ => det!("pclmulqdq"),
        F::SHA => det!("sha"),
        F::GFNI => det!("gfni"),
        F::AVX => det!("avx"),
        F::AVX2 => det!("avx2"),
        F::FMA => det!("fma"),
        F::F16C => det!("f16c"),
        F::VAES => det!("vaes"),
        F::VPCLMULQDQ => det!("vpclmulqdq"),
        F::AVX_VNNI => det!("avxvnni"),
        F::AVX_IFMA => det!("avxifma"),
        F::AVX_NE_CONVERT => det!("avxneconvert"),
        F::AVX_VNNI_INT8 => det!("avxvnniint8"),
        F::AVX_VNNI_INT16 => det!("avxvnniint16"),
        F::AVX512F => det!("avx512f"),
        F::AVX512BW => det!("avx512bw"),
        F::AVX512DQ => det!("avx512dq"),
        F::AVX512VL => det!("avx512vl"),
        F::AVX512CD => det!("avx512cd"),
        F::AVX512_VBMI => det!("avx512vbmi"),
        F::AVX512_VBMI2 => det!("avx512vbmi2"),
        F::AVX512_VNNI => det!("avx512vnni"),
        F::AVX512_BITALG => det!("avx512bitalg"),
        F::AVX512_VPOPCNTDQ => det!("avx512vpopcntdq"),
        F::AVX512_IFMA => det!("avx512ifma"),
        F::AVX512_BF16 => det!("avx512bf16"),
        F::AVX512_FP16 => det!("avx512fp16"),
        F::AVX512_VP2INTERSECT => det!("avx512vp2intersect"),
        // XSAVE instructions need the OS to have enabled them (OSXSAVE).
        F::XSAVE => det!("xsave"),
        F::XSAVEOPT => det!("xsaveopt"),
        F::XSAVEC => det!("xsavec"),
        F::XSAVES => det!("xsaves"),
        F::RDRAND => det!("rdrand"),
        F::RDSEED => det!("rdseed"),
        F::CLFSH => bit(1, 0, EDX, 19),
        F::MONITOR => bit(1, 0, ECX, 3),
        F::FSGSBASE => bit(7, 0, EBX, 0),
        F::INVPCID => bit(7, 0, EBX, 10),
        F::SMAP => bit(7, 0, EBX, 20),
        F::CLFLUSHOPT => bit(7, 0, EBX, 23),
        F::CLWB => bit(7, 0, EBX, 24),
        F::PREFETCHWT1 => bit(7, 0, ECX, 0),
        F::PKU => bit(7, 0, ECX, 4), // OSPKE: the OS enabled it
        F::WAITPKG => bit(7, 0, ECX, 5),
        F::RDPID => bit(7, 0, ECX, 22),
        F::CLDEMOTE => bit(7, 0, ECX, 25),
        F::MOVDIRI => bit(7, 0, ECX, 27),
        F::MOVDIR64B => bit(7, 0, ECX, 28),
        F::SERIALIZE => bit(7, 0, EDX, 14),
        F::RDTSCP => bit(0x8000_0001, 0, EDX, 27),
        F::PREFETCHW => bit(0x8000_0001, 0, ECX, 8),
        F::MONITORX => bit(0x8000_0001, 0, ECX, 29),
        F::CLZERO => bit(0x8000_0008, 0, EBX, 0),
        F::RDPRU => bit(0x8000_0008, 0, EBX, 4),
        F::WBNOINVD => bit(0x8000_0008, 0, EBX, 9),
        F::XOP => bit(0x8000_0001, 0, ECX, 11),
        F::FMA4 => bit(0x8000_0001, 0, ECX, 16),
        F::TBM => bit(0x8000_0001, 0, ECX, 21),
        F::D3NOW => bit(0x8000_0001, 0, EDX, 31),
        F::D3NOWEXT => bit(0x8000_0001, 0, EDX, 30),
        _ => false,
    }
}

/// Whether the host saves and runs AVX-512 state (vector records then hold
/// ZMM registers; otherwise YMM or XMM).
pub fn avx512() -> bool {
    has(CpuidFeature::AVX512F)
}

pub fn avx() -> bool {
    has(CpuidFeature::AVX)
}

/// Bytes of the standard-format XSAVE area for the XCR0 the host's OS
/// enabled (CPUID.(0xD,0).EBX); 512 + 64 without XSAVE.
pub fn xsave_size() -> usize {
    if !has(CpuidFeature::XSAVE) {
        return 576;
    }
    (cpuid(0xd, 0)[EBX] as usize).max(576)
}

/// Offset and size of XSAVE state component `i` in the standard format
/// (CPUID.(0xD,i).EBX and EAX).
pub fn xsave_component(i: u32) -> (usize, usize) {
    let r = cpuid(0xd, i);
    (r[EBX] as usize, r[EAX] as usize)
}

/// The CPU vendor, for the report: "GenuineIntel", "AuthenticAMD"...
pub fn vendor() -> String {
    let r = __cpuid_count(0, 0);
    let mut s = Vec::with_capacity(12);
    for v in [r.ebx, r.edx, r.ecx] {
        s.extend_from_slice(&v.to_le_bytes());
    }
    String::from_utf8_lossy(&s).into_owned()
}
