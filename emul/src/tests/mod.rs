//! End-to-end and unit tests on a mock platform: the harness (a guest's
//! RAM and MMIO window, page tables, a racing vCPU) here, the tests in one
//! file per concern, named like the emulator's own files.

use iced_x86::code_asm::*;

use crate::classify::classify;
use crate::cpu::*;
use crate::exception::*;
use crate::paging::{translate, Access, WalkError, PFEC_ID, PFEC_P, PFEC_RSVD, PFEC_U, PFEC_W};
use crate::platform::*;
use crate::{CpuState, Emulator, Outcome};

mod cache;
mod direct;
mod flow;
mod gather;
mod hostile;
mod implicit;
mod paging;
mod selector;
mod shape;
mod state;
mod vector;

const RAM_SIZE: usize = 8 << 20;

const MMIO_BASE: u64 = 0xf000_0000;

const MMIO_SIZE: u64 = 0x10000;

/// "RAM" in a Vec, plus an MMIO window whose accesses are recorded.
struct MockPlatform {
    ram: Vec<u8>,
    mmio: Vec<u8>,
    /// (write, gpa, len) of every access, RAM and MMIO.
    log: Vec<(bool, u64, usize)>,
    /// Next free page for page tables.
    next_table: u64,
}

impl MockPlatform {
    fn new() -> Self {
        MockPlatform {
            ram: vec![0; RAM_SIZE],
            mmio: vec![0; MMIO_SIZE as usize],
            log: Vec::new(),
            next_table: 0x10_0000,
        }
    }
    fn slot(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], PlatformError> {
        let err = PlatformError {
            gpa,
            len,
            reason: "unbacked",
        };
        if (MMIO_BASE..MMIO_BASE + MMIO_SIZE).contains(&gpa) {
            let off = (gpa - MMIO_BASE) as usize;
            return self.mmio.get_mut(off..off + len).ok_or(err);
        }
        let off = gpa as usize;
        self.ram.get_mut(off..off + len).ok_or(err)
    }
    fn u64_at(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.ram[gpa as usize..gpa as usize + 8].try_into().unwrap())
    }
    fn set_u64(&mut self, gpa: u64, v: u64) {
        self.ram[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn set_u32(&mut self, gpa: u64, v: u32) {
        self.ram[gpa as usize..gpa as usize + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn alloc_table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += 0x1000;
        t
    }
    /// Maps 4 KiB page `lin` -> `gpa` in 4- or 5-level tables at `cr3`.
    fn map(&mut self, root: u64, levels: u32, lin: u64, gpa: u64, flags: u64) {
        let mut table = root;
        for level in (1..levels).rev() {
            let shift = 12 + 9 * level;
            let slot = table + ((lin >> shift) & 0x1ff) * 8;
            let mut e = self.u64_at(slot);
            if e & 1 == 0 {
                e = self.alloc_table() | 0x7;
                self.set_u64(slot, e);
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        self.set_u64(table + ((lin >> 12) & 0x1ff) * 8, gpa | flags);
    }
    fn leaf(&mut self, root: u64, levels: u32, lin: u64) -> u64 {
        self.u64_at(self.leaf_slot(root, levels, lin))
    }
    /// The guest-physical address of the 4 KiB leaf entry mapping `lin`.
    fn leaf_slot(&self, root: u64, levels: u32, lin: u64) -> u64 {
        let mut table = root;
        for level in (1..levels).rev() {
            let e = self.u64_at(table + ((lin >> (12 + 9 * level)) & 0x1ff) * 8);
            table = e & 0x000f_ffff_ffff_f000;
        }
        table + ((lin >> 12) & 0x1ff) * 8
    }
}

impl Platform for MockPlatform {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        self.log.push((false, gpa, buf.len()));
        buf.copy_from_slice(self.slot(gpa, buf.len())?);
        Ok(())
    }
    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
        self.log.push((true, gpa, buf.len()));
        self.slot(gpa, buf.len())?.copy_from_slice(buf);
        Ok(())
    }
}

const CR3: u64 = 0x1000;

const CODE: u64 = 0x40_0000;

const DATA: u64 = 0x60_0000;

const RW: u64 = 0x3;

/// A 64-bit CPL-0 guest: code page at CODE and 4 data pages at DATA
/// (identity-mapped, writable), plus the MMIO window.
fn setup() -> (CpuState, MockPlatform) {
    let mut mem = MockPlatform::new();
    mem.map(CR3, 4, CODE, CODE, RW);
    for p in 0..4 {
        mem.map(CR3, 4, DATA + p * 0x1000, DATA + p * 0x1000, RW);
    }
    for p in 0..(MMIO_SIZE / 0x1000) {
        mem.map(CR3, 4, MMIO_BASE + p * 0x1000, MMIO_BASE + p * 0x1000, RW);
    }
    let mut cpu = CpuState::long_mode(CR3);
    cpu.rip = CODE;
    (cpu, mem)
}

fn asm64(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

fn emul() -> Emulator {
    Emulator::new(true).unwrap()
}

fn done(o: &Outcome) {
    assert!(matches!(o, Outcome::Done { .. }), "{o:?}");
}

fn exc(o: &Outcome) -> (u8, Option<u32>) {
    match o {
        Outcome::Exception {
            vector, error_code, ..
        } => (*vector, *error_code),
        _ => panic!("expected an exception, got {o:?}"),
    }
}

/// Another vCPU storing to one page-table entry between the walk's read
/// of it and the walk's locked accessed/dirty update: each update attempt
/// at `slot` first lands the next of `stores` (the last one repeats).
struct RacingVcpu<'a> {
    mem: &'a mut MockPlatform,
    slot: u64,
    stores: Vec<u64>,
    attempts: usize,
}

impl<'a> RacingVcpu<'a> {
    fn new(mem: &'a mut MockPlatform, slot: u64, stores: Vec<u64>) -> Self {
        RacingVcpu {
            mem,
            slot,
            stores,
            attempts: 0,
        }
    }
}

impl Platform for RacingVcpu<'_> {
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), PlatformError> {
        self.mem.read_phys(gpa, buf)
    }
    fn write_phys(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PlatformError> {
        self.mem.write_phys(gpa, buf)
    }
    fn compare_exchange_phys(
        &mut self,
        gpa: u64,
        current: &[u8],
        new: &[u8],
    ) -> Result<bool, PlatformError> {
        if gpa == self.slot {
            // A store of the entry's (or operand's) own width.
            let i = self.attempts.min(self.stores.len() - 1);
            let n = current.len().min(8);
            self.mem
                .slot(gpa, n)?
                .copy_from_slice(&self.stores[i].to_le_bytes()[..n]);
            self.attempts += 1;
        }
        let slot = self.mem.slot(gpa, new.len())?;
        if slot != current {
            return Ok(false);
        }
        slot.copy_from_slice(new);
        Ok(true)
    }
}

fn avx_ok() -> bool {
    is_x86_feature_detected!("avx") && Emulator::new(true).is_ok()
}

fn mxcsr(img: &XsaveImage) -> u32 {
    u32::from_le_bytes(img.bytes[24..28].try_into().unwrap())
}

fn xsave_ok() -> bool {
    is_x86_feature_detected!("xsave") && Emulator::new(true).is_ok()
}

/// An image with x87, SSE (xmm1 = 0x11.., MXCSR 0x1f80 | DAZ) present.
fn state_image() -> XsaveImage {
    let mut img = XsaveImage::new();
    img.bytes[0..2].copy_from_slice(&0x27fu16.to_le_bytes()); // FCW: precision 53
    img.bytes[24..28].copy_from_slice(&0x1fc0u32.to_le_bytes());
    img.bytes[176..192].fill(0x11);
    img.bytes[512] = 0b11;
    img
}
