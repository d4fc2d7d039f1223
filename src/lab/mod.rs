//! The lab: reproduces what importer pods suffer (a memory cgroup against throttled storage) and measures
//! importers side by side.
//!
//! A session ([`run`]) goes, for each importer in turn:
//! [`fixtures`] (limited cgroup with an importer and a co-tenant cgroup inside, fresh throttled destination,
//! caches dropped) → [`cotenant`] (a probe process allocating in the same limited cgroup) → the importer →
//! [`sampler`] (cgroup readings at 10 Hz while it runs) → [`report`] (verdicts, `report.json`, CSV timelines)
//! → [`plot`] (`timeline.svg`). [`command`] is its command-line front end; [`bench`] repeats a session at
//! several write bandwidths.
//!
//! The limit sits on a cgroup that holds two leaves, one for the importer and one for the co-tenant, the way a pod
//! cgroup holds its containers: reclaim and OOM kills act on the whole limited cgroup as if both ran in one, while
//! the importer's own leaf says exactly what the importer is charged for.

pub mod command;
pub mod cotenant;
pub mod fixtures;
pub mod plot;
pub mod report;
pub mod sampler;
pub mod ticker;
pub mod vm;

use crate::cgroup::{MemCgroup, Version};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::{self, BackingPolicy};
use crate::size::human;
use crate::source::{FileSource, ReadAt};
use fixtures::{ChildCgroup, LoopDevice, ScratchFile, WriteThrottle};
use report::{Host, Measured, Report};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An importer under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Importer {
    /// `qemu-img convert -t writeback -p -O raw SRC DEST`, exactly as CDI runs it.
    QemuImg,
    /// `boundimport --progress log SRC DEST`, finding its budget from its cgroup.
    Boundimport,
}

impl Importer {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Importer::QemuImg => "qemu-img",
            Importer::Boundimport => "boundimport",
        }
    }
}

/// Where importers write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestChoice {
    /// A fresh loop device (direct I/O) over a fresh sparse file in the output directory, per importer.
    Loop,
    /// A given block device (throttled, reused) or file (recreated per importer, not throttled).
    Path(PathBuf),
}

/// A lab session's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The image to import.
    pub image: PathBuf,
    /// Memory limit of the cgroup the importers run in.
    pub limit: u64,
    /// Destination write bandwidth in bytes per second, `None` for unthrottled.
    pub write_bps: Option<u64>,
    /// Destination.
    pub dest: DestChoice,
    /// Importers to run, in order.
    pub importers: Vec<Importer>,
    /// Bytes the co-tenant allocates and touches each round; 0 runs no co-tenant.
    pub cotenant_bytes: u64,
    /// Time between co-tenant rounds.
    pub cotenant_interval: Duration,
    /// Time between cgroup readings.
    pub sample_interval: Duration,
    /// Directory for the report, timelines, plot and importer logs.
    pub out: PathBuf,
    /// The boundimport binary (importer under test and co-tenant probe).
    pub boundimport: PathBuf,
    /// The qemu-img binary.
    pub qemu_img: PathBuf,
    /// A standing co-tenant charge: a file of this many bytes written on this tmpfs path from inside the co-tenant
    /// cgroup before the importer starts (the guest lab's stand-in for a sidecar's memory), `None` for none.
    pub cotenant_charge: Option<(PathBuf, u64)>,
    /// Arguments boundimport gets after `--progress log` (the guest lab's `--boundimport-io`).
    pub boundimport_args: Vec<String>,
}

