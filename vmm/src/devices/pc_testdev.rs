//! QEMU's `-device pc-testdev`, which kvm-unit-tests expects on x86:
//!
//! - 0xe0-0xe3 and 0xe8-0xeb: one 32-bit little-endian latch seen through two
//!   windows. QEMU hands 0xe0 the whole access and splits 0xe8 accesses into
//!   bytes; for accesses that stay inside a window both give the same result,
//!   so both are served byte by byte here. Bytes of an access that run past a
//!   window's end are dropped on write and read as zero. `x86/emulator.c` uses
//!   0xe0 (`TESTDEV_IO_PORT`) for `rep outsb`/`rep insb` and string-I/O-to-MMIO
//!   tests; SEV tests use it the same way.
//! - 0xe4: "flush page". A 32-bit write of a guest-physical address makes QEMU
//!   `mprotect` the host page away and back, so KVM drops its mapping and the
//!   guest's next access to that page exits again (old `x86/eventinj.c` uses
//!   it to inject exceptions while the IDT or stack page is unmapped). We log
//!   and do nothing: the tests still pass, they just take the ordinary fast
//!   path. Reads return zero, as in QEMU.
//! - 0x2000-0x2017 ([`TestdevIrq`]): a byte write of V sets ISA/GSI line n to
//!   `V != 0` (`x86/ioapic.c`'s `set_irq_line`). Reads return zero, as in QEMU.
//! - 0xff000000, 64 KiB ([`TestdevMmio`]): RAM-like MMIO, every access an
//!   exit (`IORAM_BASE_PHYS` in kvm-unit-tests' `ioram.h`, the emulator test's
//!   operand page).

use crate::bus::{BusAction, MmioDevice, PioDevice};
use crate::devices::mmio_ram::MmioRam;
use crate::layout::TESTDEV_MMIO_ADDR;

/// First port of the latch / flush / byte-latch block.
pub const TESTDEV_PORT: u16 = 0xe0;
pub const TESTDEV_LEN: u16 = 12;
/// Offsets inside the block (QEMU: pc-testdev-ioport, -flush-page,
/// -ioport-byte).
const LATCH: u16 = 0x0;
const FLUSH_PAGE: u16 = 0x4;
const LATCH_BYTE: u16 = 0x8;
const WINDOW_LEN: u16 = 4;

/// The IRQ-line ports: 0x2000 + n drives line n.
pub const TESTDEV_IRQ_PORT: u16 = 0x2000;
pub const TESTDEV_IRQ_LEN: u16 = 24;

/// The MMIO buffer.
pub const TESTDEV_IOMEM_ADDR: u64 = TESTDEV_MMIO_ADDR;
pub const TESTDEV_IOMEM_LEN: u64 = 0x1_0000;

/// The latch and flush-page ports, registered at [`TESTDEV_PORT`] for
/// [`TESTDEV_LEN`] ports.
#[derive(Default)]
pub struct PcTestdev {
    latch: [u8; 4],
}

impl PcTestdev {
    pub fn new() -> Self {
        Self::default()
    }

    /// The latch's current value.
    pub fn latch(&self) -> u32 {
        u32::from_le_bytes(self.latch)
    }
}

impl PioDevice for PcTestdev {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let LATCH..=0x3 | LATCH_BYTE..=0xb = offset {
            let start = usize::from(offset % WINDOW_LEN);
            let src = &self.latch[start..];
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        match offset {
            LATCH..=0x3 | LATCH_BYTE..=0xb => {
                let start = usize::from(offset % WINDOW_LEN);
                let dst = &mut self.latch[start..];
                let n = dst.len().min(data.len());
                dst[..n].copy_from_slice(&data[..n]);
            }
            FLUSH_PAGE => match <[u8; 4]>::try_from(data) {
                Ok(addr) => log::debug!(
                    "pc-testdev: flush page {:#x} (no-op)",
                    u32::from_le_bytes(addr) & !0xfff
                ),
                Err(_) => log::debug!("pc-testdev: {}-byte flush-page write", data.len()),
            },
            _ => log::debug!("pc-testdev: write to offset {offset:#x} ignored"),
        }
        BusAction::Continue
    }
}

/// Sets an interrupt line: `(gsi, level)`. The VMM passes a closure over
/// `VmFd::set_irq_line`; with KVM's default routing GSI 0-15 reach both the
/// PICs and the IOAPIC, GSI 16-23 only the IOAPIC.
pub type IrqLineFn = Box<dyn Fn(u32, bool) + Send>;

/// The IRQ-line ports, registered at [`TESTDEV_IRQ_PORT`] for
/// [`TESTDEV_IRQ_LEN`] ports.
pub struct TestdevIrq {
    set_line: IrqLineFn,
}

impl TestdevIrq {
    pub fn new(set_line: IrqLineFn) -> Self {
        TestdevIrq { set_line }
    }
}

