//! The one type that owns an import from the opened destination to its outcome, whichever driver feeds it.

use super::resume::{Checkpoints, SourceId, Store};
use super::{Context, MemoryReport, Outcome, Plan};
use crate::cgroup::sampler::ChargeSampler;
use crate::checksum::{hex, Algorithm, Hasher};
use crate::error::{Error, ErrorKind, Result};
use crate::progress::Progress;
use crate::sink::{DestKind, DestOptions, Destination, Probe};
use crate::source::decompress::Compression;
use crate::source::ReadAt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// How often durable progress is recorded while resuming is enabled.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// What a driver produced, for the report.
pub(super) struct Produced {
    /// Detected image format.
    pub format: &'static str,
    /// Size of the virtual disk.
    pub virtual_size: u64,
    /// Digest of the written image, when asked for and computed.
    pub output_digest: Option<Vec<u8>>,
    /// Compression layers unwrapped, outermost first.
    pub compression: Vec<Compression>,
    /// Bytes kept in a spool.
    pub spooled_bytes: u64,
    /// Bytes read from a local image file.
    pub source_bytes_read: Option<u64>,
}

impl Produced {
    /// A report of `format` and `virtual_size`; the rest empty.
    pub fn new(format: &'static str, virtual_size: u64) -> Self {
        Produced {
            format,
            virtual_size,
            output_digest: None,
            compression: Vec::new(),
            spooled_bytes: 0,
            source_bytes_read: None,
        }
    }
}

/// An import in progress: its destination, its checkpoints, and where it started.
pub(super) struct Engine<'a> {
    plan: &'a Plan,
    ctx: &'a Context,
    progress: &'a Progress,
    dest: Destination,
    checkpoints: Option<Checkpoints>,
    start: u64,
    /// Whether the destination file is ours (it did not exist before this import).
    created: bool,
    /// The highest watermark recorded durably (a rerun resumes from it); `start` until one is.
    recorded: AtomicU64,
    /// The cgroup's charge, read through the import.
    charge: Option<ChargeSampler>,
}

/// What a resumed import must recognise as the same source.
pub(super) enum Resumable<'s> {
    /// A random-access source: its size, identity and first MiB (read only when resuming is asked for).
    Random(&'s dyn ReadAt),
    /// A stream, read again from its start when resumed: its length as stored and what names its contents.
    Stream(SourceId),
}

impl Resumable<'_> {
    fn id(self) -> Result<SourceId> {
        match self {
            Resumable::Random(source) => SourceId::read(source),
            Resumable::Stream(id) => Ok(id),
        }
    }
}

