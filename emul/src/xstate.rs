//! Comparing and preparing standard-format XSAVE images by register
//! contents, not bytes.
//!
//! A component whose XSTATE_BV bit is clear holds its initial value
//! whatever its bytes say, and two savers of the same registers disagree
//! on those bits: KVM_GET_XSAVE reports the bits of the kernel's own save,
//! while the stub's XSAVE clears the bit of every component in its initial
//! configuration (XINUSE). So "did the instruction change a register"
//! compares each component's value, reading a clear bit as the initial
//! value. MXCSR is not part of any component's initial-state tracking:
//! XSAVE stores it whenever SSE or AVX is requested, so it is compared
//! directly.
//!
//! KVM_SET_XSAVE takes MXCSR from the image only when XSTATE_BV has the
//! SSE or AVX bit; [`keep_mxcsr`] sets the SSE bit when neither is set, so
//! a written-back image never drops an MXCSR the instruction loaded (the
//! stub's XSAVE leaves both bits clear when the XMM registers are zero).

use std::sync::OnceLock;

use crate::stub::{VECTOR_XFEATURES, XSAVE_HEADER_OFFSET};

/// XSTATE_BV bit of the x87 component.
pub const XFEATURE_X87: u64 = 1 << 0;
/// XSTATE_BV bit of the SSE component (XMM0-15).
pub const XFEATURE_SSE: u64 = 1 << 1;
/// XSTATE_BV bit of the AVX component (upper halves of YMM0-15).
pub const XFEATURE_AVX: u64 = 1 << 2;

/// Legacy region offsets (64-bit XSAVE format).
const FCW: usize = 0;
const FSW: usize = 2;
const FTW: usize = 4;
const FOP: usize = 6;
/// FIP and FDP, 8 bytes each.
const FIP_FDP: usize = 8;
const MXCSR: usize = 24;
const ST0: usize = 32;
const XMM0: usize = 160;
const XMM_BYTES: usize = 16 * 16;
/// The x87 control word's initial value (FNINIT).
const FCW_INIT: u16 = 0x37f;

/// Offset and size of each extended component (index = XSTATE_BV bit), in
/// the host's standard layout (CPUID leaf 0xD); size 0 when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentLayout {
    /// `(offset, size)` per XSTATE_BV bit; entries 0 and 1 (x87, SSE) are
    /// unused: the legacy region's layout is fixed.
    pub components: [(usize, usize); 8],
}

impl ComponentLayout {
    /// The host's layout, read from CPUID once per process (CPUID is an
    /// exit when the VMM itself runs in a VM).
    pub fn host() -> &'static ComponentLayout {
        static HOST: OnceLock<ComponentLayout> = OnceLock::new();
        HOST.get_or_init(|| {
            let mut components = [(0, 0); 8];
            for (i, c) in components.iter_mut().enumerate().skip(2) {
                if VECTOR_XFEATURES & (1 << i) != 0 {
                    let leaf = core::arch::x86_64::__cpuid_count(0xd, i as u32);
                    *c = (leaf.ebx as usize, leaf.eax as usize);
                }
            }
            ComponentLayout { components }
        })
    }
}

