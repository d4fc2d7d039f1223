//! The scheduler: walks guest space in order and hands out work items — a chunk to read and write, or a span
//! that reads as zeros and needs no buffer at all.

use crate::error::Result;
use crate::format::{push_extent, Content, Extent, Image};
use crate::source::ReadAt;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

/// Longest zero span handed out as one item, so a stop request is noticed within about a second between zeroing
/// calls even on a slow device that zeroes by writing.
pub const MAX_ZERO_SPAN: u64 = 32 << 20;

/// Chunks mapped per call into the format: large enough to amortise the call, small enough that the extent list
/// of a maximally fragmented window stays small.
const CHUNKS_PER_WINDOW: u64 = 8;

/// One unit of work for a pipeline worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Guest `[guest, guest + len)` holds data: fill a buffer from `extents`, then write it.
    Chunk {
        /// Guest offset (a multiple of the chunk size).
        guest: u64,
        /// Length (the chunk size, or less at the end of the image).
        len: u64,
        /// Extents covering exactly this chunk.
        extents: Vec<Extent>,
    },
    /// Guest `[guest, guest + len)` reads as zeros.
    Zero {
        /// Guest offset (a multiple of the chunk size).
        guest: u64,
        /// Length.
        len: u64,
    },
    /// Guest `[guest, guest + len)` is what the destination already holds (a delta's backing): nothing to do.
    Keep {
        /// Guest offset.
        guest: u64,
        /// Length.
        len: u64,
    },
}

impl Work {
    /// Guest offset of the item.
    pub fn guest(&self) -> u64 {
        match self {
            Work::Chunk { guest, .. } | Work::Zero { guest, .. } | Work::Keep { guest, .. } => *guest,
        }
    }

    /// Length of the item.
    pub fn len(&self) -> u64 {
        match self {
            Work::Chunk { len, .. } | Work::Zero { len, .. } | Work::Keep { len, .. } => *len,
        }
    }

    /// Whether the item is empty (never, for items the scheduler hands out).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hands out work items in guest order.
pub struct Scheduler {
    image: Box<dyn Image>,
    holes: HoleFinder,
    chunk: u64,
    cursor: u64,
    size: u64,
    pending: VecDeque<Work>,
    extents: Vec<Extent>,
    /// Writing a delta: the alignment the edges of what it changes must keep (see [`Scheduler::delta`]).
    delta: Option<u64>,
}

impl Scheduler {
    /// A scheduler over `image` cutting guest space into `chunk`-byte items (a power of two).
    pub fn new(image: Box<dyn Image>, chunk: u64) -> Self {
        Self::starting_at(image, chunk, 0)
    }

    /// A scheduler that skips guest `[0, start)` (already written by an interrupted run).
    pub fn starting_at(image: Box<dyn Image>, chunk: u64, start: u64) -> Self {
        let size = image.virtual_size();
        let holes = HoleFinder::new(image.sources());
        let cursor = start.min(size);
        Scheduler { image, holes, chunk, cursor, size, pending: VecDeque::new(), extents: Vec::new(), delta: None }
    }

    /// A scheduler for an image written as a delta onto a destination that already holds its backing (what
    /// `qemu-img commit` writes): the ranges the image takes from its backing chain (extents of any source but
    /// the first) become [`Work::Keep`] items, neither read nor written; what the image holds itself (data, and
    /// zero clusters, which must overwrite) becomes items as usual, whose edges must fall on `align` bytes.
    pub fn delta(image: Box<dyn Image>, chunk: u64, align: u64) -> Self {
        Scheduler { delta: Some(align), ..Self::new(image, chunk) }
    }

    /// Guest offset of the next item to plan.
    pub fn position(&self) -> u64 {
        self.cursor
    }

    /// The image being scheduled.
    pub fn image(&self) -> &dyn Image {
        self.image.as_ref()
    }