impl<'a> Engine<'a> {
    /// Examines the destination and opens it for an image of `size` bytes; with `resumable` and `--resume`,
    /// continues from the durable watermark of an interrupted import of the same source.
    pub fn open(
        plan: &'a Plan,
        ctx: &'a Context,
        progress: &'a Progress,
        size: u64,
        resumable: Option<Resumable>,
    ) -> Result<Self> {
        let probe = Probe::of(&plan.destination)?;
        let checkpoints = match (&plan.resume, resumable) {
            (Some(options), Some(resumable)) => {
                let store = Store::choose(
                    &plan.destination,
                    probe.kind,
                    probe.len,
                    size,
                    options.state_dir.as_deref(),
                    options.device_tail,
                )?;
                match store {
                    Some(store) => {
                        let id = resumable.id()?;
                        Some(Checkpoints::new(&plan.source.to_string(), id, &plan.destination, size, store))
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let start = match &checkpoints {
            Some(checkpoints) => checkpoints.resume_point(probe.holds(size))?,
            None => 0,
        };
        let options = DestOptions {
            io: plan.io,
            target_is_zero: plan.target_is_zero,
            file_mode: plan.file_mode,
            keep_contents: start > 0,
            preallocate: plan.preallocate,
            max_size: plan.max_virtual_size,
            grow_to: plan.grow_file_to,
            in_place: plan.delta.is_some(),
        };
        let governor = || {
            let governor = crate::cgroup::governor::Governor::new(ctx.cgroup.clone(), ctx.sizing.governor_targets())?;
            Ok(match &plan.governor_observer {
                Some(factory) => governor.observed_by((factory.0)()?),
                None => governor,
            })
        };
        let dest = Destination::open_probed(&probe, size, &options, governor)?;
        log::info!("{}: writing {} ({})", plan.destination.display(), dest.io_name(), dest.io_reason);
        progress.resume_from(start);
        if checkpoints.is_some() {
            progress.set_resumable();
        }
        let created = probe.kind == DestKind::RegularFile && !probe.exists;
        progress.set_budget(ctx.budget.bytes);
        let charge = ctx.cgroup.clone().map(|cgroup| ChargeSampler::start(cgroup, progress.charge_feed()));
        Ok(Engine { plan, ctx, progress, dest, checkpoints, start, created, recorded: AtomicU64::new(start), charge })
    }

    /// The destination.
    pub fn dest(&self) -> &Destination {
        &self.dest
    }

    /// Guest offset the import starts from (non-zero when resuming).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The output digest's starting state: empty, or (resuming) over what the destination already holds, read
    /// back. `None` when the plan asks for no digest.
    pub fn digest_prefix(&self) -> Result<Option<(Hasher, u64)>> {
        if !self.plan.output_digest {
            return Ok(None);
        }
        let mut hasher = Hasher::new(Algorithm::Sha256);
        if self.start > 0 {
            crate::sink::probe::read_back(&self.plan.destination, self.start, |bytes| hasher.update(bytes))?;
        }
        Ok(Some((hasher, self.start)))
    }

    /// Runs `produce` while, with checkpoints, a recorder syncs the destination and records the watermark every
    /// [`CHECKPOINT_INTERVAL`]; when `produce` fails, what it completed is recorded once more, so a rerun
    /// continues from there.
    pub fn produce<T>(&self, produce: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(checkpoints) = &self.checkpoints else {
            return produce();
        };
        let checkpoint = |last: &mut u64| {
            let watermark = self.progress.watermark();
            if watermark > *last {
                match self.dest.sync().and_then(|()| checkpoints.record(watermark)) {
                    Ok(()) => *last = watermark,
                    Err(e) => log::warn!("cannot record resume state: {e}"),
                }
            }
        };
        let (finished, until_finished) = mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let recorder = scope.spawn(move || {
                let mut last = self.start;
                while let Err(RecvTimeoutError::Timeout) = until_finished.recv_timeout(CHECKPOINT_INTERVAL) {
                    checkpoint(&mut last);
                }
                last
            });
            let outcome = produce();
            drop(finished);
            let mut last = recorder.join().unwrap_or(self.start);
            if outcome.is_err() {
                checkpoint(&mut last);
            }
            self.recorded.store(last, Ordering::Relaxed);
            outcome
        })
    }

    /// The finish protocol. A stopped import leaves what it wrote durable (a rerun or resume starts from a known
    /// state) and fails; a finished one is synced, then `verify` checks the source's checksum: a mismatch
    /// discards what was written (it came from the wrong bytes) and fails; then the checkpoints go and the
    /// outcome is reported.
    pub fn finish(
        mut self,
        produced: Result<Produced>,
        verify: impl FnOnce() -> Result<Option<String>>,
    ) -> Result<Outcome> {
        let produced = match produced {
            Ok(produced) => produced,
            Err(err) => {
                // A rerun can continue only from a durable checkpoint, and only past a failure that may not
                // happen again: a bad or refused image, or one too large, fails the same way from any offset.
                let transient = matches!(err.kind(), ErrorKind::Io | ErrorKind::Interrupted | ErrorKind::NeedsScratch);
                let resumable = transient && self.checkpoints.is_some() && self.recorded.load(Ordering::Relaxed) > 0;
                match err.kind() {
                    // A stop the user asked for: what was written is made durable. A block device keeps it (the
                    // stop line names the offset below which it holds the image); a file with nothing to resume
                    // from is no use to anyone and goes like any failed import's.
                    ErrorKind::Interrupted => {
                        self.dest.finish()?;
                        if !resumable && self.dest.kind() == DestKind::RegularFile {
                            self.clear_checkpoints()?;
                            let resuming = self.checkpoints.is_some();
                            return Err(match self.abandon() {
                                Some(done) => Error::interrupted_and_abandoned(self.dest.path(), done, resuming),
                                None => err,
                            });
                        }
                    }
                    // A stream whose digest failed at its end (a registry layer): what was written came from
                    // bytes now known to be wrong, so no later run may resume over it.
                    ErrorKind::ChecksumMismatch => {
                        self.clear_checkpoints()?;
                        self.discard();
                    }
                    _ if !resumable => {
                        self.clear_checkpoints()?;
                        self.abandon();
                    }
                    _ => {}
                }
                return Err(err);
            }
        };
        let governor = self.dest.finish()?;
        let memory = MemoryReport::new(self.charge.take().and_then(ChargeSampler::stop), governor.as_ref());
        let source_checksum = match verify() {
            Ok(verified) => verified,
            Err(mismatch) => {
                self.clear_checkpoints()?;
                self.discard();
                return Err(mismatch);
            }
        };
        self.clear_checkpoints()?;
        let stats = &self.dest.stats;
        Ok(Outcome {
            source: self.plan.source.clone(),
            destination: self.plan.destination.clone(),
            format: produced.format,
            virtual_size: produced.virtual_size,
            destination_kind: self.dest.kind(),
            io: self.dest.io_name(),
            bytes_written: stats.written.load(Ordering::Relaxed),
            zero_bytes_skipped: stats.skipped.load(Ordering::Relaxed),
            zero_bytes_zeroed: stats.zeroed.load(Ordering::Relaxed),
            source_bytes_read: produced.source_bytes_read,
            seconds: self.progress.elapsed().as_secs_f64(),
            sha256: produced.output_digest.as_deref().map(hex),
            source_checksum,
            budget: self.ctx.budget,
            sizing: self.ctx.sizing,
            governor,
            memory,
            resumed_at: self.start,
            compression: produced.compression,
            spooled_bytes: produced.spooled_bytes,
            http_requests: None,
            downloaded_bytes: None,
            http_connections: None,
            range_window_bytes: None,
        })
    }

    /// Forgets the resume state, if any.
    fn clear_checkpoints(&self) -> Result<()> {
        match &self.checkpoints {
            Some(checkpoints) => checkpoints.clear(),
            None => Ok(()),
        }
    }

    /// After a failure with nothing to resume from: leave nothing that looks like a complete image. A file this
    /// import created is removed; one that existed (and was truncated when the import began) is cut to nothing;
    /// a block device has its ends zeroed, so the partial image is not taken for a disk. Returns what was done,
    /// for the stop line. A delta leaves the destination as it is: it held the earlier stages' disk, which no
    /// rerun could rebuild, and the same delta applied again completes it.
    fn abandon(&self) -> Option<&'static str> {
        let path = self.dest.path();
        if self.plan.delta.is_some() {
            log::info!("{}: left mid-update; the same delta applied again completes it", path.display());
            return None;
        }
        let outcome = match self.dest.kind() {
            DestKind::RegularFile if self.created => std::fs::remove_file(path).map(|()| "removed the partial image"),
            DestKind::RegularFile => self.dest.truncate().map(|()| "cut the partial image to 0 bytes"),
            DestKind::BlockDevice => self.dest.scrub().map(|()| "zeroed the partial image's first and last MiB"),
        };
        // Info, not a warning: the failure itself is the one line the user must read (and a destination whose
        // storage failed may refuse this too).
        match outcome {
            Ok(done) => {
                log::info!("{}: {done}", path.display());
                Some(done)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                log::info!("{}: cannot remove the partial image: {e}", path.display());
                None
            }
        }
    }

    /// After a checksum mismatch: what was written came from the wrong bytes, so throw it away: a file goes as
    /// after any failure, a block device's image range is zeroed.
    /// The mismatch itself is the import's error, reported once by the front end.
    fn discard(&self) {
        log::warn!(
            "discarding what was written to {}: it came from bytes that failed their checksum",
            self.dest.path().display()
        );
        if self.dest.kind() == DestKind::RegularFile || self.plan.delta.is_some() {
            self.abandon();
        } else if let Err(e) = self.dest.discard() {
            log::warn!("could not discard the written image: {e}");
        }
    }
}

/// A failure while a stop was asked for is the stop (a download cut short, a reader that saw its stream end
/// early): reported and kept as an interruption, resumable, never as a fault of the source. Only the
/// destination's own interruption keeps its offset: a source offset would read as what was written.
pub(super) fn stop_wins(err: Error, stop: &std::sync::atomic::AtomicBool, destination: &std::path::Path) -> Error {
    let own = err.kind() == ErrorKind::Interrupted && err.path() == Some(destination);
    if own || !stop.load(std::sync::atomic::Ordering::Relaxed) {
        return err;
    }
    log::debug!("stopping; the failure it caused: {err}");
    Error::new(ErrorKind::Interrupted, "import stopped")
}
