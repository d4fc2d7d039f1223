//! The lab end to end (root): qemu-img as CDI runs it pins (or loses) a 600M cgroup against 30 MB/s storage while
//! boundimport stays bounded, and an interrupted session leaves no cgroup, loop device or throttle behind.

mod common;

use common::privileged::require_privileged;
use common::{qemu_img, run, scratch_dir, write_raw, Fill, MIB};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lab sessions measure the machine: never two at once.
static SERIAL: Mutex<()> = Mutex::new(());

const V1_THROTTLE: &str = "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device";

/// An incompressible qcow2 of `size` bytes (every cluster allocated, random data).
fn random_qcow2(dir: &Path, size: u64) -> std::path::PathBuf {
    let raw = dir.join("random.raw");
    write_raw(&raw, size, &[(0, size, Fill::Random(7))]);
    let qcow2 = dir.join("random.qcow2");
    run(Command::new(qemu_img()).args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2));
    std::fs::remove_file(&raw).expect("removing the raw image");
    qcow2
}

/// Lines of `losetup -a` mentioning `needle`.
fn loop_devices_with(needle: &str) -> Vec<String> {
    let out = run(Command::new("losetup").arg("-a"));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
}

/// Cgroup directories the lab process `pid` made, anywhere in the memory hierarchy below our own cgroup.
fn lab_cgroups_of(pid: u32) -> Vec<String> {
    let own = boundimport::cgroup::MemCgroup::own().unwrap().unwrap();
    let prefix = format!("boundimport-lab-{pid}-");
    std::fs::read_dir(own.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect()
}

fn throttle_lines() -> String {
    std::fs::read_to_string(V1_THROTTLE).unwrap_or_default()
}

#[test]
fn qemu_img_pins_the_cgroup_and_boundimport_stays_bounded() {
    if !require_privileged("qemu_img_pins_the_cgroup_and_boundimport_stays_bounded") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("lab");
    let image = random_qcow2(dir.path(), 1024 * MIB);
    let out = dir.path().join("out");

    let child = common::boundimport()
        .args(["lab", "--image"])
        .arg(&image)
        .args(["--limit", "600M", "--write-bps", "30M", "--cotenant", "64Mi", "--out"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting boundimport lab");
    let pid = child.id();
    let output = child.wait_with_output().expect("waiting for boundimport lab");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "lab failed ({}):\n{stdout}\n{stderr}", output.status);
    eprintln!("{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["host"]["limit_bytes"], 600_000_000);
    assert_eq!(report["host"]["write_bps"], 30_000_000);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let (qemu, ours) = (&runs[0], &runs[1]);
    assert_eq!(qemu["importer"], "qemu-img");
    assert_eq!(ours["importer"], "boundimport");

    let verdict = qemu["verdict"].as_str().unwrap();
    assert!(verdict == "PINNED" || verdict == "OOMKILLED", "qemu-img: {qemu}");
    if verdict == "PINNED" {
        assert!(qemu["note"].as_str().unwrap().contains("OOM"), "{qemu}");
        assert!(qemu["pinned_seconds"].as_f64().unwrap() > 0.0, "{qemu}");
        assert!(qemu["limit_hits"].as_u64().unwrap() > 0, "{qemu}");
    }

    assert_eq!(ours["verdict"], "BOUNDED", "boundimport: {ours}");
    assert_eq!(ours["exit_status"], 0);
    let peak = ours["peak_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 64 * MIB, "boundimport peak {peak} bytes: {ours}");
    let stall_max = ours["stall_max_ms"].as_f64().expect("co-tenant rounds were recorded");
    assert!(stall_max <= 500.0, "co-tenant stalled {stall_max} ms during boundimport: {ours}");
    assert!(ours["throughput_bytes_per_sec"].as_f64().unwrap() > 0.0);

    let csv = std::fs::read_to_string(out.join("timeline.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[..3], ["importer", "t_s", "usage_bytes"]);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    for importer in ["qemu-img", "boundimport"] {
        let mine: Vec<_> = rows.iter().filter(|r| r[0] == importer).collect();
        // At least 5 Hz over a run that takes more than 30 s at 30 MB/s.
        assert!(mine.len() >= 150, "{importer}: only {} samples", mine.len());
        for row in mine {
            assert_eq!(row.len(), header.len());
            row[1].parse::<f64>().unwrap();
            for field in &row[2..] {
                field.parse::<u64>().unwrap();
            }
        }
    }

    let svg = std::fs::read_to_string(out.join("timeline.svg")).unwrap();
    let start = svg.trim_start();
    assert!(start.starts_with("<svg") || start.starts_with("<?xml"), "not an SVG: {:.80}", start);
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("qemu-img") && svg.contains("boundimport") && svg.contains("limit"));

    assert!(lab_cgroups_of(pid).is_empty(), "cgroups left behind");
    assert!(loop_devices_with(&out.display().to_string()).is_empty(), "loop devices left behind");
}

#[test]
fn an_interrupted_session_cleans_up() {
    if !require_privileged("an_interrupted_session_cleans_up") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("lab-sigint");
    let image = dir.path().join("random.raw");
    write_raw(&image, 256 * MIB, &[(0, 256 * MIB, Fill::Random(3))]);
    let out = dir.path().join("out");
    let mut child = common::boundimport()
        .args(["lab", "--importer", "qemu-img", "--write-bps", "10M", "--image"])
        .arg(&image)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting boundimport lab");
    let pid = child.id();

    // Wait until the importer is running: its cgroup, loop device and throttle exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    let device = loop {
        let devices = loop_devices_with(&out.display().to_string());
        if let Some(line) = devices.first() {
            if !lab_cgroups_of(pid).is_empty() && out.join("qemu-img.log").exists() {
                break line.split(':').next().unwrap().to_string();
            }
        }
        assert!(Instant::now() < deadline, "the lab did not start its importer");
        assert!(child.try_wait().unwrap().is_none(), "the lab exited early");
        std::thread::sleep(Duration::from_millis(100));
    };
    let rdev = {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&device).unwrap().rdev();
        format!("{}:{} ", libc::major(rdev), libc::minor(rdev))
    };
    if Path::new(V1_THROTTLE).exists() {
        assert!(throttle_lines().contains(&rdev), "no throttle on {device}");
    }
    std::thread::sleep(Duration::from_secs(2));

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGINT).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "exit status after SIGINT: {}\n{stderr}", output.status);
    assert!(stderr.contains("interrupted"), "{stderr}");

    assert!(lab_cgroups_of(pid).is_empty(), "cgroups left behind: {:?}", lab_cgroups_of(pid));
    assert!(loop_devices_with(&out.display().to_string()).is_empty(), "loop devices left behind");
    assert!(!throttle_lines().contains(&rdev), "throttle left on {device}: {}", throttle_lines());
    assert!(!out.join("qemu-img.dest.img").exists(), "destination file left behind");
    assert!(!out.join("report.json").exists());
}

