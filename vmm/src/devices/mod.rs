//! Devices on the PIO and MMIO buses. Each file holds one device; the
//! bus traits live in [`crate::bus`].

pub mod acpi_pm1;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod mmio_ram;
pub mod pc_testdev;
pub mod pm_timer;
pub mod rtc;
pub mod serial;
pub mod test_report;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A `vm_superio::Trigger` that only records that it fired; the bus adapter
/// keeps a clone and checks it right after the access. Used where an event is
/// turned into a [`crate::bus::BusAction`] or has no consumer.
#[derive(Default, Clone)]
pub struct LatchTrigger(Arc<AtomicBool>);

impl LatchTrigger {
    /// Whether the trigger fired since the last call; resets it.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

impl vm_superio::Trigger for LatchTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}
