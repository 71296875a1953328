//! ELF32 and ELF64 little-endian x86 executables.
//!
//! A small hand-written parser: linux-loader's ELF loader only handles ELF64,
//! and kvm-unit-tests ship ELF32 images. Only the ELF header and the program
//! header table are read; section headers are ignored.
//!
//! Segments are loaded at `p_paddr`, always: it is the physical address the
//! linker was told to load at, and 0 is a legitimate load address, so there
//! is no reliable way to tell "unset" apart. The entry point `e_entry` is a
//! virtual address; when it falls inside a PT_LOAD segment's virtual range it
//! is translated by that segment's `p_paddr - p_vaddr` (as GRUB does), since
//! the guest starts with paging off or identity-mapped.

use vm_memory::GuestMemoryMmap;

use super::{place_segments, ImageKind, LoadError, LoadRequest, LoadedImage, Segment};

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ElfClass {
    Elf32,
    Elf64,
}

impl ElfClass {
    fn ehdr_size(self) -> usize {
        match self {
            Self::Elf32 => 52,
            Self::Elf64 => 64,
        }
    }

    fn phdr_size(self) -> u16 {
        match self {
            Self::Elf32 => 32,
            Self::Elf64 => 56,
        }
    }
}

/// A parsed, not yet placed, ELF executable.
#[derive(Debug)]
pub(super) struct ElfImage<'a> {
    pub class: ElfClass,
    pub entry: u64,
    pub segments: Vec<Segment<'a>>,
}

/// Whether `image` starts with the ELF magic.
pub(super) fn has_magic(image: &[u8]) -> bool {
    image.starts_with(&ELF_MAGIC)
}

pub(super) fn load(mem: &GuestMemoryMmap, req: &LoadRequest) -> Result<LoadedImage, LoadError> {
    let elf = parse(req.image)?;
    let segments = place_segments(mem, req.reserved, &elf.segments)?;
    Ok(LoadedImage {
        kind: match elf.class {
            ElfClass::Elf32 => ImageKind::Elf32,
            ElfClass::Elf64 => ImageKind::Elf64,
        },
        entry: elf.entry,
        segments,
        multiboot: None,
    })
}

/// Bounds-checked little-endian reads; `None` past the end of the slice.
fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    let bytes = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    let bytes = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// A class-sized address or offset field: 4 bytes in ELF32, 8 in ELF64.
fn read_word(b: &[u8], off: usize, class: ElfClass) -> Option<u64> {
    match class {
        ElfClass::Elf32 => read_u32(b, off).map(u64::from),
        ElfClass::Elf64 => read_u64(b, off),
    }
}

/// The ELF header fields the loader uses.
struct ElfHeader {
    class: ElfClass,
    entry: u64,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
}

