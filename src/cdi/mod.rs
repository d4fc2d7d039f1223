//! `boundimport cdi`: a drop-in entrypoint for KubeVirt CDI's importer pod (`cdi-importer`).
//!
//! It reads the pod's environment ([`env`]), writes to the volume the pod mounts ([`dest`]: a block device or
//! `/data/disk.img`, sized as CDI sizes it), publishes progress where the controller scrapes it ([`metrics`]),
//! and leaves the result in the termination log ([`termination`]). The import itself is an ordinary
//! [`Plan`](crate::import::Plan): bounded by the pod cgroup's own memory limit, unprivileged throughout.
//! Archives (`IMPORTER_CONTENTTYPE=archive`, compressed or not) are extracted by [`archive`].

pub mod archive;
pub mod dest;
pub mod env;
pub mod metrics;
mod registry;
pub use crate::source::tar;
pub mod termination;

use crate::budget::Budget;
use crate::cgroup::governor::Targets;
use crate::cgroup::MemCgroup;
use crate::error::{Error, ErrorKind, Result};
use crate::import::{self, Plan};
use crate::progress::Progress;
use crate::source::decompress::unwrap_layers;
use crate::source::open::Input;
use crate::source::sequential::{HashingReader, ReadAtReader, StreamTap};
use crate::source::{HttpOptions, Location};
use crate::stream::xz_memlimit;
use dest::Volume;
use env::{CdiEnv, ContentType, Source};
use metrics::Metrics;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use termination::TerminationMessage;

/// klog flags the controller (or a pod spec) may pass as `-name` or `-name=value`.
const KLOG_FLAGS: &[&str] = &["v", "alsologtostderr", "logtostderr", "stderrthreshold", "vmodule"];

/// How long to wait for `IMPORTER_READY_FILE` (CDI: 60 s).
const READY_FILE_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `boundimport cdi`. Everything else comes from the environment CDI's controller sets.
#[derive(Debug, Clone, clap::Args)]
pub struct CdiArgs {
    /// klog verbosity, as the controller passes it (`-v=N`): 0-1 info, 2-3 debug, 4 and more trace.
    #[arg(long = "v", value_name = "N", default_value_t = 0)]
    pub verbosity: u8,

    /// Accepted for klog compatibility: logs always go to stderr.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub alsologtostderr: Option<String>,

    /// Accepted for klog compatibility: logs always go to stderr.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub logtostderr: Option<String>,

    /// Accepted for klog compatibility and ignored.
    #[arg(long, value_name = "LEVEL", hide = true)]
    pub stderrthreshold: Option<String>,

    /// Accepted for klog compatibility and ignored.
    #[arg(long, value_name = "PATTERN", hide = true)]
    pub vmodule: Option<String>,

    /// Data directory of a filesystem volume (the image goes to DATA_DIR/disk.img).
    #[arg(long, value_name = "DIR", default_value = "/data")]
    pub data_dir: PathBuf,

    /// Device node of a block volume; used when it exists.
    #[arg(long, value_name = "PATH", default_value = "/dev/cdi-block-volume")]
    pub block_path: PathBuf,

    /// Where the result is written for the controller.
    #[arg(long, value_name = "PATH", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,

    /// Listen address of the HTTPS progress endpoint (`:PORT` means every interface).
    #[arg(long, value_name = "[HOST]:PORT", default_value = ":8443")]
    pub metrics_addr: String,

    /// Scratch volume for sources that can only be read as a stream and need spooling (used when it exists).
    #[arg(long, value_name = "DIR", default_value = "/scratch")]
    pub scratch_dir: PathBuf,

    /// Directory of the cluster proxy's CA certificates (read when it exists).
    #[arg(long, value_name = "DIR", default_value = "/proxycerts/")]
    pub proxy_cert_dir: PathBuf,

    /// Directory of secret extra-header files (read when it exists).
    #[arg(long, value_name = "DIR", default_value = "/extraheaders")]
    pub extra_headers_dir: PathBuf,

    /// Keep serving the final metrics this many seconds after a successful import (default: exit at once).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub metrics_linger: f64,

