//! Differential coverage: every instruction form the emulator claims to
//! support, run natively at CPL 3 (the ground truth) and through the VMM's
//! completion paths, with the results compared field by field on the host.
//!
//! [`gen`] enumerates forms from iced-x86's opcode tables, [`host`] says
//! which CPUID features this machine has, [`program`] assembles one VM
//! image per chunk of forms, and [`record`] describes the result tables the
//! guest writes (read back through `VmConfig::dump_ranges`).
//!
//! Each form runs four ways, in this order, every time from the same
//! initial state:
//! - (b1) CPL 0, operand in RAM, and (b2) CPL 0, operand on `--mmio-ram`:
//!   both before the guest first drops to CPL 3, because only then does PVM
//!   interpret CPL 0 code, so every x87/SSE/AVX instruction reaches the VMM;
//! - (G) CPL 3, operand in RAM: native, the ground truth;
//! - (a) CPL 3, operand on `--mmio-ram`: what hardware KVM users get (KVM
//!   emulates the access or exits to the VMM's emulator);
//! - (c) CPL 3, operand split between RAM and MMIO: the buffer starts 2 KiB
//!   below the end of guest RAM, where a second `--mmio-ram` window begins.
//!   Compared only for forms whose window is larger than 2 KiB (whole-state
//!   operands, gathers and scatters with far elements); for the others it
//!   is the ground truth again.

pub mod gen;
pub mod host;
pub mod operands;
pub mod program;
pub mod record;

pub use gen::{generate, Buffers, Form, Generated, Skip};

/// The ways a form runs, in the order of the result tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// CPL 3, RAM operand: native ground truth.
    Truth,
    /// CPL 3, MMIO operand.
    UserMmio,
    /// CPL 0, RAM operand.
    KernelRam,
    /// CPL 0, MMIO operand.
    KernelMmio,
    /// CPL 3, operand straddling the end of RAM and an MMIO window.
    UserSplit,
}

impl Way {
    pub const ALL: [Way; 5] = [
        Way::Truth,
        Way::UserMmio,
        Way::KernelRam,
        Way::KernelMmio,
        Way::UserSplit,
    ];

    /// Index of this way's result table.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The short name the brief and the README use.
    pub fn label(self) -> &'static str {
        match self {
            Way::Truth => "G",
            Way::UserMmio => "a",
            Way::KernelRam => "b1",
            Way::KernelMmio => "b2",
            Way::UserSplit => "c",
        }
    }
}
