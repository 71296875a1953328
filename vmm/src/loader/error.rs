//! Loader errors.

use vm_memory::GuestMemoryError;

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

/// `ImageFormat::from_str` got a name it does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown image format {0:?} (expected auto, flat, elf or multiboot)")]
pub struct UnknownImageFormat(pub String);
