//! The command line: parses arguments into a [`Plan`](crate::import::Plan), runs it, renders the outcome.
//! No I/O logic lives here.

use crate::budget::SizingOverride;
use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::import::{self, Outcome, Plan, ResumeOptions};
use crate::process::render::{self, ProgressStyle};
use crate::process::{exit_code, install_stop_handlers};
use crate::progress::Progress;
use crate::sink::IoChoice;
use crate::size::{human, parse_quantity};
use crate::source::object::{ObjectOptions, ObjectRef};
use crate::source::{HttpOptions, Location};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Import a VM disk image (qcow2, raw, vmdk, vhd, vhdx, vdi; plain or in gz/xz/zst/bz2/zip; from a file, an
/// http(s) URL, an s3:// or gs:// object or a containerDisk) onto a block device or raw file without filling the
/// memory cgroup.
#[derive(Debug, Parser)]
#[command(name = "boundimport", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    import: ImportArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Container entrypoint of a KubeVirt CDI importer pod: reads IMPORTER_* and the rest of CDI's environment,
    /// reports through the termination log and an HTTPS progress metric (a drop-in for `cdi-importer`).
    Cdi(crate::cdi::CdiArgs),
    /// Container entrypoint of a KubeVirt CDI upload server pod: reads TLS_*, CLIENT_*, UPLOAD_IMAGE_SIZE and the
    /// rest of CDI's environment and receives one upload over HTTPS (a drop-in for `cdi-uploadserver`).
    UploadServer(crate::upload::UploadArgs),
    /// Reproduce the importer-pod page-cache pathology and measure importers side by side (needs root).
    #[cfg(feature = "lab")]
    Lab(crate::lab::command::LabCommand),
    /// Explain a memory cgroup's usage (own, --cgroup, --pid, --pod): page cache, dirty and writeback pages,
    /// anonymous memory, limit hits, OOM kills, the processes and the files they write — and a verdict.
    Diagnose(crate::diagnose::DiagnoseArgs),
}

