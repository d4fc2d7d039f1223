//! qcow2, versions 2 and 3: standard and extended L2 entries, zlib and zstd compressed clusters, backing chains.
//!
//! Stages, one file each: [`header`] parses and validates the first cluster, [`table`] decodes L1/L2 entries, and
//! this file walks the tables to answer [`Image::map`].
//!
//! Memory stays small and independent of the image: the L1 table is read lazily in windows of
//! [`L1_WINDOW_ENTRIES`] entries (32 KiB), and L2 tables in slices of at most [`L2_SLICE_BYTES`], of which
//! [`L2_CACHE_SLICES`] are cached (256 KiB at most), like qemu's L2 slices. `map` is called in guest order by the
//! pipeline, so one window and a few slices serve long runs of requests.
//!
//! Refcounts, snapshots and bitmaps are never read: they do not change what the active guest disk contains.

/// Header parsing and validation.
pub mod header;
pub mod stream;
/// L1/L2 entry decoding.
pub mod table;

use super::{open_backing, push_extent, BackingPolicy, Compressed, Content, Extent, Image};
use crate::error::{Error, Result};
use crate::source::{read_exact_at, ReadAt};
use header::Header;
use std::ops::Range;
use std::sync::Arc;
use table::{decode_l1, decode_l2, subcluster_state, Cluster, Layout, Subcluster, SUBCLUSTERS};

/// L1 entries read at once (32 KiB); a 64 KiB-cluster image needs one window per 2 TiB of guest space.
pub const L1_WINDOW_ENTRIES: u64 = 4096;

/// Largest piece of an L2 table read at once; smaller clusters read their whole table.
pub const L2_SLICE_BYTES: u64 = 64 << 10;

/// L2 slices kept in the cache.
pub const L2_CACHE_SLICES: usize = 4;

/// An opened qcow2 image.
pub struct Qcow2Image {
    /// The image file.
    source: Arc<dyn ReadAt>,
    /// The validated header.
    header: Header,
    /// Geometry for decoding table entries.
    layout: Layout,
    /// Length of the image file, against which offsets are checked.
    file_len: u64,
    /// Guest disk size (the header's, in whole sectors).
    virtual_size: u64,
    /// The part of the L1 table last read.
    l1: L1Window,
    /// Recently used L2 slices.
    l2: L2Cache,
    /// The backing image, when the image has one and the policy allowed opening it.
    backing: Option<Backing>,
}

/// The opened backing image and what reading from it needs.
struct Backing {
    /// The opened backing image (itself possibly with a backing chain).
    image: Box<dyn Image>,
    /// Its virtual size: guest offsets past it read as zeros.
    virtual_size: u64,
    /// Reused buffer for its extents before their sources are shifted.
    scratch: Vec<Extent>,
}

/// A window of the L1 table: entries `[first, first + entries.len())`.
#[derive(Default)]
struct L1Window {
    /// Index of the first entry held.
    first: u64,
    /// The entries, decoded from big-endian.
    entries: Vec<u64>,
    /// Reused read buffer.
    bytes: Vec<u8>,
}

/// Recently read L2 slices, least recently used evicted first.
struct L2Cache {
    /// Size of a slice: the cluster size, at most [`L2_SLICE_BYTES`].
    slice_bytes: u64,
    /// Cached slices, at most [`L2_CACHE_SLICES`].
    slices: Vec<L2Slice>,
    /// Lookup counter, for least-recently-used eviction.
    clock: u64,
    /// Reused read buffer.
    bytes: Vec<u8>,
}

/// One slice of an L2 table, as big-endian words decoded.
struct L2Slice {
    /// File offset of the slice.
    offset: u64,
    /// Its 64-bit words, decoded from big-endian.
    words: Vec<u64>,
    /// Value of the clock at its last use.
    used: u64,
}

/// Where an L2 entry lives, for error messages.
#[derive(Debug, Clone, Copy)]
struct EntryAt {
    /// Guest offset of the cluster the entry maps.
    guest: u64,
    /// File offset of the L2 table.
    l2_table: u64,
    /// Index of the entry in the table.
    index: u64,
    /// File offset of the entry itself.
    file_offset: u64,
}

