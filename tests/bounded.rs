//! The bound, measured: a 2 GiB incompressible qcow2 imported in a real memory cgroup onto storage throttled to
//! 50 MB/s, where writes outrun the device. The cgroup's own peak charge (memory.max_usage_in_bytes) and limit
//! hits (memory.failcnt) are the evidence; qemu-img with CDI's `-t writeback` in the same setup is the contrast
//! that proves the setup hostile. Needs root, a memory cgroup and loop devices.

mod common;

use boundimport::cgroup::MemEvents;
use boundimport::lab::fixtures::{drop_caches, ChildCgroup, LoopDevice, MountedExt4, WriteThrottle};
use common::privileged::require_privileged;
use common::{boundimport, qemu_img, run, scratch_dir, sha256_prefix, SplitMix64, MIB};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Guest size of the test image.
const IMAGE_SIZE: u64 = 2 << 30;
/// Write bandwidth of the throttled destination: slower than any importer can produce data.
const WRITE_BPS: u64 = 50_000_000;
/// CDI's default importer pod limit.
const POD_LIMIT: u64 = 600_000_000;

/// The shared test image and the sha256 of its guest contents.
struct TestImage {
    path: PathBuf,
    digest: String,
}

/// Builds the image once per test binary, and keeps it between runs in Cargo's target temp directory (it takes a
/// while to generate and is not part of any result).
fn test_image() -> &'static TestImage {
    static IMAGE: OnceLock<TestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bounded-incompressible-2g.qcow2");
        let sidecar = dir.join("bounded-incompressible-2g.qcow2.sha256");
        if let (true, Ok(digest)) = (path.exists(), std::fs::read_to_string(&sidecar)) {
            return TestImage { path, digest: digest.trim().to_string() };
        }
        let raw = dir.join("bounded-incompressible-2g.raw");
        {
            use sha2::{Digest, Sha256};
            let mut file = std::io::BufWriter::new(File::create(&raw).unwrap());
            let mut hasher = Sha256::new();
            let mut rng = SplitMix64::new(2024);
            let mut block = vec![0u8; MIB as usize];
            for _ in 0..IMAGE_SIZE / MIB {
                rng.fill(&mut block);
                hasher.update(&block);
                file.write_all(&block).unwrap();
            }
            file.flush().unwrap();
            let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&sidecar, &digest).unwrap();
        }
        run(Command::new(qemu_img()).args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&path));
        std::fs::remove_file(&raw).unwrap();
        let digest = std::fs::read_to_string(&sidecar).unwrap();
        TestImage { path, digest }
    })
}

/// What one importer run in a child cgroup did.
struct Measured {
    output: Output,
    peak: u64,
    events: MemEvents,
    wall: Duration,
}

/// Runs `command` in a fresh child memory cgroup limited to `limit`, with caches dropped first, and measures it.
fn run_in_cgroup(name: &str, limit: u64, command: &mut Command) -> Measured {
    let cgroup = ChildCgroup::create(&format!("{name}-{}", std::process::id()), limit).unwrap();
    drop_caches().unwrap();
    let started = Instant::now();
    let child = cgroup.spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped())).unwrap();
    let output = child.wait_with_output().unwrap();
    let wall = started.elapsed();
    let reader = cgroup.reader();
    let measured = Measured { output, peak: reader.peak().unwrap().unwrap(), events: reader.events().unwrap(), wall };
    eprintln!(
        "{name}: exit {:?}, peak {} MiB, limit hits {}, oom kills {}, {:.1}s",
        measured.output.status.code(),
        measured.peak / MIB,
        measured.events.limit_hits,
        measured.events.oom_kills,
        measured.wall.as_secs_f64()
    );
    measured
}

/// A throttled loop device (direct I/O to its backing file, like a disk) big enough for the image.
struct SlowDevice {
    _throttle: WriteThrottle,
    device: LoopDevice,
    _dir: tempfile::TempDir,
}

impl SlowDevice {
    fn new(label: &str) -> Self {
        let dir = scratch_dir(label);
        let backing = dir.path().join("device");
        File::create(&backing).unwrap().set_len(IMAGE_SIZE + 256 * MIB).unwrap();
        let device = LoopDevice::attach(&backing, true).unwrap();
        let throttle = WriteThrottle::set(device.path(), WRITE_BPS, None).unwrap();
        SlowDevice { _throttle: throttle, device, _dir: dir }
    }

    fn path(&self) -> &Path {
        self.device.path()
    }
}

/// Runs boundimport with `args` onto `dest` in a cgroup of `limit` bytes and checks it completed with the
/// right contents and no limit hit; returns the measurement.
fn bounded_import(name: &str, limit: u64, args: &[&str], dest: &Path) -> Measured {
    let image = test_image();
    let mut command = boundimport();
    command.args(["--progress", "log", "--json"]).args(args).arg(&image.path).arg(dest);
    let measured = run_in_cgroup(name, limit, &mut command);
    let stderr = String::from_utf8_lossy(&measured.output.stderr);
    assert!(measured.output.status.success(), "{name}: boundimport failed: {stderr}");
    assert_eq!(sha256_prefix(dest, IMAGE_SIZE), image.digest, "{name}: destination contents");
    assert_eq!(measured.events.limit_hits, 0, "{name}: the cgroup hit its limit");
    assert_eq!(measured.events.oom_kills, 0, "{name}: OOM kill");
    measured
}

