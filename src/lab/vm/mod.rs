//! `boundimport lab --vm DIR`: the lab inside a guest kernel booted under `qemu-system-x86_64 -accel tcg`, where
//! the cgroup setting that kills qemu-img in the field can be built (cgroup v2 without cgroup writeback, a
//! destination that stalls). A fresh guest per importer: its `/init` ([`init`]) sets the conditions up and calls
//! `boundimport lab guest` ([`guest`]), which runs the host lab's own run and leaves `measured.json` on a result
//! disk; the host reads it back and writes the same report, timeline and plot as a host session.
//!
//! DIR is what `scripts/lab-vm-prepare` made: `vm.env` names the kernel, the initramfs and the unpacked qemu.

pub mod guest;
pub mod init;

use super::report::{GuestConditions, Host, Report, Run, Verdict};
use super::{check_stop, write_outputs, Importer, KillOnDrop, RunData};
use crate::cgroup::Version;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::size::human;
use guest::GuestMeasured;
use init::GuestRun;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Size of the result disk the guest writes its tar onto.
const RESULT_DISK_BYTES: u64 = 256 << 20;

/// A guest session's settings.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// What `scripts/lab-vm-prepare` made.
    pub dir: PathBuf,
    /// The image to import.
    pub image: PathBuf,
    /// Importers, one fresh guest each, in order.
    pub importers: Vec<Importer>,
    /// Memory hierarchy in the guest.
    pub cgroup: Version,
    /// v2: io controller on the unified hierarchy (cgroup writeback) or bound to v1 (none).
    pub cgroup_writeback: bool,
    /// Seconds of progress, then seconds the destination is suspended.
    pub stall: Option<(u32, u32)>,
    /// qemu's write throttle on the destination disk, `None` for none.
    pub write_bps: Option<u64>,
    /// The limit of the importer's cgroup.
    pub limit: u64,
    /// The co-tenant's standing tmpfs charge.
    pub cotenant_charge: u64,
    /// The co-tenant probe's allocation per round.
    pub probe_bytes: u64,
    /// Guest RAM.
    pub guest_mem: u64,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Longest a guest may run before it is killed.
    pub timeout: Duration,
    /// Output directory.
    pub out: PathBuf,
    /// boundimport's `--io` in the guest, `None` for its default (direct to a block device).
    pub boundimport_io: Option<String>,
    /// The multi-gen LRU switched on or off in the guest, `None` for the kernel's own setting.
    pub mglru: Option<bool>,
    /// The guest's `vm.dirty_ratio`, `None` for the kernel's own (20).
    pub dirty_ratio: Option<u32>,
}

impl VmConfig {
    /// The recipe that reproduces the kill: cgroup v2 without cgroup writeback, 30 MiB/s with a 40 s stall after
    /// every 15 s (issue 19's 25 s killed in 2 of 4 runs on this 2-core machine, 40 s in 2 of 2), 600M limit,
    /// 100 MiB co-tenant charge, 8 GiB guest.
    pub fn new(dir: impl Into<PathBuf>, image: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        VmConfig {
            dir: dir.into(),
            image: image.into(),
            importers: vec![Importer::QemuImg, Importer::Boundimport],
            cgroup: Version::V2,
            cgroup_writeback: false,
            stall: Some((15, 40)),
            write_bps: Some(30 << 20),
            limit: crate::budget::DEFAULT_BUDGET,
            cotenant_charge: 100 << 20,
            probe_bytes: 0,
            guest_mem: 8 << 30,
            cpus: 2,
            timeout: Duration::from_secs(20 * 60),
            out: out.into(),
            boundimport_io: None,
            mglru: None,
            dirty_ratio: None,
        }
    }

    /// `v2-wb-off`-style name of the corner, with `-mglru-on`/`-mglru-off` when the lab sets the multi-gen LRU.
    pub fn corner(&self) -> String {
        let mut name = format!(
            "v{}-wb-{}",
            if self.cgroup == Version::V1 { 1 } else { 2 },
            if self.cgroup_writeback { "on" } else { "off" }
        );
        if let Some(on) = self.mglru {
            name.push_str(if on { "-mglru-on" } else { "-mglru-off" });
        }
        name
    }
}

/// The prepared guest: `DIR/vm.env`.
#[derive(Debug, Clone)]
struct Prepared {
    vars: HashMap<String, String>,
}

