//! QEMU's fw_cfg on its legacy I/O ports, the way kvm-unit-tests' `fwcfg.c`
//! reads it: a 16-bit `out` of a key to 0x510 selects an item and rewinds it,
//! then each 8-bit `in` from 0x511 returns the item's next byte. Bytes past the
//! end of an item, and every byte of a key with no item, read as zero (QEMU's
//! behaviour for unknown keys).
//!
//! kvm-unit-tests reads `FW_CFG_NB_CPUS` (u16, `cpu_count()`/`smp_init`) and
//! `FW_CFG_RAM_SIZE` (u64, `setup_vm`, the VMX/SVM tests' EPT/NPT set-up);
//! older releases also read a `FW_CFG_MAX_RAM` key that QEMU never had, where
//! zero means "no limit". Environment overrides (`NR_CPUS`, `MEMSIZE`) win over
//! the device when set. No DMA interface (0x514): `FW_CFG_ID` says so.

use crate::bus::{BusAction, PioDevice};
use std::collections::BTreeMap;

/// Selector (offset 0, 16-bit write) and data (offset 1, 8-bit read).
pub const FW_CFG_PORT: u16 = 0x510;
pub const FW_CFG_LEN: u16 = 2;

pub const FW_CFG_SIGNATURE: u16 = 0x0000;
pub const FW_CFG_ID: u16 = 0x0001;
pub const FW_CFG_RAM_SIZE: u16 = 0x0003;
pub const FW_CFG_NB_CPUS: u16 = 0x0005;
pub const FW_CFG_MAX_CPUS: u16 = 0x000f;
/// Keys with this bit set live in the architecture's own table.
pub const FW_CFG_ARCH_LOCAL: u16 = 0x8000;
/// Set by guests that mean to write; it does not change which item is chosen.
pub const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;
/// Nonzero when ISA IRQ 0 is wired to GSI 2 (our MADT says so).
pub const FW_CFG_IRQ0_OVERRIDE: u16 = FW_CFG_ARCH_LOCAL + 2;

/// `FW_CFG_ID` bit 0: the traditional (port) interface. Bit 1 (DMA) stays
/// clear so firmware never tries the DMA port.
const FW_CFG_VERSION_TRADITIONAL: u32 = 1;

pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    /// The selected item's key (write-channel bit stripped).
    selected: u16,
    /// Next byte of the selected item to read.
    pos: usize,
}

impl FwCfg {
    /// Items for a VM with `ram_size` bytes of RAM and `nb_cpus` vCPUs.
    pub fn new(ram_size: u64, nb_cpus: u16) -> Self {
        let mut items = BTreeMap::new();
        items.insert(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        items.insert(FW_CFG_ID, FW_CFG_VERSION_TRADITIONAL.to_le_bytes().to_vec());
        items.insert(FW_CFG_RAM_SIZE, ram_size.to_le_bytes().to_vec());
        items.insert(FW_CFG_NB_CPUS, nb_cpus.to_le_bytes().to_vec());
        // No CPU hotplug: every possible CPU is present from the start.
        items.insert(FW_CFG_MAX_CPUS, nb_cpus.to_le_bytes().to_vec());
        items.insert(FW_CFG_IRQ0_OVERRIDE, 1u32.to_le_bytes().to_vec());
        FwCfg {
            items,
            // QEMU selects the signature at reset.
            selected: FW_CFG_SIGNATURE,
            pos: 0,
        }
    }

    fn select(&mut self, key: u16) {
        self.selected = key & !FW_CFG_WRITE_CHANNEL;
        self.pos = 0;
    }

    fn next_byte(&mut self) -> u8 {
        let b = self
            .items
            .get(&self.selected)
            .and_then(|item| item.get(self.pos))
            .copied()
            .unwrap_or(0);
        // Saturating: a guest can read forever without the cursor wrapping
        // back into the item.
        self.pos = self.pos.saturating_add(1);
        b
    }
}

impl PioDevice for FwCfg {
    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        // QEMU's combined port returns a data byte at either offset. It
        // rejects wider reads; streaming the next bytes instead is harmless.
        for b in data.iter_mut() {
            *b = self.next_byte();
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        match (offset, data) {
            (0, &[lo, hi]) => self.select(u16::from_le_bytes([lo, hi])),
            // Data-port writes have been ignored by QEMU since 2.4.
            (_, &[_]) => log::debug!("fw_cfg: ignoring data write"),
            _ => log::debug!(
                "fw_cfg: ignoring {}-byte write at offset {offset}",
                data.len()
            ),
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(d: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        d.pio_write(0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                d.pio_read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn items_read_byte_by_byte() {
        let mut d = FwCfg::new(0x1_2345_6000, 3);
        assert_eq!(read_item(&mut d, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, FW_CFG_ID, 4), [1, 0, 0, 0]);
        assert_eq!(
            read_item(&mut d, FW_CFG_RAM_SIZE, 8),
            0x1_2345_6000u64.to_le_bytes()
        );
        assert_eq!(read_item(&mut d, FW_CFG_NB_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut d, FW_CFG_MAX_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut d, FW_CFG_IRQ0_OVERRIDE, 4), [1, 0, 0, 0]);
    }

    #[test]
    fn selecting_rewinds_and_reads_past_the_end_are_zero() {
        let mut d = FwCfg::new(0, 1);
        assert_eq!(read_item(&mut d, FW_CFG_SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_item(&mut d, FW_CFG_SIGNATURE, 2), b"QE");
        // The write-channel bit does not change the item.
        assert_eq!(
            read_item(&mut d, FW_CFG_SIGNATURE | FW_CFG_WRITE_CHANNEL, 1),
            b"Q"
        );
    }

    #[test]
    fn unknown_keys_read_zeros() {
        let mut d = FwCfg::new(1 << 30, 2);
        // FW_CFG_NUMA, FW_CFG_UUID, an arch-local key we lack, and 0xffff.
        for key in [0x000d, 0x0002, FW_CFG_ARCH_LOCAL, 0xffff] {
            assert_eq!(read_item(&mut d, key, 8), [0; 8], "{key:#x}");
        }
    }

    #[test]
    fn selector_needs_a_16_bit_write_and_the_signature_is_selected_at_reset() {
        let mut d = FwCfg::new(0, 1);
        let mut b = [0u8; 2];
        d.pio_read(1, &mut b);
        assert_eq!(&b, b"QE");
        d.pio_write(0, &[FW_CFG_NB_CPUS as u8]);
        d.pio_write(0, &u32::from(FW_CFG_NB_CPUS).to_le_bytes());
        d.pio_read(0, &mut b);
        assert_eq!(&b, b"MU", "narrow and wide selector writes are ignored");
    }
}
