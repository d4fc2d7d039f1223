//! VMware vmdk images: monolithicSparse and streamOptimized (one sparse "KDMV" file), and monolithicFlat and
//! twoGbMaxExtent{Sparse,Flat} (a text descriptor naming extent files beside it).
//!
//! [`header`] parses sparse extent headers and footers, [`descriptor`] the text descriptor. A sparse extent maps
//! a guest grain through the grain directory (GD) and a grain table (GT): entry 0 is unallocated (zeros: images
//! with a parent are refused at open), entry 1 is a zero grain when the header's zero-grain flag is set, anything
//! else the sector of the grain. Compressed grains (streamOptimized) are zlib streams, after a 12-byte grain
//! marker (LBA, size) when the marker flag is set. GD entries and GTs are read on demand (one GT cached per
//! extent), so memory does not grow with the image.
//!
//! Like qemu: a compressed grain's input is bounded by two grains from its start (the marker's size field is
//! not needed: the codec ignores trailing input), and the last grain of an extent whose size is not a multiple of
//! the grain decompresses to just the part inside the extent (qemu writes it so) or to a whole grain (checked by
//! inflating it once).

pub mod descriptor;
pub mod header;
pub mod sparse_stream;
pub mod stream;

use super::{push_extent, BackingPolicy, Codec, Compressed, Content, Extent, Image, SourceId};
use crate::error::{Error, Result};
use crate::format::codec;
use crate::source::{read_exact_at, ReadAt};
use descriptor::{Descriptor, ExtentKind};
use header::SparseHeader;
use std::collections::HashMap;
use std::sync::Arc;

/// What backs one extent of guest space.
enum Part {
    /// Raw bytes in a source from a byte offset.
    Flat {
        /// Source holding them.
        source: SourceId,
        /// Byte offset of the extent's first byte in that source.
        offset: u64,
    },
    /// A sparse extent.
    Sparse(Box<Sparse>),
}

/// One extent, placed in guest space.
struct Piece {
    /// Guest offset of its first byte.
    start: u64,
    /// Length in bytes.
    len: u64,
    /// Its contents.
    part: Part,
}

/// A sparse extent and its lookup caches.
struct Sparse {
    /// Source holding the extent.
    source: SourceId,
    /// Its header (from the footer when the header defers to it).
    header: SparseHeader,
    /// The last GT read: GD index, file offset of the table, and its entries.
    gt: Option<(u64, u64, Vec<u32>)>,
    /// Decompressed length of the extent's partial last grain, once known.
    last_grain_len: Option<u64>,
}

/// An opened vmdk image.
pub struct VmdkImage {
    sources: Vec<Arc<dyn ReadAt>>,
    pieces: Vec<Piece>,
    size: u64,
}

impl VmdkImage {
    /// Opens a sparse extent or a descriptor. Extent files named by a descriptor are resolved against
    /// `backing.files` (beside the descriptor); without an opener (a non-local source) they are refused.
    pub fn open(source: Arc<dyn ReadAt>, backing: &BackingPolicy) -> Result<Self> {
        let name = source.name().to_string();
        let mut magic = [0u8; 4];
        let got = source.read_at(0, &mut magic)?;
        if got == 4 && &magic == header::MAGIC {
            let sparse = open_sparse(source.as_ref(), 0, true).map_err(|e| e.at_path(&name))?;
            let size = sparse.header.size();
            return Ok(VmdkImage {
                sources: vec![source],
                pieces: vec![Piece { start: 0, len: size, part: Part::Sparse(Box::new(sparse)) }],
                size,
            });
        }
        Self::open_descriptor(source, backing).map_err(|e| e.at_path(&name))
    }

    fn open_descriptor(source: Arc<dyn ReadAt>, backing: &BackingPolicy) -> Result<Self> {
        if source.len() > descriptor::MAX_DESCRIPTOR {
            return Err(Error::unsupported(format!(
                "vmdk descriptor file of {} bytes is larger than {} bytes",
                source.len(),
                descriptor::MAX_DESCRIPTOR
            )));
        }
        let mut text = vec![0u8; source.len() as usize];
        read_exact_at(source.as_ref(), 0, &mut text, "vmdk descriptor")?;
        let parsed = descriptor::parse(&String::from_utf8_lossy(&text), true)?;
        refuse_parent(&parsed)?;
        let Some(files) = &backing.files else {
            return Err(Error::unsupported(
                "vmdk descriptor names extent files, which are only opened beside a local descriptor file",
            ));
        };
        let mut sources = vec![source];
        let mut opened: HashMap<String, SourceId> = HashMap::new();
        let mut pieces = Vec::with_capacity(parsed.extents.len());
        let mut start = 0u64;
        for extent in &parsed.extents {
            let file = match &extent.kind {
                ExtentKind::Flat { file, .. } | ExtentKind::Sparse { file } => file,
            };
            descriptor::check_extent_name(file)?;
            let id = match opened.get(file) {
                Some(&id) => id,
                None => {
                    let named = files
                        .open(file)
                        .map_err(|why| Error::unsupported(format!("vmdk extent file {file:?}: {why}")))?;
                    sources.push(named.source);
                    opened.insert(file.clone(), sources.len() - 1);
                    sources.len() - 1
                }
            };
            let (len, part) = match &extent.kind {
                ExtentKind::Flat { offset, .. } => {
                    let offset = offset
                        .checked_mul(512)
                        .filter(|o| o.checked_add(extent.sectors * 512).is_some())
                        .ok_or_else(|| crate::bad_image!("vmdk flat extent offset of {offset} sectors is too large"))?;
                    (extent.sectors * 512, Part::Flat { source: id, offset })
                }
                ExtentKind::Sparse { .. } => {
                    let extent_source = sources[id].clone();
                    let sparse =
                        open_sparse(extent_source.as_ref(), id, false).map_err(|e| e.at_path(extent_source.name()))?;
                    // Like qemu, a sparse extent is as large as its header says, whatever the line says.
                    (sparse.header.size(), Part::Sparse(Box::new(sparse)))
                }
            };
            pieces.push(Piece { start, len, part });
            start = start
                .checked_add(len)
                .filter(|&end| end <= u64::MAX / 2)
                .ok_or_else(|| crate::bad_image!("vmdk extents add up to more than the largest disk"))?;
        }
        Ok(VmdkImage { sources, pieces, size: start })
    }
}

