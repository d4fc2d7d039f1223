//! Guest chunks assembled from pieces that arrive in stream order rather than guest order: each chunk is a pool
//! buffer that fills as its data arrives and its zero ranges become known, and is handed to the writer once every
//! byte of it is resolved. Finished chunks go out in guest order (a finished chunk waits, cheaply, for the ones
//! before it), unless holding them would take too many buffers: then it goes out at once and the output digest is
//! given up.

use super::writer::{Item, Writer};
use crate::buffer::AlignedBuf;
use crate::error::Result;
use crate::format::stream::Placement;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A chunk being assembled.
struct Slot {
    /// Bytes of the chunk not yet resolved.
    unresolved: u64,
    /// Its buffer, once some data arrived (zeroed when taken).
    buf: Option<AlignedBuf>,
}

/// Assembles guest chunks of a disk of known size.
pub struct Assembler {
    chunk: u64,
    size: u64,
    open: HashMap<u64, Slot>,
    /// Finished chunks waiting for their turn: `None` for all zeros.
    done: BTreeMap<u64, Option<AlignedBuf>>,
    /// Index of the next chunk to hand to the writer.
    next: u64,
    /// Chunks handed to the writer out of order, not yet passed by the in-order walk.
    early: BTreeSet<u64>,
}

impl Assembler {
    /// An assembler for a disk of `size` bytes cut into `chunk`-byte chunks (the writer's buffer size).
    pub fn new(size: u64, chunk: u64) -> Self {
        Assembler { chunk, size, open: HashMap::new(), done: BTreeMap::new(), next: 0, early: BTreeSet::new() }
    }

    fn chunk_len(&self, index: u64) -> u64 {
        self.chunk.min(self.size - index * self.chunk)
    }

    /// Resolves guest `[guest, guest + len)` as zeros.
    pub fn zero(&mut self, writer: &mut Writer, guest: u64, len: u64) -> Result<()> {
        let end = (guest + len).min(self.size);
        let mut at = guest;
        while at < end {
            let index = at / self.chunk;
            let n = ((index + 1) * self.chunk).min(end) - at;
            let full = self.chunk_len(index);
            let slot = self.open.entry(index).or_insert(Slot { unresolved: full, buf: None });
            slot.unresolved -= n.min(slot.unresolved);
            if slot.unresolved == 0 {
                self.complete(writer, index)?;
            }
            at += n;
        }
        Ok(())
    }

    /// Places guest bytes `[guest, guest + bytes.len())`. Returns `false`, placing nothing, when a chunk it touches
    /// needs a buffer and none is free (the caller keeps the bytes elsewhere and places them later).
    pub fn data(&mut self, writer: &mut Writer, guest: u64, bytes: &[u8]) -> Result<bool> {
        let end = (guest + bytes.len() as u64).min(self.size);
        if end <= guest {
            return Ok(true);
        }
        // First make sure every chunk touched has a buffer.
        let first = guest / self.chunk;
        let last = (end - 1) / self.chunk;
        for index in first..=last {
            let has = self.open.get(&index).is_some_and(|s| s.buf.is_some());
            if has {
                continue;
            }
            // Keep two buffers for the writer's queue, so finished chunks can always be handed over.
            if writer.held() + 2 > writer.capacity() {
                return Ok(false);
            }
            let Some(mut buf) = writer.buffer()? else {
                return Ok(false);
            };
            buf.fill(0);
            let full = self.chunk_len(index);
            self.open.entry(index).or_insert(Slot { unresolved: full, buf: None }).buf = Some(buf);
        }
        let mut at = guest;
        while at < end {
            let index = at / self.chunk;
            let n = (((index + 1) * self.chunk).min(end) - at) as usize;
            let from = (at - guest) as usize;
            let slot = self.open.get_mut(&index).expect("slot prepared above");
            let offset = (at - index * self.chunk) as usize;
            slot.buf.as_mut().expect("buffer prepared above")[offset..offset + n]
                .copy_from_slice(&bytes[from..from + n]);
            slot.unresolved -= (n as u64).min(slot.unresolved);
            if slot.unresolved == 0 {
                self.complete(writer, index)?;
            }
            at += n as u64;
        }
        Ok(true)
    }

