//! ACPI tables in the BIOS area, for guests that look for them the legacy way
//! (kvm-unit-tests' `find_acpi_table_addr`: scan 0xe0000-0xfffff in 16-byte
//! steps for "RSD PTR ", follow `rsdt_physical_address`, walk the RSDT; the
//! FACS through the FADT's `firmware_ctrl`). It never looks at an XSDT, so
//! the RSDP is the ACPI 1.0 one (revision 0) and every table sits below 4 GiB.
//!
//! ```text
//! ACPI_AREA + 0x00   RSDP (20 bytes; first, so the scan stops at once)
//! ACPI_AREA + 0x40   FACS (64 bytes, 64-byte aligned as the spec asks)
//! then, 16-aligned   DSDT (header only), FADT, MADT, RSDT -> [FADT, MADT]
//! ```
//!
//! The FADT points PM_TMR_BLK at [`PM_TMR_PORT`]. PM1a_EVT_BLK/PM1a_CNT_BLK
//! carry QEMU's PIIX4 addresses (0x600, 0x604) because the spec requires them
//! for a non-hardware-reduced platform; the acpi-pm device serves them
//! (`devices::acpi_pm1`: S3 with an RTC alarm wake-up).

use crate::devices::pm_timer::{PM_TMR_LEN, PM_TMR_PORT, PM_TMR_VAL_EXT};
use crate::layout::{ACPI_AREA, IOAPIC_ADDR, LAPIC_ADDR};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// The BIOS read-only area the RSDP scan covers ends here.
pub const ACPI_AREA_END: u64 = 0x10_0000;

pub const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
/// RSDP revision 0: ACPI 1.0, RSDT only.
const RSDP_REVISION: u8 = 0;
const RSDP_LEN: usize = 20;
const RSDP_CHECKSUM: usize = 8;
const RSDP_RSDT_ADDRESS: usize = 16;

/// The common 36-byte header of every table but the RSDP and FACS.
const SDT_HEADER_LEN: usize = 36;
const SDT_LENGTH: usize = 4;
const SDT_CHECKSUM: usize = 9;
const OEM_ID: &[u8; 6] = b"MCRVMM";
const OEM_TABLE_ID: &[u8; 8] = b"MCRVMM  ";
const CREATOR_ID: &[u8; 4] = b"MVMM";

const FACS_LEN: usize = 64;
const FACS_ALIGN: usize = 64;
/// Right after the RSDP, at the FACS's alignment.
const FACS_OFFSET: usize = RSDP_LEN.next_multiple_of(FACS_ALIGN);
/// Guest-physical address of the FACS.
pub const FACS_ADDR: u64 = ACPI_AREA + FACS_OFFSET as u64;
/// The FACS's 32-bit firmware waking vector (real-mode entry on resume).
pub const FACS_FIRMWARE_WAKING_VECTOR: u64 = 12;
const TABLE_ALIGN: usize = 16;

/// FADT revision 1 (ACPI 1.0): 116 bytes, flags last.
const FADT_REVISION: u8 = 1;
const FADT_LEN: usize = 116;
const FADT_FIRMWARE_CTRL: usize = 36;
const FADT_DSDT: usize = 40;
const FADT_INT_MODEL: usize = 44;
const FADT_SCI_INT: usize = 46;
const FADT_PM1A_EVT_BLK: usize = 56;
const FADT_PM1A_CNT_BLK: usize = 64;
const FADT_PM_TMR_BLK: usize = 76;
const FADT_PM1_EVT_LEN: usize = 88;
const FADT_PM1_CNT_LEN: usize = 89;
const FADT_PM_TMR_LEN: usize = 91;
const FADT_P_LVL2_LAT: usize = 96;
const FADT_P_LVL3_LAT: usize = 98;
const FADT_CENTURY: usize = 108;
const FADT_FLAGS: usize = 112;
/// INT_MODEL 1: multiple APIC (ACPI 1.0).
const INT_MODEL_APIC: u8 = 1;
/// SCI on ISA IRQ 9, as on PIIX4.
const SCI_INT: u16 = 9;
const PM1_BASE: u32 = 0x600;
const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;
/// Latencies above 100/1000 us say "no C2/C3".
const P_LVL2_LAT_NONE: u16 = 0x0fff;
const P_LVL3_LAT_NONE: u16 = 0x0fff;
/// CMOS index of the RTC century byte.
const RTC_CENTURY: u8 = 0x32;
const FADT_F_WBINVD: u32 = 1 << 0;
const FADT_F_PROC_C1: u32 = 1 << 2;
const FADT_F_TMR_VAL_EXT: u32 = 1 << 8;