impl Qcow2Image {
    /// Parses the header, opens the backing file if the image has one and `backing` allows it, and prepares to map
    /// guest ranges. `depth` is this image's depth in a backing chain (0 for the top image).
    pub fn open(source: Arc<dyn ReadAt>, backing: &BackingPolicy, depth: usize) -> Result<Self> {
        let name = source.name().to_string();
        let file_len = source.len();
        let mut head = [0u8; 512];
        let got = source.read_at(0, &mut head)?;
        let cluster_size = header::peek_cluster_size(&head[..got]).map_err(|e| e.at_path(&name))?;
        // The header, its extensions and the backing name all lie in the first cluster (at most 2 MiB); bytes
        // past the end of a short file read as zeros, as in qemu.
        let mut first = vec![0u8; cluster_size as usize];
        let want = cluster_size.min(file_len) as usize;
        read_exact_at(source.as_ref(), 0, &mut first[..want], "qcow2 header")?;
        let header = header::parse(&first, file_len).map_err(|e| e.at_path(&name))?;
        drop(first);

        if header.is_corrupt() {
            // qemu refuses only to write such images; qemu-img convert reads them.
            log::warn!(
                "{name}: the image is marked corrupt (incompatible feature bit 1); reading it anyway, as qemu-img does"
            );
        }
        let backing = match &header.backing {
            None => None,
            Some(file) => {
                let image = open_backing(&name, &file.name, file.format.as_deref(), file.offset, backing, depth)?;
                Some(Backing { virtual_size: image.virtual_size(), image, scratch: Vec::new() })
            }
        };
        let layout =
            Layout { cluster_bits: header.cluster_bits, extended_l2: header.extended_l2, version: header.version };
        Ok(Qcow2Image {
            l2: L2Cache {
                slice_bytes: L2_SLICE_BYTES.min(header.cluster_size()),
                slices: Vec::new(),
                clock: 0,
                bytes: Vec::new(),
            },
            virtual_size: header.virtual_size(),
            source,
            header,
            layout,
            file_len,
            l1: L1Window::default(),
            backing,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file's name, for messages.
    fn name(&self) -> &str {
        self.source.name()
    }

    /// The L2 table offset for L1 entry `index` (`None`: unallocated), validated against the file's layout.
    fn l2_table(&mut self, index: u64) -> Result<Option<u64>> {
        let l1_offset = self.header.l1_table_offset;
        let l1_size = u64::from(self.header.l1_size);
        let window = &mut self.l1;
        if index < window.first || index - window.first >= window.entries.len() as u64 {
            // `index` < entries needed <= l1_size, and the header check put the whole table inside the file.
            let first = index - index % L1_WINDOW_ENTRIES;
            let count = L1_WINDOW_ENTRIES.min(l1_size - first);
            window.bytes.resize(count as usize * 8, 0);
            window.entries.clear();
            read_exact_at(self.source.as_ref(), l1_offset + first * 8, &mut window.bytes, "L1 table")?;
            window
                .entries
                .extend(window.bytes.chunks_exact(8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))));
            window.first = first;
        }
        let entry = window.entries[(index - window.first) as usize];
        let at = l1_offset + index * 8;
        let bad = |why: String| crate::bad_image!("L1 entry {index}: {why}").at_offset(at).at_path(self.source.name());
        let Some(l2) = decode_l1(entry, &self.layout).map_err(bad)? else {
            return Ok(None);
        };
        // Aligned and non-zero, so past the header cluster.
        let cluster_size = self.layout.cluster_size();
        table::check_l2_clear_of_l1(l2, &self.layout, l1_offset, l1_size).map_err(bad)?;
        if l2 + cluster_size > self.file_len {
            return Err(bad(format!("L2 table at {l2:#x} lies past the end of the file ({} bytes)", self.file_len)));
        }
        Ok(Some(l2))
    }

    /// Entry `index` of the L2 table at `l2_table`: the descriptor and, with extended L2, the subcluster bitmap.
    fn l2_entry(&mut self, l2_table: u64, index: u64) -> Result<(u64, u64)> {
        let entry_size = if self.layout.extended_l2 { 16 } else { 8 };
        let byte = index * entry_size;
        let cache = &mut self.l2;
        let slice_offset = l2_table + byte - byte % cache.slice_bytes;
        cache.clock += 1;
        let slot = match cache.slices.iter().position(|s| s.offset == slice_offset) {
            Some(slot) => slot,
            None => {
                cache.bytes.resize(cache.slice_bytes as usize, 0);
                read_exact_at(self.source.as_ref(), slice_offset, &mut cache.bytes, "L2 table")?;
                let slot = if cache.slices.len() < L2_CACHE_SLICES {
                    cache.slices.push(L2Slice { offset: slice_offset, words: Vec::new(), used: 0 });
                    cache.slices.len() - 1
                } else {
                    let (slot, _) = cache.slices.iter().enumerate().min_by_key(|(_, s)| s.used).expect("cache is full");
                    slot
                };
                let slice = &mut cache.slices[slot];
                slice.offset = slice_offset;
                slice.words.clear();
                slice
                    .words
                    .extend(cache.bytes.chunks_exact(8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))));
                slot
            }
        };
        let slice = &mut cache.slices[slot];
        slice.used = cache.clock;
        let word = ((byte % cache.slice_bytes) / 8) as usize;
        let bitmap = if self.layout.extended_l2 { slice.words[word + 1] } else { 0 };
        Ok((slice.words[word], bitmap))
    }

    /// An error about the L2 entry at `at`.
    fn bad_entry(&self, at: EntryAt, why: impl std::fmt::Display) -> Error {
        crate::bad_image!(
            "L2 entry {} of the table at {:#x} (guest offset {:#x}): {why}",
            at.index,
            at.l2_table,
            at.guest
        )
        .at_offset(at.file_offset)
        .at_path(self.name())
    }

    /// Refuses a host offset at or past the end of the file (a cluster may end past it: the tail reads as zeros).
    fn check_in_file(&self, at: EntryAt, host: u64, what: &str) -> Result<()> {
        if host >= self.file_len {
            return Err(self.bad_entry(
                at,
                format!("{what} at {host:#x} lies past the end of the file ({} bytes)", self.file_len),
            ));
        }
        Ok(())
    }

    /// Emits guest `[from, to)`, which lies in the cluster starting at `cluster_start`, as `cluster` says.
    fn emit_cluster(
        &mut self,
        cluster: Cluster,
        at: EntryAt,
        cluster_start: u64,
        span: Range<u64>,
        pending: &mut Option<Range<u64>>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let (from, to) = (span.start, span.end);
        match cluster {
            Cluster::Unallocated => self.unallocated(from..to, pending, out),
            Cluster::Zero => self.emit(zero(from, to), pending, out),
            Cluster::Data(host) => {
                self.check_in_file(at, host, "cluster")?;
                self.emit(data(from, to, host + (from - cluster_start)), pending, out)
            }
            Cluster::Compressed { offset, len } => {
                self.check_in_file(at, offset, "compressed cluster")?;
                let unit = Compressed {
                    source: 0,
                    offset,
                    src_len: len,
                    unit_len: self.layout.cluster_size(),
                    skip: from - cluster_start,
                    codec: self.header.codec,
                };
                let extent = Extent { guest: from, len: to - from, content: Content::Compressed(unit) };
                self.emit(extent, pending, out)
            }
            Cluster::Subclusters { host, alloc, zero: zeros } => {
                let bits = self.layout.subcluster_bits();
                let mut pos = from;
                while pos < to {
                    let index = ((pos - cluster_start) >> bits) as u32;
                    let state = subcluster_state(alloc, zeros, index);
                    let mut next = index + 1;
                    while next < SUBCLUSTERS && subcluster_state(alloc, zeros, next) == state {
                        next += 1;
                    }
                    let end = (cluster_start + (u64::from(next) << bits)).min(to);
                    match state {
                        Subcluster::Unallocated => self.unallocated(pos..end, pending, out)?,
                        Subcluster::Zero => self.emit(zero(pos, end), pending, out)?,
                        Subcluster::Data => {
                            self.check_in_file(at, host, "cluster")?;
                            let extent = data(pos, end, host + (pos - cluster_start));
                            self.emit(extent, pending, out)?
                        }
                    }
                    pos = end;
                }
                Ok(())
            }
        }
    }

    /// Records an unallocated guest range; runs of them are resolved together by [`Self::flush`].
    fn unallocated(
        &mut self,
        range: Range<u64>,
        pending: &mut Option<Range<u64>>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        if let Some(run) = pending {
            if run.end == range.start {
                run.end = range.end;
                return Ok(());
            }
        }
        self.flush(pending, out)?;
        *pending = Some(range);
        Ok(())
    }

    /// Appends an extent after resolving any pending unallocated run before it.
    fn emit(&mut self, extent: Extent, pending: &mut Option<Range<u64>>, out: &mut Vec<Extent>) -> Result<()> {
        self.flush(pending, out)?;
        push_extent(out, extent);
        Ok(())
    }

    /// Resolves a pending unallocated run: the backing image's extents where it has data, zeros beyond it.
    fn flush(&mut self, pending: &mut Option<Range<u64>>, out: &mut Vec<Extent>) -> Result<()> {
        let Some(Range { start, end }) = pending.take() else {
            return Ok(());
        };
        let mut split = start;
        if let Some(backing) = &mut self.backing {
            split = backing.virtual_size.clamp(start, end);
            if split > start {
                backing.scratch.clear();
                backing.image.map(start, split - start, &mut backing.scratch)?;
                for extent in backing.scratch.drain(..) {
                    push_extent(out, shift_source(extent));
                }
            }
        }
        push_extent(out, zero(split, end));
        Ok(())
    }
}

