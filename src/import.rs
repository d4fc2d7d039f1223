//! An import from start to finish: the [`Plan`] front ends build, and [`run`], which wires source → format →
//! pipeline → sink for it and reports an [`Outcome`].

use crate::budget::{Budget, Sizing, SizingOverride};
use crate::cgroup::governor::{Governor, GovernorSummary, Targets};
use crate::cgroup::MemCgroup;
use crate::checksum::{hex, Algorithm, Checksum, Hasher};
use crate::error::{ErrorKind, Result};
use crate::format::{self, BackingPolicy};
use crate::pipeline::{self, schedule::Scheduler};
use crate::progress::Progress;
use crate::resume::Checkpoints;
use crate::sink::{DestKind, DestOptions, Destination, IoChoice};
use crate::size::human;
use crate::source::decompress::Compression;
use crate::source::open::{open, Input};
use crate::source::{FileSource, HashingSource, HttpOptions, Location, ReadAt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// Everything an import needs to know, independent of the front end that asked for it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The image to read.
    pub source: Location,
    /// How to reach a URL source.
    pub http: HttpOptions,
    /// Directory for a spool file, when a forward-only stream needs one.
    pub scratch: Option<PathBuf>,
    /// Where to write the raw image.
    pub destination: PathBuf,
    /// Memory budget in bytes (`None`: the cgroup's limit, else the default).
    pub limit: Option<u64>,
    /// Write path.
    pub io: IoChoice,
    /// Expected checksum of the source bytes.
    pub checksum: Option<Checksum>,
    /// Follow backing files.
    pub allow_backing: bool,
    /// Follow backing files outside the image's directory (absolute names, `..`, symlinks elsewhere).
    pub allow_backing_outside: bool,
    /// The destination device already reads as zeros.
    pub target_is_zero: bool,
    /// Digest the written image (SHA-256).
    pub output_digest: bool,
    /// Append every governor reading to this CSV file.
    pub governor_timeline: Option<PathBuf>,
    /// Overrides of the sizing derived from the budget (workers, chunk size), for benchmarking.
    pub sizing_override: SizingOverride,
    /// Record durable progress and continue an interrupted import of the same image.
    pub resume: Option<ResumeOptions>,
    /// Permission bits for a newly created destination file.
    pub file_mode: u32,
    /// Refuse, before writing anything, an image whose virtual size exceeds this many bytes (the space a CDI
    /// volume reports).
    pub max_virtual_size: Option<u64>,
    /// Allocate the destination's blocks: a file is fallocated whole, a block device's zero ranges are zeroed
    /// without unmapping.
    pub preallocate: bool,
    /// The stream is the raw disk byte for byte (a clone stream): no decompression, no format detection.
    pub verbatim: bool,
}

impl Plan {
    /// A plan with defaults for everything but the two paths.
    pub fn new(source: Location, destination: impl Into<PathBuf>) -> Self {
        Plan {
            source,
            http: HttpOptions::default(),
            scratch: None,
            destination: destination.into(),
            limit: None,
            io: IoChoice::Auto,
            checksum: None,
            allow_backing: false,
            allow_backing_outside: false,
            target_is_zero: false,
            output_digest: true,
            governor_timeline: None,
            sizing_override: SizingOverride::default(),
            resume: None,
            file_mode: 0o644,
            max_virtual_size: None,
            preallocate: false,
            verbatim: false,
        }
    }
}

/// How to resume.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// Directory for the state file (needed for block devices; files keep theirs beside them).
    pub state_dir: Option<PathBuf>,
}

