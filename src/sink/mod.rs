//! Destinations: a block device written in place, or a regular file created sparse at the virtual size.
//!
//! Two write paths behind one type:
//! - direct: O_DIRECT writes straight from the pipeline's aligned buffers; nothing enters the page cache. An
//!   unaligned tail (an image size that is not a multiple of the block size) is written buffered at the end,
//!   then synced and dropped.
//! - write-behind: buffered writes paced by the cgroup governor ([`writebehind`]), for destinations that refuse
//!   O_DIRECT (NFSv3, some FUSE filesystems, tmpfs on older kernels).
//!
//! Zero ranges are skipped on a fresh file (they are already holes) and zeroed on a block device unless the
//! caller knows it is already zero.

pub(crate) mod paced;
pub(crate) mod probe;
pub mod volume;
pub(crate) mod writebehind;
pub(crate) mod zeroing;

use crate::buffer::{align_down, is_aligned, AlignedBuf};
use crate::cgroup::governor::{Governor, GovernorSummary};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::size::human;
use crate::sys;
pub(crate) use probe::Probe;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use writebehind::WriteBehind;
use zeroing::Zeroer;

/// Smallest unit of zero detection and write alignment: a page, which covers any logical block size up to 4 KiB.
pub const MIN_BLOCK: u64 = 4096;

/// What [`Destination::scrub`] zeroes at each end of a partial image on a block device.
pub const SCRUB_LEN: u64 = 1 << 20;

/// Which write path to use (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// O_DIRECT where the destination accepts it, else write-behind.
    Auto,
    /// O_DIRECT only; fail if the destination refuses it.
    Direct,
    /// Buffered writes paced by the cgroup governor.
    Writebehind,
}

/// What kind of destination this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DestKind {
    /// A block device, written in place.
    BlockDevice,
    /// A regular file, created or truncated to the image size.
    RegularFile,
}

/// Options for opening a destination.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// Write path.
    pub io: IoChoice,
    /// The block device is known to read as zeros already: zero ranges are skipped.
    pub target_is_zero: bool,
    /// Permission bits for a newly created file.
    pub file_mode: u32,
    /// Allocate every block: a file is fallocated over its whole size; a block device's zero ranges are zeroed
    /// without unmapping (and zeroed even when `target_is_zero`).
    pub preallocate: bool,
    /// The most the image may occupy (the space a CDI volume reports): a larger image is refused before anything
    /// is opened or written.
    pub max_size: Option<u64>,
    /// Keep a regular file's contents (resuming an interrupted import of the same image) instead of truncating.
    pub keep_contents: bool,
    /// Grow a regular file to at least this many bytes when the import is done (CDI sizes `disk.img` to the
    /// volume's usable space; never shrinks below the image).
    pub grow_to: Option<u64>,
    /// The destination already holds an earlier state of the disk and the import only updates it (a warm
    /// migration's delta): it must exist and hold the image, its contents are kept (a file is neither truncated
    /// nor resized), and zero ranges are zeroed on a file too, since what they cover held data before.
    pub in_place: bool,
}

impl Default for DestOptions {
    fn default() -> Self {
        DestOptions {
            io: IoChoice::Auto,
            target_is_zero: false,
            file_mode: 0o644,
            keep_contents: false,
            preallocate: false,
            max_size: None,
            grow_to: None,
            in_place: false,
        }
    }
}

/// Removes a file it names when dropped armed.
struct RemoveUnlessKept<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for RemoveUnlessKept<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = std::fs::remove_file(self.path) {
                log::info!("{}: cannot remove the file just created: {e}", self.path.display());
            }
        }
    }
}

/// Byte counters of what the destination received.
#[derive(Debug, Default)]
pub struct DestStats {
    /// Bytes written as data.
    pub written: AtomicU64,
    /// Bytes zeroed explicitly (block devices).
    pub zeroed: AtomicU64,
    /// Zero bytes left as holes or skipped on a known-zero device.
    pub skipped: AtomicU64,
}

/// The write path in effect.
enum WritePath {
    Direct { file: File, align: u64 },
    WriteBehind(Box<WriteBehind>),
}

