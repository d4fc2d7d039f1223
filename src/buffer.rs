//! Memory-aligned byte buffers for O_DIRECT I/O.
//!
//! O_DIRECT needs the buffer address, the file offset and the length aligned to the device's (or filesystem's)
//! direct-I/O alignment. Buffers here are aligned to [`BUFFER_ALIGN`], which covers every logical block size
//! Linux supports (512 B to 4 KiB) and the page size, so one buffer type serves every destination.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: a page, which is at least any logical block size.
pub const BUFFER_ALIGN: usize = 4096;

/// Size of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// A heap buffer whose start is aligned to [`BUFFER_ALIGN`] and whose capacity is a multiple of it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    /// An anonymous mapping of its own ([`map_huge`], [`AlignedBuf::base_pages`]; unmapped on drop) rather than
    /// taken from the allocator.
    mapped: bool,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates a zeroed buffer of at least `capacity` bytes (rounded up to the alignment).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1).next_multiple_of(BUFFER_ALIGN);
        if capacity >= HUGE_PAGE {
            if let Some(ptr) = map_huge(capacity) {
                return AlignedBuf { ptr, capacity, mapped: true };
            }
        }
        Self::allocated(capacity)
    }

    /// Like [`AlignedBuf::new`], but in base pages that are charged only once touched: for a buffer usually filled
    /// in part (a worker's compressed-input scratch). An anonymous mapping, since the allocator zeroes an
    /// over-aligned allocation by writing it, which would charge every page.
    pub fn base_pages(capacity: usize) -> Self {
        let capacity = capacity.max(1).next_multiple_of(BUFFER_ALIGN);
        if let Ok(ptr) = crate::sys::map_anonymous(capacity) {
            return AlignedBuf { ptr, capacity, mapped: true };
        }
        Self::allocated(capacity)
    }

    fn allocated(capacity: usize) -> Self {
        let layout = Layout::from_size_align(capacity, BUFFER_ALIGN).expect("buffer size overflows a Layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, capacity, mapped: false }
    }

    /// Size of the buffer in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity initialised bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped by map_huge or map_anonymous with exactly this length.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.capacity) };
            return;
        }
        let layout = Layout::from_size_align(self.capacity, BUFFER_ALIGN).expect("layout was valid at allocation");
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// An anonymous mapping of `len` bytes (a multiple of the page size) starting on a huge-page boundary and
/// advised to use huge pages. A 4 MiB buffer in 4 KiB pages is up to 1024 scattered segments, and a virtio disk
/// takes at most max_segments (254 here) per request; in two huge pages it is one 4 MiB request. Only whole huge
/// pages inside the mapping become huge. A buffer used whole costs the same; one filled only in part would be
/// charged whole huge pages where base pages are charged one by one ([`AlignedBuf::base_pages`]).
fn map_huge(len: usize) -> Option<NonNull<u8>> {
    let span = len.checked_add(HUGE_PAGE)?;
    let raw: *mut libc::c_void = crate::sys::map_anonymous(span).ok()?.as_ptr().cast();
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    // SAFETY: both trimmed ranges lie inside the mapping just made and are never touched.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let tail = start + span - (aligned + len);
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Advice only: without transparent huge pages the buffer works in base pages.
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8)
}

/// The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), if it says.
pub fn huge_page_mode() -> Option<String> {
    let modes = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    chosen_mode(&modes).map(String::from)
}

/// The bracketed entry of a sysfs choice list such as `always [madvise] never`.
fn chosen_mode(modes: &str) -> Option<&str> {
    modes.split_whitespace().find_map(|m| m.strip_prefix('[')?.strip_suffix(']'))
}

/// Whether `value` is a multiple of `align` (a power of two).
pub fn is_aligned(value: u64, align: u64) -> bool {
    value & (align - 1) == 0
}

/// `value` rounded down to a multiple of `align` (a power of two).
pub fn align_down(value: u64, align: u64) -> u64 {
    value & !(align - 1)
}

/// `value` rounded up to a multiple of `align` (a power of two); saturates near `u64::MAX`.
pub fn align_up(value: u64, align: u64) -> u64 {
    value.checked_add(align - 1).map_or(align_down(u64::MAX, align), |v| align_down(v, align))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_rounded() {
        let mut buf = AlignedBuf::new(5000);
        assert_eq!(buf.capacity(), 8192);
        assert_eq!(buf.as_ptr() as usize % BUFFER_ALIGN, 0);
        assert!(buf.iter().all(|&b| b == 0));
        buf[8191] = 7;
        assert_eq!(buf[8191], 7);
    }

    #[test]
    fn whole_huge_page_buffers_start_on_a_huge_page_and_are_zeroed() {
        let mut buf = AlignedBuf::new(4 << 20);
        assert!(buf.mapped);
        assert_eq!(buf.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(buf.iter().all(|&b| b == 0));
        let last = buf.capacity() - 1;
        buf[0] = 1;
        buf[last] = 2;
        assert_eq!((buf[0], buf[last]), (1, 2));
        assert!(!AlignedBuf::new(1 << 20).mapped);
    }

    #[test]
    fn base_page_buffers_cost_only_the_pages_touched() {
        let mut buf = AlignedBuf::base_pages(4 << 20);
        assert!(buf.mapped && buf.as_ptr() as usize % BUFFER_ALIGN == 0);
        buf[0] = 1;
        buf[3 * BUFFER_ALIGN] = 1;
        let pages = buf.capacity() / BUFFER_ALIGN;
        let mut resident = vec![0u8; pages];
        // SAFETY: the range is this buffer's own mapping; `resident` has one byte per page.
        let rc = unsafe { libc::mincore(buf.as_mut_ptr().cast(), buf.capacity(), resident.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert_eq!(resident.iter().filter(|&&r| r & 1 == 1).count(), 2, "only the two touched pages are resident");
        assert!(buf.iter().all(|&b| b <= 1));
    }

    #[test]
    fn the_bracketed_huge_page_mode_is_the_chosen_one() {
        assert_eq!(chosen_mode("always [madvise] never\n"), Some("madvise"));
        assert_eq!(chosen_mode("[always] madvise never"), Some("always"));
        assert_eq!(chosen_mode("always madvise never"), None);
    }

    #[test]
    fn alignment_arithmetic() {
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(4097, 4096), 8192);
        assert_eq!(align_up(4096, 4096), 4096);
        assert_eq!(align_up(u64::MAX, 512), u64::MAX - 511);
        assert!(is_aligned(1 << 20, 512));
        assert!(!is_aligned(513, 512));
    }
}
