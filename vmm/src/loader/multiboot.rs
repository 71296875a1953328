//! Multiboot v1 kernels (GNU Multiboot Specification 0.6.96, section 3.1).
//!
//! The header is searched in the first 8192 bytes at 4-byte alignment. With
//! flag 16 (the "a.out kludge") the header's address fields say where the
//! file goes, whatever its format; otherwise the file must be ELF and is
//! loaded through its program headers. The information structure handed to
//! the kernel is built by [`super::mbinfo`].

use vm_memory::GuestMemoryMmap;

use super::elf::{self, ElfClass};
use super::{place_segments, ImageKind, LoadError, LoadRequest, LoadedImage, Segment};

/// `magic` field of the OS image header.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1bad_b002;
/// Value the boot loader leaves in EAX for the kernel.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie entirely within this many leading bytes.
const MULTIBOOT_SEARCH: usize = 8192;
/// magic, flags, checksum.
const HEADER_LEN: usize = 12;
/// ... plus header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr.
const AOUT_HEADER_LEN: usize = 32;

/// Flag 0: modules must be page-aligned (place_module always page-aligns).
pub const MULTIBOOT_PAGE_ALIGN: u32 = 1 << 0;
/// Flag 1: the kernel wants mem_* and the memory map (always provided).
pub const MULTIBOOT_MEMORY_INFO: u32 = 1 << 1;
/// Flag 2: the kernel would like a video mode; there is no display, so the
/// request is ignored, which the spec allows for a text-mode-only loader.
pub const MULTIBOOT_VIDEO_MODE: u32 = 1 << 2;
/// Flag 16: the address fields are valid and override the file's format.
pub const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;
/// Bits 0-15 are requirements: a loader must refuse a kernel asking for one
/// it does not understand. Bits 16-31 are optional.
const REQUIRED_FLAGS: u32 = 0xffff;
const UNDERSTOOD_REQUIRED_FLAGS: u32 =
    MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO | MULTIBOOT_VIDEO_MODE;

/// The address fields of a header with flag 16 set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AoutAddrs {
    pub header_addr: u32,
    pub load_addr: u32,
    /// 0: load to the end of the file.
    pub load_end_addr: u32,
    /// 0: no bss.
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// A validated Multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootHeader {
    /// File offset of the magic.
    pub offset: usize,
    pub flags: u32,
    /// Present when flag 16 is set.
    pub aout: Option<AoutAddrs>,
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Finds the first header with a valid checksum; returns its offset and
/// flags. A magic with a bad checksum may be a stray constant in code, so
/// the search goes on past it, but is reported if nothing better is found.
pub(super) fn find_header(image: &[u8]) -> Result<(usize, u32), LoadError> {
    let window = &image[..image.len().min(MULTIBOOT_SEARCH)];
    let mut first_problem = None;
    for offset in (0..window.len()).step_by(4) {
        if read_u32(window, offset) != Some(MULTIBOOT_HEADER_MAGIC) {
            continue;
        }
        let fields = (read_u32(window, offset + 4), read_u32(window, offset + 8));
        let (Some(flags), Some(checksum)) = fields else {
            first_problem.get_or_insert(LoadError::TruncatedMultibootHeader {
                offset,
                need: HEADER_LEN,
            });
            continue;
        };
        if MULTIBOOT_HEADER_MAGIC
            .wrapping_add(flags)
            .wrapping_add(checksum)
            == 0
        {
            return Ok((offset, flags));
        }
        first_problem.get_or_insert(LoadError::BadMultibootChecksum { offset });
    }
    Err(first_problem.unwrap_or(LoadError::NoMultibootHeader))
}

/// Finds the header and checks its flags and, with flag 16, reads the
/// address fields.
pub(super) fn parse_header(image: &[u8]) -> Result<MultibootHeader, LoadError> {
    let (offset, flags) = find_header(image)?;
    let unsupported = flags & REQUIRED_FLAGS & !UNDERSTOOD_REQUIRED_FLAGS;
    if unsupported != 0 {
        return Err(LoadError::UnsupportedMultibootFlags { bits: unsupported });
    }
    let aout = if flags & MULTIBOOT_AOUT_KLUDGE != 0 {
        let window = &image[..image.len().min(MULTIBOOT_SEARCH)];
        let field = |i: usize| {
            read_u32(window, offset + HEADER_LEN + 4 * i).ok_or(
                LoadError::TruncatedMultibootHeader {
                    offset,
                    need: AOUT_HEADER_LEN,
                },
            )
        };
        Some(AoutAddrs {
            header_addr: field(0)?,
            load_addr: field(1)?,
            load_end_addr: field(2)?,
            bss_end_addr: field(3)?,
            entry_addr: field(4)?,
        })
    } else {
        None
    };
    Ok(MultibootHeader {
        offset,
        flags,
        aout,
    })
}

