//! `boundimport lab`: the harness's command line. Parses arguments into a [`Config`], runs a session (or the
//! bandwidth benchmark, or the hidden co-tenant probe) with Ctrl-C handled, and prints the table.

use super::fixtures::StopOnSignals;
use super::{bandwidth_label, Config, DestChoice, Importer};
use crate::error::{Error, ErrorKind, Result};
use crate::size::parse_quantity;
use clap::Subcommand;
use std::path::PathBuf;
use std::time::Duration;

/// Reproduce the page-cache pathology of importer pods: run qemu-img (as CDI does) and boundimport in a memory
/// cgroup against throttled storage, with a co-tenant in the same cgroup, and report what each did (needs root).
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct LabCommand {
    #[command(subcommand)]
    mode: Option<LabMode>,

    // Boxed: the session's many settings would make every other command's variant as large.
    #[command(flatten)]
    session: Box<SessionArgs>,
}

#[derive(Debug, Subcommand)]
enum LabMode {
    /// Run a session per write bandwidth and tabulate wall time, throughput and peak per importer.
    Bench {
        #[command(flatten)]
        session: SessionArgs,

        /// Write bandwidths to run at, comma-separated quantities per second or `unthrottled`.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "20M,50M,200M,unthrottled",
            value_parser = parse_bandwidth
        )]
        bandwidths: Vec<Bandwidth>,
    },
    /// One importer inside a guest booted by `lab --vm` (internal: the guest's /init calls it).
    #[command(hide = true)]
    Guest {
        /// Importer under test.
        #[arg(long, value_enum)]
        importer: Importer,
        /// Its source argument.
        #[arg(long)]
        source: String,
        /// Its destination.
        #[arg(long)]
        dest: PathBuf,
        /// Limit of the importer's cgroup.
        #[arg(long, value_parser = parse_size)]
        limit: u64,
        /// The image's virtual size.
        #[arg(long, value_parser = parse_size)]
        virtual_size: u64,
        /// Standing co-tenant charge written on /cotenant.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        cotenant_charge: u64,
        /// Co-tenant probe allocation per round.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        probe: u64,
        /// boundimport's --io.
        #[arg(long)]
        io: Option<String>,
        /// Result directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// The co-tenant probe the harness spawns into the cgroup (internal).
    #[command(hide = true)]
    Cotenant {
        /// Bytes to allocate and touch each round.
        #[arg(long, value_parser = parse_size)]
        bytes: u64,

        /// Milliseconds between the starts of two rounds.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
}

/// Settings shared by a session and the benchmark.
#[derive(Debug, clap::Args)]
struct SessionArgs {
    /// Image to import (any format both boundimport and qemu-img read: raw, qcow2, ...).
    #[arg(long, required = true)]
    image: Option<PathBuf>,

    /// Memory limit of the importer's cgroup (a Kubernetes quantity).
    #[arg(long, default_value = "600M", value_parser = parse_size)]
    limit: u64,

    /// Destination write bandwidth per second (a quantity, e.g. 30M), or `unthrottled` [default: 30M].
    #[arg(long, value_parser = parse_bandwidth)]
    write_bps: Option<Bandwidth>,

    /// Destination: `loop` (a fresh loop device over a sparse file per importer) or a block device or file path.
    #[arg(long, default_value = "loop")]
    dest: String,

    /// Which importers to run.
    #[arg(long, value_enum, default_value = "both")]
    importer: ImporterChoice,

    /// Bytes the co-tenant allocates and touches every 100 ms (0: no co-tenant) [default: 64Mi]; with --vm, the
    /// co-tenant's standing charge, a tmpfs file written from inside the cgroup [default: 100Mi].
    #[arg(long, value_parser = parse_size)]
    cotenant: Option<u64>,

    /// Run in a guest kernel prepared by scripts/lab-vm-prepare in DIR (qemu TCG), one fresh guest per importer.
    #[arg(long, value_name = "DIR")]
    vm: Option<PathBuf>,

    /// With --vm: the memory hierarchy in the guest.
    #[arg(long, value_enum, default_value = "v2", requires = "vm")]
    guest_cgroup: GuestCgroup,

    /// With --vm: cgroup writeback (v2's io controller on the unified hierarchy) or none (io bound to v1).
    #[arg(long, value_enum, default_value = "off", requires = "vm")]
    cgroup_writeback: OnOff,

    /// With --vm: destination stalls, RUN:STOP seconds (progress, then suspended), or `none`.
    #[arg(long, default_value = "15:40", value_parser = parse_stall, requires = "vm")]
    stall: Stall,

    /// With --vm: guest RAM.
    #[arg(long, default_value = "8Gi", value_parser = parse_size, requires = "vm")]
    guest_mem: u64,

    /// With --vm: a co-tenant probe allocating and freeing this much every 100 ms, which measures the co-tenant's
    /// stalls (0: none). Off by default: memory freed every round gives the importer room, and in the guest even
    /// 64 KiB a round turned the kill into a pin.
    #[arg(long, default_value = "0", value_parser = parse_size, requires = "vm")]
    probe: u64,

    /// With --vm: seconds a guest may run before it is killed.
    #[arg(long, default_value_t = 1200, requires = "vm")]
    guest_timeout: u64,

    /// With --vm: boundimport's --io in the guest (auto, direct, writebehind) [default: its own, auto].
    #[arg(long, value_parser = ["auto", "direct", "writebehind"], requires = "vm")]
    boundimport_io: Option<String>,

    /// With --vm: the guest's multi-gen LRU (/sys/kernel/mm/lru_gen/enabled), switched before the importers run
    /// [default: the kernel's own setting, reported].
    #[arg(long, value_enum, requires = "vm")]
    mglru: Option<OnOff>,

    /// With --vm: the guest's vm.dirty_ratio (percent) [default: the kernel's own, 20]. With cgroup writeback it is
    /// the share of the cgroup's dirtyable memory a writer may dirty before balance_dirty_pages throttles it.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100), requires = "vm")]
    dirty_ratio: Option<u32>,

    /// With --vm: run the matrix (cgroup v1/v2 x cgroup writeback on/off, x the multi-gen LRU on/off on a kernel
    /// that has it unless --mglru fixes it) and print one table: per cell what killed qemu-img (or did not), and
    /// boundimport's verdict and peak.
    #[arg(long, requires = "vm")]
    matrix: bool,

    /// With --matrix: the cgroup corners to run, comma-separated (v2-wb-off, v2-wb-on, v1-wb-off, v1-wb-on).
    #[arg(long, value_delimiter = ',', value_parser = parse_corner, requires = "matrix")]
    corners: Vec<(crate::cgroup::Version, bool)>,

    /// With --matrix: qemu-img guests per cell, for how repeatable its verdict is (boundimport runs once per cell).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20), requires = "matrix")]
    runs: u32,

    /// Directory for report.json, timeline.csv, timeline.svg and the importers' logs.
    #[arg(long, default_value = "lab-out")]
    out: PathBuf,

    /// The qemu-img binary to test.
    #[arg(long, default_value = "qemu-img")]
    qemu_img: PathBuf,

    /// More log output.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GuestCgroup {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// Destination stalls: seconds of progress, then seconds suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stall(Option<(u32, u32)>);

fn parse_stall(text: &str) -> std::result::Result<Stall, String> {
    if text.trim() == "none" {
        return Ok(Stall(None));
    }
    let (run, stop) = text.split_once(':').ok_or_else(|| format!("{text:?}: expected RUN:STOP seconds or none"))?;
    let num = |t: &str| t.trim().parse::<u32>().map_err(|_| format!("{t:?}: not a number of seconds"));
    let (run, stop) = (num(run)?, num(stop)?);
    if run == 0 || stop == 0 {
        return Err("stall seconds must be positive".to_string());
    }
    Ok(Stall(Some((run, stop))))
}

fn parse_corner(text: &str) -> std::result::Result<(crate::cgroup::Version, bool), String> {
    super::vm::CORNERS
        .iter()
        .copied()
        .find(|&(cgroup, writeback)| {
            super::vm::VmConfig { cgroup, cgroup_writeback: writeback, ..super::vm::VmConfig::new("", "", "") }.corner()
                == text.trim()
        })
        .ok_or_else(|| format!("{text:?}: expected v2-wb-off, v2-wb-on, v1-wb-off or v1-wb-on"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ImporterChoice {
    QemuImg,
    Boundimport,
    Both,
}

/// A write bandwidth: bytes per second, or unthrottled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bandwidth(Option<u64>);

fn parse_size(text: &str) -> std::result::Result<u64, String> {
    parse_quantity(text).map_err(|e| e.to_string())
}

fn parse_bandwidth(text: &str) -> std::result::Result<Bandwidth, String> {
    match text.trim() {
        "unthrottled" | "none" | "0" => Ok(Bandwidth(None)),
        other => parse_size(other).map(|b| Bandwidth(Some(b))),
    }
}

impl SessionArgs {
    fn config(&self, write_bps: Option<u64>) -> Result<Config> {
        let image = self.image.clone().ok_or_else(|| Error::usage("--image is required"))?;
        Ok(Config {
            limit: self.limit,
            write_bps,
            dest: match self.dest.as_str() {
                "loop" => DestChoice::Loop,
                path => DestChoice::Path(PathBuf::from(path)),
            },
            importers: match self.importer {
                ImporterChoice::QemuImg => vec![Importer::QemuImg],
                ImporterChoice::Boundimport => vec![Importer::Boundimport],
                ImporterChoice::Both => vec![Importer::QemuImg, Importer::Boundimport],
            },
            cotenant_bytes: self.cotenant.unwrap_or(64 << 20),
            qemu_img: self.qemu_img.clone(),
            ..Config::new(image, &self.out)?
        })
    }
}

/// Runs `boundimport lab ...`; returns the process exit code.
pub fn main(command: LabCommand) -> i32 {
    let result = match command.mode {
        Some(LabMode::Guest { importer, source, dest, limit, virtual_size, cotenant_charge, probe, io, out }) => {
            crate::process::logging::init(1, false);
            let args = super::vm::guest::GuestArgs {
                importer,
                source,
                dest,
                limit,
                virtual_size,
                cotenant_charge,
                probe,
                io,
                out,
            };
            let never = std::sync::atomic::AtomicBool::new(false);
            super::vm::guest::run(&args, &never).map_err(|e| (e, None))
        }
        Some(LabMode::Cotenant { bytes, interval_ms }) => {
            crate::process::logging::init(0, true);
            super::cotenant::probe(bytes, Duration::from_millis(interval_ms)).map_err(|e| (e, None))
        }
        Some(LabMode::Bench { session, bandwidths }) => {
            crate::process::logging::init(session.verbose, false);
            bench(&session, &bandwidths)
        }
        None if command.session.vm.is_some() => {
            crate::process::logging::init(command.session.verbose, false);
            vm_session(&command.session)
        }
        None => {
            crate::process::logging::init(command.session.verbose, false);
            session(&command.session)
        }
    };
    match result {
        Ok(()) => 0,
        Err((err, signal)) => {
            log::error!("{err}");
            match (err.kind(), signal) {
                // Stopped by a signal: 128 + its number, as shells report it.
                (ErrorKind::Interrupted, Some(signal)) => 128 + signal,
                _ => err.exit_code(),
            }
        }
    }
}

/// An error, and the signal that stopped the session if one did.
type Failure = (Error, Option<i32>);

fn session(args: &SessionArgs) -> std::result::Result<(), Failure> {
    let write_bps = args.write_bps.map_or(Some(30_000_000), |b| b.0);
    let config = args.config(write_bps).map_err(|e| (e, None))?;
    let signals = StopOnSignals::install().map_err(|e| (e, None))?;
    let report = super::run(&config, signals.flag()).map_err(|e| (e, signals.signal()))?;
    print!("{}", report.table());
    println!("report: {0}/report.json  timeline: {0}/timeline.csv  plot: {0}/timeline.svg", config.out.display());
    Ok(())
}

fn vm_session(args: &SessionArgs) -> std::result::Result<(), Failure> {
    let dir = args.vm.clone().ok_or_else(|| (Error::usage("--vm DIR is required"), None))?;
    let image = args.image.clone().ok_or_else(|| (Error::usage("--image is required"), None))?;
    if args.dest != "loop" {
        return Err((Error::usage("--vm writes to the guest's own stalling disk: --dest does not apply"), None));
    }
    let config = super::vm::VmConfig {
        importers: match args.importer {
            ImporterChoice::QemuImg => vec![Importer::QemuImg],
            ImporterChoice::Boundimport => vec![Importer::Boundimport],
            ImporterChoice::Both => vec![Importer::QemuImg, Importer::Boundimport],
        },
        cgroup: match args.guest_cgroup {
            GuestCgroup::V1 => crate::cgroup::Version::V1,
            GuestCgroup::V2 => crate::cgroup::Version::V2,
        },
        cgroup_writeback: args.cgroup_writeback == OnOff::On,
        stall: args.stall.0,
        write_bps: args.write_bps.map_or(Some(30 << 20), |b| b.0),
        limit: args.limit,
        cotenant_charge: args.cotenant.unwrap_or(100 << 20),
        probe_bytes: args.probe,
        guest_mem: args.guest_mem,
        timeout: Duration::from_secs(args.guest_timeout),
        boundimport_io: args.boundimport_io.clone(),
        mglru: args.mglru.map(|m| m == OnOff::On),
        dirty_ratio: args.dirty_ratio,
        ..super::vm::VmConfig::new(dir, image, &args.out)
    };
    let signals = StopOnSignals::install().map_err(|e| (e, None))?;
    if args.matrix {
        let plan = super::vm::MatrixPlan {
            corners: if args.corners.is_empty() { super::vm::CORNERS.to_vec() } else { args.corners.clone() },
            runs: args.runs,
        };
        let rows = super::vm::matrix(&config, &plan, signals.flag()).map_err(|e| (e, signals.signal()))?;
        print!("{}", super::vm::matrix_table(&rows));
        println!("matrix: {0}/matrix.md  {0}/matrix.json  sessions: {0}/CELL", config.out.display());
        return Ok(());
    }
    let (report, _) = super::vm::run(&config, signals.flag()).map_err(|e| (e, signals.signal()))?;
    print!("{}", report.table());
    println!("report: {0}/report.json  timeline: {0}/timeline.csv  plot: {0}/timeline.svg", config.out.display());
    Ok(())
}

fn bench(args: &SessionArgs, bandwidths: &[Bandwidth]) -> std::result::Result<(), Failure> {
    if args.write_bps.is_some() {
        return Err((Error::usage("lab bench takes --bandwidths, not --write-bps"), None));
    }
    if args.vm.is_some() {
        return Err((Error::usage("lab bench runs on the host: --vm is for a session or --matrix"), None));
    }
    let config = args.config(None).map_err(|e| (e, None))?;
    let bandwidths: Vec<Option<u64>> = bandwidths.iter().map(|b| b.0).collect();
    let signals = StopOnSignals::install().map_err(|e| (e, None))?;
    let rows = super::bench(&config, &bandwidths, signals.flag()).map_err(|e| (e, signals.signal()))?;
    print!("{}", super::bench_table(&rows));
    println!(
        "tables: {0}/bench.md  {0}/bench.json  sessions: {0}/bw-{{{1}}}",
        config.out.display(),
        bandwidths.iter().map(|&b| bandwidth_label(b)).collect::<Vec<_>>().join(",")
    );
    Ok(())
}
