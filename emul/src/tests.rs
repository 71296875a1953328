//! End-to-end and unit tests on a mock platform.

use iced_x86::code_asm::*;

use crate::classify::classify;
use crate::cpu::*;
use crate::exception::*;
use crate::paging::{translate, Access, WalkError, PFEC_ID, PFEC_P, PFEC_RSVD, PFEC_U, PFEC_W};
use crate::platform::*;
use crate::{CpuState, Emulator, Outcome};

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

#[test]
fn add_to_memory_advances_rip_and_sets_accessed_dirty() {
    let (mut cpu, mut mem) = setup();
    let code = asm64(|a| a.add(dword_ptr(rax), ebx));
    mem.set_u32(DATA + 8, 40);
    cpu.gprs.rax = DATA + 8;
    cpu.gprs.rbx = 2;
    let o = emul().emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
    assert_eq!(
        o,
        Outcome::Done {
            mnemonic: iced_x86::Mnemonic::Add
        }
    );
    assert_eq!(mem.u64_at(DATA + 8) as u32, 42);
    assert_eq!(cpu.rip, CODE + code.len() as u64);
    let leaf = mem.leaf(CR3, 4, DATA);
    assert_eq!(leaf & 0x60, 0x60, "A and D on the leaf");
    assert_eq!(mem.u64_at(CR3) & 0x20, 0x20, "A on the PML4E");
}

#[test]
fn bytes_are_fetched_when_absent_or_short() {
    let (mut cpu, mut mem) = setup();
    let code = asm64(|a| a.add(dword_ptr(rax + 0x1234), 7));
    mem.ram[CODE as usize..CODE as usize + code.len()].copy_from_slice(&code);
    cpu.gprs.rax = DATA;
    let mut e = emul();
    done(&e.emulate(&mut cpu, &[], &mut NoVectorState, &mut mem));
    cpu.rip = CODE;
    done(&e.emulate(&mut cpu, &code[..2], &mut NoVectorState, &mut mem));
    assert_eq!(mem.u64_at(DATA + 0x1234) as u32, 14);
}

#[test]
fn walk_faults_and_permissions() {
    let (mut cpu, mut mem) = setup();
    let ro = 0x70_0000;
    mem.map(CR3, 4, ro, ro, 0x1); // present, read-only, supervisor
    let user_nx = 0x71_0000;
    mem.map(CR3, 4, user_nx, user_nx, 0x7 | 1 << 63);
    let w = Access {
        write: true,
        ..Default::default()
    };
    let pf = |r: Result<u64, WalkError>| match r {
        Err(WalkError::Fault(e)) => (e.vector, e.error_code.unwrap(), e.cr2.unwrap()),
        other => panic!("{other:?}"),
    };
    // Not present.
    assert_eq!(
        pf(translate(&cpu, 0x7f_0000, Access::default(), &mut mem)),
        (VEC_PF, 0, 0x7f_0000)
    );
    // Write to read-only with WP; allowed for the supervisor without WP.
    assert_eq!(
        pf(translate(&cpu, ro + 8, w, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_W, ro + 8)
    );
    cpu.cr0 &= !CR0_WP;
    assert_eq!(translate(&cpu, ro + 8, w, &mut mem), Ok(ro + 8));
    // User access to a supervisor page.
    let user = Access {
        user: true,
        ..Default::default()
    };
    assert_eq!(
        pf(translate(&cpu, ro, user, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_U, ro)
    );
    // NX fetch.
    let fetch = Access {
        fetch: true,
        ..Default::default()
    };
    assert_eq!(
        pf(translate(&cpu, user_nx, fetch, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_ID, user_nx)
    );
    // SMAP: a supervisor read of a user page faults unless RFLAGS.AC.
    let user_page = 0x72_0000;
    mem.map(CR3, 4, user_page, user_page, 0x7);
    assert_eq!(
        translate(&cpu, user_page, Access::default(), &mut mem),
        Ok(user_page)
    );
    cpu.cr4 |= CR4_SMAP;
    assert_eq!(
        pf(translate(&cpu, user_page + 4, Access::default(), &mut mem)),
        (VEC_PF, PFEC_P, user_page + 4)
    );
    cpu.gprs.rflags |= RFLAGS_AC;
    assert_eq!(
        translate(&cpu, user_page, Access::default(), &mut mem),
        Ok(user_page)
    );
    // ... and never applies to user-mode accesses.
    cpu.gprs.rflags &= !RFLAGS_AC;
    assert_eq!(translate(&cpu, user_page, user, &mut mem), Ok(user_page));
    cpu.cr4 &= !CR4_SMAP;
    // SMEP: a supervisor fetch from a user page faults, with I/D set.
    cpu.cr4 |= CR4_SMEP;
    assert_eq!(
        pf(translate(&cpu, user_page, fetch, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_ID, user_page)
    );
    cpu.cr4 &= !CR4_SMEP;
    // NX without EFER.NXE is a reserved bit.
    cpu.efer &= !EFER_NXE;
    assert_eq!(
        pf(translate(&cpu, user_nx, user, &mut mem)),
        (VEC_PF, PFEC_P | PFEC_RSVD | PFEC_U, user_nx)
    );
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

/// The walker sets accessed/dirty bits with a locked compare-and-exchange
/// and walks again when the entry changed: an entry another vCPU cleared
/// stays clear (a plain write of `entry | A` would map the page again
/// behind the guest's back), and a remapped one is used as it is now.
#[test]
fn walk_restarts_when_another_vcpu_changes_an_entry() {
    let (cpu, mut mem) = setup();
    let slot = mem.leaf_slot(CR3, 4, DATA);
    let before = mem.u64_at(slot);
    assert_eq!(before & 0x20, 0, "the walk has an accessed bit to set");
    let read = Access::default();

    // Unmapped under the walk: not present, and it stays unmapped.
    let mut racing = RacingVcpu::new(&mut mem, slot, vec![0]);
    match translate(&cpu, DATA + 0x10, read, &mut racing) {
        Err(WalkError::Fault(e)) => {
            assert_eq!(
                (e.vector, e.error_code, e.cr2),
                (VEC_PF, Some(0), Some(DATA + 0x10))
            )
        }
        other => panic!("expected #PF, got {other:?}"),
    }
    assert_eq!(racing.attempts, 1);
    assert_eq!(mem.u64_at(slot), 0, "the cleared entry was written back");

    // Remapped under the walk: the new frame, with its accessed bit.
    mem.set_u64(slot, before);
    let moved = 0x9000 | RW;
    let mut racing = RacingVcpu::new(&mut mem, slot, vec![moved]);
    assert_eq!(translate(&cpu, DATA + 0x10, read, &mut racing), Ok(0x9010));
    assert_eq!(mem.u64_at(slot), moved | 0x20);

    // An entry that changes before every update: after a bounded number of
    // walks the instruction goes back to the guest to retry, with no guess
    // made and nothing written.
    mem.set_u64(slot, before);
    // Flips an ignored bit, so each value differs from the last.
    let flips = (1..=2000).map(|i| before ^ ((i & 1) << 9)).collect();
    let mut racing = RacingVcpu::new(&mut mem, slot, flips);
    match translate(&cpu, DATA, read, &mut racing) {
        Err(WalkError::Contended { gpa }) => assert_eq!(gpa, slot),
        other => panic!("expected contention, got {other:?}"),
    }
    assert!(racing.attempts > 1 && racing.attempts < 2000);

    // 32-bit paging, a write: the 4-byte leaf is remapped under the walk;
    // the new frame comes back with A and D, the next entry untouched.
    let cpu32 = CpuState {
        cr0: CR0_PE | CR0_PG,
        cr3: 0x2000,
        ..Default::default()
    };
    let lin = 0x0080_5678u64;
    mem.set_u32(0x2000 + 4 * 2, 0x3000 | 0x23); // PDE: P, RW, A
    let pte = 0x3000 + 4 * 5;
    mem.set_u32(pte, 0x5000 | 0x3);
    mem.set_u32(pte + 4, 0x7000 | 0x3);
    let write = Access {
        write: true,
        ..Default::default()
    };
    let mut racing = RacingVcpu::new(&mut mem, pte, vec![0x6000 | 0x3]);
    assert_eq!(translate(&cpu32, lin, write, &mut racing), Ok(0x6678));
    assert_eq!(racing.attempts, 2);
    assert_eq!(mem.u64_at(pte), (0x7003 << 32) | 0x6063);
}

#[test]
fn walk_modes_pae_legacy32_and_5level() {
    let mut mem = MockPlatform::new();
    // 32-bit paging with a 4 MiB page and a 4 KiB page.
    let mut cpu = CpuState {
        cr0: CR0_PE | CR0_PG,
        cr3: 0x2000,
        cr4: CR4_PSE,
        ..Default::default()
    };
    mem.set_u32(0x2000 + 4, 0x0040_0000 | 0x83); // 4 MiB at 4 MiB
    mem.set_u32(0x2000 + 4 * 2, 0x3000 | 0x3); // PT for 8 MiB..
    mem.set_u32(0x3000 + 4 * 5, 0x0055_5000 | 0x3);
    let r = Access::default();
    assert_eq!(translate(&cpu, 0x0041_2345, r, &mut mem), Ok(0x0041_2345));
    assert_eq!(translate(&cpu, 0x0080_5678, r, &mut mem), Ok(0x0055_5678));
    assert_eq!(mem.ram[0x2000 + 4] & 0x20, 0x20, "A on the 4 MiB PDE");

    // PAE: PDPTE -> PD with a 2 MiB page.
    cpu.cr4 = CR4_PAE;
    cpu.cr3 = 0x4000;
    mem.set_u64(0x4000 + 8, 0x5000 | 1);
    mem.set_u64(0x5000 + 8 * 3, 0x0060_0000 | 0x83);
    let lin = (1 << 30) | (3 << 21) | 0x1abc;
    assert_eq!(translate(&cpu, lin, r, &mut mem), Ok(0x0060_1abc));

    // 5-level.
    let mut cpu5 = CpuState::long_mode(0x8000);
    cpu5.cr4 |= CR4_LA57;
    let lin = 0x00ff_1234_5678_9000u64 & 0x01ff_ffff_ffff_f000;
    mem.map(0x8000, 5, lin, 0x7000, RW);
    assert_eq!(translate(&cpu5, lin | 0x10, r, &mut mem), Ok(0x7010));
    assert!(crate::paging::is_canonical(&cpu5, lin));
}

#[test]
fn addresses_rip_relative_fs_16bit_and_faults() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    // RIP-relative: relative to the next instruction.
    let code = vec![0x01, 0x1d, 0, 0, 0, 0]; // add [rip+disp32], ebx
    let mut cpu2 = cpu;
    // Put the code near DATA so the target is mapped: decode at DATA.
    cpu2.rip = DATA;
    cpu2.gprs.rbx = 5;
    let mut bytes = code.clone();
    bytes[2..6].copy_from_slice(&0x100i32.to_le_bytes());
    done(&e.emulate(&mut cpu2, &bytes, &mut NoVectorState, &mut mem));
    assert_eq!(mem.u64_at(DATA + 6 + 0x100) as u32, 5);

    // FS base applies in 64-bit mode, DS base does not.
    cpu.fs.base = DATA;
    cpu.ds.base = 0x1000;
    let code = asm64(|a| a.mov(dword_ptr(rax).fs(), ebx));
    cpu.gprs.rax = 0x20;
    cpu.gprs.rbx = 0xabcd;
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(mem.u64_at(DATA + 0x20) as u32, 0xabcd);

    // Non-canonical: #GP(0), or #SS(0) through RBP/RSP.
    cpu.rip = CODE;
    cpu.gprs.rax = 0x8000_0000_0000_0000;
    let code = asm64(|a| a.add(dword_ptr(rax), ebx));
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem)),
        (VEC_GP, Some(0))
    );
    cpu.gprs.rbp = 0x8000_0000_0000_0000;
    let code = asm64(|a| a.add(dword_ptr(rbp), ebx));
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem)),
        (VEC_SS, Some(0))
    );

    // 16-bit real mode: [bx+si+4] with DS base; limit 0xffff.
    let mut real = CpuState {
        cs: Segment {
            base: 0,
            limit: 0xffff,
            type_: 0xb,
            present: true,
            ..Default::default()
        },
        ds: Segment {
            base: DATA,
            limit: 0xffff,
            type_: 0x3,
            present: true,
            ..Default::default()
        },
        rip: 0x100,
        ..Default::default()
    };
    real.gprs.rbx = 0x10;
    real.gprs.rsi = 0x20;
    real.gprs.rax = 3;
    let code = [0x01, 0x40, 0x04]; // add [bx+si+4], ax
    done(&e.emulate(&mut real, &code, &mut NoVectorState, &mut mem));
    assert_eq!(mem.u64_at(DATA + 0x34) as u16, 3);
    assert_eq!(real.rip, 0x103);
    // Past the limit: #GP(0).
    real.rip = 0x100;
    real.ds.limit = 0x30;
    assert_eq!(
        exc(&e.emulate(&mut real, &code, &mut NoVectorState, &mut mem)),
        (VEC_GP, Some(0))
    );
}

