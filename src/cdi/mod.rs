//! `boundimport cdi`: a drop-in entrypoint for KubeVirt CDI's importer pod (`cdi-importer`).
//!
//! It reads the pod's environment ([`env`]), writes to the volume the pod mounts ([`Volume`]: a block device or
//! `/data/disk.img`, sized as CDI sizes it), publishes progress where the controller scrapes it ([`metrics`]),
//! and leaves the result in the termination log ([`termination`]). The import itself is an ordinary
//! [`Plan`](crate::import::Plan): bounded by the pod cgroup's own memory limit, unprivileged throughout.
//! Archives (`IMPORTER_CONTENTTYPE=archive`, compressed or not) are the engine's archive job
//! ([`crate::import::archive`]).

mod archive_import;
mod args;
mod connect;
pub mod env;
mod imageio;
pub mod metrics;
mod registry;
pub mod termination;

use crate::error::{Error, ErrorKind, Result};
use crate::import::{self, Plan, ResumeOptions};
use crate::progress::Progress;
use crate::sink::volume::{self as dest, Volume};
use crate::source::Location;
use env::{CdiEnv, ContentType, Source};
use metrics::Metrics;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use termination::TerminationMessage;

use args::exec_fallback;
pub use args::{normalize_args, report_usage_error, CdiArgs, PodArgs};
use env::handles_source;

/// How long to wait for `IMPORTER_READY_FILE` (CDI: 60 s).
const READY_FILE_TIMEOUT: Duration = Duration::from_secs(60);

/// How an importer run ended.
#[derive(Debug)]
enum Finish {
    /// Success, with the JSON to report.
    Success(TerminationMessage),
    /// The source failed its checksum: data removed, reported as JSON, exit 0 (CDI's fatal, no-retry case).
    ChecksumMismatch(String),
    /// The import needs a spool beyond its memory share and the pod has no scratch volume (CDI's
    /// `ErrRequiresScratchSpace`): nothing left on the volume, `"scratchSpaceRequired":true` reported with exit 0,
    /// and the controller starts the import again with a scratch volume at `/scratch`.
    ScratchRequired(TerminationMessage),
    /// Any other failure: a plain line, exit 1 (kubelet restarts the pod).
    Failure(String),
}

impl Finish {
    /// A finish whose termination message (success, or asking for scratch) carries `labels`.
    fn with_labels(self, labels: std::collections::BTreeMap<String, String>) -> Finish {
        match self {
            Finish::Success(message) => Finish::Success(TerminationMessage { labels, ..message }),
            Finish::ScratchRequired(message) => Finish::ScratchRequired(TerminationMessage { labels, ..message }),
            other => other,
        }
    }
}

/// Runs the importer; returns the process exit code.
pub fn main(args: CdiArgs) -> i32 {
    args.pod.klog.init_logging();
    if let Some(fallback) = &args.fallback {
        let source = std::env::var("IMPORTER_SOURCE").unwrap_or_default();
        if !handles_source(&source) {
            let err = exec_fallback(fallback);
            let message = format!("cannot run the fallback importer {}: {err}", fallback.display());
            log::error!("{message}");
            let _ = termination::write_plain(&args.pod.termination_log, &message);
            return 1;
        }
    }
    let stop = crate::process::install_stop_handlers();
    let progress = Arc::new(Progress::default());
    // The cgroup is found and the budget resolved once, here, for everything this run does.
    let engine = import::Context::for_pod();
    // Like cdi-importer, the endpoint is up before anything else happens.
    let owner_uid = std::env::var("OWNER_UID").unwrap_or_default();
    let metrics = Arc::new(Metrics::new(owner_uid, progress.clone(), engine.cgroup.clone()));
    metrics.set_budget(engine.budget.bytes);
    let serving = match metrics::start(&args.metrics_addr, metrics.clone()) {
        Ok(addr) => {
            log::info!("serving progress metrics on https://{addr}/metrics");
            true
        }
        Err(e) => {
            log::warn!("progress metrics unavailable: {e}");
            false
        }
    };

    let context = Context { args: &args, metrics: &metrics, progress: &progress, engine: &engine, stop };
    let finish = context.run();
    let code = report(&args, finish);
    if code == 0 && serving && args.metrics_linger > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(args.metrics_linger.min(3600.0)));
    }
    code
}

/// Writes the termination log for `finish` and picks the exit code.
fn report(args: &CdiArgs, finish: Finish) -> i32 {
    let path = &args.pod.termination_log;
    let (written, code) = match finish {
        Finish::Success(message) => {
            log::info!("{}", message.to_json());
            (termination::write_json(path, &message), 0)
        }
        Finish::ChecksumMismatch(text) => {
            log::error!("{text}");
            (termination::write_json(path, &TerminationMessage::message_only(text)), 0)
        }
        Finish::ScratchRequired(message) => {
            log::info!("{}", message.to_json());
            (termination::write_json(path, &message), 0)
        }
        Finish::Failure(text) => {
            log::error!("{text}");
            // A pod being deleted: the kubelet expects 128 + its signal; the checkpoints were kept for a rerun.
            let code = match crate::process::stopped_by() {
                Some((signal, code)) => {
                    log::error!("stopped by {signal}; what was written is synced and its resume state kept");
                    code
                }
                None => 1,
            };
            (termination::write_plain(path, &text), code)
        }
    };
    match written {
        Ok(()) => code,
        Err(e) => {
            log::error!("{}: cannot write the termination message: {e}", path.display());
            1
        }
    }
}

