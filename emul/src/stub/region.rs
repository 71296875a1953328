//! The memory behind a [`StubBuf`](super::StubBuf): one memfd mapped into
//! one reserved address range, with separate writable and executable
//! aliases so that no page is ever writable and executable at once.
//!
//! Layout of the reservation (pages of 4 KiB):
//!
//! | page | maps memfd page | protection | contents                         |
//! |------|-----------------|------------|----------------------------------|
//! | 0    | 0               | r-x        | helpers, return thunk, landing   |
//! | 1    | 1               | r-x        | stub buffer (executable alias)   |
//! | 2    | 1               | rw-        | stub buffer (writable alias)     |
//! | 3    | 2               | rw-        | control block                    |
//! | 4, 5 | 3, 4            | rw-        | bounce buffer                    |
//! | 6    | 5               | rw-        | guest XSAVE image (vector state) |
//! | 7    | 6               | rw-        | host XSAVE area during a run     |
//!
//! The helper page's writable alias exists only while the helpers are
//! generated, at a kernel-chosen address outside the reservation. Keeping
//! everything in one reservation puts the bounce buffer and the control
//! block within a few pages of the code, so rel32 and RIP-relative disp32
//! always reach them.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::{self, NonNull};

use super::error::StubError;

pub(crate) const PAGE_SIZE: usize = 4096;

const HELPER_EXEC_PAGE: usize = 0;
const STUB_EXEC_PAGE: usize = 1;
const STUB_WRITE_PAGE: usize = 2;
const CONTROL_PAGE: usize = 3;
const BOUNCE_PAGE: usize = 4;
/// Two pages, so that an operand of up to 64 bytes at any offset modulo
/// 4096 fits without crossing the end.
pub const BOUNCE_SIZE: usize = 2 * PAGE_SIZE;
/// The guest's XSAVE image that a vector run restores before the
/// instruction and saves after it (page-aligned, so 64-byte aligned as
/// XSAVE/XRSTOR require).
const GUEST_XSAVE_PAGE: usize = 6;
/// The host's vector state while a vector run has the guest's loaded.
const HOST_XSAVE_PAGE: usize = 7;
/// Size of either XSAVE area: the standard-format layout of the components
/// a vector run switches (x87 .. Hi16_ZMM) ends at 2688 bytes.
pub const XSAVE_AREA_SIZE: usize = PAGE_SIZE;
const RESERVED_PAGES: usize = 8;

const FILE_HELPER_PAGE: usize = 0;
const FILE_STUB_PAGE: usize = 1;
const FILE_CONTROL_PAGE: usize = 2;
const FILE_BOUNCE_PAGE: usize = 3;
const FILE_GUEST_XSAVE_PAGE: usize = 5;
const FILE_HOST_XSAVE_PAGE: usize = 6;
const FILE_PAGES: usize = 7;

/// The mapped aliases of one stub buffer.
pub(crate) struct StubRegion {
    base: NonNull<u8>,
    memfd: OwnedFd,
}

impl StubRegion {
    pub(crate) fn new() -> Result<Self, StubError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page != PAGE_SIZE as libc::c_long {
            return Err(StubError::Os {
                what: "page size check",
                source: std::io::Error::other(format!("page size {page}, expected {PAGE_SIZE}")),
            });
        }

