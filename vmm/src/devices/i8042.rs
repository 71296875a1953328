//! The i8042 keyboard controller, only for its CPU-reset command (0xFE to
//! port 0x64), which guests use to reboot. vm-superio decodes the command.

use super::LatchTrigger;
use crate::bus::{BusAction, PioDevice, StopReason};
use vm_superio::I8042Device;

/// Data port; the command/status port is at offset 4 (0x64).
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

pub struct I8042 {
    dev: I8042Device<LatchTrigger>,
    reset: LatchTrigger,
}

impl Default for I8042 {
    fn default() -> Self {
        let reset = LatchTrigger::default();
        I8042 {
            dev: I8042Device::new(reset.clone()),
            reset,
        }
    }
}

impl PioDevice for I8042 {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so polling
        // guests never wait.
        let v = self.dev.read(offset as u8);
        data.fill(v);
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        let Some(&value) = data.first() else {
            return BusAction::Continue;
        };
        // The trigger's error type is Infallible.
        let _ = self.dev.write(offset as u8, value);
        if self.reset.take() {
            BusAction::Stop {
                status: 0,
                reason: StopReason::I8042Reset,
            }
        } else {
            BusAction::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_with_zero() {
        let mut d = I8042::default();
        assert_eq!(d.pio_write(4, &[0xd1]), BusAction::Continue);
        assert_eq!(d.pio_write(0, &[0xfe]), BusAction::Continue);
        assert_eq!(
            d.pio_write(4, &[0xfe]),
            BusAction::Stop {
                status: 0,
                reason: StopReason::I8042Reset
            }
        );
    }
}