#[test]
fn allow_list_decisions() {
    let decide = |f: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>| {
        let bytes = asm64(|a| f(a));
        let mut d = iced_x86::Decoder::new(64, &bytes, 0);
        classify(&d.decode())
    };
    assert!(decide(&|a| a.push(rax)).is_err());
    assert!(decide(&|a| a.jmp(0x1000u64)).is_err());
    assert!(decide(&|a| a.in_(al, dx)).is_err());
    assert!(decide(&|a| a.syscall()).is_err());
    assert_eq!(
        decide(&|a| a.xsave(ptr(rax))).unwrap().kind,
        crate::classify::Kind::WholeState
    );
    assert!(decide(&|a| a.xsaves(ptr(rax))).is_err(), "privileged");
    assert!(decide(&|a| a.wrfsbase(rax)).is_err());
    // vpgatherdd xmm0, [rax+xmm1*1], xmm2
    let gather = [0xc4, 0xe2, 0x69, 0x90, 0x04, 0x08];
    assert_eq!(
        classify(&iced_x86::Decoder::new(64, &gather, 0).decode()).map(|c| c.kind),
        Ok(crate::classify::Kind::Vsib)
    );
    assert!(decide(&|a| a.mov(rsp, rax)).is_err());
    assert!(decide(&|a| a.cpuid()).is_err());
    assert!(decide(&|a| a.rdrand(eax)).is_err());
    assert!(decide(&|a| a.fnstenv(ptr(rax))).unwrap().x87_mmx);
    assert!(decide(&|a| a.movsb()).is_err());
    assert!(decide(&|a| a.vaddps(ymm0, ymm1, ptr(rax))).unwrap().vector);
    assert!(!decide(&|a| a.cmpxchg16b(ptr(rax))).unwrap().vector);
    assert!(decide(&|a| a.adcx(eax, dword_ptr(rax))).is_ok());
    assert!(decide(&|a| a.fld(qword_ptr(rax))).unwrap().x87_mmx);
}

#[test]
fn cmpxchg16b_and_misaligned_gp() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let code = asm64(|a| a.lock().cmpxchg16b(xmmword_ptr(rsi)));
    mem.set_u64(DATA + 0x40, 1);
    mem.set_u64(DATA + 0x48, 2);
    cpu.gprs = crate::stub::GuestGprs {
        rsi: DATA + 0x40,
        rax: 1,
        rdx: 2,
        rbx: 0x33,
        rcx: 0x44,
        ..Default::default()
    };
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(
        (mem.u64_at(DATA + 0x40), mem.u64_at(DATA + 0x48)),
        (0x33, 0x44)
    );
    assert_ne!(cpu.gprs.rflags & 0x40, 0, "ZF");
    cpu.rip = CODE;
    cpu.gprs.rsi = DATA + 0x48;
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem)),
        (VEC_GP, Some(0))
    );
    assert_eq!(cpu.rip, CODE, "no RIP advance on a fault");
}

/// A locked instruction is stored with a compare-and-exchange against the
/// operand it ran on; when another vCPU wrote the operand first, it runs
/// again on the new value, so the other vCPU's store is never lost (a
/// plain write-back would put 0x33:0x44 over it).
#[test]
fn locked_instruction_runs_again_when_another_vcpu_wrote_its_operand() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let code = asm64(|a| a.lock().cmpxchg16b(xmmword_ptr(rsi)));
    let at = DATA + 0x40;
    mem.set_u64(at, 1);
    mem.set_u64(at + 8, 2);
    let start = crate::stub::GuestGprs {
        rsi: at,
        rax: 1,
        rdx: 2,
        rbx: 0x33,
        rcx: 0x44,
        ..Default::default()
    };
    cpu.gprs = start;
    // The other vCPU's store lands between our read and our write.
    let mut racing = RacingVcpu::new(&mut mem, at, vec![7]);
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut racing));
    assert_eq!(racing.attempts, 2, "stored on the second run");
    // The second run compared 1:2 against 7:2: no match, memory kept.
    assert_eq!((mem.u64_at(at), mem.u64_at(at + 8)), (7, 2));
    assert_eq!((cpu.gprs.rax, cpu.gprs.rdx), (7, 2));
    assert_eq!(cpu.gprs.rflags & 0x40, 0, "ZF clear");
    assert_eq!(cpu.rip, CODE + code.len() as u64);

    // XCHG with memory is locked without a prefix.
    let xchg = asm64(|a| a.xchg(qword_ptr(rsi), rbx));
    cpu.rip = CODE;
    cpu.gprs = start;
    let mut racing = RacingVcpu::new(&mut mem, at, vec![9]);
    done(&e.emulate(&mut cpu, &xchg, &mut NoVectorState, &mut racing));
    assert_eq!((mem.u64_at(at), cpu.gprs.rbx), (0x33, 9));

    // An operand another vCPU rewrites before every store: after a bounded
    // number of runs the guest retries it; memory as the other vCPU left
    // it, and nothing else changed.
    cpu.rip = CODE;
    cpu.gprs = start;
    let mut racing = RacingVcpu::new(&mut mem, at, (1..=2000).collect());
    let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut racing);
    assert_eq!(o, Outcome::Retry);
    let attempts = racing.attempts;
    assert!(attempts > 1 && attempts < 2000);
    // Store i is i + 1: the last one is still there.
    assert_eq!(mem.u64_at(at), attempts as u64);
    assert_eq!((cpu.rip, cpu.gprs), (CODE, start), "nothing completed");
}

fn avx_ok() -> bool {
    is_x86_feature_detected!("avx") && Emulator::new(true).is_ok()
}

#[test]
fn vmovdqu_ymm_lands_in_the_xsave_image() {
    if !avx_ok() {
        eprintln!("skipped: host has no AVX");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    for i in 0..32 {
        mem.ram[DATA as usize + 0x103 + i] = i as u8 + 1;
    }
    cpu.gprs.rax = DATA + 0x103;
    let code = asm64(|a| a.vmovdqu(ymm0, ptr(rax)));
    let mut img = XsaveImage::new();
    done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
    assert!(img.dirty);
    assert_eq!(img.fetches, 1);
    let ymm_hi = core::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize;
    assert_eq!(img.bytes[160..176], (1..=16).collect::<Vec<u8>>()[..]);
    assert_eq!(
        img.bytes[ymm_hi..ymm_hi + 16],
        (17..=32).collect::<Vec<u8>>()[..]
    );
    assert_ne!(img.bytes[512] & 0b110, 0);

    // vmovdqa to a misaligned address: #GP(0), image untouched.
    cpu.rip = CODE;
    let code = asm64(|a| a.vmovdqa(ptr(rax), ymm0));
    img.dirty = false;
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
        (VEC_GP, Some(0))
    );
    assert!(!img.dirty);
}

/// An XSAVE image with every vector component present, zmm0 = `zmm0` and
/// k1 = `k1` (offsets from the host's CPUID leaf 0xD). `None` without
/// AVX-512F on the host (the test is skipped).
fn avx512_image(zmm0_bytes: [u8; 64], k1_value: u64) -> Option<XsaveImage> {
    if !is_x86_feature_detected!("avx512f") {
        eprintln!("skipped: host has no AVX-512F");
        return None;
    }
    let off = |sub| core::arch::x86_64::__cpuid_count(0xd, sub).ebx as usize;
    let mut img = XsaveImage::new();
    img.bytes[160..176].copy_from_slice(&zmm0_bytes[..16]);
    img.bytes[off(2)..off(2) + 16].copy_from_slice(&zmm0_bytes[16..32]);
    img.bytes[off(6)..off(6) + 32].copy_from_slice(&zmm0_bytes[32..]);
    img.bytes[off(5) + 8..off(5) + 16].copy_from_slice(&k1_value.to_le_bytes());
    img.bytes[512] = 0xe7;
    Some(img)
}

#[test]
fn masked_avx512_store_writes_only_selected_elements() {
    let Some(mut img) = avx512_image([0xee; 64], 0b1000_0000_0000_0101) else {
        return;
    };
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    mem.ram[DATA as usize..DATA as usize + 64].fill(0x11);
    cpu.gprs.rax = DATA;
    let code = asm64(|a| a.vmovdqu32(ptr(rax).k1(), zmm0));
    done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
    let m = &mem.ram[DATA as usize..DATA as usize + 64];
    for i in 0..16 {
        let want = if [0, 2, 15].contains(&i) { 0xee } else { 0x11 };
        assert!(
            m[i * 4..i * 4 + 4].iter().all(|&b| b == want),
            "element {i}"
        );
    }
    let writes: Vec<_> = mem.log.iter().filter(|l| l.0 && l.1 >= DATA).collect();
    assert_eq!(writes.len(), 3, "one write per run of selected elements");
}

#[test]
fn adcx_popcnt_and_x87() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rax = u64::from(u32::MAX);
    cpu.gprs.rbx = 1;
    cpu.gprs.rflags = 0x2 | 0x800; // OF stays
    let code = asm64(|a| a.adcx(eax, ebx));
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(cpu.gprs.rax, 0);
    assert_eq!(cpu.gprs.rflags & 0x801, 0x801, "CF set, OF untouched");

    cpu.rip = CODE;
    mem.set_u64(DATA, 0xf0f0);
    cpu.gprs.rsi = DATA;
    let code = asm64(|a| a.popcnt(rcx, qword_ptr(rsi)));
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(cpu.gprs.rcx, 8);

    // fld1; fadd qword [rsi]; fstp qword [rsi+8]
    let mut img = XsaveImage::new();
    mem.set_u64(DATA, 2.5f64.to_bits());
    for code in [
        asm64(|a| a.fld1()),
        asm64(|a| a.fadd(qword_ptr(rsi))),
        asm64(|a| a.fstp(qword_ptr(rsi + 8))),
    ] {
        cpu.rip = CODE;
        done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
    }
    assert_eq!(f64::from_bits(mem.u64_at(DATA + 8)), 3.5);
}

