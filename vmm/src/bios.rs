//! What a PC BIOS leaves behind for the guest it boots, for guests that
//! expect one (kvm-unit-tests' `realmode`, real-mode and protected-mode
//! code that takes the timer interrupt or sends EOIs to the 8259s).
//!
//! With the in-kernel irqchip the VM starts as SeaBIOS (QEMU's BIOS) leaves
//! a `pc` machine:
//!
//! - **8259 PICs**: initialised (ICW1 0x11, ICW4 0x01: edge triggered,
//!   cascaded, 8086 mode, normal EOI); master vectors 0x08-0x0f, slave
//!   0x70-0x77, slave on master IRQ 2. Masks: master 0xfa (IRQ 0 timer and
//!   IRQ 2 cascade open), slave 0xfe (IRQ 8 RTC open); nothing pending or in
//!   service; ELCR 0 (all edge).
//! - **8254 PIT**: channel 0 in mode 2 (rate generator), binary, LSB/MSB
//!   access, count 0 = 65536: IRQ 0 at 1193182 / 65536 = 18.2 Hz; channels
//!   1 and 2 as KVM resets them (gate of channel 2 low).
//! - **LAPIC**: KVM's reset state; the boot vCPU's LINT0 is ExtINT and
//!   unmasked (KVM's LINT0_REENABLED quirk), so the PIC reaches it.
//! - **Real-mode IVT** (0x0000-0x03ff) pointing into a few bytes of handler
//!   code at F000:0000 (0xf0000): vector 0x08 (IRQ 0) adds one to the BIOS
//!   tick count at 0040:006c and sends EOI to the master; 0x09-0x0f EOI the
//!   master; 0x70-0x77 EOI slave and master; every other vector is a bare
//!   `iret`. There are no BIOS services (`int 0x10`, `int 0x13`... return
//!   at once with nothing done).
//!
//! The image is loaded after the IVT is written, so a guest loaded over it
//! wins.