/// Refuses an image whose descriptor names a parent.
fn refuse_parent(parsed: &Descriptor) -> Result<()> {
    match &parsed.parent {
        Some(parent) => Err(Error::unsupported(format!(
            "vmdk image has a parent {parent:?} (parentFileNameHint); vmdk parents are not followed, \
             convert the image with its parent first"
        ))),
        None => Ok(()),
    }
}

/// Reads a sparse extent's header (from the footer when it defers to it) and, when `whole_image` says this file is
/// the whole image, refuses a parent named in its embedded descriptor.
fn open_sparse(source: &dyn ReadAt, id: SourceId, whole_image: bool) -> Result<Sparse> {
    let len = source.len();
    let mut sector = [0u8; 512];
    read_exact_at(source, 0, &mut sector, "vmdk header")?;
    let mut parsed = header::parse_sparse_header(&sector, len)?;
    if parsed.capacity == 0 && parsed.desc_offset != 0 && !whole_image {
        return Err(Error::unsupported("vmdk sparse extent holding only a descriptor is not supported"));
    }
    if whole_image && parsed.desc_offset != 0 && parsed.desc_size != 0 {
        let at = parsed.desc_offset.saturating_mul(512);
        let size = parsed.desc_size.saturating_mul(512).min(descriptor::MAX_DESCRIPTOR);
        let mut text = vec![0u8; size as usize];
        read_exact_at(source, at, &mut text, "vmdk embedded descriptor")?;
        let embedded = descriptor::parse(&String::from_utf8_lossy(&text), false).map_err(|e| e.at_offset(at))?;
        refuse_parent(&embedded)?;
        if parsed.capacity == 0 {
            return Err(Error::unsupported("vmdk sparse file holding only a descriptor is not supported"));
        }
    }
    if parsed.gd_at_end() {
        let footer_at = (len & !511).checked_sub(1536).filter(|&at| at >= 512).ok_or_else(|| {
            crate::bad_image!("vmdk header says the grain directory is in the footer, but the file is too short")
        })?;
        let mut tail = [0u8; 1536];
        read_exact_at(source, footer_at, &mut tail, "vmdk footer")?;
        let sector = header::footer_header(&tail).map_err(|e| e.at_offset(footer_at))?;
        parsed = header::parse_sparse_header(&sector, len).map_err(|e| e.within(footer_at + 512))?;
        if parsed.gd_at_end() {
            return Err(crate::bad_image!("vmdk footer defers the grain directory to itself").at_offset(footer_at));
        }
    }
    Ok(Sparse { source: id, header: parsed, gt: None, last_grain_len: None })
}

impl Sparse {
    /// The GT entry of the grain at extent byte `at`, and the file offset of that entry (for messages).
    fn grain_entry(&mut self, source: &dyn ReadAt, at: u64) -> Result<(u32, u64)> {
        let h = &self.header;
        let gd_index = at / h.gt_span();
        let gt_index = ((at % h.gt_span()) / h.grain_size()) as usize;
        if let Some((index, gt_at, gt)) = &self.gt {
            if *index == gd_index {
                return Ok((gt[gt_index], gt_at + gt_index as u64 * 4));
            }
        }
        let mut entry = [0u8; 4];
        let gd_entry_at = h.gd_offset * 512 + gd_index * 4;
        read_exact_at(source, gd_entry_at, &mut entry, "vmdk grain directory")?;
        let gt_sector = u32::from_le_bytes(entry) as u64;
        let mut gt = vec![0u32; h.gtes_per_gt as usize];
        if gt_sector != 0 {
            let mut raw = vec![0u8; gt.len() * 4];
            if gt_sector * 512 + raw.len() as u64 > source.len() {
                return Err(crate::bad_image!(
                    "vmdk grain directory entry {gd_index}: grain table at sector {gt_sector} ends past the end of \
                     the file ({} bytes)",
                    source.len()
                )
                .at_offset(gd_entry_at)
                .at_path(source.name()));
            }
            read_exact_at(source, gt_sector * 512, &mut raw, "vmdk grain table")?;
            for (slot, bytes) in gt.iter_mut().zip(raw.chunks_exact(4)) {
                *slot = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
            }
        }
        let value = gt[gt_index];
        self.gt = Some((gd_index, gt_sector * 512, gt));
        Ok((value, gt_sector * 512 + gt_index as u64 * 4))
    }