/// An open destination of a known size.
pub struct Destination {
    path: PathBuf,
    kind: DestKind,
    /// Bytes of the image: fixed at open, or grown by [`Destination::grow`] for a stream of unknown length.
    size: AtomicU64,
    capacity: u64,
    /// The most the image may grow to (`DestOptions::max_size`).
    max_size: Option<u64>,
    block: u64,
    buffered: File,
    path_kind: WritePath,
    zeroer: Option<Zeroer>,
    /// Final length of a file (`DestOptions::grow_to`) and whether to allocate it.
    grow_to: Option<u64>,
    preallocate: bool,
    /// Why this write path was chosen, for the log.
    pub io_reason: String,
    /// What was written.
    pub stats: DestStats,
}

impl Destination {
    /// Opens `path` to receive an image of `size` bytes. A block device must be at least that large (checked
    /// before anything is written); a regular file is created or truncated, then sized, so it starts as one hole.
    /// `governor` builds the pacing for the write-behind path, if that path is chosen.
    pub fn open(
        path: &Path,
        size: u64,
        options: &DestOptions,
        governor: impl FnOnce() -> Result<Governor>,
    ) -> Result<Self> {
        Self::open_probed(&Probe::of(path)?, size, options, governor)
    }

    /// [`open`](Self::open) for a destination already examined.
    pub fn open_probed(
        probe: &Probe,
        size: u64,
        options: &DestOptions,
        governor: impl FnOnce() -> Result<Governor>,
    ) -> Result<Self> {
        let path = probe.path.as_path();
        let ctx = |e: Error| e.at_path(path);
        if let Some(max) = options.max_size {
            check_fits(size, max)?;
        }
        let kind = probe.kind;
        if options.in_place && kind == DestKind::RegularFile && (!probe.exists || probe.len < size) {
            let held = if probe.exists { format!("holds {} bytes", probe.len) } else { "does not exist".into() };
            return Err(ctx(Error::new(
                ErrorKind::TooSmall,
                format!("the image to update in place {held}, but the update covers {size} bytes"),
            )));
        }
        // O_EXCL on a block device refuses one that is mounted or otherwise claimed.
        let base_flags = match kind {
            DestKind::BlockDevice => libc::O_EXCL,
            DestKind::RegularFile => 0,
        };
        let mut open = OpenOptions::new();
        open.read(true).write(true).custom_flags(base_flags).mode(options.file_mode);
        if kind == DestKind::RegularFile {
            open.create(true);
        }
        let buffered = match open.open(path) {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && probe.exists => {
                let why = sys::immutable_flags(path).unwrap_or("not writable (Operation not permitted)");
                return Err(ctx(Error::new(ErrorKind::Io, format!("destination is {why}: nothing was written"))));
            }
            Err(e) => return Err(ctx(Error::io("opening destination", e))),
        };
        // A file this call creates goes again if opening fails past this point (a size the filesystem refuses):
        // a failed import that never wrote leaves nothing behind.
        let mut created = RemoveUnlessKept { path, armed: kind == DestKind::RegularFile && !probe.exists };
        if kind == DestKind::BlockDevice && sys::is_read_only_device(&buffered).unwrap_or(false) {
            return Err(ctx(Error::new(ErrorKind::Io, "destination block device is read-only: nothing was written")));
        }
        if kind == DestKind::RegularFile && !probe.exists {
            // The mode asked for, not the umask's version of it (CDI's disk.img is 0660).
            nix::sys::stat::fchmod(buffered.as_raw_fd(), nix::sys::stat::Mode::from_bits_truncate(options.file_mode))
                .map_err(|e| ctx(Error::io("setting the destination's mode", e.into())))?;
        }
        let capacity = match kind {
            DestKind::BlockDevice => {
                let capacity = sys::file_or_device_size(&buffered).io_context("reading device size").map_err(ctx)?;
                if capacity < size {
                    return Err(ctx(Error::new(
                        ErrorKind::TooSmall,
                        format!(
                            "device holds {capacity} bytes ({}) but the image needs {size} bytes ({})",
                            human(capacity),
                            human(size)
                        ),
                    )));
                }
                capacity
            }
            DestKind::RegularFile if options.keep_contents || options.in_place => size,
            DestKind::RegularFile => {
                // Truncate first so every old block becomes a hole, then extend to the image size.
                buffered.set_len(0).io_context("truncating destination").map_err(ctx)?;
                // A huge virtual size fails here (EFBIG past the filesystem's largest file): name the size.
                buffered
                    .set_len(size)
                    .io_context(format!("sizing destination to {size} bytes"))
                    .map_err(|e| ctx(e.at_offset(size)))?;
                if options.preallocate && size > 0 {
                    sys::fallocate(&buffered, 0, 0, size).io_context("preallocating destination").map_err(ctx)?;
                }
                size
            }
        };
        let direct = match options.io {
            IoChoice::Writebehind => Err("write-behind requested".to_string()),
            // A trial write would overwrite the first page of contents that must be kept.
            _ => open_direct(path, &buffered, kind, !(options.keep_contents || options.in_place)),
        };
        let (path_kind, io_reason, align) = match (direct, options.io) {
            (Ok((file, align, why)), _) => (WritePath::Direct { file, align }, why, align),
            (Err(why), IoChoice::Direct) => {
                return Err(ctx(Error::unsupported(format!("O_DIRECT is not possible here: {why}"))))
            }
            (Err(why), _) => (WritePath::WriteBehind(Box::new(WriteBehind::new(governor()?))), why, 1),
        };
        created.armed = false;
        Ok(Destination {
            path: path.to_path_buf(),
            kind,
            size: AtomicU64::new(size),
            capacity,
            max_size: options.max_size,
            block: align.max(MIN_BLOCK),
            buffered,
            path_kind,
            zeroer: match kind {
                _ if options.in_place && options.preallocate => Some(Zeroer::allocating()),
                _ if options.in_place => Some(Zeroer::default()),
                DestKind::BlockDevice if options.preallocate => Some(Zeroer::allocating()),
                DestKind::BlockDevice if !options.target_is_zero => Some(Zeroer::default()),
                _ => None,
            },
            grow_to: options.grow_to,
            preallocate: options.preallocate,
            io_reason,
            stats: DestStats::default(),
        })
    }

