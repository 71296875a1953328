//! How this CPU fills in what the SDM leaves open, or what the vendors do
//! differently, for accesses that stop part-way: measured once by running
//! probe instructions in a stub against a page with no access behind a
//! mapped one.
//!
//! The emulator completes these instructions itself (gathers, masked
//! stores across pages, x87 pointer bookkeeping), so it must reproduce the
//! host's choice: a guest on an Intel host must see what an Intel CPU
//! shows, on an AMD host what an AMD CPU shows. Measured with
//! `tests/tests/masked_native.rs` on Intel Xeon (Sapphire/Emerald Rapids)
//! and AMD EPYC (Zen 3); the values each gave are in [`HostShape`]'s
//! fields.

use std::sync::OnceLock;

use super::buf::{StubBuf, XSAVE_HEADER_OFFSET};
use super::error::StubRunError;
use super::fault::EXC_PF;
use super::regs::GuestGprs;

/// What the probes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostShape {
    /// A masked store whose selected elements lie on two pages, faulting on
    /// the second, reports CR2 at its last selected byte (Intel: a
    /// VMASKMOVPS of four dwords at 8 bytes before the page reports page +
    /// 7), not at the first selected byte on that page (AMD: page + 0).
    pub split_store_cr2_last: bool,
    /// MASKMOVDQU faults on its destination page whatever its mask, with
    /// CR2 this many bytes past RDI when RDI is the start of the page
    /// (Intel: 8, even with an all-zero mask); `None` where masked-out
    /// bytes never fault (AMD).
    pub maskmovdqu_unmasked_fault: Option<u8>,
    /// The same for MASKMOVQ (AMD: faults at the first byte of the missing
    /// page with an all-zero mask).
    pub maskmovq_unmasked_fault: Option<u8>,
    /// An AVX2 gather that faults leaves its mask as the SDM's pseudo-code
    /// does: elements not yet done all-ones where selected and zero where
    /// not (Intel); otherwise as they were (AMD).
    pub gather_mask_normalized: bool,
    /// FOP is recorded by every non-control x87 instruction (AMD), not only
    /// by one that raises an unmasked exception (Intel's default).
    pub fop_always: bool,
    /// FDP is recorded by every x87 instruction with a memory operand
    /// (AMD), not only by one that raises an unmasked exception (Intel with
    /// CPUID.(7,0):EBX bit 6, FDP_EXCPTN_ONLY).
    pub fdp_always: bool,
    /// Which bytes of a whole-state operand the CPU checks before the rest,
    /// per [`StateClass`]: the CR2 of an operand that runs onto a missing
    /// page. AMD (Zen 3): FXSAVE/FXRSTOR check the last byte first; the x87
    /// environment instructions and the XSAVE family the first, then the
    /// last; XRSTOR the first (then its header).
    pub state_checks: [StateChecks; 4],
    /// LAR's 32-bit result keeps the descriptor's limit bits 19:16, which
    /// the SDM leaves undefined (mask 00FxFF00H) and the APM keeps (mask
    /// 00FFFF00H; AMD EPYC Zen 3: `lar` of the user data selector gives
    /// 0x00cff300). QEMU's TCG clears them.
    pub lar_keeps_limit_bits: bool,
}

/// The whole-state instruction classes [`HostShape::state_checks`] is
/// indexed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateClass {
    /// FXSAVE, FXRSTOR.
    Fx = 0,
    /// FNSTENV, FLDENV, FNSAVE, FRSTOR.
    X87Env = 1,
    /// XSAVE, XSAVEOPT, XSAVEC.
    Xsave = 2,
    /// XRSTOR.
    Xrstor = 3,
}

/// The operand bytes checked (translated) before the page-by-page walk,
/// in order: the first byte, the last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateChecks {
    /// Check the last byte before anything else.
    pub last_first: bool,
    /// Check the first byte (after the last byte, if that comes first).
    pub first: bool,
    /// Check the last byte after the first.
    pub last_after_first: bool,
}

impl Default for HostShape {
    /// The SDM's reading where the probes cannot run: pointers always
    /// recorded, first-byte CR2, masks left alone; LAR as the APM has it
    /// (bits 19:16 kept, which the SDM leaves open).
    fn default() -> Self {
        HostShape {
            split_store_cr2_last: false,
            maskmovdqu_unmasked_fault: None,
            maskmovq_unmasked_fault: None,
            gather_mask_normalized: false,
            fop_always: true,
            fdp_always: true,
            state_checks: [StateChecks::default(); 4],
            lar_keeps_limit_bits: true,
        }
    }
}