impl Config {
    /// A session with the defaults: 600M limit, 30 MB/s, loop destination, both importers, 64Mi
    /// co-tenant every 100 ms, 10 Hz sampling, the running binary as boundimport.
    pub fn new(image: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Result<Self> {
        Ok(Config {
            image: image.into(),
            limit: crate::budget::DEFAULT_BUDGET,
            write_bps: Some(30_000_000),
            dest: DestChoice::Loop,
            importers: vec![Importer::QemuImg, Importer::Boundimport],
            cotenant_bytes: 64 << 20,
            cotenant_interval: Duration::from_millis(100),
            sample_interval: sampler::DEFAULT_INTERVAL,
            out: out.into(),
            boundimport: std::env::current_exe().io_context("finding the boundimport binary")?,
            qemu_img: PathBuf::from("qemu-img"),
            cotenant_charge: None,
            boundimport_args: Vec::new(),
        })
    }
}

/// The raw data behind one importer's entry in the report.
pub struct RunData {
    /// The summary that went into `report.json`.
    pub summary: report::Run,
    /// Everything measured.
    pub measured: Measured,
}

/// Runs a lab session: every importer in turn, then writes `report.json`, `timeline.csv`, `stalls.csv` and
/// `timeline.svg` into the output directory. Raising `stop` (Ctrl-C) ends the session with an interrupted error
/// after killing the importer and co-tenant and undoing every fixture.
pub fn run(config: &Config, stop: &AtomicBool) -> Result<Report> {
    if !fixtures::is_root() {
        return Err(Error::usage("the lab needs root (cgroups, loop devices, throttles)"));
    }
    if config.importers.is_empty() {
        return Err(Error::usage("no importer to run"));
    }
    fs::create_dir_all(&config.out).io_context("creating output directory").map_err(|e| e.at_path(&config.out))?;
    let own = MemCgroup::own()?.ok_or_else(|| Error::unsupported("no memory cgroup hierarchy is mounted"))?;
    let virtual_size = virtual_size(&config.image, &config.qemu_img)?;
    let host = Host {
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
        cgroup_version: match own.version() {
            Version::V1 => 1,
            Version::V2 => 2,
        },
        limit_bytes: config.limit,
        write_bps: config.write_bps,
        guest: None,
    };
    log::info!(
        "lab: {} ({}), limit {}, {}, kernel {}, cgroup v{}",
        config.image.display(),
        human(virtual_size),
        human(config.limit),
        config.write_bps.map_or_else(|| "unthrottled".to_string(), |b| format!("{}/s", human(b))),
        host.kernel,
        host.cgroup_version
    );

    let mut runs = Vec::new();
    for &importer in &config.importers {
        check_stop(stop)?;
        let (measured, _) = run_one(config, importer, virtual_size, stop)?;
        let summary = measured.summarize();
        log::info!(
            "lab: {} {} in {:.1}s, peak {}",
            summary.importer,
            summary.verdict.as_str(),
            summary.wall_seconds,
            human(summary.peak_bytes)
        );
        runs.push(RunData { summary, measured });
    }

    write_outputs(&config.out, host, config.limit, config.write_bps, &runs)
}

/// Writes a session's `report.json`, `timeline.csv`, `stalls.csv` and `timeline.svg` into `out` (host and guest
/// sessions alike) and returns the report.
fn write_outputs(out: &Path, host: Host, limit: u64, write_bps: Option<u64>, runs: &[RunData]) -> Result<Report> {
    let report = Report { host, runs: runs.iter().map(|r| r.summary.clone()).collect() };
    report.write_json(out)?;
    let timelines: Vec<(&str, &[sampler::Sample])> =
        runs.iter().map(|r| (r.summary.importer.as_str(), r.measured.samples.as_slice())).collect();
    report::write_timeline(out, &timelines)?;
    let stalls: Vec<_> = runs.iter().map(|r| (r.summary.importer.as_str(), r.measured.stalls.as_slice())).collect();
    report::write_stalls(out, &stalls)?;
    let plots: Vec<plot::PlotRun<'_>> = runs
        .iter()
        .map(|r| plot::PlotRun {
            importer: &r.summary.importer,
            verdict: r.summary.verdict.as_str(),
            samples: &r.measured.samples,
            stalls: r.measured.stalls.iter().map(|s| (s.t.max(0.0), s.latency_ms)).collect(),
        })
        .collect();
    plot::render(&out.join("timeline.svg"), limit, write_bps, &plots)?;
    Ok(report)
}

fn check_stop(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        return Err(Error::new(ErrorKind::Interrupted, "lab interrupted"));
    }
    Ok(())
}

