//! Test fixtures: guest memory, hand-assembled ELF and Multiboot images, and
//! a tiny PRNG for mutation tests (no proptest dependency).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::LoadError;

/// A predicate on an error, for table-driven error tests.
pub type ErrorCheck = fn(&LoadError) -> bool;

pub const MEM_SIZE: u64 = 16 << 20;

pub fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Builds an ELF executable byte by byte: header, program header table, an
/// optional blob (e.g. a Multiboot header), then each segment's file bytes.
pub struct ElfBuilder {
    class64: bool,
    entry: u64,
    /// (paddr, vaddr, file bytes, memsz)
    segments: Vec<(u64, u64, Vec<u8>, u64)>,
    blob: Vec<u8>,
}

impl ElfBuilder {
    pub fn new(class64: bool) -> Self {
        Self {
            class64,
            entry: 0,
            segments: Vec::new(),
            blob: Vec::new(),
        }
    }

    pub fn entry(mut self, entry: u64) -> Self {
        self.entry = entry;
        self
    }

    /// A PT_LOAD segment with `p_paddr == p_vaddr == gpa`.
    pub fn segment(self, gpa: u64, data: &[u8], memsz: u64) -> Self {
        self.segment_at(gpa, gpa, data, memsz)
    }

    pub fn segment_at(mut self, paddr: u64, vaddr: u64, data: &[u8], memsz: u64) -> Self {
        self.segments.push((paddr, vaddr, data.to_vec(), memsz));
        self
    }

    /// Bytes placed right after the program header table.
    pub fn blob(mut self, blob: &[u8]) -> Self {
        self.blob = blob.to_vec();
        self
    }

    fn word(&self, out: &mut Vec<u8>, v: u64) {
        if self.class64 {
            out.extend_from_slice(&v.to_le_bytes());
        } else {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let (ehsize, phentsize): (u16, u16) = if self.class64 { (64, 56) } else { (52, 32) };
        let phnum = self.segments.len() as u16;
        let phoff = u64::from(ehsize);
        let blob_off = phoff + u64::from(phnum) * u64::from(phentsize);
        let mut data_off = blob_off + self.blob.len() as u64;

        let mut out = Vec::new();
        out.extend_from_slice(b"\x7fELF");
        out.push(if self.class64 { 2 } else { 1 }); // EI_CLASS
        out.push(1); // EI_DATA: little-endian
        out.push(1); // EI_VERSION
        out.resize(16, 0);
        out.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
        let machine: u16 = if self.class64 { 62 } else { 3 };
        out.extend_from_slice(&machine.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes()); // e_version
        self.word(&mut out, self.entry);
        self.word(&mut out, phoff);
        self.word(&mut out, 0); // e_shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        out.extend_from_slice(&ehsize.to_le_bytes());
        out.extend_from_slice(&phentsize.to_le_bytes());
        out.extend_from_slice(&phnum.to_le_bytes());
        out.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
        assert_eq!(out.len(), usize::from(ehsize));

        for (paddr, vaddr, data, memsz) in &self.segments {
            let filesz = data.len() as u64;
            out.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
            if self.class64 {
                out.extend_from_slice(&7u32.to_le_bytes()); // p_flags: RWX
            }
            self.word(&mut out, data_off);
            self.word(&mut out, *vaddr);
            self.word(&mut out, *paddr);
            self.word(&mut out, filesz);
            self.word(&mut out, *memsz);
            if !self.class64 {
                out.extend_from_slice(&7u32.to_le_bytes()); // p_flags
            }
            self.word(&mut out, 0x1000); // p_align
            data_off += filesz;
        }
        out.extend_from_slice(&self.blob);
        for (_, _, data, _) in &self.segments {
            out.extend_from_slice(data);
        }
        out
    }
}

/// A Multiboot v1 header with a valid checksum; `aout` holds header_addr,
/// load_addr, load_end_addr, bss_end_addr, entry_addr (used with flag 16).
pub fn multiboot_header(flags: u32, aout: Option<[u32; 5]>) -> Vec<u8> {
    const MAGIC: u32 = 0x1bad_b002;
    let checksum = 0u32.wrapping_sub(MAGIC).wrapping_sub(flags);
    let mut out = Vec::new();
    for v in [MAGIC, flags, checksum] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in aout.into_iter().flatten() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// xorshift64: deterministic, dependency-free randomness for mutation tests.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
