//! The import engine: the [`Plan`] front ends build, and [`run`], which carries it from source to [`Outcome`].
//!
//! One engine, two drivers. [`Engine`](engine::Engine) owns an import from the opened destination to the
//! outcome: durable checkpoints, the finish protocol (sync on interruption, checksum verification, discard on
//! mismatch) and the report. The [random-access driver](random) feeds it from a source it can read anywhere,
//! through the pipeline's scheduler and workers; the [forward-only driver](forward) from a stream (compressed,
//! an HTTP server without Range, a registry layer, an upload body), through the format's forward walker and the
//! pipeline's chunk assembler. A new forward-only source is only a `Read` handed to [`run_stream`].

pub mod archive;
mod delta;
mod engine;
pub mod extract;
mod forward;
mod random;
pub(crate) mod resume;

use crate::budget::{Budget, Sizing, SizingOverride};
use crate::cgroup::governor::{GovernorSummary, ObserverFactory};
use crate::cgroup::MemCgroup;
use crate::checksum::Checksum;
use crate::error::Result;
use crate::progress::Progress;
use crate::sink::{DestKind, IoChoice};
use crate::size::human;
use crate::source::decompress::Compression;
use crate::source::open::{open, Input, Opened};
use crate::source::{HttpOptions, Location};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

pub use delta::Delta;

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
    /// Sees every reading of the write-behind governor (the CLI's `--governor-log`).
    pub governor_observer: Option<ObserverFactory>,
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
    /// Grow a file destination to at least this many bytes once the image is written (CDI's volume sizing).
    pub grow_file_to: Option<u64>,
    /// The stream is the raw disk byte for byte (a clone stream): no decompression, no format detection.
    pub verbatim: bool,
    /// Write the image as a delta onto the destination, which holds what its backing file holds (a warm
    /// migration's later stage): only what the image holds itself is written, over the destination in place.
    pub delta: Option<Delta>,
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
            governor_observer: None,
            sizing_override: SizingOverride::default(),
            resume: None,
            file_mode: 0o644,
            max_virtual_size: None,
            preallocate: false,
            grow_file_to: None,
            verbatim: false,
            delta: None,
        }
    }
}

/// How to resume.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// Directory for the state file (files keep theirs beside them).
    pub state_dir: Option<PathBuf>,
    /// Without a state directory, keep a block device's state in its last 4 KiB, when the image leaves them free:
    /// a CDI block volume is all that survives the pod.
    pub device_tail: bool,
}

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
    /// What the import and its cgroup used, in every I/O mode.
    pub memory: MemoryReport,
    /// Guest offset this run started from (non-zero when it resumed an interrupted import).
    pub resumed_at: u64,
    /// Compression layers unwrapped, outermost first.
    pub compression: Vec<Compression>,
    /// Bytes of a stream kept in a spool (memory or `--scratch` file) because they could not be placed yet.
    pub spooled_bytes: u64,
    /// HTTP requests sent, for a URL or registry source.
    pub http_requests: Option<u64>,
    /// Body bytes downloaded (as sent: a compressed layer counts compressed), for a URL or registry source.
    pub downloaded_bytes: Option<u64>,
    /// Most connections that carried the source's bytes at once, for a URL or object.
    pub http_connections: Option<u64>,
    /// Bytes of the parallel range requests' reorder window, when they ran.
    pub range_window_bytes: Option<u64>,
}

/// Memory as measured during an import: the bound is shown, not assumed. The import's own share and its whole
/// cgroup's figures are apart: in a cgroup shared with other work the cgroup's peak is mostly theirs.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemoryReport {
    /// The import's own share at its peak: the process's peak resident set plus, in write-behind mode, the most page
    /// cache the governor saw dirty or under writeback (the import's writes; direct I/O leaves none).
    pub import_peak_share: u64,
    /// The whole memory cgroup's highest charge during the import (sampled every 100 ms): every process in the
    /// cgroup, co-tenants included (the same figure as `cgroup_peak_charge`); `None` outside a cgroup.
    pub cgroup_peak: Option<u64>,
    /// The whole cgroup's charge as the import began (what others already held); `None` outside a cgroup.
    pub cgroup_charge_at_start: Option<u64>,
    /// `cgroup_peak`, under the name older consumers read: the whole cgroup's peak, not the import's share.
    pub cgroup_peak_charge: Option<u64>,
    /// The process's peak resident set (buffers, decoders, mapped binary).
    pub process_peak_rss: u64,
}