    /// Another importer (CDI's own `cdi-importer`) to exec, with the same arguments, when IMPORTER_SOURCE is one
    /// boundimport does not import (s3, gcs, imageio, vddk).
    #[arg(long, value_name = "PATH", env = "BOUNDIMPORT_CDI_FALLBACK")]
    pub fallback: Option<PathBuf>,
}

/// How an importer run ended.
#[derive(Debug)]
enum Finish {
    /// Success, with the JSON to report.
    Success(TerminationMessage),
    /// The source failed its checksum: data removed, reported as JSON, exit 0 (CDI's fatal, no-retry case).
    ChecksumMismatch(String),
    /// Any other failure: a plain line, exit 1 (kubelet restarts the pod).
    Failure(String),
}

/// Rewrites klog-style single-dash long flags (`-v=3`, `-alsologtostderr`) after the `cdi` subcommand into the
/// double-dash form clap parses. A binary invoked as `cdi-importer` runs `cdi` (for images that replace CDI's
/// binary in place). Returns the arguments and whether they select the `cdi` subcommand.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> (Vec<OsString>, bool) {
    let mut args: Vec<OsString> = args.into_iter().collect();
    let invoked_as_importer =
        args.first().and_then(|arg0| Path::new(arg0).file_name()).is_some_and(|name| name == "cdi-importer");
    if invoked_as_importer {
        args.insert(1, OsString::from("cdi"));
    }
    let Some(cdi_at) = args.iter().skip(1).position(|a| a == "cdi").map(|i| i + 1) else {
        return (args, false);
    };
    // Only the subcommand itself, not a SOURCE or DEST that happens to be named "cdi".
    if args[1..cdi_at].iter().any(|a| !a.to_string_lossy().starts_with('-')) {
        return (args, false);
    }
    for arg in &mut args[cdi_at + 1..] {
        let text = arg.to_string_lossy();
        if let Some(rest) = text.strip_prefix('-').filter(|r| !r.starts_with('-')) {
            let name = rest.split('=').next().unwrap_or("");
            if KLOG_FLAGS.contains(&name) {
                *arg = OsString::from(format!("-{text}"));
            }
        }
    }
    (args, true)
}

/// Writes a failure that happened before the arguments could be parsed (default termination-log path).
pub fn report_usage_error(message: &str) {
    let path = Path::new("/dev/termination-log");
    if let Err(e) = termination::write_plain(path, message) {
        log::debug!("{}: {e}", path.display());
    }
}

/// Sources `boundimport cdi` imports itself.
fn handles_source(source: &str) -> bool {
    matches!(source, "" | "http" | "registry" | "none")
}

/// The klog flags among the arguments given after the `cdi` subcommand (or after the program name, when invoked
/// as `cdi-importer`): what CDI's own importer understands, without boundimport's options.
fn klog_args(all: &[OsString]) -> Vec<OsString> {
    let invoked_as_importer =
        all.first().and_then(|a| Path::new(a).file_name()).is_some_and(|name| name == "cdi-importer");
    let start = if invoked_as_importer { 1 } else { all.iter().skip(1).position(|a| a == "cdi").map_or(1, |i| i + 2) };
    let mut kept = Vec::new();
    let mut rest = all.get(start..).unwrap_or_default().iter();
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy();
        let flag = text.trim_start_matches('-');
        let (name, has_value) = match flag.split_once('=') {
            Some((name, _)) => (name, true),
            None => (flag, false),
        };
        if text.starts_with('-') && KLOG_FLAGS.contains(&name) {
            kept.push(arg.clone());
            if !has_value && matches!(name, "v" | "stderrthreshold" | "vmodule") {
                kept.extend(rest.next().cloned());
            }
        }
    }
    kept
}

/// Replaces this process with `fallback`, passing on our arguments; returns only if the exec failed.
fn exec_fallback(fallback: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    log::info!("IMPORTER_SOURCE is not imported by boundimport: handing over to {}", fallback.display());
    let all: Vec<OsString> = std::env::args_os().collect();
    std::process::Command::new(fallback).args(klog_args(&all)).exec()
}

