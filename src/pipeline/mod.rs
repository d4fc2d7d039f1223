//! The pipeline: a fixed set of workers, each owning one aligned chunk buffer, turning work items into writes.
//!
//! Each worker takes the next item from the [scheduler](schedule), fills its buffer from the sources (reading
//! verbatim data straight into it, inflating compressed units), splits the chunk into zero and data runs, and
//! hands them to the destination. The buffers are the memory bound: `workers × chunk` bytes, allocated once.
//! With several workers, reads of one chunk overlap writes of another and compressed chunks inflate on every
//! core; writes land out of order, which is safe because items never overlap.

pub(crate) mod assemble;
pub mod fill;
pub(crate) mod ordered;
pub(crate) mod schedule;
pub(crate) mod spool;
pub(crate) mod writer;

use crate::buffer::AlignedBuf;
use crate::checksum::Hasher;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::sink::Destination;
use crate::source::ReadAt;
use fill::Scratch;
use ordered::{Completion, OrderedDigest, Piece};
use schedule::{Scheduler, Work};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

/// How the pipeline runs.
#[derive(Clone)]
pub struct Config {
    /// Number of workers (and chunk buffers).
    pub workers: usize,
    /// Chunk size in bytes: a power of two, at least the destination block size.
    pub chunk: u64,
    /// Read sources strictly in item order, one read at a time (needed by the source checksum tap).
    pub serial_reads: bool,
    /// Digest the output image: a digest of the part before the first item (empty unless resuming) and where
    /// that part ends.
    pub output_digest: Option<(Hasher, u64)>,
}

/// What the pipeline produced.
#[derive(Debug, Clone)]
pub struct PipelineOutcome {
    /// Digest of the whole output image, if asked for.
    pub output_digest: Option<Vec<u8>>,
    /// Bytes of scratch memory the workers used for compressed data.
    pub scratch_bytes: usize,
}

struct Shared<'a> {
    scheduler: Mutex<Scheduler>,
    sources: Vec<Arc<dyn ReadAt>>,
    dest: &'a Destination,
    config: &'a Config,
    progress: &'a Progress,
    completion: Completion,
    stop: &'a AtomicBool,
    halt: &'a AtomicBool,
    failure: Mutex<Option<Error>>,
}

