//! Guest image loaders: flat binaries, ELF executables and Multiboot v1
//! kernels, plus the Multiboot information structure and module placement.
//!
//! Every loader first turns the image into a list of segments, then
//! `place::place_segments` validates all of them (inside RAM, clear of reserved
//! ranges, no arithmetic overflow) before writing any byte, so a rejected
//! image leaves guest memory untouched. The image is untrusted input: all
//! offsets and sizes go through checked arithmetic and bounds-checked reads.

mod elf;
mod error;
mod flat;
mod mbinfo;
mod multiboot;
mod place;
#[cfg(test)]
mod testimg;

use std::fmt;
use std::str::FromStr;

use vm_memory::GuestMemoryMmap;

use crate::layout;

pub use error::{LoadError, UnknownImageFormat};
pub use mbinfo::{write_multiboot_info, MultibootInfoRequest, MultibootModule};
pub use multiboot::{
    AoutAddrs, MultibootHeader, MULTIBOOT_AOUT_KLUDGE, MULTIBOOT_BOOTLOADER_MAGIC,
    MULTIBOOT_HEADER_MAGIC, MULTIBOOT_MEMORY_INFO, MULTIBOOT_PAGE_ALIGN, MULTIBOOT_VIDEO_MODE,
};
pub use place::{load_module, place_module};
use place::{place_segments, Segment};

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

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::place::overlapping_reserved;
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
}