/// The image's virtual size: from boundimport's own format code, or from `qemu-img info` for formats it cannot
/// read (yet).
fn virtual_size(image: &Path, qemu_img: &Path) -> Result<u64> {
    let source: Arc<dyn ReadAt> = Arc::new(FileSource::open(image)?);
    match format::open(source, &BackingPolicy::default()) {
        Ok(opened) => Ok(opened.virtual_size()),
        Err(err) if err.kind() == ErrorKind::Unsupported => {
            log::debug!("{err}; asking qemu-img for the virtual size");
            let output = Command::new(qemu_img)
                .args(["info", "--output=json"])
                .arg(image)
                .stderr(Stdio::piped())
                .output()
                .io_context("running qemu-img info")?;
            if !output.status.success() {
                return Err(Error::new(
                    ErrorKind::BadImage,
                    format!("qemu-img info failed: {}", String::from_utf8_lossy(&output.stderr).trim()),
                )
                .at_path(image));
            }
            let info: serde_json::Value = serde_json::from_slice(&output.stdout)
                .map_err(|e| Error::new(ErrorKind::BadImage, "reading qemu-img info output").with_source(e))?;
            info["virtual-size"]
                .as_u64()
                .ok_or_else(|| Error::new(ErrorKind::BadImage, "qemu-img info gave no virtual-size").at_path(image))
        }
        Err(err) => Err(err),
    }
}

/// The cgroups of one run: the limited one and its two leaves. Leaves are declared first so they drop first.
struct Cgroups {
    importer: ChildCgroup,
    cotenant: ChildCgroup,
    pod: ChildCgroup,
}

impl Cgroups {
    fn create(importer: Importer, limit: u64) -> Result<Self> {
        let name = format!("boundimport-lab-{}-{}", std::process::id(), importer.name());
        let pod = ChildCgroup::create(&name, limit)?;
        Ok(Cgroups {
            importer: pod.create_child("importer", None)?,
            cotenant: pod.create_child("cotenant", None)?,
            pod,
        })
    }

    /// OOM kills anywhere in the limited cgroup (v1 counts them only where the victim was, v2 hierarchically).
    fn oom_kills(&self) -> Result<u64> {
        let pod = self.pod.reader().events()?.oom_kills;
        let leaves = self.importer.reader().events()?.oom_kills + self.cotenant.reader().events()?.oom_kills;
        Ok(pod.max(leaves))
    }
}

/// A destination prepared for one importer. Fields drop in order: throttle cleared, loop detached, file removed.
struct Target {
    path: PathBuf,
    throttle: Option<WriteThrottle>,
    _device: Option<LoopDevice>,
    _file: Option<ScratchFile>,
}

impl Target {
    /// Removes the write throttle now rather than at drop.
    fn unthrottle(&mut self) {
        self.throttle = None;
    }

    fn prepare(config: &Config, importer: Importer, size: u64, pod: &MemCgroup) -> Result<Self> {
        match &config.dest {
            DestChoice::Loop => {
                let file = ScratchFile::sparse(&config.out.join(format!("{}.dest.img", importer.name())), size)?;
                let device = LoopDevice::attach(file.path(), true)?;
                let throttle =
                    config.write_bps.map(|bps| WriteThrottle::set(device.path(), bps, Some(pod))).transpose()?;
                Ok(Target { path: device.path().to_path_buf(), throttle, _device: Some(device), _file: Some(file) })
            }
            DestChoice::Path(path) => {
                use std::os::unix::fs::FileTypeExt;
                let is_device = fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
                if is_device {
                    let throttle = config.write_bps.map(|bps| WriteThrottle::set(path, bps, Some(pod))).transpose()?;
                    return Ok(Target { path: path.clone(), throttle, _device: None, _file: None });
                }
                if config.write_bps.is_some() {
                    log::warn!("{}: not a block device, writes are not throttled", path.display());
                }
                // A fresh sparse file per importer; it stays for inspection after the run.
                fs::File::create(path)
                    .and_then(|f| f.set_len(size))
                    .io_context("creating destination file")
                    .map_err(|e| e.at_path(path))?;
                Ok(Target { path: path.clone(), throttle: None, _device: None, _file: None })
            }
        }
    }
}