/// MADT (signature "APIC").
const MADT_REVISION: u8 = 1;
/// PCAT_COMPAT: dual 8259s are present too (KVM's in-kernel irqchip).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LOCAL_APIC: u8 = 0;
const MADT_TYPE_IO_APIC: u8 = 1;
const MADT_TYPE_INT_SRC_OVERRIDE: u8 = 2;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
const MADT_LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags: active high, level triggered.
const MPS_INTI_LEVEL_HIGH: u16 = 0x000d;
/// Processor UID 0xff: the entry applies to every processor.
const ALL_PROCESSORS: u8 = 0xff;

const DSDT_REVISION: u8 = 1;
const RSDT_REVISION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("{0} CPUs do not fit the MADT's 8-bit APIC IDs")]
    TooManyCpus(u16),
    #[error("a VM needs at least one CPU")]
    NoCpus,
    #[error("ACPI tables ({0} bytes) do not fit the BIOS area")]
    TooBig(usize),
    #[error("writing ACPI tables to guest memory: {0}")]
    Write(#[from] GuestMemoryError),
}

/// What the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    pub nb_cpus: u16,
}

/// Builds the tables and writes them at [`ACPI_AREA`].
pub fn write_tables(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<(), AcpiError> {
    let image = build_tables(cfg)?;
    mem.write_slice(&image, GuestAddress(ACPI_AREA))?;
    Ok(())
}

/// The byte image that belongs at [`ACPI_AREA`].
fn build_tables(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    // APIC IDs 0..n-1 for the CPUs, all 8-bit.
    if cfg.nb_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if cfg.nb_cpus > 255 {
        return Err(AcpiError::TooManyCpus(cfg.nb_cpus));
    }
    let mut image = vec![0u8; FACS_OFFSET];
    image.extend_from_slice(&facs());
    let dsdt = place(&mut image, &sdt(b"DSDT", DSDT_REVISION, &[]));
    let facp = place(&mut image, &fadt(gpa(FACS_OFFSET), dsdt));
    let apic = place(&mut image, &madt(cfg.nb_cpus));
    let rsdt_body: Vec<u8> = [facp, apic].iter().flat_map(|a| a.to_le_bytes()).collect();
    let rsdt = place(&mut image, &sdt(b"RSDT", RSDT_REVISION, &rsdt_body));
    image[..RSDP_LEN].copy_from_slice(&rsdp(rsdt));
    if ACPI_AREA + image.len() as u64 > ACPI_AREA_END {
        return Err(AcpiError::TooBig(image.len()));
    }
    Ok(image)
}

/// Guest-physical address of image offset `off`; the image lives below 1 MiB.
fn gpa(off: usize) -> u32 {
    (ACPI_AREA + off as u64) as u32
}

/// Appends `table` at the next 16-byte boundary; returns its address.
fn place(image: &mut Vec<u8>, table: &[u8]) -> u32 {
    image.resize(image.len().next_multiple_of(TABLE_ALIGN), 0);
    let at = gpa(image.len());
    image.extend_from_slice(table);
    at
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

fn put_u32(t: &mut [u8], at: usize, v: u32) {
    t[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn rsdp(rsdt: u32) -> [u8; RSDP_LEN] {
    let mut t = [0u8; RSDP_LEN];
    t[..8].copy_from_slice(RSDP_SIGNATURE);
    t[9..15].copy_from_slice(OEM_ID);
    t[15] = RSDP_REVISION;
    put_u32(&mut t, RSDP_RSDT_ADDRESS, rsdt);
    t[RSDP_CHECKSUM] = checksum(&t);
    t
}

/// A table: header for `signature` + `body`, length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; SDT_HEADER_LEN];
    t[..4].copy_from_slice(signature);
    t[8] = revision;
    t[10..16].copy_from_slice(OEM_ID);
    t[16..24].copy_from_slice(OEM_TABLE_ID);
    put_u32(&mut t, 24, 1); // OEM revision
    t[28..32].copy_from_slice(CREATOR_ID);
    put_u32(&mut t, 32, 1); // creator revision
    t.extend_from_slice(body);
    let len = t.len() as u32;
    put_u32(&mut t, SDT_LENGTH, len);
    t[SDT_CHECKSUM] = checksum(&t);
    t
}

/// The FACS has no checksum; it must be 64-byte aligned.
fn facs() -> [u8; FACS_LEN] {
    let mut t = [0u8; FACS_LEN];
    t[..4].copy_from_slice(b"FACS");
    put_u32(&mut t, 4, FACS_LEN as u32);
    t
}

fn fadt(facs: u32, dsdt: u32) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - SDT_HEADER_LEN];
    // Field offsets are from the table start; the body starts after the
    // header.
    let mut put = |at: usize, bytes: &[u8]| {
        let at = at - SDT_HEADER_LEN;
        b[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(FADT_FIRMWARE_CTRL, &facs.to_le_bytes());
    put(FADT_DSDT, &dsdt.to_le_bytes());
    put(FADT_INT_MODEL, &[INT_MODEL_APIC]);
    put(FADT_SCI_INT, &SCI_INT.to_le_bytes());
    // SMI_CMD stays 0: no SMM, the machine is always in ACPI mode.
    put(FADT_PM1A_EVT_BLK, &PM1_BASE.to_le_bytes());
    put(FADT_PM1A_CNT_BLK, &(PM1_BASE + 4).to_le_bytes());
    put(FADT_PM_TMR_BLK, &u32::from(PM_TMR_PORT).to_le_bytes());
    put(FADT_PM1_EVT_LEN, &[PM1_EVT_LEN]);
    put(FADT_PM1_CNT_LEN, &[PM1_CNT_LEN]);
    put(FADT_PM_TMR_LEN, &[PM_TMR_LEN as u8]);
    put(FADT_P_LVL2_LAT, &P_LVL2_LAT_NONE.to_le_bytes());
    put(FADT_P_LVL3_LAT, &P_LVL3_LAT_NONE.to_le_bytes());
    put(FADT_CENTURY, &[RTC_CENTURY]);
    let mut flags = FADT_F_WBINVD | FADT_F_PROC_C1;
    if PM_TMR_VAL_EXT {
        flags |= FADT_F_TMR_VAL_EXT;
    }
    put(FADT_FLAGS, &flags.to_le_bytes());
    sdt(b"FACP", FADT_REVISION, &b)
}

/// The in-kernel IOAPIC's ID.
const IOAPIC_ID: u8 = 0;

fn madt(nb_cpus: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..nb_cpus as u8 {
        // Processor UID and APIC ID both equal the vCPU index.
        b.extend_from_slice(&[MADT_TYPE_LOCAL_APIC, 8, id, id]);
        b.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    // ID 0: what KVM's in-kernel IOAPIC reports in its ID register after
    // reset (QEMU's tables say 0 too).
    b.extend_from_slice(&[MADT_TYPE_IO_APIC, 12, IOAPIC_ID, 0]);
    b.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    // GSI base: the IOAPIC's pin 0 is GSI 0.
    b.extend_from_slice(&0u32.to_le_bytes());
    // The PIT's IRQ 0 is wired to IOAPIC pin 2 on PCs (KVM's default
    // routing too); flags 0: bus-default polarity and trigger.
    b.extend_from_slice(&[MADT_TYPE_INT_SRC_OVERRIDE, 10, 0, 0]);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    // The SCI is level-triggered, active high, as QEMU describes it.
    b.extend_from_slice(&[MADT_TYPE_INT_SRC_OVERRIDE, 10, 0, SCI_INT as u8]);
    b.extend_from_slice(&u32::from(SCI_INT).to_le_bytes());
    b.extend_from_slice(&MPS_INTI_LEVEL_HIGH.to_le_bytes());
    // LINT1 of every CPU is the NMI input.
    b.extend_from_slice(&[MADT_TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    sdt(b"APIC", MADT_REVISION, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    /// Reads the table at `addr`, checking its length field and checksum.
    fn table(mem: &GuestMemoryMmap, addr: u32) -> Vec<u8> {
        let head = bytes(mem, u64::from(addr), SDT_HEADER_LEN);
        let len = u32_at(&head, SDT_LENGTH) as usize;
        assert!(len >= SDT_HEADER_LEN);
        let t = bytes(mem, u64::from(addr), len);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(&t[..4]));
        t
    }

    /// What kvm-unit-tests does: scan for the RSDP, then walk the RSDT.
    fn find_rsdp(mem: &GuestMemoryMmap) -> Vec<u8> {
        (ACPI_AREA..ACPI_AREA_END)
            .step_by(16)
            .map(|a| bytes(mem, a, RSDP_LEN))
            .find(|r| &r[..8] == RSDP_SIGNATURE)
            .expect("RSDP")
    }

    fn tables(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
        let rsdp = find_rsdp(mem);
        assert_eq!(sum(&rsdp), 0, "RSDP checksum");
        assert_eq!(rsdp[15], 0, "ACPI 1.0 RSDP");
        let rsdt = table(mem, u32_at(&rsdp, RSDP_RSDT_ADDRESS));
        assert_eq!(&rsdt[..4], b"RSDT");
        rsdt[SDT_HEADER_LEN..]
            .chunks(4)
            .map(|e| table(mem, u32_at(e, 0)))
            .collect()
    }

    fn find<'a>(ts: &'a [Vec<u8>], sig: &[u8; 4]) -> &'a [u8] {
        ts.iter().find(|t| &t[..4] == sig).expect("table")
    }

    #[test]
    fn rsdp_rsdt_and_fadt_lead_to_the_pm_timer() {
        let mem = mem();
        write_tables(&mem, &AcpiConfig { nb_cpus: 2 }).unwrap();
        let ts = tables(&mem);
        assert_eq!(ts.len(), 2);
        let fadt = find(&ts, b"FACP");
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(u32_at(fadt, FADT_PM_TMR_BLK), 0x608);
        assert_eq!(fadt[FADT_PM_TMR_LEN], 4);
        assert_ne!(u32_at(fadt, FADT_FLAGS) & FADT_F_TMR_VAL_EXT, 0);
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
        let dsdt = table(&mem, u32_at(fadt, FADT_DSDT));
        assert_eq!(&dsdt[..4], b"DSDT");
        let facs_at = u32_at(fadt, FADT_FIRMWARE_CTRL);
        assert_eq!(facs_at as usize % FACS_ALIGN, 0);
        let facs = bytes(&mem, u64::from(facs_at), FACS_LEN);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(&facs, 4), FACS_LEN as u32);
    }

    #[test]
    fn madt_lists_every_cpu_the_ioapic_and_the_irq0_override() {
        let mem = mem();
        write_tables(&mem, &AcpiConfig { nb_cpus: 4 }).unwrap();
        let ts = tables(&mem);
        let madt = find(&ts, b"APIC");
        assert_eq!(u64::from(u32_at(madt, 36)), LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        let (mut lapics, mut ioapics, mut isos, mut nmis) = (vec![], vec![], vec![], 0);
        let mut e = &madt[44..];
        while !e.is_empty() {
            let len = usize::from(e[1]);
            assert!(len >= 2 && len <= e.len(), "entry length {len}");
            match e[0] {
                MADT_TYPE_LOCAL_APIC => lapics.push((e[2], e[3], u32_at(e, 4))),
                MADT_TYPE_IO_APIC => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                MADT_TYPE_INT_SRC_OVERRIDE => {
                    isos.push((e[2], e[3], u32_at(e, 4), u16::from_le_bytes([e[8], e[9]])))
                }
                MADT_TYPE_LOCAL_APIC_NMI => nmis += 1,
                t => panic!("unexpected MADT entry type {t}"),
            }
            e = &e[len..];
        }
        assert_eq!(
            lapics,
            (0..4)
                .map(|i| (i, i, MADT_LAPIC_ENABLED))
                .collect::<Vec<_>>()
        );
        assert_eq!(ioapics, vec![(IOAPIC_ID, IOAPIC_ADDR as u32, 0)]);
        assert!(isos.contains(&(0, 0, 2, 0)), "{isos:?}");
        assert!(isos.contains(&(0, 9, 9, MPS_INTI_LEVEL_HIGH)), "{isos:?}");
        assert_eq!(nmis, 1);
    }

    #[test]
    fn rsdp_is_first_and_everything_fits_with_the_most_cpus() {
        let image = build_tables(&AcpiConfig { nb_cpus: 255 }).unwrap();
        assert_eq!(&image[..8], RSDP_SIGNATURE);
        assert!(image.len() <= (ACPI_AREA_END - ACPI_AREA) as usize);
        assert!(matches!(
            build_tables(&AcpiConfig { nb_cpus: 256 }),
            Err(AcpiError::TooManyCpus(256))
        ));
        assert!(matches!(
            build_tables(&AcpiConfig { nb_cpus: 0 }),
            Err(AcpiError::NoCpus)
        ));
    }

    #[test]
    fn writing_outside_ram_is_an_error() {
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            write_tables(&small, &AcpiConfig { nb_cpus: 1 }),
            Err(AcpiError::Write(_))
        ));
    }
}
