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

/// The exit-status table `vmm run --help` prints (kept next to the
/// constants it describes).
pub const HELP: &str = "\
Exit statuses:
  0            the guest halted (`cli; hlt`; without the in-kernel irqchip also
               `sti; hlt`, as nothing could wake it), or reset the machine through
               the i8042; with --cpus > 1 or a test device: every vCPU halted with
               interrupts off (`sti; hlt` then waits for an interrupt)
  (V<<1|1)&255 the guest wrote V to the isa-debug-exit port 0xf4 (always odd)
  2            bad command line, bad image, or a VM that could not be set up
  4            triple fault (the end line names the IDT and the instruction at RIP)
  6            an exit the VMM does not handle (entry failure, internal error...)
  8            a KVM call failed while running
  10           an instruction KVM could not emulate and the VMM does not complete
  12           the stub self-test failed
  14           stopped by SIGINT or SIGTERM
Every end is reported in one line on stderr naming the cause and RIP.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_status() {
        for s in [
            GUEST_DONE,
            SETUP_ERROR,
            TRIPLE_FAULT,
            UNHANDLED_EXIT,
            KVM_FAILURE,
            UNSUPPORTED_INSTRUCTION,
            SELFTEST_FAILED,
            INTERRUPTED,
        ] {
            assert!(
                HELP.lines().any(|l| l.starts_with(&format!("  {s} "))),
                "status {s} missing from:\n{HELP}"
            );
        }
    }
}