/// Process ids of running qemu-system-x86_64 whose command line mentions `needle`.
fn qemu_processes_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-system-x86_64") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The guest lab's default recipe (issue 19): in a Debian kernel under qemu TCG, cgroup v2 without cgroup
/// writeback, a destination throttled to 30 MiB/s and suspended 40 s after every 15 s, 600M limit, 100 MiB
/// co-tenant charge. qemu-img as CDI runs it is OOM-killed; boundimport stays bounded. Takes minutes under TCG,
/// so it runs only from `scripts/lab-vm-test`, which prepares the guest and sets `BOUNDIMPORT_LAB_VM` to it.
#[test]
fn in_a_guest_qemu_img_is_oom_killed_and_boundimport_stays_bounded() {
    const TEST: &str = "in_a_guest_qemu_img_is_oom_killed_and_boundimport_stays_bounded";
    let Some(vm) = std::env::var_os("BOUNDIMPORT_LAB_VM") else {
        common::prereq::print_skip(
            TEST,
            "BOUNDIMPORT_LAB_VM is not set (scripts/lab-vm-test prepares a guest and runs this)",
        );
        return;
    };
    if !require_privileged(TEST) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("lab-vm");
    let image = random_qcow2(dir.path(), 1024 * MIB);
    let out = dir.path().join("out");
    let started = Instant::now();
    let output = common::boundimport()
        .args(["lab", "--vm"])
        .arg(&vm)
        .arg("--image")
        .arg(&image)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running boundimport lab --vm");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}\n{stderr}\n{TEST}: the session took {:.0} s", started.elapsed().as_secs_f64());
    // Whatever happened, no guest may outlive the session.
    assert!(qemu_processes_with(&out.display().to_string()).is_empty(), "qemu left running");
    assert!(output.status.success(), "lab --vm failed ({})", output.status);

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let host = &report["host"];
    assert_eq!(host["cgroup_version"], 2, "{host}");
    assert_eq!(host["guest"]["cgroup_writeback"], false, "{host}");
    assert_eq!(host["guest"]["stall"], serde_json::json!([15, 40]), "{host}");
    assert_eq!(host["limit_bytes"], 600_000_000);
    assert_ne!(host["kernel"].as_str().unwrap(), std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim());
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let (qemu, ours) = (&runs[0], &runs[1]);
    assert_eq!(qemu["importer"], "qemu-img");
    assert_eq!(qemu["verdict"], "OOMKILLED", "qemu-img: {qemu}");
    assert!(qemu["oom_kills"].as_u64().unwrap() >= 1, "{qemu}");
    assert_eq!(ours["importer"], "boundimport");
    assert_eq!(ours["verdict"], "BOUNDED", "boundimport: {ours}");
    assert_eq!(ours["oom_kills"], 0);
    let peak = ours["peak_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 64 * MIB, "boundimport peak {peak} bytes: {ours}");

    let csv = std::fs::read_to_string(out.join("timeline.csv")).unwrap();
    assert!(csv.lines().filter(|l| l.starts_with("boundimport,")).count() >= 100, "too few samples");
    let svg = std::fs::read_to_string(out.join("timeline.svg")).unwrap();
    assert!(svg.contains("qemu-img") && svg.contains("boundimport") && svg.trim_end().ends_with("</svg>"));
    // The guests' disks and initramfs copies went with them.
    for importer in ["qemu-img", "boundimport"] {
        for file in ["dest.img", "results.img", "initrd.cpio"] {
            assert!(!out.join(format!("{importer}.guest")).join(file).exists(), "{importer}: {file} left behind");
        }
    }
}