/// Runs `scheduler`'s items through `config.workers` workers into `dest`. Raising `stop` makes every worker
/// finish its current item and the run fail with an [`Error::interrupted`] error naming the watermark.
pub fn run(
    scheduler: Scheduler,
    dest: &Destination,
    config: &Config,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<PipelineOutcome> {
    let halt = AtomicBool::new(false);
    let shared = Shared {
        sources: scheduler.image().sources(),
        completion: Completion::starting_at(scheduler.position()),
        scheduler: Mutex::new(scheduler),
        dest,
        config,
        progress,
        stop,
        halt: &halt,
        failure: Mutex::new(None),
    };
    let (scratch_bytes, digest) = std::thread::scope(|scope| {
        let digest = config.output_digest.clone().map(|prefix| OrderedDigest::spawn(scope, prefix, &halt));
        let workers: Vec<_> = (0..config.workers.max(1))
            .map(|i| {
                let feeder = digest.as_ref().map(|(d, _)| d.feeder());
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn_scoped(scope, move || worker(shared, feeder))
                    .expect("spawning a pipeline worker")
            })
            .collect();
        // Only the workers' feeders remain: the digest thread ends when the last worker does.
        let digest = digest.map(|(feed, handle)| {
            drop(feed);
            handle
        });
        let scratch = workers.into_iter().map(|w| w.join().unwrap_or(0)).max().unwrap_or(0);
        (scratch, digest.map(|handle| handle.join().expect("digest thread")))
    });
    // A stop wins over a failure it caused (a download cut short by it).
    if stop.load(Ordering::Relaxed) {
        return Err(Error::interrupted(dest.path(), shared.completion.watermark()));
    }
    if let Some(err) = shared.failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    Ok(PipelineOutcome { output_digest: digest.map(|(digest, _)| digest), scratch_bytes })
}

/// One worker's buffer, shared read-only with the digest thread between its fill and the digest's turn.
struct WorkerBuffer {
    buffer: Arc<AlignedBuf>,
    /// Disconnects once the digest thread has hashed the last piece handed to it.
    hashed: Option<Receiver<()>>,
}

impl WorkerBuffer {
    /// The buffer for writing, once the digest no longer reads it.
    fn writable(&mut self) -> &mut AlignedBuf {
        if let Some(hashed) = self.hashed.take() {
            // Err is the signal: the digest dropped its end after hashing (or gave up on a halted run).
            let _ = hashed.recv();
        }
        if Arc::get_mut(&mut self.buffer).is_none() {
            // Not reachable (the digest drops its reference before signalling), but never worth a panic.
            self.buffer = Arc::new(AlignedBuf::new(self.buffer.capacity()));
        }
        Arc::get_mut(&mut self.buffer).expect("buffer has a single owner")
    }
}

/// One worker: loops over items until none are left or the run is halted. Returns its scratch footprint.
fn worker(shared: &Shared, digest: Option<Sender<Piece>>) -> usize {
    let mut buffer = WorkerBuffer { buffer: Arc::new(AlignedBuf::new(shared.config.chunk as usize)), hashed: None };
    let mut scratch = Scratch::with_span(shared.config.chunk as usize + (64 << 10));
    while !shared.halt.load(Ordering::Relaxed) {
        if shared.stop.load(Ordering::Relaxed) {
            // The run reports the interruption once every worker has finished its item.
            break;
        }
        match process_next(shared, &mut buffer, &mut scratch, digest.as_ref()) {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => fail(shared, err),
        }
    }
    scratch.footprint()
}

fn fail(shared: &Shared, err: Error) {
    let mut failure = shared.failure.lock().unwrap_or_else(|p| p.into_inner());
    if failure.is_none() {
        *failure = Some(err);
    }
    shared.halt.store(true, Ordering::Relaxed);
}

/// Takes one item and carries it through. Returns `false` when there is nothing left.
fn process_next(
    shared: &Shared,
    buffer: &mut WorkerBuffer,
    scratch: &mut Scratch,
    digest: Option<&Sender<Piece>>,
) -> Result<bool> {
    let writable = buffer.writable();
    let work = {
        let mut scheduler = shared.scheduler.lock().unwrap_or_else(|p| p.into_inner());
        let Some(work) = scheduler.next_work()? else {
            return Ok(false);
        };
        if shared.config.serial_reads {
            // Fill while still holding the scheduler: reads then reach the sources in item order.
            fill_chunk(shared, &work, writable, scratch)?;
        }
        work
    };
    if !shared.config.serial_reads {
        fill_chunk(shared, &work, writable, scratch)?;
    }
    let (guest, len) = (work.guest(), work.len());
    match &work {
        Work::Zero { .. } => {
            shared.dest.zero(guest, len)?;
            if let Some(feeder) = digest {
                // A send fails only when the digest thread has given up on a halted run.
                let _ = feeder.send(Piece::Zeros { guest, len });
            }
        }
        Work::Chunk { .. } => {
            if let Some(feeder) = digest {
                // Hand the filled buffer to the digest first, so hashing and writing overlap.
                let (done, hashed) = std::sync::mpsc::sync_channel(0);
                buffer.hashed = Some(hashed);
                let _ = feeder.send(Piece::Bytes { guest, len: len as usize, buffer: buffer.buffer.clone(), done });
            }
            shared.dest.write_runs(guest, &buffer.buffer[..len as usize])?;
        }
        Work::Keep { .. } => {}
    }
    let watermark = shared.completion.complete(guest, guest + len);
    shared.progress.advance(len, watermark);
    shared.progress.note_written(shared.dest.stats.written.load(Ordering::Relaxed));
    Ok(true)
}

fn fill_chunk(shared: &Shared, work: &Work, buffer: &mut AlignedBuf, scratch: &mut Scratch) -> Result<()> {
    if let Work::Chunk { guest, len, extents } = work {
        fill::fill(&shared.sources, extents, *guest, &mut buffer[..*len as usize], scratch)?;
    }
    Ok(())
}
