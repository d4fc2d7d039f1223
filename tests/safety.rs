//! First-contact slips that must never cost data: SOURCE and DEST naming the same file (directly, through a hard
//! link or a symlink, or a loop device over the source) are refused before anything is written, and the source
//! comes out untouched.

mod common;

use boundimport::lab::fixtures::LoopDevice;
use common::privileged::require_privileged;
use common::{boundimport, run_any, sha256_prefix, Workbench, MIB};
use std::path::Path;

/// Runs boundimport SOURCE DEST and checks it refused with one line naming the source, leaving it as it was.
fn assert_refused_same(source: &Path, dest: &Path) {
    let len = std::fs::metadata(source).unwrap().len();
    let before = sha256_prefix(source, len);
    let output = run_any(boundimport().arg("--quiet").arg(source).arg(dest));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{} -> {}: {stderr}", source.display(), dest.display());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("destination is the source"), "{stderr}");
    assert_eq!(std::fs::metadata(source).unwrap().len(), len, "{stderr}");
    assert_eq!(sha256_prefix(source, len), before, "the source changed: {stderr}");
}

#[test]
fn source_and_destination_the_same_file_is_refused() {
    let bench = Workbench::new("same-file");
    let qcow2 = bench.qcow2_mix("same.qcow2", 64 * MIB, "cluster_size=65536", &[]);
    let raw = bench.raw_mix("same.raw", 8 * MIB, 3);
    std::fs::hard_link(&qcow2, bench.path("hard.qcow2")).unwrap();
    std::os::unix::fs::symlink("same.qcow2", bench.path("soft.qcow2")).unwrap();
    std::fs::create_dir(bench.path("sub")).unwrap();
    assert_refused_same(&qcow2, &qcow2);
    assert_refused_same(&qcow2, &bench.path("hard.qcow2"));
    assert_refused_same(&bench.path("soft.qcow2"), &qcow2);
    assert_refused_same(&qcow2, &bench.path("sub/../same.qcow2"));
    assert_refused_same(&raw, &raw);
    // A different file is imported as usual.
    let output = run_any(boundimport().arg(&qcow2).arg(bench.path("other.raw")));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn a_loop_device_over_the_source_is_refused() {
    if !require_privileged("a_loop_device_over_the_source_is_refused") {
        return;
    }
    let bench = Workbench::new("same-loop");
    let raw = bench.raw_mix("backing.raw", 16 * MIB, 5);
    let device = LoopDevice::attach(&raw, false).unwrap();
    // Writing the device would overwrite the file, and the other way round.
    assert_refused_same(&raw, device.path());
    assert_refused_same(device.path(), &raw);
}

#[test]
fn directories_are_bad_paths_with_exit_1() {
    let bench = Workbench::new("directories");
    let raw = bench.raw_mix("image.raw", MIB, 1);
    let dir = bench.path("dir");
    std::fs::create_dir(&dir).unwrap();
    for (source, dest, what) in [(&dir, &bench.path("out.raw"), "source"), (&raw, &dir, "destination")] {
        let output = run_any(boundimport().arg("--quiet").arg(source).arg(dest));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("{what} is a directory")), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

/// Fills `path` with `len` bytes of a recognisable pattern and returns its sha256.
fn precious(path: &Path, len: u64) -> String {
    common::write_pattern_file(path, common::Fill::Random(77), 0, len as usize);
    sha256_prefix(path, len)
}

#[test]
fn a_corrupt_image_leaves_the_destination_untouched() {
    let bench = Workbench::new("corrupt-untouched");
    let image = bench.qcow2_mix("whole.qcow2", 256 * MIB, "cluster_size=65536", &[]);
    // The header and L1 table survive, the L2 tables and data do not: found only by mapping the image.
    let bytes = std::fs::read(&image).unwrap();
    let truncated = bench.path("truncated.qcow2");
    std::fs::write(&truncated, &bytes[..(320 << 10).min(bytes.len())]).unwrap();
    let dest = bench.path("existing.raw");
    let before = precious(&dest, 3 * MIB);
    let output = run_any(boundimport().arg("--quiet").arg(&truncated).arg(&dest));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("truncated.qcow2"), "{stderr}");
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 3 * MIB, "{stderr}");
    assert_eq!(sha256_prefix(&dest, 3 * MIB), before, "the destination was written: {stderr}");
}

