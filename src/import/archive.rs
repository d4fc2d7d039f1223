//! The archive job: a tar stream (compressed or not) extracted into a filesystem volume's data directory, bounded
//! like an image import. Both CDI front ends run it (`IMPORTER_CONTENTTYPE=archive`, `/upload-archive`, and
//! `filesystem-clone` streams): the tap, the unwrapping, the stop, the pacing, the drain, the checksum and the
//! clean-up after a failure live here once.
//!
//! A failed extraction removes what this import created and nothing else: a volume's `lost+found/`, or anything
//! else that was there before, stays.

use super::extract::{self, Created, Extracted};
use super::Context;
use crate::budget::xz_memlimit;
use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::sink::paced::Pacing;
use crate::sink::volume::sync_filesystem;
use crate::source::decompress::unwrap_layers;
use crate::source::sequential::{HashingReader, StopReader, StreamTap};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// What to extract, and where.
pub struct Archive<'a> {
    /// Names the stream in messages (a URL, a path, "upload").
    pub name: &'a str,
    /// The data directory (the volume's mount point).
    pub dir: &'a Path,
    /// Expected checksum of the bytes as received, before decompression.
    pub checksum: Option<&'a Checksum>,
    /// The stream is a plain tar as it stands (a clone stream): no decompression is looked for.
    pub verbatim: bool,
}

/// Extracts the tar stream `reader` (`len` bytes as stored, when known) into `archive.dir`, advancing `progress`
/// by the bytes received. On success everything extracted is durable; on any failure (a bad member, a broken
/// stream, a checksum mismatch, a stop) what the import created is removed before the error is returned.
pub fn run_archive(
    ctx: &Context,
    archive: &Archive,
    reader: Box<dyn Read + Send>,
    len: Option<u64>,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Extracted> {
    let mut created = Created::before(archive.dir)?;
    let result = extract_verified(ctx, archive, reader, len, progress, stop, &mut created);
    if let Err(e) = &result {
        log::info!("{}: {e}; removing what this import extracted", archive.dir.display());
        created.remove(archive.dir);
    }
    result
}

/// [`run_archive`] without the clean-up: `created` notes what it makes.
fn extract_verified(
    ctx: &Context,
    archive: &Archive,
    reader: Box<dyn Read + Send>,
    len: Option<u64>,
    progress: &Progress,
    stop: &AtomicBool,
    created: &mut Created,
) -> Result<Extracted> {
    progress.set_total(len.unwrap_or(0));
    // The checksum and the progress follow the bytes as received, before any decompression.
    let tap = StreamTap::new(archive.checksum.map(|c| c.algorithm));
    let tapped: Box<dyn Read + Send> = Box::new(HashingReader::new(reader, tap.clone()));
    let stream = if archive.verbatim {
        tapped
    } else {
        let (stream, layers) = unwrap_layers(tapped, archive.name, xz_memlimit(ctx.budget.bytes))?;
        if !layers.is_empty() {
            let wrapped: Vec<String> = layers.iter().map(ToString::to_string).collect();
            log::info!("{}: {}-compressed archive", archive.name, wrapped.join(" in "));
        }
        Box::new(stream)
    };
    let mut reader = StopReader::new(stream, stop);
    let pacing = Pacing { cgroup: ctx.cgroup.clone(), targets: ctx.sizing.governor_targets() };
    let mut reported = 0u64;
    let extracted = extract::extract(&mut reader, archive.dir, &pacing, created, |_| {
        let position = tap.bytes();
        if position > reported {
            progress.advance(position - reported, position);
            reported = position;
        }
    })
    .and_then(|extracted| {
        // The checksum covers every byte received (the archive's end padding too), and a decompressor checks
        // its trailer.
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| Error::io("reading the archive's end", e))?;
        Ok(extracted)
    })
    .map_err(|e| Error::new(e.kind(), format!("unable to untar files from endpoint: {e}")))?;
    if let Some(expected) = archive.checksum {
        expected.verify(&tap.finish().unwrap_or_default(), archive.name)?;
    }
    log::info!("{extracted}");
    progress.note_written(extracted.bytes_written);
    sync_filesystem(archive.dir)?;
    Ok(extracted)
}