/// What one run works with.
struct Context<'a> {
    args: &'a CdiArgs,
    metrics: &'a Metrics,
    progress: &'a Arc<Progress>,
    engine: &'a import::Context,
    stop: &'a AtomicBool,
}

impl Context<'_> {
    fn run(&self) -> Finish {
        let env = match CdiEnv::from_process() {
            Ok(env) => env,
            Err(e) => return Finish::Failure(e.to_string()),
        };
        for warning in &env.warnings {
            log::warn!("{warning}");
        }
        if !env.cache_mode.is_empty() {
            log::info!("CACHE_MODE={}: accepted; boundimport bounds its page cache in every mode", env.cache_mode);
        }
        let volume = match Volume::detect(&self.args.pod.block_path, &self.args.pod.data_dir) {
            Ok(volume) => volume,
            Err(e) => return Finish::Failure(e.to_string()),
        };
        match &volume {
            Volume::Block(device) => log::info!("destination: block volume {}", device.display()),
            Volume::Filesystem(dir) => log::info!("destination: filesystem volume {}", dir.display()),
        }
        let finish = match &env.source {
            Source::Blank => self.blank(&env, &volume),
            Source::Registry(image) => self.import_registry(&env, &volume, image),
            Source::Imageio(source) => self.import_imageio(&env, &volume, source),
            Source::Location { location, data_source } => match self.wait_for_ready_file(&env, location) {
                Err(message) => Finish::Failure(message),
                Ok(location) => {
                    let finish = match env.content_type {
                        ContentType::Kubevirt => self.import_image(&env, &volume, location.clone(), Some(data_source)),
                        ContentType::Archive => self.import_archive(&env, &volume, location.clone()),
                    };
                    let finish = match (&finish, env.node_pull) {
                        (Finish::Success(_) | Finish::ScratchRequired(_), true) => {
                            finish.with_labels(registry::node_pull_labels(&location))
                        }
                        _ => finish,
                    };
                    // CDI signals a node-pull sidecar in both cases: the pod is done either way.
                    if matches!(finish, Finish::Success(_) | Finish::ScratchRequired(_)) {
                        touch_done_file(&env);
                    }
                    finish
                }
            },
        };
        if matches!(finish, Finish::Success(_)) {
            self.metrics.complete();
        }
        finish
    }

    /// `IMPORTER_SOURCE=none`: a blank raw disk.
    fn blank(&self, env: &CdiEnv, volume: &Volume) -> Finish {
        let result = match volume {
            Volume::Block(_) if !env.preallocation => {
                log::info!("blank block volume without preallocation: the empty volume is the blank disk");
                Ok(())
            }
            Volume::Block(device) => self.preallocate_block(device, env.image_size),
            Volume::Filesystem(dir) => blank_file(env, dir),
        };
        match result {
            Ok(()) => Finish::Success(TerminationMessage::blank_complete(env.preallocation)),
            Err(e) => Finish::Failure(format!("Unable to create blank image: {e}")),
        }
    }

    /// Zeroes (and so allocates) the first `min(requested, device size)` bytes of a block volume.
    fn preallocate_block(&self, device: &Path, requested: Option<u64>) -> Result<()> {
        let capacity = dest::device_size(device)?;
        let size = requested.map_or(capacity, |r| r.min(capacity));
        if size < requested.unwrap_or(0) {
            log::warn!("available space less than requested size, preallocating {size} bytes");
        }
        log::info!("{}: preallocating {size} bytes of blank block volume", device.display());
        let plan =
            Plan { preallocate: true, output_digest: false, ..Plan::new(Location::Path(device.to_path_buf()), device) };
        import::run_blank(self.engine, &plan, size, self.progress, self.stop).map(drop)
    }

    /// Waits for `IMPORTER_READY_FILE` and takes the image name from it, as CDI does for node-pulled registry
    /// images.
    fn wait_for_ready_file(&self, env: &CdiEnv, location: &Location) -> std::result::Result<Location, String> {
        let Some(ready) = &env.ready_file else {
            return Ok(location.clone());
        };
        let deadline = std::time::Instant::now() + READY_FILE_TIMEOUT;
        while !ready.exists() {
            if std::time::Instant::now() >= deadline {
                return Err(format!("Timeout waiting for file {}", ready.display()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let name =
            std::fs::read_to_string(ready).map_err(|e| format!("Failed reading file {}: {e}", ready.display()))?;
        if name.is_empty() {
            return Ok(location.clone());
        }
        let text = location.to_string();
        let base = text.strip_suffix(dest::DISK_IMAGE_NAME).unwrap_or(&text);
        Ok(Location::parse(&format!("{base}{name}")))
    }

    /// `IMPORTER_CONTENTTYPE=kubevirt`: the image converted to raw onto the volume. `opened_as` is the
    /// `IMPORTER_SOURCE` CDI names when the source refuses to open (its data source's constructor fails); `None`
    /// where the caller opened the source's session itself (registry, imageio).
    fn import_image(&self, env: &CdiEnv, volume: &Volume, location: Location, opened_as: Option<&str>) -> Finish {
        let image = volume.image_path();
        let kept = match volume {
            Volume::Filesystem(_) => match import::resume::keep_resumable_or_remove_stale(&image) {
                Ok(kept) => kept,
                Err(e) => return Finish::Failure(format!("Unable to process data: {e}")),
            },
            Volume::Block(_) => 0,
        };
        let available = match dest::available_space(volume, env.image_size, kept) {
            Ok(available) => available,
            Err(e) => return Finish::Failure(termination::import_failure(&e)),
        };
        log::info!("space available for the image: {available} bytes");
        let http = match connect::http_options(&self.args.proxy_cert_dir, &self.args.extra_headers_dir, env) {
            Ok(http) => http,
            Err(message) => return Finish::Failure(message),
        };
        let plan = Plan {
            http,
            scratch: self.args.pod.scratch_dir.is_dir().then(|| self.args.pod.scratch_dir.clone()),
            checksum: env.checksum.clone(),
            output_digest: false,
            file_mode: dest::FILE_MODE,
            max_virtual_size: Some(available),
            preallocate: env.preallocation,
            // A pod killed part-way and started again continues where its predecessor's last checkpoint was, when
            // the source proves to be the same; the state lives beside disk.img, or in a block volume's last 4 KiB.
            resume: Some(ResumeOptions { state_dir: None, device_tail: true }),
            grow_file_to: match volume {
                Volume::Filesystem(_) => dest::file_size_target(env.image_size, available, env.filesystem_overhead),
                Volume::Block(_) => None,
            },
            ..Plan::new(location, &image)
        };
        let outcome = match import::run_in(self.engine, &plan, self.progress, self.stop) {
            Ok(outcome) => outcome,
            // The engine left no unverified data behind: the image file it made is gone, a device's image range
            // zeroed.
            Err(e) if e.kind() == ErrorKind::ChecksumMismatch => {
                return Finish::ChecksumMismatch(termination::import_failure(&e))
            }
            Err(e) if e.kind() == ErrorKind::NeedsScratch => {
                log::info!("{e}");
                return self.scratch_required(volume);
            }
            // CDI's http source words its own failures (`termination::import_failure`). Another source refused
            // while being opened (no such key, a bad signature: before any offset, naming the source) is CDI's
            // "Unable to connect to <source> data source"; failing part-way (an object, an imageio daemon that died)
            // only failed to process.
            Err(e)
                if opened_as.is_some_and(|name| name != "http")
                    && e.offset().is_none()
                    && e.path() == Some(Path::new(&plan.source.to_string())) =>
            {
                let name = opened_as.unwrap_or_default();
                return Finish::Failure(format!("Unable to connect to {name} data source: {e}"));
            }
            Err(e) if e.kind() == ErrorKind::Io && !matches!(plan.source, Location::Url(_)) => {
                return Finish::Failure(format!("Unable to process data: {e}"))
            }
            Err(e) => return Finish::Failure(termination::import_failure(&e)),
        };
        log::info!(
            "imported {} image of {} bytes: {} bytes written, {:.2}s",
            outcome.format,
            outcome.virtual_size,
            outcome.bytes_written,
            outcome.seconds
        );
        // The engine synced the destination and sized the file.
        Finish::Success(TerminationMessage::import_complete(env.preallocation))
    }
}

impl Context<'_> {
    /// Ends an import that found it needs a scratch volume: whatever it wrote is removed (a device's ends are
    /// zeroed, so a partial image never looks like a disk) and the controller is asked for scratch space.
    fn scratch_required(&self, volume: &Volume) -> Finish {
        log::info!("{} does not exist: asking the controller for scratch space", self.args.pod.scratch_dir.display());
        let cleared = match volume {
            Volume::Filesystem(_) => dest::remove_stale(&volume.image_path()),
            Volume::Block(device) => dest::scrub_device(device),
        };
        if let Err(e) = cleared {
            return Finish::Failure(format!("Unable to process data: {e}"));
        }
        Finish::ScratchRequired(TerminationMessage::scratch_space_required())
    }
}

/// A blank `disk.img`: the requested size, capped by the free space, less the filesystem overhead.
fn blank_file(env: &CdiEnv, dir: &Path) -> Result<()> {
    let requested = env.image_size.ok_or_else(|| Error::usage("IMPORTER_IMAGE_SIZE is required for a blank disk"))?;
    dest::create_blank_image(dir, requested, env.filesystem_overhead, env.preallocation)
}

/// Creates `IMPORTER_DONE_FILE` after a successful import (CDI's signal to a node-pull sidecar).
fn touch_done_file(env: &CdiEnv) {
    if let Some(done) = &env.done_file {
        termination::touch_done_file(done);
    }
}
