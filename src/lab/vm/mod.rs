//! `boundimport lab --vm DIR`: the lab inside a guest kernel booted under `qemu-system-x86_64 -accel tcg`, where
//! the cgroup setting that kills qemu-img in the field can be built (cgroup v2 without cgroup writeback, a
//! destination that stalls). A fresh guest per importer: its `/init` ([`init`]) sets the conditions up and calls
//! `boundimport lab guest` ([`guest`]), which runs the host lab's own run and leaves `measured.json` on a result
//! disk; the host reads it back and writes the same report, timeline and plot as a host session.
//!
//! DIR is what `scripts/lab-vm-prepare` made: `vm.env` names the kernel, the initramfs and the unpacked qemu.

pub mod guest;
pub mod init;

use super::report::{GuestConditions, Host, Report};
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
        }
    }

    /// `v2-wb-off`-style name of the corner.
    pub fn corner(&self) -> String {
        format!(
            "v{}-wb-{}",
            if self.cgroup == Version::V1 { 1 } else { 2 },
            if self.cgroup_writeback { "on" } else { "off" }
        )
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
    for &importer in &config.importers {
        check_stop(stop)?;
        let (measured, timing) = run_guest(config, &prepared, importer, virtual_size, stop)?;
        kernel = measured.kernel.clone();
        if measured.cgroup_version != if config.cgroup == Version::V1 { 1 } else { 2 } {
            return Err(Error::new(ErrorKind::Io, format!("the guest ran on cgroup v{}", measured.cgroup_version)));
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

/// One corner of the matrix.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatrixRow {
    /// `v2-wb-off` and so on.
    pub corner: String,
    /// The session's report.
    pub report: Report,
    /// How each guest went.
    pub timings: Vec<GuestTiming>,
}

/// Runs the four corners (cgroup v1/v2 × cgroup writeback on/off), each into `out/CORNER`, and writes
/// `out/matrix.md` and `out/matrix.json`.
pub fn matrix(config: &VmConfig, stop: &AtomicBool) -> Result<Vec<MatrixRow>> {
    let mut rows = Vec::new();
    for (cgroup, writeback) in [(Version::V2, false), (Version::V2, true), (Version::V1, false), (Version::V1, true)] {
        check_stop(stop)?;
        let mut corner = VmConfig { cgroup, cgroup_writeback: writeback, ..config.clone() };
        corner.out = config.out.join(corner.corner());
        let (report, timings) = run(&corner, stop)?;
        rows.push(MatrixRow { corner: corner.corner(), report, timings });
    }
    let json = serde_json::to_string_pretty(&rows)
        .map_err(|e| Error::new(ErrorKind::Io, "serialising the matrix").with_source(e))?;
    let path = config.out.join("matrix.json");
    fs::write(&path, json + "\n").io_context("writing matrix.json").map_err(|e| e.at_path(&path))?;
    let path = config.out.join("matrix.md");
    fs::write(&path, matrix_table(&rows)).io_context("writing matrix.md").map_err(|e| e.at_path(&path))?;
    Ok(rows)
}

/// The matrix as one Markdown verdict table.
pub fn matrix_table(rows: &[MatrixRow]) -> String {
    let mut out = String::from(
        "| corner | kernel | importer | verdict | peak | dirty+writeback peak | limit hits | oom kills | killed at s | wall s | stall max ms |\n\
         |---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        for (r, timing) in row.report.runs.iter().zip(&row.timings) {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
                row.corner,
                row.report.host.kernel,
                r.importer,
                r.verdict.as_str(),
                human(r.peak_bytes),
                human(r.dirty_writeback_peak_bytes),
                r.limit_hits,
                r.oom_kills,
                timing.kill_seconds.map_or_else(|| "-".to_string(), |v| format!("{v:.1}")),
                r.wall_seconds,
                r.stall_max_ms.map_or_else(|| "-".to_string(), |v| format!("{v:.0}")),
            );
        }
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
    }
}
