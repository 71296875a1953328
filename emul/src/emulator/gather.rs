//! VSIB gathers and scatters: AVX2 `VPGATHERDD/DQ/QD/QQ`,
//! `VGATHERDPS/DPD/QPS/QPD` and their AVX-512 forms, and the AVX-512
//! scatters.
//!
//! Each element's address is base + sign-extended index element x scale +
//! displacement, translated and accessed on its own (an element may sit in
//! RAM, on MMIO or on an unmapped page), in element order, so overlapping
//! scatter indices leave the highest element's value. These are data moves
//! without arithmetic, so the emulator performs them itself on the guest's
//! XSAVE image rather than in a stub (the stub could only reach one
//! operand). Completion is architecturally partial: each completed element
//! clears its mask element (AVX2: the whole mask element; AVX-512: its
//! opmask bit), and a fault leaves the destination and mask showing exactly
//! which elements completed, so the guest restarts the instruction. On
//! completion the mask is cleared and, as the CPU does, the destination
//! bytes past the gathered elements are zeroed. After a fault those upper
//! bytes are left alone: measured on AMD EPYC (Zen 3) with a VEX.128 and a
//! VEX.256 `vpgatherdd` whose third element is on a PROT_NONE page.

use iced_x86::{Mnemonic, Register};

use super::{Emulator, Stop};
use crate::address::{gpr_value, linear_from_effective};
use crate::cpu::CpuState;
use crate::exception::Exception;
use crate::paging::{translate, Access};
use crate::platform::{Platform, VectorState};
use crate::vregs::{read_k, read_vec, write_k, write_vec};

const PAGE_SIZE: u64 = super::PAGE_SIZE;

/// Index elements are dwords for the `D` forms, qwords for the `Q` forms.
fn index_size(m: Mnemonic) -> Option<usize> {
    use Mnemonic as M;
    Some(match m {
        M::Vpgatherdd
        | M::Vpgatherdq
        | M::Vgatherdps
        | M::Vgatherdpd
        | M::Vpscatterdd
        | M::Vpscatterdq
        | M::Vscatterdps
        | M::Vscatterdpd => 4,
        M::Vpgatherqd
        | M::Vpgatherqq
        | M::Vgatherqps
        | M::Vgatherqpd
        | M::Vpscatterqd
        | M::Vpscatterqq
        | M::Vscatterqps
        | M::Vscatterqpd => 8,
        _ => return None,
    })
}

fn is_scatter(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Vpscatterdd
            | M::Vpscatterdq
            | M::Vscatterdps
            | M::Vscatterdpd
            | M::Vpscatterqd
            | M::Vpscatterqq
            | M::Vscatterqps
            | M::Vscatterqpd
    )
}

/// Whether `m` is a gather or scatter this module completes (the Xeon Phi
/// prefetch gathers are not).
pub(crate) fn is_vsib_move(m: Mnemonic) -> bool {
    index_size(m).is_some()
}

