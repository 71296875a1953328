//! Guest image loaders: flat binaries, ELF executables and Multiboot v1
//! kernels, plus the Multiboot information structure and module placement.
//!
//! Every loader first turns the image into a list of [`Segment`]s, then
//! [`place_segments`] validates all of them (inside RAM, clear of reserved
//! ranges, no arithmetic overflow) before writing any byte, so a rejected
//! image leaves guest memory untouched. The image is untrusted input: all
//! offsets and sizes go through checked arithmetic and bounds-checked reads.

mod elf;
mod flat;
mod mbinfo;
mod multiboot;
#[cfg(test)]
mod testimg;

use std::fmt;
use std::str::FromStr;

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout;

pub use mbinfo::{write_multiboot_info, MultibootInfoRequest, MultibootModule};
pub use multiboot::{
    AoutAddrs, MultibootHeader, MULTIBOOT_AOUT_KLUDGE, MULTIBOOT_BOOTLOADER_MAGIC,
    MULTIBOOT_HEADER_MAGIC, MULTIBOOT_MEMORY_INFO, MULTIBOOT_PAGE_ALIGN, MULTIBOOT_VIDEO_MODE,
};

/// Page size used to align module placement.
const PAGE_SIZE: u64 = 0x1000;
/// Multiboot modules are described by 32-bit fields, so they must end below this.
const MODULE_LIMIT: u64 = 1 << 32;

/// How to interpret the image file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// Multiboot if a valid Multiboot header is found, else ELF if the file
    /// starts with the ELF magic, else flat.
    #[default]
    Auto,
    Flat,
    Elf,
    Multiboot,
}

/// `ImageFormat::from_str` got a name it does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown image format {0:?} (expected auto, flat, elf or multiboot)")]
pub struct UnknownImageFormat(pub String);

impl FromStr for ImageFormat {
    type Err = UnknownImageFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "flat" => Ok(Self::Flat),
            "elf" => Ok(Self::Elf),
            "multiboot" => Ok(Self::Multiboot),
            other => Err(UnknownImageFormat(other.to_string())),
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Flat => "flat",
            Self::Elf => "elf",
            Self::Multiboot => "multiboot",
        })
    }
}

/// What to load and where it may go.
#[derive(Clone, Copy, Debug)]
pub struct LoadRequest<'a> {
    pub image: &'a [u8],
    pub format: ImageFormat,
    /// Load address of flat images (usually `layout::DEFAULT_LOAD_ADDR`).
    pub load_addr: u64,
    /// `(start, len)` guest-physical ranges the image may not overlap: device
    /// windows and the VMM's own boot structures (see [`boot_reserved`]).
    pub reserved: &'a [(u64, u64)],
}

impl<'a> LoadRequest<'a> {
    /// Auto-detected format, flat images at `layout::DEFAULT_LOAD_ADDR`, no
    /// reserved ranges.
    pub fn new(image: &'a [u8]) -> Self {
        Self {
            image,
            format: ImageFormat::Auto,
            load_addr: layout::DEFAULT_LOAD_ADDR,
            reserved: &[],
        }
    }
}

/// The format the image was actually loaded as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Flat,
    Elf32,
    Elf64,
    MultibootElf32,
    MultibootElf64,
    /// Multiboot image loaded through the header's address fields (flag 16).
    MultibootAout,
}

impl ImageKind {
    pub fn is_multiboot(self) -> bool {
        matches!(
            self,
            Self::MultibootElf32 | Self::MultibootElf64 | Self::MultibootAout
        )
    }
}

/// The result of a successful load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    pub kind: ImageKind,
    /// Guest-physical entry point.
    pub entry: u64,
    /// `(gpa, memsz)` of every range written, file bytes and zero fill.
    pub segments: Vec<(u64, u64)>,
    pub multiboot: Option<MultibootHeader>,
}