impl PioDevice for TestdevIrq {
    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        // QEMU only accepts byte writes here; wider ones never reach it.
        match data {
            &[v] if offset < TESTDEV_IRQ_LEN => (self.set_line)(u32::from(offset), v != 0),
            _ => log::debug!(
                "pc-testdev: {}-byte write to IRQ port {:#x} ignored",
                data.len(),
                TESTDEV_IRQ_PORT + offset
            ),
        }
        BusAction::Continue
    }
}

/// The 64 KiB buffer, registered at [`TESTDEV_IOMEM_ADDR`] for
/// [`TESTDEV_IOMEM_LEN`] bytes. Accesses running past its end read all-ones
/// there and drop those bytes (QEMU would overrun its buffer).
pub struct TestdevMmio(MmioRam);

impl TestdevMmio {
    pub fn new() -> Result<Self, crate::devices::mmio_ram::MmioRamError> {
        MmioRam::new(TESTDEV_IOMEM_LEN as usize).map(TestdevMmio)
    }

    /// A copy of the buffer's contents.
    pub fn contents(&self) -> Vec<u8> {
        self.0.contents()
    }
}

impl MmioDevice for TestdevMmio {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.mmio_read(offset, data)
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        self.0.mmio_write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn read(d: &mut PcTestdev, offset: u16, len: usize) -> Vec<u8> {
        let mut v = vec![0xaa; len];
        d.pio_read(offset, &mut v);
        v
    }

    #[test]
    fn latch_round_trips_at_every_width() {
        let mut d = PcTestdev::new();
        d.pio_write(LATCH, &0x4433_2211u32.to_le_bytes());
        assert_eq!(read(&mut d, LATCH, 4), [0x11, 0x22, 0x33, 0x44]);
        assert_eq!(read(&mut d, LATCH + 2, 2), [0x33, 0x44]);
        assert_eq!(read(&mut d, LATCH + 3, 1), [0x44]);
        d.pio_write(LATCH + 1, &0xbbaau16.to_le_bytes());
        assert_eq!(d.latch(), 0x44bb_aa11);
        d.pio_write(LATCH, &[0x99]);
        assert_eq!(d.latch(), 0x44bb_aa99);
        // `outw 0x9999` then `insb`: the emulator test's string-I/O check.
        d.pio_write(LATCH, &0x9999u16.to_le_bytes());
        assert_eq!(read(&mut d, LATCH, 1), [0x99]);
    }

    #[test]
    fn byte_window_shares_the_latch_and_clips_at_its_end() {
        let mut d = PcTestdev::new();
        d.pio_write(LATCH_BYTE, &0xdead_beefu32.to_le_bytes());
        assert_eq!(read(&mut d, LATCH, 4), 0xdead_beefu32.to_le_bytes());
        d.pio_write(LATCH_BYTE + 3, &0x1234u16.to_le_bytes());
        assert_eq!(d.latch(), 0x34ad_beef);
        assert_eq!(read(&mut d, LATCH_BYTE + 2, 4), [0xad, 0x34, 0, 0]);
    }

    #[test]
    fn flush_page_is_a_harmless_no_op() {
        let mut d = PcTestdev::new();
        d.pio_write(LATCH, &7u32.to_le_bytes());
        assert_eq!(
            d.pio_write(FLUSH_PAGE, &0x1234_5678u32.to_le_bytes()),
            BusAction::Continue
        );
        d.pio_write(FLUSH_PAGE, &[1]);
        assert_eq!(read(&mut d, FLUSH_PAGE, 4), [0; 4]);
        assert_eq!(d.latch(), 7);
    }

    #[test]
    fn irq_ports_drive_the_matching_line() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let mut d = TestdevIrq::new(Box::new(move |gsi, level| {
            log.lock().unwrap().push((gsi, level))
        }));
        d.pio_write(0x0e, &[1]);
        d.pio_write(0x0e, &[0]);
        d.pio_write(0x17, &[0x80]);
        d.pio_write(0x00, &[1, 0]); // too wide: ignored, as in QEMU
        let mut b = [0xffu8];
        d.pio_read(0x0e, &mut b);
        assert_eq!(b, [0]);
        assert_eq!(
            *calls.lock().unwrap(),
            vec![(14, true), (14, false), (23, true)]
        );
    }

    #[test]
    fn iomem_reads_back_writes_and_clips_at_the_end() {
        let mut m = TestdevMmio::new().unwrap();
        m.mmio_write(0x1000, &0x0123_4567_89ab_cdefu64.to_le_bytes());
        let mut b = [0u8; 8];
        m.mmio_read(0x1000, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x0123_4567_89ab_cdef);
        // Cross-page access, as in the emulator test.
        m.mmio_write(0xfff, &0x88aau16.to_le_bytes());
        assert_eq!(&m.contents()[0xfff..0x1001], &[0xaa, 0x88]);
        m.mmio_write(TESTDEV_IOMEM_LEN - 2, &[1, 2, 3, 4]);
        let mut b = [0u8; 4];
        m.mmio_read(TESTDEV_IOMEM_LEN - 2, &mut b);
        assert_eq!(b, [1, 2, 0xff, 0xff]);
    }
}
