//! Image formats: turn a source into extents of guest (virtual disk) space.
//!
//! A format never touches a file descriptor: it reads its metadata through [`ReadAt`] and answers
//! [`Image::map`] with [`Extent`]s saying, for each guest range, whether it reads as zeros, is stored verbatim
//! somewhere in a source, or lies inside a compressed unit. The pipeline does the data I/O.

mod block_table;
pub mod codec;
pub mod detect;
pub mod qcow2;
pub mod raw;
pub mod stream;
pub(crate) mod table_stream;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use detect::{detect, Detected};

use crate::error::{Error, Result};
use crate::source::files::Opener;
use crate::source::ReadAt;
use std::sync::Arc;

/// Largest decompressed unit accepted (qcow2 clusters are at most 2 MiB); formats cap theirs below this too, and
/// the pipeline sizes its decompression scratch by it.
pub const MAX_UNIT_LEN: u64 = 8 << 20;

/// Index of a source in [`Image::sources`]: 0 is the image itself, higher ones its backing chain.
pub type SourceId = usize;

/// Decompression applied to a compressed unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Raw deflate (RFC 1951), as in qcow2's default compression.
    Deflate,
    /// zlib-wrapped deflate (RFC 1950), as in vmdk streamOptimized grains.
    Zlib,
    /// A zstd frame, as in qcow2 with compression_type=zstd.
    Zstd,
}

/// A compressed unit (a qcow2 compressed cluster, a vmdk grain) and the part of it an extent covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    /// Source holding the compressed bytes.
    pub source: SourceId,
    /// Offset of the compressed bytes in the source.
    pub offset: u64,
    /// Number of compressed bytes to read (may run past the end of the source; the read is then short).
    pub src_len: u64,
    /// Size the unit decompresses to.
    pub unit_len: u64,
    /// Offset inside the decompressed unit at which this extent starts.
    pub skip: u64,
    /// How the unit is compressed.
    pub codec: Codec,
}

/// Where the bytes of a guest range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The range reads as zeros.
    Zero,
    /// The range is stored verbatim at `offset` in `source`.
    Data {
        /// Source holding the bytes.
        source: SourceId,
        /// Offset of the first byte in that source.
        offset: u64,
    },
    /// The range is part of a compressed unit.
    Compressed(Compressed),
}

/// A run of guest space with one kind of content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub guest: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Where the bytes come from.
    pub content: Content,
}

impl Extent {
    /// Guest offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.guest + self.len
    }

    /// The part of this extent inside guest `[start, end)`, which must overlap it.
    pub fn clip(&self, start: u64, end: u64) -> Extent {
        let from = start.max(self.guest);
        let to = end.min(self.end());
        let shift = from - self.guest;
        let content = match self.content {
            Content::Zero => Content::Zero,
            Content::Data { source, offset } => Content::Data { source, offset: offset + shift },
            Content::Compressed(unit) => Content::Compressed(Compressed { skip: unit.skip + shift, ..unit }),
        };
        Extent { guest: from, len: to - from, content }
    }
}

/// Appends `extent` to `out`, merging it into the previous one when both are zeros or both are contiguous
/// verbatim data from the same source.
pub fn push_extent(out: &mut Vec<Extent>, extent: Extent) {
    if extent.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end() == extent.guest {
            match (&last.content, &extent.content) {
                (Content::Zero, Content::Zero) => {
                    last.len += extent.len;
                    return;
                }
                (Content::Data { source: a, offset: o }, Content::Data { source: b, offset: p })
                    if a == b && o + last.len == *p =>
                {
                    last.len += extent.len;
                    return;
                }
                _ => {}
            }
        }
    }
    out.push(extent);
}

/// An opened disk image.
pub trait Image: Send {
    /// Format name for logs ("qcow2", "raw").
    fn format_name(&self) -> &'static str;

    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// The sources extents refer to, indexed by [`SourceId`].
    fn sources(&self) -> Vec<Arc<dyn ReadAt>>;

    /// Appends to `out` extents that exactly cover guest `[offset, offset + len)`, in guest order. The range lies
    /// within the virtual size. May read metadata from the sources.
    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()>;
}

/// How files an image names (backing files, vmdk extent files) may be followed.
///
/// Format code opens nothing itself: names go to `files`, the opener the caller hands in (for a local image,
/// [`crate::source::files::LocalFiles`], which keeps the chain inside the image's directory unless told
/// otherwise). Without an opener (an image read over HTTP) such names are refused.
#[derive(Clone, Default)]
pub struct BackingPolicy {
    /// Whether backing files may be read at all (vmdk extent files are part of the image and always opened).
    pub allow: bool,
    /// Opens names written in the image, relative to its directory.
    pub files: Option<Arc<dyn Opener>>,
    /// Read the image's backing file as this disk instead of opening the one it names.
    pub rebase: Option<Rebase>,
}

impl std::fmt::Debug for BackingPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackingPolicy")
            .field("allow", &self.allow)
            .field("files", &self.files.is_some())
            .field("rebase", &self.rebase.as_ref().map(|r| r.disk.name().to_string()))
            .finish()
    }
}

/// What `qemu-img rebase -u -F raw -b DISK` does to an image: its backing file is read as the raw `disk`, whatever
/// file it names (a warm migration's delta applied to the volume that holds its backing). The image must have a
/// backing file, and `accept` must accept the name it records, before anything else is read.
#[derive(Clone)]
pub struct Rebase {
    /// The disk read in place of the backing file.
    pub disk: Arc<dyn ReadAt>,
    /// Says why the backing name the image records is not the one `disk` holds.
    pub accept: AcceptBacking,
}