impl Prepared {
    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("vm.env");
        let text = fs::read_to_string(&path)
            .io_context("reading the prepared guest (run scripts/lab-vm-prepare)")
            .map_err(|e| e.at_path(&path))?;
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(Prepared { vars })
    }

    fn get(&self, key: &str) -> Result<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::new(ErrorKind::Usage, format!("vm.env has no {key} (rerun scripts/lab-vm-prepare)")))
    }

    /// The guest kernel's build configuration: the `config-RELEASE` the kernel package puts beside its
    /// `vmlinuz-RELEASE`; `None` when it cannot be read.
    fn kernel_config(&self) -> Option<String> {
        let kernel = Path::new(self.get("KERNEL").ok()?);
        fs::read_to_string(kernel.with_file_name(format!("config-{}", self.get("KERNEL_RELEASE").ok()?))).ok()
    }

    /// Whether the guest kernel was built with the multi-gen LRU (`CONFIG_LRU_GEN=y`); `None` when unknown.
    fn has_mglru(&self) -> Option<bool> {
        Some(self.kernel_config()?.lines().any(|l| l.trim() == "CONFIG_LRU_GEN=y"))
    }

    /// Whether the guest kernel has the cgroup v1 memory controller: since 6.11 only with `CONFIG_MEMCG_V1=y`
    /// (Debian's 6.12 leaves it out); before, with every memory cgroup. `None` when unknown.
    fn has_memcg_v1(&self) -> Option<bool> {
        Some(!self.kernel_config()?.lines().any(|l| l.trim() == "# CONFIG_MEMCG_V1 is not set"))
    }
}

/// How a guest run went, beyond the measurements.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestTiming {
    /// Importer.
    pub importer: String,
    /// Guest uptime when `/init` started.
    pub boot_seconds: Option<f64>,
    /// qemu start to exit.
    pub guest_seconds: f64,
    /// Destination stalls that began while the guest ran.
    pub stalls: usize,
    /// Seconds from the importer's start to the kernel's first OOM kill in the guest (from its log), `null`
    /// without one. A killed importer can take longer to exit: it waits for its writes in flight to end.
    pub kill_seconds: Option<f64>,
}

/// Kernel log time of the first `Killed process` line of a `dmesg` dump.
fn first_kill(dmesg: &str) -> Option<f64> {
    dmesg.lines().filter(|l| l.contains("Killed process")).find_map(|l| {
        let rest = l.trim_start().strip_prefix('[')?;
        rest.split_once(']')?.0.trim().parse().ok()
    })
}

/// Runs a guest session: one fresh guest per importer, then `report.json`, `timeline.csv`, `stalls.csv`,
/// `timeline.svg` and `guests.json` into the output directory.
pub fn run(config: &VmConfig, stop: &AtomicBool) -> Result<(Report, Vec<GuestTiming>)> {
    if !super::fixtures::is_root() {
        return Err(Error::usage("the guest lab needs root (its guests run the importers as root)"));
    }
    let prepared = Prepared::load(&config.dir)?;
    if config.cgroup == Version::V1 && prepared.has_memcg_v1() == Some(false) {
        return Err(Error::usage(format!(
            "{} has no cgroup v1 memory controller (CONFIG_MEMCG_V1 is not set): use --guest-cgroup v2",
            prepared.get("KERNEL_PACKAGE")?
        )));
    }
    fs::create_dir_all(&config.out).io_context("creating output directory").map_err(|e| e.at_path(&config.out))?;
    let virtual_size = super::virtual_size(&config.image, Path::new("qemu-img"))?;
    log::info!(
        "lab --vm: {} ({}), {}, kernel {}",
        config.image.display(),
        human(virtual_size),
        config.corner(),
        prepared.get("KERNEL_PACKAGE").unwrap_or("?")
    );
    let mut runs = Vec::new();
    let mut timings = Vec::new();
    let mut kernel = String::new();
    let mut mglru = None;
    let mut dirty_ratio = None;
    for &importer in &config.importers {
        check_stop(stop)?;
        let (measured, timing) = run_guest(config, &prepared, importer, virtual_size, stop)?;
        kernel = measured.kernel.clone();
        if measured.cgroup_version != if config.cgroup == Version::V1 { 1 } else { 2 } {
            return Err(Error::new(ErrorKind::Io, format!("the guest ran on cgroup v{}", measured.cgroup_version)));
        }
        mglru = measured.mglru();
        dirty_ratio = measured.dirty_ratio;
        if config.mglru.is_some() && mglru != config.mglru {
            return Err(Error::new(
                ErrorKind::Io,
                format!("the guest's multi-gen LRU reads {:?} after it was switched", measured.lru_gen),
            ));
        }
        let measured = measured.measured;
        let summary = measured.summarize();
        log::info!(
            "lab --vm: {} {} in {:.1}s, peak {} (guest {:.0}s)",
            summary.importer,
            summary.verdict.as_str(),
            summary.wall_seconds,
            human(summary.peak_bytes),
            timing.guest_seconds
        );
        runs.push(RunData { summary, measured });
        timings.push(timing);
    }
    let host = Host {
        kernel,
        cgroup_version: if config.cgroup == Version::V1 { 1 } else { 2 },
        limit_bytes: config.limit,
        write_bps: config.write_bps,
        guest: Some(GuestConditions {
            kernel_package: prepared.get("KERNEL_PACKAGE")?.to_string(),
            cgroup_writeback: config.cgroup == Version::V2 && config.cgroup_writeback,
            stall: config.stall,
            guest_mem_bytes: config.guest_mem,
            cotenant_charge_bytes: config.cotenant_charge,
            mglru,
            mglru_set: config.mglru.is_some(),
            dirty_ratio,
        }),
    };
    let path = config.out.join("guests.json");
    for t in &timings {
        log::info!(
            "lab --vm: {}: guest up in {} s, {} s in all, {} stalls, first OOM kill {}",
            t.importer,
            t.boot_seconds.map_or_else(|| "?".to_string(), |b| format!("{b:.1}")),
            t.guest_seconds,
            t.stalls,
            t.kill_seconds.map_or_else(|| "none".to_string(), |k| format!("{k:.1} s after the start"))
        );
    }
    let text = serde_json::to_string_pretty(&timings)
        .map_err(|e| Error::new(ErrorKind::Io, "serialising guest timings").with_source(e))?;
    fs::write(&path, text + "\n").io_context("writing guests.json").map_err(|e| e.at_path(&path))?;
    let report = write_outputs(&config.out, host, config.limit, config.write_bps, &runs)?;
    Ok((report, timings))
}

