//! Which elements of a memory operand a masked instruction touches, and so
//! which pages it may fault on ([`element_mask`], by each EVEX form's
//! [`Selection`]), and which bytes a store writes: all of them, or for a
//! masked store (AVX-512 `{k}`, VMASKMOV/VPMASKMOV) only the selected
//! elements ([`masked_store`]), read from the vector state.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::stub::XSAVE_HEADER_OFFSET;

/// Offsets of the XSAVE components the mask computation reads, from the
/// host's CPUID leaf 0xD (the image is in the host's standard layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XsaveLayout {
    /// Offset of the YMM_Hi128 component (AVX).
    pub ymm_hi128: usize,
    /// Offset of the opmask component (AVX-512 K0-K7).
    pub opmask: usize,
    /// Offset of ZMM0-15 bits 511:256 (component 6); 0 when the host has
    /// no AVX-512.
    pub zmm_hi256: usize,
    /// Offset of ZMM16-31 (component 7); 0 when the host has no AVX-512.
    pub hi16_zmm: usize,
}

impl XsaveLayout {
    /// The offsets this CPU uses (CPUID leaf 0xD).
    pub fn from_host() -> Self {
        let off = |sub| core::arch::x86_64::__cpuid_count(0xd, sub).ebx as usize;
        XsaveLayout {
            ymm_hi128: off(2),
            opmask: off(5),
            zmm_hi256: off(6),
            hi16_zmm: off(7),
        }
    }
}

const XMM0_OFFSET: usize = 160;

fn xstate_bv(image: &[u8]) -> u64 {
    read_u64(image, XSAVE_HEADER_OFFSET)
}

fn read_u64(image: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = image.get(off..off + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// A per-element write mask: bit `i` set means element `i` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementMask {
    /// Element size in bytes.
    pub element_size: usize,
    /// Bit `i` set: element `i` is written.
    pub bits: u64,
}

/// For a conditionally writing store, the elements it wrote; `None` when
/// the instruction is not a known masked store.
pub fn masked_store(instr: &Instruction, image: &[u8], layout: XsaveLayout) -> Option<ElementMask> {
    // A store that translates its whole operand (VEXTRACT*) still writes
    // only its selected elements.
    let sel = match selection(instr) {
        Selection::Whole => Selection::PerElement,
        other => other,
    };
    selected_elements(instr, sel, image, layout)
}

/// How an EVEX instruction's opmask bits select the elements of its memory
/// operand, which decides the pages a masked-out element may not fault on
/// (SDM vol. 1, 15.4.1, "memory fault suppression").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Mask bit i selects memory element i: moves, element-wise
    /// arithmetic and compares, widening and narrowing conversions
    /// (element i converts to or from destination element i), scalar forms
    /// (bit 0), extracts and down-converting stores.
    PerElement,
    /// Embedded broadcast: the one memory element is read when any mask bit
    /// of the broadcast's elements is set.
    Broadcast,
    /// A broadcast instruction (VBROADCAST*, VPBROADCAST*, MOVDDUP's
    /// 64-bit form): destination element i reads memory element
    /// i mod (memory elements).
    Repeat,
    /// Expand loads and compress stores: popcount(k) contiguous elements
    /// from the operand's start.
    Contiguous,
    /// Mask bits select destination elements of `dest_size` bytes, which
    /// read memory elements of another size: dot products of narrower
    /// elements (VPDPBUSD: a dword from four bytes), VPMULUDQ (a qword
    /// from the low dword of one), complex FP16 scalars (one 32-bit
    /// element).
    Grouped {
        /// Bytes per mask bit.
        dest_size: usize,
    },
    /// The whole operand is read whatever the mask, broadcast or not:
    /// permutes, shuffles, alignments, packs and unpacks, shift counts,
    /// inserts and extracts, MOVDDUP/MOVSLDUP/MOVSHDUP, VPMADDWD,
    /// VPMADDUBSW, VPCONFLICT, GF2P8AFFINE (the SDM's "NF" exception
    /// classes; measured on Intel Sapphire Rapids: each faults with an
    /// all-zero mask).
    Whole,
}