fn xstate_bv(image: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = image.get(XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

/// Bytes `range` of `image`, or `None` when the component is in its initial
/// state (bit clear) or the image is too short to hold it.
fn live(image: &[u8], in_use: bool, at: usize, len: usize) -> Option<&[u8]> {
    if in_use {
        image.get(at..at + len)
    } else {
        None
    }
}

/// Whether `[at, at+len)` holds the same value in both images, a `None`
/// side being all zeros.
fn same_or_zero(a: Option<&[u8]>, b: Option<&[u8]>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x == y,
        (Some(x), None) | (None, Some(x)) => is_zero(x),
        (None, None) => true,
    }
}

/// Whether `bytes` are all zero, compared with memcmp against zeros. After
/// a load of zeros one image has the SSE/AVX bits of XSTATE_BV clear and
/// the other holds those registers as zeros: a byte loop made that
/// comparison ~3.5x the memcmp of a load of non-zero data (~380 against
/// ~100 ns per instruction, timed inside the emulator).
fn is_zero(bytes: &[u8]) -> bool {
    static ZEROS: [u8; 1024] = [0; 1024];
    bytes.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Whether the x87 registers differ (FCW, FSW, abridged FTW, FOP, FIP,
/// FDP, ST0-7's 80 bits each).
fn x87_differs(a: &[u8], b: &[u8]) -> bool {
    let a_live = xstate_bv(a) & XFEATURE_X87 != 0;
    let b_live = xstate_bv(b) & XFEATURE_X87 != 0;
    // FCW's initial value is not zero: compare it as a number.
    let fcw = |img: &[u8], live: bool| {
        if live {
            img.get(FCW..FCW + 2)
                .map_or(FCW_INIT, |s| u16::from_le_bytes([s[0], s[1]]))
        } else {
            FCW_INIT
        }
    };
    if fcw(a, a_live) != fcw(b, b_live) {
        return true;
    }
    let fields = [(FSW, 2), (FTW, 1), (FOP, 2), (FIP_FDP, 16)]
        .into_iter()
        .chain((0..8).map(|i| (ST0 + 16 * i, 10)));
    for (at, len) in fields {
        if !same_or_zero(live(a, a_live, at, len), live(b, b_live, at, len)) {
            return true;
        }
    }
    false
}

/// Whether two standard-format XSAVE images hold different register
/// contents in the components a vector run switches (x87, MXCSR, SSE,
/// AVX, AVX-512), a component whose XSTATE_BV bit is clear counting as its
/// initial value. Header bits and bytes outside the registers are ignored.
pub fn registers_differ(a: &[u8], b: &[u8]) -> bool {
    registers_differ_in(a, b, ComponentLayout::host())
}

/// [`registers_differ`] for a given layout.
pub fn registers_differ_in(a: &[u8], b: &[u8], layout: &ComponentLayout) -> bool {
    if a.get(MXCSR..MXCSR + 4) != b.get(MXCSR..MXCSR + 4) {
        return true;
    }
    if x87_differs(a, b) {
        return true;
    }
    let (bv_a, bv_b) = (xstate_bv(a), xstate_bv(b));
    let mut parts = [(0usize, 0usize); 8];
    parts[1] = (XMM0, XMM_BYTES);
    parts[2..].copy_from_slice(&layout.components[2..]);
    for (bit, &(at, len)) in parts.iter().enumerate().skip(1) {
        let mask = 1u64 << bit;
        if len == 0 || VECTOR_XFEATURES & mask == 0 {
            continue;
        }
        let x = live(a, bv_a & mask != 0, at, len);
        let y = live(b, bv_b & mask != 0, at, len);
        if !same_or_zero(x, y) {
            return true;
        }
    }
    false
}

/// Makes `image` carry its MXCSR through KVM_SET_XSAVE: when XSTATE_BV has
/// neither the SSE nor the AVX bit, sets the SSE bit with XMM0-15 zeroed
/// (their value while the bit was clear), which changes no register.
pub fn keep_mxcsr(image: &mut [u8]) {
    let bv = xstate_bv(image);
    if bv & (XFEATURE_SSE | XFEATURE_AVX) != 0 || image.len() < XSAVE_HEADER_OFFSET + 8 {
        return;
    }
    image[XMM0..XMM0 + XMM_BYTES].fill(0);
    image[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8]
        .copy_from_slice(&(bv | XFEATURE_SSE).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: ComponentLayout = ComponentLayout {
        // AVX at 576 (256 bytes), opmask at 1088 (64), ZMM_Hi256 at 1152
        // (512), Hi16_ZMM at 1664 (1024): the standard layout of CPUs with
        // AVX-512.
        components: [
            (0, 0),
            (0, 0),
            (576, 256),
            (0, 0),
            (0, 0),
            (1088, 64),
            (1152, 512),
            (1664, 1024),
        ],
    };

    /// An image as FNINIT + reset leaves it: FCW 0x37f, MXCSR 0x1f80.
    fn init_image(bv: u64) -> Vec<u8> {
        let mut v = vec![0u8; 4096];
        v[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        v[MXCSR..MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        set_bv(&mut v, bv);
        v
    }

    fn set_bv(v: &mut [u8], bv: u64) {
        v[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8].copy_from_slice(&bv.to_le_bytes());
    }

    #[test]
    fn header_bits_alone_are_no_change() {
        // KVM reports every component in use; the stub's XSAVE none.
        let kvm = init_image(0xe7);
        let stub = init_image(0);
        assert!(!registers_differ_in(&kvm, &stub, &LAYOUT));
        assert!(!registers_differ_in(&stub, &kvm, &LAYOUT));
    }

    #[test]
    fn a_clear_bit_reads_as_the_initial_value_whatever_the_bytes() {
        let mut stale = init_image(0);
        // Bytes left over in components marked as in their initial state.
        stale[XMM0 + 5] = 0xaa;
        stale[576 + 3] = 0xbb;
        stale[ST0 + 1] = 0xcc;
        stale[FCW] = 0x7f - 1;
        assert!(!registers_differ_in(&stale, &init_image(0xe7), &LAYOUT));
    }

    #[test]
    fn a_register_change_is_seen_in_every_component() {
        let base = init_image(0xe7);
        for (at, what) in [
            (XMM0 + 15 * 16 + 15, "xmm15"),
            (576 + 255, "ymm15 upper"),
            (1088 + 7, "k0"),
            (1152 + 511, "zmm15 upper"),
            (1664 + 1023, "zmm31"),
            (ST0 + 7 * 16 + 9, "st7 exponent"),
            (FIP_FDP + 15, "fdp"),
            (FOP, "fop"),
            (FTW, "ftw"),
            (FSW + 1, "fsw"),
        ] {
            let mut changed = base.clone();
            changed[at] ^= 1;
            assert!(registers_differ_in(&base, &changed, &LAYOUT), "{what}");
            // The same value with the bit clear in the other image.
            let mut bare = changed.clone();
            set_bv(&mut bare, 0);
            assert!(registers_differ_in(&bare, &changed, &LAYOUT), "{what}");
        }
        let mut fcw = base.clone();
        fcw[FCW] = 0x7e;
        assert!(registers_differ_in(&base, &fcw, &LAYOUT));
    }

    #[test]
    fn mxcsr_counts_whatever_the_header_says() {
        let before = init_image(0);
        let mut after = init_image(0);
        after[MXCSR..MXCSR + 4].copy_from_slice(&0x1d80u32.to_le_bytes());
        assert!(registers_differ_in(&before, &after, &LAYOUT));
    }

    #[test]
    fn bytes_outside_the_registers_are_ignored() {
        let base = init_image(0xe7);
        let mut other = base.clone();
        // MXCSR_MASK, ST0's reserved bytes, the reserved legacy tail.
        other[28] = 0xff;
        other[ST0 + 12] = 1;
        other[500] = 1;
        assert!(!registers_differ_in(&base, &other, &LAYOUT));
    }

    #[test]
    fn components_the_host_lacks_are_not_compared() {
        let no_avx512 = ComponentLayout {
            components: [
                (0, 0),
                (0, 0),
                (576, 256),
                (0, 0),
                (0, 0),
                (0, 0),
                (0, 0),
                (0, 0),
            ],
        };
        let base = init_image(0xe7);
        let mut other = base.clone();
        other[1664] = 1;
        assert!(!registers_differ_in(&base, &other, &no_avx512));
    }

    #[test]
    fn keep_mxcsr_sets_the_sse_bit_with_zero_xmm_only_when_needed() {
        let mut img = init_image(XFEATURE_X87);
        img[MXCSR..MXCSR + 4].copy_from_slice(&0x1d80u32.to_le_bytes());
        img[XMM0] = 0x55; // stale: the bit is clear
        let before = img.clone();
        keep_mxcsr(&mut img);
        assert_eq!(xstate_bv(&img), XFEATURE_X87 | XFEATURE_SSE);
        assert!(img[XMM0..XMM0 + XMM_BYTES].iter().all(|&b| b == 0));
        assert_eq!(img[MXCSR..MXCSR + 4], 0x1d80u32.to_le_bytes());
        assert!(!registers_differ_in(&before, &img, &LAYOUT));

        for bv in [XFEATURE_SSE, XFEATURE_AVX, 0xe7] {
            let mut img = init_image(bv);
            img[XMM0] = 0x55;
            let before = img.clone();
            keep_mxcsr(&mut img);
            assert_eq!(img, before, "bv {bv:#x}");
        }
    }

    /// A held component is zero only if every byte is, at any length (the
    /// check runs in 1 KiB chunks; Hi16_ZMM is exactly 1 KiB).
    #[test]
    fn zero_check_sees_every_byte() {
        for len in [1usize, 16, 256, 1023, 1024, 1025, 2048 + 7] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "{len} zeros");
            for at in [0, len / 2, len - 1] {
                v[at] = 0x80;
                assert!(!is_zero(&v), "{len} bytes, non-zero at {at}");
                assert!(!same_or_zero(Some(&v), None));
                v[at] = 0;
            }
        }
    }
}