    /// The next item, or `None` when guest space is exhausted.
    pub fn next_work(&mut self) -> Result<Option<Work>> {
        while self.cursor < self.size && (self.pending.is_empty() || self.zero_item_can_grow()) {
            self.plan_window()?;
        }
        Ok(self.pending.pop_front())
    }

    /// Whether the only queued item is a zero span that the next window could extend.
    fn zero_item_can_grow(&self) -> bool {
        match (self.pending.len(), self.pending.back()) {
            (1, Some(Work::Zero { guest, len })) => guest + len == self.cursor && *len < MAX_ZERO_SPAN,
            _ => false,
        }
    }

    /// Maps the next window of guest space and cuts it into items. A window that is all zeros joins a zero item
    /// still waiting at the back of the queue, so a long empty region becomes few large zero items.
    fn plan_window(&mut self) -> Result<()> {
        let start = self.cursor;
        let end = start.saturating_add(self.chunk * CHUNKS_PER_WINDOW).min(self.size);
        self.extents.clear();
        self.image.map(start, end - start, &mut self.extents)?;
        check_coverage(&self.extents, start, end)?;
        if let Some(align) = self.delta {
            self.plan_delta_window(align)?;
            self.cursor = end;
            return Ok(());
        }
        self.holes.refine(&mut self.extents)?;
        let mut next = 0;
        let mut chunk_start = start;
        while chunk_start < end {
            let chunk_end = (chunk_start + self.chunk).min(end);
            let mut extents = Vec::new();
            while next < self.extents.len() && self.extents[next].guest < chunk_end {
                let extent = &self.extents[next];
                extents.push(extent.clip(chunk_start, chunk_end));
                if extent.end() <= chunk_end {
                    next += 1;
                } else {
                    break;
                }
            }
            if extents.iter().all(|e| e.content == Content::Zero) {
                self.push_zero(chunk_start, chunk_end - chunk_start);
            } else {
                self.pending.push_back(Work::Chunk { guest: chunk_start, len: chunk_end - chunk_start, extents });
            }
            chunk_start = chunk_end;
        }
        self.cursor = end;
        Ok(())
    }

    /// [`plan_window`](Self::plan_window) for a delta: the window's extents (in `self.extents`) cut into runs the
    /// backing holds, kept, and runs the image holds, refined for holes and cut at chunk boundaries.
    fn plan_delta_window(&mut self, align: u64) -> Result<()> {
        let extents = std::mem::take(&mut self.extents);
        let from_backing = |e: &Extent| match e.content {
            Content::Zero => false,
            Content::Data { source, .. } => source > 0,
            Content::Compressed(unit) => unit.source > 0,
        };
        let mut at = 0;
        while at < extents.len() {
            let kept = from_backing(&extents[at]);
            let run_end = extents[at..].iter().position(|e| from_backing(e) != kept).map_or(extents.len(), |n| at + n);
            let (start, end) = (extents[at].guest, extents[run_end - 1].end());
            if kept {
                match self.pending.back_mut() {
                    Some(Work::Keep { guest, len }) if *guest + *len == start => *len += end - start,
                    _ => self.pending.push_back(Work::Keep { guest: start, len: end - start }),
                }
            } else {
                let misaligned = [start, end].into_iter().find(|&edge| edge % align != 0 && edge != self.size);
                if let Some(edge) = misaligned {
                    return Err(crate::error::Error::unsupported(format!(
                        "the delta changes guest bytes up to guest offset {edge:#x}, which is not a multiple of the \
                         destination's {align}-byte block (its clusters are smaller than the block)"
                    ))
                    .at_path(self.holes.sources[0].name()));
                }
                let mut own = extents[at..run_end].to_vec();
                self.holes.refine(&mut own)?;
                let mut next = 0;
                let mut piece = start;
                while piece < end {
                    let piece_end = ((piece / self.chunk + 1) * self.chunk).min(end);
                    let mut clipped = Vec::new();
                    while next < own.len() && own[next].guest < piece_end {
                        clipped.push(own[next].clip(piece, piece_end));
                        if own[next].end() <= piece_end {
                            next += 1;
                        } else {
                            break;
                        }
                    }
                    if clipped.iter().all(|e| e.content == Content::Zero) {
                        self.push_zero(piece, piece_end - piece);
                    } else {
                        self.pending.push_back(Work::Chunk { guest: piece, len: piece_end - piece, extents: clipped });
                    }
                    piece = piece_end;
                }
            }
            at = run_end;
        }
        self.extents = extents;
        Ok(())
    }

