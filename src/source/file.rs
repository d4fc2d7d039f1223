//! A local file or block device as a source, read without leaving page cache behind.
//!
//! Preferred: O_DIRECT, so reads bypass the page cache entirely (nothing is charged to our memory cgroup but the
//! buffers we own). Requests that are not aligned go through a small bounce buffer. Where O_DIRECT is refused
//! (tmpfs, some FUSE filesystems), reads are buffered and each range read is dropped from the cache right after
//! with POSIX_FADV_DONTNEED, so the cache a source read creates is bounded by one request.

use super::ReadAt;
use crate::buffer::{align_down, align_up, is_aligned, AlignedBuf};
use crate::error::{Error, IoContext, Result};
use crate::sys;
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bounce buffer size for unaligned O_DIRECT requests; larger requests are split.
const BOUNCE_SIZE: usize = 1 << 20;

thread_local! {
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// How the file is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// O_DIRECT with this offset/length alignment.
    Direct(u64),
    /// Buffered reads, each range dropped from the page cache after it is read.
    BufferedDropBehind,
}

/// A local file or block device read without polluting the page cache.
pub struct FileSource {
    name: String,
    file: File,
    len: u64,
    mode: ReadMode,
    is_block_device: bool,
    /// Bytes the kernel returned to our reads.
    bytes_read: AtomicU64,
}