#[test]
fn page_crossing_access_is_split() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rax = MMIO_BASE + 0xffc;
    cpu.gprs.rbx = 0x1122_3344_5566_7788;
    let code = asm64(|a| a.mov(qword_ptr(rax), rbx));
    mem.log.clear();
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    let mmio: Vec<_> = mem
        .log
        .iter()
        .filter(|l| l.1 >= MMIO_BASE)
        .copied()
        .collect();
    assert_eq!(
        mmio,
        [(true, MMIO_BASE + 0xffc, 4), (true, MMIO_BASE + 0x1000, 4)]
    );
    assert_eq!(
        &mem.mmio[0xffc..0x1004],
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
}

#[test]
fn write_fault_has_no_side_effect() {
    let (mut cpu, mut mem) = setup();
    let ro = 0x70_0000;
    mem.map(CR3, 4, ro, ro, 0x1);
    cpu.gprs.rax = ro + 0xff8;
    let code = asm64(|a| a.add(qword_ptr(rax), rbx));
    let o = emul().emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
    assert_eq!(
        o,
        Outcome::Exception {
            vector: VEC_PF,
            error_code: Some(PFEC_P | PFEC_W),
            cr2: Some(ro + 0xff8)
        }
    );
    assert!(mem.log.iter().all(|l| !l.0 || l.1 < 0x10_0000 + 0x10000));
}

#[test]
fn unsupported_names_the_instruction() {
    let (mut cpu, mut mem) = setup();
    let code = asm64(|a| a.push(rax));
    match emul().emulate(&mut cpu, &code, &mut NoVectorState, &mut mem) {
        Outcome::Unsupported { text } => assert!(text.starts_with("push rax"), "{text}"),
        o => panic!("{o:?}"),
    }
}

/// Random bytes through the whole path: no panic, and whatever ran was
/// allow-listed (the emulator re-decodes what it built; here we check the
/// decision independently on the guest's decode).
#[test]
fn fuzz_random_instructions() {
    let (cpu0, mut mem) = setup();
    let mut e = emul();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut ran = 0;
    for case in 0..20_000 {
        let mut bytes = [0u8; 15];
        for b in bytes.iter_mut() {
            *b = next() as u8;
        }
        let mut cpu = cpu0;
        cpu.gprs = crate::stub::GuestGprs {
            rax: DATA + (next() & 0x3fff),
            rbx: DATA + 0x100,
            rcx: next() & 0xff,
            rdx: 1,
            rsi: DATA + 0x200,
            rdi: DATA + 0x300,
            rbp: DATA + 0x400,
            r8: next(),
            rflags: 2,
            ..Default::default()
        };
        if case % 3 == 1 {
            cpu.cs.l = false;
            cpu.cs.db = true;
        }
        let bitness = cpu.bitness();
        let mut d = iced_x86::Decoder::with_ip(bitness, &bytes, cpu.rip, 0);
        let instr = d.decode();
        let mut img = XsaveImage::new();
        let o = e.emulate(&mut cpu, &bytes, &mut img, &mut mem);
        if matches!(o, Outcome::Done { .. }) {
            ran += 1;
            assert!(
                classify(&instr).is_ok() || crate::system::handles(&instr),
                "ran a denied instruction: {instr}"
            );
            assert_eq!(
                cpu.rip & 0xffff_ffff,
                (cpu0.rip + instr.len() as u64) & 0xffff_ffff
            );
        }
    }
    assert!(ran > 1000, "only {ran} instructions ran");
}

/// Host-side cost of a simple instruction (run with `--ignored --nocapture`
/// in release).
#[test]
#[ignore]
fn bench_add_to_memory() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let code = asm64(|a| a.add(dword_ptr(rax), ebx));
    cpu.gprs.rax = DATA;
    let mut samples = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        cpu.rip = CODE;
        mem.log.clear();
        let t = std::time::Instant::now();
        let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
        samples.push(t.elapsed().as_nanos());
        assert!(matches!(o, Outcome::Done { .. }));
    }
    samples.sort_unstable();
    eprintln!(
        "emulate add [rax], ebx: median {} ns",
        samples[samples.len() / 2]
    );
}

/// At CPL 3 with CR0.AM and RFLAGS.AC, a misaligned operand raises #AC(0)
/// natively in the stub (the bounce buffer keeps the offset mod 64); the
/// guest's AC bit survives a completed instruction.
#[test]
fn alignment_check_at_cpl3() {
    let (mut cpu, mut mem) = setup();
    let user = DATA + 0x3000;
    mem.map(CR3, 4, user, user, 0x7);
    cpu.cpl = 3;
    cpu.cr0 |= CR0_AM;
    cpu.gprs.rflags = 0x2 | RFLAGS_AC;
    let code = asm64(|a| a.add(dword_ptr(rax), ebx));
    let mut e = emul();
    cpu.gprs.rax = user + 1;
    let host = crate::stub::probe::probe().expect("CPU probes run");
    if host.is_tcg() && host.has(crate::stub::probe::Deviation::NoAc) {
        // The stub runs the access natively: this CPU raises no #AC.
        println!("misaligned access completes, as this CPU does (no-ac)");
        done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
        cpu.rip = CODE;
    } else {
        assert_eq!(
            exc(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem)),
            (VEC_AC, Some(0))
        );
        assert_eq!(cpu.rip, CODE, "no RIP advance on a fault");
    }
    cpu.gprs.rax = user + 4;
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_ne!(cpu.gprs.rflags & RFLAGS_AC, 0, "guest AC kept");
    // Without AC (or at CPL 0) the same misaligned access completes.
    for (cpl, ac) in [(3, false), (0, true)] {
        cpu.rip = CODE;
        cpu.cpl = cpl;
        cpu.gprs.rflags = 0x2 | if ac { RFLAGS_AC } else { 0 };
        cpu.gprs.rax = user + 1;
        done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    }
}

/// AVX-512 and VMASKMOV suppress faults on masked-out elements: a masked
/// access whose selected elements all lie on a mapped page completes even
/// though the operand runs onto an unmapped one; selecting an element there
/// faults with that page's address.
#[test]
fn masked_out_elements_do_not_fault() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    // The last data page is mapped; the page after it is not.
    let end = DATA + 4 * 0x1000;
    cpu.gprs.rax = end - 32; // 8 dwords on the mapped page, 8 beyond
    for (mask, store) in [
        (0x00ffu64, false),
        (0x00ff, true),
        (0x0100, false),
        (0x0100, true),
    ] {
        let Some(mut img) = avx512_image([0; 64], mask) else {
            return;
        };
        cpu.rip = CODE;
        let code = if store {
            asm64(|a| a.vmovdqu32(ptr(rax).k1(), zmm0))
        } else {
            asm64(|a| a.vmovdqu32(zmm0.k1(), ptr(rax)))
        };
        let o = e.emulate(&mut cpu, &code, &mut img, &mut mem);
        if mask == 0x00ff {
            done(&o);
        } else {
            assert_eq!(
                o,
                Outcome::Exception {
                    vector: VEC_PF,
                    error_code: Some(if store { PFEC_W } else { 0 }),
                    cr2: Some(end)
                },
                "store {store}"
            );
        }
    }
}

/// A compress store writes popcount(k) elements contiguously at the start
/// of its operand, not at the mask-selected positions.
#[test]
fn compress_store_writes_contiguous_elements() {
    // zmm0 dword i = i + 1; k1 selects elements 1, 5 and 9.
    let mut value = [0u8; 64];
    for (i, d) in value.chunks_exact_mut(4).enumerate() {
        d.copy_from_slice(&(i as u32 + 1).to_le_bytes());
    }
    let Some(mut img) = avx512_image(value, 0b10_0010_0010) else {
        return;
    };
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    mem.ram[DATA as usize..DATA as usize + 64].fill(0x11);
    cpu.gprs.rax = DATA;
    let code = asm64(|a| a.vpcompressd(ptr(rax).k1(), zmm0));
    done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
    let m = &mem.ram[DATA as usize..DATA as usize + 64];
    let dword = |i: usize| u32::from_le_bytes(m[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(
        [dword(0), dword(1), dword(2)],
        [2, 6, 10],
        "compressed elements"
    );
    for i in 3..16 {
        assert_eq!(dword(i), 0x1111_1111, "element {i} untouched");
    }
}

/// MAXPHYADDR comes from the guest (`CpuState::max_phys_bits`): an entry
/// bit between it and 51 is reserved (#PF with RSVD, as KVM's own walk and
/// the CPU give), while the same bit is an address bit for a wider guest.
#[test]
fn reserved_bits_follow_the_guests_maxphyaddr() {
    let (mut cpu, mut mem) = setup();
    let page = 0x72_0000u64;
    // Leaf with physical-address bit 40 set: above a 39-bit guest's width.
    mem.map(CR3, 4, page, page | 1 << 40, RW);
    let code = asm64(|a| a.add(qword_ptr(page), rcx)).to_vec();
    cpu.max_phys_bits = 39;
    let mut e = emul();
    let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_PF, Some(PFEC_P | PFEC_W | PFEC_RSVD)));
    // A 46-bit guest has that bit as an address bit: the walk succeeds and
    // the access reaches guest-physical page | 1 << 40 (the mock platform
    // reports it as out of range, which is the platform's answer, not #PF).
    cpu.max_phys_bits = 46;
    let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
    assert!(
        !matches!(o, Outcome::Exception { .. }),
        "a 46-bit guest must not fault: {o:?}"
    );
}

fn mxcsr(img: &XsaveImage) -> u32 {
    u32::from_le_bytes(img.bytes[24..28].try_into().unwrap())
}

/// An unmasked SIMD exception raises #XM with its flag set in MXCSR, as the
/// CPU leaves it (SDM vol. 1, 11.5.1: flags are set before the exception
/// is taken); the guest image carries the new MXCSR, RIP stays.
#[test]
fn xm_keeps_the_mxcsr_flags_the_exception_left() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = XsaveImage::new();
    img.bytes[24..28].copy_from_slice(&0x1d80u32.to_le_bytes()); // ZM clear
    img.bytes[160..164].copy_from_slice(&1.0f32.to_bits().to_le_bytes());
    img.bytes[512] = 0b11;
    cpu.gprs.rsi = DATA;
    // One element, 1.0 / 0.0: only ZE (divps would add IE for 0/0 lanes).
    let code = asm64(|a| a.divss(xmm0, dword_ptr(rsi)));
    let host = crate::stub::probe::probe().expect("CPU probes run");
    if host.is_tcg() && host.has(crate::stub::probe::Deviation::NoXm) {
        // The stub runs the divide natively: this CPU raises no #XM.
        println!("divss completes, as this CPU does (no-xm)");
        done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
        return;
    }
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
        (VEC_XM, None)
    );
    assert_eq!(cpu.rip, CODE);
    assert_eq!(mxcsr(&img), 0x1d80 | 0x4, "ZE set by the faulting divide");
    assert!(img.dirty);
    assert_eq!(
        img.bytes[160..164],
        1.0f32.to_bits().to_le_bytes(),
        "xmm0 kept"
    );
}

