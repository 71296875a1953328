//! The result record each form writes per way, and where the tables live.
//!
//! Every record has the same fixed layout so that the guest's save code is
//! shared by all forms and the host can compare records field by field.

/// Guest-physical address of the first result table; way `w`'s table is at
/// `TABLES + w * table_size(forms)`.
pub const TABLES: u64 = 0x40_0000;
/// The RAM copy of the operand buffer (inside the first 2 MiB, clear of the
/// image and the kernel's stacks, which grow down from 0x1f0000). Its low
/// 16 bits equal [`MMIO_BASE`]'s, so a 16-bit LEA of the operand gives the
/// same value in every way.
pub const RAM_BUF: u64 = 0x1f_0000;
/// The `--mmio-ram` window and the operand buffer at its start. It must not
/// overlap RAM.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Large enough for the largest operand window (the XSAVE area: 2.5 KiB
/// with AVX-512, 11 KiB with AMX state enabled).
pub const MMIO_SIZE: u64 = 0x4000;

/// Guest RAM of every diff VM: it ends where the split way's MMIO window
/// begins.
pub const GUEST_RAM: u64 = 0x400_0000;
/// Bytes of the split way's operand buffer that lie in RAM; the rest is on
/// the MMIO window at [`GUEST_RAM`].
pub const SPLIT_AT: u64 = 0x800;
/// The split way's operand buffer (64-byte aligned, as XSAVE needs).
pub const SPLIT_BUF: u64 = GUEST_RAM - SPLIT_AT;

/// Size of the fixed part of a record; a multiple of 64 so FXSAVE and ZMM
/// stores are aligned. A form whose operand window is larger than
/// [`MEM_LEN`] has the rest of the window right after it.
pub const RECORD: usize = 1152;

/// Exception vector, or [`NO_EXCEPTION`].
pub const EXC_VECTOR: usize = 0;
pub const EXC_ERROR: usize = 8;
/// RAX..R15 in encoding order; RSP's slot holds how far RSP moved from
/// the instruction to the point it resumed at (0 unless a form's stack
/// fix-up was skipped by a fault).
pub const GPRS: usize = 16;
/// RSP's slot among [`GPRS`]: how far RSP moved (see [`GPRS`]).
pub const RSP_CHANGE: usize = GPRS + 8 * 4;
pub const RFLAGS: usize = 144;
/// The operand buffer after the instruction (its first [`MEM_LEN`] bytes).
pub const MEM: usize = 160;
pub const MEM_LEN: usize = 64;
/// K1..K4 (KMOVQ), AVX-512 forms only.
pub const KREGS: usize = 224;
pub const KREG_COUNT: usize = 4;
/// FXSAVE64 image (x87, MXCSR, XMM0-15), vector forms only.
pub const FXSAVE: usize = 256;
/// ZMM0..4 (64 bytes each; YMM: 32 bytes each), vector forms only.
pub const VREGS: usize = 768;
pub const VREG_COUNT: usize = 5;

pub const NO_EXCEPTION: u64 = u64::MAX;

/// The arithmetic flags compared (CF PF AF ZF SF OF) plus DF.
pub const FLAGS_MASK: u64 = 0xcd5;

pub const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// Bytes of the record of a form whose operand window is `mem_len` bytes.
pub fn record_size(mem_len: usize) -> usize {
    RECORD + mem_len.max(MEM_LEN) - MEM_LEN
}

/// Guest-physical address of `way`'s table, when one table is `table_len`
/// bytes.
pub fn table_addr(way: usize, table_len: usize) -> u64 {
    TABLES + (way * table_len) as u64
}

/// One field of a record that two ways must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub len: usize,
    /// Bits that count (applied to every byte; `None`: all).
    pub mask: Option<u64>,
}

fn field(name: impl Into<String>, offset: usize, len: usize) -> Field {
    Field {
        name: name.into(),
        offset,
        len,
        mask: None,
    }
}

/// The fields of a record, by what the form touches. RSP and RBP are left
/// out: RSP differs between CPL 0 and CPL 3 stacks, and RBP is the operand
/// buffer's address, which differs between RAM and MMIO.
pub fn fields(vector: bool, kregs: bool, vreg_bytes: usize, mem_len: usize) -> Vec<Field> {
    let mut v = vec![
        field("exception vector", EXC_VECTOR, 8),
        field("exception error code", EXC_ERROR, 8),
    ];
    for (i, n) in GPR_NAMES.iter().enumerate() {
        match *n {
            "rbp" => {}
            "rsp" => v.push(field("rsp change", RSP_CHANGE, 8)),
            _ => v.push(field(*n, GPRS + 8 * i, 8)),
        }
    }
    v.push(Field {
        name: "rflags".into(),
        offset: RFLAGS,
        len: 8,
        mask: Some(FLAGS_MASK),
    });
    v.push(field("memory operand", MEM, MEM_LEN));
    // The rest of a large window, in 64-byte pieces so a mismatch says
    // where it is.
    for at in (MEM_LEN..mem_len).step_by(64) {
        v.push(field(
            format!("memory operand +{at:#x}"),
            RECORD + at - MEM_LEN,
            64.min(mem_len - at),
        ));
    }
    if kregs {
        for i in 0..KREG_COUNT {
            v.push(field(format!("k{}", i + 1), KREGS + 8 * i, 8));
        }
    }
    if vector {
        v.push(field("x87 FCW", FXSAVE, 2));
        v.push(field("x87 FSW", FXSAVE + 2, 2));
        v.push(field("x87 FTW (abridged)", FXSAVE + 4, 1));
        v.push(field(X87_POINTERS, FXSAVE + 6, 18));
        v.push(field("MXCSR", FXSAVE + 24, 4));
        for i in 0..8 {
            v.push(field(format!("st/mm slot {i}"), FXSAVE + 32 + 16 * i, 10));
        }
        for i in 0..16 {
            v.push(field(format!("xmm{i}"), FXSAVE + 160 + 16 * i, 16));
        }
        if vreg_bytes > 0 {
            let name = if vreg_bytes == 64 { "zmm" } else { "ymm" };
            for i in 0..VREG_COUNT {
                v.push(field(
                    format!("{name}{i}"),
                    VREGS + vreg_bytes * i,
                    vreg_bytes,
                ));
            }
        }
    }
    v
}

/// Name of the FXSAVE field holding FOP, FIP and FDP: the x87 last
/// instruction and data pointers.
pub const X87_POINTERS: &str = "x87 FOP/FIP/FDP";

/// `bytes[offset..offset+len]` as a little-endian u64 (for fields of up to 8
/// bytes).
pub fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    let end = (offset + 8).min(bytes.len());
    if offset < end {
        b[..end - offset].copy_from_slice(&bytes[offset..end]);
    }
    u64::from_le_bytes(b)
}
