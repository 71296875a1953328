//! Serving one exit: a free function over the decoded exit and the buses,
//! so it can be tested without a vCPU.

use crate::bus::{BusAction, StopReason};
use crate::kvm::run_page::Exit;
use crate::vm::Buses;

/// What the run loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Resume,
    /// A device ended the VM.
    Stop { status: i32, reason: StopReason },
    /// HLT: ends the VM when interrupts are off.
    Halt,
    /// Triple fault.
    Shutdown,
    /// KVM's emulator gave up on the instruction at RIP.
    Emulate { bytes: [u8; 15], len: usize },
    /// KVM_RUN was interrupted (a kick from another thread or a signal).
    Interrupted,
    /// Anything else: fatal, with what it was.
    Unhandled(UnhandledExit),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnhandledExit {
    InternalError(u32),
    FailEntry(u64),
    SystemEvent(u32),
    Other(u32),
}

impl std::fmt::Display for UnhandledExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnhandledExit::InternalError(s) => write!(f, "KVM internal error (suberror {s})"),
            UnhandledExit::FailEntry(r) => write!(f, "VM entry failed (hardware reason {r:#x})"),
            UnhandledExit::SystemEvent(k) => write!(f, "unhandled system event {k}"),
            UnhandledExit::Other(r) => write!(f, "unhandled exit reason {r}"),
        }
    }
}

/// Serves `exit` on `buses`.
#[inline]
pub fn handle_exit(exit: Exit<'_>, buses: &Buses) -> ExitAction {
    match exit {
        Exit::Io {
            port,
            size,
            out,
            data,
        } => {
            // String I/O (`rep outsb`) arrives as `count` items of `size`.
            if size == 0 {
                return ExitAction::Resume;
            }
            for item in data.chunks_exact_mut(size) {
                if out {
                    if let BusAction::Stop { status, reason } = buses.pio.write(port, item) {
                        return ExitAction::Stop { status, reason };
                    }
                } else {
                    buses.pio.read(port, item);
                }
            }
            ExitAction::Resume
        }
        // KVM splits nothing: an access may run across devices and gaps,
        // which the bus splits as an address decoder would.
        Exit::Mmio { addr, write, data } => {
            if write {
                if let BusAction::Stop { status, reason } = buses.mmio.write(addr, data) {
                    return ExitAction::Stop { status, reason };
                }
            } else {
                buses.mmio.read(addr, data);
            }
            ExitAction::Resume
        }
        Exit::Hlt => ExitAction::Halt,
        Exit::Shutdown => ExitAction::Shutdown,
        Exit::Intr => ExitAction::Interrupted,
        Exit::EmulationFailure { bytes, len } => ExitAction::Emulate { bytes, len },
        Exit::InternalError { suberror } => {
            ExitAction::Unhandled(UnhandledExit::InternalError(suberror))
        }
        Exit::FailEntry { reason } => ExitAction::Unhandled(UnhandledExit::FailEntry(reason)),
        Exit::SystemEvent { kind } => ExitAction::Unhandled(UnhandledExit::SystemEvent(kind)),
        Exit::Other(r) => ExitAction::Unhandled(UnhandledExit::Other(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::debug_exit::DebugExit;
    use crate::devices::mmio_ram::MmioRam;
    use std::sync::{Arc, Mutex};

    fn buses() -> Buses {
        let mut b = Buses::default();
        b.pio
            .register(0xf4, 4, Arc::new(Mutex::new(DebugExit)))
            .unwrap();
        b.mmio
            .register(
                0x1000,
                0x100,
                Arc::new(Mutex::new(MmioRam::new(0x100).unwrap())),
            )
            .unwrap();
        b
    }

    #[test]
    fn string_out_is_split_into_items_and_stops_on_debug_exit() {
        let b = buses();
        let mut data = [5u8, 0, 0, 0];
        let a = handle_exit(
            Exit::Io {
                port: 0xf4,
                size: 4,
                out: true,
                data: &mut data,
            },
            &b,
        );
        assert_eq!(
            a,
            ExitAction::Stop {
                status: 11,
                reason: StopReason::DebugExit { value: 5 }
            }
        );
    }

    #[test]
    fn unassigned_reads_all_ones_and_mmio_round_trips() {
        let b = buses();
        let mut d = [0u8; 2];
        assert_eq!(
            handle_exit(
                Exit::Io {
                    port: 0x80,
                    size: 1,
                    out: false,
                    data: &mut d
                },
                &b
            ),
            ExitAction::Resume
        );
        assert_eq!(d, [0xff, 0xff]);
        let mut w = 0x1122_3344u32.to_le_bytes();
        handle_exit(
            Exit::Mmio {
                addr: 0x1010,
                write: true,
                data: &mut w,
            },
            &b,
        );
        let mut r = [0u8; 4];
        handle_exit(
            Exit::Mmio {
                addr: 0x1010,
                write: false,
                data: &mut r,
            },
            &b,
        );
        assert_eq!(u32::from_le_bytes(r), 0x1122_3344);
        let mut u = [0u8; 8];
        handle_exit(
            Exit::Mmio {
                addr: 0x9000,
                write: false,
                data: &mut u,
            },
            &b,
        );
        assert_eq!(u, [0xff; 8]);
    }

    #[test]
    fn kvm_mmio_exit_is_split_across_windows() {
        let mut b = Buses::default();
        let first = Arc::new(Mutex::new(MmioRam::new(0x10).unwrap()));
        let second = Arc::new(Mutex::new(MmioRam::new(0x20).unwrap()));
        b.mmio.register(0xd000_0000, 0x10, first.clone()).unwrap();
        b.mmio.register(0xd000_0010, 0x20, second.clone()).unwrap();
        // KVM hands over at most 8 bytes: one at 0xd000000c runs into the
        // second window, one at 0xcffffffc starts in unassigned space.
        let mut w = *b"ABCDEFGH";
        handle_exit(
            Exit::Mmio {
                addr: 0xd000_000c,
                write: true,
                data: &mut w,
            },
            &b,
        );
        assert_eq!(first.lock().unwrap().contents()[12..], *b"ABCD");
        assert_eq!(second.lock().unwrap().contents()[..4], *b"EFGH");
        let mut r = [0u8; 8];
        handle_exit(
            Exit::Mmio {
                addr: 0xcfff_fffc,
                write: false,
                data: &mut r,
            },
            &b,
        );
        assert_eq!(r, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }
}