impl FileSource {
    /// Opens `path` for reading, with O_DIRECT when the filesystem or device accepts it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).io_context("opening source").map_err(|e| e.at_path(path))?;
        Self::from_file(file, path)
    }

    /// Reads `file`, already opened read-only as `path` (by a confined opener), with O_DIRECT when the
    /// filesystem or device accepts it: the direct handle is a reopen of the same open file, never a new lookup
    /// of the path.
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let ctx = |e: Error| e.at_path(path);
        let meta = file.metadata().io_context("reading source metadata").map_err(ctx)?;
        if meta.is_dir() {
            return Err(Error::new(crate::error::ErrorKind::Io, "source is a directory").at_path(path));
        }
        let len = sys::file_or_device_size(&file).io_context("reading source size").map_err(ctx)?;
        let is_block_device = sys::is_block_device(&file).io_context("reading source type").map_err(ctx)?;
        let mut source = FileSource {
            name,
            file,
            len,
            mode: ReadMode::BufferedDropBehind,
            is_block_device,
            bytes_read: AtomicU64::new(0),
        };
        match sys::reopen(&source.file, libc::O_RDONLY | libc::O_DIRECT) {
            Ok(direct) => {
                let buffered = std::mem::replace(&mut source.file, direct);
                match source.probe_direct_alignment() {
                    Some(align) => source.mode = ReadMode::Direct(align),
                    None => source.file = buffered,
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(ctx(Error::io("opening source", e))),
        }
        if source.mode == ReadMode::BufferedDropBehind {
            // Readahead pages ahead of the cursor would stay cached; sequential advice keeps requests large and
            // the per-read DONTNEED drops what was read.
            let _ = sys::fadvise(&source.file, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        Ok(source)
    }

    /// How this source is read.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    /// Finds the O_DIRECT alignment: the block device's logical block size, statx DIOALIGN, or a trial read.
    fn probe_direct_alignment(&self) -> Option<u64> {
        if self.is_block_device {
            return sys::block_geometry(&self.file).ok().map(|g| g.logical.max(512));
        }
        match sys::statx_dio_alignment(&self.file) {
            Ok(Some((0, _))) | Ok(Some((_, 0))) => return None,
            Ok(Some((mem, offset))) if mem <= 4096 && offset <= 4096 => return Some(offset.max(512)),
            _ => {}
        }
        let mut probe = AlignedBuf::new(4096);
        [512u64, 4096].into_iter().find(|&align| match self.file.read_at(&mut probe[..align as usize], 0) {
            Ok(_) => true,
            Err(e) => e.raw_os_error() != Some(libc::EINVAL),
        })
    }

    /// Fails if the file is now shorter than when it was opened (truncated during the import).
    fn check_not_shrunk(&self) -> Result<()> {
        let now = self.file.metadata().io_context("reading source size").map_err(|e| e.at_path(&self.name))?.len();
        if now < self.len {
            return Err(Error::new(
                crate::error::ErrorKind::Io,
                format!("source shrank from {} to {now} bytes during the import", self.len),
            )
            .at_offset(now)
            .at_path(&self.name));
        }
        Ok(())
    }

    fn pread_full(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.bytes_read.fetch_add(done as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// An O_DIRECT read of an unaligned request: read the aligned superset into a bounce buffer, copy out. The
    /// per-thread bounce buffer grows to what requests need (metadata reads are small), up to [`BOUNCE_SIZE`].
    fn read_bounced(&self, offset: u64, buf: &mut [u8], align: u64) -> io::Result<usize> {
        BOUNCE.with(|cell| {
            let mut slot = cell.borrow_mut();
            let wanted = (buf.len() as u64 + 2 * align).min(BOUNCE_SIZE as u64) as usize;
            if slot.as_ref().is_none_or(|b| b.capacity() < wanted) {
                *slot = Some(AlignedBuf::new(wanted));
            }
            let bounce = slot.as_mut().expect("bounce buffer just allocated");
            let room = bounce.capacity();
            let mut done = 0usize;
            while done < buf.len() {
                let want_start = offset + done as u64;
                let start = align_down(want_start, align);
                let skip = (want_start - start) as usize;
                let take = (buf.len() - done).min(room - skip);
                let span = (align_up((skip + take) as u64, align) as usize).min(room);
                let got = self.pread_full(start, &mut bounce[..span])?;
                let usable = got.saturating_sub(skip).min(take);
                buf[done..done + usable].copy_from_slice(&bounce[skip..skip + usable]);
                done += usable;
                if usable < take {
                    break;
                }
            }
            Ok(done)
        })
    }
}

impl ReadAt for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let result = match self.mode {
            ReadMode::Direct(align) => {
                let aligned = is_aligned(offset, align)
                    && is_aligned(buf.len() as u64, align)
                    && is_aligned(buf.as_ptr() as u64, align);
                if aligned {
                    self.pread_full(offset, buf)
                } else {
                    self.read_bounced(offset, buf, align)
                }
            }
            ReadMode::BufferedDropBehind => self.pread_full(offset, buf).inspect(|&n| {
                // Only clean pages are dropped, and everything just read is clean.
                let _ = sys::drop_cache(&self.file, offset, n as u64);
            }),
        };
        result.map_err(|e| Error::io("reading source", e).at_offset(offset).at_path(&self.name))
    }

    fn bytes_read(&self) -> Option<u64> {
        Some(self.bytes_read.load(Ordering::Relaxed))
    }

    fn direct_alignment(&self) -> u64 {
        match self.mode {
            ReadMode::Direct(align) => align,
            ReadMode::BufferedDropBehind => 1,
        }
    }

    fn identity(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata().ok()?;
        Some(format!("mtime={}.{:09} ino={}", meta.mtime(), meta.mtime_nsec(), meta.ino()))
    }

    fn next_data(&self, offset: u64) -> Result<Option<Range<u64>>> {
        if offset >= self.len {
            return Ok(None);
        }
        if self.is_block_device {
            return Ok(Some(offset..self.len));
        }
        match sys::next_data_run(&self.file, offset) {
            Ok(run) => {
                // "No data up to the end" also describes a file truncated under us; the length we planned with is
                // then a lie, and the missing tail must not be imported as zeros.
                if run.is_none_or(|(_, end)| end < self.len) {
                    self.check_not_shrunk()?;
                }
                Ok(run.map(|(start, end)| start..end.min(self.len)))
            }
            // Filesystems without SEEK_DATA: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(offset..self.len)),
            Err(e) => Err(Error::io("finding data in source", e).at_offset(offset).at_path(&self.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_source_truncated_after_opening_is_an_error_not_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src.bin");
        let file = File::create(&path).unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(&pattern(1 << 20), 0).unwrap();
        let source = FileSource::open(&path).unwrap();
        assert!(source.next_data(1 << 20).unwrap().is_none_or(|r| r.start >= 1 << 20));
        file.set_len(2 << 20).unwrap();
        let err = source.next_data(1 << 20).unwrap_err();
        assert!(err.to_string().contains("shrank from 4194304 to 2097152 bytes"), "{err}");
        assert_eq!(err.offset(), Some(2 << 20));
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn aligned_and_unaligned_reads_return_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src.bin");
        let data = pattern(3 * BOUNCE_SIZE + 777);
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let source = FileSource::open(&path).unwrap();
        assert_eq!(source.len(), data.len() as u64);

        let mut aligned = AlignedBuf::new(1 << 20);
        assert_eq!(source.read_at(1 << 20, &mut aligned).unwrap(), 1 << 20);
        assert_eq!(&aligned[..], &data[1 << 20..2 << 20]);

        for &(offset, len) in &[(1usize, 10usize), (4095, 2), (511, BOUNCE_SIZE + 3000), (100, 2 * BOUNCE_SIZE)] {
            let mut buf = vec![0u8; len];
            assert_eq!(source.read_at(offset as u64, &mut buf).unwrap(), len);
            assert_eq!(buf, &data[offset..offset + len], "offset {offset} len {len}");
        }

        // Reads running past the end are short, never an error.
        let mut tail = vec![0u8; 5000];
        let got = source.read_at(data.len() as u64 - 1000, &mut tail).unwrap();
        assert_eq!(got, 1000);
        assert_eq!(&tail[..1000], &data[data.len() - 1000..]);
        assert_eq!(source.read_at(data.len() as u64 + 10, &mut tail).unwrap(), 0);
    }

    #[test]
    fn holes_are_reported_as_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.bin");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_at(&[1u8; 4096], 32 << 20).unwrap();
        drop(file);
        let source = FileSource::open(&path).unwrap();
        let run = source.next_data(0).unwrap().expect("one data run");
        assert!(run.start <= 32 << 20 && run.end >= (32 << 20) + 4096, "{run:?}");
        assert_eq!(source.next_data(64 << 20).unwrap(), None);
    }
}