/// An unmasked x87 exception is left pending by the instruction that
/// caused it: FSW shows it, and FOP/FIP/FDP describe the guest's own
/// instruction (its ModRM, not the re-encoded `[rip+disp32]` one).
#[test]
fn pending_x87_exception_keeps_the_guests_fop_fip_fdp() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = XsaveImage::new();
    img.bytes[0..2].copy_from_slice(&0x37bu16.to_le_bytes()); // ZM clear
    img.bytes[512] = 0b1; // x87 state present, or XRSTOR loads its init FCW
    cpu.gprs.rsi = DATA;
    for code in [
        asm64(|a| a.fld1()),
        // fdiv dword [rsi+0x10]: D8 76 10 -> FOP 0x076.
        asm64(|a| a.fdiv(dword_ptr(rsi + 0x10))),
    ] {
        cpu.rip = CODE;
        done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
    }
    let u16_at = |o: usize| u16::from_le_bytes(img.bytes[o..o + 2].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(img.bytes[o..o + 8].try_into().unwrap());
    let fsw = u16_at(2);
    assert_eq!(fsw & 0x84, 0x84, "ZE and ES pending: {fsw:#x}");
    assert_eq!(u16_at(6), 0x076, "FOP");
    assert_eq!(u64_at(8), CODE, "FIP");
    assert_eq!(u64_at(16), DATA + 0x10, "FDP");
}

/// The CPU stops at 15 bytes: a longer instruction (redundant prefixes)
/// raises #GP(0), a 15-byte one runs, and an unknown opcode is #UD.
#[test]
fn instructions_longer_than_15_bytes_raise_gp() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rax = DATA;
    let add = [0x01u8, 0x08]; // add [rax], ecx
    let with_prefixes = |n: usize| [vec![0x66u8; n], add.to_vec()].concat();
    // KVM reports at most 15 bytes; the emulator reads on from guest memory.
    let mut run = |bytes: &[u8]| {
        mem.ram[CODE as usize..CODE as usize + 32].fill(0x90);
        mem.ram[CODE as usize..CODE as usize + bytes.len()].copy_from_slice(bytes);
        cpu.rip = CODE;
        e.emulate(
            &mut cpu,
            &bytes[..bytes.len().min(15)],
            &mut NoVectorState,
            &mut mem,
        )
    };
    assert_eq!(exc(&run(&with_prefixes(14))), (VEC_GP, Some(0)), "16 bytes");
    assert_eq!(exc(&run(&[0x66; 16])), (VEC_GP, Some(0)), "prefixes only");
    let o = run(&with_prefixes(13));
    assert!(matches!(o, Outcome::Done { .. }), "15 bytes: {o:?}");
    assert_eq!(
        exc(&run(&[0x66, 0x0f, 0x04])),
        (VEC_UD, None),
        "invalid opcode"
    );
}

/// A VEX instruction whose state components are off in the guest's XCR0
/// raises #UD (before any memory access), whatever the host's XCR0.
#[test]
fn guest_xcr0_decides_vex_ud() {
    if !avx_ok() {
        eprintln!("skipped: host has no AVX");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rax = DATA;
    let code = asm64(|a| a.vmovups(ymm1, ptr(rax)));
    let mut img = XsaveImage::new();
    img.xcr0 = 0b11;
    mem.log.clear();
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
        (VEC_UD, None)
    );
    assert!(mem.log.is_empty(), "no memory access before #UD");
    img.xcr0 = 0b111;
    done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
}

/// Alignment is checked before the page walk: a misaligned aligned-only
/// operand on a not-present page raises #GP(0), an aligned one #PF (the
/// host CPU does the same: `stub::tests::alignment_comes_before_the_walk`).
#[test]
fn misaligned_operand_on_a_missing_page_is_gp_not_pf() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let missing = 0x7f_0000u64;
    let mut img = XsaveImage::new();
    for (addr, want) in [
        (missing + 8, (VEC_GP, Some(0))),
        (missing, (VEC_PF, Some(0))),
        // Split operand, second page missing, start misaligned.
        (missing - 8, (VEC_GP, Some(0))),
    ] {
        mem.map(CR3, 4, missing - 0x1000, missing - 0x1000, RW);
        cpu.gprs.rsi = addr;
        cpu.rip = CODE;
        let code = asm64(|a| a.movaps(xmm0, xmmword_ptr(rsi)));
        assert_eq!(
            exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
            want,
            "{addr:#x}"
        );
        cpu.rip = CODE;
        let code = asm64(|a| a.addps(xmm0, xmmword_ptr(rsi)));
        assert_eq!(
            exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
            want,
            "{addr:#x}"
        );
    }
    // An unaligned-access form faults on the walk.
    cpu.rip = CODE;
    cpu.gprs.rsi = missing + 8;
    let code = asm64(|a| a.movups(xmm0, xmmword_ptr(rsi)));
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)).0,
        VEC_PF
    );
    assert!(!img.dirty);
}

/// Cache-line instructions check and translate their address like a read
/// and touch nothing; hints never fault. (The host CPU: a CLFLUSH of a
/// PROT_NONE page faults with SEGV_MAPERR-like #PF, a PREFETCH does not;
/// `stub::tests::cache_instructions_on_the_host`.)
#[test]
fn cache_lines_walk_and_hints_never_fault() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let missing = 0x7f_0000u64;
    let run = |e: &mut Emulator, cpu: &mut CpuState, mem: &mut MockPlatform, code: &[u8]| {
        cpu.rip = CODE;
        mem.log.retain(|_| false);
        e.emulate(cpu, code, &mut NoVectorState, mem)
    };
    let line: [(&str, Vec<u8>); 3] = [
        ("clflush", asm64(|a| a.clflush(byte_ptr(rsi)))),
        ("clflushopt", asm64(|a| a.clflushopt(byte_ptr(rsi)))),
        ("clwb", asm64(|a| a.clwb(byte_ptr(rsi)))),
    ];
    for (name, code) in &line {
        cpu.gprs.rsi = MMIO_BASE + 0x40;
        let o = run(&mut e, &mut cpu, &mut mem, code);
        assert!(matches!(o, Outcome::Done { .. }), "{name}: {o:?}");
        assert_eq!(cpu.rip, CODE + code.len() as u64, "{name}");
        let data: Vec<_> = mem.log.iter().filter(|l| l.1 >= MMIO_BASE).collect();
        assert!(data.is_empty(), "{name} touched the device: {data:?}");
        cpu.gprs.rsi = missing + 0x40;
        let o = run(&mut e, &mut cpu, &mut mem, code);
        assert_eq!(exc(&o), (VEC_PF, Some(0)), "{name}");
        cpu.gprs.rsi = 0x8000_0000_0000_0000;
        let o = run(&mut e, &mut cpu, &mut mem, code);
        assert_eq!(exc(&o), (VEC_GP, Some(0)), "{name} non-canonical");
    }
    let hints: [(&str, Vec<u8>); 3] = [
        ("prefetcht0", asm64(|a| a.prefetcht0(byte_ptr(rsi)))),
        ("prefetchnta", asm64(|a| a.prefetchnta(byte_ptr(rsi)))),
        ("prefetchw", asm64(|a| a.prefetchw(byte_ptr(rsi)))),
    ];
    for (name, code) in &hints {
        for addr in [missing, 0x8000_0000_0000_0000] {
            cpu.gprs.rsi = addr;
            let o = run(&mut e, &mut cpu, &mut mem, code);
            assert!(matches!(o, Outcome::Done { .. }), "{name} {addr:#x}: {o:?}");
            assert!(mem.log.is_empty(), "{name}: no walk, no access");
        }
    }
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

/// FXSAVE writes the legacy region from the guest's state, and not the
/// bytes the CPU leaves alone (found by the emulator's two-fill runs);
/// FXRSTOR loads it back into the guest's image.
#[test]
fn fxsave_fxrstor_move_the_guests_state() {
    if !xsave_ok() {
        eprintln!("skipped: host has no XSAVE");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = state_image();
    let area = DATA as usize + 0x200;
    mem.ram[area..area + 512].fill(0xaa);
    cpu.gprs.rsi = DATA + 0x200;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.fxsave64(ptr(rsi))),
        &mut img,
        &mut mem,
    ));
    let saved = mem.ram[area..area + 512].to_vec();
    assert_eq!(saved[0..2], 0x27fu16.to_le_bytes(), "FCW");
    assert_eq!(saved[24..28], 0x1fc0u32.to_le_bytes(), "MXCSR");
    assert!(saved[176..192].iter().all(|&b| b == 0x11), "xmm1");
    assert!(saved[160..176].iter().all(|&b| b == 0), "xmm0");
    // What the host CPU itself writes with FXSAVE64 (bytes 464..511 are
    // left alone by both vendors: the software-available area).
    let mut native = [0xaau8; 512 + 16];
    let off = native.as_ptr().align_offset(16);
    // SAFETY: a 16-byte aligned 512-byte region inside `native`.
    unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) native.as_mut_ptr().add(off)) };
    assert_eq!(
        saved[464..512],
        native[off + 464..off + 512],
        "reserved bytes as the CPU leaves them"
    );

    // Change the saved XMM1 and MXCSR, then FXRSTOR.
    mem.ram[area + 176..area + 192].fill(0x22);
    mem.ram[area + 24..area + 28].copy_from_slice(&0x1f80u32.to_le_bytes());
    cpu.rip = CODE;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.fxrstor64(ptr(rsi))),
        &mut img,
        &mut mem,
    ));
    assert!(img.dirty);
    assert!(img.bytes[176..192].iter().all(|&b| b == 0x22));
    assert_eq!(mxcsr(&img), 0x1f80);

    // Misaligned: #GP(0), also on a missing page (alignment first).
    cpu.rip = CODE;
    cpu.gprs.rsi = 0x7f_0008;
    let o = e.emulate(
        &mut cpu,
        &asm64(|a| a.fxsave64(ptr(rsi))),
        &mut img,
        &mut mem,
    );
    assert_eq!(exc(&o), (VEC_GP, Some(0)));
}

/// XSAVE requests EDX:EAX & the guest's XCR0: with XCR0 = x87|SSE the AVX
/// area stays untouched and XSTATE_BV holds no AVX bit, whatever the host
/// enables; XRSTOR of a header naming a component outside the guest's
/// XCR0 is #GP(0).
#[test]
fn xsave_family_honours_the_guests_xcr0() {
    if !xsave_ok() || !avx_ok() {
        eprintln!("skipped: host has no XSAVE/AVX");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = state_image();
    img.xcr0 = 0b11;
    let ymm_hi = core::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize;
    let area = DATA as usize + 0x1000;
    mem.ram[area..area + 0x1000].fill(0xaa);
    mem.ram[area + 512..area + 576].fill(0); // a valid header
    cpu.gprs.rsi = DATA + 0x1000;
    cpu.gprs.rax = u64::from(u32::MAX);
    cpu.gprs.rdx = u64::from(u32::MAX);
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.xsave64(ptr(rsi))),
        &mut img,
        &mut mem,
    ));
    let xstate_bv = mem.u64_at(DATA + 0x1000 + 512);
    assert_eq!(xstate_bv & !0b11, 0, "XSTATE_BV {xstate_bv:#x}");
    assert!(mem.ram[area + ymm_hi..area + ymm_hi + 16]
        .iter()
        .all(|&b| b == 0xaa));
    assert!(mem.ram[area + 176..area + 192].iter().all(|&b| b == 0x11));
    assert_eq!(
        cpu.gprs.rax,
        u64::from(u32::MAX),
        "EDX:EAX as the guest had them"
    );

    // XRSTOR naming AVX state while the guest's XCR0 lacks it.
    cpu.rip = CODE;
    mem.set_u64(DATA + 0x1000 + 512, 0b111);
    let o = e.emulate(
        &mut cpu,
        &asm64(|a| a.xrstor64(ptr(rsi))),
        &mut img,
        &mut mem,
    );
    assert_eq!(exc(&o), (VEC_GP, Some(0)));
    // Within XCR0 it loads.
    img.xcr0 = 0b111;
    cpu.rip = CODE;
    mem.ram[area + 176..area + 192].fill(0x33);
    mem.set_u64(DATA + 0x1000 + 512, 0b11);
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.xrstor64(ptr(rsi))),
        &mut img,
        &mut mem,
    ));
    assert!(img.bytes[176..192].iter().all(|&b| b == 0x33));
}