/// Files of one guest run that go away with it.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

fn sparse(path: &Path, size: u64) -> Result<()> {
    fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .io_context("creating a guest disk")
        .map_err(|e| e.at_path(path))
}

/// Boots one guest for `importer`, waits for it to power off (killing it on timeout or stop), and reads its
/// measurements back.
fn run_guest(
    config: &VmConfig,
    prepared: &Prepared,
    importer: Importer,
    virtual_size: u64,
    stop: &AtomicBool,
) -> Result<(GuestMeasured, GuestTiming)> {
    let name = importer.name();
    let work = config.out.join(format!("{name}.guest"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).io_context("creating guest directory").map_err(|e| e.at_path(&work))?;
    let dest = work.join("dest.img");
    let results = work.join("results.img");
    let initrd = work.join("initrd.cpio");
    let _scratch = Scratch(vec![dest.clone(), results.clone(), initrd.clone()]);
    sparse(&dest, virtual_size)?;
    sparse(&results, RESULT_DISK_BYTES)?;

    let run = GuestRun {
        importer,
        cgroup: config.cgroup,
        cgroup_writeback: config.cgroup_writeback,
        stall: config.stall,
        limit: config.limit,
        cotenant_charge: config.cotenant_charge,
        probe_bytes: config.probe_bytes,
        virtual_size,
        boundimport_io: config.boundimport_io.clone(),
        mglru: config.mglru,
        dirty_ratio: config.dirty_ratio,
    };
    let script = init::script(&run);
    fs::write(work.join("init"), &script).io_context("writing the guest's init").map_err(|e| e.at_path(&work))?;
    let base = PathBuf::from(prepared.get("INITRD")?);
    let mut archive = fs::read(&base).io_context("reading the prepared initramfs").map_err(|e| e.at_path(&base))?;
    // The running binary goes in too, over the prepared one: the guest runs exactly the boundimport under test.
    let exe = std::env::current_exe().io_context("finding the boundimport binary")?;
    let binary = fs::read(&exe).io_context("reading the boundimport binary").map_err(|e| e.at_path(&exe))?;
    archive
        .extend_from_slice(&init::cpio(&[("init", 0o755, script.as_bytes()), ("usr/bin/boundimport", 0o755, &binary)]));
    fs::write(&initrd, archive).io_context("writing the guest's initramfs").map_err(|e| e.at_path(&initrd))?;

    let console = config.out.join(format!("{name}.console.log"));
    let mut throttle = String::new();
    if let Some(bps) = config.write_bps {
        let _ = write!(throttle, ",throttling.bps-write={bps}");
    }
    let mut command = Command::new(prepared.get("QEMU")?);
    command
        .env("LD_LIBRARY_PATH", prepared.get("QEMU_LD_LIBRARY_PATH")?)
        .arg("-L")
        .arg(prepared.get("QEMU_FIRMWARE")?)
        .args(["-accel", "tcg", "-m", &format!("{}M", config.guest_mem >> 20), "-smp", &config.cpus.to_string()])
        .args(["-display", "none", "-nic", "none", "-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(prepared.get("KERNEL")?)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init loglevel=4"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio,readonly=on", config.image.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio,cache=none{throttle}", dest.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", results.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(work.join("qemu.stderr")).io_context("creating qemu's log")?);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    // SAFETY: prctl is async-signal-safe; the hook touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            // If the lab dies without unwinding (SIGKILL), its guest dies with it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    log::info!("lab --vm: booting a guest for {name} (console: {})", console.display());
    let started = Instant::now();
    let mut qemu = KillOnDrop(command.spawn().io_context("starting qemu-system-x86_64")?);
    let status = loop {
        if let Some(status) = qemu.0.try_wait().io_context("waiting for qemu")? {
            break status;
        }
        if stop.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Interrupted, "lab interrupted"));
        }
        if started.elapsed() > config.timeout {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the {name} guest ran longer than {} s and was killed (console: {})",
                    config.timeout.as_secs(),
                    console.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let guest_seconds = started.elapsed().as_secs_f64();
    drop(qemu);
    let console_text = fs::read_to_string(&console).unwrap_or_default();
    let framed: Vec<&str> =
        console_text.lines().filter_map(|l| l.trim().strip_prefix(init::FRAME)).map(str::trim).collect();
    if !status.success() || !framed.contains(&"DONE") {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "the {name} guest stopped before writing its results ({status}; last step {:?}; console: {})",
                framed.last(),
                console.display()
            ),
        ));
    }

    // The guest's /results, as the tar it wrote onto the result disk.
    let dir = work.join("results");
    fs::create_dir_all(&dir).io_context("creating result directory").map_err(|e| e.at_path(&dir))?;
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(&results)
        .arg("-C")
        .arg(&dir)
        .stderr(Stdio::piped())
        .output()
        .io_context("running tar")?;
    if !untar.status.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!("reading the result disk: {}", String::from_utf8_lossy(&untar.stderr).trim()),
        ));
    }
    for file in [format!("{name}.log"), "runner.log".to_string(), "dmesg.txt".to_string()] {
        let from = dir.join(&file);
        if from.exists() {
            let to =
                config.out.join(if file == format!("{name}.log") { file.clone() } else { format!("{name}.{file}") });
            let _ = fs::copy(&from, to);
        }
    }
    if let Ok(failed) = fs::read_to_string(dir.join("failed")) {
        return Err(Error::new(ErrorKind::Io, format!("the {name} guest failed: {}", failed.trim())));
    }
    let measured = GuestMeasured::read(&dir).map_err(|e| {
        let runner = fs::read_to_string(dir.join("runner.log")).unwrap_or_default();
        Error::new(ErrorKind::Io, format!("{e}; the guest's runner said: {}", runner.trim()))
    })?;
    let boot_seconds = framed.iter().find_map(|l| l.strip_prefix("BOOTED ")).and_then(|t| t.trim().parse::<f64>().ok());
    // "START importer UPTIME": the guest's clock when the importer was about to start.
    let started_at = framed
        .iter()
        .find_map(|l| l.strip_prefix("START "))
        .and_then(|rest| rest.split_whitespace().last())
        .and_then(|t| t.parse::<f64>().ok());
    let timing = GuestTiming {
        importer: name.to_string(),
        boot_seconds,
        guest_seconds: (guest_seconds * 10.0).round() / 10.0,
        stalls: framed.iter().filter(|l| l.starts_with("STALL ")).count(),
        kill_seconds: first_kill(&fs::read_to_string(dir.join("dmesg.txt")).unwrap_or_default())
            .zip(started_at)
            .map(|(kill, start)| ((kill - start) * 10.0).round() / 10.0),
    };
    Ok((measured, timing))
}

