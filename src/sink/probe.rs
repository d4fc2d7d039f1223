//! The destination examined once, before anything is opened for writing: what it is, how large, how much of an
//! image it already holds (resuming), and reading back what an interrupted run left there.

use super::DestKind;
use crate::buffer::AlignedBuf;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::sys;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What a destination path is now.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The path.
    pub path: PathBuf,
    /// Block device or regular file (a path that does not exist yet will be a regular file).
    pub kind: DestKind,
    /// Whether it exists already.
    pub exists: bool,
    /// A block device's size, or an existing file's length.
    pub len: u64,
    /// What it is on disk, to tell it apart from the source.
    identity: Option<Identity>,
}

/// Which file or device a path is, whatever name or link reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    /// A regular file: device and inode.
    File(u64, u64),
    /// A block device: its device number.
    Device(u64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Identity {
        if meta.file_type().is_block_device() {
            Identity::Device(meta.rdev())
        } else {
            Identity::File(meta.dev(), meta.ino())
        }
    }

    /// For a loop device, the file behind it (sysfs names it).
    fn backing_file(self) -> Option<Identity> {
        let Identity::Device(rdev) = self else { return None };
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let name = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file")).ok()?;
        let meta = std::fs::metadata(name.trim_end_matches('\n')).ok()?;
        Some(Identity::of(&meta))
    }

    /// Whether writing `self` would overwrite `other`: the same file or device, or a loop device over it.
    fn overlaps(self, other: Identity) -> bool {
        self == other || self.backing_file() == Some(other) || other.backing_file() == Some(self)
    }
}

impl Probe {
    /// Examines `path`; anything but a block device, a regular file or nothing is refused.
    pub fn of(path: &Path) -> Result<Probe> {
        let missing =
            Probe { path: path.to_path_buf(), kind: DestKind::RegularFile, exists: false, len: 0, identity: None };
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(missing),
            Err(e) => return Err(Error::io("examining destination", e).at_path(path)),
        };
        let kind = if meta.file_type().is_block_device() {
            DestKind::BlockDevice
        } else if meta.is_file() {
            DestKind::RegularFile
        } else if meta.is_dir() {
            return Err(Error::new(ErrorKind::Io, "destination is a directory").at_path(path));
        } else {
            return Err(Error::usage("destination is neither a block device nor a regular file").at_path(path));
        };
        let len = match kind {
            DestKind::RegularFile => meta.len(),
            DestKind::BlockDevice => {
                let device = File::open(path).io_context("opening destination").map_err(|e| e.at_path(path))?;
                sys::file_or_device_size(&device).io_context("reading device size").map_err(|e| e.at_path(path))?
            }
        };
        Ok(Probe { path: path.to_path_buf(), kind, exists: true, len, identity: Some(Identity::of(&meta)) })
    }

    /// Refuses a destination that is the file or device at `source` (through any link or name, or a loop device
    /// over it, either way round): writing it would destroy the image being read.
    pub fn refuse_source(&self, source: &Path) -> Result<()> {
        let (Some(dest), Ok(meta)) = (self.identity, std::fs::metadata(source)) else {
            return Ok(());
        };
        if dest.overlaps(Identity::of(&meta)) {
            return Err(Error::usage(format!(
                "destination is the source {} (or a device over it): refusing to overwrite the image being read",
                source.display()
            ))
            .at_path(&self.path));
        }
        Ok(())
    }

    /// How many bytes of an image of `virtual_size` bytes a resumable destination can hold already: a file's
    /// length, or the image size for a device big enough for it.
    pub fn holds(&self, virtual_size: u64) -> Option<u64> {
        match (self.exists, self.kind) {
            (false, _) => None,
            (true, DestKind::RegularFile) => Some(self.len),
            (true, DestKind::BlockDevice) => (self.len >= virtual_size).then_some(virtual_size),
        }
    }
}

/// Reads back the first `len` bytes of the destination at `path` in order, without leaving page cache, handing
/// each piece to `each` (a resumed import's output digest covers what the interrupted run wrote).
pub fn read_back(path: &Path, len: u64, mut each: impl FnMut(&[u8])) -> Result<()> {
    let ctx = |e: Error| e.at_path(path);
    let file = File::open(path).io_context("reading back the destination").map_err(ctx)?;
    let mut buffer = AlignedBuf::new(4 << 20);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buffer.capacity() as u64) as usize;
        file.read_exact_at(&mut buffer[..n], at)
            .map_err(|e| Error::io("reading back the destination", e).at_offset(at))
            .map_err(ctx)?;
        let _ = sys::drop_cache(&file, at, n as u64);
        each(&buffer[..n]);
        at += n as u64;
    }
    Ok(())
}