/// Which [`Selection`] an EVEX-masked instruction with a memory operand
/// makes (VSIB forms have their own path).
pub fn selection(instr: &Instruction) -> Selection {
    use Mnemonic as M;
    let per_element = if instr.is_broadcast() {
        Selection::Broadcast
    } else {
        Selection::PerElement
    };
    match instr.mnemonic() {
        M::Vbroadcastss
        | M::Vbroadcastsd
        | M::Vbroadcastf32x2
        | M::Vbroadcastf32x4
        | M::Vbroadcastf32x8
        | M::Vbroadcastf64x2
        | M::Vbroadcastf64x4
        | M::Vbroadcasti32x2
        | M::Vbroadcasti32x4
        | M::Vbroadcasti32x8
        | M::Vbroadcasti64x2
        | M::Vbroadcasti64x4
        | M::Vpbroadcastb
        | M::Vpbroadcastw
        | M::Vpbroadcastd
        | M::Vpbroadcastq => Selection::Repeat,
        M::Vexpandps
        | M::Vexpandpd
        | M::Vpexpandb
        | M::Vpexpandw
        | M::Vpexpandd
        | M::Vpexpandq
        | M::Vcompressps
        | M::Vcompresspd
        | M::Vpcompressb
        | M::Vpcompressw
        | M::Vpcompressd
        | M::Vpcompressq => Selection::Contiguous,
        M::Vpdpbusd | M::Vpdpbusds | M::Vpdpwssd | M::Vpdpwssds | M::Vdpbf16ps
            if !instr.is_broadcast() =>
        {
            Selection::Grouped { dest_size: 4 }
        }
        M::Vpmuludq | M::Vpmuldq if !instr.is_broadcast() => Selection::Grouped { dest_size: 8 },
        // A complex FP16 scalar is one 32-bit element.
        M::Vfmaddcsh | M::Vfcmaddcsh | M::Vfmulcsh | M::Vfcmulcsh => {
            Selection::Grouped { dest_size: 4 }
        }
        M::Vinsertf32x4
        | M::Vinsertf32x8
        | M::Vinsertf64x2
        | M::Vinsertf64x4
        | M::Vinserti32x4
        | M::Vinserti32x8
        | M::Vinserti64x2
        | M::Vinserti64x4
        | M::Vextractf32x4
        | M::Vextractf32x8
        | M::Vextractf64x2
        | M::Vextractf64x4
        | M::Vextracti32x4
        | M::Vextracti32x8
        | M::Vextracti64x2
        | M::Vextracti64x4
        | M::Vpmaddwd
        | M::Vpmaddubsw
        | M::Vpconflictd
        | M::Vpconflictq
        | M::Vgf2p8affineqb
        | M::Vgf2p8affineinvqb
        | M::Vpermb
        | M::Vpermw
        | M::Vpermd
        | M::Vpermq
        | M::Vpermps
        | M::Vpermpd
        | M::Vpermi2b
        | M::Vpermi2w
        | M::Vpermi2d
        | M::Vpermi2q
        | M::Vpermi2ps
        | M::Vpermi2pd
        | M::Vpermt2b
        | M::Vpermt2w
        | M::Vpermt2d
        | M::Vpermt2q
        | M::Vpermt2ps
        | M::Vpermt2pd
        | M::Vpermilps
        | M::Vpermilpd
        | M::Vpshufb
        | M::Vpshufd
        | M::Vpshufhw
        | M::Vpshuflw
        | M::Vshufps
        | M::Vshufpd
        | M::Vshuff32x4
        | M::Vshuff64x2
        | M::Vshufi32x4
        | M::Vshufi64x2
        | M::Valignd
        | M::Valignq
        | M::Vpalignr
        | M::Vpunpcklbw
        | M::Vpunpcklwd
        | M::Vpunpckldq
        | M::Vpunpcklqdq
        | M::Vpunpckhbw
        | M::Vpunpckhwd
        | M::Vpunpckhdq
        | M::Vpunpckhqdq
        | M::Vunpcklps
        | M::Vunpcklpd
        | M::Vunpckhps
        | M::Vunpckhpd
        | M::Vpacksswb
        | M::Vpackssdw
        | M::Vpackuswb
        | M::Vpackusdw
        | M::Vdbpsadbw
        | M::Vpmultishiftqb
        | M::Vmovsldup
        | M::Vmovshdup
        | M::Vmovddup
        | M::Vcvtne2ps2bf16 => Selection::Whole,
        // Shifts by a count in memory (the low 64 bits of an m128) shift
        // every element by it.
        M::Vpsllw
        | M::Vpslld
        | M::Vpsllq
        | M::Vpsraw
        | M::Vpsrad
        | M::Vpsraq
        | M::Vpsrlw
        | M::Vpsrld
        | M::Vpsrlq
            if instr.op_count() == 3 && instr.op2_kind() == OpKind::Memory =>
        {
            Selection::Whole
        }
        _ => per_element,
    }
}

