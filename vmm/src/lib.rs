//! `vmm`: a KVM micro-VMM. It loads a guest image, runs it on KVM and serves
//! port-I/O and MMIO exits through its device buses; instructions KVM cannot
//! emulate are completed by the `emul` crate.

pub mod bus;
pub mod devices;
pub mod layout;
pub mod loader;