/// A backing image's extent as seen from this image: its sources come after this image's own.
fn shift_source(mut extent: Extent) -> Extent {
    match &mut extent.content {
        Content::Zero => {}
        Content::Data { source, .. } => *source += 1,
        Content::Compressed(unit) => unit.source += 1,
    }
    extent
}

/// A zero extent for guest `[from, to)`.
fn zero(from: u64, to: u64) -> Extent {
    Extent { guest: from, len: to - from, content: Content::Zero }
}

/// A verbatim extent for guest `[from, to)` stored at `offset` in this image's file.
fn data(from: u64, to: u64, offset: u64) -> Extent {
    Extent { guest: from, len: to - from, content: Content::Data { source: 0, offset } }
}

impl Image for Qcow2Image {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
        let mut sources = vec![self.source.clone()];
        if let Some(backing) = &self.backing {
            sources.extend(backing.image.sources());
        }
        sources
    }

    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size => end,
            _ => {
                return Err(Error::usage(format!(
                    "guest range {offset:#x}+{len:#x} lies outside the virtual size {:#x}",
                    self.virtual_size
                ))
                .at_path(self.name()))
            }
        };
        let cluster_bits = self.layout.cluster_bits;
        let cluster_size = self.layout.cluster_size();
        let l1_shift = self.header.l1_shift();
        let l2_entries = cluster_size / if self.layout.extended_l2 { 16 } else { 8 };
        let mut pending = None;
        let mut cursor = offset;
        while cursor < end {
            let l1_index = cursor >> l1_shift;
            // l1_index < 2^22 and l1_shift <= 39: no overflow.
            let l1_end = ((l1_index + 1) << l1_shift).min(end);
            let Some(l2_table) = self.l2_table(l1_index)? else {
                self.unallocated(cursor..l1_end, &mut pending, out)?;
                cursor = l1_end;
                continue;
            };
            while cursor < l1_end {
                let cluster_start = cursor & !(cluster_size - 1);
                let to = (cluster_start + cluster_size).min(l1_end);
                let index = (cursor >> cluster_bits) & (l2_entries - 1);
                let (entry, bitmap) = self.l2_entry(l2_table, index)?;
                let at = EntryAt {
                    guest: cluster_start,
                    l2_table,
                    index,
                    file_offset: l2_table + index * (cluster_size / l2_entries),
                };
                let cluster = decode_l2(entry, bitmap, &self.layout).map_err(|why| self.bad_entry(at, why))?;
                self.emit_cluster(cluster, at, cluster_start, cursor..to, &mut pending, out)?;
                cursor = to;
            }
        }
        self.flush(&mut pending, out)
    }
}