/// Elements of a broadcast memory size (`Broadcast512_Float32`: 16): the
/// width is only in the name.
fn broadcast_elements(instr: &Instruction) -> usize {
    let ms = instr.memory_size();
    let name = format!("{ms:?}");
    let bits: usize = name
        .strip_prefix("Broadcast")
        .and_then(|rest| rest.split('_').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or(512);
    bits / (8 * ms.size().max(1))
}

fn low_bits(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// The memory elements a masked instruction accesses: for an EVEX opmask,
/// by the instruction's [`Selection`] (`None` for [`Selection::Whole`]:
/// every byte); for VMASKMOV, the sign bits of its mask register (operand
/// 1 in both its load and store forms). `None` for anything else.
pub fn element_mask(instr: &Instruction, image: &[u8], layout: XsaveLayout) -> Option<ElementMask> {
    selected_elements(instr, selection(instr), image, layout)
}

/// [`element_mask`] with the selection rule given.
fn selected_elements(
    instr: &Instruction,
    sel: Selection,
    image: &[u8],
    layout: XsaveLayout,
) -> Option<ElementMask> {
    let opmask = instr.op_mask();
    if opmask != Register::None {
        if instr.is_vsib() {
            return None;
        }
        let n = (opmask as usize).checked_sub(Register::K0 as usize)?;
        // Opmask component (bit 5) in its init state: all k registers zero.
        let k = if xstate_bv(image) & (1 << 5) != 0 {
            read_u64(image, layout.opmask + 8 * n)
        } else {
            0
        };
        let ms = instr.memory_size();
        let size = ms.size();
        let es = ms.element_size().clamp(1, size.max(1));
        let count = size / es;
        let dest_count = || {
            let reg = instr.op0_register();
            if reg.is_vector_register() {
                reg.size() / es
            } else {
                count
            }
        };
        let (element_size, bits) = match sel {
            Selection::Whole => return None,
            Selection::PerElement => (es, k & low_bits(count)),
            Selection::Broadcast => (
                size,
                u64::from(k & low_bits(broadcast_elements(instr)) != 0),
            ),
            Selection::Repeat => {
                let bits = (0..dest_count().min(64))
                    .filter(|i| k >> i & 1 != 0)
                    .fold(0u64, |acc, i| acc | 1 << (i % count.max(1)));
                (es, bits)
            }
            Selection::Contiguous => (es, low_bits((k & low_bits(count)).count_ones() as usize)),
            Selection::Grouped { dest_size } => {
                // Memory element j feeds the mask bits of the destination
                // bytes it overlaps.
                let bits = (0..count)
                    .filter(|j| {
                        let lo = j * es / dest_size;
                        let hi = ((j + 1) * es / dest_size).max(lo + 1);
                        (lo..hi).any(|i| i < 64 && k >> i & 1 != 0)
                    })
                    .fold(0u64, |acc, j| acc | 1 << j);
                (es, bits)
            }
        };
        return Some(ElementMask { element_size, bits });
    }
    let element_size = match instr.mnemonic() {
        Mnemonic::Vmaskmovps | Mnemonic::Vpmaskmovd => 4,
        Mnemonic::Vmaskmovpd | Mnemonic::Vpmaskmovq => 8,
        _ => return None,
    };
    if instr.op_kind(1) != OpKind::Register {
        return None;
    }
    let reg = instr.op_register(1);
    let n = reg.number();
    let mut value = [0u8; 32];
    value[..16].copy_from_slice(image.get(XMM0_OFFSET + 16 * n..XMM0_OFFSET + 16 * n + 16)?);
    if reg.is_ymm() && xstate_bv(image) & (1 << 2) != 0 {
        let hi = layout.ymm_hi128 + 16 * n;
        value[16..].copy_from_slice(image.get(hi..hi + 16)?);
    }
    let count = reg.size() / element_size;
    let bits = (0..count)
        .filter(|&i| value[(i + 1) * element_size - 1] & 0x80 != 0)
        .fold(0u64, |acc, i| acc | 1 << i);
    Some(ElementMask { element_size, bits })
}

impl ElementMask {
    /// Whether a selected element overlaps operand bytes `from..to`.
    pub fn selects_any(&self, from: usize, to: usize) -> bool {
        self.first_selected(from, to).is_some()
    }

    /// The last operand byte in `from..to` that a selected element covers.
    pub fn last_selected(&self, from: usize, to: usize) -> Option<usize> {
        let es = self.element_size;
        (0..64usize)
            .rev()
            .filter(|j| self.bits >> j & 1 != 0)
            .find(|j| j * es < to && (j + 1) * es > from)
            .map(|j| ((j + 1) * es).min(to) - 1)
    }

    /// The first operand byte in `from..to` that a selected element covers.
    pub fn first_selected(&self, from: usize, to: usize) -> Option<usize> {
        let es = self.element_size;
        (0..64usize)
            .filter(|j| self.bits >> j & 1 != 0)
            .find(|j| j * es < to && (j + 1) * es > from)
            .map(|j| (j * es).max(from))
    }
}