    /// Destination path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Block device or file.
    pub fn kind(&self) -> DestKind {
        self.kind
    }

    /// Bytes the image occupies on the destination.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Extends the image to `end` bytes (a raw stream whose length is known only at its end): a file grows
    /// (sparse), a block device must hold it. Writes up to the new size are then allowed.
    pub fn grow(&self, end: u64) -> Result<()> {
        if end <= self.size() {
            return Ok(());
        }
        if let Some(max) = self.max_size {
            check_fits(end, max).map_err(|e| e.at_path(&self.path))?;
        }
        match self.kind {
            DestKind::BlockDevice if end > self.capacity => {
                return Err(Error::new(
                    ErrorKind::TooSmall,
                    format!(
                        "device holds {} bytes ({}) but the image is already {end} bytes long",
                        self.capacity,
                        human(self.capacity)
                    ),
                )
                .at_path(&self.path))
            }
            DestKind::BlockDevice => {}
            DestKind::RegularFile => {
                self.buffered.set_len(end).io_context("extending destination").map_err(|e| e.at_path(&self.path))?
            }
        }
        self.size.store(end, Ordering::Release);
        Ok(())
    }

    /// Throws away what the import wrote (after a checksum mismatch): a file is cut to nothing and extended again,
    /// so it reads as zeros; the image range of a block device is zeroed.
    pub fn discard(&self) -> Result<()> {
        let size = self.size();
        let ctx = |e: Error| e.at_path(&self.path);
        match self.kind {
            DestKind::RegularFile => {
                self.buffered.set_len(0).io_context("discarding destination").map_err(ctx)?;
                self.buffered.set_len(size).io_context("discarding destination").map_err(ctx)?;
            }
            DestKind::BlockDevice => self.zero_any(0, size)?,
        }
        self.sync()
    }

    /// Zeroes the first and last MiB of a block device's image range (partition tables and their GPT backup,
    /// boot sectors, image headers), so a partial image is not taken for a disk; synced.
    pub fn scrub(&self) -> std::io::Result<()> {
        let size = self.size();
        let first = SCRUB_LEN.min(size);
        let mut ranges = vec![(0, first)];
        if size >= 2 * SCRUB_LEN {
            ranges.push((size - SCRUB_LEN, SCRUB_LEN));
        }
        for (offset, len) in ranges {
            self.zero_any(offset, len).map_err(std::io::Error::other)?;
        }
        self.sync().map_err(std::io::Error::other)
    }