#[test]
fn a_failed_stream_leaves_nothing_that_looks_complete() {
    let bench = Workbench::new("stream-failed");
    let image = bench.qcow2_mix("whole.qcow2", 64 * MIB, "cluster_size=65536", &[]);
    let bytes = std::fs::read(&image).unwrap();
    // A gzip stream cut short: the forward driver has written part of the image when the stream breaks.
    let gz = bench.path("cut.qcow2.gz");
    let compressed = gzip(bytes);
    std::fs::write(&gz, &compressed[..compressed.len() * 3 / 4]).unwrap();
    let created = bench.path("created.raw");
    let output = run_any(boundimport().arg("--quiet").arg(&gz).arg(&created));
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!created.exists(), "a partial image was left at {}", created.display());
    let existing = bench.path("existing.raw");
    precious(&existing, MIB);
    let output = run_any(boundimport().arg("--quiet").arg(&gz).arg(&existing));
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::metadata(&existing).unwrap().len(), 0, "a partial image of full size was left");
}

/// `bytes` gzipped by the system's `gzip`.
fn gzip(bytes: Vec<u8>) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(&bytes));
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    output.stdout
}

#[test]
fn read_only_destinations_are_refused_before_writing() {
    if !require_privileged("read_only_destinations_are_refused_before_writing") {
        return;
    }
    let bench = Workbench::new("read-only-dest");
    let image = bench.qcow2_mix("image.qcow2", 8 * MIB, "cluster_size=65536", &[]);
    // An immutable file: even root cannot open it for writing.
    let immutable = bench.path("immutable.raw");
    let before = precious(&immutable, 8 * MIB);
    common::run(std::process::Command::new("chattr").arg("+i").arg(&immutable));
    let output = run_any(boundimport().arg("--quiet").arg(&image).arg(&immutable));
    common::run(std::process::Command::new("chattr").arg("-i").arg(&immutable));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("immutable (chattr +i)"), "{stderr}");
    assert_eq!(sha256_prefix(&immutable, 8 * MIB), before);
    // A read-only loop device: opening it for writing succeeds, every write would fail.
    let backing = bench.path("ro-backing.raw");
    let before = precious(&backing, 16 * MIB);
    let device = attach_read_only(&backing);
    let output = run_any(boundimport().arg("--quiet").arg(&image).arg(&device.0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("read-only"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    drop(device);
    assert_eq!(sha256_prefix(&backing, 16 * MIB), before);
}

/// A read-only loop device, detached on drop.
struct ReadOnlyLoop(std::path::PathBuf);

impl Drop for ReadOnlyLoop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach_read_only(backing: &Path) -> ReadOnlyLoop {
    let output =
        common::run(std::process::Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(backing));
    ReadOnlyLoop(std::path::PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// Runs boundimport with `args` and returns (exit code, stderr).
fn run_args(args: &[&str]) -> (Option<i32>, String) {
    let output = run_any(boundimport().args(args));
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn limits_that_cannot_work_are_refused_naming_the_minimum() {
    let bench = Workbench::new("limits");
    let image = bench.raw_mix("image.raw", MIB, 2);
    let dest = bench.path("out.raw");
    let (image, dest) = (image.to_str().unwrap(), dest.to_str().unwrap());
    for limit in ["0", "1", "8Mi", "33554431"] {
        let (code, stderr) = run_args(&["--quiet", "--limit", limit, image, dest]);
        assert_eq!(code, Some(2), "--limit {limit}: {stderr}");
        assert!(stderr.contains("below the 32.00 MiB an import needs"), "--limit {limit}: {stderr}");
        assert!(!Path::new(dest).exists(), "--limit {limit} wrote the destination");
    }
    let (code, stderr) = run_args(&["--limit", "600m", image, dest]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("did you mean 600M or 600Mi?"), "{stderr}");
    let (code, stderr) = run_args(&["--quiet", "--limit", "32Mi", image, dest]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_checksum_of_the_wrong_length_says_so() {
    let (code, stderr) = run_args(&["--checksum", "sha256:abc", "a.raw", "b.raw"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("the digest has 3 hex digits, but a sha256 digest has 64"), "{stderr}");
}

#[test]
fn the_output_digest_is_printed_only_when_asked_for() {
    let bench = Workbench::new("digest-opt-in");
    let image = bench.raw_mix("image.raw", 4 * MIB, 8);
    let dest = bench.path("out.raw");
    let plain = run_any(boundimport().arg("--quiet").arg(&image).arg(&dest));
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    assert!(plain.stdout.is_empty(), "{}", String::from_utf8_lossy(&plain.stdout));
    let asked = run_any(boundimport().args(["--quiet", "--digest"]).arg(&image).arg(&dest));
    let line = String::from_utf8_lossy(&asked.stdout).into_owned();
    assert_eq!(line, format!("{}  {}\n", sha256_prefix(&image, 4 * MIB), dest.display()));
    // The old switch is still accepted.
    let old = run_any(boundimport().args(["--quiet", "--no-digest"]).arg(&image).arg(&dest));
    assert!(old.status.success() && old.stdout.is_empty(), "{}", String::from_utf8_lossy(&old.stderr));
}