/// FNSTENV stores the 28-byte protected-mode environment with the guest's
/// FCW and FIP (not the stub's); FLDENV loads a new control word.
#[test]
fn x87_environment_round_trip() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = state_image();
    cpu.gprs.rsi = DATA + 0x300;
    // An x87 instruction first, so FIP/FDP name the guest's.
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.fld(qword_ptr(rsi + 0x40))),
        &mut img,
        &mut mem,
    ));
    cpu.rip = CODE + 0x10;
    mem.ram[DATA as usize + 0x300..DATA as usize + 0x320].fill(0xaa);
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.fnstenv(ptr(rsi))),
        &mut img,
        &mut mem,
    ));
    let env = &mem.ram[DATA as usize + 0x300..DATA as usize + 0x320];
    assert_eq!(env[0..2], 0x27fu16.to_le_bytes(), "FCW");
    let host = crate::stub::probe::probe().expect("CPU probes run");
    if host.is_tcg() && host.has(crate::stub::probe::Deviation::StaleFip) {
        println!("FIP and FDP not checked: this CPU stores stale ones (stale-fip)");
    } else {
        assert_eq!(
            u32::from_le_bytes(env[12..16].try_into().unwrap()),
            CODE as u32,
            "FIP"
        );
        assert_eq!(
            u32::from_le_bytes(env[20..24].try_into().unwrap()),
            (DATA + 0x340) as u32,
            "FDP"
        );
    }
    assert!(env[28..32].iter().all(|&b| b == 0xaa), "28 bytes only");
    // FLDENV of a new control word.
    mem.ram[DATA as usize + 0x300..DATA as usize + 0x302].copy_from_slice(&0x37fu16.to_le_bytes());
    cpu.rip = CODE;
    done(&e.emulate(&mut cpu, &asm64(|a| a.fldenv(ptr(rsi))), &mut img, &mut mem));
    assert_eq!(img.bytes[0..2], 0x37fu16.to_le_bytes());
}

/// AVX2 gathers against the host CPU: the same indices over the same data
/// (host memory natively, guest RAM and MMIO in the emulator) give the
/// same destination and a cleared mask; each element is its own access.
#[test]
fn avx2_gathers_match_the_cpu() {
    if !is_x86_feature_detected!("avx2") || !avx_ok() {
        eprintln!("skipped: host has no AVX2");
        return;
    }
    let data: Vec<u32> = (0..64).map(|i| 0x1000_0000 + i * 0x0101).collect();
    // Mixed, repeated and negative indices (relative to element 32).
    let idx: [i32; 8] = [0, 5, -3, 7, 7, 31, -32, 2];
    // Mask: elements 1 and 6 off.
    let mask: [u32; 8] = [!0, 0, !0, !0, !0, !0, 0, !0];
    let mut native_dest = [0xdead_beefu32; 8];
    let mut native_mask = mask;
    // SAFETY: the gather reads data[32 + idx[i]] for 0 <= 32 + idx < 64,
    // all inside `data`; ymm1-3 are scratch (declared clobbered).
    unsafe {
        core::arch::asm!(
            "vmovdqu ymm1, [{d}]",
            "vmovdqu ymm2, [{m}]",
            "vmovdqu ymm3, [{i}]",
            "vpgatherdd ymm1, [{b} + ymm3 * 4], ymm2",
            "vmovdqu [{d}], ymm1",
            "vmovdqu [{m}], ymm2",
            d = in(reg) native_dest.as_mut_ptr(),
            m = in(reg) native_mask.as_mut_ptr(),
            i = in(reg) idx.as_ptr(),
            b = in(reg) data.as_ptr().add(32),
            out("ymm1") _, out("ymm2") _, out("ymm3") _,
        );
    }
    let ymm_hi = core::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize;
    for base in [DATA, MMIO_BASE] {
        let (mut cpu, mut mem) = setup();
        let mut e = emul();
        for (i, v) in data.iter().enumerate() {
            let at = base + 4 * i as u64;
            if base == DATA {
                mem.set_u32(at, *v);
            } else {
                mem.mmio[(at - MMIO_BASE) as usize..][..4].copy_from_slice(&v.to_le_bytes());
            }
        }
        let mut img = XsaveImage::new();
        let put = |img: &mut XsaveImage, reg: usize, bytes: &[u8]| {
            img.bytes[160 + 16 * reg..176 + 16 * reg].copy_from_slice(&bytes[..16]);
            img.bytes[ymm_hi + 16 * reg..ymm_hi + 16 * reg + 16].copy_from_slice(&bytes[16..32]);
        };
        let as_bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        put(&mut img, 1, &as_bytes(&[0xdead_beef; 8]));
        put(&mut img, 2, &as_bytes(&mask));
        put(
            &mut img,
            3,
            &idx.iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        img.bytes[512] = 0b111;
        cpu.gprs.rbx = base + 32 * 4;
        let code = asm64(|a| a.vpgatherdd_3(ymm1, ptr(rbx + ymm3 * 4), ymm2));
        mem.log.clear();
        done(&e.emulate(&mut cpu, &code, &mut img, &mut mem));
        let get = |img: &XsaveImage, reg: usize| -> Vec<u32> {
            let mut b = img.bytes[160 + 16 * reg..176 + 16 * reg].to_vec();
            b.extend_from_slice(&img.bytes[ymm_hi + 16 * reg..ymm_hi + 16 * reg + 16]);
            b.chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert_eq!(get(&img, 1), native_dest, "destination, base {base:#x}");
        assert_eq!(get(&img, 2), native_mask, "mask, base {base:#x}");
        let reads: Vec<_> = mem
            .log
            .iter()
            .filter(|l| l.1 >= base && l.1 < base + 256)
            .collect();
        assert_eq!(reads.len(), 6, "one access per selected element: {reads:?}");
    }
}

/// A gather whose third element faults: the first two completed (their
/// mask elements cleared), the rest as before, and the #PF names the
/// element's address (the measurement in gather.rs's module comment).
/// Destination equal to the mask register is #UD.
#[test]
fn gather_fault_is_partial_and_restartable() {
    if !is_x86_feature_detected!("avx2") || !avx_ok() {
        eprintln!("skipped: host has no AVX2");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let missing = 0x7f_0000u64;
    mem.map(CR3, 4, missing - 0x1000, missing - 0x1000, RW);
    for i in 0..8 {
        mem.set_u32(missing - 0x100 + 4 * i, 0x100 + i as u32);
    }
    let mut img = XsaveImage::new();
    img.bytes[160 + 16..160 + 32].fill(0xff); // xmm1 destination
    img.bytes[160 + 32..160 + 48].fill(0xff); // xmm2 mask: all on
    for (i, x) in [0i32, 1, 64, 3].iter().enumerate() {
        img.bytes[160 + 48 + 4 * i..160 + 52 + 4 * i].copy_from_slice(&x.to_le_bytes());
    }
    img.bytes[512] = 0b11;
    cpu.gprs.rbx = missing - 0x100;
    let code = asm64(|a| a.vpgatherdd_3(xmm1, ptr(rbx + xmm3 * 4), xmm2));
    let o = e.emulate(&mut cpu, &code, &mut img, &mut mem);
    assert_eq!(exc(&o), (VEC_PF, Some(0)));
    let words = |img: &XsaveImage, reg: usize| -> Vec<u32> {
        img.bytes[160 + 16 * reg..176 + 16 * reg]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(words(&img, 1), [0x100, 0x101, !0, !0]);
    assert_eq!(words(&img, 2), [0, 0, !0, !0]);
    assert_eq!(cpu.rip, CODE);
    let code = asm64(|a| a.vpgatherdd_3(xmm1, ptr(rbx + xmm3 * 4), xmm1));
    assert_eq!(
        exc(&e.emulate(&mut cpu, &code, &mut img, &mut mem)),
        (VEC_UD, None)
    );
}

/// SSE4A's scalar non-temporal stores (AMD hosts): MOVNTSS/MOVNTSD store
/// the low element, as the CPU (same bytes natively from the stub).
#[test]
fn sse4a_movnt_scalar_stores() {
    if !std::is_x86_feature_detected!("sse4a") {
        eprintln!("skipped: host has no SSE4A (Intel)");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = XsaveImage::new();
    for (i, b) in img.bytes[176..192].iter_mut().enumerate() {
        *b = 0x40 + i as u8; // xmm1
    }
    img.bytes[512] = 0b11;
    cpu.gprs.rsi = MMIO_BASE + 0x10;
    mem.mmio[0x10..0x20].fill(0xee);
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.movntss(dword_ptr(rsi), xmm1)),
        &mut img,
        &mut mem,
    ));
    assert_eq!(
        mem.mmio[0x10..0x18],
        [0x40, 0x41, 0x42, 0x43, 0xee, 0xee, 0xee, 0xee]
    );
    cpu.rip = CODE;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.movntsd(qword_ptr(rsi), xmm1)),
        &mut img,
        &mut mem,
    ));
    assert_eq!(
        mem.mmio[0x10..0x19],
        [0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0xee]
    );
}

/// MASKMOVDQU and MASKMOVQ store the bytes whose mask byte has its top bit
/// set at DS:rDI, the same bytes the CPU stores (checked natively on host
/// memory), and touch no page that holds no selected byte.
#[test]
fn masked_implicit_stores_match_the_cpu() {
    let data: [u8; 16] = core::array::from_fn(|i| 0xa0 + i as u8);
    let mask: [u8; 16] = [
        0x80, 0, 0xff, 0x7f, 0, 0, 0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0x80,
    ];
    let mut native = [0x11u8; 16];
    let mut native_q = [0x11u8; 8];
    // SAFETY: MASKMOVDQU/MASKMOVQ store into `native`/`native_q` (16 and
    // 8 bytes at RDI); xmm1, xmm2, mm1, mm2 are scratch.
    unsafe {
        core::arch::asm!(
            "movdqu xmm1, [{d}]",
            "movdqu xmm2, [{m}]",
            "maskmovdqu xmm1, xmm2",
            "mov rdi, {q}",
            "movq mm1, [{d}]",
            "movq mm2, [{m}]",
            "maskmovq mm1, mm2",
            "emms",
            d = in(reg) data.as_ptr(),
            m = in(reg) mask.as_ptr(),
            q = in(reg) native_q.as_mut_ptr(),
            inout("rdi") native.as_mut_ptr() => _,
            out("xmm1") _, out("xmm2") _,
        );
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = XsaveImage::new();
    img.bytes[176..192].copy_from_slice(&data);
    img.bytes[192..208].copy_from_slice(&mask);
    img.bytes[32 + 16..32 + 24].copy_from_slice(&data[..8]); // mm1
    img.bytes[32 + 32..32 + 40].copy_from_slice(&mask[..8]); // mm2
    img.bytes[512] = 0b11;
    mem.mmio[0x20..0x40].fill(0x11);
    cpu.gprs.rdi = MMIO_BASE + 0x20;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.maskmovdqu(xmm1, xmm2)),
        &mut img,
        &mut mem,
    ));
    assert_eq!(mem.mmio[0x20..0x30], native);
    assert_eq!(cpu.gprs.rdi, MMIO_BASE + 0x20, "RDI as the guest had it");
    cpu.rip = CODE;
    cpu.gprs.rdi = MMIO_BASE + 0x30;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.maskmovq(mm1, mm2)),
        &mut img,
        &mut mem,
    ));
    assert_eq!(mem.mmio[0x30..0x38], native_q);
    // Only byte 15 selected, bytes 0-7 on a missing page: MASKMOVDQU
    // faults there anyway on the CPUs measured (masked_native: AMD Zen 3
    // and Intel Sapphire Rapids fault with an all-zero mask), at its first
    // byte; a CPU that suppressed it would store byte 15.
    let missing = 0x7f_0000u64;
    mem.map(CR3, 4, missing + 0x1000, missing + 0x1000, RW);
    let mut only_last = [0u8; 16];
    only_last[15] = 0x80;
    img.bytes[192..208].copy_from_slice(&only_last);
    cpu.rip = CODE;
    cpu.gprs.rdi = missing + 0xff8;
    let o = e.emulate(
        &mut cpu,
        &asm64(|a| a.maskmovdqu(xmm1, xmm2)),
        &mut img,
        &mut mem,
    );
    let shape = crate::stub::shape::HostShape::host(&mut crate::stub::StubBuf::new(true).unwrap());
    if shape.maskmovdqu_unmasked_fault.is_some() {
        assert_eq!(
            o,
            Outcome::Exception {
                vector: VEC_PF,
                error_code: Some(PFEC_W),
                cr2: Some(missing + 0xff8)
            }
        );
        assert_ne!(mem.ram[(missing + 0x1007) as usize], data[15]);
    } else {
        done(&o);
        assert_eq!(mem.ram[(missing + 0x1007) as usize], data[15]);
    }
}