/// Runs the importer; returns the process exit code.
pub fn main(args: CdiArgs) -> i32 {
    let verbosity = match args.verbosity {
        0..=1 => 0,
        2..=3 => 1,
        _ => 2,
    };
    crate::logging::init(verbosity, false);
    if let Some(fallback) = &args.fallback {
        let source = std::env::var("IMPORTER_SOURCE").unwrap_or_default();
        if !handles_source(&source) {
            let err = exec_fallback(fallback);
            let message = format!("cannot run the fallback importer {}: {err}", fallback.display());
            log::error!("{message}");
            let _ = termination::write_plain(&args.termination_log, &message);
            return 1;
        }
    }
    let stop = crate::cli::install_stop_handlers();
    let progress = Arc::new(Progress::default());
    let cgroup = match MemCgroup::own() {
        Ok(cgroup) => cgroup,
        Err(e) => {
            log::warn!("cannot find our memory cgroup: {e}");
            None
        }
    };
    // Like cdi-importer, the endpoint is up before anything else happens.
    let owner_uid = std::env::var("OWNER_UID").unwrap_or_default();
    let metrics = Arc::new(Metrics::new(owner_uid, progress.clone(), cgroup.clone()));
    match Budget::resolve(None, cgroup.as_ref()) {
        Ok(budget) => {
            log::info!("memory budget {budget}");
            metrics.set_budget(budget.bytes);
        }
        Err(e) => log::warn!("cannot read the memory budget: {e}"),
    }
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

    let context = Context { args: &args, metrics: &metrics, progress: &progress, cgroup: cgroup.as_ref(), stop };
    let finish = context.run();
    let code = report(&args, finish);
    if code == 0 && serving && args.metrics_linger > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(args.metrics_linger.min(3600.0)));
    }
    code
}

