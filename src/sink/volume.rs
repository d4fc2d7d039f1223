//! The volume an importer pod writes to, sized and finished the way CDI does it.
//!
//! - Block volume (`/dev/cdi-block-volume` exists): the raw image is written onto the device, which is never
//!   resized; the space available is the device size.
//! - Filesystem volume: the image goes to `/data/disk.img`. The space available is what statfs reports free for
//!   unprivileged users in the data directory, capped by the requested size; after the import the file grows (never
//!   shrinks) to the requested size less the filesystem overhead, rounded down to 1 MiB, and gets mode 0660.

use super::SCRUB_LEN;
use crate::error::{Error, IoContext, Result};
use crate::sys;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// CDI rounds usable sizes down to this (its `DefaultAlignBlockSize`), so qemu-img's rounding never overshoots.
pub const ALIGN: u64 = 1 << 20;

/// The name of the image file on a filesystem volume.
pub const DISK_IMAGE_NAME: &str = "disk.img";

/// Permission bits CDI gives the image file.
pub const FILE_MODE: u32 = 0o660;

/// The kind of volume mounted into the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    /// A raw block device.
    Block(PathBuf),
    /// A filesystem mounted at this data directory.
    Filesystem(PathBuf),
}

impl Volume {
    /// Block when `block_path` exists (it must then be a block device), else the filesystem at `data_dir`.
    pub fn detect(block_path: &Path, data_dir: &Path) -> Result<Volume> {
        match std::fs::metadata(block_path) {
            Ok(meta) if meta.file_type().is_block_device() => Ok(Volume::Block(block_path.to_path_buf())),
            Ok(_) => Err(Error::usage("exists but is not a block device").at_path(block_path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Volume::Filesystem(data_dir.to_path_buf())),
            Err(e) => Err(Error::io("checking for a block volume", e).at_path(block_path)),
        }
    }

    /// Where a disk image is written: the device, or `disk.img` in the data directory.
    pub fn image_path(&self) -> PathBuf {
        match self {
            Volume::Block(device) => device.clone(),
            Volume::Filesystem(dir) => dir.join(DISK_IMAGE_NAME),
        }
    }
}

/// Whether `path` is a block device (following links, as opening it would).
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Usable image size on a filesystem with `available` bytes free, CDI's `GetUsableSpace`: the overhead taken out
/// (`ceil(available / (1 + overhead))`) and the result rounded down to 1 MiB.
pub fn usable_space(overhead: f64, available: u64) -> u64 {
    let without_overhead = (available as f64 / (1.0 + overhead)).ceil();
    // `as` saturates: a result past u64::MAX (impossible for real sizes) stays at the maximum.
    let bytes = without_overhead as u64;
    bytes / ALIGN * ALIGN
}

/// Bytes free for unprivileged users on the filesystem holding `dir` (`statfs`: `f_bavail * f_bsize`, as CDI).
pub fn filesystem_available(dir: &Path) -> Result<u64> {
    let stat = nix::sys::statfs::statfs(dir)
        .map_err(|e| Error::io("reading free space", std::io::Error::from(e)).at_path(dir))?;
    Ok((stat.blocks_available() as u64).saturating_mul(stat.block_size() as u64))
}

/// Size in bytes of the block device at `path`.
pub fn device_size(path: &Path) -> Result<u64> {
    let file = File::open(path).io_context("opening block volume").map_err(|e| e.at_path(path))?;
    sys::file_or_device_size(&file).io_context("reading device size").map_err(|e| e.at_path(path))
}

/// The space an image may occupy, CDI's `calculateTargetSize`: the device size for a block volume; for a
/// filesystem the free space, capped by the requested size.
/// `kept` bytes of a filesystem are an earlier attempt's image this import may overwrite, and count as free.
pub fn available_space(volume: &Volume, requested: Option<u64>, kept: u64) -> Result<u64> {
    match volume {
        Volume::Block(device) => device_size(device),
        Volume::Filesystem(dir) => {
            let free = filesystem_available(dir)?.saturating_add(kept);
            Ok(requested.map_or(free, |r| r.min(free)))
        }
    }
}

/// Removes a stale image (a partial `disk.img` of an earlier attempt) so it neither counts against the free
/// space nor leaves old blocks behind. Devices are never removed.
pub fn remove_stale(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("checking for a stale image", e).at_path(path)),
    };
    let removed = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else if meta.file_type().is_block_device() || meta.file_type().is_char_device() {
        return Ok(());
    } else {
        std::fs::remove_file(path)
    };
    removed.io_context("removing a stale image").map_err(|e| e.at_path(path))?;
    log::info!("{}: removed a stale image", path.display());
    Ok(())
}