impl LoadedImage {
    /// First byte past the highest loaded segment (0 when nothing was loaded).
    pub fn end(&self) -> u64 {
        // Cannot overflow: place_segments rejected segments whose end does.
        self.segments
            .iter()
            .map(|&(gpa, len)| gpa.saturating_add(len))
            .max()
            .unwrap_or(0)
    }
}

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("image file is empty")]
    EmptyImage,
    #[error("ELF header truncated: file has {len} bytes, header needs {need}")]
    TruncatedElfHeader { len: usize, need: usize },
    #[error("not an ELF file (bad magic)")]
    NotElf,
    #[error("unsupported ELF class {0} (expected 1 = ELF32 or 2 = ELF64)")]
    BadElfClass(u8),
    #[error("ELF data encoding {0} is not little-endian")]
    NotLittleEndian(u8),
    #[error("ELF machine {0} is not x86 (EM_386 = 3 or EM_X86_64 = 62)")]
    WrongMachine(u16),
    #[error("ELF type {0} is not an executable (ET_EXEC = 2)")]
    NotExecutable(u16),
    #[error("ELF program header entry size {size}, expected {expected}")]
    BadProgramHeaderSize { size: u16, expected: u16 },
    #[error(
        "ELF program header table ({count} entries of {entry_size} bytes at offset {offset:#x}) \
         is outside the {file_len}-byte file"
    )]
    ProgramHeadersOutOfBounds {
        offset: u64,
        count: u16,
        entry_size: u16,
        file_len: usize,
    },
    #[error(
        "ELF segment {index}: file range {offset:#x}+{filesz:#x} is outside the {file_len}-byte file"
    )]
    SegmentOutOfFile {
        index: usize,
        offset: u64,
        filesz: u64,
        file_len: usize,
    },
    #[error("ELF segment {index}: p_filesz {filesz:#x} exceeds p_memsz {memsz:#x}")]
    FileSizeExceedsMemSize {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    #[error("ELF file has no non-empty PT_LOAD segments")]
    NoLoadSegments,
    #[error("address range {start:#x}+{len:#x} overflows the 64-bit address space")]
    AddressOverflow { start: u64, len: u64 },
    #[error("image needs {size:#x} bytes but the guest has only {ram:#x} bytes of RAM")]
    ImageTooLarge { size: u64, ram: u64 },
    #[error("range [{start:#x}, {end:#x}) is not fully inside guest RAM")]
    OutsideRam { start: u64, end: u64 },
    #[error("range [{start:#x}, {end:#x}) overlaps reserved range [{res_start:#x}, {res_end:#x})")]
    OverlapsReserved {
        start: u64,
        end: u64,
        res_start: u64,
        res_end: u64,
    },
    #[error("no Multiboot header (magic 0x1BADB002) in the first 8192 bytes")]
    NoMultibootHeader,
    #[error("Multiboot header at offset {offset:#x} has a bad checksum")]
    BadMultibootChecksum { offset: usize },
    #[error("Multiboot header at offset {offset:#x} is truncated: needs {need} bytes")]
    TruncatedMultibootHeader { offset: usize, need: usize },
    #[error("Multiboot header requires unsupported features (flag bits {bits:#x})")]
    UnsupportedMultibootFlags { bits: u32 },
    #[error("Multiboot image has no address fields (flag 16) and is not ELF")]
    MultibootNotElf,
    #[error("Multiboot header_addr {header_addr:#x} is below load_addr {load_addr:#x}")]
    AoutHeaderBelowLoad { header_addr: u32, load_addr: u32 },
    #[error(
        "Multiboot header at offset {header_offset:#x} is {delta:#x} bytes past load_addr, \
         which would start loading before the file"
    )]
    AoutLoadBeforeFile { header_offset: usize, delta: u32 },
    #[error("Multiboot load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}")]
    AoutLoadEndBelowLoad { load_addr: u32, load_end_addr: u32 },
    #[error(
        "Multiboot load range of {len:#x} bytes from file offset {offset:#x} is outside the \
         {file_len}-byte file"
    )]
    AoutLoadOutOfFile {
        offset: u64,
        len: u64,
        file_len: usize,
    },
    #[error("Multiboot bss_end_addr {bss_end_addr:#x} is below the load end {load_end:#x}")]
    AoutBssBelowLoadEnd { load_end: u64, bss_end_addr: u32 },
    #[error("Multiboot information needs {need} bytes but only {available} fit")]
    MultibootInfoTooLarge { need: usize, available: usize },
    #[error("{what} address {addr:#x} does not fit the 32-bit Multiboot field")]
    AddressAbove4G { what: &'static str, addr: u64 },
    #[error("module range [{start:#x}, {end:#x}) ends before it starts")]
    BadModuleRange { start: u64, end: u64 },
    #[error("{what} string contains a NUL byte")]
    StringHasNul { what: &'static str },
    #[error("no room in guest RAM below 4 GiB for a {size:#x}-byte module after {after:#x}")]
    NoRoomForModule { size: u64, after: u64 },
    #[error("guest memory access failed: {0}")]
    GuestMemory(#[from] GuestMemoryError),
}

/// One contiguous piece of an image: `data` goes to `gpa`, followed by zeros
/// up to `memsz` bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segment<'a> {
    pub gpa: u64,
    pub data: &'a [u8],
    pub memsz: u64,
}

/// Ranges the VMM itself writes at boot, which no image may overlap: the
/// protected/long-mode boot structures, the Multiboot information area and
/// the ACPI tables. Callers add their device windows to this list.
pub fn boot_reserved() -> [(u64, u64); 3] {
    [
        (
            layout::BOOT_STRUCTS_START,
            layout::BOOT_STRUCTS_END - layout::BOOT_STRUCTS_START,
        ),
        (
            layout::MB_INFO_ADDR,
            layout::MB_INFO_END - layout::MB_INFO_ADDR,
        ),
        (
            layout::ACPI_AREA,
            layout::DEFAULT_LOAD_ADDR - layout::ACPI_AREA,
        ),
    ]
}

/// Loads `req.image` into `mem` according to `req.format`.
pub fn load(mem: &GuestMemoryMmap, req: &LoadRequest) -> Result<LoadedImage, LoadError> {
    if req.image.is_empty() {
        return Err(LoadError::EmptyImage);
    }
    let format = match req.format {
        ImageFormat::Auto => detect(req.image),
        f => f,
    };
    log::debug!("loading {}-byte image as {format}", req.image.len());
    match format {
        ImageFormat::Flat => flat::load(mem, req),
        ImageFormat::Elf => elf::load(mem, req),
        ImageFormat::Multiboot | ImageFormat::Auto => multiboot::load(mem, req),
    }
}

/// Resolves `ImageFormat::Auto` for `image`.
pub fn detect(image: &[u8]) -> ImageFormat {
    if multiboot::find_header(image).is_ok() {
        ImageFormat::Multiboot
    } else if elf::has_magic(image) {
        ImageFormat::Elf
    } else {
        ImageFormat::Flat
    }
}

/// Total bytes of guest RAM.
fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().fold(0u64, |acc, r| acc.saturating_add(r.len()))
}

