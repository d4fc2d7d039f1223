//! The writing end of a forward-only import: one thread that takes finished guest chunks (or zero spans) from a
//! bounded queue and writes them through the destination's usual rules, so reading and decompressing the stream
//! overlaps writing. The chunk buffers are a fixed pool that the writer hands back: the memory bound.

use super::schedule::MAX_ZERO_SPAN;
use crate::buffer::AlignedBuf;
use crate::checksum::Hasher;
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

/// Where the writer begins. Guest bytes below `offset` are already on the destination (an import resumed from
/// a stream read again from its start): items wholly below it are dropped unwritten, one straddling it is
/// rewritten whole (the same bytes), and `digest` already covers `[0, offset)`.
pub struct Start {
    /// The resume point (0 for a new import).
    pub offset: u64,
    /// The output digest so far, when one is computed.
    pub digest: Option<Hasher>,
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

/// Runs `produce` with a [`Writer`] whose thread writes into `dest` from `start` on; `buffers` chunk buffers of
/// `chunk` bytes make the pool. The writer's own error wins over the producer's "writer stopped".
pub fn with_writer<T>(
    dest: &Destination,
    progress: &Progress,
    start: Start,
    buffers: usize,
    chunk: usize,
    produce: impl FnOnce(&mut Writer) -> Result<T>,
) -> Result<(T, Written)> {
    let (queue, items) = sync_channel::<Item>(buffers.max(1));
    let (give, returned) = channel::<AlignedBuf>();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("stream-writer".into())
            .spawn_scoped(scope, move || write_loop(items, give, dest, progress, start))
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
    start: Start,
) -> Result<Written> {
    let from = start.offset;
    let mut digest = InOrder { hasher: start.digest, next: from };
    let mut watermark = from;
    for item in items {
        let (guest, len) = match &item {
            Item::Data { guest, len, .. } => (*guest, *len as u64),
            Item::Zero { guest, len } => (*guest, *len),
        };
        let end = guest + len;
        // What this item adds past the resume point.
        let new = guest.max(from);
        match item {
            Item::Data { buf, .. } if end <= from => {
                let _ = give.send(buf);
                continue;
            }
            Item::Zero { .. } if end <= from => continue,
            Item::Data { guest, buf, len } => {
                dest.write_runs(guest, &buf[..len])?;
                digest.feed(new, end - new, Some(&buf[(new - guest) as usize..len]));
                progress.note_written(dest.stats.written.load(std::sync::atomic::Ordering::Relaxed));
                let _ = give.send(buf);
            }
            Item::Zero { .. } => {
                dest.zero(new, end - new)?;
                digest.feed(new, end - new, None);
            }
        }
        if guest <= watermark {
            watermark = watermark.max(end);
        }
        progress.advance(end - new, watermark);
    }
    Ok(Written { digest: digest.hasher.map(|h| h.finish()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::Algorithm;
    use crate::sink::DestOptions;

    const CHUNK: usize = 64 << 10;

    /// Fails naming the first differing offset (the buffers are too long to print).
    fn assert_same(got: &[u8], expected: &[u8]) {
        assert_eq!(got.len(), expected.len(), "length");
        if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
            panic!("byte {at} (chunk {}): {:#x}, expected {:#x}", at / CHUNK, got[at], expected[at]);
        }
    }

    /// What an earlier run left: 0xee in the first two chunks (standing in for its bytes, so a rewrite shows), the
    /// image's own bytes from there up to `from`, a hole after.
    fn earlier(from: u64, pattern: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; pattern.len() * CHUNK];
        for (i, chunk) in bytes[..from as usize].chunks_mut(CHUNK).enumerate() {
            chunk.fill(if i < 2 { 0xee } else { pattern[i] });
        }
        bytes
    }

    /// Submits `pattern[i]`-filled chunks (0: a zero span) for chunk `i`, in order, to a writer starting at `from`
    /// over [`earlier`]'s file; returns the file, the digest and the progress.
    fn write_from(from: u64, pattern: &[u8], digest: Option<Hasher>) -> (Vec<u8>, Option<Vec<u8>>, Progress) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let size = (pattern.len() * CHUNK) as u64;
        std::fs::write(&path, earlier(from, pattern)).unwrap();
        let options = DestOptions { keep_contents: from > 0, ..DestOptions::default() };
        let no_governor = || Err(Error::new(ErrorKind::Io, "no governor in this test"));
        let dest = Destination::open(&path, size, &options, no_governor).unwrap();
        let progress = Progress::default();
        progress.resume_from(from);
        let ((), written) = with_writer(&dest, &progress, Start { offset: from, digest }, 2, CHUNK, |writer| {
            for (i, &byte) in pattern.iter().enumerate() {
                let guest = (i * CHUNK) as u64;
                if byte == 0 {
                    writer.submit_zero(guest, CHUNK as u64)?;
                    continue;
                }
                let mut buf = writer.buffer()?.unwrap();
                buf[..CHUNK].fill(byte);
                writer.submit(Item::Data { guest, buf, len: CHUNK })?;
            }
            Ok(())
        })
        .unwrap();
        dest.finish().unwrap();
        (std::fs::read(&path).unwrap(), written.digest, progress)
    }

    #[test]
    fn a_resumed_writer_leaves_what_lies_below_its_start_and_writes_the_rest() {
        let pattern = [1u8, 0, 2, 3, 0, 4];
        let from = 2 * CHUNK as u64 + 100;
        // The digest so far, as the engine reads it back from the destination.
        let mut prefix = Hasher::new(Algorithm::Sha256);
        prefix.update(&earlier(from, &pattern)[..from as usize]);
        let (bytes, digest, progress) = write_from(from, &pattern, Some(prefix));

        // Below the start: untouched (an earlier run's bytes). The chunk straddling it: rewritten whole.
        let mut expected = vec![0xeeu8; 2 * CHUNK];
        for &byte in &pattern[2..] {
            expected.extend(std::iter::repeat_n(byte, CHUNK));
        }
        assert_ne!(pattern[0], 0xee, "chunk 0 shows whether what lies below the start was written");
        assert_same(&bytes, &expected);
        // The digest: the prefix as given, then exactly the bytes from the start on (the straddler's tail).
        let mut whole = Hasher::new(Algorithm::Sha256);
        whole.update(&bytes);
        assert_eq!(digest.unwrap(), whole.finish());
        assert_eq!(progress.watermark(), bytes.len() as u64);
        assert_eq!(progress.processed(), bytes.len() as u64, "progress counts the resumed prefix once");
    }

    #[test]
    fn a_new_writer_writes_everything() {
        let (bytes, digest, _) = write_from(0, &[5, 0, 6], Some(Hasher::new(Algorithm::Sha256)));
        let mut expected = vec![5u8; CHUNK];
        expected.extend(vec![0u8; CHUNK]);
        expected.extend(vec![6u8; CHUNK]);
        assert_same(&bytes, &expected);
        let mut whole = Hasher::new(Algorithm::Sha256);
        whole.update(&expected);
        assert_eq!(digest.unwrap(), whole.finish());
    }
}