/// Writes `bytes` into `path` (on tmpfs: unreclaimable without swap) from a process inside `cgroup`, so the
/// file's pages stay charged there for the rest of the run.
fn charge_cotenant(cgroup: &ChildCgroup, path: &Path, bytes: u64) -> Result<()> {
    let mut command = Command::new("dd");
    command
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=1048576", &format!("count={}", bytes.div_ceil(1 << 20))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = KillOnDrop(cgroup.spawn(&mut command)?).0.wait().io_context("writing the co-tenant charge")?;
    if !status.success() {
        return Err(Error::new(ErrorKind::Io, format!("writing the co-tenant charge failed: {status}")).at_path(path));
    }
    Ok(())
}

/// A child process killed (and reaped) if it is still running when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Exit code, or 128 + signal like a shell and Kubernetes report it.
fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs one importer; returns what was measured and the limited cgroup's event file as the kernel left it
/// (v2 memory.events, v1 memory.oom_control).
fn run_one(config: &Config, importer: Importer, virtual_size: u64, stop: &AtomicBool) -> Result<(Measured, String)> {
    let cgroups = Cgroups::create(importer, config.limit)?;
    let mut target = Target::prepare(config, importer, virtual_size, cgroups.pod.reader())?;
    log::debug!("lab: cgroup {} and {} ready", cgroups.pod.reader().dir().display(), target.path.display());
    fixtures::drop_caches()?;
    log::debug!("lab: caches dropped");
    check_stop(stop)?;

    let cotenant = if config.cotenant_bytes > 0 {
        Some(cotenant::Cotenant::start(
            &cgroups.cotenant,
            &config.boundimport,
            config.cotenant_bytes,
            config.cotenant_interval,
            stop,
        )?)
    } else {
        None
    };

    if let Some((path, bytes)) = &config.cotenant_charge {
        charge_cotenant(&cgroups.cotenant, path, *bytes)?;
    }
    log::debug!("lab: co-tenant running");
    let log_path = config.out.join(format!("{}.log", importer.name()));
    let log = fs::File::create(&log_path).io_context("creating importer log").map_err(|e| e.at_path(&log_path))?;
    let log_err = log.try_clone().io_context("duplicating log handle")?;
    let mut command = match importer {
        Importer::QemuImg => {
            let mut c = Command::new(&config.qemu_img);
            c.args(["convert", "-t", "writeback", "-p", "-O", "raw"]);
            c
        }
        Importer::Boundimport => {
            let mut c = Command::new(&config.boundimport);
            c.args(["--progress", "log"]).args(&config.boundimport_args);
            c
        }
    };
    command.arg(&config.image).arg(&target.path).stdin(Stdio::null()).stdout(log).stderr(log_err);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);

    let limit_hits_before = sampler::events(cgroups.pod.reader())?.limit_hits;
    log::info!("lab: running {} into {} (log: {})", importer.name(), target.path.display(), log_path.display());
    let started = Instant::now();
    let sampler = sampler::Sampler::start(
        cgroups.importer.reader().clone(),
        cgroups.pod.reader().clone(),
        started,
        config.sample_interval,
    );
    let mut child = KillOnDrop(cgroups.importer.spawn(&mut command)?);
    let status = loop {
        if let Some(status) = child.0.try_wait().io_context("waiting for the importer")? {
            break status;
        }
        if stop.load(Ordering::SeqCst) {
            // An importer stuck in reclaim dies only once the writeback it waits for completes: lift the throttle
            // so that takes a moment, not minutes. Dropping the guards then reaps it, kills the co-tenant and
            // undoes the other fixtures.
            let _ = child.0.kill();
            target.unthrottle();
            return Err(Error::new(ErrorKind::Interrupted, "lab interrupted"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = started.elapsed();
    let samples = sampler.finish()?;
    let stalls = cotenant.map(cotenant::Cotenant::stop).unwrap_or_default();
    check_stop(stop)?;
    let events_file = cgroups.pod.reader().dir().join(match cgroups.pod.reader().version() {
        Version::V1 => "memory.oom_control",
        Version::V2 => "memory.events",
    });
    let events_text = fs::read_to_string(&events_file).unwrap_or_default();

    let measured = Measured {
        importer: importer.name().to_string(),
        exit_status: exit_code(status),
        sigkilled: status.signal() == Some(libc::SIGKILL),
        wall_seconds: wall.as_secs_f64(),
        bytes: virtual_size,
        limit: config.limit,
        importer_peak: cgroups.importer.reader().peak()?,
        pod_peak: cgroups.pod.reader().peak()?,
        limit_hits_before,
        oom_kills: cgroups.oom_kills()?,
        samples,
        stalls: stalls.iter().map(|s| report::StallAt::on_timeline(s, started)).collect(),
    };
    Ok((measured, events_text))
}

/// One line of the writeback benchmark table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// Write bandwidth, `null` for unthrottled.
    pub write_bps: Option<u64>,
    /// The run's summary.
    pub run: report::Run,
}

/// Runs a lab session per write bandwidth (each into `out/bw-LABEL`), writes `out/bench.json` and
/// `out/bench.md`, and returns the rows.
pub fn bench(config: &Config, bandwidths: &[Option<u64>], stop: &AtomicBool) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for &bps in bandwidths {
        check_stop(stop)?;
        let session =
            Config { write_bps: bps, out: config.out.join(format!("bw-{}", bandwidth_label(bps))), ..config.clone() };
        let report = run(&session, stop)?;
        rows.extend(report.runs.into_iter().map(|run| BenchRow { write_bps: bps, run }));
    }
    fs::create_dir_all(&config.out).io_context("creating output directory").map_err(|e| e.at_path(&config.out))?;
    let json = serde_json::to_string_pretty(&rows)
        .map_err(|e| Error::new(ErrorKind::Io, "serialising bench rows").with_source(e))?;
    let json_path = config.out.join("bench.json");
    fs::write(&json_path, json + "\n").io_context("writing bench.json").map_err(|e| e.at_path(&json_path))?;
    let md_path = config.out.join("bench.md");
    fs::write(&md_path, bench_table(&rows)).io_context("writing bench.md").map_err(|e| e.at_path(&md_path))?;
    Ok(rows)
}

/// `30M`-style label of a bandwidth, or `unthrottled`.
pub fn bandwidth_label(bps: Option<u64>) -> String {
    match bps {
        None => "unthrottled".to_string(),
        Some(b) if b % 1_000_000 == 0 => format!("{}M", b / 1_000_000),
        Some(b) => b.to_string(),
    }
}

/// The benchmark rows as a Markdown table.
pub fn bench_table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| write bandwidth | importer | verdict | wall s | MB/s | peak | kubectl-top peak | pinned s | stall p99 ms | stall max ms |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
    for row in rows {
        let r = &row.run;
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {:.1} | {} | {} |\n",
            bandwidth_label(row.write_bps),
            r.importer,
            r.verdict.as_str(),
            r.wall_seconds,
            r.throughput_bytes_per_sec.map_or_else(|| "-".to_string(), |b| format!("{:.1}", b / 1e6)),
            human(r.peak_bytes),
            human(r.kubectl_top_peak_bytes),
            r.pinned_seconds,
            ms(r.stall_p99_ms),
            ms(r.stall_max_ms),
        ));
    }
    out
}