/// The cgroup corners of the matrix, in the order they run: (hierarchy, cgroup writeback).
pub const CORNERS: [(Version, bool); 4] =
    [(Version::V2, false), (Version::V2, true), (Version::V1, false), (Version::V1, true)];

/// What `--matrix` runs: the cgroup corners, each crossed with the multi-gen LRU on and off where the kernel has
/// it (unless the session's `--mglru` fixes it), `runs` qemu-img guests per cell.
#[derive(Debug, Clone)]
pub struct MatrixPlan {
    /// Cgroup corners (hierarchy, cgroup writeback), in order.
    pub corners: Vec<(Version, bool)>,
    /// qemu-img guests per cell; boundimport runs once per cell (nothing in its run is left to chance).
    pub runs: u32,
}

impl Default for MatrixPlan {
    fn default() -> Self {
        MatrixPlan { corners: CORNERS.to_vec(), runs: 1 }
    }
}

/// One session of a cell: the first has every importer asked for, the repeats qemu-img alone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CellSession {
    /// The session's report.
    pub report: Report,
    /// How each guest went.
    pub timings: Vec<GuestTiming>,
}

/// One cell of the matrix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatrixRow {
    /// `v2-wb-on-mglru-on` and so on.
    pub cell: String,
    /// qemu-img guests run in the cell.
    pub qemu_img_runs: usize,
    /// Of those, the ones OOMKILLED.
    pub qemu_img_kills: usize,
    /// What killed qemu-img in this cell, or why nothing did ([`mechanism`]).
    pub mechanism: &'static str,
    /// The sessions, first to last.
    pub sessions: Vec<CellSession>,
}