use kvm_bindings::{kvm_irqchip, kvm_pic_state, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Vector base of the master 8259 (IRQ 0-7), as every PC BIOS sets it.
pub const MASTER_VECTOR_BASE: u8 = 0x08;
/// Vector base of the slave 8259 (IRQ 8-15).
pub const SLAVE_VECTOR_BASE: u8 = 0x70;
/// Interrupt masks as SeaBIOS leaves them (timer, cascade, RTC open).
pub const MASTER_IMR: u8 = 0xfa;
pub const SLAVE_IMR: u8 = 0xfe;
/// The PIT's input clock and channel 0's BIOS count (0 means 65536).
pub const PIT_HZ: u32 = 1_193_182;
pub const PIT_BIOS_COUNT: u32 = 0x1_0000;
/// Mode 2, rate generator (SeaBIOS's `pit_setup`).
const PIT_MODE_RATE_GENERATOR: u8 = 2;
/// Read/write LSB then MSB (KVM's RW_STATE_WORD0).
const PIT_RW_WORD: u8 = 3;
/// Where the handler code lives: F000:0000.
pub const BIOS_CODE_SEGMENT: u16 = 0xf000;
pub const BIOS_CODE_ADDR: u64 = 0xf_0000;
/// The BIOS data area's timer tick count (0040:006c).
pub const BDA_TICKS: u64 = 0x46c;

/// KVM's ELCR write masks (IRQ 0-2 and 8, 13 are always edge).
const MASTER_ELCR_MASK: u8 = 0xf8;
const SLAVE_ELCR_MASK: u8 = 0xde;

/// Offsets of the handlers in [`HANDLERS`].
const DEFAULT_HANDLER: u16 = 0x00;
const MASTER_HANDLER: u16 = 0x10;
const SLAVE_HANDLER: u16 = 0x20;
const TIMER_HANDLER: u16 = 0x30;

/// The real-mode handlers (16-bit code), each at its offset, padded with
/// `int3`.
#[rustfmt::skip]
const HANDLERS: [u8; 0x48] = [
    // 0x00: any vector without a device behind it.
    0xcf,                               // iret
    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
    // 0x10: IRQ 1-7: EOI to the master.
    0x50,                               // push ax
    0xb0, 0x20,                         // mov al, 0x20 (non-specific EOI)
    0xe6, 0x20,                         // out 0x20, al
    0x58,                               // pop ax
    0xcf,                               // iret
    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
    // 0x20: IRQ 8-15: EOI to the slave, then to the master (cascade).
    0x50,                               // push ax
    0xb0, 0x20,                         // mov al, 0x20
    0xe6, 0xa0,                         // out 0xa0, al
    0xe6, 0x20,                         // out 0x20, al
    0x58,                               // pop ax
    0xcf,                               // iret
    0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
    // 0x30: IRQ 0: count the tick in the BDA, EOI to the master.
    0x1e,                               // push ds
    0x50,                               // push ax
    0x31, 0xc0,                         // xor ax, ax
    0x8e, 0xd8,                         // mov ds, ax
    0x66, 0x83, 0x06, 0x6c, 0x04, 0x01, // add dword [0x46c], 1
    0xb0, 0x20,                         // mov al, 0x20
    0xe6, 0x20,                         // out 0x20, al
    0x58,                               // pop ax
    0x1f,                               // pop ds
    0xcf,                               // iret
    0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
];

#[derive(Debug, thiserror::Error)]
pub enum BiosError {
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("writing the real-mode IVT and handlers: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The 8259 state after SeaBIOS's `pic_setup` and `enable_hwirq` calls.
fn pic_state(vector_base: u8, imr: u8, elcr_mask: u8) -> kvm_pic_state {
    kvm_pic_state {
        imr,
        irq_base: vector_base,
        // ICW4 was sent (8086 mode); initialisation is complete.
        init4: 1,
        init_state: 0,
        elcr_mask,
        ..Default::default()
    }
}

/// Programs the in-kernel PICs and PIT as a BIOS leaves them.
pub fn program_irqchip(vm: &VmFd) -> Result<(), BiosError> {
    for (chip_id, pic) in [
        (
            KVM_IRQCHIP_PIC_MASTER,
            pic_state(MASTER_VECTOR_BASE, MASTER_IMR, MASTER_ELCR_MASK),
        ),
        (
            KVM_IRQCHIP_PIC_SLAVE,
            pic_state(SLAVE_VECTOR_BASE, SLAVE_IMR, SLAVE_ELCR_MASK),
        ),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = pic;
        vm.set_irqchip(&chip)
            .map_err(|e| BiosError::Ioctl("KVM_SET_IRQCHIP", e))?;
    }
    let mut pit = vm
        .get_pit2()
        .map_err(|e| BiosError::Ioctl("KVM_GET_PIT2", e))?;
    let ch0 = &mut pit.channels[0];
    // KVM loads count 0 as 65536 and starts the periodic timer.
    ch0.count = 0;
    ch0.mode = PIT_MODE_RATE_GENERATOR;
    ch0.rw_mode = PIT_RW_WORD;
    ch0.read_state = PIT_RW_WORD;
    ch0.write_state = PIT_RW_WORD;
    ch0.bcd = 0;
    ch0.gate = 1;
    vm.set_pit2(&pit)
        .map_err(|e| BiosError::Ioctl("KVM_SET_PIT2", e))?;
    Ok(())
}

/// The real-mode IVT: 256 far pointers into the handler code.
pub fn ivt() -> [u8; 1024] {
    let mut t = [0u8; 1024];
    for (vector, entry) in t.chunks_exact_mut(4).enumerate() {
        let offset = match vector as u8 {
            v if v == MASTER_VECTOR_BASE => TIMER_HANDLER,
            v if (MASTER_VECTOR_BASE + 1..MASTER_VECTOR_BASE + 8).contains(&v) => MASTER_HANDLER,
            v if (SLAVE_VECTOR_BASE..SLAVE_VECTOR_BASE + 8).contains(&v) => SLAVE_HANDLER,
            _ => DEFAULT_HANDLER,
        };
        entry[..2].copy_from_slice(&offset.to_le_bytes());
        entry[2..].copy_from_slice(&BIOS_CODE_SEGMENT.to_le_bytes());
    }
    t
}

/// Writes the IVT and its handler code.
pub fn write_real_mode_vectors(mem: &GuestMemoryMmap) -> Result<(), BiosError> {
    mem.write_slice(&ivt(), GuestAddress(0))?;
    mem.write_slice(&HANDLERS, GuestAddress(BIOS_CODE_ADDR))?;
    Ok(())
}

/// Channel 0's interrupt rate in millihertz (for the README's numbers).
pub const fn timer_millihertz() -> u32 {
    ((PIT_HZ as u64 * 1000) / PIT_BIOS_COUNT as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn mnemonics(at: u16) -> Vec<Mnemonic> {
        let code = &HANDLERS[usize::from(at)..];
        let mut d = Decoder::with_ip(16, code, u64::from(at), DecoderOptions::NONE);
        let mut v = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            v.push(i.mnemonic());
            if i.mnemonic() == Mnemonic::Iret {
                break;
            }
        }
        v
    }

    #[test]
    fn handlers_eoi_and_return() {
        use Mnemonic::*;
        assert_eq!(mnemonics(DEFAULT_HANDLER), [Iret]);
        assert_eq!(mnemonics(MASTER_HANDLER), [Push, Mov, Out, Pop, Iret]);
        assert_eq!(mnemonics(SLAVE_HANDLER), [Push, Mov, Out, Out, Pop, Iret]);
        assert_eq!(
            mnemonics(TIMER_HANDLER),
            [Push, Push, Xor, Mov, Add, Mov, Out, Pop, Pop, Iret]
        );
        // The tick count is a dword add at 0x46c.
        let mut d = Decoder::with_ip(
            16,
            &HANDLERS[usize::from(TIMER_HANDLER) + 6..],
            0,
            DecoderOptions::NONE,
        );
        let add = d.decode();
        assert_eq!(add.memory_displacement64(), BDA_TICKS);
        assert_eq!(add.memory_size(), iced_x86::MemorySize::UInt32);
    }

    #[test]
    fn ivt_points_irq_vectors_at_their_handlers() {
        let t = ivt();
        let entry = |v: usize| {
            (
                u16::from_le_bytes([t[v * 4], t[v * 4 + 1]]),
                u16::from_le_bytes([t[v * 4 + 2], t[v * 4 + 3]]),
            )
        };
        assert_eq!(entry(0x08), (TIMER_HANDLER, 0xf000));
        assert_eq!(entry(0x09), (MASTER_HANDLER, 0xf000));
        assert_eq!(entry(0x0f), (MASTER_HANDLER, 0xf000));
        assert_eq!(entry(0x70), (SLAVE_HANDLER, 0xf000));
        assert_eq!(entry(0x77), (SLAVE_HANDLER, 0xf000));
        assert_eq!(entry(0x10), (DEFAULT_HANDLER, 0xf000));
        assert_eq!(entry(0xff), (DEFAULT_HANDLER, 0xf000));
    }

    #[test]
    fn timer_runs_at_the_bios_rate() {
        assert_eq!(timer_millihertz(), 18_206);
    }
}