/// Highest dirty + writeback reading in a governor timeline, the target the governor enforced, and the number of
/// readings.
fn governor_maximum(timeline: &Path) -> (u64, u64, usize) {
    let text = std::fs::read_to_string(timeline).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("timeline header").split(',').collect();
    let column = |name: &str| header.iter().position(|&h| h == name).unwrap_or_else(|| panic!("no {name} column"));
    let (dirty, writeback, target_column) = (column("dirty"), column("writeback"), column("target"));
    let mut max = 0;
    let mut target = 0;
    let mut rows = 0;
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let number = |i: usize| fields[i].parse::<u64>().unwrap_or_else(|_| panic!("bad row {line:?}"));
        max = max.max(number(dirty) + number(writeback));
        target = number(target_column);
        rows += 1;
    }
    (max, target, rows)
}

#[test]
fn direct_import_onto_throttled_device_stays_under_32_mib() {
    if !require_privileged("direct_import_onto_throttled_device_stays_under_32_mib") {
        return;
    }
    let device = SlowDevice::new("bounded-direct");
    let measured = bounded_import("bounded-direct", POD_LIMIT, &["--io", "direct"], device.path());
    assert!(measured.peak <= 32 * MIB, "peak {} MiB", measured.peak / MIB);
}

#[test]
fn writebehind_import_onto_throttled_device_holds_its_target() {
    if !require_privileged("writebehind_import_onto_throttled_device_holds_its_target") {
        return;
    }
    let device = SlowDevice::new("bounded-wb-device");
    let timeline = scratch_dir("bounded-wb-device-log");
    let log = timeline.path().join("governor.csv");
    let args = ["--io", "writebehind", "--governor-log", log.to_str().unwrap()];
    let measured = bounded_import("bounded-wb-device", POD_LIMIT, &args, device.path());
    assert!(measured.peak <= 64 * MIB, "peak {} MiB", measured.peak / MIB);
    let (max, target, rows) = governor_maximum(&log);
    eprintln!("governor: {rows} readings, max dirty+writeback {} MiB, target {} MiB", max / MIB, target / MIB);
    assert!(rows > 100, "only {rows} governor readings");
    assert!(max <= target, "dirty+writeback reached {max} > target {target}");
}

#[test]
fn writebehind_import_into_a_file_on_throttled_ext4_holds_its_target() {
    if !require_privileged("writebehind_import_into_a_file_on_throttled_ext4_holds_its_target") {
        return;
    }
    let device = SlowDevice::new("bounded-wb-file");
    let filesystem = MountedExt4::create(device.path()).unwrap();
    let dest = filesystem.path().join("disk.img");
    let log = filesystem.path().join("governor.csv");
    let args = ["--io", "writebehind", "--governor-log", log.to_str().unwrap()];
    let measured = bounded_import("bounded-wb-file", POD_LIMIT, &args, &dest);
    assert!(measured.peak <= 64 * MIB, "peak {} MiB", measured.peak / MIB);
    let (max, target, _) = governor_maximum(&log);
    eprintln!("governor: max dirty+writeback {} MiB, target {} MiB", max / MIB, target / MIB);
    assert!(max <= target, "dirty+writeback reached {max} > target {target}");
}

#[test]
fn import_in_a_128m_cgroup_completes_without_hitting_the_limit() {
    if !require_privileged("import_in_a_128m_cgroup_completes_without_hitting_the_limit") {
        return;
    }
    let device = SlowDevice::new("bounded-128m");
    let measured = bounded_import("bounded-128m", 128 * MIB, &["--io", "writebehind"], device.path());
    let summary: serde_json::Value = serde_json::from_slice(&measured.output.stdout).unwrap();
    assert_eq!(summary["budget"]["origin"], "cgroup", "{summary}");
    assert_eq!(summary["budget"]["bytes"], 128 * MIB, "{summary}");
}

#[test]
fn qemu_img_writeback_fills_the_same_cgroup() {
    if !require_privileged("qemu_img_writeback_fills_the_same_cgroup") {
        return;
    }
    let device = SlowDevice::new("bounded-qemu-img");
    let image = test_image();
    let mut command = Command::new(qemu_img());
    command.args(["convert", "-t", "writeback", "-O", "raw"]).arg(&image.path).arg(device.path());
    let measured = run_in_cgroup("bounded-qemu-img", POD_LIMIT, &mut command);
    assert!(
        measured.peak >= POD_LIMIT / 100 * 95,
        "qemu-img peaked at {} MiB: the setup is not hostile enough to prove anything",
        measured.peak / MIB
    );
}