/// How often durable progress is recorded while resuming is enabled.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// Source location.
    pub source: Location,
    /// Destination path.
    pub destination: PathBuf,
    /// Detected image format.
    pub format: &'static str,
    /// Size of the virtual disk.
    pub virtual_size: u64,
    /// Destination kind.
    pub destination_kind: DestKind,
    /// Write path used ("direct" or "writebehind").
    pub io: &'static str,
    /// Bytes written as data.
    pub bytes_written: u64,
    /// Zero bytes left as holes or skipped (never written).
    pub zero_bytes_skipped: u64,
    /// Zero bytes zeroed explicitly on a block device.
    pub zero_bytes_zeroed: u64,
    /// Bytes read from a local image file by a random-access import (metadata and alignment padding included):
    /// zeros the image maps as unallocated or zero are never read. `None` for streams and URLs.
    pub source_bytes_read: Option<u64>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// SHA-256 of the written image, lower-case hex.
    pub sha256: Option<String>,
    /// The verified source checksum, if one was given.
    pub source_checksum: Option<String>,
    /// The memory budget.
    pub budget: Budget,
    /// How the import sized itself from the budget.
    pub sizing: Sizing,
    /// What the write-behind governor saw (write-behind path only).
    pub governor: Option<GovernorSummary>,
    /// Guest offset this run started from (non-zero when it resumed an interrupted import).
    pub resumed_at: u64,
    /// Compression layers unwrapped, outermost first.
    pub compression: Vec<Compression>,
    /// Bytes of a stream kept in a spool (memory or `--scratch` file) because they could not be placed yet.
    pub spooled_bytes: u64,
    /// HTTP requests sent, for a URL source.
    pub http_requests: Option<u64>,
}

/// What every import path shares: the memory cgroup, the budget and the sizing derived from it.
pub struct Context {
    /// Our memory cgroup, if any.
    pub cgroup: Option<MemCgroup>,
    /// The budget.
    pub budget: Budget,
    /// The sizing derived from it.
    pub sizing: Sizing,
}

/// Runs `plan`, advancing `progress`; raising `stop` ends the import early with an interrupted error.
pub fn run(plan: &Plan, progress: &Progress, stop: &AtomicBool) -> Result<Outcome> {
    let cgroup = MemCgroup::own()?;
    let budget = Budget::resolve(plan.limit, cgroup.as_ref())?;
    let sizing = plan.sizing_override.apply(budget.sizing());
    log::debug!("memory budget {budget}: {} workers x {} chunks", sizing.workers, human(sizing.chunk));
    if crate::buffer::huge_page_mode().as_deref() == Some("never") {
        // Measured onto a virtio disk: 3.56 s instead of 1.91 s for 3 GiB (README, Speed).
        log::info!(
            "transparent huge pages are off: 4 KiB-page buffers split large requests at the disk's segment limit"
        );
    }

    let ctx = Context { cgroup, budget, sizing };
    let opened = open(&plan.source, &plan.http)?;
    run_opened(plan, &ctx, opened, progress, stop)
}

/// Runs `plan` on a forward-only stream the caller already has (an upload body, a registry layer's disk):
/// `plan.source` only names it in messages and the report; `len` is the number of bytes as stored, when known.
pub fn run_stream(
    plan: &Plan,
    reader: Box<dyn std::io::Read + Send>,
    len: Option<u64>,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let cgroup = MemCgroup::own()?;
    let budget = Budget::resolve(plan.limit, cgroup.as_ref())?;
    let sizing = plan.sizing_override.apply(budget.sizing());
    let ctx = Context { cgroup, budget, sizing };
    let opened = crate::source::open::Opened { input: Input::Stream { reader, len }, client: None };
    run_opened(plan, &ctx, opened, progress, stop)
}

fn run_opened(
    plan: &Plan,
    ctx: &Context,
    opened: crate::source::open::Opened,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let client = opened.client;
    let result = match opened.input {
        Input::Random { source, base_dir } => {
            import_random(plan, ctx, source, base_dir, plan.checksum.as_ref(), client.is_some(), progress, stop)
        }
        Input::Stream { reader, len } => crate::stream::import(plan, ctx, reader, len, progress, stop),
    };
    if let Some(client) = &client {
        log::info!("{}: {} HTTP requests", client.name(), client.requests());
    }
    let mut outcome = result?;
    outcome.http_requests = client.map(|c| c.requests());
    Ok(outcome)
}