/// Says why a backing file name is not the one expected (the text of the refusal).
pub type AcceptBacking = Arc<dyn Fn(&str) -> std::result::Result<(), String> + Send + Sync>;

/// Longest backing chain followed; deeper chains are refused rather than recursed into.
pub const MAX_BACKING_DEPTH: usize = 16;

/// Opens the image stored in `source`, detecting its format from the header.
pub fn open(source: Arc<dyn ReadAt>, backing: &BackingPolicy) -> Result<Box<dyn Image>> {
    open_at_depth(source, backing, 0)
}

fn open_at_depth(source: Arc<dyn ReadAt>, backing: &BackingPolicy, depth: usize) -> Result<Box<dyn Image>> {
    let detected = detect(source.as_ref())?;
    if backing.rebase.is_some() && detected != Detected::Qcow2 {
        let what = match detected {
            Detected::Unsupported(what) => what.to_string(),
            _ => format!("a {} image", format!("{detected:?}").to_lowercase()),
        };
        return Err(Error::unsupported(format!("a delta must be a qcow2 image with a backing file, not {what}"))
            .at_path(source.name()));
    }
    match detected {
        Detected::Raw => Ok(Box::new(raw::RawImage::new(source))),
        Detected::Qcow2 => {
            let image = qcow2::Qcow2Image::open(source, backing, depth)?;
            if let (Some(rebase), None) = (&backing.rebase, &image.header().backing) {
                // Nothing to rebase: the accepting side says what it expected.
                (rebase.accept)("").map_err(|why| Error::unsupported(why).at_path(image.sources()[0].name()))?;
            }
            Ok(Box::new(image))
        }
        Detected::Vhd => Ok(Box::new(vhd::VhdImage::open(source)?)),
        Detected::Vdi => Ok(Box::new(vdi::VdiImage::open(source)?)),
        Detected::Vhdx => Ok(Box::new(vhdx::VhdxImage::open(source)?)),
        Detected::Vmdk => Ok(Box::new(vmdk::VmdkImage::open(source, backing)?)),
        Detected::Unsupported(what) => {
            Err(Error::unsupported(format!("unsupported image format: {what}")).at_path(source.name()))
        }
    }
}

/// Opens a backing file named inside an image, applying `policy`. `format_hint` is the format the image names
/// for it ("raw", "qcow2"), if any; `name_offset` is where the image stores the name (named in refusals).
pub fn open_backing(
    image_name: &str,
    backing_name: &str,
    format_hint: Option<&str>,
    name_offset: u64,
    policy: &BackingPolicy,
    depth: usize,
) -> Result<Box<dyn Image>> {
    let refuse = |why: &str| {
        Error::unsupported(format!("image has a backing file {backing_name:?}{why}"))
            .at_offset(name_offset)
            .at_path(image_name)
    };
    if let Some(rebase) = &policy.rebase {
        (rebase.accept)(backing_name)
            .map_err(|why| Error::unsupported(why).at_offset(name_offset).at_path(image_name))?;
        log::info!("{image_name}: backing file {backing_name:?} read as {}", rebase.disk.name());
        return Ok(Box::new(raw::RawImage::new(rebase.disk.clone())));
    }
    if !policy.allow {
        return Err(refuse(" (pass --allow-backing to read it)"));
    }
    if depth + 1 >= MAX_BACKING_DEPTH {
        return Err(refuse(&format!(": backing chain deeper than {MAX_BACKING_DEPTH}")));
    }
    let Some(files) = &policy.files else {
        return Err(refuse(": backing files are only followed for local images"));
    };
    let named = files.open(backing_name).map_err(|why| refuse(&format!(": {why}")))?;
    let child_policy = BackingPolicy { allow: true, files: Some(named.opener), rebase: None };
    let image = open_at_depth(named.source, &child_policy, depth + 1)?;
    if let Some(hint) = format_hint {
        if hint != image.format_name() {
            return Err(refuse(&format!(": named as {hint} but its header says {}", image.format_name())));
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(guest: u64, len: u64, offset: u64) -> Extent {
        Extent { guest, len, content: Content::Data { source: 0, offset } }
    }

    #[test]
    fn adjacent_extents_merge_only_when_contiguous() {
        let mut out = Vec::new();
        push_extent(&mut out, data(0, 10, 100));
        push_extent(&mut out, data(10, 10, 110));
        push_extent(&mut out, data(20, 10, 500));
        push_extent(&mut out, Extent { guest: 30, len: 5, content: Content::Zero });
        push_extent(&mut out, Extent { guest: 35, len: 5, content: Content::Zero });
        push_extent(&mut out, Extent { guest: 40, len: 0, content: Content::Zero });
        assert_eq!(
            out,
            vec![data(0, 20, 100), data(20, 10, 500), Extent { guest: 30, len: 10, content: Content::Zero }]
        );
    }

    #[test]
    fn clipping_shifts_source_offsets() {
        assert_eq!(data(100, 50, 1000).clip(120, 400), data(120, 30, 1020));
        let unit = Compressed { source: 0, offset: 7, src_len: 9, unit_len: 64, skip: 0, codec: Codec::Zstd };
        let whole = Extent { guest: 0, len: 64, content: Content::Compressed(unit) };
        let part = whole.clip(16, 32);
        assert_eq!(part.guest, 16);
        assert_eq!(part.len, 16);
        assert_eq!(part.content, Content::Compressed(Compressed { skip: 16, ..unit }));
    }
}
