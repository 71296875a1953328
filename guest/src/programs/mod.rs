//! The program catalogue. Each file holds programs for one concern.

mod basic;
pub mod bench;
mod bios;
pub mod emulation;
pub mod exactness;
mod locked;
mod masked;
mod mmio;
mod pio;
mod regonly;
pub mod system;
pub mod testdev;
mod user;
pub mod xstate;

use crate::rt::{Asm, AsmResult};
use crate::{Expect, Mode, Program};
use iced_x86::code_asm::CodeAssembler;

/// Default load address of long- and protected-mode programs.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Real-mode programs load where a boot sector would.
pub const REAL_LOAD_ADDR: u64 = 0x7c00;
/// The `--mmio-ram` window programs use unless they say otherwise.
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_SIZE: u64 = 0x2000;

type Builder = fn() -> Result<Program, iced_x86::IcedError>;

const CATALOGUE: &[(&str, Builder)] = &[
    ("hello-real", basic::hello_real),
    ("hello-protected", basic::hello_protected),
    ("hello-long", basic::hello_long),
    ("halt", basic::halt),
    ("i8042-reset", basic::i8042_reset),
    ("triple-fault", basic::triple_fault),
    ("spin", basic::spin),
    ("cpuid-leaves", basic::cpuid_leaves),
    ("pio-widths", pio::pio_widths),
    ("rep-string-io", pio::rep_string_io),
    ("mmio-widths", mmio::mmio_widths),
    ("mmio-user-sse", mmio::mmio_user_sse),
    ("mmio-cross-page", mmio::mmio_cross_page),
    ("mmio-split-windows", mmio::mmio_split_windows),
    ("user-simd", user::user_simd),
    ("user-exception", user::user_exception),
    ("regonly-cpl0", regonly::regonly_cpl0),
    ("masked-fault-suppression", masked::masked_fault_suppression),
    ("unsupported-insn", emulation::unsupported_insn),
    ("emul-page-fault", emulation::emul_page_fault),
    ("system-cpl0", system::system_cpl0),
    ("descriptor-checks", system::descriptor_checks),
    ("arpl-protected", system::arpl_protected),
    ("bios-state", bios::bios_state),
    ("acpi-s3", bios::acpi_s3),
    ("mxcsr-cpl0", xstate::mxcsr_cpl0),
    ("vector-unchanged", xstate::catalogue_vector_unchanged),
    ("vector-across-exits", xstate::vector_across_exits),
    ("xcr0-user", xstate::xcr0_user),
    ("ts-user", xstate::ts_user),
    ("em-user", xstate::em_user),
    ("controls-user", xstate::controls_user),
    ("exactness", exactness::exactness),
    ("kvm-defects", exactness::kvm_defects),
    ("multiboot-info", testdev::multiboot_info),
    ("testdev-ports", testdev::testdev_ports),
    ("testdev-irq", testdev::testdev_irq),
    ("smp-2", testdev::smp2),
    ("smp-4", testdev::smp4),
    ("smp-cmpxchg16b", locked::smp_cmpxchg16b),
    (
        "smp-cmpxchg16b-native-writer",
        locked::smp_cmpxchg16b_native_writer,
    ),
    ("bench-pio", bench::catalogue_pio),
    ("bench-mmio", bench::catalogue_mmio),
    ("bench-cmpxchg16b", bench::catalogue_cmpxchg16b),
    ("bench-adcx", bench::catalogue_adcx),
    ("bench-vmovdqu", bench::catalogue_vmovdqu),
    ("bench-vmovdqu-nonzero", bench::catalogue_vmovdqu_nonzero),
    ("bench-xsave", bench::catalogue_xsave),
    ("bench-xrstor", bench::catalogue_xrstor),
    ("bench-simd-cpl0", bench::catalogue_simd_cpl0),
    ("bench-user-mmio", bench::catalogue_user_mmio),
    ("bench-user-vmovdqu", bench::catalogue_user_vmovdqu),
    ("bench-cpuid", bench::cpuid),
];

pub fn names() -> Vec<&'static str> {
    CATALOGUE.iter().map(|(n, _)| *n).collect()
}

/// Builds `name`. Assembling a catalogued program cannot fail unless the
/// program itself is wrong, which the crate's tests catch.
pub fn build(name: &str) -> Option<Program> {
    let (_, b) = CATALOGUE.iter().find(|(n, _)| *n == name)?;
    b().ok()
}

pub fn all() -> Vec<Program> {
    CATALOGUE.iter().filter_map(|(_, b)| b().ok()).collect()
}

/// Assembles `body` for `mode` at `load_addr`.
pub(crate) fn assemble(
    mode: Mode,
    load_addr: u64,
    body: impl FnOnce(&mut Asm) -> AsmResult,
) -> Result<Vec<u8>, iced_x86::IcedError> {
    let mut a = CodeAssembler::new(mode.bitness())?;
    body(&mut a)?;
    a.assemble(load_addr)
}

pub(crate) fn expect(status: i32, serial: &'static str, reports: Option<Vec<u64>>) -> Expect {
    Expect {
        status,
        serial,
        reports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_assembles() {
        for (name, b) in CATALOGUE {
            let p = b().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(p.name, *name);
            assert!(!p.image.is_empty());
        }
    }
}
