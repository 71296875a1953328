//! Where image bytes may go: RAM and reserved-range checks shared by all
//! loaders, segment writing, and module placement.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::LoadError;

/// Page size used to align module placement.
const PAGE_SIZE: u64 = 0x1000;
/// Multiboot modules are described by 32-bit fields, so they must end below this.
const MODULE_LIMIT: u64 = 1 << 32;

/// One contiguous piece of an image: `data` goes to `gpa`, followed by zeros
/// up to `memsz` bytes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment<'a> {
    pub gpa: u64,
    pub data: &'a [u8],
    pub memsz: u64,
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
pub(super) fn overlapping_reserved(
    reserved: &[(u64, u64)],
    start: u64,
    end: u64,
) -> Option<(u64, u64)> {
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
/// Returns the `(gpa, memsz)` list for [`super::LoadedImage::segments`].
pub(super) fn place_segments(
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
/// [`super::LoadedImage::end`] or the end of the previous module) where `size` bytes
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
/// for [`super::MultibootModule`].
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
    use vm_memory::GuestAddress;

    use super::super::testimg::{guest_mem, MEM_SIZE};
    use super::*;

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
    fn load_module_writes_the_data() {
        let mem = guest_mem();
        let (start, end) = load_module(&mem, 0x40_0001, b"module", &[]).unwrap();
        assert_eq!((start, end), (0x40_1000, 0x40_1006));
        let mut back = [0u8; 6];
        mem.read_slice(&mut back, GuestAddress(start)).unwrap();
        assert_eq!(&back, b"module");
    }
}