    /// Whether the chunk holding guest offset `guest` has a buffer.
    pub fn has_buffer(&self, guest: u64) -> bool {
        self.open.get(&(guest / self.chunk)).is_some_and(|s| s.buf.is_some())
    }

    fn complete(&mut self, writer: &mut Writer, index: u64) -> Result<()> {
        let slot = self.open.remove(&index).expect("completing an open chunk");
        self.done.insert(index, slot.buf);
        self.flush(writer)
    }

    /// Hands the finished chunks that are next in guest order to the writer; when finished chunks hold too many
    /// buffers, the first of them goes out of order.
    fn flush(&mut self, writer: &mut Writer) -> Result<()> {
        loop {
            loop {
                if self.early.remove(&self.next) {
                    self.next += 1;
                    continue;
                }
                let Some(entry) = self.done.remove(&self.next) else {
                    break;
                };
                let start = self.next;
                self.next += 1;
                match entry {
                    Some(buf) => self.emit_data(writer, start, buf)?,
                    None => {
                        // Consecutive zero chunks become one span.
                        while matches!(self.done.get(&self.next), Some(None)) {
                            self.done.remove(&self.next);
                            self.next += 1;
                        }
                        let guest = start * self.chunk;
                        let len = (self.next * self.chunk).min(self.size) - guest;
                        writer.submit_zero(guest, len)?;
                    }
                }
            }
            if writer.held() + 2 <= writer.capacity() {
                return Ok(());
            }
            let Some(index) = self.done.iter().find(|(_, b)| b.is_some()).map(|(&i, _)| i) else {
                return Ok(());
            };
            let buf = self.done.remove(&index).flatten().expect("a data chunk");
            self.early.insert(index);
            self.emit_data(writer, index, buf)?;
        }
    }

    fn emit_data(&mut self, writer: &mut Writer, index: u64, buf: AlignedBuf) -> Result<()> {
        let len = self.chunk_len(index) as usize;
        writer.submit(Item::Data { guest: index * self.chunk, buf, len })
    }

    /// Checks that every chunk was resolved; names the first guest offset that was not.
    pub fn finish(&mut self, writer: &mut Writer) -> Result<()> {
        self.flush(writer)?;
        let chunks = self.size.div_ceil(self.chunk);
        if self.next < chunks {
            return Err(crate::bad_image!(
                "the stream ended with guest offset {:#x} still unmapped or missing",
                self.next * self.chunk
            ));
        }
        Ok(())
    }
}

/// A forward-only walker's [`Placement`]: an assembler for the disk the walker announces, feeding `writer`.
pub struct Placer<'w> {
    writer: &'w mut Writer,
    asm: Option<Assembler>,
}

impl<'w> Placer<'w> {
    /// Places into chunks of `writer`'s buffer size.
    pub fn new(writer: &'w mut Writer) -> Self {
        Placer { writer, asm: None }
    }

    fn assembler(&mut self) -> Result<(&mut Assembler, &mut Writer)> {
        match &mut self.asm {
            Some(asm) => Ok((asm, &mut *self.writer)),
            None => Err(crate::error::Error::new(
                crate::error::ErrorKind::Io,
                "guest bytes placed before the disk size was known",
            )),
        }
    }
}

impl Placement for Placer<'_> {
    fn chunk(&self) -> u64 {
        self.writer.chunk() as u64
    }

    fn begin(&mut self, virtual_size: u64) -> Result<()> {
        self.asm = Some(Assembler::new(virtual_size, self.chunk()));
        Ok(())
    }

    fn data(&mut self, guest: u64, bytes: &[u8]) -> Result<bool> {
        let (asm, writer) = self.assembler()?;
        asm.data(writer, guest, bytes)
    }

    fn zero(&mut self, guest: u64, len: u64) -> Result<()> {
        let (asm, writer) = self.assembler()?;
        asm.zero(writer, guest, len)
    }

    fn has_buffer(&self, guest: u64) -> bool {
        self.asm.as_ref().is_some_and(|asm| asm.has_buffer(guest))
    }

    fn finish(&mut self) -> Result<()> {
        let (asm, writer) = self.assembler()?;
        asm.finish(writer)
    }
}