    fn push_zero(&mut self, guest: u64, len: u64) {
        if let Some(Work::Zero { guest: g, len: l }) = self.pending.back_mut() {
            if *g + *l == guest && *l + len <= MAX_ZERO_SPAN {
                *l += len;
                return;
            }
        }
        self.pending.push_back(Work::Zero { guest, len });
    }
}

/// Finds holes in the sources behind verbatim-data extents (a preallocated image's never-written clusters, a
/// sparse raw file), so those bytes are neither read nor written: they become zero extents. One data run per
/// source is remembered, so a source without holes costs one lseek(SEEK_DATA) for the whole import.
struct HoleFinder {
    sources: Vec<Arc<dyn ReadAt>>,
    known: Vec<Option<Range<u64>>>,
    scratch: Vec<Extent>,
}

impl HoleFinder {
    fn new(sources: Vec<Arc<dyn ReadAt>>) -> Self {
        let known = vec![None; sources.len()];
        HoleFinder { sources, known, scratch: Vec::new() }
    }

    /// Rewrites `extents` with the holes of their sources as zero extents.
    fn refine(&mut self, extents: &mut Vec<Extent>) -> Result<()> {
        self.scratch.clear();
        for extent in extents.iter() {
            let Content::Data { source, offset } = extent.content else {
                push_extent(&mut self.scratch, *extent);
                continue;
            };
            let Some(reader) = self.sources.get(source) else {
                return Err(crate::bad_image!("extent names unknown source {source}"));
            };
            super::fill::within_source(reader.as_ref(), offset, extent.len)?;
            let end = offset + extent.len;
            let mut at = offset;
            while at < end {
                let run = self.data_run(source, at)?;
                let (data_start, data_end) = match run {
                    Some(run) if run.start < end => (run.start.max(at), run.end.min(end)),
                    _ => (end, end),
                };
                let guest = extent.guest + (at - offset);
                push_extent(&mut self.scratch, Extent { guest, len: data_start - at, content: Content::Zero });
                let data = Content::Data { source, offset: data_start };
                let guest = extent.guest + (data_start - offset);
                push_extent(&mut self.scratch, Extent { guest, len: data_end - data_start, content: data });
                at = data_end.max(data_start);
            }
        }
        std::mem::swap(extents, &mut self.scratch);
        Ok(())
    }