/// FRSTOR loads the data registers even when the tag word marks them all
/// empty (the host CPU's FXSAVE/XSAVE after such an FRSTOR show them:
/// measured with a C program on AMD EPYC, XSTATE_BV 3, ST0 as loaded).
#[test]
fn frstor_loads_the_registers() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = state_image();
    let area = DATA as usize + 0x400;
    // 32-bit protected-mode layout: 28-byte environment, then ST0-ST7.
    mem.ram[area..area + 108].fill(0);
    mem.ram[area..area + 2].copy_from_slice(&0x37fu16.to_le_bytes()); // FCW
    mem.ram[area + 8..area + 10].copy_from_slice(&0xffffu16.to_le_bytes()); // FTW: all empty
    for i in 0..8 {
        mem.ram[area + 28 + 10 * i..area + 38 + 10 * i].fill(0x10 + i as u8);
    }
    cpu.gprs.rsi = DATA + 0x400;
    done(&e.emulate(&mut cpu, &asm64(|a| a.frstor(ptr(rsi))), &mut img, &mut mem));
    assert_eq!(img.bytes[32..42], [0x10; 10]);
    assert_eq!(img.bytes[32 + 16 * 7..42 + 16 * 7], [0x17; 10]);
}

/// CLZERO (AMD) zeroes the whole 64-byte line holding rAX, as a store
/// (checked against the host CPU when it has CLZERO); UD0/UD1/UD2 are #UD.
#[test]
fn clzero_and_undefined_opcodes() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    if cpu_has_clzero() {
        let mut native = [0xaau8; 192];
        let base = native.as_mut_ptr() as usize;
        let line = (base + 64) & !63;
        // SAFETY: CLZERO writes the 64-byte line at `line`, inside `native`.
        unsafe { core::arch::asm!("clzero", in("rax") line + 13) };
        let off = line - base;
        assert!(native[off..off + 64].iter().all(|&b| b == 0));
        assert!(native[..off].iter().all(|&b| b == 0xaa));
    }
    mem.mmio[0x40..0xc0].fill(0xaa);
    cpu.gprs.rax = MMIO_BASE + 0x40 + 13;
    done(&e.emulate(&mut cpu, &[0x0f, 0x01, 0xfc], &mut NoVectorState, &mut mem));
    assert!(mem.mmio[0x40..0x80].iter().all(|&b| b == 0));
    assert!(mem.mmio[0x80..0xc0].iter().all(|&b| b == 0xaa));
    cpu.rip = CODE;
    cpu.gprs.rax = 0x7f_0000;
    assert_eq!(
        exc(&e.emulate(&mut cpu, &[0x0f, 0x01, 0xfc], &mut NoVectorState, &mut mem)).0,
        VEC_PF
    );
    for ud in [&[0x0f, 0x0b][..], &[0x0f, 0xb9, 0x00], &[0x0f, 0xff, 0x00]] {
        cpu.rip = CODE;
        assert_eq!(
            exc(&e.emulate(&mut cpu, ud, &mut NoVectorState, &mut mem)),
            (VEC_UD, None)
        );
    }
}

fn cpu_has_clzero() -> bool {
    core::arch::x86_64::__cpuid(0x8000_0008).ebx & 1 != 0
}

/// An emulator that completes MOVDIR64B whatever the host has: the
/// completion is a pure data move, so it runs (and is tested) on hosts
/// without the instruction; `emulate` itself gives #UD there (see
/// `movdir64b_is_ud_where_the_host_lacks_it`).
fn movdir_emul() -> Emulator {
    let mut e = emul();
    e.host_movdir64b = true;
    e
}

/// `movdir64b rdi, [rsi]`
const MOVDIR64B_RDI_RSI: [u8; 5] = [0x66, 0x0f, 0x38, 0xf8, 0x3e];

fn pattern(seed: u8) -> [u8; 64] {
    core::array::from_fn(|i| seed.wrapping_add(i as u8 * 3))
}

/// The (gpa, len) of every platform write in the log.
fn writes(mem: &MockPlatform) -> Vec<(u64, usize)> {
    mem.log
        .iter()
        .filter(|&&(w, ..)| w)
        .map(|&(_, gpa, len)| (gpa, len))
        .collect()
}

fn page_fault(o: &Outcome) -> (u32, u64) {
    match o {
        Outcome::Exception {
            vector: VEC_PF,
            error_code: Some(code),
            cr2: Some(addr),
        } => (*code, *addr),
        _ => panic!("expected #PF, got {o:?}"),
    }
}

#[test]
fn movdir64b_is_classified_as_a_direct_store() {
    for bytes in [
        &MOVDIR64B_RDI_RSI[..],
        &[0x67, 0x66, 0x0f, 0x38, 0xf8, 0x3e],
    ] {
        let i = iced_x86::Decoder::new(64, bytes, 0).decode();
        assert_eq!(i.mnemonic(), iced_x86::Mnemonic::Movdir64b);
        let class = classify(&i).unwrap();
        assert_eq!(class.kind, crate::classify::Kind::DirectStore);
        assert!(!class.vector, "no vector state needed");
    }
}

/// RAM to RAM: the 64 source bytes (unaligned source) land at the aligned
/// destination with one 64-byte write; registers and flags unchanged, RIP
/// past the instruction, the destination page dirty.
#[test]
fn movdir64b_ram_to_ram() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    let src = DATA + 0x13;
    let dst = DATA + 0x1040;
    mem.ram[src as usize..src as usize + 64].copy_from_slice(&pattern(1));
    mem.ram[dst as usize - 8..dst as usize + 72].fill(0xcc);
    cpu.gprs.rsi = src;
    cpu.gprs.rdi = dst;
    cpu.gprs.rflags = 0x2 | 0x1; // CF set: must survive
    let before = cpu.gprs;
    let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
    assert_eq!(
        o,
        Outcome::Done {
            mnemonic: iced_x86::Mnemonic::Movdir64b
        }
    );
    assert_eq!(mem.ram[dst as usize..dst as usize + 64], pattern(1));
    assert_eq!(mem.ram[dst as usize - 8..dst as usize], [0xcc; 8]);
    assert_eq!(mem.ram[dst as usize + 64..dst as usize + 72], [0xcc; 8]);
    assert_eq!(cpu.gprs, before);
    assert_eq!(cpu.rip, CODE + MOVDIR64B_RDI_RSI.len() as u64);
    let data_writes: Vec<_> = writes(&mem)
        .into_iter()
        .filter(|&(gpa, _)| gpa >= DATA)
        .collect();
    assert_eq!(data_writes, [(dst, 64)], "one 64-byte store");
    assert_eq!(mem.leaf(CR3, 4, dst) & 0x60, 0x60, "A and D on the leaf");
    assert_eq!(mem.leaf(CR3, 4, src) & 0x60, 0x20, "source: A only");
}

/// A source crossing a page boundary is read from both pages (each
/// translated on its own: the second page maps elsewhere).
#[test]
fn movdir64b_source_split_across_pages() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    let lin = 0x50_0000u64;
    let (first, second) = (DATA + 0x2000, DATA + 0x1000); // reversed
    mem.map(CR3, 4, lin, first, RW);
    mem.map(CR3, 4, lin + 0x1000, second, RW);
    let src = lin + 0x1000 - 24;
    let p = pattern(7);
    mem.ram[(first + 0x1000 - 24) as usize..(first + 0x1000) as usize].copy_from_slice(&p[..24]);
    mem.ram[second as usize..second as usize + 40].copy_from_slice(&p[24..]);
    cpu.gprs.rsi = src;
    cpu.gprs.rdi = DATA + 0x3000;
    done(&e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[(DATA + 0x3000) as usize..(DATA + 0x3040) as usize],
        p
    );
}

/// The destination on MMIO gets exactly one 64-byte write; a source on
/// MMIO is read from the device.
#[test]
fn movdir64b_to_and_from_mmio() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    mem.ram[DATA as usize + 5..DATA as usize + 69].copy_from_slice(&pattern(9));
    cpu.gprs.rsi = DATA + 5;
    cpu.gprs.rdi = MMIO_BASE + 0x80;
    done(&e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem));
    assert_eq!(mem.mmio[0x80..0xc0], pattern(9));
    let mmio_writes: Vec<_> = writes(&mem)
        .into_iter()
        .filter(|&(gpa, _)| gpa >= MMIO_BASE)
        .collect();
    assert_eq!(mmio_writes, [(MMIO_BASE + 0x80, 64)]);

    // MMIO to RAM.
    cpu.rip = CODE;
    mem.mmio[0x203..0x243].copy_from_slice(&pattern(0x40));
    cpu.gprs.rsi = MMIO_BASE + 0x203;
    cpu.gprs.rdi = DATA + 0x1c0;
    mem.log.clear();
    done(&e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[DATA as usize + 0x1c0..DATA as usize + 0x200],
        pattern(0x40)
    );
    assert!(mem
        .log
        .iter()
        .any(|&(w, gpa, len)| !w && gpa == MMIO_BASE + 0x203 && len == 64));
}

/// A destination off a 64-byte boundary is #GP(0), even on a missing
/// page, but only once the source checked out: a source #PF wins (SDM:
/// #GP(0) "if address in destination (register) operand is not aligned to
/// a 64-byte boundary"; the order as the CPU,
/// `stub::tests::movdir64b_fault_order_on_the_host`). Nothing is written,
/// RIP stays.
#[test]
fn movdir64b_misaligned_destination_is_gp0() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    mem.mmio[..0x100].fill(0xcc);
    for dst in [DATA + 0x1008, MMIO_BASE + 0x20, 0x7f_0000 + 0x40 + 1] {
        cpu.rip = CODE;
        cpu.gprs.rsi = DATA;
        cpu.gprs.rdi = dst;
        mem.log.clear();
        let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
        assert_eq!(exc(&o), (VEC_GP, Some(0)), "{dst:#x}");
        assert!(
            !writes(&mem).iter().any(|&(gpa, _)| gpa >= DATA),
            "{:?}",
            mem.log
        );
        assert_eq!(cpu.rip, CODE);
    }
    assert_eq!(mem.mmio[..0x100], [0xcc; 0x100]);
    // Non-canonical destination: #GP(0) too.
    cpu.gprs.rdi = 0x8000_0000_0000_0000;
    let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_GP, Some(0)));
    // The source's #PF comes first.
    for dst in [DATA + 0x1008, 0x8000_0000_0000_0008] {
        cpu.gprs.rsi = 0x7f_0000 + 8;
        cpu.gprs.rdi = dst;
        let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
        assert_eq!(page_fault(&o), (0, 0x7f_0008), "{dst:#x}");
    }
}