/// Writes the termination log for `finish` and picks the exit code.
fn report(args: &CdiArgs, finish: Finish) -> i32 {
    let path = &args.termination_log;
    let (written, code) = match finish {
        Finish::Success(message) => {
            log::info!("{}", message.to_json());
            (termination::write_json(path, &message), 0)
        }
        Finish::ChecksumMismatch(text) => {
            log::error!("{text}");
            (termination::write_json(path, &TerminationMessage::message_only(text)), 0)
        }
        Finish::Failure(text) => {
            log::error!("{text}");
            (termination::write_plain(path, &text), 1)
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
    cgroup: Option<&'a MemCgroup>,
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
        let volume = match Volume::detect(&self.args.block_path, &self.args.data_dir) {
            Ok(volume) => volume,
            Err(e) => return Finish::Failure(e.to_string()),
        };
        log::info!("destination: {volume:?}");
        let finish = match &env.source {
            Source::Blank => self.blank(&env, &volume),
            Source::Registry(image) => self.import_registry(&env, &volume, image),
            Source::Http(location) => match self.wait_for_ready_file(&env, location) {
                Err(message) => Finish::Failure(message),
                Ok(location) => {
                    let finish = match env.content_type {
                        ContentType::Kubevirt => self.import_image(&env, &volume, location),
                        ContentType::Archive => self.import_archive(&env, &volume, location),
                    };
                    if matches!(finish, Finish::Success(_)) {
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
        let options = crate::sink::DestOptions { preallocate: true, ..Default::default() };
        let governor = || crate::cgroup::governor::Governor::new(self.cgroup.cloned(), self.pacing_targets(), None);
        let destination = crate::sink::Destination::open(device, size, &options, governor)?;
        self.progress.set_total(size);
        if size > 0 {
            destination.zero(0, size)?;
        }
        self.progress.advance(size, size);
        destination.finish()?;
        dest::sync_path(device)
    }

    /// Governor targets for writes outside an import pipeline (archive members, blank preallocation).
    fn pacing_targets(&self) -> Targets {
        let budget = Budget::resolve(None, self.cgroup)
            .unwrap_or(Budget { bytes: crate::budget::DEFAULT_BUDGET, origin: crate::budget::BudgetOrigin::Default });
        let sizing = budget.sizing();
        Targets { dirty_writeback: sizing.dirty_target, usage_ceiling: Some(sizing.usage_ceiling) }
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

    /// `IMPORTER_CONTENTTYPE=kubevirt`: the image converted to raw onto the volume.
    fn import_image(&self, env: &CdiEnv, volume: &Volume, location: Location) -> Finish {
        let image = volume.image_path();
        if let Volume::Filesystem(_) = volume {
            if let Err(e) = dest::remove_stale(&image) {
                return Finish::Failure(format!("Unable to process data: {e}"));
            }
        }
        let available = match dest::available_space(volume, env.image_size) {
            Ok(available) => available,
            Err(e) => return Finish::Failure(format!("Unable to process data: {e}")),
        };
        log::info!("space available for the image: {available} bytes");
        let http = match self.http_options(env) {
            Ok(http) => http,
            Err(message) => return Finish::Failure(message),
        };
        let plan = Plan {
            http,
            scratch: self.args.scratch_dir.is_dir().then(|| self.args.scratch_dir.clone()),
            checksum: env.checksum.clone(),
            output_digest: false,
            file_mode: dest::FILE_MODE,
            max_virtual_size: Some(available),
            preallocate: env.preallocation,
            ..Plan::new(location, &image)
        };
        let outcome = match import::run(&plan, self.progress, self.stop) {
            Ok(outcome) => outcome,
            Err(e) if e.kind() == ErrorKind::ChecksumMismatch => {
                // Leave no unverified data behind: CDI removes the image file (a device cannot be removed).
                if let Volume::Filesystem(_) = volume {
                    if let Err(remove) = std::fs::remove_file(&image) {
                        log::warn!("{}: cannot remove after a checksum mismatch: {remove}", image.display());
                    }
                }
                return Finish::ChecksumMismatch(format!("Unable to process data: {e}"));
            }
            Err(e) => return Finish::Failure(format!("Unable to process data: {e}")),
        };
        log::info!(
            "imported {} image of {} bytes: {} bytes written, {:.2}s",
            outcome.format,
            outcome.virtual_size,
            outcome.bytes_written,
            outcome.seconds
        );
        let finished = match volume {
            Volume::Filesystem(_) => {
                let size =
                    dest::resize_target(outcome.virtual_size, env.image_size, available, env.filesystem_overhead);
                dest::finish_file(&image, size, env.preallocation)
            }
            Volume::Block(device) => dest::sync_path(device),
        };
        match finished {
            Ok(()) => Finish::Success(TerminationMessage::import_complete(env.preallocation)),
            Err(e) => Finish::Failure(format!("Unable to process data: {e}")),
        }
    }

    /// `IMPORTER_CONTENTTYPE=archive`: a tar stream extracted into the data directory.
    fn import_archive(&self, env: &CdiEnv, volume: &Volume, location: Location) -> Finish {
        let Volume::Filesystem(dir) = volume else {
            return Finish::Failure(
                "Unable to process data: content type archive needs a filesystem volume, not a block volume".into(),
            );
        };
        let http = match self.http_options(env) {
            Ok(http) => http,
            Err(message) => return Finish::Failure(message),
        };
        let name = location.to_string();
        let (raw, length) = match open_stream(&location, &http) {
            Ok(opened) => opened,
            Err(e) => return Finish::Failure(format!("Unable to process data: {e}")),
        };
        self.progress.set_total(length.unwrap_or(0));
        // The checksum and the progress follow the bytes as downloaded, before any decompression.
        let tap = StreamTap::new(env.checksum.as_ref().map(|c| c.algorithm));
        let budget = Budget::resolve(None, self.cgroup).map_or(crate::budget::DEFAULT_BUDGET, |b| b.bytes);
        let tapped = Box::new(HashingReader::new(raw, tap.clone()));
        let (stream, layers) = match unwrap_layers(tapped, &name, xz_memlimit(budget)) {
            Ok(unwrapped) => unwrapped,
            Err(e) => return Finish::Failure(format!("Unable to process data: {e}")),
        };
        if !layers.is_empty() {
            let wrapped: Vec<String> = layers.iter().map(ToString::to_string).collect();
            log::info!("{name}: {}-compressed archive", wrapped.join(" in "));
        }
        let mut reader = StopReader { inner: stream, stop: self.stop };
        let pacing = archive::Pacing { cgroup: self.cgroup.cloned(), targets: self.pacing_targets() };
        let mut reported = 0u64;
        let extracted = archive::extract(&mut reader, dir, &pacing, |_| {
            let position = tap.bytes();
            if position > reported {
                self.progress.advance(position - reported, position);
                reported = position;
            }
        })
        .and_then(|extracted| {
            // The checksum covers every downloaded byte (the archive's end padding too), and a decompressor
            // checks its trailer.
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| Error::io("reading the archive's end", e))?;
            Ok(extracted)
        });
        let extracted = match extracted {
            Ok(extracted) => extracted,
            Err(e) => {
                return Finish::Failure(format!("Unable to process data: unable to untar files from endpoint: {e}"))
            }
        };
        if let Some(expected) = &env.checksum {
            if let Err(e) = expected.verify(&tap.finish().unwrap_or_default(), &name) {
                if let Err(remove) = dest::remove_dir_contents(dir) {
                    log::warn!("{remove}");
                }
                return Finish::ChecksumMismatch(format!("Unable to process data: {e}"));
            }
        }
        log::info!(
            "extracted {} files, {} directories, {} links ({} members skipped), {} bytes written",
            extracted.files,
            extracted.directories,
            extracted.links,
            extracted.skipped,
            extracted.bytes_written
        );
        self.progress.note_written(extracted.bytes_written);
        match dest::sync_filesystem(dir) {
            // CDI never preallocates an extracted archive.
            Ok(()) => Finish::Success(TerminationMessage::import_complete(false)),
            Err(e) => Finish::Failure(format!("Unable to process data: {e}")),
        }
    }

    /// How to reach the source: CA directories (the proxy's, when present, and `IMPORTER_CERT_DIR`, which must be
    /// readable), basic auth, extra headers from the environment and from secret files, TLS verification.
    fn http_options(&self, env: &CdiEnv) -> std::result::Result<HttpOptions, String> {
        let connect = |what: String| format!("Unable to connect to http data source: {what}");
        let mut ca_dirs = Vec::new();
        let proxy_dirs = [Some(self.args.proxy_cert_dir.clone()), env.proxy_cert_dir.clone()];
        for dir in proxy_dirs.into_iter().flatten() {
            // CDI reads the proxy CA directory when it exists and ignores it otherwise.
            if let Ok(count) = count_pem_certificates(&dir) {
                if count > 0 && !ca_dirs.contains(&dir) {
                    ca_dirs.push(dir);
                }
            }
        }
        if let (Some(dir), false) = (&env.cert_dir, env.insecure_tls) {
            // The configured CA directory must be listable; files without certificates are only warned about.
            let count = count_pem_certificates(dir).map_err(|e| {
                connect(format!("Error creating http client: Error listing files in {}: {e}", dir.display()))
            })?;
            if count > 0 && !ca_dirs.contains(dir) {
                ca_dirs.push(dir.clone());
            }
        }
        let mut headers = env.extra_headers.clone();
        headers.extend(
            secret_headers(&self.args.extra_headers_dir)
                .map_err(|e| connect(format!("Error getting extra headers for HTTP client: {e}")))?,
        );
        Ok(HttpOptions {
            ca_dirs,
            insecure: env.insecure_tls,
            username: env.access_key.clone(),
            password: env.secret_key.clone(),
            headers,
            ..HttpOptions::default()
        })
    }
}

/// PEM certificates in the regular files of `dir` (dot files skipped, symlinks to files followed, as CDI reads a
/// mounted ConfigMap); a file without one gets CDI's warning.
fn count_pem_certificates(dir: &Path) -> std::io::Result<usize> {
    use rustls::pki_types::pem::PemObject;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) || !path.is_file() {
            continue;
        }
        let found = rustls::pki_types::CertificateDer::pem_file_iter(&path).map_or(0, |certs| certs.flatten().count());
        if found == 0 {
            log::warn!("No certs in {}", path.display());
        }
        total += found;
    }
    Ok(total)
}

/// A blank `disk.img`: the requested size, capped by the free space, less the filesystem overhead.
fn blank_file(env: &CdiEnv, dir: &Path) -> Result<()> {
    let requested = env.image_size.ok_or_else(|| Error::usage("IMPORTER_IMAGE_SIZE is required for a blank disk"))?;
    let image = dir.join(dest::DISK_IMAGE_NAME);
    dest::remove_stale(&image)?;
    let available = dest::filesystem_available(dir)?;
    let capped = requested.min(available);
    if capped < requested {
        log::warn!("available space less than requested size, creating blank image sized to available space: {capped}");
    }
    let size = dest::usable_space(env.filesystem_overhead, capped);
    log::info!("space adjusted for filesystem overhead: {size}");
    dest::create_blank_file(&image, size, env.preallocation)
}

/// Creates `IMPORTER_DONE_FILE` after a successful import (CDI's signal to a node-pull sidecar).
fn touch_done_file(env: &CdiEnv) {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(done) = &env.done_file else { return };
    if let Err(e) = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o666).open(done) {
        log::error!("Failed creating file {}: {e}", done.display());
    }
}

/// Header lines from the files of a mounted secret directory (dot files and dot directories skipped, as in CDI).
fn secret_headers(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(headers),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    paths.sort();
    for path in paths {
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        if std::fs::symlink_metadata(&path)?.is_dir() {
            headers.extend(secret_headers(&path)?);
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        match env::parse_header(text.trim_end_matches(['\n', '\r'])) {
            Some(header) => headers.push(header),
            None => log::warn!("{}: not a \"Name: value\" header; ignored", path.display()),
        }
    }
    Ok(headers)
}

/// Opens the archive stream (a local file or a URL), as stored: the reader and its length when known.
fn open_stream(location: &Location, http: &HttpOptions) -> Result<(Box<dyn Read + Send>, Option<u64>)> {
    let opened = crate::source::open::open(location, http)?;
    Ok(match opened.input {
        Input::Random { source, .. } => {
            let len = source.len();
            (Box::new(ReadAtReader::new(source)), Some(len))
        }
        Input::Stream { reader, len } => (reader, len),
    })
}

/// Stops reading when the import is interrupted.
struct StopReader<'a, R> {
    inner: R,
    stop: &'a AtomicBool,
}

impl<R: Read> Read for StopReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            // Not ErrorKind::Interrupted: read_exact would retry that forever.
            return Err(std::io::Error::other("import stopped by a signal"));
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(args: &[&str]) -> (Vec<String>, bool) {
        let (out, cdi) = normalize_args(args.iter().map(OsString::from));
        (out.into_iter().map(|a| a.into_string().unwrap()).collect(), cdi)
    }

    #[test]
    fn klog_flags_become_long_flags_after_cdi_only() {
        assert_eq!(
            normalized(&["boundimport", "cdi", "-alsologtostderr", "-v=3", "-v", "2", "--data-dir", "/d", "-h"]),
            (
                vec!["boundimport", "cdi", "--alsologtostderr", "--v=3", "--v", "2", "--data-dir", "/d", "-h"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                true
            )
        );
        assert!(!normalized(&["boundimport", "-v", "a", "cdi"]).1);
        assert!(!normalized(&["boundimport", "img", "out"]).1);
        let (args, cdi) = normalized(&["/usr/bin/cdi-importer", "-v=1"]);
        assert!(cdi);
        assert_eq!(args, ["/usr/bin/cdi-importer", "cdi", "--v=1"]);
    }

    #[test]
    fn the_fallback_gets_only_klog_flags() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            klog_args(&args(&[
                "boundimport",
                "cdi",
                "--fallback",
                "/x",
                "-alsologtostderr",
                "-v",
                "3",
                "--data-dir",
                "/d"
            ])),
            args(&["-alsologtostderr", "-v", "3"])
        );
        assert_eq!(klog_args(&args(&["/usr/bin/cdi-importer", "-v=1"])), args(&["-v=1"]));
        assert!(klog_args(&args(&["boundimport", "cdi"])).is_empty());
    }

    #[test]
    fn ca_directories_count_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(count_pem_certificates(dir.path()).unwrap(), 0);
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join(".hidden.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "no certificate here").unwrap();
        assert_eq!(count_pem_certificates(dir.path()).unwrap(), 1);
        assert!(count_pem_certificates(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn secret_header_files_are_read_like_cdi() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("my-secret");
        std::fs::create_dir_all(secret.join("..2024_01_01")).unwrap();
        std::fs::write(secret.join("..2024_01_01/token"), "Authorization: Bearer x\n").unwrap();
        std::os::unix::fs::symlink("..2024_01_01", secret.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", secret.join("token")).unwrap();
        std::fs::write(dir.path().join(".hidden"), "X-No: 1").unwrap();
        let headers = secret_headers(dir.path()).unwrap();
        assert_eq!(headers, [("Authorization".to_string(), "Bearer x".to_string())]);
        assert!(secret_headers(&dir.path().join("missing")).unwrap().is_empty());
    }
}