/// The size CDI gives `disk.img` once the image is in it, whatever the image's size: the requested size, capped
/// by the usable space (never below the image; the sink only grows).
pub fn file_size_target(requested: Option<u64>, available: u64, overhead: f64) -> Option<u64> {
    let requested = requested?;
    let target = requested.min(usable_space(overhead, available));
    if target < requested {
        log::warn!("available space less than requested size, resizing image to available space {target}");
    }
    Some(target)
}

/// Finishes an image file: grows it to `size` when given (never shrinking), allocates it whole when
/// `preallocate`, sets mode 0660 and makes it durable.
pub fn finish_file(path: &Path, size: Option<u64>, preallocate: bool) -> Result<()> {
    let ctx = |e: Error| e.at_path(path);
    let file = OpenOptions::new().write(true).open(path).io_context("opening the image").map_err(ctx)?;
    let current = file.metadata().io_context("reading the image size").map_err(ctx)?.len();
    let length = match size {
        Some(size) if size > current => {
            log::info!("{}: expanding image size to {size}", path.display());
            file.set_len(size).io_context("resizing the image").map_err(ctx)?;
            size
        }
        _ => current,
    };
    if preallocate && length > 0 {
        // Mode 0 allocates the holes and keeps the data: qemu-img's preallocation=falloc.
        sys::fallocate(&file, 0, 0, length).io_context("preallocating the image").map_err(ctx)?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .io_context("setting the image's permissions")
        .map_err(ctx)?;
    file.sync_all().io_context("syncing the image").map_err(ctx)
}

/// Makes a block device that holds a partial image read as no disk at all: its first and last MiB (partition
/// tables and their GPT backup, boot sectors, image headers) are zeroed with O_DIRECT and synced.
pub fn scrub_device(device: &Path) -> Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let ctx = |e: Error| e.at_path(device);
    let size = device_size(device)?;
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .io_context("opening the device to scrub it")
        .map_err(ctx)?;
    let len = SCRUB_LEN.min(size);
    let zeros = crate::buffer::AlignedBuf::new(len as usize);
    let mut offsets = vec![0];
    if size >= 2 * SCRUB_LEN {
        offsets.push(size - SCRUB_LEN);
    }
    for offset in offsets {
        file.write_all_at(&zeros[..len as usize], offset)
            .io_context("zeroing a partial image")
            .map_err(|e| ctx(e.at_offset(offset)))?;
    }
    file.sync_all().io_context("syncing the device").map_err(ctx)
}

/// Creates a blank raw image file of `size` bytes (replacing any file there), preallocated if asked, mode 0660,
/// durable.
pub fn create_blank_file(path: &Path, size: u64, preallocate: bool) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .io_context("creating a blank image")
        .map_err(|e| e.at_path(path))?;
    file.set_len(size).io_context("sizing a blank image").map_err(|e| e.at_path(path))?;
    drop(file);
    finish_file(path, None, preallocate)
}

/// Creates the blank `disk.img` of a filesystem volume at `dir`: the requested size, capped by the free space
/// (an earlier image removed first, so its blocks count as free), less the filesystem overhead, rounded down to
/// 1 MiB (CDI's `CreateBlankImage` sizing).
pub fn create_blank_image(dir: &Path, requested: u64, overhead: f64, preallocate: bool) -> Result<()> {
    let image = dir.join(DISK_IMAGE_NAME);
    remove_stale(&image)?;
    let available = filesystem_available(dir)?;
    let capped = requested.min(available);
    if capped < requested {
        log::warn!("available space less than requested size, creating blank image sized to available space: {capped}");
    }
    let size = usable_space(overhead, capped);
    log::info!("space adjusted for filesystem overhead: {size}");
    create_blank_file(&image, size, preallocate)
}