impl MemoryReport {
    /// The report for an import whose cgroup readings were `charge` and whose write-behind governor, if any, saw
    /// `governor`.
    pub fn new(charge: Option<crate::cgroup::sampler::ChargeSummary>, governor: Option<&GovernorSummary>) -> Self {
        let process_peak_rss = crate::sys::peak_rss();
        let cgroup_peak = charge.map(|c| c.peak);
        MemoryReport {
            import_peak_share: process_peak_rss + governor.map_or(0, |g| g.peak_dirty_writeback),
            cgroup_peak,
            cgroup_charge_at_start: charge.map(|c| c.first),
            cgroup_peak_charge: cgroup_peak,
            process_peak_rss,
        }
    }
}

/// What every import shares, resolved once per process: the memory cgroup, the budget and the sizing derived
/// from it. Front ends discover it once and hand it to every import they run.
#[derive(Debug, Clone)]
pub struct Context {
    /// Our memory cgroup, if any.
    pub cgroup: Option<MemCgroup>,
    /// The budget.
    pub budget: Budget,
    /// The sizing derived from it.
    pub sizing: Sizing,
}

impl Context {
    /// Finds our memory cgroup and resolves the budget: `limit` if given, else the cgroup's limit, else the
    /// default.
    pub fn discover(limit: Option<u64>, sizing_override: SizingOverride) -> Result<Context> {
        Self::for_cgroup(MemCgroup::own()?, limit, sizing_override)
    }

    /// The context for an already discovered cgroup.
    pub fn for_cgroup(
        cgroup: Option<MemCgroup>,
        limit: Option<u64>,
        sizing_override: SizingOverride,
    ) -> Result<Context> {
        let budget = Budget::resolve(limit, cgroup.as_ref())?;
        let sizing = sizing_override.apply(budget.sizing());
        Ok(Context { cgroup, budget, sizing })
    }
}

impl Context {
    /// The context of a CDI pod (importer or upload server): our cgroup and its budget, resolved once for
    /// everything the pod does. A pod must still import when either cannot be read: then no cgroup or the
    /// default budget, with a warning.
    pub fn for_pod() -> Context {
        let cgroup = MemCgroup::own().unwrap_or_else(|e| {
            log::warn!("cannot find our memory cgroup: {e}");
            None
        });
        let ctx = Self::for_cgroup(cgroup.clone(), None, SizingOverride::default()).unwrap_or_else(|e| {
            log::warn!("cannot read the memory budget: {e}");
            let budget = Budget { bytes: crate::budget::DEFAULT_BUDGET, origin: crate::budget::BudgetOrigin::Default };
            Context { cgroup, budget, sizing: budget.sizing() }
        });
        log::info!("memory budget {}", ctx.budget);
        ctx
    }
}

/// Says that `name` is imported as raw because nothing in it looked like an image header: a text file or an empty
/// one given by mistake shows up in the log, as the image it is not. `len` is its length; `disk` the disk it makes
/// (whole sectors, as qemu-img makes it).
fn note_headerless(name: &str, len: u64, disk: u64) {
    let padded = match disk != len {
        true => format!(", padded to a {disk}-byte disk"),
        false => String::new(),
    };
    log::info!("{name}: no image header found: importing as raw, {len} bytes ({}){padded}", human(len));
}

/// Runs `plan`, advancing `progress`; raising `stop` ends the import early with an interrupted error.
pub fn run(plan: &Plan, progress: &Progress, stop: &AtomicBool) -> Result<Outcome> {
    run_in(&Context::discover(plan.limit, plan.sizing_override)?, plan, progress, stop)
}