    /// Zeroes `[offset, offset + len)` whatever its alignment: the aligned part through the zeroing path, an
    /// unaligned tail written.
    fn zero_any(&self, offset: u64, len: u64) -> Result<()> {
        let ctx = |e: Error| e.at_path(&self.path);
        let aligned = align_down(len, self.block);
        let direct = match &self.path_kind {
            WritePath::Direct { file, .. } => Some(file),
            WritePath::WriteBehind(_) => None,
        };
        Zeroer::default().zero(&self.buffered, direct, offset, aligned).map_err(ctx)?;
        if len > aligned {
            let zeros = AlignedBuf::new((len - aligned) as usize);
            self.write_tail(offset + aligned, &zeros[..(len - aligned) as usize]).map_err(ctx)?;
        }
        Ok(())
    }

    /// Cuts a file destination to nothing (a failed import leaves no file that looks complete).
    pub fn truncate(&self) -> std::io::Result<()> {
        self.buffered.set_len(0)
    }

    /// Whole size of the destination (a device may be larger than the image).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Alignment every write and zero range must keep (except the one ending at the image size), and the unit of
    /// zero detection.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Whether writes go through O_DIRECT.
    pub fn is_direct(&self) -> bool {
        matches!(self.path_kind, WritePath::Direct { .. })
    }

