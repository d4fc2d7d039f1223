//! Filling a buffer with guest bytes from a list of extents: the one place data is read from sources and
//! compressed units are inflated.

use crate::buffer::{align_down, align_up, AlignedBuf};
use crate::error::{Error, Result};
use crate::format::codec;
use crate::format::{Compressed, Content, Extent, Image, MAX_UNIT_LEN};
use crate::source::ReadAt;
use std::sync::Arc;

/// Largest span of compressed bytes ever fetched with one read: one unit's compressed bytes, which qcow2 bounds by
/// twice the 2 MiB maximum cluster size.
pub const COMPRESSED_READ_SPAN: usize = 4 << 20;

/// Largest gap between two compressed units that is read through rather than skipped.
const MAX_READ_THROUGH_GAP: u64 = 64 << 10;

/// Reusable memory for [`fill`]: the compressed input span and, for units only partly covered by a buffer, a
/// whole decompressed unit. Allocated on first use, so imports without compression never pay for it, and only as
/// large as needed.
pub struct Scratch {
    /// Compressed units stored back to back are fetched together, up to this many bytes per read.
    span: usize,
    input: Option<AlignedBuf>,
    unit: Vec<u8>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::with_span(COMPRESSED_READ_SPAN)
    }
}

impl Scratch {
    /// Scratch that batches compressed reads up to `span` bytes (a worker passes about its chunk size: a chunk's
    /// compressed units take less room than the chunk).
    pub fn with_span(span: usize) -> Self {
        Scratch { span: span.clamp(64 << 10, COMPRESSED_READ_SPAN), input: None, unit: Vec::new() }
    }

    /// Bytes currently held.
    pub fn footprint(&self) -> usize {
        self.input.as_ref().map_or(0, |b| b.capacity()) + self.unit.capacity()
    }
}

/// Fills `buf` with guest bytes `[guest, guest + buf.len())`, described by `extents` (which must cover exactly
/// that range, in order), reading from `sources`.
pub fn fill(
    sources: &[Arc<dyn ReadAt>],
    extents: &[Extent],
    guest: u64,
    buf: &mut [u8],
    scratch: &mut Scratch,
) -> Result<()> {
    let mut i = 0;
    while i < extents.len() {
        let extent = &extents[i];
        let at = (extent.guest - guest) as usize;
        let out = &mut buf[at..at + extent.len as usize];
        match extent.content {
            Content::Zero => {
                out.fill(0);
                i += 1;
            }
            Content::Data { source, offset } => {
                read_data(source_of(sources, source)?, offset, out)?;
                i += 1;
            }
            Content::Compressed(first) => {
                let run = compressed_run(&extents[i..], scratch.span);
                fill_compressed_run(sources, &extents[i..i + run], first, guest, buf, scratch)?;
                i += run;
            }
        }
    }
    Ok(())
}

fn source_of(sources: &[Arc<dyn ReadAt>], id: usize) -> Result<&dyn ReadAt> {
    sources.get(id).map(|s| s.as_ref()).ok_or_else(|| crate::bad_image!("extent names unknown source {id}"))
}

/// Reads verbatim data. Data the image places past the end of its file means the file was cut short (qemu-img
/// refuses it for vpc and vhdx, reads zeros for the rest): an error naming the file and the first missing offset,
/// never zeros; a read that stops short inside the source's length means the file shrank under us.
fn read_data(source: &dyn ReadAt, offset: u64, out: &mut [u8]) -> Result<()> {
    within_source(source, offset, out.len() as u64)?;
    let got = source.read_at(offset, out)?;
    if got < out.len() {
        return Err(Error::new(
            crate::error::ErrorKind::Io,
            format!("source ended after {} of {} bytes: was it truncated during the import?", got, out.len()),
        )
        .at_offset(offset + got as u64)
        .at_path(source.name()));
    }
    Ok(())
}

/// Refuses verbatim data `[offset, offset + len)` that does not lie wholly inside `source`: the image was cut
/// short. Checked where extents are planned (the scheduler's hole finder, before anything is written) and again
/// where they are read.
pub(crate) fn within_source(source: &dyn ReadAt, offset: u64, len: u64) -> Result<()> {
    let file_len = source.len();
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(crate::bad_image!(
            "image data lies past the end of the file ({file_len} bytes): the image is truncated"
        )
        .at_offset(offset.max(file_len))
        .at_path(source.name()));
    }
    Ok(())
}

