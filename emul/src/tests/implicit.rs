//! Masked implicit stores (`emulator/implicit.rs`) against the CPU.

use super::*;

/// MASKMOVDQU and MASKMOVQ store the bytes whose mask byte has its top bit
/// set at DS:rDI, the same bytes the CPU stores (checked natively on host
/// memory), and touch no page that holds no selected byte.
#[test]
fn masked_implicit_stores_match_the_cpu() {
    let data: [u8; 16] = core::array::from_fn(|i| 0xa0 + i as u8);
    let mask: [u8; 16] = [
        0x80, 0, 0xff, 0x7f, 0, 0, 0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0x80,
    ];
    let mut native = [0x11u8; 16];
    let mut native_q = [0x11u8; 8];
    // SAFETY: MASKMOVDQU/MASKMOVQ store into `native`/`native_q` (16 and
    // 8 bytes at RDI); xmm1, xmm2, mm1, mm2 are scratch.
    unsafe {
        core::arch::asm!(
            "movdqu xmm1, [{d}]",
            "movdqu xmm2, [{m}]",
            "maskmovdqu xmm1, xmm2",
            "mov rdi, {q}",
            "movq mm1, [{d}]",
            "movq mm2, [{m}]",
            "maskmovq mm1, mm2",
            "emms",
            d = in(reg) data.as_ptr(),
            m = in(reg) mask.as_ptr(),
            q = in(reg) native_q.as_mut_ptr(),
            inout("rdi") native.as_mut_ptr() => _,
            out("xmm1") _, out("xmm2") _,
        );
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = XsaveImage::new();
    img.bytes[176..192].copy_from_slice(&data);
    img.bytes[192..208].copy_from_slice(&mask);
    img.bytes[32 + 16..32 + 24].copy_from_slice(&data[..8]); // mm1
    img.bytes[32 + 32..32 + 40].copy_from_slice(&mask[..8]); // mm2
    img.bytes[512] = 0b11;
    mem.mmio[0x20..0x40].fill(0x11);
    cpu.gprs.rdi = MMIO_BASE + 0x20;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.maskmovdqu(xmm1, xmm2)),
        &mut img,
        &mut mem,
    ));
    assert_eq!(mem.mmio[0x20..0x30], native);
    assert_eq!(cpu.gprs.rdi, MMIO_BASE + 0x20, "RDI as the guest had it");
    cpu.rip = CODE;
    cpu.gprs.rdi = MMIO_BASE + 0x30;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.maskmovq(mm1, mm2)),
        &mut img,
        &mut mem,
    ));
    assert_eq!(mem.mmio[0x30..0x38], native_q);
    // Only byte 15 selected, bytes 0-7 on a missing page: MASKMOVDQU
    // faults there anyway on the CPUs measured (masked_native: AMD Zen 3
    // and Intel Sapphire Rapids fault with an all-zero mask), at its first
    // byte; a CPU that suppressed it would store byte 15.
    let missing = 0x7f_0000u64;
    mem.map(CR3, 4, missing + 0x1000, missing + 0x1000, RW);
    let mut only_last = [0u8; 16];
    only_last[15] = 0x80;
    img.bytes[192..208].copy_from_slice(&only_last);
    cpu.rip = CODE;
    cpu.gprs.rdi = missing + 0xff8;
    let o = e.emulate(
        &mut cpu,
        &asm64(|a| a.maskmovdqu(xmm1, xmm2)),
        &mut img,
        &mut mem,
    );
    let shape = crate::stub::shape::HostShape::host(&mut crate::stub::StubBuf::new(true).unwrap());
    if shape.maskmovdqu_unmasked_fault.is_some() {
        assert_eq!(
            o,
            Outcome::Exception {
                vector: VEC_PF,
                error_code: Some(PFEC_W),
                cr2: Some(missing + 0xff8)
            }
        );
        assert_ne!(mem.ram[(missing + 0x1007) as usize], data[15]);
    } else {
        done(&o);
        assert_eq!(mem.ram[(missing + 0x1007) as usize], data[15]);
    }
}
