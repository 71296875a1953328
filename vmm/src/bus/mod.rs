//! Device buses: one for port I/O, one for MMIO.
//!
//! Devices register an address range at set-up; overlapping ranges are
//! rejected. Lookup is a `BTreeMap` range query, O(log n). A device sees
//! offsets relative to the start of its range. Each device sits behind its own
//! mutex so vCPU threads only contend when they touch the same device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device asks of the VM after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAction {
    /// Carry on running the guest.
    Continue,
    /// Stop every vCPU; the process exits with `status`.
    Stop { status: i32, reason: StopReason },
}

/// Why a device stopped the VM (printed in the one-line exit message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A write to the isa-debug-exit port.
    DebugExit,
    /// The i8042 was asked to pulse the CPU reset line.
    I8042Reset,
}

impl StopReason {
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::DebugExit => "guest wrote to the debug-exit port",
            StopReason::I8042Reset => "guest reset the machine through the i8042",
        }
    }
}

/// A device on the port-I/O bus. `offset` is relative to the registered base.
pub trait PioDevice: Send {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]);
    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction;
}

/// A device on the MMIO bus. `offset` is relative to the registered base.
pub trait MmioDevice: Send {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    fn mmio_write(&mut self, offset: u64, data: &[u8]) -> BusAction;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{kind} range {start:#x}+{len:#x} overlaps {other_start:#x}+{other_len:#x}")]
    Overlap {
        kind: &'static str,
        start: u64,
        len: u64,
        other_start: u64,
        other_len: u64,
    },
    #[error("{kind} range at {start:#x} is empty or wraps around")]
    BadRange { kind: &'static str, start: u64 },
}

struct Entry<D: ?Sized> {
    len: u64,
    device: Arc<Mutex<D>>,
}

/// A set of non-overlapping address ranges, each owned by one device.
pub struct RangeMap<D: ?Sized> {
    kind: &'static str,
    ranges: BTreeMap<u64, Entry<D>>,
}

impl<D: ?Sized> RangeMap<D> {
    fn new(kind: &'static str) -> Self {
        RangeMap {
            kind,
            ranges: BTreeMap::new(),
        }
    }

    /// Registers `device` for `[start, start + len)`.
    pub fn insert(&mut self, start: u64, len: u64, device: Arc<Mutex<D>>) -> Result<(), BusError> {
        let kind = self.kind;
        let end = start
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { kind, start })?;
        let clash = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(s, e)| **s + e.len > start);
        if let Some((s, e)) = clash {
            return Err(BusError::Overlap {
                kind,
                start,
                len,
                other_start: *s,
                other_len: e.len,
            });
        }
        self.ranges.insert(start, Entry { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` within its range.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<(&Arc<Mutex<D>>, u64)> {
        let (start, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - start;
        (off < e.len).then_some((&e.device, off))
    }

    /// Whether any part of `[addr, addr + len)` is claimed by a device.
    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len);
        self.ranges
            .range(..end)
            .next_back()
            .is_some_and(|(s, e)| s + e.len > addr)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(s, e)| (*s, e.len))
    }
}

/// The port-I/O bus. Unclaimed ports read all-ones and drop writes.
pub type PioBus = RangeMap<dyn PioDevice>;
/// The MMIO bus. Unclaimed addresses read all-ones and drop writes.
pub type MmioBus = RangeMap<dyn MmioDevice>;

impl PioBus {
    pub fn new_pio() -> Self {
        RangeMap::new("port")
    }

    pub fn register<T: PioDevice + 'static>(
        &mut self,
        base: u16,
        len: u16,
        dev: Arc<Mutex<T>>,
    ) -> Result<(), BusError> {
        self.insert(u64::from(base), u64::from(len), dev)
    }

    /// Serves a guest `in`. Returns false when no device claims the port.
    #[inline]
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(u64::from(port)) {
            Some((dev, off)) => {
                lock(dev).pio_read(off as u16, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Serves a guest `out`; `None` when no device claims the port.
    #[inline]
    pub fn write(&self, port: u16, data: &[u8]) -> Option<BusAction> {
        let (dev, off) = self.find(u64::from(port))?;
        Some(lock(dev).pio_write(off as u16, data))
    }
}

impl MmioBus {
    pub fn new_mmio() -> Self {
        RangeMap::new("MMIO")
    }

    pub fn register<T: MmioDevice + 'static>(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<T>>,
    ) -> Result<(), BusError> {
        self.insert(base, len, dev)
    }

    /// Serves a guest MMIO read. Returns false when no device claims `addr`.
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                lock(dev).mmio_read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Serves a guest MMIO write; `None` when no device claims `addr`.
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<BusAction> {
        let (dev, off) = self.find(addr)?;
        Some(lock(dev).mmio_write(off, data))
    }
}

/// A device mutex poisoned by a panicking vCPU thread is still usable: the
/// device state is plain data and the VM is going down anyway.
#[inline]
fn lock<D: ?Sized>(m: &Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch(u8);
    impl PioDevice for Latch {
        fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn pio_write(&mut self, _offset: u16, data: &[u8]) -> BusAction {
            self.0 = data[0];
            BusAction::Continue
        }
    }

    #[test]
    fn overlaps_are_rejected() {
        let mut bus = PioBus::new_pio();
        bus.register(0x10, 8, Arc::new(Mutex::new(Latch(0))))
            .unwrap();
        for (base, len) in [(0x10, 1), (0x17, 1), (0x08, 9), (0x0, 0x100)] {
            let e = bus.register(base, len, Arc::new(Mutex::new(Latch(0))));
            assert!(
                matches!(e, Err(BusError::Overlap { .. })),
                "{base:#x}+{len}"
            );
        }
        bus.register(0x18, 1, Arc::new(Mutex::new(Latch(0))))
            .unwrap();
        bus.register(0x0f, 1, Arc::new(Mutex::new(Latch(0))))
            .unwrap();
        assert!(bus
            .register(0x30, 0, Arc::new(Mutex::new(Latch(0))))
            .is_err());
    }

    #[test]
    fn lookup_gives_offset_and_unclaimed_reads_ones() {
        let mut bus = PioBus::new_pio();
        bus.register(0x3f8, 8, Arc::new(Mutex::new(Latch(0x40))))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b[0], 0x43);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3f7, &[1]).is_none());
        assert_eq!(bus.write(0x3f8, &[7]), Some(BusAction::Continue));
        bus.read(0x3f8, &mut b);
        assert_eq!(b[0], 7);
    }

    #[test]
    fn mmio_overlap_query() {
        let mut bus = MmioBus::new_mmio();
        struct Nop;
        impl MmioDevice for Nop {
            fn mmio_read(&mut self, _: u64, d: &mut [u8]) {
                d.fill(0)
            }
            fn mmio_write(&mut self, _: u64, _: &[u8]) -> BusAction {
                BusAction::Continue
            }
        }
        bus.register(0xd000_0000, 0x1000, Arc::new(Mutex::new(Nop)))
            .unwrap();
        assert!(bus.overlaps(0xcfff_f000, 0x1001));
        assert!(!bus.overlaps(0xcfff_f000, 0x1000));
        assert!(bus.overlaps(0xd000_0fff, 1));
        assert!(!bus.overlaps(0xd000_1000, 1));
    }
}