    /// The data run of `source` containing or following `at`, from the cache when it covers `at`. A run that does
    /// not move forward is not trusted: everything from `at` on counts as data.
    fn data_run(&mut self, source: usize, at: u64) -> Result<Option<Range<u64>>> {
        let Some(reader) = self.sources.get(source) else {
            return Err(crate::bad_image!("extent names unknown source {source}"));
        };
        if let Some(run) = &self.known[source] {
            if run.start <= at && at < run.end {
                return Ok(Some(run.clone()));
            }
        }
        let run = match reader.next_data(at)? {
            Some(run) if run.end > run.start.max(at) => Some(run),
            Some(_) => Some(at..u64::MAX),
            None => None,
        };
        self.known[source] = run.clone();
        Ok(run)
    }
}

/// A format must answer with extents that tile the asked range exactly; anything else is a bug or a lie in the
/// image that would otherwise become a silent hole or an overlapping write.
fn check_coverage(extents: &[Extent], start: u64, end: u64) -> Result<()> {
    let mut at = start;
    for extent in extents {
        if extent.guest != at || extent.len == 0 {
            return Err(crate::bad_image!("image mapping has a gap or overlap").at_offset(at));
        }
        at = extent.end();
    }
    if at != end {
        return Err(crate::bad_image!("image mapping stops short of the requested range").at_offset(at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image described directly by a list of extents.
    struct Scripted {
        size: u64,
        extents: Vec<Extent>,
        source: Arc<dyn ReadAt>,
    }

    /// A source of `len` bytes whose holes are the given ranges.
    struct Holey {
        len: u64,
        holes: Vec<Range<u64>>,
    }

    impl ReadAt for Holey {
        fn name(&self) -> &str {
            "holey"
        }
        fn len(&self) -> u64 {
            self.len
        }
        fn read_at(&self, _offset: u64, _buf: &mut [u8]) -> Result<usize> {
            unreachable!("the scheduler never reads data")
        }
        fn next_data(&self, offset: u64) -> Result<Option<Range<u64>>> {
            let mut at = offset;
            for hole in &self.holes {
                if hole.start <= at && at < hole.end {
                    at = hole.end;
                }
            }
            let end = self.holes.iter().map(|h| h.start).filter(|&s| s > at).min().unwrap_or(self.len);
            Ok((at < self.len).then_some(at..end))
        }
    }

    fn scripted(size: u64, extents: Vec<Extent>) -> Scripted {
        Scripted { size, extents, source: Arc::new(Holey { len: size, holes: Vec::new() }) }
    }

    impl Image for Scripted {
        fn format_name(&self) -> &'static str {
            "scripted"
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
            vec![self.source.clone()]
        }
        fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
            for e in &self.extents {
                if e.guest < offset + len && e.end() > offset {
                    out.push(e.clip(offset, offset + len));
                }
            }
            Ok(())
        }
    }

    const MIB: u64 = 1 << 20;

    fn data(guest: u64, len: u64) -> Extent {
        Extent { guest, len, content: Content::Data { source: 0, offset: guest } }
    }

    fn zero(guest: u64, len: u64) -> Extent {
        Extent { guest, len, content: Content::Zero }
    }

    fn drain(image: Scripted, chunk: u64) -> Vec<Work> {
        let mut scheduler = Scheduler::new(Box::new(image), chunk);
        let mut items = Vec::new();
        while let Some(work) = scheduler.next_work().unwrap() {
            items.push(work);
        }
        items
    }

    #[test]
    fn zero_runs_merge_and_data_chunks_are_cut_at_chunk_boundaries() {
        let size = 100 * MIB + 512;
        let image =
            scripted(size, vec![data(0, MIB + 4096), zero(MIB + 4096, 90 * MIB - 4096), data(91 * MIB, 9 * MIB + 512)]);
        let items = drain(image, 2 * MIB);
        // The items tile guest space in order.
        let mut at = 0;
        for item in &items {
            assert_eq!(item.guest(), at);
            at += item.len();
        }
        assert_eq!(at, size);
        // First chunk carries both the data and the start of the zero run.
        assert_eq!(
            items[0],
            Work::Chunk { guest: 0, len: 2 * MIB, extents: vec![data(0, MIB + 4096), zero(MIB + 4096, MIB - 4096)] }
        );
        // The empty middle becomes zero items, merged across windows.
        let zero_items: Vec<_> = items.iter().filter(|w| matches!(w, Work::Zero { .. })).collect();
        assert!(zero_items.len() as u64 <= (88 * MIB).div_ceil(MAX_ZERO_SPAN) + 1, "{zero_items:?}");
        assert!(zero_items.iter().all(|w| w.len() <= MAX_ZERO_SPAN));
        assert_eq!(zero_items.iter().map(|w| w.len()).sum::<u64>(), 88 * MIB);
        // The odd-sized tail is one short chunk.
        assert_eq!(items.last().unwrap().len(), 512);
    }

    #[test]
    fn zero_items_are_capped() {
        let size = 3 * MAX_ZERO_SPAN + MIB;
        let items = drain(scripted(size, vec![zero(0, size)]), 2 * MIB);
        assert!(items.iter().all(|w| matches!(w, Work::Zero { .. }) && w.len() <= MAX_ZERO_SPAN));
        assert_eq!(items.iter().map(Work::len).sum::<u64>(), size);
    }

    #[test]
    fn holes_in_the_source_become_zero_items_and_are_never_read() {
        let size = 16 * MIB;
        let source = Arc::new(Holey { len: size, holes: vec![2 * MIB..9 * MIB, 10 * MIB..11 * MIB] });
        let image = Scripted { size, extents: vec![data(0, size)], source };
        let items = drain(image, 2 * MIB);
        let zeros: u64 = items.iter().filter(|w| matches!(w, Work::Zero { .. })).map(Work::len).sum();
        let zero_in_chunks: u64 = items
            .iter()
            .filter_map(|w| match w {
                Work::Chunk { extents, .. } => Some(extents),
                Work::Zero { .. } | Work::Keep { .. } => None,
            })
            .flatten()
            .filter(|e| e.content == Content::Zero)
            .map(|e| e.len)
            .sum();
        assert_eq!(zeros + zero_in_chunks, 8 * MIB, "{items:?}");
        assert!(matches!(items[1], Work::Zero { guest, len } if guest == 2 * MIB && len == 6 * MIB), "{items:?}");
    }

    fn from_backing(guest: u64, len: u64) -> Extent {
        Extent { guest, len, content: Content::Data { source: 1, offset: guest } }
    }

    #[test]
    fn a_delta_keeps_its_backings_ranges_and_writes_its_own_with_their_zeros() {
        let size = 8 * MIB;
        let extents = vec![
            from_backing(0, MIB),
            data(MIB, 2 * MIB),
            zero(3 * MIB, 64 << 10),
            from_backing(3 * MIB + (64 << 10), 2 * MIB),
            zero(5 * MIB + (64 << 10), 64 << 10),
            from_backing(5 * MIB + (128 << 10), 3 * MIB - (128 << 10)),
        ];
        let mut scheduler = Scheduler::delta(Box::new(scripted(size, extents)), 2 * MIB, 4096);
        let mut items = Vec::new();
        while let Some(work) = scheduler.next_work().unwrap() {
            items.push(work);
        }
        assert_eq!(
            items,
            vec![
                Work::Keep { guest: 0, len: MIB },
                Work::Chunk { guest: MIB, len: MIB, extents: vec![data(MIB, MIB)] },
                Work::Chunk {
                    guest: 2 * MIB,
                    len: MIB + (64 << 10),
                    extents: vec![data(2 * MIB, MIB), zero(3 * MIB, 64 << 10)]
                },
                Work::Keep { guest: 3 * MIB + (64 << 10), len: 2 * MIB },
                Work::Zero { guest: 5 * MIB + (64 << 10), len: 64 << 10 },
                Work::Keep { guest: 5 * MIB + (128 << 10), len: 3 * MIB - (128 << 10) },
            ]
        );
    }

    #[test]
    fn a_delta_changing_less_than_a_destination_block_is_refused() {
        let extents = vec![from_backing(0, 4096), data(4096, 2048), from_backing(6144, 2048)];
        let mut scheduler = Scheduler::delta(Box::new(scripted(8192, extents)), 2 * MIB, 4096);
        let err = scheduler.next_work().unwrap_err().to_string();
        assert!(err.contains("guest offset 0x1800"), "{err}");
    }

    #[test]
    fn a_mapping_with_a_gap_is_rejected() {
        let image = scripted(4 * MIB, vec![data(0, MIB), data(2 * MIB, 2 * MIB)]);
        let mut scheduler = Scheduler::new(Box::new(image), 2 * MIB);
        let err = scheduler.next_work().unwrap_err();
        assert!(err.to_string().contains("gap"), "{err}");
    }
}