/// Whether every byte of `[start, end)` is backed by guest RAM; RAM may have
/// holes (the 32-bit device window), so walk region by region.
fn range_in_ram(mem: &GuestMemoryMmap, start: u64, end: u64) -> bool {
    let mut cur = start;
    while cur < end {
        let Some(region) = mem.find_region(GuestAddress(cur)) else {
            return false;
        };
        let next = region.start_addr().0.saturating_add(region.len());
        if next <= cur {
            return false;
        }
        cur = next;
    }
    true
}

/// The first reserved range overlapping `[start, end)`, as `(start, end)`.
fn overlapping_reserved(reserved: &[(u64, u64)], start: u64, end: u64) -> Option<(u64, u64)> {
    reserved
        .iter()
        .map(|&(rs, len)| (rs, rs.saturating_add(len)))
        .find(|&(rs, re)| start < re && rs < end)
}

/// Checks that `[start, start + len)` may hold image data, returning its end.
fn check_placement(
    mem: &GuestMemoryMmap,
    reserved: &[(u64, u64)],
    start: u64,
    len: u64,
) -> Result<u64, LoadError> {
    let end = start
        .checked_add(len)
        .ok_or(LoadError::AddressOverflow { start, len })?;
    if !range_in_ram(mem, start, end) {
        return Err(LoadError::OutsideRam { start, end });
    }
    if let Some((res_start, res_end)) = overlapping_reserved(reserved, start, end) {
        return Err(LoadError::OverlapsReserved {
            start,
            end,
            res_start,
            res_end,
        });
    }
    Ok(end)
}

/// Validates every segment, then writes them all. Empty segments are skipped.
/// Returns the `(gpa, memsz)` list for [`LoadedImage::segments`].
fn place_segments(
    mem: &GuestMemoryMmap,
    reserved: &[(u64, u64)],
    segments: &[Segment],
) -> Result<Vec<(u64, u64)>, LoadError> {
    let ram = ram_size(mem);
    let mut total = 0u64;
    for (index, seg) in segments.iter().enumerate() {
        // The loaders guarantee this; re-checked because writing relies on it.
        let filesz = seg.data.len() as u64;
        if filesz > seg.memsz {
            return Err(LoadError::FileSizeExceedsMemSize {
                index,
                filesz,
                memsz: seg.memsz,
            });
        }
        // Report "too large" before "outside RAM": it names the real problem.
        total = total.saturating_add(seg.memsz);
        if seg.memsz > ram || total > ram {
            return Err(LoadError::ImageTooLarge { size: total, ram });
        }
    }
    for seg in segments.iter().filter(|s| s.memsz > 0) {
        check_placement(mem, reserved, seg.gpa, seg.memsz)?;
    }
    let mut placed = Vec::with_capacity(segments.len());
    for seg in segments.iter().filter(|s| s.memsz > 0) {
        log::debug!(
            "segment [{:#x}, {:#x}): {:#x} bytes from the file",
            seg.gpa,
            seg.gpa.saturating_add(seg.memsz),
            seg.data.len()
        );
        write_segment(mem, seg)?;
        placed.push((seg.gpa, seg.memsz));
    }
    Ok(placed)
}

