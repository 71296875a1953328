//! Which CPUID features the machine running the test has. A form is only
//! generated when the host runs it natively, since CPL 3 is the ground truth.

use iced_x86::CpuidFeature;

/// Whether this host (CPU and OS, including XCR0 for AVX state) runs
/// instructions that need `f`. Features the generator never probes count as
/// absent: such forms are skipped as "host lacks feature".
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
        | F::MULTIBYTENOP => true,
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
        F::MOVDIRI => leaf7_ecx(27),
        F::MOVDIR64B => leaf7_ecx(28),
        _ => false,
    }
}

/// CPUID.(EAX=7,ECX=0):ECX bit `bit`.
fn leaf7_ecx(bit: u32) -> bool {
    // CPUID exists on every x86-64 CPU; leaf 7 reads as zero where it is
    // beyond the maximum leaf.
    let r = std::arch::x86_64::__cpuid_count(7, 0);
    r.ecx & (1 << bit) != 0
}

/// Whether the host saves and runs AVX-512 state (vector records then hold
/// ZMM registers; otherwise YMM or XMM).
pub fn avx512() -> bool {
    has(CpuidFeature::AVX512F)
}

pub fn avx() -> bool {
    has(CpuidFeature::AVX)
}
