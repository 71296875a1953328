//! Gathers (`emulator/gather.rs`) against the CPU, and their partial,
//! restartable faults.

use super::*;

/// AVX2 gathers against the host CPU: the same indices over the same data
/// (host memory natively, guest RAM and MMIO in the emulator) give the
/// same destination and a cleared mask; each element is its own access.
#[test]
fn avx2_gathers_match_the_cpu() {
    if !is_x86_feature_detected!("avx2") || !avx_ok() {
        eprintln!("skipped: host has no AVX2");
        return;
    }
    let data: Vec<u32> = (0..64).map(|i| 0x1000_0000 + i * 0x0101).collect();
    // Mixed, repeated and negative indices (relative to element 32).
    let idx: [i32; 8] = [0, 5, -3, 7, 7, 31, -32, 2];
    // Mask: elements 1 and 6 off.
    let mask: [u32; 8] = [!0, 0, !0, !0, !0, !0, 0, !0];
    let mut native_dest = [0xdead_beefu32; 8];
    let mut native_mask = mask;
    // SAFETY: the gather reads data[32 + idx[i]] for 0 <= 32 + idx < 64,
    // all inside `data`; ymm1-3 are scratch (declared clobbered).
    unsafe {
        core::arch::asm!(
            "vmovdqu ymm1, [{d}]",
            "vmovdqu ymm2, [{m}]",
            "vmovdqu ymm3, [{i}]",
            "vpgatherdd ymm1, [{b} + ymm3 * 4], ymm2",
            "vmovdqu [{d}], ymm1",
            "vmovdqu [{m}], ymm2",
            d = in(reg) native_dest.as_mut_ptr(),
            m = in(reg) native_mask.as_mut_ptr(),
            i = in(reg) idx.as_ptr(),
            b = in(reg) data.as_ptr().add(32),
            out("ymm1") _, out("ymm2") _, out("ymm3") _,
        );
    }
    let ymm_hi = core::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize;
    for base in [DATA, MMIO_BASE] {
        let (mut cpu, mut mem) = setup();
        let mut e = emul();
        for (i, v) in data.iter().enumerate() {
            let at = base + 4 * i as u64;
            if base == DATA {
                mem.set_u32(at, *v);
            } else {
                mem.mmio[(at - MMIO_BASE) as usize..][..4].copy_from_slice(&v.to_le_bytes());
            }
        }
        let mut img = XsaveImage::new();
        let put = |img: &mut XsaveImage, reg: usize, bytes: &[u8]| {
            img.bytes[160 + 16 * reg..176 + 16 * reg].copy_from_slice(&bytes[..16]);
            img.bytes[ymm_hi + 16 * reg..ymm_hi + 16 * reg + 16].copy_from_slice(&bytes[16..32]);
        };
        let as_bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        put(&mut img, 1, &as_bytes(&[0xdead_beef; 8]));
        put(&mut img, 2, &as_bytes(&mask));
        put(
            &mut img,
            3,
            &idx.iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        img.bytes[512] = 0b111;
        cpu.gprs.rbx = base + 32 * 4;
        let code = asm64(|a| a.vpgatherdd_3(ymm1, ptr(rbx + ymm3 * 4), ymm2));
        mem.log.clear();
        done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
        let get = |img: &XsaveImage, reg: usize| -> Vec<u32> {
            let mut b = img.bytes[160 + 16 * reg..176 + 16 * reg].to_vec();
            b.extend_from_slice(&img.bytes[ymm_hi + 16 * reg..ymm_hi + 16 * reg + 16]);
            b.chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert_eq!(get(&img, 1), native_dest, "destination, base {base:#x}");
        assert_eq!(get(&img, 2), native_mask, "mask, base {base:#x}");
        let reads: Vec<_> = mem
            .log
            .iter()
            .filter(|l| l.1 >= base && l.1 < base + 256)
            .collect();
        assert_eq!(reads.len(), 6, "one access per selected element: {reads:?}");
    }
}

/// A gather whose third element faults: the first two completed (their
/// mask elements cleared), the rest as before, and the #PF names the
/// element's address (the measurement in gather.rs's module comment).
/// Destination equal to the mask register is #UD.
#[test]
fn gather_fault_is_partial_and_restartable() {
    if !is_x86_feature_detected!("avx2") || !avx_ok() {
        eprintln!("skipped: host has no AVX2");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let missing = 0x7f_0000u64;
    mem.map(CR3, 4, missing - 0x1000, missing - 0x1000, RW);
    for i in 0..8 {
        mem.set_u32(missing - 0x100 + 4 * i, 0x100 + i as u32);
    }
    let mut img = XsaveImage::new();
    img.bytes[160 + 16..160 + 32].fill(0xff); // xmm1 destination
    img.bytes[160 + 32..160 + 48].fill(0xff); // xmm2 mask: all on
    for (i, x) in [0i32, 1, 64, 3].iter().enumerate() {
        img.bytes[160 + 48 + 4 * i..160 + 52 + 4 * i].copy_from_slice(&x.to_le_bytes());
    }
    img.bytes[512] = 0b11;
    cpu.gprs.rbx = missing - 0x100;
    let code = asm64(|a| a.vpgatherdd_3(xmm1, ptr(rbx + xmm3 * 4), xmm2));
    let o = e.emulate(&mut cpu, &code, &mut img, &mut mem);
    assert_eq!(exc(&o), (VEC_PF, Some(0)));
    let words = |img: &XsaveImage, reg: usize| -> Vec<u32> {
        img.bytes[160 + 16 * reg..176 + 16 * reg]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(words(&img, 1), [0x100, 0x101, !0, !0]);
    assert_eq!(words(&img, 2), [0, 0, !0, !0]);
    assert_eq!(cpu.rip, CODE);
    let code = asm64(|a| a.vpgatherdd_3(xmm1, ptr(rbx + xmm3 * 4), xmm1));
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
        (VEC_UD, None)
    );
}