/// Copies the file bytes and zero-fills the rest (the bss): guest memory may
/// hold leftovers from an earlier load, so zeros are written, not assumed.
fn write_segment(mem: &GuestMemoryMmap, seg: &Segment) -> Result<(), LoadError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    mem.write_slice(seg.data, GuestAddress(seg.gpa))?;
    let filesz = seg.data.len() as u64;
    let mut addr = seg.gpa.saturating_add(filesz);
    let mut left = seg.memsz.saturating_sub(filesz);
    while left > 0 {
        let chunk = left.min(ZEROS.len() as u64);
        // chunk <= 4096, so the index is in bounds and fits usize.
        let n = usize::try_from(chunk).unwrap_or(ZEROS.len());
        mem.write_slice(&ZEROS[..n], GuestAddress(addr))?;
        addr = addr.saturating_add(chunk);
        left -= chunk;
    }
    Ok(())
}

/// Rounds `v` up to a multiple of the power of two `align`; `None` on overflow.
fn align_up(v: u64, align: u64) -> Option<u64> {
    let mask = align - 1;
    v.checked_add(mask).map(|x| x & !mask)
}

/// Chooses a page-aligned address at or after `after` (typically
/// [`LoadedImage::end`] or the end of the previous module) where `size` bytes
/// fit in guest RAM without touching `reserved`. Modules end below 4 GiB
/// because Multiboot describes them with 32-bit fields.
pub fn place_module(
    mem: &GuestMemoryMmap,
    after: u64,
    size: u64,
    reserved: &[(u64, u64)],
) -> Result<u64, LoadError> {
    let no_room = || LoadError::NoRoomForModule { size, after };
    let mut candidate = align_up(after, PAGE_SIZE).ok_or_else(no_room)?;
    // Each step moves strictly past a reserved range or a RAM region, so the
    // loop ends.
    loop {
        let end = candidate.checked_add(size).ok_or_else(no_room)?;
        if end > MODULE_LIMIT {
            return Err(no_room());
        }
        // A zero-size module still gets an address that is not reserved.
        let probe_end = end.max(candidate.saturating_add(1));
        if let Some((_, res_end)) = overlapping_reserved(reserved, candidate, probe_end) {
            candidate = align_up(res_end, PAGE_SIZE).ok_or_else(no_room)?;
            continue;
        }
        let search_from = match mem.find_region(GuestAddress(candidate)) {
            Some(region) => {
                let region_end = region.start_addr().0.saturating_add(region.len());
                if end <= region_end {
                    return Ok(candidate);
                }
                region_end
            }
            None => candidate,
        };
        candidate = next_region_start(mem, search_from)
            .and_then(|a| align_up(a, PAGE_SIZE))
            .ok_or_else(no_room)?;
    }
}

/// Start of the lowest RAM region starting at or after `addr`.
fn next_region_start(mem: &GuestMemoryMmap, addr: u64) -> Option<u64> {
    mem.iter()
        .map(|r| r.start_addr().0)
        .filter(|&s| s >= addr)
        .min()
}

/// Places `data` with [`place_module`] and writes it; returns `(start, end)`
/// for [`MultibootModule`].
pub fn load_module(
    mem: &GuestMemoryMmap,
    after: u64,
    data: &[u8],
    reserved: &[(u64, u64)],
) -> Result<(u64, u64), LoadError> {
    let size = data.len() as u64;
    let start = place_module(mem, after, size, reserved)?;
    mem.write_slice(data, GuestAddress(start))?;
    Ok((start, start + size))
}

#[cfg(test)]
mod tests {
    use super::testimg::{guest_mem, MEM_SIZE};
    use super::*;

    #[test]
    fn format_names_round_trip() {
        for f in [
            ImageFormat::Auto,
            ImageFormat::Flat,
            ImageFormat::Elf,
            ImageFormat::Multiboot,
        ] {
            assert_eq!(f.to_string().parse::<ImageFormat>(), Ok(f));
        }
        assert_eq!(
            "bzimage".parse::<ImageFormat>(),
            Err(UnknownImageFormat("bzimage".into()))
        );
    }