impl MatrixRow {
    fn new(cell: String, sessions: Vec<CellSession>) -> Self {
        let qemu: Vec<&Run> =
            sessions.iter().flat_map(|s| &s.report.runs).filter(|r| r.importer == "qemu-img").collect();
        let kills = qemu.iter().filter(|r| r.verdict == Verdict::OomKilled).count();
        let pinned = qemu.iter().any(|r| r.verdict == Verdict::Pinned);
        let host = &sessions[0].report.host;
        let guest = host.guest.as_ref();
        let mechanism = if qemu.is_empty() {
            "-"
        } else {
            mechanism(
                host.cgroup_version,
                guest.is_some_and(|g| g.cgroup_writeback),
                guest.and_then(|g| g.mglru),
                guest.is_some_and(|g| g.stall.is_some()),
                kills > 0,
                pinned,
            )
        };
        MatrixRow { cell, qemu_img_runs: qemu.len(), qemu_img_kills: kills, mechanism, sessions }
    }

    fn runs<'a>(&'a self, importer: &'a str) -> impl Iterator<Item = (&'a Run, &'a GuestTiming)> + 'a {
        self.sessions
            .iter()
            .flat_map(|s| s.report.runs.iter().zip(&s.timings))
            .filter(move |(r, _)| r.importer == importer)
    }
}

/// Which of the three mechanisms killed qemu-img in a cell, from the cell's conditions; or, when nothing did, what
/// the kernel did instead. Measured on Debian's 6.12.100 (docs/lab.md): without cgroup writeback the dirty limits are
/// global, so nothing but reclaim starts writeback of the cgroup's dirty pages; the multi-gen LRU before 6.13 does not
/// wake the flushers from reclaim, so the cgroup fills with dirty pages nobody writes and is killed even while the
/// device keeps up, where the classic LRU wakes them and pins. With a stalling device writeback cannot complete and
/// either LRU is killed. With cgroup writeback the writer is throttled at the cgroup's dirty limit; on v1 reclaim
/// waits on writeback.
pub fn mechanism(
    cgroup_version: u8,
    cgroup_writeback: bool,
    mglru: Option<bool>,
    stalls: bool,
    killed: bool,
    pinned: bool,
) -> &'static str {
    match (cgroup_version, cgroup_writeback, mglru, stalls, killed) {
        (1, _, _, _, true) => "v1 legacy memcg reclaim gave up on pages under writeback",
        (_, false, Some(true), false, true) => {
            "multi-gen LRU without flusher wake-ups (before 6.13), no cgroup writeback: the cgroup filled with dirty \
             pages nothing wrote"
        }
        (_, false, Some(true), true, true) => {
            "no cgroup writeback and a stalled device, the multi-gen LRU not waking the flushers either (1 and 2)"
        }
        (_, false, _, true, true) => {
            "no cgroup writeback (NFS/FUSE) and a stalled device: global dirty limits, the cgroup filled with dirty \
             and writeback pages"
        }
        (_, false, _, false, true) => "no cgroup writeback (NFS/FUSE): global dirty limits, the cgroup filled with dirty pages",
        (_, true, _, _, true) => {
            "cgroup writeback, yet dirty + writeback filled the cgroup (a dirty limit near its size and a stalled device)"
        }
        (1, _, _, _, false) if pinned => "none: v1 reclaim waited on writeback (pinned)",
        (_, true, _, _, false) if pinned => {
            "none: cgroup writeback throttled qemu-img at the cgroup's dirty limit; reclaim freed clean cache (pinned)"
        }
        (_, false, _, _, false) if pinned => "none: reclaim woke the flushers and found clean pages (pinned)",
        _ => "none: the cgroup never filled",
    }
}

