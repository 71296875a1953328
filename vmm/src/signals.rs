//! Signals: the vCPU kick (a real-time signal that interrupts KVM_RUN so a
//! vCPU thread notices the VM is stopping) and SIGINT/SIGTERM, which ask the
//! whole VM to stop.
//!
//! Both handlers only store to atomics, which is async-signal-safe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The signal sent to vCPU threads to make KVM_RUN return with EINTR.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

extern "C" fn on_stop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_REQUESTED.store(true, Ordering::Relaxed);
}

/// Installs the vCPU kick handler (once per process).
pub fn install_kick() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result
}

/// Makes SIGINT and SIGTERM stop the VM cleanly instead of killing the
/// process (the binary calls this; embedders may not want it).
pub fn install_stop() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(libc::SIGINT, on_stop)?;
    register_signal_handler(libc::SIGTERM, on_stop)
}

/// Whether SIGINT or SIGTERM arrived.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::Relaxed)
}