/// Makes everything under `dir` durable: one `syncfs` of its filesystem (the extracted files of an archive).
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let handle = File::open(dir).io_context("opening the data directory").map_err(|e| e.at_path(dir))?;
    // SAFETY: syncfs on a valid descriptor touches no memory of ours.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
        return Err(Error::io("syncing the data directory", std::io::Error::last_os_error()).at_path(dir));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn usable_space_matches_cdi() {
        // GetUsableSpace(0.055, 10Gi) = RoundDown(ceil(10737418240 / 1.055), 1Mi).
        assert_eq!(usable_space(0.055, 10 * GIB), 9706 * MIB);
        assert_eq!(usable_space(0.0, 10 * GIB), 10 * GIB);
        assert_eq!(usable_space(0.0, 10 * GIB + MIB - 1), 10 * GIB);
        assert_eq!(usable_space(0.0, MIB - 1), 0);
        assert_eq!(usable_space(0.1, 0), 0);
        for available in [123_456_789u64, 5 * GIB + 12345, 1 << 40] {
            let usable = usable_space(0.055, available);
            assert_eq!(usable % MIB, 0);
            assert!((usable as f64) * 1.055 <= available as f64 + 1.0, "{available}");
        }
    }

    #[test]
    fn resize_never_shrinks_and_respects_overhead() {
        // The sink grows the file to the target only when the target is larger than the image.
        let resize_target = |virtual_size: u64, requested, available, overhead| {
            file_size_target(requested, available, overhead).filter(|&target| target > virtual_size)
        };
        // Plenty of space: grow to the request less nothing (no overhead).
        assert_eq!(resize_target(GIB, Some(4 * GIB), 4 * GIB, 0.0), Some(4 * GIB));
        // Overhead: the usable part of the capped space.
        assert_eq!(resize_target(GIB, Some(10 * GIB), 10 * GIB, 0.055), Some(9706 * MIB));
        // Free space smaller than the request.
        assert_eq!(resize_target(GIB, Some(10 * GIB), 3 * GIB, 0.0), Some(3 * GIB));
        // Already as large, or larger: no resize.
        assert_eq!(resize_target(4 * GIB, Some(4 * GIB), 4 * GIB, 0.0), None);
        assert_eq!(resize_target(5 * GIB, Some(4 * GIB), 10 * GIB, 0.0), None);
        // No request: no resize.
        assert_eq!(resize_target(GIB, None, 10 * GIB, 0.0), None);
    }

    #[test]
    fn volume_detection_and_stale_removal() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let missing = dir.path().join("no-block");
        assert_eq!(Volume::detect(&missing, &data).unwrap(), Volume::Filesystem(data.clone()));
        let not_block = dir.path().join("file");
        std::fs::write(&not_block, b"x").unwrap();
        assert!(Volume::detect(&not_block, &data).is_err());
        assert_eq!(Volume::Filesystem(data.clone()).image_path(), data.join("disk.img"));

        let image = data.join("disk.img");
        std::fs::write(&image, b"old").unwrap();
        remove_stale(&image).unwrap();
        assert!(!image.exists());
        remove_stale(&image).unwrap();
    }

    #[test]
    fn finishing_grows_chmods_and_preallocates() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![7u8; 4096]).unwrap();
        finish_file(&image, Some(8 * MIB), false).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), 8 * MIB);
        assert_eq!(meta.mode() & 0o777, 0o660);
        finish_file(&image, Some(MIB), true).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), 8 * MIB, "never shrinks");
        assert!(meta.blocks() * 512 >= 8 * MIB, "preallocated: {} blocks", meta.blocks());
        assert_eq!(std::fs::read(&image).unwrap()[..4096], [7u8; 4096]);

        create_blank_file(&image, 3 * MIB, false).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!((meta.len(), meta.blocks()), (3 * MIB, 0));
    }
}
