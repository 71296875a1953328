//! QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`: a write of V ends the VM and
//! the process exits with status `(V << 1) | 1`.

use crate::bus::{BusAction, PioDevice, StopReason};

pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const DEBUG_EXIT_LEN: u16 = 4;

#[derive(Default)]
pub struct DebugExit;

impl PioDevice for DebugExit {
    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        // QEMU's device reads as all-ones too.
        data.fill(0xff);
    }

    fn pio_write(&mut self, _offset: u16, data: &[u8]) -> BusAction {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        BusAction::Stop {
            // A process status keeps only the low 8 bits (QEMU's too): the
            // status reported is the one the process returns.
            status: ((value << 1) | 1) as i32 & 0xff,
            reason: StopReason::DebugExit { value },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_value_shifted_with_low_bit_set() {
        let mut d = DebugExit;
        for (data, want) in [
            (&[0u8][..], 1),
            (&[1], 3),
            (&[0x10, 0], 0x21),
            (&[3, 0, 0, 0], 7),
            // 0x87 << 1 | 1 = 0x10f: the process exits with 0x0f.
            (&[0x87, 0, 0, 0], 0x0f),
        ] {
            match d.pio_write(0, data) {
                BusAction::Stop { status, .. } => assert_eq!(status, want),
                other => panic!("{other:?}"),
            }
        }
    }
}
