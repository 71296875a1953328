//! COM1: an 8250/16550 UART (vm-superio) whose transmitter writes to the
//! VMM's stdout (or a buffer, in tests). vm-superio keeps LSR's
//! transmitter-empty bits set, so polling guests never spin.

use crate::bus::{BusAction, PioDevice};
use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
/// ISA IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// The UART's interrupt line: an irqfd when the VM has an in-kernel
/// irqchip, otherwise nowhere.
pub struct SerialIrq(pub Option<EventFd>);

impl Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match &self.0 {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }
}

pub type SerialOut = Box<dyn Write + Send>;

pub struct SerialPort {
    uart: Serial<SerialIrq, NoEvents, SerialOut>,
}

impl SerialPort {
    pub fn new(irq: SerialIrq, out: SerialOut) -> Self {
        SerialPort {
            uart: Serial::new(irq, out),
        }
    }
}

impl PioDevice for SerialPort {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        // The UART's registers are 8 bits wide; wider reads see the same byte.
        let v = self.uart.read(offset as u8);
        data.fill(v);
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::debug!("serial: {e:?}");
            }
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_reports_empty_transmitter() {
        let sink = Sink::default();
        let mut s = SerialPort::new(SerialIrq(None), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.pio_write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        s.pio_read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THRE and TEMT set");
    }
}