impl HostShape {
    /// This process's measurement (probed once, with `buf`, on first use).
    pub fn host(buf: &mut StubBuf) -> HostShape {
        static SHAPE: OnceLock<HostShape> = OnceLock::new();
        *SHAPE.get_or_init(|| measure(buf).unwrap_or_default())
    }
}

/// Two pages: the first readable and writable, the second with no access.
struct ProbePages {
    base: *mut u8,
}

const PAGE: usize = 4096;

impl ProbePages {
    fn new() -> Option<ProbePages> {
        // SAFETY: a fresh anonymous mapping, owned by ProbePages and
        // unmapped on drop; the second page is made inaccessible.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            if libc::mprotect(p.cast::<u8>().add(PAGE).cast(), PAGE, libc::PROT_NONE) != 0 {
                libc::munmap(p, 2 * PAGE);
                return None;
            }
            Some(ProbePages { base: p.cast() })
        }
    }

    /// Address of the inaccessible page.
    fn guard(&self) -> u64 {
        self.base as u64 + PAGE as u64
    }

    fn first(&mut self) -> &mut [u8] {
        // SAFETY: the first page is mapped read-write for our lifetime;
        // stubs touch it only while no borrow is live.
        unsafe { std::slice::from_raw_parts_mut(self.base, PAGE) }
    }
}

