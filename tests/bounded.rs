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

/// Overwrites the start and end of `len` bytes of `device` with a pattern, so a run that wrote nothing there
/// cannot pass the contents check on what the previous run left.
fn scribble(device: &Path, len: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(device).unwrap();
    let pattern = vec![0xa5u8; MIB as usize];
    for offset in [0, len / 2, len - MIB] {
        file.write_all_at(&pattern, offset).unwrap();
    }
    file.sync_all().unwrap();
}

/// The importer image's binary (`scripts/build-image --binary-only`: static musl, no lab), built once: what a CDI
/// pod runs, and the build the footprint targets are for. `None` (after a SKIP line) without the musl toolchain,
/// unless privileged tests are required.
fn importer_binary() -> Option<&'static Path> {
    static BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if !common::prereq::require("the importer binary's footprint", common::prereq::STATIC_BUILD) {
                return None;
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-image");
            let output = Command::new(script).arg("--binary-only").output().expect("running scripts/build-image");
            let stdout = String::from_utf8_lossy(&output.stdout);
            match stdout.lines().find_map(|l| l.strip_prefix("built ")) {
                Some(path) if output.status.success() => Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)),
                _ if common::privileged::privileged_required() => {
                    panic!("scripts/build-image --binary-only failed: {}", String::from_utf8_lossy(&output.stderr))
                }
                _ => {
                    common::prereq::print_skip(
                        "the importer binary's footprint",
                        &String::from_utf8_lossy(&output.stderr),
                    );
                    None
                }
            }
        })
        .as_deref()
}

#[test]
fn direct_import_onto_throttled_device_stays_small() {
    if !require_privileged("direct_import_onto_throttled_device_stays_small") {
        return;
    }
    let device = SlowDevice::new("bounded-direct");
    // The CLI build (lab included, dynamically linked): its own pages are part of the peak.
    let measured = bounded_import("bounded-direct", POD_LIMIT, &["--io", "direct"], device.path());
    assert!(measured.peak <= 32 * MIB, "peak {} MiB", measured.peak / MIB);
    // The importer a pod runs.
    if let Some(binary) = importer_binary() {
        let image = test_image();
        scribble(device.path(), IMAGE_SIZE);
        let mut command = Command::new(binary);
        command.args(["--progress", "log", "--io", "direct"]).arg(&image.path).arg(device.path());
        let measured = run_in_cgroup("bounded-direct-importer", POD_LIMIT, &mut command);
        assert!(measured.output.status.success(), "{}", String::from_utf8_lossy(&measured.output.stderr));
        assert_eq!(sha256_prefix(device.path(), IMAGE_SIZE), image.digest, "destination contents");
        assert!(measured.peak <= 24 * MIB, "the importer binary peaked at {} MiB", measured.peak / MIB);
    }
}

/// A qcow2 of log-like text (about 3:1) with zstd-compressed clusters, built once into Cargo's target temp
/// directory, and the sha256 of its guest contents.
fn compressed_image() -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bounded-text-512m-zstd.qcow2");
    let sidecar = dir.join("bounded-text-512m-zstd.qcow2.sha256");
    if let (true, Ok(digest)) = (path.exists(), std::fs::read_to_string(&sidecar)) {
        return (path, digest.trim().to_string());
    }
    let raw = dir.join("bounded-text-512m.raw");
    let words = ["kernel:", "systemd[1]:", "started", "eth0", "link", "up", "mounted", "ext4", "error", "ok", "-"];
    let mut rng = SplitMix64::new(77);
    let mut text = Vec::with_capacity(COMPRESSED_SIZE as usize);
    while (text.len() as u64) < COMPRESSED_SIZE {
        let _ = write!(text, "{:08x} ", rng.below(1 << 32));
        for _ in 0..6 {
            text.extend_from_slice(words[rng.below(words.len() as u64) as usize].as_bytes());
            text.push(b' ');
        }
        text.push(b'\n');
    }
    text.truncate(COMPRESSED_SIZE as usize);
    std::fs::write(&raw, &text).unwrap();
    let digest = sha256_prefix(&raw, COMPRESSED_SIZE);
    run(Command::new(qemu_img())
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd"])
        .arg(&raw)
        .arg(&path));
    std::fs::remove_file(&raw).unwrap();
    std::fs::write(&sidecar, &digest).unwrap();
    (path, digest)
}

/// Guest size of the compressed test image.
const COMPRESSED_SIZE: u64 = 512 * MIB;

#[test]
fn compressed_import_onto_throttled_device_stays_under_32_mib() {
    if !require_privileged("compressed_import_onto_throttled_device_stays_under_32_mib") {
        return;
    }
    let (image, digest) = compressed_image();
    let device = SlowDevice::new("bounded-compressed");
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_boundimport"));
    for (name, binary) in
        [("bounded-compressed", Some(cli.as_path())), ("bounded-compressed-importer", importer_binary())]
    {
        let Some(binary) = binary else { continue };
        scribble(device.path(), COMPRESSED_SIZE);
        let mut command = Command::new(binary);
        command.args(["--progress", "log", "--io", "direct"]).arg(&image).arg(device.path());
        let measured = run_in_cgroup(name, POD_LIMIT, &mut command);
        assert!(measured.output.status.success(), "{name}: {}", String::from_utf8_lossy(&measured.output.stderr));
        assert_eq!(sha256_prefix(device.path(), COMPRESSED_SIZE), digest, "{name}: destination contents");
        assert_eq!(measured.events.limit_hits, 0, "{name}");
        assert!(measured.peak <= 32 * MIB, "{name}: peak {} MiB", measured.peak / MIB);
    }
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
