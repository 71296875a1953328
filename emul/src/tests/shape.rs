//! Vendor shapes (`stub/shape.rs`): Intel's measurements replayed with
//! Intel's shape on any host, and x87 pointer recording.

use super::*;

/// Intel's shape, as the probes find it on Sapphire/Emerald Rapids.
fn intel_shape() -> crate::stub::shape::HostShape {
    crate::stub::shape::HostShape {
        split_store_cr2_last: true,
        maskmovdqu_unmasked_fault: Some(8),
        // Not measured on Intel.
        maskmovq_unmasked_fault: None,
        gather_mask_normalized: true,
        fop_always: false,
        fdp_always: false,
        // Not measured on Intel.
        state_checks: Default::default(),
        // Not measured on Intel.
        lar_keeps_limit_bits: true,
    }
}

/// What masked_native measured on Intel Xeon (Sapphire Rapids, device
/// run of 2026-11-29), replayed with Intel's shape on whatever CPU runs
/// the test: a masked store split across a mapped and a missing page
/// faults at its last selected byte; MASKMOVDQU faults at RDI + 8 whatever
/// its mask; a faulting AVX2 gather leaves its mask normalized.
#[test]
fn intel_measurements_replayed_with_intels_shape() {
    if !is_x86_feature_detected!("avx2") || !avx_ok() {
        eprintln!("skipped: host has no AVX2");
        return;
    }
    let end = DATA + 4 * 0x1000; // first unmapped page
    let image = |regs: &[(usize, [u32; 4])]| {
        let mut img = XsaveImage::new();
        for (r, d) in regs {
            for (i, v) in d.iter().enumerate() {
                img.bytes[160 + 16 * r + 4 * i..164 + 16 * r + 4 * i]
                    .copy_from_slice(&v.to_le_bytes());
            }
        }
        img.bytes[512] = 0b111;
        img
    };
    // vmaskmovps [end-8], xmm1 (mask), xmm2: elements 0 and 2 selected ->
    // CR2 end+3 (Intel), all four -> end+7.
    for (mask, want) in [([!0u32, 0, !0, 0], end + 3), ([!0u32; 4], end + 7)] {
        let (mut cpu, mut mem) = setup();
        let mut e = emul();
        e.set_host_shape(intel_shape());
        cpu.gprs.rbp = end - 8;
        let mut img = image(&[(1, mask), (2, [1, 2, 3, 4])]);
        let o = e.emulate(
            &mut cpu,
            &asm64(|a| a.vmaskmovps(ptr(rbp), xmm1, xmm2)),
            &mut img,
            &mut mem,
        );
        assert_eq!(
            o,
            Outcome::Exception {
                vector: VEC_PF,
                error_code: Some(PFEC_W),
                cr2: Some(want)
            },
            "mask {mask:x?}"
        );
    }
    // maskmovdqu xmm1, xmm2 with an all-zero mask at the missing page.
    {
        let (mut cpu, mut mem) = setup();
        let mut e = emul();
        e.set_host_shape(intel_shape());
        cpu.gprs.rdi = end;
        let mut img = image(&[(1, [1, 2, 3, 4])]);
        let o = e.emulate(
            &mut cpu,
            &asm64(|a| a.maskmovdqu(xmm1, xmm2)),
            &mut img,
            &mut mem,
        );
        assert_eq!(
            o,
            Outcome::Exception {
                vector: VEC_PF,
                error_code: Some(PFEC_W),
                cr2: Some(end + 8)
            }
        );
    }
    // vpgatherdd xmm1, [rbp+xmm0], xmm2 with the diff test's indices
    // (element 0 at +52, 1 at +8, 2 at +44, 3 at +20) and rbp = end - 32:
    // elements 0 and 2 are on the missing page. Mask 0x1 leaves
    // [ffffffff, 0, 0, 0]; mask 0x5 (elements 0, 2) [ffffffff, 0, ffffffff, 0].
    let (sel, other) = (0x8000_0091u32, 0x7f26_2626u32);
    for (mask, after) in [
        ([sel, other, other, other], [!0u32, 0, 0, 0]),
        ([sel, other, sel, other], [!0u32, 0, !0, 0]),
    ] {
        let (mut cpu, mut mem) = setup();
        let mut e = emul();
        e.set_host_shape(intel_shape());
        cpu.gprs.rbp = end - 32;
        let mut img = image(&[(0, [52, 8, 44, 20]), (1, [0; 4]), (2, mask)]);
        let o = e.emulate(
            &mut cpu,
            &asm64(|a| a.vpgatherdd_3(xmm1, ptr(rbp + xmm0), xmm2)),
            &mut img,
            &mut mem,
        );
        assert_eq!(exc(&o).0, VEC_PF);
        let got: Vec<u32> = (0..4)
            .map(|i| u32::from_le_bytes(img.bytes[192 + 4 * i..196 + 4 * i].try_into().unwrap()))
            .collect();
        assert_eq!(got, after, "mask {mask:x?}");
    }
}