/// How many extents from the start of `extents` are compressed units that can be fetched with one read of at
/// most `span` bytes (the first always counts).
fn compressed_run(extents: &[Extent], span: usize) -> usize {
    let Content::Compressed(first) = extents[0].content else {
        return 1;
    };
    let mut span_end = first.offset.saturating_add(first.src_len);
    let mut n = 1;
    for extent in &extents[1..] {
        let Content::Compressed(next) = extent.content else {
            break;
        };
        let next_end = next.offset.saturating_add(next.src_len);
        let fits = next.source == first.source
            && next.offset >= first.offset
            && next.offset <= span_end.saturating_add(MAX_READ_THROUGH_GAP)
            && next_end - first.offset <= span.saturating_sub(8192) as u64;
        if !fits {
            break;
        }
        span_end = span_end.max(next_end);
        n += 1;
    }
    n
}

fn fill_compressed_run(
    sources: &[Arc<dyn ReadAt>],
    run: &[Extent],
    first: Compressed,
    guest: u64,
    buf: &mut [u8],
    scratch: &mut Scratch,
) -> Result<()> {
    let source = source_of(sources, first.source)?;
    let span_end = run
        .iter()
        .filter_map(|e| match e.content {
            Content::Compressed(c) => Some(c.offset.saturating_add(c.src_len)),
            _ => None,
        })
        .max()
        .unwrap_or(first.offset);
    // Read an aligned superset so an O_DIRECT source reads straight into the scratch buffer.
    let align = source.direct_alignment().clamp(1, 4096);
    let read_start = align_down(first.offset, align);
    let read_len = (align_up(span_end, align) - read_start) as usize;
    if read_len > COMPRESSED_READ_SPAN {
        return Err(crate::bad_image!("compressed unit of {} bytes is too large", first.src_len)
            .at_offset(first.offset)
            .at_path(source.name()));
    }
    if scratch.input.as_ref().is_none_or(|b| b.capacity() < read_len) {
        scratch.input = Some(AlignedBuf::base_pages(read_len.max(scratch.span)));
    }
    let input = scratch.input.as_mut().expect("input buffer just sized");
    let got = source.read_at(read_start, &mut input[..read_len])?;
    for extent in run {
        let Content::Compressed(unit) = extent.content else { unreachable!("run holds compressed extents only") };
        if unit.unit_len > MAX_UNIT_LEN || unit.skip + extent.len > unit.unit_len {
            return Err(crate::bad_image!("compressed unit of {} bytes is out of range", unit.unit_len)
                .at_offset(unit.offset)
                .at_path(source.name()));
        }
        let from = (unit.offset - read_start) as usize;
        let to = (unit.offset.saturating_add(unit.src_len) - read_start).min(got as u64) as usize;
        if from >= to {
            return Err(crate::bad_image!("compressed data lies past the end of the file")
                .at_offset(unit.offset)
                .at_path(source.name()));
        }
        let at = (extent.guest - guest) as usize;
        let out = &mut buf[at..at + extent.len as usize];
        let whole = unit.skip == 0 && unit.unit_len == extent.len;
        let result = if whole {
            codec::decompress(unit.codec, &input[from..to], out)
        } else {
            scratch.unit.resize(unit.unit_len as usize, 0);
            codec::decompress(unit.codec, &input[from..to], &mut scratch.unit).map(|()| {
                let skip = unit.skip as usize;
                out.copy_from_slice(&scratch.unit[skip..skip + extent.len as usize]);
            })
        };
        result.map_err(|e| e.at_offset(unit.offset).at_path(source.name()))?;
    }
    Ok(())
}

/// Reads guest bytes `[offset, offset + buf.len())` of `image` into `buf`: the plain, unpipelined reader, for
/// tests, fuzzing and small reads.
pub fn read_guest(image: &mut dyn Image, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut extents = Vec::new();
    image.map(offset, buf.len() as u64, &mut extents)?;
    fill(&image.sources(), &extents, offset, buf, &mut Scratch::default())
}