/// Page faults: a source on a missing page (CR2 the first missing byte,
/// error code of a read), then a destination on a missing or read-only
/// page (W set). The destination is never written.
#[test]
fn movdir64b_page_faults() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    let missing = 0x7f_0000u64;
    let dst = DATA + 0x2000;
    mem.ram[dst as usize..dst as usize + 64].fill(0xcc);
    let mut run = |cpu: &mut CpuState, mem: &mut MockPlatform, src: u64, dst: u64| {
        cpu.rip = CODE;
        cpu.gprs.rsi = src;
        cpu.gprs.rdi = dst;
        let o = e.emulate(cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, mem);
        assert_eq!(cpu.rip, CODE);
        page_fault(&o)
    };
    // Source wholly on a missing page.
    assert_eq!(
        run(&mut cpu, &mut mem, missing + 0x10, dst),
        (0, missing + 0x10)
    );
    // Source crossing from the last data page into a missing one.
    let edge = DATA + 0x4000;
    assert_eq!(run(&mut cpu, &mut mem, edge - 8, dst), (0, edge));
    // At CPL 3 on a supervisor page: present, user.
    cpu.cpl = 3;
    assert_eq!(run(&mut cpu, &mut mem, DATA, dst), (PFEC_P | PFEC_U, DATA));
    cpu.cpl = 0;
    assert_eq!(mem.ram[dst as usize..dst as usize + 64], [0xcc; 64]);
    // Destination missing: a write fault, after the source checked out.
    assert_eq!(run(&mut cpu, &mut mem, DATA, missing), (PFEC_W, missing));
    // Both missing: the source's fault comes first.
    assert_eq!(
        run(&mut cpu, &mut mem, missing + 0x1000, missing),
        (0, missing + 0x1000)
    );
    // Destination read-only (CR0.WP at CPL 0).
    let ro = 0x70_0000u64;
    mem.map(CR3, 4, ro, DATA + 0x3000, 0x1);
    mem.log.clear();
    assert_eq!(run(&mut cpu, &mut mem, DATA, ro), (PFEC_P | PFEC_W, ro));
    assert!(
        !writes(&mem).iter().any(|&(gpa, _)| gpa >= DATA),
        "{:?}",
        mem.log
    );
}

/// The 32-bit address-size form (67h): EDI and the source's ESI are used
/// zero-extended, their upper halves ignored. Also in real mode: DI is an
/// offset into ES, SI into DS.
#[test]
fn movdir64b_address_size_forms() {
    let (mut cpu, mut mem) = setup();
    let mut e = movdir_emul();
    let code = asm64(|a| a.movdir64b(edi, ptr(esi)));
    assert_eq!(code, [0x67, 0x66, 0x0f, 0x38, 0xf8, 0x3e]);
    mem.ram[DATA as usize + 0x100..DATA as usize + 0x140].copy_from_slice(&pattern(0x21));
    cpu.gprs.rsi = 0xdead_0000_0000_0000 | (DATA + 0x100);
    cpu.gprs.rdi = 0xbeef_0000_0000_0000 | (DATA + 0x3c0);
    done(&e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[DATA as usize + 0x3c0..DATA as usize + 0x400],
        pattern(0x21)
    );
    assert_eq!(cpu.rip, CODE + code.len() as u64);

    // Real mode, paging off: ES:DI <- DS:SI.
    let seg = |base: u64| Segment {
        base,
        limit: 0xffff,
        type_: 0x3,
        present: true,
        ..Default::default()
    };
    let mut real = CpuState {
        cs: Segment {
            type_: 0xb,
            ..seg(CODE)
        },
        ds: seg(DATA + 0x1000),
        es: seg(DATA + 0x2000),
        rip: 0x10,
        ..Default::default()
    };
    let mut a = CodeAssembler::new(16).unwrap();
    a.movdir64b(di, ptr(si)).unwrap();
    let code16 = a.assemble(0x10).unwrap();
    mem.ram[DATA as usize + 0x1005..DATA as usize + 0x1045].copy_from_slice(&pattern(0x55));
    real.gprs.rsi = 0x5;
    real.gprs.rdi = 0x1_0080; // DI = 0x80
    done(&e.emulate(&mut real, &code16, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[DATA as usize + 0x2080..DATA as usize + 0x20c0],
        pattern(0x55)
    );
    assert_eq!(real.rip, 0x10 + code16.len() as u64);
    // Past ES's limit: #GP(0).
    real.rip = 0x10;
    real.es.limit = 0xa0;
    assert_eq!(
        exc(&e.emulate(&mut real, &code16, &mut NoVectorState, &mut mem)),
        (VEC_GP, Some(0))
    );
}

/// A host without MOVDIR64B gives the guest #UD (its CPUID leaf 7 is the
/// host's), as does a LOCK prefix (SDM); nothing is accessed.
#[test]
fn movdir64b_is_ud_where_the_host_lacks_it() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    assert_eq!(e.host_movdir64b, crate::emulator::host_has_movdir64b());
    e.host_movdir64b = false;
    cpu.gprs.rsi = DATA;
    cpu.gprs.rdi = DATA + 0x1000;
    let o = e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_UD, None));
    assert!(mem.log.is_empty());
    let mut e = movdir_emul();
    let locked = [0xf0, 0x66, 0x0f, 0x38, 0xf8, 0x3e];
    let o = e.emulate(&mut cpu, &locked, &mut NoVectorState, &mut mem);
    assert_eq!(exc(&o), (VEC_UD, None));
    assert!(mem.log.is_empty());
}

/// Against the CPU, where the host has MOVDIR64B: the same 64 bytes land
/// at the destination, nothing around it changes.
#[test]
fn movdir64b_matches_the_cpu() {
    if !crate::emulator::host_has_movdir64b() {
        eprintln!("skipped: host has no MOVDIR64B (CPUID.07H.0H:ECX[28] = 0)");
        return;
    }
    let src = pattern(0x77);
    let mut native = [0xccu8; 256];
    let base = native.as_mut_ptr() as usize;
    let dst = (base + 127) & !63; // 64 bytes or more from either end
                                  // SAFETY: MOVDIR64B reads the 64 bytes of `src` and writes the 64-byte
                                  // aligned line at `dst`, inside `native`.
    unsafe {
        core::arch::asm!(
            "movdir64b rdi, [rsi]",
            in("rsi") src.as_ptr(),
            in("rdi") dst,
            options(nostack),
        )
    };
    // The line with 64 bytes either side, natively and in the guest.
    let native = &native[dst - base - 64..dst - base + 128];
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    mem.ram[DATA as usize + 1..DATA as usize + 65].copy_from_slice(&src);
    mem.ram[DATA as usize + 0x1000..DATA as usize + 0x1000 + 192].fill(0xcc);
    cpu.gprs.rsi = DATA + 1;
    cpu.gprs.rdi = DATA + 0x1040;
    done(&e.emulate(&mut cpu, &MOVDIR64B_RDI_RSI, &mut NoVectorState, &mut mem));
    assert_eq!(
        mem.ram[DATA as usize + 0x1000..DATA as usize + 0x1000 + 192],
        *native
    );
}

/// Multi-byte and reserved NOPs with a memory operand never access it or
/// fault (the CPU: `nop [unmapped]` runs); LAR/LSL stay refused, naming
/// why.
#[test]
fn memory_nops_and_descriptor_reads() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    cpu.gprs.rsi = 0x7f_0000; // not mapped
    for code in [
        asm64(|a| a.nop_1(dword_ptr(rsi))),
        vec![0x0f, 0x1d, 0x0e],
        vec![0x90],
    ] {
        cpu.rip = CODE;
        mem.log.clear();
        let o = e.emulate(&mut cpu, &code, &mut NoVectorState, &mut mem);
        assert!(matches!(o, Outcome::Done { .. }), "{code:02x?}: {o:?}");
        assert_eq!(cpu.rip, CODE + code.len() as u64);
        assert!(mem.log.is_empty());
    }
    cpu.rip = CODE;
    let o = e.emulate(
        &mut cpu,
        &asm64(|a| a.lar(ecx, word_ptr(rsi))),
        &mut NoVectorState,
        &mut mem,
    );
    assert!(
        matches!(&o, Outcome::Unsupported { text } if text.contains("descriptor-table")),
        "{o:?}"
    );
}

/// VEX forms check CR4.OSXSAVE and XCR0, not CR4.OSFXSR or CR0.EM (SDM
/// vol. 2, table 2-21); legacy SSE checks those two.
#[test]
fn vex_ignores_osfxsr_and_em() {
    if !avx_ok() {
        eprintln!("skipped: host has no AVX");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = XsaveImage::new();
    cpu.cr4 &= !CR4_OSFXSR;
    cpu.cr0 |= CR0_EM;
    done(&e.emulate(&mut cpu, &asm64(|a| a.vzeroall()), &mut img, &mut mem));
    cpu.rip = CODE;
    let o = e.emulate(
        &mut cpu,
        &asm64(|a| a.addps(xmm0, xmm1)),
        &mut img,
        &mut mem,
    );
    assert_eq!(exc(&o), (VEC_UD, None));
}

/// Host-side cost of the whole-state family against a vector load on the
/// same mock guest (issue 9 asks for no more than two vector emulations):
/// `cargo test -p emul --release --lib bench_whole_state -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_whole_state_against_a_vector_load() {
    if !xsave_ok() || !avx_ok() {
        eprintln!("skipped: host has no XSAVE/AVX");
        return;
    }
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = state_image();
    cpu.gprs.rsi = DATA + 0x1000;
    cpu.gprs.rax = 0b111;
    cpu.gprs.rdx = 0;
    let mut median = |code: Vec<u8>, mem: &mut MockPlatform| {
        let mut samples = Vec::with_capacity(5_000);
        for _ in 0..5_000 {
            cpu.rip = CODE;
            mem.log.clear();
            let t = std::time::Instant::now();
            let o = e.emulate(&mut cpu, &code, &mut img, mem);
            samples.push(t.elapsed().as_nanos());
            assert!(matches!(o, Outcome::Done { .. }), "{o:?}");
        }
        samples.sort_unstable();
        samples[samples.len() / 2]
    };
    let vector = median(asm64(|a| a.vmovdqu(ymm0, ptr(rsi))), &mut mem);
    for (name, code) in [
        ("xsave64", asm64(|a| a.xsave64(ptr(rsi)))),
        ("xrstor64", asm64(|a| a.xrstor64(ptr(rsi)))),
        ("fxsave64", asm64(|a| a.fxsave64(ptr(rsi)))),
        ("fnstenv", asm64(|a| a.fnstenv(ptr(rsi)))),
    ] {
        let t = median(code, &mut mem);
        eprintln!(
            "{name}: median {t} ns, {:.2}x vmovdqu ymm ({vector} ns)",
            t as f64 / vector as f64
        );
    }
}

/// Intel's shape, as the probes find it on Sapphire/Emerald Rapids.
fn intel_shape() -> crate::stub::shape::HostShape {
    crate::stub::shape::HostShape {
        split_store_cr2_last: true,
        maskmovdqu_unmasked_fault: Some(8),
        // Not measured on Intel.
        maskmovq_unmasked_fault: None,
        gather_mask_normalized: true,
        fop_always: false,
        fdp_always: false,
        // Not measured on Intel.
        state_checks: Default::default(),
    }
}

