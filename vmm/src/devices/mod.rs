//! Devices on the PIO and MMIO buses.
