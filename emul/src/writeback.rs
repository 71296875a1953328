//! Which bytes of a memory operand a store writes: all of them, or for a
//! masked store (AVX-512 `{k}`, VMASKMOV/VPMASKMOV) only the selected
//! elements, read from the vector state after the instruction.

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
    let mask = element_mask(instr, image, layout)?;
    // A compress store writes popcount(k) elements contiguously from the
    // start of the operand, not the selected positions.
    let compress = matches!(
        instr.mnemonic(),
        Mnemonic::Vpcompressb
            | Mnemonic::Vpcompressw
            | Mnemonic::Vpcompressd
            | Mnemonic::Vpcompressq
            | Mnemonic::Vcompressps
            | Mnemonic::Vcompresspd
    );
    if compress {
        // Only the mask bits of the vector's elements count.
        let count = instr.memory_size().size() / mask.element_size.max(1);
        let selected = if count >= 64 {
            mask.bits
        } else {
            mask.bits & ((1u64 << count) - 1)
        };
        let n = selected.count_ones();
        let bits = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        return Some(ElementMask { bits, ..mask });
    }
    Some(mask)
}

/// The memory elements a masked instruction accesses: an EVEX opmask
/// (without broadcast, where the mask selects destination elements, not
/// memory ones), or the sign bits of VMASKMOV's mask register (operand 1 in
/// both its load and store forms). `None` for anything else.
pub fn element_mask(instr: &Instruction, image: &[u8], layout: XsaveLayout) -> Option<ElementMask> {
    let element_size = instr.memory_size().element_size().max(1);
    let opmask = instr.op_mask();
    if opmask != Register::None {
        if instr.is_broadcast() {
            return None;
        }
        let k = (opmask as usize).checked_sub(Register::K0 as usize)?;
        // Opmask component (bit 5) in its init state: all k registers zero.
        let bits = if xstate_bv(image) & (1 << 5) != 0 {
            read_u64(image, layout.opmask + 8 * k)
        } else {
            0
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

    /// The first operand byte in `from..to` that a selected element covers.
    pub fn first_selected(&self, from: usize, to: usize) -> Option<usize> {
        let es = self.element_size;
        (0..64usize)
            .filter(|j| self.bits >> j & 1 != 0)
            .find(|j| j * es < to && (j + 1) * es > from)
            .map(|j| (j * es).max(from))
    }
}