/// What masked_native measured on Intel Xeon (Sapphire Rapids, device
/// run of 2026-11-29), replayed with Intel's shape on whatever CPU runs
/// the test: a masked store split across a mapped and a missing page
/// faults at its last selected byte; MASKMOVDQU faults at RDI + 8 whatever
/// its mask; a faulting AVX2 gather leaves its mask normalized.
#[test]
fn intel_measurements_replayed_with_intels_shape() {
    if !is_x86_feature_detected!("avx2") || !avx_ok() {
        eprintln!("skipped: host has no AVX2");
        return;
    }
    let end = DATA + 4 * 0x1000; // first unmapped page
    let image = |regs: &[(usize, [u32; 4])]| {
        let mut img = XsaveImage::new();
        for (r, d) in regs {
            for (i, v) in d.iter().enumerate() {
                img.bytes[160 + 16 * r + 4 * i..164 + 16 * r + 4 * i]
                    .copy_from_slice(&v.to_le_bytes());
            }
        }
        img.bytes[512] = 0b111;
        img
    };
    // vmaskmovps [end-8], xmm1 (mask), xmm2: elements 0 and 2 selected ->
    // CR2 end+3 (Intel), all four -> end+7.
    for (mask, want) in [([!0u32, 0, !0, 0], end + 3), ([!0u32; 4], end + 7)] {
        let (mut cpu, mut mem) = setup();
        let mut e = emul();
        e.set_host_shape(intel_shape());
        cpu.gprs.rbp = end - 8;
        let mut img = image(&[(1, mask), (2, [1, 2, 3, 4])]);
        let o = e.emulate(
            &mut cpu,
            &asm64(|a| a.vmaskmovps(ptr(rbp), xmm1, xmm2)),
            &mut img,
            &mut mem,
        );
        assert_eq!(
            o,
            Outcome::Exception {
                vector: VEC_PF,
                error_code: Some(PFEC_W),
                cr2: Some(want)
            },
            "mask {mask:x?}"
        );
    }
    // maskmovdqu xmm1, xmm2 with an all-zero mask at the missing page.
    {
        let (mut cpu, mut mem) = setup();
        let mut e = emul();
        e.set_host_shape(intel_shape());
        cpu.gprs.rdi = end;
        let mut img = image(&[(1, [1, 2, 3, 4])]);
        let o = e.emulate(
            &mut cpu,
            &asm64(|a| a.maskmovdqu(xmm1, xmm2)),
            &mut img,
            &mut mem,
        );
        assert_eq!(
            o,
            Outcome::Exception {
                vector: VEC_PF,
                error_code: Some(PFEC_W),
                cr2: Some(end + 8)
            }
        );
    }
    // vpgatherdd xmm1, [rbp+xmm0], xmm2 with the diff test's indices
    // (element 0 at +52, 1 at +8, 2 at +44, 3 at +20) and rbp = end - 32:
    // elements 0 and 2 are on the missing page. Mask 0x1 leaves
    // [ffffffff, 0, 0, 0]; mask 0x5 (elements 0, 2) [ffffffff, 0, ffffffff, 0].
    let (sel, other) = (0x8000_0091u32, 0x7f26_2626u32);
    for (mask, after) in [
        ([sel, other, other, other], [!0u32, 0, 0, 0]),
        ([sel, other, sel, other], [!0u32, 0, !0, 0]),
    ] {
        let (mut cpu, mut mem) = setup();
        let mut e = emul();
        e.set_host_shape(intel_shape());
        cpu.gprs.rbp = end - 32;
        let mut img = image(&[(0, [52, 8, 44, 20]), (1, [0; 4]), (2, mask)]);
        let o = e.emulate(
            &mut cpu,
            &asm64(|a| a.vpgatherdd_3(xmm1, ptr(rbp + xmm0), xmm2)),
            &mut img,
            &mut mem,
        );
        assert_eq!(exc(&o).0, VEC_PF);
        let got: Vec<u32> = (0..4)
            .map(|i| u32::from_le_bytes(img.bytes[192 + 4 * i..196 + 4 * i].try_into().unwrap()))
            .collect();
        assert_eq!(got, after, "mask {mask:x?}");
    }
}

/// Intel records FOP and FDP only for an x87 instruction that raises an
/// unmasked exception (differential test on Sapphire Rapids: after `fld
/// dword [rbp]` FOP and FDP still hold the earlier values); FIP always.
#[test]
fn x87_pointers_follow_the_hosts_recording() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    e.set_host_shape(intel_shape());
    let mut img = XsaveImage::new();
    img.bytes[6..8].copy_from_slice(&0x555u16.to_le_bytes()); // FOP
    img.bytes[16..24].copy_from_slice(&0x1234u64.to_le_bytes()); // FDP
    img.bytes[512] = 0b11;
    mem.ram[DATA as usize..DATA as usize + 4].copy_from_slice(&1.5f32.to_bits().to_le_bytes());
    cpu.gprs.rbp = DATA;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.fld(dword_ptr(rbp))),
        &mut img,
        &mut mem,
    ));
    let word = |off: usize| u64::from_le_bytes(img.bytes[off..off + 8].try_into().unwrap());
    assert_eq!(word(8), CODE, "FIP is the guest's RIP");
    assert_eq!(
        u16::from_le_bytes([img.bytes[6], img.bytes[7]]),
        0x555,
        "FOP kept"
    );
    assert_eq!(word(16), 0x1234, "FDP kept");
    // AMD's shape (always recorded): the instruction's own.
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    e.set_host_shape(crate::stub::shape::HostShape::default());
    let mut img2 = XsaveImage::new();
    img2.bytes[512] = 0b11;
    mem.ram[DATA as usize..DATA as usize + 4].copy_from_slice(&1.5f32.to_bits().to_le_bytes());
    cpu.gprs.rbp = DATA;
    done(&e.emulate(
        &mut cpu,
        &asm64(|a| a.fld(dword_ptr(rbp))),
        &mut img2,
        &mut mem,
    ));
    assert_eq!(
        u16::from_le_bytes([img2.bytes[6], img2.bytes[7]]),
        0x145,
        "FOP of d9 45"
    );
    assert_eq!(
        u64::from_le_bytes(img2.bytes[16..24].try_into().unwrap()),
        DATA
    );
}

/// The mask-to-element rules, on facts masked_native measured on Intel
/// Xeon (Sapphire Rapids, 2026-11-29): pure functions of the instruction
/// and the image, so they run on any host.
#[test]
fn selection_rules_match_the_intel_measurements() {
    use crate::writeback::{element_mask, masked_store, ElementMask, XsaveLayout};
    let layout = XsaveLayout {
        ymm_hi128: 576,
        opmask: 1088,
        zmm_hi256: 1152,
        hi16_zmm: 1664,
    };
    let image_with_k1 = |kv: u64| {
        let mut img = vec![0u8; 4096];
        img[512] = 0xe7;
        img[1088 + 8..1088 + 16].copy_from_slice(&kv.to_le_bytes());
        img
    };
    let decode = |bytes: Vec<u8>| iced_x86::Decoder::new(64, &bytes, 0).decode();
    // EVEX encodings even where VEX would do (the masks need them).
    let asm64 = |f: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>| {
        let mut a = CodeAssembler::new(64).unwrap();
        a.set_prefer_vex(false);
        f(&mut a).unwrap();
        a.assemble(0).unwrap()
    };
    let mask = |code: Vec<u8>, kv: u64| element_mask(&decode(code), &image_with_k1(kv), layout);
    // No suppression: VINSERTF32X4 and a broadcast VUNPCKLPS fault with k1 = 0.
    assert_eq!(
        mask(
            asm64(&|a| a.vinsertf32x4(ymm1.k1(), ymm2, ptr(rbp), 0x1b)),
            0
        ),
        None
    );
    assert_eq!(
        mask(asm64(&|a| a.vunpcklps(xmm1.k1(), xmm2, dword_bcst(rbp))), 0),
        None
    );
    // VPMULUDQ: mask bit 1 is the second qword (dwords 2 and 3): at 8 bytes
    // before a missing page it faults.
    assert_eq!(
        mask(asm64(&|a| a.vpmuludq(xmm1.k1(), xmm2, ptr(rbp))), 0x2),
        Some(ElementMask {
            element_size: 4,
            bits: 0b1100
        })
    );
    // VPSHUFBITQMB: mask bit 1 is byte 1 (CR2 at +1).
    assert_eq!(
        mask(asm64(&|a| a.vpshufbitqmb(k2.k1(), xmm1, ptr(rbp))), 0x2),
        Some(ElementMask {
            element_size: 1,
            bits: 0b10
        })
    );
    // A {1to4} broadcast reads nothing when only bit 4 is set.
    assert_eq!(
        mask(asm64(&|a| a.vaddps(xmm1.k1(), xmm2, dword_bcst(rbp))), 0x10),
        Some(ElementMask {
            element_size: 4,
            bits: 0
        })
    );
    // A complex FP16 scalar is one 32-bit element: bit 0 covers both halves.
    assert_eq!(
        mask(
            asm64(&|a| a.vfmaddcsh(xmm1.k1(), xmm2, dword_ptr(rbp))),
            0x1
        ),
        Some(ElementMask {
            element_size: 2,
            bits: 0b11
        })
    );
    // Expand loads read popcount(k) elements from the start.
    assert_eq!(
        mask(asm64(&|a| a.vexpandps(xmm1.k1(), ptr(rbp))), 0b1010),
        Some(ElementMask {
            element_size: 4,
            bits: 0b11
        })
    );
    // An extract walks its whole operand, yet stores only selected elements.
    let extract = decode(asm64(&|a| a.vextractf32x4(ptr(rbp).k1(), ymm1, 1)));
    assert_eq!(element_mask(&extract, &image_with_k1(0b0101), layout), None);
    assert_eq!(
        masked_store(&extract, &image_with_k1(0b0101), layout),
        Some(ElementMask {
            element_size: 4,
            bits: 0b0101
        })
    );
}

/// MXCSR bit 17 (AMD's misaligned-SSE mask, MM) is valid where the CPU's
/// MXCSR_MASK has it: LDMXCSR of it completes there, and the vector
/// instructions after it still run (the stub once took such an image for
/// a bad one and refused every vector instruction after it; found by the
/// fuzz at case 3,827,190 of seed 20261130). Elsewhere it is #GP(0).
#[test]
fn ldmxcsr_of_a_bit_the_cpu_accepts_keeps_vector_instructions_running() {
    let (mut cpu, mut mem) = setup();
    let mut e = emul();
    let mut img = XsaveImage::new();
    img.bytes[512] = 0b11;
    mem.set_u32(DATA, 0x2_1f80);
    cpu.gprs.rax = DATA;
    let o = e.emulate(
        &mut cpu,
        &asm64(|a| a.ldmxcsr(dword_ptr(rax))),
        &mut img,
        &mut mem,
    );
    if o == (Outcome::Done {
        mnemonic: iced_x86::Mnemonic::Ldmxcsr,
    }) {
        assert_eq!(
            u32::from_le_bytes(img.bytes[24..28].try_into().unwrap()),
            0x2_1f80
        );
        cpu.rip = CODE;
        done(&e.emulate(
            &mut cpu,
            &asm64(|a| a.movups(xmm0, ptr(rax))),
            &mut img,
            &mut mem,
        ));
    } else {
        assert_eq!(
            exc(&o),
            (VEC_GP, Some(0)),
            "not accepted: #GP(0) as natively"
        );
    }
}
