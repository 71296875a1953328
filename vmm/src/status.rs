//! Process exit statuses. The guest's own outcomes (HLT, i8042 reset: 0;
//! isa-debug-exit: `(V << 1) | 1`, always odd) never collide with the VMM's
//! failure statuses, which are even and non-zero.

/// Guest halted with interrupts off, or reset the machine.
pub const GUEST_DONE: i32 = 0;
/// Bad command line, bad image, or a VM that could not be set up.
pub const SETUP_ERROR: i32 = 2;
/// Triple fault (KVM_EXIT_SHUTDOWN).
pub const TRIPLE_FAULT: i32 = 4;
/// An exit the VMM does not handle (or KVM_EXIT_FAIL_ENTRY / internal error).
pub const UNHANDLED_EXIT: i32 = 6;
/// A KVM call failed while the guest was running.
pub const KVM_FAILURE: i32 = 8;
/// An instruction KVM could not emulate and the VMM does not complete.
pub const UNSUPPORTED_INSTRUCTION: i32 = 10;
/// The stub self-test failed; the VMM refuses to run guests.
pub const SELFTEST_FAILED: i32 = 12;
/// Stopped by SIGINT or SIGTERM.
pub const INTERRUPTED: i32 = 14;