    /// Where a compressed grain's zlib stream starts and how many bytes of input it may use.
    fn compressed_input(&self, grain_at: u64) -> (u64, u64) {
        let grain = self.header.grain_size();
        if self.header.has_markers() {
            (grain_at + header::GRAIN_MARKER_LEN, 2 * grain - header::GRAIN_MARKER_LEN)
        } else {
            (grain_at, grain)
        }
    }

    /// The decompressed length of the grain starting at extent byte `start` stored at `grain_at`: a whole grain,
    /// except for a partial last grain, whose length is found by inflating it (once).
    fn unit_len(&mut self, source: &dyn ReadAt, start: u64, grain_at: u64) -> Result<u64> {
        let grain = self.header.grain_size();
        let inside = self.header.size() - start;
        if inside >= grain {
            return Ok(grain);
        }
        if let Some(len) = self.last_grain_len {
            return Ok(len);
        }
        let (offset, src_len) = self.compressed_input(grain_at);
        let mut input = vec![0u8; src_len as usize];
        let got = source.read_at(offset, &mut input)?;
        input.truncate(got);
        let mut output = vec![0u8; grain as usize];
        let len = [inside, grain]
            .into_iter()
            .find(|&len| codec::decompress(Codec::Zlib, &input, &mut output[..len as usize]).is_ok())
            .ok_or_else(|| {
                crate::bad_image!("vmdk last grain inflates to neither {inside} nor {grain} bytes")
                    .at_offset(grain_at)
                    .at_path(source.name())
            })?;
        self.last_grain_len = Some(len);
        Ok(len)
    }

    /// Appends extents for extent bytes `[offset, offset + len)`, placed at guest offset `guest`.
    fn map(&mut self, source: &dyn ReadAt, offset: u64, len: u64, guest: u64, out: &mut Vec<Extent>) -> Result<()> {
        let grain = self.header.grain_size();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let start = at - at % grain;
            let stop = (start + grain).min(end);
            let (entry, entry_at) = self.grain_entry(source, at)?;
            let content = if entry == 0 || (entry == header::GTE_ZERO && self.header.has_zero_grain()) {
                Content::Zero
            } else if entry as u64 * 512 >= source.len() {
                // Bytes past the end would read as zeros: a truncated file must not import as zeros.
                return Err(crate::bad_image!(
                    "vmdk grain table entry: grain at sector {entry} lies past the end of the file ({} bytes)",
                    source.len()
                )
                .at_offset(entry_at)
                .at_path(source.name()));
            } else if !self.header.compressed {
                Content::Data { source: self.source, offset: entry as u64 * 512 + (at - start) }
            } else {
                let grain_at = entry as u64 * 512;
                let unit_len = self.unit_len(source, start, grain_at)?;
                let (offset, src_len) = self.compressed_input(grain_at);
                Content::Compressed(Compressed {
                    source: self.source,
                    offset,
                    src_len,
                    unit_len,
                    skip: at - start,
                    codec: Codec::Zlib,
                })
            };
            push_extent(out, Extent { guest: guest + (at - offset), len: stop - at, content });
            at = stop;
        }
        Ok(())
    }
}

impl Image for VmdkImage {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
        self.sources.clone()
    }

    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset + len;
        let mut at = offset;
        let mut i = self.pieces.partition_point(|p| p.start + p.len <= offset);
        while at < end {
            let Some(piece) = self.pieces.get_mut(i) else {
                return Err(crate::bad_image!("vmdk guest offset {at} lies past the last extent"));
            };
            let stop = (piece.start + piece.len).min(end);
            let local = at - piece.start;
            match &mut piece.part {
                Part::Flat { source, offset } => {
                    // A flat extent is raw bytes: past its file's end it reads as zeros, as qemu's raw driver
                    // reads it (not a truncated image, which the pipeline refuses).
                    let from = *offset + local;
                    let data = self.sources[*source].len().saturating_sub(from).min(stop - at);
                    let content = Content::Data { source: *source, offset: from };
                    push_extent(out, Extent { guest: at, len: data, content });
                    push_extent(out, Extent { guest: at + data, len: stop - at - data, content: Content::Zero });
                }
                Part::Sparse(sparse) => {
                    let source = self.sources[sparse.source].clone();
                    sparse.map(source.as_ref(), local, stop - at, at, out)?;
                }
            }
            at = stop;
            i += 1;
        }
        Ok(())
    }
}