/// Runs the cells (the plan's cgroup corners × the multi-gen LRU on and off on a kernel that has it, or the session's
/// `--mglru`), each into `out/CELL` and its repeats into `out/CELL/run-K`, and writes `out/matrix.md` and
/// `out/matrix.json`.
pub fn matrix(config: &VmConfig, plan: &MatrixPlan, stop: &AtomicBool) -> Result<Vec<MatrixRow>> {
    let prepared = Prepared::load(&config.dir)?;
    let mglru_axis: Vec<Option<bool>> = match (config.mglru, prepared.has_mglru()) {
        (Some(on), _) => vec![Some(on)],
        (None, Some(true)) => vec![Some(false), Some(true)],
        (None, _) => vec![None],
    };
    let mut rows = Vec::new();
    for &(cgroup, writeback) in &plan.corners {
        if cgroup == Version::V1 && prepared.has_memcg_v1() == Some(false) {
            log::warn!(
                "lab --vm: skipping the v1 corners: the kernel has no cgroup v1 memory controller (CONFIG_MEMCG_V1)"
            );
            continue;
        }
        for &mglru in &mglru_axis {
            check_stop(stop)?;
            let mut cell = VmConfig { cgroup, cgroup_writeback: writeback, mglru, ..config.clone() };
            let name = cell.corner();
            cell.out = config.out.join(&name);
            let (report, timings) = run(&cell, stop)?;
            let mut sessions = vec![CellSession { report, timings }];
            if cell.importers.contains(&Importer::QemuImg) {
                for k in 2..=plan.runs {
                    check_stop(stop)?;
                    let again = VmConfig {
                        importers: vec![Importer::QemuImg],
                        out: cell.out.join(format!("run-{k}")),
                        ..cell.clone()
                    };
                    let (report, timings) = run(&again, stop)?;
                    sessions.push(CellSession { report, timings });
                }
            }
            let row = MatrixRow::new(name, sessions);
            log::info!(
                "lab --vm: {}: qemu-img killed in {} of {} ({})",
                row.cell,
                row.qemu_img_kills,
                row.qemu_img_runs,
                row.mechanism
            );
            rows.push(row);
            // Written after every cell, so a long matrix shows its progress and survives an interruption.
            write_matrix(&config.out, &rows)?;
        }
    }
    Ok(rows)
}

fn write_matrix(out: &Path, rows: &[MatrixRow]) -> Result<()> {
    let json = serde_json::to_string_pretty(rows)
        .map_err(|e| Error::new(ErrorKind::Io, "serialising the matrix").with_source(e))?;
    let path = out.join("matrix.json");
    fs::write(&path, json + "\n").io_context("writing matrix.json").map_err(|e| e.at_path(&path))?;
    let path = out.join("matrix.md");
    fs::write(&path, matrix_table(rows)).io_context("writing matrix.md").map_err(|e| e.at_path(&path))
}