        let name: &CStr = c"emul-stub";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(StubError::last_os("memfd_create"));
        }
        // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file_len = (FILE_PAGES * PAGE_SIZE) as libc::off_t;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), file_len) } != 0 {
            return Err(StubError::last_os("ftruncate(memfd)"));
        }

        // SAFETY: an anonymous PROT_NONE reservation at a kernel-chosen
        // address cannot alias any existing Rust object.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                RESERVED_PAGES * PAGE_SIZE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(StubError::last_os("mmap(reservation)"));
        }
        let Some(base) = NonNull::new(base.cast::<u8>()) else {
            return Err(StubError::last_os("mmap(reservation)"));
        };
        // From here on Drop unmaps the whole reservation on any error path.
        let region = StubRegion { base, memfd };

        let rx = libc::PROT_READ | libc::PROT_EXEC;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        region.map_fixed(HELPER_EXEC_PAGE, 1, rx, FILE_HELPER_PAGE)?;
        region.map_fixed(STUB_EXEC_PAGE, 1, rx, FILE_STUB_PAGE)?;
        region.map_fixed(STUB_WRITE_PAGE, 1, rw, FILE_STUB_PAGE)?;
        region.map_fixed(CONTROL_PAGE, 1, rw, FILE_CONTROL_PAGE)?;
        region.map_fixed(BOUNCE_PAGE, BOUNCE_SIZE / PAGE_SIZE, rw, FILE_BOUNCE_PAGE)?;
        region.map_fixed(GUEST_XSAVE_PAGE, 1, rw, FILE_GUEST_XSAVE_PAGE)?;
        region.map_fixed(HOST_XSAVE_PAGE, 1, rw, FILE_HOST_XSAVE_PAGE)?;
        Ok(region)
    }

    /// Replaces reserved pages `page..page+count` with a shared mapping of
    /// memfd pages starting at `file_page`.
    fn map_fixed(
        &self,
        page: usize,
        count: usize,
        prot: libc::c_int,
        file_page: usize,
    ) -> Result<(), StubError> {
        debug_assert!(page + count <= RESERVED_PAGES);
        debug_assert!(
            prot & (libc::PROT_WRITE | libc::PROT_EXEC) != libc::PROT_WRITE | libc::PROT_EXEC
        );
        let addr = self.page_ptr(page).cast::<libc::c_void>();
        // SAFETY: the target lies inside our own reservation (checked
        // above), which no Rust reference points into yet, so MAP_FIXED
        // replaces only memory this region owns.
        let mapped = unsafe {
            libc::mmap(
                addr,
                count * PAGE_SIZE,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.memfd.as_raw_fd(),
                (file_page * PAGE_SIZE) as libc::off_t,
            )
        };
        if mapped != addr {
            return Err(StubError::last_os("mmap(alias)"));
        }
        Ok(())
    }

    fn page_ptr(&self, page: usize) -> *mut u8 {
        self.base.as_ptr().wrapping_add(page * PAGE_SIZE)
    }

    fn page_addr(&self, page: usize) -> u64 {
        self.page_ptr(page) as u64
    }

    /// Executable address of the helper page.
    pub(crate) fn helper_exec(&self) -> u64 {
        self.page_addr(HELPER_EXEC_PAGE)
    }

    /// Executable address of the stub buffer.
    pub(crate) fn stub_exec(&self) -> u64 {
        self.page_addr(STUB_EXEC_PAGE)
    }

    /// Address of the stub buffer's writable alias.
    #[cfg(test)]
    pub(crate) fn stub_write_addr(&self) -> u64 {
        self.page_addr(STUB_WRITE_PAGE)
    }

    /// The code a fault may come from: helper page and stub page (their
    /// executable aliases are adjacent).
    pub(crate) fn exec_range(&self) -> (u64, u64) {
        (self.helper_exec(), self.stub_exec() + PAGE_SIZE as u64)
    }

    /// The stub page through its writable alias.
    pub(crate) fn stub_write(&mut self) -> &mut [u8] {
        // SAFETY: the page is mapped read-write for the life of `self`, and
        // `&mut self` makes this the only live reference to it. The
        // executable alias is only ever executed, never referenced.
        unsafe { std::slice::from_raw_parts_mut(self.page_ptr(STUB_WRITE_PAGE), PAGE_SIZE) }
    }

    /// Reads the stub page through its executable alias (for checks).
    pub(crate) fn stub_exec_bytes(&self) -> &[u8] {
        // SAFETY: the executable alias is mapped readable for the life of
        // `self`; its bytes change only through `stub_write`, which needs
        // `&mut self` and so cannot run while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.page_ptr(STUB_EXEC_PAGE), PAGE_SIZE) }
    }

    /// Reads the helper page through its executable alias.
    pub(crate) fn helper_bytes(&self) -> &[u8] {
        // SAFETY: mapped readable for the life of `self` and never written
        // after `write_helpers` returns.
        unsafe { std::slice::from_raw_parts(self.page_ptr(HELPER_EXEC_PAGE), PAGE_SIZE) }
    }

    /// Address of the control page (read-write data).
    pub(crate) fn control_ptr(&self) -> *mut u8 {
        self.page_ptr(CONTROL_PAGE)
    }

    /// Address of the bounce buffer as the stub sees it.
    pub(crate) fn bounce_addr(&self) -> u64 {
        self.page_addr(BOUNCE_PAGE)
    }

    pub(crate) fn bounce(&self) -> &[u8] {
        // SAFETY: mapped read-write for the life of `self`; the only writers
        // are `bounce_mut` (needs `&mut self`) and a running stub, which
        // also runs under `&mut self`.
        unsafe { std::slice::from_raw_parts(self.page_ptr(BOUNCE_PAGE), BOUNCE_SIZE) }
    }

    pub(crate) fn bounce_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bounce`, and `&mut self` makes this borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.page_ptr(BOUNCE_PAGE), BOUNCE_SIZE) }
    }

    /// Address of the guest XSAVE image (the generated helpers address it
    /// RIP-relatively).
    pub(crate) fn guest_xsave_addr(&self) -> u64 {
        self.page_addr(GUEST_XSAVE_PAGE)
    }

    pub(crate) fn guest_xsave(&self) -> &[u8] {
        // SAFETY: mapped read-write for the life of `self`; written only
        // through `guest_xsave_mut` or by a running stub, both under
        // `&mut self`.
        unsafe { std::slice::from_raw_parts(self.page_ptr(GUEST_XSAVE_PAGE), XSAVE_AREA_SIZE) }
    }

    pub(crate) fn guest_xsave_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `guest_xsave`, and `&mut self` makes this borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.page_ptr(GUEST_XSAVE_PAGE), XSAVE_AREA_SIZE) }
    }

    /// The host XSAVE area, only ever touched by XSAVE/XRSTOR in
    /// `StubBuf::invoke` (its header stays zero from the memfd, as the
    /// standard format needs).
    pub(crate) fn host_xsave_ptr(&self) -> *mut u8 {
        self.page_ptr(HOST_XSAVE_PAGE)
    }

    /// Runs `generate` on a temporary writable alias of the helper page
    /// (first filled with INT3), then removes that alias.
    pub(crate) fn write_helpers<R>(
        &mut self,
        generate: impl FnOnce(&mut [u8], u64) -> Result<R, StubError>,
    ) -> Result<R, StubError> {
        // SAFETY: a shared mapping of our own memfd at a kernel-chosen
        // address; it aliases only the helper page, which nothing
        // references as data.
        let tmp = unsafe {
            libc::mmap(
                ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.memfd.as_raw_fd(),
                (FILE_HELPER_PAGE * PAGE_SIZE) as libc::off_t,
            )
        };
        if tmp == libc::MAP_FAILED {
            return Err(StubError::last_os("mmap(helper alias)"));
        }
        let result = {
            // SAFETY: `tmp` is a fresh PAGE_SIZE read-write mapping that
            // only this slice refers to until it is unmapped below.
            let page = unsafe { std::slice::from_raw_parts_mut(tmp.cast::<u8>(), PAGE_SIZE) };
            page.fill(super::cursor::INT3);
            generate(page, self.helper_exec())
        };
        // SAFETY: unmaps exactly the temporary alias created above; the
        // slice into it went out of scope.
        if unsafe { libc::munmap(tmp, PAGE_SIZE) } != 0 {
            return Err(StubError::last_os("munmap(helper alias)"));
        }
        result
    }
}

impl Drop for StubRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps the reservation this region created; every borrow
        // of it is tied to `self` and so has ended.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast::<libc::c_void>(),
                RESERVED_PAGES * PAGE_SIZE,
            );
        }
    }
}