/// Intel records FOP and FDP only for an x87 instruction that raises an
/// unmasked exception (differential test on Sapphire Rapids: after `fld
/// dword [rbp]` FOP and FDP still hold the earlier values); FIP always.
#[test]
fn x87_pointers_follow_the_hosts_recording() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    e.set_host_shape(intel_shape());
    let mut img = XsaveImage::new();
    img.bytes[6..8].copy_from_slice(&0x555u16.to_le_bytes()); // FOP
    img.bytes[16..24].copy_from_slice(&0x1234u64.to_le_bytes()); // FDP
    img.bytes[512] = 0b11;
    mem.ram[DATA as usize..DATA as usize + 4].copy_from_slice(&1.5f32.to_bits().to_le_bytes());
    cpu.gprs.rbp = DATA;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.fld(dword_ptr(rbp))),
        &mut img,
        &mut mem,
    ));
    let word = |off: usize| u64::from_le_bytes(img.bytes[off..off + 8].try_into().unwrap());
    assert_eq!(word(8), CODE, "FIP is the guest's RIP");
    assert_eq!(
        u16::from_le_bytes([img.bytes[6], img.bytes[7]]),
        0x555,
        "FOP kept"
    );
    assert_eq!(word(16), 0x1234, "FDP kept");
    // AMD's shape (always recorded): the instruction's own.
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    e.set_host_shape(crate::stub::shape::HostShape::default());
    let mut img2 = XsaveImage::new();
    img2.bytes[512] = 0b11;
    mem.ram[DATA as usize..DATA as usize + 4].copy_from_slice(&1.5f32.to_bits().to_le_bytes());
    cpu.gprs.rbp = DATA;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.fld(dword_ptr(rbp))),
        &mut img2,
        &mut mem,
    ));
    assert_eq!(
        u16::from_le_bytes([img2.bytes[6], img2.bytes[7]]),
        0x145,
        "FOP of d9 45"
    );
    assert_eq!(
        u64::from_le_bytes(img2.bytes[16..24].try_into().unwrap()),
        DATA
    );
}

/// The mask-to-element rules, on facts masked_native measured on Intel
/// Xeon (Sapphire Rapids, 2026-11-29): pure functions of the instruction
/// and the image, so they run on any host.
#[test]
fn selection_rules_match_the_intel_measurements() {
    use crate::writeback::{element_mask, masked_store, ElementMask, XsaveLayout};
    let layout = XsaveLayout {
        ymm_hi128: 576,
        opmask: 1088,
        zmm_hi256: 1152,
        hi16_zmm: 1664,
    };
    let image_with_k1 = |kv: u64| {
        let mut img = vec![0u8; 4096];
        img[512] = 0xe7;
        img[1088 + 8..1088 + 16].copy_from_slice(&kv.to_le_bytes());
        img
    };
    let decode = |bytes: Vec<u8>| iced_x86::Decoder::new(64, &bytes, 0).decode();
    // EVEX encodings even where VEX would do (the masks need them).
    let asm64 = |f: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>| {
        let mut a = CodeAssembler::new(64).unwrap();
        a.set_prefer_vex(false);
        f(&mut a).unwrap();
        a.assemble(0).unwrap()
    };
    let mask = |code: Vec<u8>, kv: u64| element_mask(&decode(code), &image_with_k1(kv), layout);
    // No suppression: VINSERTF32X4 and a broadcast VUNPCKLPS fault with k1 = 0.
    assert_eq!(
        mask(
            asm64(&|a| a.vinsertf32x4(ymm1.k1(), ymm2, ptr(rbp), 0x1b)),
            0
        ),
        None
    );
    assert_eq!(
        mask(asm64(&|a| a.vunpcklps(xmm1.k1(), xmm2, dword_bcst(rbp))), 0),
        None
    );
    // VPMULUDQ: mask bit 1 is the second qword (dwords 2 and 3): at 8 bytes
    // before a missing page it faults.
    assert_eq!(
        mask(asm64(&|a| a.vpmuludq(xmm1.k1(), xmm2, ptr(rbp))), 0x2),
        Some(ElementMask {
            element_size: 4,
            bits: 0b1100
        })
    );
    // VPSHUFBITQMB: mask bit 1 is byte 1 (CR2 at +1).
    assert_eq!(
        mask(asm64(&|a| a.vpshufbitqmb(k2.k1(), xmm1, ptr(rbp))), 0x2),
        Some(ElementMask {
            element_size: 1,
            bits: 0b10
        })
    );
    // A {1to4} broadcast reads nothing when only bit 4 is set.
    assert_eq!(
        mask(asm64(&|a| a.vaddps(xmm1.k1(), xmm2, dword_bcst(rbp))), 0x10),
        Some(ElementMask {
            element_size: 4,
            bits: 0
        })
    );
    // A complex FP16 scalar is one 32-bit element: bit 0 covers both halves.
    assert_eq!(
        mask(
            asm64(&|a| a.vfmaddcsh(xmm1.k1(), xmm2, dword_ptr(rbp))),
            0x1
        ),
        Some(ElementMask {
            element_size: 2,
            bits: 0b11
        })
    );
    // Expand loads read popcount(k) elements from the start.
    assert_eq!(
        mask(asm64(&|a| a.vexpandps(xmm1.k1(), ptr(rbp))), 0b1010),
        Some(ElementMask {
            element_size: 4,
            bits: 0b11
        })
    );
    // An extract walks its whole operand, yet stores only selected elements.
    let extract = decode(asm64(&|a| a.vextractf32x4(ptr(rbp).k1(), ymm1, 1)));
    assert_eq!(element_mask(&extract, &image_with_k1(0b0101), layout), None);
    assert_eq!(
        masked_store(&extract, &image_with_k1(0b0101), layout),
        Some(ElementMask {
            element_size: 4,
            bits: 0b0101
        })
    );
}