/// Imports from a random-access source through the pipeline. `base_dir` is where a local image's backing files
/// live; `checksum` is verified over `file` (a tap reads it whole, in order); `serial` asks for reads in offset
/// order (a network source reads best front to back).
#[allow(clippy::too_many_arguments)]
pub(crate) fn import_random(
    plan: &Plan,
    ctx: &Context,
    file: Arc<dyn ReadAt>,
    base_dir: Option<PathBuf>,
    checksum: Option<&Checksum>,
    serial: bool,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let sizing = ctx.sizing;
    let tap = checksum.map(|c| Arc::new(HashingSource::new(file.clone(), c.algorithm)));
    let source: Arc<dyn ReadAt> = match &tap {
        Some(tap) => tap.clone(),
        None => file.clone(),
    };
    let backing =
        BackingPolicy { allow: plan.allow_backing, allow_outside: plan.allow_backing_outside, root: None, base_dir };
    let image = format::open(source, &backing)?;
    let virtual_size = image.virtual_size();
    let format_name = image.format_name();
    log::info!("{}: {format_name} image, virtual size {virtual_size} bytes ({})", plan.source, human(virtual_size));

    let kind = DestKind::of(&plan.destination)?;
    let checkpoints = match &plan.resume {
        Some(options) => Some(Checkpoints::new(
            &plan.source.to_string(),
            file.as_ref(),
            &plan.destination,
            kind,
            virtual_size,
            options.state_dir.as_deref(),
        )?),
        None => None,
    };
    let start = match &checkpoints {
        Some(checkpoints) => checkpoints.resume_point(destination_holds(&plan.destination, kind, virtual_size))?,
        None => 0,
    };
    // The digest covers the whole image: on resume, the part already written is read back from the destination.
    let digest_prefix = match (plan.output_digest, start) {
        (false, _) => None,
        (true, 0) => Some((Hasher::new(Algorithm::Sha256), 0)),
        (true, start) => Some((hash_prefix(&plan.destination, start)?, start)),
    };

    let dest = open_destination(plan, ctx, virtual_size, start > 0)?;
    log::info!("{}: writing {} ({})", plan.destination.display(), dest.io_name(), dest.io_reason);

    progress.set_total(virtual_size);
    progress.advance(start, start);
    let config = pipeline::Config {
        workers: sizing.workers,
        chunk: sizing.chunk,
        serial_reads: tap.is_some() || serial,
        output_digest: digest_prefix,
    };
    let scheduler = Scheduler::starting_at(image, sizing.chunk, start);
    let outcome = match &checkpoints {
        None => pipeline::run(scheduler, &dest, &config, progress, stop),
        Some(checkpoints) => with_checkpoints(checkpoints, &dest, progress, start, || {
            pipeline::run(scheduler, &dest, &config, progress, stop)
        }),
    };
    if let Err(err) = &outcome {
        if err.kind() == ErrorKind::Interrupted {
            // Leave what was written durable, so a rerun or resume starts from a known state.
            dest.finish()?;
        }
    }
    let pipeline_outcome = outcome?;
    let governor = dest.finish()?;

    let source_checksum = match (checksum, &tap) {
        (Some(expected), Some(tap)) => {
            let hashed = tap.finish()?;
            if hashed.gap_bytes > 0 {
                log::debug!("read {} extra to checksum the source", human(hashed.gap_bytes));
            }
            if let Err(mismatch) = expected.verify(&hashed.digest, &plan.source.to_string()) {
                // What was written came from the wrong bytes: nothing to resume from.
                if let Some(checkpoints) = &checkpoints {
                    checkpoints.clear()?;
                }
                crate::stream::discard(&dest, &mismatch);
                return Err(mismatch);
            }
            Some(expected.to_string())
        }
        _ => None,
    };
    if let Some(checkpoints) = &checkpoints {
        checkpoints.clear()?;
    }
    let mut result = outcome_of(
        plan,
        ctx,
        &dest,
        format_name,
        virtual_size,
        progress,
        pipeline_outcome.output_digest.as_deref().map(hex),
        governor,
    );
    result.source_checksum = source_checksum;
    result.resumed_at = start;
    result.source_bytes_read = file.bytes_read();
    Ok(result)
}