/// The multi-gen LRU axis on a guest kernel that has it (issue 32; `scripts/lab-vm-test` prepares bookworm's 6.12,
/// whose multi-gen LRU is on by default and which lacks upstream's "mm/vmscan: wake up flushers conditionally to
/// avoid cgroup OOM"): `--matrix --corners v2-wb-on` runs cgroup v2 with cgroup writeback, the multi-gen LRU off and
/// on, both importers in each. Measured there: qemu-img is pinned but never killed in either cell, because cgroup
/// writeback throttles it at the cgroup's dirty limit (20% of its dirtyable memory) and reclaim always finds clean
/// cache, so whether reclaim wakes the flushers does not matter; boundimport stays bounded.
#[test]
fn in_a_guest_with_cgroup_writeback_the_multi_gen_lru_is_switched_and_measured() {
    const TEST: &str = "in_a_guest_with_cgroup_writeback_the_multi_gen_lru_is_switched_and_measured";
    let Some(vm) = std::env::var_os("BOUNDIMPORT_LAB_VM_MGLRU") else {
        common::prereq::print_skip(
            TEST,
            "BOUNDIMPORT_LAB_VM_MGLRU is not set (scripts/lab-vm-test prepares a 6.12 guest and runs this)",
        );
        return;
    };
    if !require_privileged(TEST) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("lab-vm-mglru");
    let image = random_qcow2(dir.path(), 1024 * MIB);
    let out = dir.path().join("out");
    let started = Instant::now();
    let output = common::boundimport()
        .args(["lab", "--vm"])
        .arg(&vm)
        .arg("--image")
        .arg(&image)
        .args(["--matrix", "--corners", "v2-wb-on", "--out"])
        .arg(&out)
        .output()
        .expect("running boundimport lab --vm --matrix");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}\n{stderr}\n{TEST}: the matrix took {:.0} s", started.elapsed().as_secs_f64());
    assert!(qemu_processes_with(&out.display().to_string()).is_empty(), "qemu left running");
    assert!(output.status.success(), "lab --vm --matrix failed ({})", output.status);

    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("matrix.json")).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    let cells: Vec<&str> = rows.iter().map(|r| r["cell"].as_str().unwrap()).collect();
    assert_eq!(cells, ["v2-wb-on-mglru-off", "v2-wb-on-mglru-on"]);
    for (row, mglru) in rows.iter().zip([false, true]) {
        let cell = row["cell"].as_str().unwrap();
        assert!(stdout.contains(&format!("| {cell} |")), "{cell} missing from the printed table");
        let report = &row["sessions"][0]["report"];
        let host = &report["host"];
        assert_eq!(host["cgroup_version"], 2, "{host}");
        assert_eq!(host["guest"]["cgroup_writeback"], true, "{host}");
        assert_eq!(host["guest"]["mglru"], mglru, "{cell}: the guest's multi-gen LRU as read back: {host}");
        assert_eq!(host["guest"]["mglru_set"], true, "{host}");
        assert_eq!(host["guest"]["dirty_ratio"], 20, "{host}");
        assert_eq!(host["guest"]["stall"], serde_json::json!([15, 40]), "{host}");
        let runs = report["runs"].as_array().unwrap();
        let (qemu, ours) = (&runs[0], &runs[1]);
        assert_eq!(qemu["importer"], "qemu-img");
        assert_eq!(qemu["verdict"], "PINNED", "{cell}: qemu-img: {qemu}");
        assert_eq!(row["qemu_img_kills"], 0, "{cell}");
        assert!(row["mechanism"].as_str().unwrap().starts_with("none: cgroup writeback throttled"), "{cell}: {row}");
        // Cgroup writeback holds dirty + writeback at the cgroup's dirty limit (measured 89-95 MiB of 572 MiB).
        let dirty = qemu["dirty_writeback_peak_bytes"].as_u64().unwrap();
        assert!(dirty > 0 && dirty < 150_000_000, "{cell}: qemu-img dirty + writeback peak {dirty}: {qemu}");
        assert_eq!(ours["importer"], "boundimport");
        assert_eq!(ours["verdict"], "BOUNDED", "{cell}: boundimport: {ours}");
        let peak = ours["peak_bytes"].as_u64().unwrap();
        assert!(peak > 0 && peak <= 64 * MIB, "{cell}: boundimport peak {peak} bytes: {ours}");
    }
}