    #[test]
    fn auto_falls_back_to_flat() {
        let mem = guest_mem();
        let image = b"\x7fELx not quite elf";
        assert_eq!(detect(image), ImageFormat::Flat);
        let req = LoadRequest {
            image,
            format: ImageFormat::Auto,
            load_addr: layout::DEFAULT_LOAD_ADDR,
            reserved: &boot_reserved(),
        };
        let loaded = load(&mem, &req).unwrap();
        assert_eq!(loaded.kind, ImageKind::Flat);
        assert!(!loaded.kind.is_multiboot());
    }

    #[test]
    fn empty_image_is_rejected_in_every_format() {
        let mem = guest_mem();
        for format in [
            ImageFormat::Auto,
            ImageFormat::Flat,
            ImageFormat::Elf,
            ImageFormat::Multiboot,
        ] {
            let req = LoadRequest {
                image: &[],
                format,
                load_addr: 0,
                reserved: &[],
            };
            assert!(matches!(load(&mem, &req), Err(LoadError::EmptyImage)));
        }
    }

    #[test]
    fn boot_reserved_covers_vmm_structures() {
        let r = boot_reserved();
        for addr in [
            layout::GDT_ADDR,
            layout::PML4_ADDR,
            layout::MB_INFO_ADDR,
            0xf_fff0,
        ] {
            assert!(
                overlapping_reserved(&r, addr, addr + 1).is_some(),
                "{addr:#x}"
            );
        }
        assert!(overlapping_reserved(&r, layout::DEFAULT_LOAD_ADDR, MEM_SIZE).is_none());
    }

    #[test]
    fn ram_check_sees_holes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        assert!(range_in_ram(&mem, 0, 0x10_0000));
        assert!(range_in_ram(&mem, 0x20_0000, 0x30_0000));
        assert!(!range_in_ram(&mem, 0xf_f000, 0x10_1000));
        assert!(!range_in_ram(&mem, 0x2f_f000, 0x30_1000));
    }

    #[test]
    fn modules_go_page_aligned_after_the_image_and_skip_reserved() {
        let mem = guest_mem();
        assert_eq!(
            place_module(&mem, 0x40_0123, 0x100, &[]).unwrap(),
            0x40_1000
        );
        assert_eq!(place_module(&mem, 0x40_0000, 0, &[]).unwrap(), 0x40_0000);
        let reserved = [(0x40_1000, 0x800)];
        assert_eq!(
            place_module(&mem, 0x40_0123, 0x2000, &reserved).unwrap(),
            0x40_2000
        );
        let err = place_module(&mem, MEM_SIZE - 0x1000, 0x2000, &[]).unwrap_err();
        assert!(matches!(err, LoadError::NoRoomForModule { .. }), "{err}");
        let err = place_module(&mem, u64::MAX - 10, 1, &[]).unwrap_err();
        assert!(matches!(err, LoadError::NoRoomForModule { .. }), "{err}");
    }

    #[test]
    fn module_placement_skips_a_ram_hole() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        assert_eq!(
            place_module(&mem, 0xf_f000, 0x2000, &[]).unwrap(),
            0x20_0000
        );
        assert_eq!(place_module(&mem, 0x18_0000, 0x10, &[]).unwrap(), 0x20_0000);
    }

    #[test]
    fn segments_may_not_span_the_32_bit_device_window() {
        // The real layout's shape in miniature: low RAM, a hole, high RAM.
        let low_end = 0x40_0000;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), low_end as usize),
            (GuestAddress(layout::HIGH_RAM_START), 0x10_0000),
        ])
        .unwrap();
        let image = [0x5a; 0x2000];
        let mut req = LoadRequest {
            format: ImageFormat::Flat,
            load_addr: low_end - 0x1000,
            ..LoadRequest::new(&image)
        };
        let err = load(&mem, &req).unwrap_err();
        assert!(matches!(err, LoadError::OutsideRam { .. }), "{err}");
        req.load_addr = layout::HIGH_RAM_START;
        assert_eq!(
            load(&mem, &req).unwrap().segments,
            vec![(layout::HIGH_RAM_START, 0x2000)]
        );
    }

    #[test]
    fn load_module_writes_the_data() {
        let mem = guest_mem();
        let (start, end) = load_module(&mem, 0x40_0001, b"module", &[]).unwrap();
        assert_eq!((start, end), (0x40_1000, 0x40_1006));
        let mut back = [0u8; 6];
        mem.read_slice(&mut back, GuestAddress(start)).unwrap();
        assert_eq!(&back, b"module");
    }
}
