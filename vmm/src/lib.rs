//! `vmm`: a KVM micro-VMM. It loads a guest image, runs it on KVM and serves
//! port-I/O and MMIO exits through its device buses; instructions KVM cannot
//! emulate are completed by the `emul` crate.

pub mod acpi;
pub mod bench;
pub mod bios;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod devices;
pub mod halt_probe;
pub mod kvm;
pub mod layout;
pub mod loader;
pub mod selftest;
pub mod signals;
pub mod stats;
pub mod status;
pub mod trace;
pub mod vcpu;
pub mod vm;