/// The single segment an a.out-kludge image loads as, and its entry point.
fn aout_segment<'a>(
    image: &'a [u8],
    header_offset: usize,
    a: &AoutAddrs,
) -> Result<(Segment<'a>, u64), LoadError> {
    // The header sits (header_addr - load_addr) bytes into the loaded text,
    // which fixes the file offset loading starts from.
    let delta = a
        .header_addr
        .checked_sub(a.load_addr)
        .ok_or(LoadError::AoutHeaderBelowLoad {
            header_addr: a.header_addr,
            load_addr: a.load_addr,
        })?;
    let file_offset = usize::try_from(delta)
        .ok()
        .and_then(|d| header_offset.checked_sub(d))
        .ok_or(LoadError::AoutLoadBeforeFile {
            header_offset,
            delta,
        })?;
    // file_offset <= header_offset < image.len().
    let rest = image.len().saturating_sub(file_offset) as u64;
    let len = if a.load_end_addr == 0 {
        rest
    } else {
        let len =
            a.load_end_addr
                .checked_sub(a.load_addr)
                .ok_or(LoadError::AoutLoadEndBelowLoad {
                    load_addr: a.load_addr,
                    load_end_addr: a.load_end_addr,
                })?;
        u64::from(len)
    };
    let out_of_file = LoadError::AoutLoadOutOfFile {
        offset: file_offset as u64,
        len,
        file_len: image.len(),
    };
    if len > rest {
        return Err(out_of_file);
    }
    let data = usize::try_from(len)
        .ok()
        .and_then(|l| image.get(file_offset..file_offset.checked_add(l)?))
        .ok_or(out_of_file)?;
    let load_addr = u64::from(a.load_addr);
    // Both terms are below 2^33 here, so this cannot overflow.
    let load_end = load_addr + len;
    let memsz = if a.bss_end_addr == 0 {
        len
    } else {
        let bss_end = u64::from(a.bss_end_addr);
        if bss_end < load_end {
            return Err(LoadError::AoutBssBelowLoadEnd {
                load_end,
                bss_end_addr: a.bss_end_addr,
            });
        }
        bss_end - load_addr
    };
    let segment = Segment {
        gpa: load_addr,
        data,
        memsz,
    };
    Ok((segment, u64::from(a.entry_addr)))
}