/// Arguments of a plain import.
#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// Image to import: a local file or block device, an http:// or https:// URL, a containerDisk
    /// (docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST], oci-archive:PATH[:TAG]), an S3 object `s3://BUCKET/KEY`
    /// (credentials from --user ACCESS_KEY:SECRET, else AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and
    /// the shared files, or AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN) or a GCS object `gs://BUCKET/OBJECT` (a
    /// service-account key in GOOGLE_APPLICATION_CREDENTIALS, else the metadata server, else anonymous;
    /// STORAGE_EMULATOR_HOST for another server). The format (raw, qcow2, vmdk, vhd, vhdx, vdi) is detected from the
    /// header, never the name, inside any gzip, xz, zstd, bzip2 or zip wrapping.
    #[arg(required = true)]
    source: Option<String>,

    /// Destination: a block device (written in place) or a file (created or truncated, sparse). Not `-`: the
    /// image is written at offsets with holes left unwritten, which standard output cannot take (`./-` is a file).
    #[arg(required = true)]
    dest: Option<PathBuf>,

    /// Memory budget for everything the import causes to be charged (buffers and page cache), as a Kubernetes
    /// quantity (600M, 600Mi, 1Gi). Default: this process's memory cgroup limit, else 600M.
    #[arg(long, value_parser = parse_limit)]
    limit: Option<u64>,

    /// Write path: direct (O_DIRECT), writebehind (buffered, paced by cgroup readings), or auto.
    #[arg(long, value_enum, default_value = "auto")]
    io: IoArg,

    /// Expected checksum of the source file, ALGO:HEX (md5, sha1, sha256, sha512).
    #[arg(long)]
    checksum: Option<Checksum>,

    /// Read the image's backing file (relative to the image's directory) instead of refusing the image. The
    /// backing chain must stay inside the image's directory; protocol names (nbd:, http:, json:) are never read.
    #[arg(long)]
    allow_backing: bool,

    /// With --allow-backing: also follow backing names that leave the image's directory (absolute paths, `..`,
    /// symlinks pointing elsewhere).
    #[arg(long, requires = "allow_backing")]
    allow_backing_outside: bool,

    /// Record durable progress and, when a previous run of the same import was interrupted, continue from it.
    /// The state lives beside a file destination (.NAME.boundimport-resume), or in --state-dir.
    #[arg(long)]
    resume: bool,

    /// Directory for the resume state (required with --resume onto a block device).
    #[arg(long, value_name = "DIR", requires = "resume")]
    state_dir: Option<PathBuf>,

    /// The destination block device already reads as zeros: skip zeroing unallocated ranges.
    #[arg(long)]
    target_is_zero: bool,

    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressStyle,

    /// Print a one-line JSON summary on stdout instead of the digest line.
    #[arg(long)]
    json: bool,

    /// Compute the SHA-256 of the written image and print it (`HEX  DEST`, or `sha256` in --json). It costs about
    /// 1 s of CPU per GiB of virtual size, zeros included, so it is off unless asked for.
    #[arg(long, conflicts_with = "no_digest")]
    digest: bool,

    /// Accepted for scripts written when the digest was on by default; does nothing.
    #[arg(long, hide = true)]
    no_digest: bool,

    /// Directory of extra PEM CA certificates trusted for https sources, besides the system roots (repeatable).
    #[arg(long, value_name = "DIR")]
    ca_dir: Vec<PathBuf>,

    /// S3 endpoint for s3:// sources (a server other than AWS), http(s)://HOST[:PORT].
    #[arg(long, value_name = "URL", env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,

    /// S3 region for signing (default: AWS_REGION, AWS_DEFAULT_REGION, the profile's, else us-east-1).
    #[arg(long)]
    region: Option<String>,

    /// Address S3 buckets in the path (https://HOST/BUCKET/KEY) instead of the host name.
    #[arg(long)]
    s3_path_style: bool,

    /// Do not verify the TLS certificate of an https source.
    #[arg(long)]
    insecure: bool,

    /// Basic-auth credentials for the source, USER or USER:PASS (also taken from the URL's user info).
    #[arg(long, value_name = "USER[:PASS]")]
    user: Option<String>,

    /// Platform to take from a multi-architecture containerDisk (docker:// or oci-archive:), ARCH or ARCH/VARIANT
    /// (amd64, arm64, arm/v7). Default: this machine's; a single-platform image must then match it.
    #[arg(long, value_name = "ARCH")]
    arch: Option<String>,

    /// Extra request header for the source, 'Name: value' (repeatable).
    #[arg(long, value_name = "NAME: VALUE", value_parser = parse_header)]
    header: Vec<(String, String)>,

    /// Directory for a spool file when a streamed source needs one (a compressed or Range-less source whose
    /// format needs random access, or a qcow2 stream with data before its tables).
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,

    /// Fail a download that delivers no byte for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    stall_timeout: f64,

    /// Reconnections (resuming where the transfer stopped) after a dropped connection before giving up.
    #[arg(long, value_name = "N", default_value_t = 5)]
    retries: u32,

    /// Connections for a remote source that honours Range: its bytes ahead are fetched as parallel range requests
    /// and handed on in order from a window sized by the memory budget. Default: start with 1 and add while the
    /// rate grows, up to 8; 1 reads over one connection.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    connections: Option<u16>,

    /// Append every cgroup reading of the write-behind governor to this CSV file.
    #[arg(long, value_name = "CSV")]
    governor_log: Option<PathBuf>,

    /// Number of pipeline workers (default: sized from the budget). A benchmarking knob.
    #[arg(long, hide = true)]
    workers: Option<usize>,

    /// Chunk size of each worker's buffer (default: sized from the budget). A benchmarking knob.
    #[arg(long, hide = true, value_parser = parse_limit)]
    chunk_size: Option<u64>,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only warnings and errors on stderr.
    #[arg(short, long)]
    quiet: bool,
}

/// `--io`: the sink's write-path choice, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum IoArg {
    /// O_DIRECT where the destination accepts it, else write-behind.
    Auto,
    /// O_DIRECT only; fail if the destination refuses it.
    Direct,
    /// Buffered writes paced by the cgroup governor.
    Writebehind,
}

impl From<IoArg> for IoChoice {
    fn from(arg: IoArg) -> IoChoice {
        match arg {
            IoArg::Auto => IoChoice::Auto,
            IoArg::Direct => IoChoice::Direct,
            IoArg::Writebehind => IoChoice::Writebehind,
        }
    }
}

fn parse_header(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() && !name.contains(char::is_whitespace) => {
            let (name, value) = (name.trim(), value.trim());
            crate::source::http::check_header(name, value).map_err(|e| e.to_string())?;
            Ok((name.to_string(), value.to_string()))
        }
        _ => Err(format!("expected 'Name: value', got {text:?}")),
    }
}

fn parse_limit(text: &str) -> std::result::Result<u64, String> {
    // Kubernetes reads `m` as milli: `600m` is 0.6 bytes, never what anyone means by a memory limit.
    if let Some(number) = text.trim().strip_suffix('m') {
        return Err(format!("{text:?} means {number} thousandths of a byte: did you mean {number}M or {number}Mi?"));
    }
    parse_quantity(text).map_err(|e| e.to_string())
}

