//! Re-encoding an allowed instruction for the stub: as 64-bit code, with
//! its memory operand turned into `[rip + disp32]` pointing into the
//! bounce buffer, segment overrides, the address-size prefix and HLE/REP
//! hints dropped.
//!
//! Like Xen's x86_emulate, this patches the guest's own bytes rather than
//! encoding the decoded instruction again: the opcode, ModRM.reg, the
//! VEX/EVEX/XOP payload and any immediate are kept, only the addressing
//! bytes are rewritten. That needs no encoder tables (iced-x86's take ~1 ms
//! to build, which every VM would pay at start-up to keep the first
//! emulation as cheap as the rest). Whatever the patch produced is decoded
//! again and must be exactly the instruction the guest ran, with only its
//! memory operand moved; anything else is refused, so no byte sequence
//! other than that instruction can reach the stub.
//!
//! 16- and 32-bit code differs from 64-bit code in ways a patch must undo:
//! 16-bit code has the opposite default operand size, and there VEX/EVEX
//! register-extension bits are ignored that would select registers 8-31 in
//! 64-bit mode (and W is ignored by a few instructions). Those are fixed
//! up, and the operand-size prefix and W are tried both ways where the
//! first patch decodes as another instruction.

use iced_x86::{CodeSize, Decoder, DecoderOptions, EncodingKind, Instruction, OpKind, Register};

use crate::stub::MAX_INSN_LEN;

/// Why an instruction could not be re-encoded.
pub type ReencodeError = &'static str;

/// Where the parts of an instruction's bytes are, as far as the patch
/// needs them.
#[derive(Clone, Copy, Debug)]
struct Parts {
    operand_size: bool,
    lock: bool,
    /// The last F2/F3 prefix: the one a mandatory-prefix opcode uses.
    last_rep: Option<u8>,
    /// REX (64-bit code only), if it reached the opcode.
    rex: Option<u8>,
    /// VEX/EVEX/XOP prefix and payload, or the legacy escape bytes, then
    /// the opcode: `bytes[opcode_start..modrm]`.
    opcode_start: usize,
    /// Index just past the opcode (the ModRM byte, where there is one).
    modrm: usize,
    encoding: EncodingKind,
}

/// How to bend the bytes of 16/32-bit code into 64-bit code, tried in
/// turn until the patch decodes as the guest's instruction.
#[derive(Clone, Copy)]
struct Variant {
    toggle_operand_size: bool,
    flip_w: bool,
    /// Clear bit 7 of the last byte, an `is4` register operand's top bit
    /// (VBLENDVPS, FMA4...), which only 64-bit code uses.
    clear_is4_top: bool,
}

/// Every variant, as bits: operand size, W, is4.
fn variant(bits: u8) -> Variant {
    Variant {
        toggle_operand_size: bits & 1 != 0,
        flip_w: bits & 2 != 0,
        clear_is4_top: bits & 4 != 0,
    }
}

