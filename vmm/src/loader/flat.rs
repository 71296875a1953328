//! Flat binaries: the file is copied verbatim to the load address, which is
//! also the entry point.

use vm_memory::GuestMemoryMmap;

use super::{place_segments, ImageKind, LoadError, LoadRequest, LoadedImage, Segment};

pub(super) fn load(mem: &GuestMemoryMmap, req: &LoadRequest) -> Result<LoadedImage, LoadError> {
    if req.image.is_empty() {
        return Err(LoadError::EmptyImage);
    }
    let segment = Segment {
        gpa: req.load_addr,
        data: req.image,
        memsz: req.image.len() as u64,
    };
    let segments = place_segments(mem, req.reserved, &[segment])?;
    Ok(LoadedImage {
        kind: ImageKind::Flat,
        entry: req.load_addr,
        segments,
        multiboot: None,
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::super::testimg::{guest_mem, MEM_SIZE};
    use super::super::{load, ImageFormat};
    use super::*;
    use crate::layout::DEFAULT_LOAD_ADDR;

    fn request(image: &[u8], load_addr: u64) -> LoadRequest<'_> {
        LoadRequest {
            image,
            format: ImageFormat::Flat,
            load_addr,
            reserved: &[],
        }
    }

    #[test]
    fn copies_bytes_to_the_load_address() {
        let mem = guest_mem();
        let image = [0xf4, 0x90, 0xeb, 0xfe];
        let loaded = load(&mem, &request(&image, DEFAULT_LOAD_ADDR)).unwrap();
        assert_eq!(loaded.kind, ImageKind::Flat);
        assert_eq!(loaded.entry, DEFAULT_LOAD_ADDR);
        assert_eq!(loaded.segments, vec![(DEFAULT_LOAD_ADDR, 4)]);
        assert_eq!(loaded.end(), DEFAULT_LOAD_ADDR + 4);
        let mut back = [0u8; 4];
        mem.read_slice(&mut back, GuestAddress(DEFAULT_LOAD_ADDR))
            .unwrap();
        assert_eq!(back, image);
    }

    #[test]
    fn rejects_empty_image() {
        let mem = guest_mem();
        assert!(matches!(
            load(&mem, &request(&[], DEFAULT_LOAD_ADDR)),
            Err(LoadError::EmptyImage)
        ));
    }

    #[test]
    fn rejects_image_running_off_the_end_of_ram() {
        let mem = guest_mem();
        let image = [1u8; 0x2000];
        let err = load(&mem, &request(&image, MEM_SIZE - 0x1000)).unwrap_err();
        assert!(matches!(err, LoadError::OutsideRam { .. }), "{err}");
    }

    #[test]
    fn rejects_image_larger_than_ram() {
        let mem = guest_mem();
        let image = vec![0u8; MEM_SIZE as usize + 1];
        let err = load(&mem, &request(&image, 0)).unwrap_err();
        assert!(matches!(err, LoadError::ImageTooLarge { .. }), "{err}");
    }

    #[test]
    fn rejects_load_address_overflow() {
        let mem = guest_mem();
        let err = load(&mem, &request(&[1, 2], u64::MAX)).unwrap_err();
        assert!(matches!(err, LoadError::AddressOverflow { .. }), "{err}");
    }

    #[test]
    fn rejects_overlap_with_reserved_range_and_names_both() {
        let mem = guest_mem();
        let image = [0xaau8; 0x100];
        let reserved = [(0x20_0080, 0x10)];
        let req = LoadRequest {
            reserved: &reserved,
            ..request(&image, 0x20_0000)
        };
        let err = load(&mem, &req).unwrap_err();
        assert!(matches!(err, LoadError::OverlapsReserved { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("0x200000") && msg.contains("0x200100"),
            "{msg}"
        );
        assert!(
            msg.contains("0x200080") && msg.contains("0x200090"),
            "{msg}"
        );
        // Nothing was written.
        let mut back = [0xffu8; 1];
        mem.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(back, [0]);
    }
}