/// [`run`] within a context the caller already resolved.
pub fn run_in(ctx: &Context, plan: &Plan, progress: &Progress, stop: &AtomicBool) -> Result<Outcome> {
    announce(ctx);
    if let Location::Path(source) = &plan.source {
        // Before anything is opened for writing: importing a file onto itself would destroy it.
        crate::sink::Probe::of(&plan.destination)?.refuse_source(source)?;
    }
    let http = HttpOptions { range_window: ctx.budget.range_window(), ..plan.http.clone() };
    let opened = open(&plan.source, &http).map_err(|e| engine::stop_wins(e, stop, &plan.destination))?;
    run_opened(ctx, plan, opened, progress, stop)
}

/// Runs `plan` on a forward-only stream the caller already has (an upload body, a registry layer's disk):
/// `plan.source` only names it in messages and the report; `len` is the number of bytes as stored, when known.
pub fn run_stream(
    plan: &Plan,
    reader: Box<dyn Read + Send>,
    len: Option<u64>,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    run_stream_in(&Context::discover(plan.limit, plan.sizing_override)?, plan, reader, len, progress, stop)
}

/// [`run_stream`] within a context the caller already resolved.
pub fn run_stream_in(
    ctx: &Context,
    plan: &Plan,
    reader: Box<dyn Read + Send>,
    len: Option<u64>,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    announce(ctx);
    let input = Input::Stream { reader, len, identity: None };
    run_opened(ctx, plan, Opened { input, client: None }, progress, stop)
}

/// Writes a blank disk of `size` bytes to `plan.destination`: every byte reads as zero (zeroed, or allocated as
/// well with `plan.preallocate`). `plan.source` only names the disk in messages.
pub fn run_blank(ctx: &Context, plan: &Plan, size: u64, progress: &Progress, stop: &AtomicBool) -> Result<Outcome> {
    progress.set_total(size);
    let engine = engine::Engine::open(plan, ctx, progress, size, None)?;
    let zeroed = (|| {
        let mut at = 0;
        while at < size {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(crate::error::Error::interrupted(&plan.destination, at));
            }
            let len = (size - at).min(crate::pipeline::schedule::MAX_ZERO_SPAN);
            engine.dest().zero(at, len)?;
            at += len;
            progress.advance(len, at);
        }
        Ok(engine::Produced::new("raw", size))
    })();
    engine.finish(zeroed, || Ok(None))
}

fn announce(ctx: &Context) {
    let sizing = ctx.sizing;
    log::debug!("memory budget {}: {} workers x {} chunks", ctx.budget, sizing.workers, human(sizing.chunk));
    if crate::buffer::huge_page_mode().as_deref() == Some("never") {
        // Measured onto a virtio disk: 3.56 s instead of 1.91 s for 3 GiB (README, Speed).
        log::info!(
            "transparent huge pages are off: 4 KiB-page buffers split large requests at the disk's segment limit"
        );
    }
}

fn run_opened(ctx: &Context, plan: &Plan, opened: Opened, progress: &Progress, stop: &AtomicBool) -> Result<Outcome> {
    let client = opened.client;
    let result = match opened.input {
        Input::Random { source, local_path } => {
            let local = match &local_path {
                Some(path) => Some(crate::source::files::LocalFiles::beside(path, plan.allow_backing_outside)?),
                None => None,
            };
            let random = random::Random { source, local, checksum: plan.checksum.as_ref(), serial: client.is_some() };
            random::import(ctx, plan, random, progress, stop)
        }
        Input::Stream { .. } if plan.delta.is_some() => Err(crate::error::Error::unsupported(
            "a delta is applied only from a source that can be read anywhere, not from a stream",
        )
        .at_path(plan.source.to_string())),
        Input::Stream { reader, len, identity } => forward::import(ctx, plan, reader, len, identity, progress, stop),
    };
    if let Some(client) = &client {
        log::info!("{}: {} HTTP requests, {} downloaded", client.name(), client.requests(), human(client.received()));
    }
    let mut outcome = result.map_err(|e| engine::stop_wins(e, stop, &plan.destination))?;
    outcome.http_requests = client.as_ref().map(|c| c.requests());
    outcome.http_connections = client.as_ref().map(|c| c.connections());
    outcome.range_window_bytes = client.as_ref().and_then(|c| c.window());
    outcome.downloaded_bytes = client.map(|c| c.received());
    Ok(outcome)
}
