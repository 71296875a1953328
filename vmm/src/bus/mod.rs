//! Device buses: one for port I/O, one for MMIO.
//!
//! Devices register an address range at set-up; overlapping ranges are
//! rejected. Lookup is a `BTreeMap` range query, O(log n). An access is
//! split across the devices (and unclaimed gaps) its bytes fall in, as a
//! real bus's address decoder would. A device sees
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
    /// A write of `value` to the isa-debug-exit port.
    DebugExit { value: u32 },
    /// The i8042 was asked to pulse the CPU reset line.
    I8042Reset,
}

impl StopReason {
    /// What happened, for the end line (which adds the process status).
    pub fn describe(self) -> String {
        match self {
            StopReason::DebugExit { value } => format!(
                "guest wrote {value:#x} to the debug-exit port, \
                 the low 8 bits of ({value:#x} << 1) | 1"
            ),
            StopReason::I8042Reset => "guest reset the machine through the i8042".into(),
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

    /// The entry covering `addr` and the offset of `addr` within its range.
    #[inline]
    fn entry_at(&self, addr: u64) -> Option<(&Entry<D>, u64)> {
        let (start, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - start;
        (off < e.len).then_some((e, off))
    }

    /// The device covering `addr` and the offset of `addr` within its range.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<(&Arc<Mutex<D>>, u64)> {
        self.entry_at(addr).map(|(e, off)| (&e.device, off))
    }

    /// Splits the access `[addr, addr + len)` the way a bus's address decoder
    /// does: calls `piece` once per run of bytes one device claims (with the
    /// device and the run's offset in its range) and once per run no device
    /// claims (`None`), in address order, each run given as indices into the
    /// access. An access inside one device costs one lookup; nothing
    /// allocates.
    #[inline]
    pub fn split<F>(&self, addr: u64, len: usize, mut piece: F)
    where
        F: FnMut(std::ops::Range<usize>, Option<(&Arc<Mutex<D>>, u64)>),
    {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut done = 0usize;
        while done < len {
            let left = (len - done) as u64;
            // Bytes past the top of the address space belong to no device.
            let Some(cur) = addr.checked_add(done as u64) else {
                piece(done..len, None);
                return;
            };
            let n = match self.entry_at(cur) {
                Some((e, off)) => {
                    let n = (e.len - off).min(left) as usize;
                    piece(done..done + n, Some((&e.device, off)));
                    n
                }
                None => {
                    let gap = self
                        .ranges
                        .range((Excluded(cur), Unbounded))
                        .next()
                        .map_or(u64::MAX, |(s, _)| s - cur);
                    let n = gap.min(left) as usize;
                    piece(done..done + n, None);
                    n
                }
            };
            done += n;
        }
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

    /// Serves a guest `in`: each device the bytes fall in fills its part;
    /// unclaimed ports read all-ones (logged at debug level).
    #[inline]
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let kind = self.kind;
        self.split(u64::from(port), data.len(), |r, dev| match dev {
            Some((dev, off)) => lock(dev).pio_read(off as u16, &mut data[r]),
            None => {
                log::debug!(
                    "{kind} read from unassigned {:#x}+{}",
                    u64::from(port) + r.start as u64,
                    r.len()
                );
                data[r].fill(0xff);
            }
        })
    }

    /// Serves a guest `out`: each device the bytes fall in gets its part;
    /// writes to unclaimed ports are dropped (logged at debug level). The
    /// first device asking to stop the VM wins.
    #[inline]
    pub fn write(&self, port: u16, data: &[u8]) -> BusAction {
        let mut action = BusAction::Continue;
        let kind = self.kind;
        self.split(u64::from(port), data.len(), |r, dev| match dev {
            Some((dev, off)) => {
                let a = lock(dev).pio_write(off as u16, &data[r]);
                if action == BusAction::Continue {
                    action = a;
                }
            }
            None => log::debug!(
                "{kind} write to unassigned {:#x}+{} dropped",
                u64::from(port) + r.start as u64,
                r.len()
            ),
        });
        action
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

    /// Serves a guest MMIO read: each device the bytes fall in fills its
    /// part; unclaimed bytes read all-ones (logged at debug level).
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        let kind = self.kind;
        self.split(addr, data.len(), |r, dev| match dev {
            Some((dev, off)) => lock(dev).mmio_read(off, &mut data[r]),
            None => {
                log::debug!(
                    "{kind} read from unassigned {:#x}+{}",
                    addr.wrapping_add(r.start as u64),
                    r.len()
                );
                data[r].fill(0xff);
            }
        })
    }

    /// Serves a guest MMIO write: each device the bytes fall in gets its
    /// part; unclaimed bytes are dropped (logged at debug level). The first
    /// device asking to stop the VM wins.
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> BusAction {
        let mut action = BusAction::Continue;
        let kind = self.kind;
        self.split(addr, data.len(), |r, dev| match dev {
            Some((dev, off)) => {
                let a = lock(dev).mmio_write(off, &data[r]);
                if action == BusAction::Continue {
                    action = a;
                }
            }
            None => log::debug!(
                "{kind} write to unassigned {:#x}+{} dropped",
                addr.wrapping_add(r.start as u64),
                r.len()
            ),
        });
        action
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
        bus.read(0x3fb, &mut b);
        assert_eq!(b[0], 0x43);
        bus.read(0x400, &mut b);
        assert_eq!(b[0], 0xff);
        assert_eq!(bus.write(0x3f7, &[1]), BusAction::Continue);
        assert_eq!(bus.write(0x3f8, &[7]), BusAction::Continue);
        bus.read(0x3f8, &mut b);
        assert_eq!(b[0], 7);
        // The write to the unclaimed 0x3f7 reached no device.
        bus.read(0x3f9, &mut b);
        assert_eq!(b[0], 8);
    }

    /// Byte-addressed RAM that records every access it gets.
    struct Window {
        bytes: Vec<u8>,
        accesses: Vec<(u64, usize)>,
    }
    impl Window {
        fn new(len: usize) -> Arc<Mutex<Window>> {
            Arc::new(Mutex::new(Window {
                bytes: vec![0; len],
                accesses: Vec::new(),
            }))
        }
    }
    impl MmioDevice for Window {
        fn mmio_read(&mut self, off: u64, d: &mut [u8]) {
            self.accesses.push((off, d.len()));
            let o = off as usize;
            d.copy_from_slice(&self.bytes[o..o + d.len()]);
        }
        fn mmio_write(&mut self, off: u64, d: &[u8]) -> BusAction {
            self.accesses.push((off, d.len()));
            let o = off as usize;
            self.bytes[o..o + d.len()].copy_from_slice(d);
            BusAction::Continue
        }
    }
    impl PioDevice for Window {
        fn pio_read(&mut self, off: u16, d: &mut [u8]) {
            self.mmio_read(u64::from(off), d)
        }
        fn pio_write(&mut self, off: u16, d: &[u8]) -> BusAction {
            self.mmio_write(u64::from(off), d)
        }
    }

    fn two_windows() -> (MmioBus, Arc<Mutex<Window>>, Arc<Mutex<Window>>) {
        let mut bus = MmioBus::new_mmio();
        let (a, b) = (Window::new(0x10), Window::new(0x20));
        bus.register(0xd000_0000, 0x10, a.clone()).unwrap();
        bus.register(0xd000_0010, 0x20, b.clone()).unwrap();
        (bus, a, b)
    }

    #[test]
    fn mmio_access_is_split_across_windows_and_gaps() {
        let (bus, a, b) = two_windows();
        // A 64-byte store (an AVX-512 move) over both windows and the gap
        // after them: bytes 0-15 to the first, 16-47 to the second, 48-63
        // dropped.
        let data: Vec<u8> = (1..=64).collect();
        assert_eq!(bus.write(0xd000_0000, &data), BusAction::Continue);
        assert_eq!(a.lock().unwrap().bytes, data[..16]);
        assert_eq!(b.lock().unwrap().bytes, data[16..48]);
        assert_eq!(a.lock().unwrap().accesses, [(0, 16)]);
        assert_eq!(b.lock().unwrap().accesses, [(0, 32)]);
        let mut back = [0u8; 64];
        bus.read(0xd000_0000, &mut back);
        assert_eq!(back[..48], data[..48]);
        assert_eq!(back[48..], [0xff; 16]);
    }

    #[test]
    fn access_from_unassigned_space_into_a_window_reaches_it() {
        let (bus, a, _) = two_windows();
        bus.write(0xcfff_fff8, &[0x11; 16]);
        assert_eq!(a.lock().unwrap().bytes[..8], [0x11; 8]);
        assert_eq!(a.lock().unwrap().bytes[8..], [0; 8]);
        let mut r = [0u8; 16];
        bus.read(0xcfff_fffc, &mut r);
        assert_eq!(
            r,
            [0xff, 0xff, 0xff, 0xff, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0, 0, 0, 0]
        );
        // An access ending at the top of the address space stays in the gap.
        let mut top = [0u8; 8];
        bus.read(u64::MAX - 3, &mut top);
        assert_eq!(top, [0xff; 8]);
    }

    #[test]
    fn port_access_is_split_too() {
        let mut bus = PioBus::new_pio();
        let (a, b) = (Window::new(2), Window::new(2));
        bus.register(0x10, 2, a.clone()).unwrap();
        bus.register(0x12, 2, b.clone()).unwrap();
        // `out dx, eax` at 0x11: one byte each to the first window's
        // offset 1, two to the second, one dropped at 0x14.
        bus.write(0x11, &[1, 2, 3, 4]);
        assert_eq!(a.lock().unwrap().bytes, [0, 1]);
        assert_eq!(b.lock().unwrap().bytes, [2, 3]);
        let mut r = [0u8; 4];
        bus.read(0x0f, &mut r);
        assert_eq!(r, [0xff, 0, 1, 2]);
        // Ports past 0xffff are unclaimed.
        bus.read(0xfffe, &mut r);
        assert_eq!(r, [0xff; 4]);
    }

    #[test]
    fn first_stop_wins_across_devices() {
        struct Stopper(i32);
        impl PioDevice for Stopper {
            fn pio_read(&mut self, _: u16, d: &mut [u8]) {
                d.fill(0)
            }
            fn pio_write(&mut self, _: u16, _: &[u8]) -> BusAction {
                BusAction::Stop {
                    status: self.0,
                    reason: StopReason::DebugExit { value: 0 },
                }
            }
        }
        let mut bus = PioBus::new_pio();
        bus.register(0x20, 1, Arc::new(Mutex::new(Stopper(3))))
            .unwrap();
        bus.register(0x21, 1, Arc::new(Mutex::new(Stopper(5))))
            .unwrap();
        assert_eq!(
            bus.write(0x1f, &[0; 4]),
            BusAction::Stop {
                status: 3,
                reason: StopReason::DebugExit { value: 0 }
            }
        );
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