/// Encodes `instr` (decoded from `bytes`) as 64-bit code to run at
/// `exec_ip`, its memory operand (if any) redirected to the absolute
/// address `operand_addr` as `[rip + disp32]`. An instruction whose first
/// operand was turned into `MemorySegRDI` (an implicit `DS:rDI`) gets the
/// 64-bit address size. Writes the bytes to `out` and returns their
/// length.
pub fn reencode(
    instr: &Instruction,
    bytes: &[u8],
    exec_ip: u64,
    operand_addr: Option<u64>,
    out: &mut [u8; MAX_INSN_LEN],
) -> Result<usize, ReencodeError> {
    let bitness = match instr.code_size() {
        CodeSize::Code16 => 16,
        CodeSize::Code32 => 32,
        CodeSize::Code64 => 64,
        _ => return Err("unknown code size"),
    };
    let bytes = bytes
        .get(..instr.len())
        .ok_or("instruction bytes missing")?;
    let has_mem = (0..instr.op_count()).any(|i| instr.op_kind(i) == OpKind::Memory);
    if has_mem != operand_addr.is_some() {
        return Err("memory operand mismatch");
    }
    let parts = split(bytes, bitness, instr.encoding())?;

    // What the stub must run: the same instruction, its operand moved.
    let mut expected = *instr;
    expected.set_segment_prefix(Register::None);
    expected.set_has_xacquire_prefix(false);
    expected.set_has_xrelease_prefix(false);
    expected.set_has_rep_prefix(false);
    expected.set_has_repne_prefix(false);
    if let Some(target) = operand_addr {
        expected.set_memory_base(Register::RIP);
        expected.set_memory_index(Register::None);
        expected.set_memory_index_scale(1);
        expected.set_memory_displacement64(target);
        expected.set_memory_displ_size(8);
    }
    // A REP or HLE hint is dropped; an F2/F3 the opcode needs is kept.
    let hinted = instr.has_rep_prefix()
        || instr.has_repne_prefix()
        || instr.has_xacquire_prefix()
        || instr.has_xrelease_prefix();
    let keep_rep = if hinted { None } else { parts.last_rep };

    // 64-bit code needs no variant; 32-bit code may need W or is4
    // changed; 16-bit code also the operand size.
    for bits in 0..8u8 {
        let v = variant(bits);
        if (bitness == 64 && bits != 0) || (bitness == 32 && v.toggle_operand_size) {
            continue;
        }
        let Some(len) = patch(
            bytes,
            &parts,
            bitness,
            keep_rep,
            v,
            exec_ip,
            operand_addr,
            out,
        ) else {
            continue;
        };
        let check = Decoder::with_ip(64, &out[..len], exec_ip, DecoderOptions::NONE).decode();
        if check.len() == len && check == expected {
            return Ok(len);
        }
    }
    Err("re-encoding changed the instruction")
}

/// Finds the prefixes, the opcode and the ModRM byte of `bytes`.
fn split(bytes: &[u8], bitness: u32, encoding: EncodingKind) -> Result<Parts, ReencodeError> {
    let mut p = Parts {
        operand_size: false,
        lock: false,
        last_rep: None,
        rex: None,
        opcode_start: 0,
        modrm: 0,
        encoding,
    };
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            0x66 => p.operand_size = true,
            0xf0 => p.lock = true,
            0xf2 | 0xf3 => p.last_rep = Some(b),
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x67 => {}
            // REX counts only right before the opcode: a later prefix
            // (below) voids it, a later REX replaces it.
            0x40..=0x4f if bitness == 64 => {
                p.rex = Some(b);
                i += 1;
                continue;
            }
            _ => break,
        }
        p.rex = None;
        i += 1;
    }
    p.opcode_start = i;
    let opcode_len = match encoding {
        EncodingKind::Legacy | EncodingKind::D3NOW => match (bytes.get(i), bytes.get(i + 1)) {
            (Some(0x0f), Some(0x38 | 0x3a)) => 3,
            (Some(0x0f), Some(_)) => 2,
            (Some(_), _) => 1,
            _ => return Err("no opcode"),
        },
        EncodingKind::VEX => match bytes.get(i) {
            Some(0xc5) => 3,
            Some(0xc4) => 4,
            _ => return Err("not a VEX prefix"),
        },
        EncodingKind::XOP => 4,
        EncodingKind::EVEX => 5,
        _ => return Err("MVEX is not re-encoded"),
    };
    p.modrm = i + opcode_len;
    if p.modrm > bytes.len() {
        return Err("instruction cut short");
    }
    Ok(p)
}

/// The bytes of one candidate encoding.
struct Out<'a> {
    buf: &'a mut [u8; MAX_INSN_LEN],
    len: usize,
}