/// Opens the destination for an image of `size` bytes with the plan's write path; `keep_contents` keeps a file's
/// existing bytes (resuming).
pub(crate) fn open_destination(plan: &Plan, ctx: &Context, size: u64, keep_contents: bool) -> Result<Destination> {
    let options = DestOptions {
        io: plan.io,
        target_is_zero: plan.target_is_zero,
        file_mode: plan.file_mode,
        keep_contents,
        preallocate: plan.preallocate,
        max_size: plan.max_virtual_size,
    };
    let sizing = ctx.sizing;
    let governor = || {
        let targets = Targets { dirty_writeback: sizing.dirty_target, usage_ceiling: Some(sizing.usage_ceiling) };
        Governor::new(ctx.cgroup.clone(), targets, plan.governor_timeline.as_deref())
    };
    Destination::open(&plan.destination, size, &options, governor)
}

/// The report of a finished import into `dest`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn outcome_of(
    plan: &Plan,
    ctx: &Context,
    dest: &Destination,
    format: &'static str,
    virtual_size: u64,
    progress: &Progress,
    sha256: Option<String>,
    governor: Option<GovernorSummary>,
) -> Outcome {
    let stats = &dest.stats;
    Outcome {
        source: plan.source.clone(),
        destination: plan.destination.clone(),
        format,
        virtual_size,
        destination_kind: dest.kind(),
        io: dest.io_name(),
        bytes_written: stats.written.load(Ordering::Relaxed),
        zero_bytes_skipped: stats.skipped.load(Ordering::Relaxed),
        zero_bytes_zeroed: stats.zeroed.load(Ordering::Relaxed),
        source_bytes_read: None,
        seconds: progress.elapsed().as_secs_f64(),
        sha256,
        source_checksum: None,
        budget: ctx.budget,
        sizing: ctx.sizing,
        governor,
        resumed_at: 0,
        compression: Vec::new(),
        spooled_bytes: 0,
        http_requests: None,
    }
}

/// Runs `pipeline` while a checkpointer records durable progress every [`CHECKPOINT_INTERVAL`]: sync the
/// destination, then record the watermark read before the sync. When the pipeline fails, what it completed is
/// recorded once more, so a rerun continues from there.
fn with_checkpoints<T>(
    checkpoints: &Checkpoints,
    dest: &Destination,
    progress: &Progress,
    start: u64,
    pipeline: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let checkpoint = |last: &mut u64| {
        let watermark = progress.watermark();
        if watermark > *last {
            match dest.sync().and_then(|()| checkpoints.record(watermark)) {
                Ok(()) => *last = watermark,
                Err(e) => log::warn!("cannot record resume state: {e}"),
            }
        }
    };
    let (finished, until_finished) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let recorder = scope.spawn(move || {
            let mut last = start;
            while let Err(RecvTimeoutError::Timeout) = until_finished.recv_timeout(CHECKPOINT_INTERVAL) {
                checkpoint(&mut last);
            }
            last
        });
        let outcome = pipeline();
        drop(finished);
        let mut last = recorder.join().unwrap_or(start);
        if outcome.is_err() {
            checkpoint(&mut last);
        }
        outcome
    })
}

/// How many bytes of the image a resumable destination holds: a file's length, or the image size for a device
/// big enough to hold it.
fn destination_holds(path: &Path, kind: DestKind, virtual_size: u64) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    match kind {
        DestKind::RegularFile => Some(meta.len()),
        DestKind::BlockDevice => {
            let device = std::fs::File::open(path).ok()?;
            let capacity = crate::sys::file_or_device_size(&device).ok()?;
            (capacity >= virtual_size).then_some(virtual_size)
        }
    }
}

/// SHA-256 state over the first `len` bytes of the destination, read back (without page cache) for a resumed
/// import's digest.
fn hash_prefix(destination: &Path, len: u64) -> Result<Hasher> {
    let source = FileSource::open(destination)?;
    let mut hasher = Hasher::new(Algorithm::Sha256);
    let mut buffer = crate::buffer::AlignedBuf::new(4 << 20);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buffer.capacity() as u64) as usize;
        crate::source::read_exact_at(&source, at, &mut buffer[..n], "resumed destination")?;
        hasher.update(&buffer[..n]);
        at += n as u64;
    }
    Ok(hasher)
}