/// Entry point of the binary: returns the process exit code.
pub fn main() -> i32 {
    crate::sys::shed_executable_cache();
    let (args, cdi) = crate::cdi::normalize_args(std::env::args_os());
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(err) => {
            if cdi && err.use_stderr() {
                crate::cdi::report_usage_error(&args, &format!("invalid arguments: {}", err.kind()));
                // One klog line, as every other line of a pod's log; clap's usage text would be many lines.
                crate::process::logging::init_klog(0);
                let text = err.to_string();
                let first = text.lines().next().unwrap_or_default();
                log::error!("{}", first.strip_prefix("error: ").unwrap_or(first));
                return 1;
            }
            err.exit()
        }
    };
    match cli.command {
        None => run_import(cli.import),
        Some(Command::Cdi(args)) => crate::cdi::main(args),
        Some(Command::UploadServer(args)) => crate::upload::main(args),
        #[cfg(feature = "lab")]
        Some(Command::Lab(lab)) => crate::lab::command::main(lab),
        Some(Command::Diagnose(args)) => crate::diagnose::main(args),
    }
}

fn run_import(args: ImportArgs) -> i32 {
    crate::process::logging::init(args.verbose, args.quiet);
    let progress = Progress::default();
    match import_and_report(&args, &progress) {
        Ok(()) => 0,
        Err(err) => {
            match crate::process::stopped_line(&err, progress.written(), progress.resumable()) {
                Some(line) => log::warn!("{line}"),
                None => log::error!("{err}"),
            }
            exit_code(&err)
        }
    }
}

fn import_and_report(args: &ImportArgs, progress: &Progress) -> Result<()> {
    let (Some(source), Some(dest)) = (&args.source, &args.dest) else {
        return Err(Error::usage("SOURCE and DEST are required"));
    };
    if let Some(Err(why)) = ObjectRef::parse_uri(source) {
        return Err(Error::usage(why).at_path(source));
    }
    if dest.as_os_str() == "-" {
        // Writing at offsets and skipping zeros needs a seekable destination; a file named `-` is never meant.
        return Err(Error::usage(
            "DEST '-': standard output cannot take a disk image (it is written at offsets, holes left unwritten); \
             give a block device or a file (./- for a file named '-')",
        ));
    }
    let plan = Plan {
        limit: args.limit,
        io: args.io.into(),
        checksum: args.checksum.clone(),
        allow_backing: args.allow_backing,
        allow_backing_outside: args.allow_backing_outside,
        target_is_zero: args.target_is_zero,
        output_digest: args.digest,
        governor_observer: args.governor_log.clone().map(crate::process::timeline::csv),
        sizing_override: SizingOverride { workers: args.workers, chunk: args.chunk_size },
        resume: args.resume.then(|| ResumeOptions { state_dir: args.state_dir.clone(), device_tail: false }),
        http: HttpOptions {
            ca_dirs: args.ca_dir.clone(),
            insecure: args.insecure,
            username: args.user.as_ref().map(|u| u.split_once(':').map_or(u.as_str(), |(name, _)| name).to_string()),
            password: args.user.as_ref().and_then(|u| u.split_once(':')).map(|(_, pass)| pass.to_string()),
            headers: args.header.clone(),
            stall_timeout: Duration::from_secs_f64(args.stall_timeout.max(0.1)),
            retries: args.retries,
            object: ObjectOptions {
                endpoint_url: args.endpoint_url.clone(),
                region: args.region.clone(),
                path_style: args.s3_path_style,
            },
            stop: Some(crate::process::stop_flag()),
            connections: args.connections.map(usize::from),
            ..HttpOptions::default()
        },
        scratch: args.scratch.clone(),
        ..Plan::new(Location::parse(source), dest)
    };
    let mut plan = plan;
    match (&mut plan.source, &args.arch) {
        (Location::Registry(image), arch) => image.arch = arch.clone(),
        (_, Some(_)) => return Err(Error::usage("--arch applies to docker:// and oci-archive: sources only")),
        _ => {}
    }
    let stop = install_stop_handlers();
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| render::report(progress, args.progress));
        let outcome = import::run(&plan, progress, stop);
        progress.finish();
        outcome
    })?;
    render(&outcome, args.json);
    Ok(())
}

fn render(outcome: &Outcome, json: bool) {
    log::info!(
        "done in {:.2}s: {} written, {} zeros skipped, {} zeroed ({}, {} write path)",
        outcome.seconds,
        human(outcome.bytes_written),
        human(outcome.zero_bytes_skipped),
        human(outcome.zero_bytes_zeroed),
        outcome.format,
        outcome.io
    );
    if let Some(cgroup_peak) = outcome.memory.cgroup_peak {
        log::info!(
            "memory: the import's own peak {}; its cgroup's peak {} (everything in the cgroup, {} at the start)",
            human(outcome.memory.import_peak_share),
            human(cgroup_peak),
            human(outcome.memory.cgroup_charge_at_start.unwrap_or(0))
        );
    }
    if json {
        println!("{}", serde_json::to_string(outcome).expect("outcome serialises"));
    } else if let Some(digest) = &outcome.sha256 {
        println!("{digest}  {}", outcome.destination.display());
    }
}