impl Out<'_> {
    fn put(&mut self, b: u8) -> Option<()> {
        *self.buf.get_mut(self.len)? = b;
        self.len += 1;
        Some(())
    }

    fn put_all(&mut self, bytes: &[u8]) -> Option<()> {
        bytes.iter().try_for_each(|&b| self.put(b))
    }

    fn clear_last_top_bit(&mut self) -> Option<()> {
        *self.buf.get_mut(self.len.checked_sub(1)?)? &= 0x7f;
        Some(())
    }
}

/// Writes one candidate encoding to `out`; `None` if the variant does
/// not apply or the result would not fit.
#[allow(clippy::too_many_arguments)]
fn patch(
    bytes: &[u8],
    p: &Parts,
    bitness: u32,
    keep_rep: Option<u8>,
    v: Variant,
    exec_ip: u64,
    operand_addr: Option<u64>,
    out: &mut [u8; MAX_INSN_LEN],
) -> Option<usize> {
    let op = &bytes[p.opcode_start..p.modrm];
    let vex2 = p.encoding == EncodingKind::VEX && op.first() == Some(&0xc5);
    let has_w = matches!(
        p.encoding,
        EncodingKind::VEX | EncodingKind::XOP | EncodingKind::EVEX
    ) && !vex2;
    let vex_or_xop = matches!(p.encoding, EncodingKind::VEX | EncodingKind::XOP);
    if (v.flip_w && !has_w) || (v.clear_is4_top && !vex_or_xop) {
        return None;
    }
    let mut out = Out { buf: out, len: 0 };
    if p.operand_size != v.toggle_operand_size {
        out.put(0x66)?;
    }
    if p.lock {
        out.put(0xf0)?;
    }
    if let Some(r) = keep_rep {
        out.put(r)?;
    }
    let mem = operand_addr.is_some();
    if let Some(rex) = p.rex {
        // RIP-relative addressing has no base or index to extend.
        out.put(if mem { rex & !0b11 } else { rex })?;
    }
    let start = out.len;
    out.put_all(op)?;
    let legacy_mode = bitness != 64;
    let payload = &mut out.buf[start..out.len];
    match p.encoding {
        // C5: R vvvv L pp (R and vvvv inverted). Outside 64-bit code
        // vvvv's top bit is ignored; R is already set there.
        EncodingKind::VEX if vex2 && legacy_mode => payload[1] |= 0x40,
        EncodingKind::VEX if vex2 => {}
        // C4/8F: R X B mmmmm, then W vvvv L pp (R, X, B, vvvv inverted).
        EncodingKind::VEX | EncodingKind::XOP => {
            if mem {
                payload[1] |= 0x60;
            }
            if legacy_mode {
                payload[1] |= 0xe0;
                payload[2] |= 0x40;
            }
            if v.flip_w {
                payload[2] ^= 0x80;
            }
        }
        // 62: R X B R' 0 mmm, W vvvv 1 pp, z L'L b V' aaa.
        EncodingKind::EVEX => {
            if mem {
                payload[1] |= 0x60;
            }
            if legacy_mode {
                payload[1] |= 0xf0;
                payload[2] |= 0x40;
                payload[3] |= 0x08;
            }
            if v.flip_w {
                payload[2] ^= 0x80;
            }
        }
        _ => {}
    }

    let Some(target) = operand_addr else {
        // No memory operand: the rest is copied as it is.
        out.put_all(&bytes[p.modrm..])?;
        if v.clear_is4_top {
            out.clear_last_top_bit()?;
        }
        return Some(out.len);
    };
    let modrm = *bytes.get(p.modrm)?;
    let (md, rm) = (modrm >> 6, modrm & 7);
    if md == 3 {
        return None;
    }
    let has_67 = bytes[..p.opcode_start].contains(&0x67);
    let addr16 = match bitness {
        16 => !has_67,
        32 => has_67,
        _ => false,
    };
    let (sib, disp) = if addr16 {
        (
            0,
            match (md, rm) {
                (0, 6) => 2,
                (0, _) => 0,
                (1, _) => 1,
                _ => 2,
            },
        )
    } else {
        let sib = usize::from(rm == 4);
        let base = if sib == 1 {
            *bytes.get(p.modrm + 1)? & 7
        } else {
            rm
        };
        (
            sib,
            match (md, base) {
                (0, 5) => 4,
                (0, _) => 0,
                (1, _) => 1,
                _ => 4,
            },
        )
    };
    let tail = bytes.get(p.modrm + 1 + sib + disp..)?;
    // ModRM mod 00, rm 101: [rip + disp32] in 64-bit code.
    out.put((modrm & 0x38) | 0x05)?;
    let disp_at = out.len;
    out.put_all(&[0; 4])?;
    out.put_all(tail)?;
    if v.clear_is4_top {
        out.clear_last_top_bit()?;
    }
    let next_ip = exec_ip.wrapping_add(out.len as u64);
    let rel = i32::try_from(target.wrapping_sub(next_ip) as i64).ok()?;
    out.buf[disp_at..disp_at + 4].copy_from_slice(&rel.to_le_bytes());
    Some(out.len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{classify, Kind};
    use iced_x86::Encoder;

    /// The re-encoding this module replaced, iced-x86's encoder on the
    /// decoded instruction, kept as the yardstick: whatever it could put
    /// in the stub, the patch must put there too, as the same
    /// instruction.
    fn encoder_reencode(
        instr: &Instruction,
        exec_ip: u64,
        target: Option<u64>,
    ) -> Option<Instruction> {
        let mut insn = *instr;
        insn.set_segment_prefix(Register::None);
        insn.set_has_xacquire_prefix(false);
        insn.set_has_xrelease_prefix(false);
        insn.set_has_rep_prefix(false);
        insn.set_has_repne_prefix(false);
        if let Some(t) = target {
            insn.set_memory_base(Register::RIP);
            insn.set_memory_index(Register::None);
            insn.set_memory_index_scale(1);
            insn.set_memory_displacement64(t);
            insn.set_memory_displ_size(8);
        }
        let mut enc = Encoder::new(64);
        let len = enc.encode(&insn, exec_ip).ok()?;
        let bytes = enc.take_buffer();
        if len > MAX_INSN_LEN {
            return None;
        }
        let check = Decoder::with_ip(64, &bytes, exec_ip, DecoderOptions::NONE).decode();
        let same_target = target.is_none_or(|t| {
            check.memory_base() == Register::RIP && check.memory_displacement64() == t
        });
        (check.code() == instr.code() && check.len() == len && same_target).then_some(check)
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random bytes shaped like an instruction: some legacy prefixes, a
    /// REX, then one of the opcode maps and encodings, then random ModRM,
    /// SIB, displacement and immediate bytes (memory forms favoured).
    fn random_insn(rng: &mut Rng, bitness: u32, out: &mut [u8; 15]) {
        for b in out.iter_mut() {
            *b = rng.byte();
        }
        let escape: &[u8] = match rng.below(10) {
            0 => &[],
            1 | 2 => &[0x0f],
            3 => &[0x0f, 0x38],
            4 => &[0x0f, 0x3a],
            5 => &[0xc5],
            6 | 7 => &[0xc4],
            _ => &[0x62],
        };
        // Before VEX and EVEX only segment and address-size prefixes are
        // allowed, and no REX.
        let vex = matches!(escape, [0xc5] | [0xc4] | [0x62]);
        const PREFIXES: [u8; 11] = [
            0x2e, 0x26, 0x64, 0x65, 0x36, 0x3e, 0x67, 0x66, 0xf2, 0xf3, 0xf0,
        ];
        let usable = if vex { 7 } else { PREFIXES.len() as u64 };
        let mut i = 0;
        for _ in 0..rng.below(4) {
            out[i] = PREFIXES[rng.below(usable) as usize];
            i += 1;
        }
        // REX, sometimes followed by a legacy prefix (which voids it) or a
        // second REX (which replaces it).
        if bitness == 64 && !vex && rng.below(2) == 0 {
            out[i] = 0x40 | (rng.byte() & 0xf);
            i += 1;
            match rng.below(8) {
                0 => out[i] = PREFIXES[rng.below(PREFIXES.len() as u64) as usize],
                1 => out[i] = 0x40 | (rng.byte() & 0xf),
                _ => i -= 1,
            }
            i += 1;
        }
        out[i..i + escape.len()].copy_from_slice(escape);
        i += escape.len();
        // In 16/32-bit code C4/C5/62 are VEX/EVEX only with the next
        // byte's top bits set.
        if bitness != 64 && vex {
            out[i] |= 0xc0;
        }
        // EVEX's fixed bits: P0 bit 3 clear and a map (0F, 0F38, 0F3A),
        // P1 bit 2 set.
        if escape == [0x62] {
            out[i] = (out[i] & 0xf0) | (1 + rng.below(3) as u8);
            out[i + 1] |= 0x04;
        }
        let payload = match escape {
            [0xc5] => 2,
            [0xc4] => 3,
            [0x62] => 4,
            [] | [0x0f] => 1,
            _ => 1,
        };
        // The ModRM byte, usually a memory form.
        let modrm = i + payload;
        if modrm < 15 && rng.below(4) != 0 {
            out[modrm] &= 0xbf;
        }
    }

    /// Where the stub's copy runs and its operand lies (as in a StubBuf:
    /// the bounce buffer a few KiB from the code).
    const EXEC_IP: u64 = 0x7f12_3456_0000;

    /// Every instruction the emulator would run in the stub, from random
    /// instruction-shaped bytes in 16-, 32- and 64-bit code: the patch
    /// re-encodes each one iced-x86's encoder could, as the same
    /// instruction with its operand at the target.
    #[test]
    fn patch_covers_what_the_encoder_covered() {
        let seed = std::env::var("REENCODE_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x5eed_2026_1130);
        let mut rng = Rng(seed);
        for bitness in [16u32, 32, 64] {
            let (mut stubbed, mut both, mut patch_only) = (0u32, 0u32, 0u32);
            let (mut vex, mut evex) = (0u32, 0u32);
            let mut missed = Vec::new();
            let cases: u32 = std::env::var("REENCODE_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(200_000);
            for _ in 0..cases {
                let mut bytes = [0u8; 15];
                random_insn(&mut rng, bitness, &mut bytes);
                let mut instr =
                    Decoder::with_ip(bitness, &bytes, 0x1000, DecoderOptions::NONE).decode();
                let Ok(class) = classify(&instr) else {
                    continue;
                };
                let has_mem = (0..instr.op_count()).any(|i| instr.op_kind(i) == OpKind::Memory);
                match class.kind {
                    Kind::Plain | Kind::WholeState | Kind::CacheLine | Kind::CacheHint => {}
                    Kind::MaskedImplicit => instr.set_op0_kind(OpKind::MemorySegRDI),
                    _ => continue,
                }
                stubbed += 1;
                let target = has_mem.then(|| EXEC_IP + 0x1000 + rng.below(64));
                let old = encoder_reencode(&instr, EXEC_IP, target);
                let mut out = [0u8; MAX_INSN_LEN];
                let new = reencode(&instr, &bytes, EXEC_IP, target, &mut out).map(|len| {
                    Decoder::with_ip(64, &out[..len], EXEC_IP, DecoderOptions::NONE).decode()
                });
                match (old, new) {
                    (Some(o), Ok(n)) => {
                        assert_eq!(o, n, "{bitness}-bit {bytes:02x?}: patch {:02x?}", &out);
                        both += 1;
                        vex += u32::from(instr.encoding() == EncodingKind::VEX);
                        evex += u32::from(instr.encoding() == EncodingKind::EVEX);
                    }
                    (None, Ok(_)) => patch_only += 1,
                    (Some(_), Err(why)) => missed.push(format!("{instr} ({bytes:02x?}): {why}")),
                    (None, Err(_)) => {}
                }
            }
            eprintln!(
                "{bitness}-bit: {stubbed} stub instructions, {both} re-encoded by both \
                 ({vex} VEX, {evex} EVEX), {patch_only} by the patch only, {} by the encoder only",
                missed.len()
            );
            assert!(
                missed.is_empty(),
                "{bitness}-bit, encoder only:\n{}",
                missed.join("\n")
            );
            assert!(
                both > 10_000 && vex > 300 && evex > 300,
                "{bitness}-bit corpus too thin: {both}, {vex}, {evex}"
            );
        }
    }

    fn decode(bitness: u32, bytes: &[u8]) -> Instruction {
        Decoder::with_ip(bitness, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    /// Bytes that are not the instruction's own are refused, whatever they
    /// decode to: the stub never runs anything but the guest's instruction.
    #[test]
    fn bytes_of_another_instruction_are_refused() {
        // movups xmm1, [rax] decoded; movups xmm2, [rax] given as its bytes.
        let instr = decode(64, &[0x0f, 0x10, 0x08]);
        let mut out = [0u8; MAX_INSN_LEN];
        let target = Some(EXEC_IP + 0x1000);
        assert!(reencode(&instr, &[0x0f, 0x10, 0x10], EXEC_IP, target, &mut out).is_err());
        assert!(reencode(&instr, &[0x0f, 0x10], EXEC_IP, target, &mut out).is_err());
        assert!(reencode(&instr, &[0x0f, 0x10, 0x08], EXEC_IP, None, &mut out).is_err());
        assert_eq!(
            reencode(&instr, &[0x0f, 0x10, 0x08], EXEC_IP, target, &mut out),
            Ok(7)
        );
    }

    /// Segment overrides, the address-size prefix and REP/HLE hints are
    /// dropped; a mandatory F2/F3 is kept (the last one, as the CPU reads
    /// it); REX loses X and B under RIP-relative addressing.
    #[test]
    fn prefixes_the_stub_keeps() {
        let cases: [(u32, &[u8], &[u8]); 5] = [
            // xrelease lock cmpxchg16b fs:[r9+rcx*4+8] (F3 is a hint)
            (
                64,
                &[0xf3, 0xf0, 0x64, 0x4b, 0x0f, 0xc7, 0x4c, 0x89, 0x08],
                &[0xf0, 0x48, 0x0f, 0xc7, 0x0d],
            ),
            // F2 F3 addss xmm1, es:[eax] with 67: F3 is the mandatory one
            (
                64,
                &[0xf2, 0x67, 0x26, 0xf3, 0x0f, 0x58, 0x08],
                &[0xf3, 0x0f, 0x58, 0x0d],
            ),
            // REX.W then 66: the REX is void, 66 stays (movdqa xmm1, [rax])
            (
                64,
                &[0x48, 0x66, 0x0f, 0x6f, 0x08],
                &[0x66, 0x0f, 0x6f, 0x0d],
            ),
            // 16-bit fnstenv [bx+si+2] (14-byte form): 66 added in 64-bit code
            (16, &[0xd9, 0x70, 0x02], &[0x66, 0xd9, 0x35]),
            // 32-bit vmovdqu ymm1, [ebx] with VEX.B clear (ignored there)
            (
                32,
                &[0xc4, 0xc1, 0x7e, 0x6f, 0x0b],
                &[0xc4, 0xe1, 0x7e, 0x6f, 0x0d],
            ),
        ];
        for (bitness, bytes, want) in cases {
            let instr = decode(bitness, bytes);
            assert!(!instr.is_invalid(), "{bytes:02x?}");
            let mut out = [0u8; MAX_INSN_LEN];
            let len = reencode(&instr, bytes, EXEC_IP, Some(EXEC_IP + 0x1000), &mut out)
                .unwrap_or_else(|e| panic!("{bitness}-bit {bytes:02x?}: {e}"));
            assert_eq!(
                &out[..len - 4],
                want,
                "{bitness}-bit {bytes:02x?} ({instr})"
            );
        }
    }
}