    /// Name of the write path, for logs and reports.
    pub fn io_name(&self) -> &'static str {
        match self.path_kind {
            WritePath::Direct { .. } => "direct",
            WritePath::WriteBehind(_) => "writebehind",
        }
    }

    /// How block-device zero ranges are being zeroed, for logs.
    pub fn zero_method(&self) -> &'static str {
        match &self.zeroer {
            Some(z) => z.method_name(),
            None if self.kind == DestKind::RegularFile => "holes",
            None => "skipped (target is zero)",
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        let end = offset.checked_add(len).filter(|&end| end <= size);
        let aligned = is_aligned(offset, self.block) && (is_aligned(len, self.block) || end == Some(size));
        match (end, aligned) {
            (Some(_), true) => Ok(()),
            _ => Err(Error::new(ErrorKind::Io, format!("refusing a {len}-byte write outside or misaligned"))
                .at_offset(offset)
                .at_path(&self.path)),
        }
    }

    /// Writes `data` at `offset`. `offset` is a multiple of [`block`](Self::block), and so is the length unless the
    /// write ends at the image size. `data` must start block-aligned in memory for the direct path.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        let result = match &self.path_kind {
            WritePath::Direct { file, align } => {
                let direct_len = align_down(len, *align) as usize;
                let (head, tail) = data.split_at(direct_len);
                file.write_all_at(head, offset)
                    .map_err(|e| Error::io("writing destination", e).at_offset(offset))
                    .and_then(|()| self.write_tail(offset + direct_len as u64, tail))
            }
            WritePath::WriteBehind(window) => window.write(&self.buffered, offset, data),
        };
        result.map_err(|e| e.at_path(&self.path))?;
        self.check_still_linked(offset)?;
        self.stats.written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Fails if the destination file has been unlinked (writes to a removed file succeed, and the import would
    /// report success for an image nobody can reach). One fstat per chunk; block devices are not checked here
    /// (a removed device fails its writes).
    fn check_still_linked(&self, offset: u64) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        if self.kind != DestKind::RegularFile {
            return Ok(());
        }
        let meta = self.buffered.metadata().io_context("checking destination").map_err(|e| e.at_path(&self.path))?;
        if meta.nlink() == 0 {
            return Err(Error::new(ErrorKind::Io, "destination file was removed during the import")
                .at_offset(offset)
                .at_path(&self.path));
        }
        Ok(())
    }

    /// Writes the unaligned end of the image through the page cache, synced and dropped at once: it is less than
    /// one block, so it cannot build up.
    fn write_tail(&self, offset: u64, tail: &[u8]) -> Result<()> {
        if tail.is_empty() {
            return Ok(());
        }
        let len = tail.len() as u64;
        self.buffered
            .write_all_at(tail, offset)
            .map_err(|e| Error::io("writing destination tail", e).at_offset(offset))?;
        sys::wait_writeback(&self.buffered, offset, len)
            .and_then(|()| sys::drop_cache(&self.buffered, offset, len))
            .map_err(|e| Error::io("flushing destination tail", e).at_offset(offset))
    }

    /// Makes `[offset, offset + len)` read as zeros: nothing for a fresh file or a known-zero device, a zeroing
    /// call on a block device. Same alignment rules as [`write`](Self::write).
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let Some(zeroer) = &self.zeroer else {
            self.check_still_linked(offset)?;
            self.stats.skipped.fetch_add(len, Ordering::Relaxed);
            return Ok(());
        };
        let direct = match &self.path_kind {
            WritePath::Direct { file, .. } => Some(file),
            WritePath::WriteBehind(_) => None,
        };
        let aligned = align_down(len, self.block);
        let result = zeroer.zero(&self.buffered, direct, offset, aligned).and_then(|()| {
            let tail = (len - aligned) as usize;
            if tail == 0 {
                return Ok(());
            }
            // Less than a block at the end of the image: write the zeros, and only those.
            let zeros = AlignedBuf::new(tail);
            self.write_tail(offset + aligned, &zeros[..tail])
        });
        result.map_err(|e| e.at_path(&self.path))?;
        self.stats.zeroed.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Makes everything written so far durable (fdatasync), without waiting for the write-behind window to drain.
    pub fn sync(&self) -> Result<()> {
        sys::fdatasync(&self.buffered).io_context("syncing destination").map_err(|e| e.at_path(&self.path))
    }

    /// Waits for everything written to be durable (fdatasync) and leaves no page cache behind.
    pub fn finish(&self) -> Result<Option<GovernorSummary>> {
        let summary = match &self.path_kind {
            WritePath::WriteBehind(window) => Some(window.finish(&self.buffered).map_err(|e| e.at_path(&self.path))?),
            WritePath::Direct { .. } => None,
        };
        if let (DestKind::RegularFile, Some(target)) = (self.kind, self.grow_to) {
            if target > self.size() {
                let ctx = |e: Error| e.at_path(&self.path);
                log::info!("{}: expanding image size to {target}", self.path.display());
                self.buffered.set_len(target).io_context("resizing the image").map_err(ctx)?;
                if self.preallocate {
                    // Mode 0 allocates the holes and keeps the data: qemu-img's preallocation=falloc.
                    sys::fallocate(&self.buffered, 0, 0, target).io_context("preallocating the image").map_err(ctx)?;
                }
            }
        }
        sys::fdatasync(&self.buffered).io_context("syncing destination").map_err(|e| e.at_path(&self.path))?;
        self.check_still_linked(self.size())?;
        // Zeroing and tail writes may have left clean pages of the device in the cache.
        let _ = sys::drop_cache(&self.buffered, 0, 0);
        Ok(summary)
    }
}

impl Destination {
    /// Writes a filled chunk at guest offset `guest` as runs: blocks that are all zeros become zero ranges
    /// (holes, or zeroing on a device), the rest is written as data.
    pub fn write_runs(&self, guest: u64, chunk: &[u8]) -> Result<()> {
        for_each_run(chunk, self.block() as usize, |start, end, zero| {
            let offset = guest + start as u64;
            if zero {
                self.zero(offset, (end - start) as u64)
            } else {
                self.write(offset, &chunk[start..end])
            }
        })
    }
}

/// Splits `chunk` into maximal runs of all-zero and data blocks of `block` bytes (the last may be shorter) and
/// calls `each(start, end, is_zero)` for every run, in order.
pub fn for_each_run(chunk: &[u8], block: usize, mut each: impl FnMut(usize, usize, bool) -> Result<()>) -> Result<()> {
    let mut run_start = 0;
    let mut run_is_zero = None;
    let mut at = 0;
    while at < chunk.len() {
        let end = (at + block).min(chunk.len());
        let zero = is_zero(&chunk[at..end]);
        if run_is_zero != Some(zero) {
            if let Some(was_zero) = run_is_zero {
                each(run_start, at, was_zero)?;
            }
            run_start = at;
            run_is_zero = Some(zero);
        }
        at = end;
    }
    match run_is_zero {
        Some(was_zero) => each(run_start, chunk.len(), was_zero),
        None => Ok(()),
    }
}