pub(super) fn load(mem: &GuestMemoryMmap, req: &LoadRequest) -> Result<LoadedImage, LoadError> {
    if req.image.is_empty() {
        return Err(LoadError::EmptyImage);
    }
    let header = parse_header(req.image)?;
    if let Some(addrs) = &header.aout {
        let (segment, entry) = aout_segment(req.image, header.offset, addrs)?;
        let segments = place_segments(mem, req.reserved, &[segment])?;
        return Ok(LoadedImage {
            kind: ImageKind::MultibootAout,
            entry,
            segments,
            multiboot: Some(header),
        });
    }
    let image = elf::parse(req.image).map_err(|e| match e {
        LoadError::NotElf => LoadError::MultibootNotElf,
        other => other,
    })?;
    let segments = place_segments(mem, req.reserved, &image.segments)?;
    Ok(LoadedImage {
        kind: match image.class {
            ElfClass::Elf32 => ImageKind::MultibootElf32,
            ElfClass::Elf64 => ImageKind::MultibootElf64,
        },
        entry: image.entry,
        segments,
        multiboot: Some(header),
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::super::testimg::{guest_mem, multiboot_header, ElfBuilder, ErrorCheck, XorShift};
    use super::super::{boot_reserved, detect, load, ImageFormat};
    use super::*;

    fn request(image: &[u8], format: ImageFormat) -> LoadRequest<'_> {
        LoadRequest {
            image,
            format,
            load_addr: 0x10_0000,
            reserved: &[],
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn multiboot_elf(class64: bool, flags: u32) -> Vec<u8> {
        ElfBuilder::new(class64)
            .entry(0x20_0000)
            .blob(&multiboot_header(flags, None))
            .segment(0x20_0000, b"\xfa\xf4mbkernel", 0x40)
            .build()
    }

    /// 16 bytes of code, the header at offset 16, then 8 bytes of data.
    /// Loaded at 0x30_0000, with 0x100 bytes of bss after the file.
    fn aout_image() -> Vec<u8> {
        let base = 0x30_0000u32;
        let addrs = [base + 16, base, 0, base + 16 + 32 + 8 + 0x100, base + 4];
        let mut img = b"\x90\x90\x90\x90\xfa\xf4codecodecd".to_vec();
        assert_eq!(img.len(), 16);
        img.extend_from_slice(&multiboot_header(MULTIBOOT_AOUT_KLUDGE, Some(addrs)));
        img.extend_from_slice(b"datadata");
        img
    }

    #[test]
    fn loads_multiboot_elf32_and_elf64() {
        for (class64, kind) in [
            (false, ImageKind::MultibootElf32),
            (true, ImageKind::MultibootElf64),
        ] {
            let mem = guest_mem();
            let flags = MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO;
            let image = multiboot_elf(class64, flags);
            assert_eq!(detect(&image), ImageFormat::Multiboot);
            let loaded = load(&mem, &request(&image, ImageFormat::Auto)).unwrap();
            assert_eq!(loaded.kind, kind);
            assert_eq!(loaded.entry, 0x20_0000);
            assert_eq!(loaded.segments, vec![(0x20_0000, 0x40)]);
            let header = loaded.multiboot.unwrap();
            assert_eq!(header.flags, flags);
            assert_eq!(header.aout, None);
            assert_eq!(read(&mem, 0x20_0000, 10), b"\xfa\xf4mbkernel");
        }
    }

    #[test]
    fn loads_aout_kludge_image_with_bss() {
        let mem = guest_mem();
        let bss = 0x30_0000 + 56;
        mem.write_slice(&[0xcc; 0x100], GuestAddress(bss)).unwrap();
        let image = aout_image();
        let loaded = load(&mem, &request(&image, ImageFormat::Auto)).unwrap();
        assert_eq!(loaded.kind, ImageKind::MultibootAout);
        assert_eq!(loaded.entry, 0x30_0004);
        assert_eq!(loaded.segments, vec![(0x30_0000, 56 + 0x100)]);
        assert_eq!(read(&mem, 0x30_0000, image.len()), image);
        assert!(read(&mem, bss, 0x100).iter().all(|&b| b == 0));
        assert!(loaded.multiboot.unwrap().aout.is_some());
    }

    #[test]
    fn aout_load_end_limits_the_copy() {
        let mem = guest_mem();
        let base = 0x30_0000u32;
        // Load only the first 8 bytes; the header itself is not loaded.
        let addrs = [base + 16, base, base + 8, 0, base];
        let mut img = b"firstAAAsecondBB".to_vec();
        img.extend_from_slice(&multiboot_header(MULTIBOOT_AOUT_KLUDGE, Some(addrs)));
        let loaded = load(&mem, &request(&img, ImageFormat::Multiboot)).unwrap();
        assert_eq!(loaded.segments, vec![(0x30_0000, 8)]);
        assert_eq!(read(&mem, 0x30_0000, 9), b"firstAAA\0");
    }

    #[test]
    fn rejects_inconsistent_aout_addresses() {
        let mem = guest_mem();
        let l = 0x30_0000u32;
        let cases: [([u32; 5], ErrorCheck); 5] = [
            ([l - 4, l, 0, 0, l], |e| {
                matches!(e, LoadError::AoutHeaderBelowLoad { .. })
            }),
            ([l + 0x100, l, 0, 0, l], |e| {
                matches!(e, LoadError::AoutLoadBeforeFile { .. })
            }),
            ([l, l, l - 1, 0, l], |e| {
                matches!(e, LoadError::AoutLoadEndBelowLoad { .. })
            }),
            ([l, l, l + 0x1000, 0, l], |e| {
                matches!(e, LoadError::AoutLoadOutOfFile { .. })
            }),
            ([l, l, 0, l + 8, l], |e| {
                matches!(e, LoadError::AoutBssBelowLoadEnd { .. })
            }),
        ];
        for (addrs, expect) in cases {
            let mut img = multiboot_header(MULTIBOOT_AOUT_KLUDGE, Some(addrs));
            img.extend_from_slice(&[0x90; 32]);
            let err = load(&mem, &request(&img, ImageFormat::Multiboot)).unwrap_err();
            assert!(expect(&err), "{addrs:x?}: {err}");
        }
    }

    #[test]
    fn aout_segment_respects_ram_and_reserved_ranges() {
        let mem = guest_mem();
        let reserved = boot_reserved();
        let addrs = [0xe000, 0xe000, 0, 0, 0xe000];
        let img = multiboot_header(MULTIBOOT_AOUT_KLUDGE, Some(addrs));
        let req = LoadRequest {
            reserved: &reserved,
            ..request(&img, ImageFormat::Multiboot)
        };
        let err = load(&mem, &req).unwrap_err();
        assert!(matches!(err, LoadError::OverlapsReserved { .. }), "{err}");

        let addrs = [0xfff0_0000, 0xfff0_0000, 0, 0, 0xfff0_0000];
        let img = multiboot_header(MULTIBOOT_AOUT_KLUDGE, Some(addrs));
        let err = load(&mem, &request(&img, ImageFormat::Multiboot)).unwrap_err();
        assert!(matches!(err, LoadError::OutsideRam { .. }), "{err}");
    }

    #[test]
    fn bad_checksum_is_not_multiboot() {
        let mut image = multiboot_elf(false, 0);
        let at = 52 + 32 + 8; // checksum field of the blob
        image[at] ^= 1;
        // Auto falls back to ELF; an explicit request reports the checksum.
        assert_eq!(detect(&image), ImageFormat::Elf);
        let mem = guest_mem();
        let err = load(&mem, &request(&image, ImageFormat::Multiboot)).unwrap_err();
        assert!(
            matches!(err, LoadError::BadMultibootChecksum { offset: 84 }),
            "{err}"
        );
    }

    #[test]
    fn header_beyond_8k_is_not_found() {
        let mut image = vec![0u8; MULTIBOOT_SEARCH];
        image.extend_from_slice(&multiboot_header(0, None));
        assert!(matches!(
            find_header(&image),
            Err(LoadError::NoMultibootHeader)
        ));
        assert_eq!(detect(&image), ImageFormat::Flat);
    }

    #[test]
    fn unaligned_header_is_not_found() {
        let mut image = vec![0u8; 2];
        image.extend_from_slice(&multiboot_header(0, None));
        assert!(find_header(&image).is_err());
    }

    #[test]
    fn rejects_unsupported_required_flags_but_accepts_optional_ones() {
        let image = multiboot_elf(false, MULTIBOOT_VIDEO_MODE | 1 << 3 | 1 << 15);
        let mem = guest_mem();
        let err = load(&mem, &request(&image, ImageFormat::Auto)).unwrap_err();
        assert!(
            matches!(err, LoadError::UnsupportedMultibootFlags { bits } if bits == 1 << 3 | 1 << 15),
            "{err}"
        );
        let image = multiboot_elf(false, MULTIBOOT_VIDEO_MODE | 1 << 20);
        assert!(load(&mem, &request(&image, ImageFormat::Auto)).is_ok());
    }

    #[test]
    fn non_elf_without_address_fields_is_rejected() {
        let mut image = multiboot_header(0, None);
        image.extend_from_slice(&[0x90; 64]);
        let mem = guest_mem();
        let err = load(&mem, &request(&image, ImageFormat::Auto)).unwrap_err();
        assert!(matches!(err, LoadError::MultibootNotElf), "{err}");
    }

    #[test]
    fn truncated_headers_are_errors() {
        let mem = guest_mem();
        let image = aout_image();
        for len in 0..16 + AOUT_HEADER_LEN {
            let res = load(&mem, &request(&image[..len], ImageFormat::Multiboot));
            assert!(res.is_err(), "prefix of {len} bytes loaded");
        }
        let image = multiboot_elf(true, 0);
        for len in 0..image.len() {
            let res = load(&mem, &request(&image[..len], ImageFormat::Multiboot));
            assert!(res.is_err(), "prefix of {len} bytes loaded");
        }
    }

    #[test]
    fn mutated_images_never_panic() {
        let mem = guest_mem();
        let mut rng = XorShift::new(0xdead_beef_0bad_f00d);
        let images = [
            aout_image(),
            multiboot_elf(false, 3),
            multiboot_elf(true, 0),
        ];
        for good in &images {
            for _ in 0..2000 {
                let mut img = good.clone();
                for _ in 0..1 + rng.below(6) {
                    let i = rng.below(img.len() as u64) as usize;
                    img[i] = rng.next() as u8;
                }
                for format in [ImageFormat::Auto, ImageFormat::Multiboot] {
                    let _ = load(&mem, &request(&img, format));
                }
            }
        }
    }
}