/// One program header.
struct ProgramHeader {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn parse_header(image: &[u8]) -> Result<ElfHeader, LoadError> {
    // e_ident must be readable before the class tells the full header size.
    let truncated = |need| LoadError::TruncatedElfHeader {
        len: image.len(),
        need,
    };
    if image.len() < ELF_MAGIC.len() {
        return Err(truncated(ElfClass::Elf32.ehdr_size()));
    }
    if !has_magic(image) {
        return Err(LoadError::NotElf);
    }
    let class = match image.get(EI_CLASS) {
        None => return Err(truncated(ElfClass::Elf32.ehdr_size())),
        Some(&ELFCLASS32) => ElfClass::Elf32,
        Some(&ELFCLASS64) => ElfClass::Elf64,
        Some(&other) => return Err(LoadError::BadElfClass(other)),
    };
    let need = class.ehdr_size();
    if image.len() < need {
        return Err(truncated(need));
    }
    let ehdr = &image[..need];
    match ehdr[EI_DATA] {
        ELFDATA2LSB => {}
        other => return Err(LoadError::NotLittleEndian(other)),
    }
    // All offsets below are inside the `need`-byte header just checked.
    let u16_at = |off| read_u16(ehdr, off).ok_or_else(|| truncated(need));
    let word_at = |off| read_word(ehdr, off, class).ok_or_else(|| truncated(need));
    let e_type = u16_at(16)?;
    let e_machine = u16_at(18)?;
    if e_machine != EM_386 && e_machine != EM_X86_64 {
        return Err(LoadError::WrongMachine(e_machine));
    }
    if e_type != ET_EXEC {
        return Err(LoadError::NotExecutable(e_type));
    }
    let (entry_off, phoff_off, phentsize_off, phnum_off) = match class {
        ElfClass::Elf32 => (24, 28, 42, 44),
        ElfClass::Elf64 => (24, 32, 54, 56),
    };
    Ok(ElfHeader {
        class,
        entry: word_at(entry_off)?,
        phoff: word_at(phoff_off)?,
        phentsize: u16_at(phentsize_off)?,
        phnum: u16_at(phnum_off)?,
    })
}

/// Reads program header `entry`, which the caller verified lies in the file.
fn parse_program_header(entry: &[u8], class: ElfClass) -> Option<ProgramHeader> {
    let p_type = read_u32(entry, 0)?;
    Some(match class {
        ElfClass::Elf32 => ProgramHeader {
            p_type,
            offset: read_word(entry, 4, class)?,
            vaddr: read_word(entry, 8, class)?,
            paddr: read_word(entry, 12, class)?,
            filesz: read_word(entry, 16, class)?,
            memsz: read_word(entry, 20, class)?,
        },
        ElfClass::Elf64 => ProgramHeader {
            p_type,
            offset: read_word(entry, 8, class)?,
            vaddr: read_word(entry, 16, class)?,
            paddr: read_word(entry, 24, class)?,
            filesz: read_word(entry, 32, class)?,
            memsz: read_word(entry, 40, class)?,
        },
    })
}

/// Parses and validates an ELF executable without touching guest memory.
pub(super) fn parse(image: &[u8]) -> Result<ElfImage<'_>, LoadError> {
    let hdr = parse_header(image)?;
    let expected = hdr.class.phdr_size();
    if hdr.phnum > 0 && hdr.phentsize != expected {
        return Err(LoadError::BadProgramHeaderSize {
            size: hdr.phentsize,
            expected,
        });
    }
    let out_of_bounds = || LoadError::ProgramHeadersOutOfBounds {
        offset: hdr.phoff,
        count: hdr.phnum,
        entry_size: hdr.phentsize,
        file_len: image.len(),
    };
    // Both factors are u16, so the product cannot overflow a u64.
    let table_len = u64::from(hdr.phnum) * u64::from(hdr.phentsize);
    let table_end = hdr.phoff.checked_add(table_len).ok_or_else(out_of_bounds)?;
    if table_end > image.len() as u64 {
        return Err(out_of_bounds());
    }
    // table_end <= image.len(), so these conversions and slices succeed.
    let table_start = usize::try_from(hdr.phoff).map_err(|_| out_of_bounds())?;
    let table_end = usize::try_from(table_end).map_err(|_| out_of_bounds())?;
    let table = image
        .get(table_start..table_end)
        .ok_or_else(out_of_bounds)?;

    let mut segments = Vec::new();
    let mut loads = Vec::new();
    for (index, entry) in table.chunks_exact(usize::from(expected)).enumerate() {
        let ph = parse_program_header(entry, hdr.class).ok_or_else(out_of_bounds)?;
        if ph.p_type != PT_LOAD {
            continue;
        }
        if ph.filesz > ph.memsz {
            return Err(LoadError::FileSizeExceedsMemSize {
                index,
                filesz: ph.filesz,
                memsz: ph.memsz,
            });
        }
        let data = file_range(image, ph.offset, ph.filesz).ok_or(LoadError::SegmentOutOfFile {
            index,
            offset: ph.offset,
            filesz: ph.filesz,
            file_len: image.len(),
        })?;
        if ph.memsz == 0 {
            continue;
        }
        segments.push(Segment {
            gpa: ph.paddr,
            data,
            memsz: ph.memsz,
        });
        loads.push(ph);
    }
    if segments.is_empty() {
        return Err(LoadError::NoLoadSegments);
    }
    Ok(ElfImage {
        class: hdr.class,
        entry: physical_entry(hdr.entry, &loads),
        segments,
    })
}