/// The matrix as one Markdown table, a row per cell: the conditions, qemu-img's kills out of runs with each run's
/// verdict and first kill, the mechanism, and boundimport's verdict and peak beside them.
pub fn matrix_table(rows: &[MatrixRow]) -> String {
    let mut out = String::from(
        "| cell | kernel | cgroup | cgroup writeback | multi-gen LRU | stalls | qemu-img killed | qemu-img runs (first kill s) \
         | dirty+writeback peak | limit hits | mechanism | boundimport | boundimport peak |\n\
         |---|---|---|---|---|---|---:|---|---:|---:|---|---|---:|\n",
    );
    for row in rows {
        let host = &row.sessions[0].report.host;
        let guest = host.guest.as_ref();
        let qemu: Vec<_> = row.runs("qemu-img").collect();
        let verdicts: Vec<String> = qemu
            .iter()
            .map(|(r, t)| match t.kill_seconds {
                Some(k) => format!("{} ({k:.1})", r.verdict.as_str()),
                None => r.verdict.as_str().to_string(),
            })
            .collect();
        let dirty = qemu.iter().map(|(r, _)| r.dirty_writeback_peak_bytes).max();
        let hits: Vec<String> = qemu.iter().map(|(r, _)| r.limit_hits.to_string()).collect();
        let ours = row.runs("boundimport").next();
        let _ = writeln!(
            out,
            "| {} | {} | v{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.cell,
            host.kernel,
            host.cgroup_version,
            if guest.is_some_and(|g| g.cgroup_writeback) { "on" } else { "off" },
            guest.map_or_else(|| "-".to_string(), GuestConditions::mglru_text),
            guest.and_then(|g| g.stall).map_or_else(|| "none".to_string(), |(run, stop)| format!("{run}:{stop}")),
            if qemu.is_empty() { "-".to_string() } else { format!("{} of {}", row.qemu_img_kills, row.qemu_img_runs) },
            if verdicts.is_empty() { "-".to_string() } else { verdicts.join(", ") },
            dirty.map_or_else(|| "-".to_string(), human),
            if hits.is_empty() { "-".to_string() } else { hits.join(", ") },
            row.mechanism,
            ours.map_or("-", |(r, _)| r.verdict.as_str()),
            ours.map_or_else(|| "-".to_string(), |(r, _)| human(r.peak_bytes)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_kill_reads_the_kernel_time() {
        let dmesg = "[   54.455443] qemu-img invoked oom-killer: gfp_mask=0x101cc0(GFP_USER|__GFP_WRITE)\n\
                     [   54.466749] Memory cgroup out of memory: Killed process 142 (qemu-img) total-vm:335628kB\n\
                     [   60.1] Killed process 150 (dd)\n";
        assert_eq!(first_kill(dmesg), Some(54.466749));
        assert_eq!(first_kill("[ 1.0] nothing\n"), None);
    }

    #[test]
    fn corners_are_named() {
        let mut c = VmConfig::new("d", "i", "o");
        assert_eq!(c.corner(), "v2-wb-off");
        c.cgroup = Version::V1;
        c.cgroup_writeback = true;
        assert_eq!(c.corner(), "v1-wb-on");
        c.cgroup = Version::V2;
        c.mglru = Some(true);
        assert_eq!(c.corner(), "v2-wb-on-mglru-on");
        c.mglru = Some(false);
        assert_eq!(c.corner(), "v2-wb-on-mglru-off");
    }

    #[test]
    fn each_kill_is_named_by_the_conditions_that_allow_it() {
        // (cgroup version, cgroup writeback, multi-gen LRU, stalls, killed, pinned)
        assert!(mechanism(2, false, Some(true), false, true, true).starts_with("multi-gen LRU without flusher"));
        assert!(mechanism(2, false, Some(true), true, true, false).ends_with("(1 and 2)"));
        assert!(mechanism(2, false, Some(false), true, true, false)
            .starts_with("no cgroup writeback (NFS/FUSE) and a stalled"));
        assert!(mechanism(2, false, None, false, true, true).starts_with("no cgroup writeback (NFS/FUSE): global"));
        assert!(mechanism(2, true, Some(false), true, true, false).starts_with("cgroup writeback, yet"));
        assert!(mechanism(1, false, Some(true), false, true, false).starts_with("v1 legacy"));
        assert!(mechanism(1, true, None, true, false, true).starts_with("none: v1 reclaim waited"));
        assert!(mechanism(2, true, Some(true), true, false, true).starts_with("none: cgroup writeback throttled"));
        assert!(mechanism(2, false, Some(false), false, false, true).starts_with("none: reclaim woke the flushers"));
        assert_eq!(mechanism(2, true, Some(true), false, false, false), "none: the cgroup never filled");
    }

    fn run(importer: &str, verdict: Verdict, peak: u64, dirty: u64) -> Run {
        Run {
            importer: importer.into(),
            verdict,
            exit_status: if verdict == Verdict::OomKilled { 137 } else { 0 },
            wall_seconds: 100.0,
            throughput_bytes_per_sec: None,
            peak_bytes: peak,
            kubectl_top_peak_bytes: peak,
            dirty_writeback_peak_bytes: dirty,
            pinned_seconds: 0.0,
            limit_hits: 7,
            oom_kills: u64::from(verdict == Verdict::OomKilled),
            stall_p50_ms: None,
            stall_p99_ms: None,
            stall_max_ms: None,
            note: None,
        }
    }

    fn session(runs: Vec<Run>, kills: &[Option<f64>], mglru: Option<bool>) -> CellSession {
        let timings = runs
            .iter()
            .zip(kills)
            .map(|(r, &kill_seconds)| GuestTiming {
                importer: r.importer.clone(),
                boot_seconds: Some(4.0),
                guest_seconds: 120.0,
                stalls: 2,
                kill_seconds,
            })
            .collect();
        let host = Host {
            kernel: "6.12.100+deb12-amd64".into(),
            cgroup_version: 2,
            limit_bytes: 600_000_000,
            write_bps: Some(30 << 20),
            guest: Some(GuestConditions {
                kernel_package: "linux-image-6.12.100+deb12-amd64".into(),
                cgroup_writeback: true,
                stall: Some((15, 40)),
                guest_mem_bytes: 8 << 30,
                cotenant_charge_bytes: 100 << 20,
                mglru,
                mglru_set: true,
                dirty_ratio: Some(20),
            }),
        };
        CellSession { report: Report { host, runs }, timings }
    }

    #[test]
    fn a_cell_counts_kills_out_of_runs_and_puts_both_importers_side_by_side() {
        let first = session(
            vec![
                run("qemu-img", Verdict::OomKilled, 480 << 20, 400 << 20),
                run("boundimport", Verdict::Bounded, 18 << 20, 0),
            ],
            &[Some(42.5), None],
            Some(true),
        );
        let again = session(vec![run("qemu-img", Verdict::Pinned, 470 << 20, 90 << 20)], &[None], Some(true));
        let row = MatrixRow::new("v2-wb-on-mglru-on".into(), vec![first, again]);
        assert_eq!((row.qemu_img_kills, row.qemu_img_runs), (1, 2));
        assert!(row.mechanism.starts_with("cgroup writeback, yet"), "{}", row.mechanism);
        let table = matrix_table(&[row]);
        let line = table.lines().nth(2).unwrap();
        assert!(
            line.starts_with("| v2-wb-on-mglru-on | 6.12.100+deb12-amd64 | v2 | on | on (--mglru) | 15:40 | 1 of 2 |"),
            "{line}"
        );
        assert!(line.contains("| OOMKILLED (42.5), PINNED |"), "{line}");
        assert!(line.contains("| 400.00 MiB | 7, 7 | cgroup writeback, yet"), "{line}");
        assert!(line.ends_with("| BOUNDED | 18.00 MiB |"), "{line}");

        let control = session(vec![run("qemu-img", Verdict::Pinned, 470 << 20, 90 << 20)], &[None], Some(false));
        let row = MatrixRow::new("v2-wb-on-mglru-off".into(), vec![control]);
        assert_eq!((row.qemu_img_kills, row.qemu_img_runs), (0, 1));
        assert!(row.mechanism.starts_with("none: cgroup writeback throttled"), "{}", row.mechanism);
        assert!(matrix_table(&[row]).lines().nth(2).unwrap().ends_with("| - | - |"), "no boundimport in the cell");
    }

    #[test]
    fn the_kernel_config_says_whether_there_is_a_multi_gen_lru() {
        let dir = std::env::temp_dir().join(format!("boundimport-vm-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let prepared = |release: &str| Prepared {
            vars: HashMap::from([
                ("KERNEL".to_string(), dir.join(format!("vmlinuz-{release}")).display().to_string()),
                ("KERNEL_RELEASE".to_string(), release.to_string()),
            ]),
        };
        fs::write(dir.join("config-6.12"), "CONFIG_MEMCG=y\nCONFIG_LRU_GEN=y\nCONFIG_LRU_GEN_ENABLED=y\n").unwrap();
        fs::write(dir.join("config-5.10"), "CONFIG_MEMCG=y\n# CONFIG_LRU_GEN is not set\n").unwrap();
        fs::write(dir.join("config-6.12-no-v1"), "CONFIG_MEMCG=y\n# CONFIG_MEMCG_V1 is not set\nCONFIG_LRU_GEN=y\n")
            .unwrap();
        assert_eq!(prepared("6.12").has_mglru(), Some(true));
        assert_eq!(prepared("5.10").has_mglru(), Some(false));
        assert_eq!(prepared("none").has_mglru(), None);
        assert_eq!(prepared("5.10").has_memcg_v1(), Some(true), "before 6.11 every memory cgroup has v1");
        assert_eq!(prepared("6.12-no-v1").has_memcg_v1(), Some(false));
        assert_eq!(prepared("none").has_memcg_v1(), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