/// Whether every byte is zero. Compares 16-byte words, eight at a time, so the loop vectorises.
pub fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words.chunks(8).all(|group| group.iter().fold(0, |acc, &w| acc | w) == 0)
}

/// Refuses an image of `size` bytes where only `available` fit, in CDI's words: its controller turns "is larger
/// than the reported available" into "DataVolume too small to contain image".
pub fn check_fits(size: u64, available: u64) -> Result<()> {
    if size <= available {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::TooSmall,
        format!("virtual image size {size} is larger than the reported available storage {available}. A larger PVC is required"),
    ))
}

/// Opens an O_DIRECT handle and finds its alignment, or says why direct I/O is not possible. `trial`: a file
/// whose contents need not be kept may be probed with a trial write.
fn open_direct(
    path: &Path,
    buffered: &File,
    kind: DestKind,
    trial: bool,
) -> std::result::Result<(File, u64, String), String> {
    let file = match sys::reopen(buffered, libc::O_RDWR | libc::O_DIRECT) {
        Ok(file) => file,
        Err(e) => return Err(format!("opening with O_DIRECT failed ({e})")),
    };
    match kind {
        DestKind::BlockDevice => {
            let geometry = sys::block_geometry(&file).map_err(|e| format!("reading block size failed ({e})"))?;
            Ok((file, geometry.logical.max(512), format!("block device, logical block {} B", geometry.logical)))
        }
        DestKind::RegularFile => match sys::statx_dio_alignment(&file) {
            Ok(Some((0, _))) | Ok(Some((_, 0))) => Err("the filesystem does not support O_DIRECT".into()),
            Ok(Some((mem, offset))) if mem <= MIN_BLOCK && offset <= MIN_BLOCK => {
                Ok((file, offset.max(512), format!("filesystem direct-I/O alignment {offset} B")))
            }
            Ok(Some((mem, offset))) => Err(format!("direct-I/O alignment too large ({mem}/{offset} B)")),
            Err(_) | Ok(None) if trial => probe_direct_write(path, file, buffered),
            Err(_) | Ok(None) => Err("the filesystem does not report its direct-I/O alignment, and the file's \
                                      contents are kept, so no trial write can tell"
                .into()),
        },
    }
}

/// Where statx cannot tell, one trial write of a zero page at offset 0 of the fresh (all-hole) file decides; the
/// page is punched out again and the size restored, so the file stays as it was.
fn probe_direct_write(path: &Path, file: File, buffered: &File) -> std::result::Result<(File, u64, String), String> {
    let size = buffered.metadata().map_err(|e| format!("reading destination size failed ({e})"))?.len();
    let page = AlignedBuf::new(MIN_BLOCK as usize);
    let outcome = file.write_all_at(&page, 0);
    let _ = sys::fallocate(&file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, MIN_BLOCK);
    buffered.set_len(size).map_err(|e| format!("restoring destination size failed ({e})"))?;
    match outcome {
        Ok(()) => Ok((file, MIN_BLOCK, format!("trial O_DIRECT write to {} succeeded", path.display()))),
        Err(e) => Err(format!("trial O_DIRECT write failed ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_finds_any_set_byte() {
        let mut buf = AlignedBuf::new(1 << 16);
        assert!(is_zero(&buf));
        assert!(is_zero(&buf[3..1001]));
        for at in [0usize, 1, 15, 16, 127, 128, 4095, 65535] {
            buf[at] = 1;
            assert!(!is_zero(&buf), "{at}");
            assert!(!is_zero(&buf[at..]), "{at}");
            buf[at] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn runs_alternate_and_cover_the_chunk() {
        let mut chunk = vec![0u8; 10 * 4096 + 100];
        chunk[4096] = 1;
        chunk[3 * 4096 + 5] = 1;
        chunk[10 * 4096 + 99] = 1;
        let mut runs = Vec::new();
        for_each_run(&chunk, 4096, |start, end, zero| {
            runs.push((start, end, zero));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            runs,
            [
                (0, 4096, true),
                (4096, 8192, false),
                (8192, 12288, true),
                (12288, 16384, false),
                (16384, 40960, true),
                (40960, 41060, false)
            ]
        );
    }
}