impl Drop for ProbePages {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`, no stub runs.
        unsafe { libc::munmap(self.base.cast(), 2 * PAGE) };
    }
}

// The probes' instructions, as bytes: building iced-x86's encoder tables
// to assemble them would cost every VM ~1 ms at start-up. The test below
// decodes each one back.
/// `vmaskmovps [rax], xmm1, xmm2`
const VMASKMOVPS_STORE: &[u8] = &[0xc4, 0xe2, 0x71, 0x2e, 0x10];
/// `maskmovdqu xmm2, xmm1`
const MASKMOVDQU: &[u8] = &[0x66, 0x0f, 0xf7, 0xd1];
/// `maskmovq mm1, mm2`
const MASKMOVQ: &[u8] = &[0x0f, 0xf7, 0xca];
/// `vpgatherdd xmm0, [rax+xmm1], xmm2`
const VPGATHERDD: &[u8] = &[0xc4, 0xe2, 0x69, 0x90, 0x04, 0x08];
/// `fxsave64 [rcx]`
const FXSAVE64: &[u8] = &[0x48, 0x0f, 0xae, 0x01];
/// `fnstenv [rcx]`
const FNSTENV: &[u8] = &[0xd9, 0x31];
/// `xsave64 [rcx]`
const XSAVE64: &[u8] = &[0x48, 0x0f, 0xae, 0x21];
/// `xrstor64 [rcx]`
const XRSTOR64: &[u8] = &[0x48, 0x0f, 0xae, 0x29];
/// `fld dword [rax]; fnstenv [rax+16]`
const FLD_FNSTENV: &[u8] = &[0xd9, 0x00, 0xd9, 0x70, 0x10];

/// `mov ecx, cs; lar eax, ecx; lsl edx, ecx`
const LAR_LSL_CS: &[u8] = &[0x8c, 0xc9, 0x0f, 0x02, 0xc1, 0x0f, 0x03, 0xd1];

/// A valid guest image: x87 default, MXCSR default, XMM registers as given
/// (16 bytes each, from XMM0), components x87|SSE|AVX within the buffer's.
fn load_image(buf: &mut StubBuf, xmm: &[[u8; 16]]) {
    let bv = 0b111 & buf.vector_mask();
    let img = buf.guest_xsave_mut();
    img.fill(0);
    img[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
    img[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    for (i, x) in xmm.iter().enumerate() {
        img[160 + 16 * i..176 + 16 * i].copy_from_slice(x);
    }
    img[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8].copy_from_slice(&bv.to_le_bytes());
}

fn dwords(d: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (i, v) in d.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// The #PF address a run faulted with, if it did.
fn pf_addr(ran: Result<(), StubRunError>) -> Result<Option<u64>, StubRunError> {
    match ran {
        Ok(()) => Ok(None),
        Err(StubRunError::Fault(f)) if f.vector == EXC_PF => Ok(f.fault_addr),
        Err(e) => Err(e),
    }
}

/// A byte-masked store's #PF with RDI at the guard page (the guest image
/// already loaded): how far past RDI it reports, if it faults.
fn fault_past_guard(
    buf: &mut StubBuf,
    insn: &[u8],
    guard: u64,
) -> Result<Option<u8>, StubRunError> {
    let mut g = GuestGprs {
        rdi: guard,
        ..Default::default()
    };
    let addr = pf_addr(buf.run_with_vector(insn, &mut g))?;
    Ok(addr.and_then(|a| u8::try_from(a.wrapping_sub(guard)).ok()))
}

fn measure(buf: &mut StubBuf) -> Result<HostShape, StubRunError> {
    let mut shape = HostShape::default();

    // LAR and LSL of this process's own code selector: LSL gives the
    // limit, so whether LAR's bits 19:16 hold its top bits shows (Linux's
    // user code segment has limit 0xfffff: they are all ones).
    {
        let mut g = GuestGprs::default();
        buf.run(LAR_LSL_CS, &mut g)?;
        let granular = g.rax & (1 << 23) != 0;
        let top = if granular { g.rdx >> 28 } else { g.rdx >> 16 } & 0xf;
        if top != 0 {
            shape.lar_keeps_limit_bits = (g.rax >> 16) & 0xf == top;
        }
    }
    let Some(mut pages) = ProbePages::new() else {
        return Ok(shape);
    };
    let guard = pages.guard();
    let avx = buf.vector_mask() & 0b100 != 0;
    let avx2 = avx && std::arch::is_x86_feature_detected!("avx2");

    // vmaskmovps [rax], xmm1 (mask: all four), xmm2, 8 bytes before the
    // guard page: two dwords on each page.
    if avx {
        load_image(buf, &[[0; 16], [0xff; 16], [0x11; 16]]);
        let mut g = GuestGprs {
            rax: guard - 8,
            ..Default::default()
        };
        let addr = pf_addr(buf.run_with_vector(VMASKMOVPS_STORE, &mut g))?;
        shape.split_store_cr2_last = addr == Some(guard + 7);
    }

    // maskmovdqu xmm2, xmm1 with an all-zero mask, RDI at the guard page.
    if buf.vector_mask() & 0b10 != 0 {
        load_image(buf, &[[0; 16], [0; 16], [0x11; 16]]);
        shape.maskmovdqu_unmasked_fault = fault_past_guard(buf, MASKMOVDQU, guard)?;
    }

    // maskmovq mm1, mm2 with an all-zero mask (MM2 is physical register 2
    // with TOP 0), RDI at the guard page.
    if buf.vector_mask() & 1 != 0 {
        load_image(buf, &[]);
        let img = buf.guest_xsave_mut();
        // MM1 (data) at 48, MM2 (mask) at 64.
        img[48..56].fill(0x11);
        img[64..72].fill(0);
        shape.maskmovq_unmasked_fault = fault_past_guard(buf, MASKMOVQ, guard)?;
    }

    // vpgatherdd xmm0, [rax+xmm1], xmm2: element 0 (selected) 4 bytes
    // before the guard page, element 1 (selected) on it, element 2
    // selected with other mask bits set, element 3 not selected.
    if avx2 {
        let mask = [0x8000_0000, 0x8000_0000, 0x8000_0001, 0x7fff_ffff];
        load_image(buf, &[[0; 16], dwords([0, 8, 0, 0]), dwords(mask)]);
        let mut g = GuestGprs {
            rax: guard - 4,
            ..Default::default()
        };
        if pf_addr(buf.run_with_vector_keeping_fault_state(VPGATHERDD, &mut g))?.is_some() {
            let img = buf.guest_xsave_mut();
            let word = |i: usize| {
                let at = 160 + 32 + 4 * i;
                u32::from_le_bytes([img[at], img[at + 1], img[at + 2], img[at + 3]])
            };
            shape.gather_mask_normalized = word(2) == u32::MAX && word(3) == 0;
        }
    }

    // Each whole-state class at the guard page and one alignment unit
    // before it (16 bytes, 64 for the XSAVE family, 8 for FNSTENV), with
    // EDX:EAX = 3 (x87 and SSE): the CR2 says which bytes it checks first.
    if buf.vector_mask() & 0b11 == 0b11 {
        let classes: [(StateClass, &[u8], u64, u64); 4] = [
            (StateClass::Fx, FXSAVE64, 512, 16),
            (StateClass::X87Env, FNSTENV, 28, 8),
            (StateClass::Xsave, XSAVE64, 576, 64),
            (StateClass::Xrstor, XRSTOR64, 576, 64),
        ];
        for (class, insn, size, before) in classes {
            let mut at = [None; 2];
            for (i, lin) in [guard, guard - before].into_iter().enumerate() {
                load_image(buf, &[]);
                // XRSTOR finds a valid (all-initial) legacy region where it
                // is mapped.
                pages.first().fill(0);
                let mut g = GuestGprs {
                    rax: 0b11,
                    rcx: lin,
                    ..Default::default()
                };
                // Anything but a #PF (a #GP on a host that checks more)
                // leaves the class at the in-order walk.
                at[i] = pf_addr(buf.run_with_vector(insn, &mut g))
                    .ok()
                    .flatten()
                    .map(|a| a.wrapping_sub(lin));
            }
            let (on_page, straddle) = (at[0], at[1]);
            let checks = &mut shape.state_checks[class as usize];
            if on_page == Some(size - 1) {
                checks.last_first = true;
                checks.first = true;
            } else if on_page == Some(0) {
                checks.first = true;
                checks.last_after_first = straddle == Some(size - 1);
            }
        }
    }

    // x87 state with FOP 0x555 and FDP 0x1111_2222, then
    // fld dword [rax]; fnstenv [rax+16]: what FOP and FDP hold after an
    // instruction that raises nothing.
    {
        pages.first()[..4].copy_from_slice(&1.0f32.to_bits().to_le_bytes());
        load_image(buf, &[]);
        let img = buf.guest_xsave_mut();
        img[6..8].copy_from_slice(&0x555u16.to_le_bytes());
        img[16..24].copy_from_slice(&0x1111_2222u64.to_le_bytes());
        let mut g = GuestGprs {
            rax: pages.first().as_ptr() as u64,
            ..Default::default()
        };
        buf.run_with_vector(FLD_FNSTENV, &mut g)?;
        // 32-bit protected-mode environment: FOP in bits 16-26 of the
        // dword at 16, FDP (the offset) at 20.
        let env = &pages.first()[16..44];
        let fop = u16::from_le_bytes([env[18], env[19]]) & 0x7ff;
        let fdp = u32::from_le_bytes([env[20], env[21], env[22], env[23]]);
        shape.fop_always = fop == 0x100;
        shape.fdp_always = fdp == pages.first().as_ptr() as u32;
    }
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probes run to the end on this CPU (whichever vendor: what each
    /// answers is checked against the CPU itself by masked_native and the
    /// differential test, not here).
    #[test]
    fn probes_run() {
        let mut buf = StubBuf::new(true).expect("stub buffer");
        let shape = measure(&mut buf).expect("probes run");
        eprintln!("host shape: {shape:?}");
        assert_eq!(HostShape::host(&mut buf), shape, "measured once, the same");
    }

    /// Each probe's bytes are the instructions its comment names.
    #[test]
    fn probe_bytes_decode_as_named() {
        use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
        let cases: [(&[u8], &str); 10] = [
            (VMASKMOVPS_STORE, "vmaskmovps [rax],xmm1,xmm2"),
            (MASKMOVDQU, "maskmovdqu xmm2,xmm1"),
            (MASKMOVQ, "maskmovq mm1,mm2"),
            (VPGATHERDD, "vpgatherdd xmm0,[rax+xmm1],xmm2"),
            (FXSAVE64, "fxsave64 [rcx]"),
            (FNSTENV, "fnstenv [rcx]"),
            (XSAVE64, "xsave64 [rcx]"),
            (XRSTOR64, "xrstor64 [rcx]"),
            (FLD_FNSTENV, "fld st,dword ptr [rax]; fnstenv [rax+10h]"),
            (LAR_LSL_CS, "mov ecx,cs; lar eax,ecx; lsl edx,ecx"),
        ];
        let mut fmt = IntelFormatter::new();
        for (bytes, want) in cases {
            let mut text = Vec::new();
            for insn in Decoder::new(64, bytes, DecoderOptions::NONE) {
                assert!(!insn.is_invalid(), "{want}: {bytes:02x?}");
                let mut t = String::new();
                fmt.format(&insn, &mut t);
                text.push(t);
            }
            assert_eq!(text.join("; "), want, "{bytes:02x?}");
        }
    }
}
