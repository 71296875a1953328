//! Vector and opmask registers read from and written to a guest XSAVE
//! image (standard format, host offsets), honouring XSTATE_BV: a component
//! whose bit is clear is in its initial state (zero) whatever its bytes
//! hold, and writing non-zero bytes to it sets the bit.

use iced_x86::Register;

use crate::stub::XSAVE_HEADER_OFFSET;
use crate::writeback::XsaveLayout;

const XMM0_OFFSET: usize = 160;
const BV_SSE: u64 = 1 << 1;
const BV_AVX: u64 = 1 << 2;
const BV_OPMASK: u64 = 1 << 5;
const BV_ZMM_HI256: u64 = 1 << 6;
const BV_HI16_ZMM: u64 = 1 << 7;

fn xstate_bv(image: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&image[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8]);
    u64::from_le_bytes(b)
}

/// Marks component `bit` present; when it was in its initial state its
/// area is zeroed first, so stale bytes never become register contents.
fn set_xstate_bv(image: &mut [u8], layout: XsaveLayout, bit: u64) {
    let bv = xstate_bv(image);
    if bv & bit != 0 {
        return;
    }
    let area = match bit {
        BV_SSE => Some((XMM0_OFFSET, 256)),
        BV_AVX => Some((layout.ymm_hi128, 256)),
        BV_OPMASK => Some((layout.opmask, 64)),
        BV_ZMM_HI256 => Some((layout.zmm_hi256, 512)),
        BV_HI16_ZMM => Some((layout.hi16_zmm, 1024)),
        _ => None,
    };
    if let Some(dst) = area.and_then(|(off, len)| image.get_mut(off..off + len)) {
        dst.fill(0);
    }
    image[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8].copy_from_slice(&(bv | bit).to_le_bytes());
}

/// The pieces of a vector register's 64 bytes in the image: (offset in the
/// register, image offset, length, XSTATE_BV bit). Pieces the host does not
/// have (no AVX-512: offset 0) are left out.
fn pieces(layout: XsaveLayout, reg: Register) -> [(usize, usize, usize, u64); 3] {
    let n = reg.number();
    let none = (0, 0, 0, 0);
    if n >= 16 {
        if layout.hi16_zmm == 0 {
            return [none; 3];
        }
        return [
            (0, layout.hi16_zmm + 64 * (n - 16), 64, BV_HI16_ZMM),
            none,
            none,
        ];
    }
    let ymm = (16, layout.ymm_hi128 + 16 * n, 16, BV_AVX);
    let zmm = if layout.zmm_hi256 != 0 {
        (32, layout.zmm_hi256 + 32 * n, 32, BV_ZMM_HI256)
    } else {
        none
    };
    [(0, XMM0_OFFSET + 16 * n, 16, BV_SSE), ymm, zmm]
}

/// The 64 bytes of vector register `reg` (XMM/YMM/ZMM n: the whole ZMM n;
/// bytes the host's state does not hold read zero).
pub fn read_vec(image: &[u8], layout: XsaveLayout, reg: Register) -> [u8; 64] {
    let mut out = [0u8; 64];
    let bv = xstate_bv(image);
    for (at, off, len, bit) in pieces(layout, reg) {
        if len != 0 && bv & bit != 0 {
            if let Some(src) = image.get(off..off + len) {
                out[at..at + len].copy_from_slice(src);
            }
        }
    }
    out
}

/// Writes the whole 64 bytes of `reg` (pieces the host lacks are dropped).
pub fn write_vec(image: &mut [u8], layout: XsaveLayout, reg: Register, value: &[u8; 64]) {
    let bv = xstate_bv(image);
    for (at, off, len, bit) in pieces(layout, reg) {
        let src = &value[at..at + len];
        // A component in its initial state stays so when it stays zero.
        if len == 0 || (bv & bit == 0 && src.iter().all(|&b| b == 0)) {
            continue;
        }
        set_xstate_bv(image, layout, bit);
        if let Some(dst) = image.get_mut(off..off + len) {
            dst.copy_from_slice(src);
        }
    }
}

/// Opmask register `k` (K0-K7).
pub fn read_k(image: &[u8], layout: XsaveLayout, k: Register) -> u64 {
    let n = k as usize - Register::K0 as usize;
    if xstate_bv(image) & BV_OPMASK == 0 || layout.opmask == 0 {
        return 0;
    }
    let off = layout.opmask + 8 * n;
    let mut b = [0u8; 8];
    if let Some(src) = image.get(off..off + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// Writes opmask register `k`.
pub fn write_k(image: &mut [u8], layout: XsaveLayout, k: Register, value: u64) {
    let n = k as usize - Register::K0 as usize;
    if layout.opmask == 0 || (xstate_bv(image) & BV_OPMASK == 0 && value == 0) {
        return;
    }
    set_xstate_bv(image, layout, BV_OPMASK);
    let off = layout.opmask + 8 * n;
    if let Some(dst) = image.get_mut(off..off + 8) {
        dst.copy_from_slice(&value.to_le_bytes());
    }
}