impl Emulator {
    /// Completes a gather or scatter (RIP is advanced by the caller).
    pub(super) fn vsib(
        &mut self,
        cpu: &CpuState,
        bitness: u32,
        instr: &iced_x86::Instruction,
        vec: &mut dyn VectorState,
        mem: &mut dyn Platform,
    ) -> Result<(), Stop> {
        let m = instr.mnemonic();
        let is = index_size(m).ok_or(Stop::Unsupported("not a gather or scatter"))?;
        let scatter = is_scatter(m);
        let evex = instr.encoding() == iced_x86::EncodingKind::EVEX;
        let data = instr.op_register(if scatter { 1 } else { 0 });
        let index = instr.memory_index();
        let vex_mask = (!evex).then(|| instr.op_register(2));
        let k = instr.op_mask();
        // #UD: AVX2 needs destination, index and mask all different; AVX-512
        // gathers a destination other than the index, and a mask other
        // than k0 (SDM vol. 2, VPGATHERDD and VPGATHERDD (EVEX)).
        let same = |a: Register, b: Register| a.number() == b.number();
        let ud = match vex_mask {
            Some(mask) => same(data, index) || same(data, mask) || same(mask, index),
            None => k == Register::None || k == Register::K0 || (!scatter && same(data, index)),
        };
        if ud {
            return Err(Exception::ud().into());
        }
        let es = instr.memory_size().size();
        if !matches!(es, 4 | 8) {
            return Err(Stop::Unsupported("gather element size"));
        }
        let n = (data.size() / es).min(index.size() / is);

        let addr_mask = match self
            .info
            .info(instr)
            .used_memory()
            .first()
            .map(|u| u.address_size())
        {
            Some(iced_x86::CodeSize::Code32) => 0xffff_ffff,
            Some(iced_x86::CodeSize::Code16) => 0xffff,
            _ if bitness == 64 => u64::MAX,
            _ => 0xffff_ffff,
        };
        let base = match instr.memory_base() {
            Register::None => 0,
            r => gpr_value(&cpu.gprs, r).unwrap_or(0),
        };
        let scale = u64::from(instr.memory_index_scale());
        let disp = instr.memory_displacement64();
        let segment = instr.memory_segment();

        let layout = self.layout;
        let image = vec.image()?;
        let mut value = read_vec(image, layout, data);
        let idx = read_vec(image, layout, index);
        let mut mask = vex_mask.map(|r| read_vec(image, layout, r));
        let mut kbits = if evex { read_k(image, layout, k) } else { 0 };
        let access = Access {
            write: scatter,
            fetch: false,
            user: cpu.cpl == 3,
        };

        // Intel first turns an AVX2 mask into all-ones and zero elements
        // (the SDM's pseudo-code), which a fault leaves showing for the
        // elements not yet done; AMD leaves them as they were (measured by
        // masked_native: Sapphire Rapids and Zen 3).
        if self.shape.gather_mask_normalized {
            if let Some(mb) = &mut mask {
                for e in mb[..n * es].chunks_exact_mut(es) {
                    let on = e[es - 1] & 0x80 != 0;
                    e.fill(if on { 0xff } else { 0 });
                }
            }
        }
        let mut fault = None;
        for i in 0..n {
            let active = match &mask {
                Some(mb) => mb[(i + 1) * es - 1] & 0x80 != 0,
                None => kbits >> i & 1 != 0,
            };
            if !active {
                // An element left out is done too: at a later element's
                // fault its (AVX2) mask element reads zero, as on the CPU
                // (measured on AMD EPYC Zen 3: a vpgatherdd whose element 0
                // is masked off and element 1 faults leaves mask element 0
                // zero; tests/tests/masked_native.rs).
                if let Some(mb) = &mut mask {
                    mb[i * es..(i + 1) * es].fill(0);
                }
                continue;
            }
            let mut raw = [0u8; 8];
            raw[..is].copy_from_slice(&idx[i * is..(i + 1) * is]);
            let element_index = if is == 4 {
                i64::from(i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]])) as u64
            } else {
                u64::from_le_bytes(raw)
            };
            let ea = base
                .wrapping_add(element_index.wrapping_mul(scale))
                .wrapping_add(disp)
                & addr_mask;
            let done = (|| -> Result<(), Stop> {
                let lin = linear_from_effective(cpu, bitness, segment, ea, es as u64, scatter)?;
                let first = es.min((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize);
                let gpa0 = translate(cpu, lin, access, mem)?;
                let gpa1 = if first < es {
                    Some(translate(cpu, lin.wrapping_add(first as u64), access, mem)?)
                } else {
                    None
                };
                let elem = &mut value[i * es..(i + 1) * es];
                if scatter {
                    mem.write_phys(gpa0, &elem[..first])?;
                    if let Some(g) = gpa1 {
                        mem.write_phys(g, &elem[first..])?;
                    }
                } else {
                    mem.read_phys(gpa0, &mut elem[..first])?;
                    if let Some(g) = gpa1 {
                        mem.read_phys(g, &mut elem[first..])?;
                    }
                }
                Ok(())
            })();
            if let Err(stop) = done {
                fault = Some(stop);
                break;
            }
            match &mut mask {
                Some(mb) => mb[i * es..(i + 1) * es].fill(0),
                None => kbits &= !(1u64 << i),
            }
        }
        if fault.is_none() {
            // Completion: the mask is cleared whole, and the destination's
            // bytes past the gathered elements are zeroed (VLMAX).
            if let Some(mb) = &mut mask {
                mb.fill(0);
            }
            kbits = 0;
            if !scatter {
                value[n * es..].fill(0);
            }
        }
        if !scatter {
            write_vec(image, layout, data, &value);
        }
        match (vex_mask, &mask) {
            (Some(r), Some(mb)) => write_vec(image, layout, r, mb),
            _ => write_k(image, layout, k, kbits),
        }
        vec.mark_dirty();
        match fault {
            Some(stop) => Err(stop),
            None => Ok(()),
        }
    }
}
