//! The writing end of a forward-only import: one thread that takes finished guest chunks (or zero spans) from a
//! bounded queue and writes them through the destination's usual rules, so reading and decompressing the stream
//! overlaps writing. The chunk buffers are a fixed pool that the writer hands back: the memory bound.

use super::schedule::MAX_ZERO_SPAN;
use crate::buffer::AlignedBuf;
use crate::checksum::{Algorithm, Hasher};
use crate::error::{Error, ErrorKind, Result};
use crate::progress::Progress;
use crate::sink::Destination;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

/// Zeros fed to the output digest for zero spans.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A piece of guest space ready to be written.
pub enum Item {
    /// `buf[..len]` holds guest bytes `[guest, guest + len)`.
    Data {
        /// Guest offset (a multiple of the destination block).
        guest: u64,
        /// The bytes.
        buf: AlignedBuf,
        /// How many of them.
        len: usize,
    },
    /// Guest `[guest, guest + len)` reads as zeros.
    Zero {
        /// Guest offset.
        guest: u64,
        /// Length.
        len: u64,
    },
}

/// The producer's handle: chunk buffers from the pool, and the queue to the writer thread.
pub struct Writer {
    queue: Option<SyncSender<Item>>,
    returned: Receiver<AlignedBuf>,
    spare: Vec<AlignedBuf>,
    allocated: usize,
    capacity: usize,
    chunk: usize,
    in_flight: usize,
}

/// What the writer thread did.
pub struct Written {
    /// SHA-256 of the image, when asked for and written in guest order.
    pub digest: Option<Vec<u8>>,
}

impl Writer {
    /// Chunk size of the pool's buffers.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// A buffer from the pool (contents undefined): a spare one, a new one while the pool is not full, else the
    /// next one the writer hands back. `None` when every buffer is held by the caller.
    pub fn buffer(&mut self) -> Result<Option<AlignedBuf>> {
        while let Ok(buf) = self.returned.try_recv() {
            self.in_flight -= 1;
            self.spare.push(buf);
        }
        if let Some(buf) = self.spare.pop() {
            return Ok(Some(buf));
        }
        if self.allocated < self.capacity {
            self.allocated += 1;
            return Ok(Some(AlignedBuf::new(self.chunk)));
        }
        if self.in_flight == 0 {
            return Ok(None);
        }
        match self.returned.recv() {
            Ok(buf) => {
                self.in_flight -= 1;
                Ok(Some(buf))
            }
            Err(_) => Err(writer_stopped()),
        }
    }

    /// Buffers currently held by the caller (not spare, not with the writer).
    pub fn held(&self) -> usize {
        self.allocated - self.spare.len() - self.in_flight
    }

    /// Size of the pool.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Puts a buffer the caller no longer needs back into the pool.
    pub fn give_back(&mut self, buf: AlignedBuf) {
        self.spare.push(buf);
    }

    /// Queues `item` for writing (waits while the queue is full).
    pub fn submit(&mut self, item: Item) -> Result<()> {
        let data = matches!(item, Item::Data { .. });
        let queue = self.queue.as_ref().ok_or_else(writer_stopped)?;
        queue.send(item).map_err(|_| writer_stopped())?;
        if data {
            self.in_flight += 1;
        }
        Ok(())
    }

    /// Queues zeros for guest `[guest, guest + len)`, in spans the writer can stop between.
    pub fn submit_zero(&mut self, guest: u64, len: u64) -> Result<()> {
        let mut at = guest;
        while at < guest + len {
            let n = (guest + len - at).min(MAX_ZERO_SPAN);
            self.submit(Item::Zero { guest: at, len: n })?;
            at += n;
        }
        Ok(())
    }
}

fn writer_stopped() -> Error {
    Error::new(ErrorKind::Io, "the writer stopped")
}

/// Runs `produce` with a [`Writer`] whose thread writes into `dest`; `buffers` chunk buffers of `chunk` bytes
/// make the pool. The writer's own error wins over the producer's "writer stopped".
pub fn with_writer<T>(
    dest: &Destination,
    progress: &Progress,
    digest: Option<Algorithm>,
    buffers: usize,
    chunk: usize,
    produce: impl FnOnce(&mut Writer) -> Result<T>,
) -> Result<(T, Written)> {
    let (queue, items) = sync_channel::<Item>(buffers.max(1));
    let (give, returned) = channel::<AlignedBuf>();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("stream-writer".into())
            .spawn_scoped(scope, move || write_loop(items, give, dest, progress, digest))
            .expect("spawning the stream writer");
        let mut writer = Writer {
            queue: Some(queue),
            returned,
            spare: Vec::new(),
            allocated: 0,
            capacity: buffers.max(2),
            chunk,
            in_flight: 0,
        };
        let produced = produce(&mut writer);
        drop(writer);
        let written = thread.join().unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "the stream writer panicked")));
        match (produced, written) {
            (Ok(value), Ok(written)) => Ok((value, written)),
            (Err(err), Ok(_)) => Err(err),
            (_, Err(err)) => Err(err),
        }
    })
}

/// The output digest, fed while writes arrive in guest order; abandoned at the first out-of-order write.
struct InOrder {
    hasher: Option<Hasher>,
    next: u64,
}

impl InOrder {
    fn feed(&mut self, guest: u64, len: u64, bytes: Option<&[u8]>) {
        let Some(hasher) = self.hasher.as_mut() else {
            return;
        };
        if guest != self.next {
            log::info!("output digest skipped: the image was written out of guest order (at {guest:#x})");
            self.hasher = None;
            return;
        }
        match bytes {
            Some(bytes) => hasher.update(bytes),
            None => {
                let mut left = len;
                while left > 0 {
                    let n = left.min(ZEROS.len() as u64) as usize;
                    hasher.update(&ZEROS[..n]);
                    left -= n as u64;
                }
            }
        }
        self.next += len;
    }
}

fn write_loop(
    items: Receiver<Item>,
    give: Sender<AlignedBuf>,
    dest: &Destination,
    progress: &Progress,
    digest: Option<Algorithm>,
) -> Result<Written> {
    let mut digest = InOrder { hasher: digest.map(Hasher::new), next: 0 };
    let mut watermark = 0;
    for item in items {
        match item {
            Item::Data { guest, buf, len } => {
                dest.write_runs(guest, &buf[..len])?;
                digest.feed(guest, len as u64, Some(&buf[..len]));
                if guest == watermark {
                    watermark += len as u64;
                }
                progress.advance(len as u64, watermark);
                progress.note_written(dest.stats.written.load(std::sync::atomic::Ordering::Relaxed));
                let _ = give.send(buf);
            }
            Item::Zero { guest, len } => {
                dest.zero(guest, len)?;
                digest.feed(guest, len, None);
                if guest == watermark {
                    watermark += len;
                }
                progress.advance(len, watermark);
            }
        }
    }
    Ok(Written { digest: digest.hasher.map(|h| h.finish()) })
}