/// `image[offset..offset + len]`, or `None` if any part is outside the file.
fn file_range(image: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    image.get(start..end)
}

/// Translates the virtual entry point to a physical one through the PT_LOAD
/// segment containing it; left as is when no segment does.
fn physical_entry(entry: u64, loads: &[ProgramHeader]) -> u64 {
    loads
        .iter()
        .find(|ph| entry >= ph.vaddr && entry - ph.vaddr < ph.memsz)
        .and_then(|ph| (entry - ph.vaddr).checked_add(ph.paddr))
        .unwrap_or(entry)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::super::testimg::{guest_mem, ElfBuilder, ErrorCheck, XorShift, MEM_SIZE};
    use super::super::{boot_reserved, load, ImageFormat};
    use super::*;

    fn request(image: &[u8]) -> LoadRequest<'_> {
        LoadRequest {
            image,
            format: ImageFormat::Elf,
            load_addr: 0,
            reserved: &[],
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Two segments: text with file bytes only, data with a bss tail.
    fn two_segment_image(class64: bool) -> Vec<u8> {
        ElfBuilder::new(class64)
            .entry(0x40_0010)
            .segment(0x40_0000, b"text-bytes-here!", 16)
            .segment(0x40_2000, b"data", 0x100)
            .build()
    }

    #[test]
    fn loads_elf32_and_elf64_segments_with_bss_zeroed() {
        for class64 in [false, true] {
            let mem = guest_mem();
            // Dirty the bss to prove the loader zeroes it.
            mem.write_slice(&[0xcc; 0x100], GuestAddress(0x40_2000))
                .unwrap();
            let image = two_segment_image(class64);
            let loaded = load(&mem, &request(&image)).unwrap();
            let kind = if class64 {
                ImageKind::Elf64
            } else {
                ImageKind::Elf32
            };
            assert_eq!(loaded.kind, kind);
            assert_eq!(loaded.entry, 0x40_0010);
            assert_eq!(loaded.segments, vec![(0x40_0000, 16), (0x40_2000, 0x100)]);
            assert_eq!(loaded.end(), 0x40_2100);
            assert_eq!(read(&mem, 0x40_0000, 16), b"text-bytes-here!");
            assert_eq!(read(&mem, 0x40_2000, 4), b"data");
            assert!(read(&mem, 0x40_2004, 0xfc).iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn auto_detects_elf() {
        let mem = guest_mem();
        let image = two_segment_image(false);
        let req = LoadRequest {
            format: ImageFormat::Auto,
            ..request(&image)
        };
        assert_eq!(load(&mem, &req).unwrap().kind, ImageKind::Elf32);
    }

    #[test]
    fn loads_at_paddr_and_translates_entry() {
        let mem = guest_mem();
        let image = ElfBuilder::new(true)
            .entry(0xffff_ffff_8000_0100)
            .segment_at(0x20_0000, 0xffff_ffff_8000_0000, b"kernel", 0x200)
            .build();
        let loaded = load(&mem, &request(&image)).unwrap();
        assert_eq!(loaded.segments, vec![(0x20_0000, 0x200)]);
        assert_eq!(loaded.entry, 0x20_0100);
        assert_eq!(read(&mem, 0x20_0000, 6), b"kernel");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mem = guest_mem();
        for class64 in [false, true] {
            let image = two_segment_image(class64);
            for len in 0..image.len() {
                let res = load(&mem, &request(&image[..len]));
                assert!(res.is_err(), "prefix of {len} bytes loaded");
            }
        }
    }

    #[test]
    fn truncated_header_and_table_errors_are_precise() {
        let image = two_segment_image(true);
        assert!(matches!(
            parse(&image[..40]),
            Err(LoadError::TruncatedElfHeader { len: 40, need: 64 })
        ));
        // Header intact, program header table cut.
        assert!(matches!(
            parse(&image[..70]),
            Err(LoadError::ProgramHeadersOutOfBounds { .. })
        ));
        // Tables intact, segment data cut.
        let end = 64 + 2 * 56 + 4;
        assert!(matches!(
            parse(&image[..end]),
            Err(LoadError::SegmentOutOfFile { index: 0, .. })
        ));
    }

    #[test]
    fn rejects_garbage_and_bad_identification() {
        assert!(matches!(parse(b"garbage!"), Err(LoadError::NotElf)));
        let good = two_segment_image(false);

        let mut img = good.clone();
        img[EI_CLASS] = 3;
        assert!(matches!(parse(&img), Err(LoadError::BadElfClass(3))));

        let mut img = good.clone();
        img[EI_DATA] = 2;
        assert!(matches!(parse(&img), Err(LoadError::NotLittleEndian(2))));

        let mut img = good.clone();
        img[18..20].copy_from_slice(&40u16.to_le_bytes()); // EM_ARM
        assert!(matches!(parse(&img), Err(LoadError::WrongMachine(40))));

        let mut img = good.clone();
        img[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        assert!(matches!(parse(&img), Err(LoadError::NotExecutable(3))));

        let mut img = good;
        img[42..44].copy_from_slice(&40u16.to_le_bytes());
        assert!(matches!(
            parse(&img),
            Err(LoadError::BadProgramHeaderSize {
                size: 40,
                expected: 32
            })
        ));
    }

    #[test]
    fn rejects_filesz_above_memsz() {
        let image = ElfBuilder::new(false)
            .segment(0x40_0000, b"0123456789", 4)
            .build();
        assert!(matches!(
            parse(&image),
            Err(LoadError::FileSizeExceedsMemSize {
                index: 0,
                filesz: 10,
                memsz: 4
            })
        ));
    }

    #[test]
    fn rejects_image_without_load_segments() {
        let image = ElfBuilder::new(true).build();
        assert!(matches!(parse(&image), Err(LoadError::NoLoadSegments)));
        let image = ElfBuilder::new(true).segment(0x40_0000, b"", 0).build();
        assert!(matches!(parse(&image), Err(LoadError::NoLoadSegments)));
    }

    #[test]
    fn rejects_segments_outside_ram_or_reserved_or_too_large() {
        let mem = guest_mem();
        let cases: [(u64, u64, ErrorCheck); 4] = [
            (MEM_SIZE - 8, 16, |e| {
                matches!(e, LoadError::OutsideRam { .. })
            }),
            (0xfec0_0000, 16, |e| {
                matches!(e, LoadError::OutsideRam { .. })
            }),
            (0x1000, 16, |e| {
                matches!(e, LoadError::OverlapsReserved { .. })
            }),
            (0, MEM_SIZE + 1, |e| {
                matches!(e, LoadError::ImageTooLarge { .. })
            }),
        ];
        let reserved = boot_reserved();
        for (gpa, memsz, expect) in cases {
            let image = ElfBuilder::new(false).segment(gpa, b"x", memsz).build();
            let req = LoadRequest {
                reserved: &reserved,
                ..request(&image)
            };
            let err = load(&mem, &req).unwrap_err();
            assert!(expect(&err), "gpa {gpa:#x} memsz {memsz:#x}: {err}");
        }
    }

    #[test]
    fn rejects_address_overflow() {
        let mem = guest_mem();
        let image = ElfBuilder::new(true)
            .segment(u64::MAX - 4, b"x", 16)
            .build();
        let err = load(&mem, &request(&image)).unwrap_err();
        assert!(matches!(err, LoadError::AddressOverflow { .. }), "{err}");
    }

    #[test]
    fn mutated_images_never_panic() {
        let mem = guest_mem();
        let mut rng = XorShift::new(0x5eed_1234_abcd_0001);
        for class64 in [false, true] {
            let good = two_segment_image(class64);
            for _ in 0..3000 {
                let mut img = good.clone();
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(img.len() as u64) as usize;
                    img[i] = rng.next() as u8;
                }
                let len = if rng.below(4) == 0 {
                    rng.below(img.len() as u64 + 1) as usize
                } else {
                    img.len()
                };
                let _ = load(&mem, &request(&img[..len]));
            }
        }
    }
}
