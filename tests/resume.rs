//! Resume: an import killed at random points (SIGKILL, no chance to clean up) and restarted with `--resume`
//! continues from its last durable checkpoint and ends byte-identical to qemu-img's conversion; a SIGTERM-stopped
//! import resumes exactly where it said it stopped. Needs root for the throttled loop device that keeps the
//! import slow enough to interrupt.

mod common;

use boundimport::lab::fixtures::{LoopDevice, MountedExt4, WriteThrottle};
use common::privileged::require_privileged;
use common::{boundimport, qemu_reference, sha256_prefix, SplitMix64, Workbench, MIB};
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Write bandwidth of the test device: slow enough that a run takes ~10 s and can be interrupted.
const WRITE_BPS: u64 = 16_000_000;

/// The image: data, zeros and compressible runs, big enough to take several checkpoints.
fn image(bench: &Workbench) -> (std::path::PathBuf, String, u64) {
    let image = bench.qcow2_mix("resume.qcow2", 256 * MIB, "cluster_size=64k", &[]);
    let (digest, size) = qemu_reference(&image, bench.dir.path());
    (image, digest, size)
}

fn start(args: &[&str], image: &Path, dest: &Path) -> Child {
    boundimport()
        .args(["--progress", "none", "--json", "--digest", "--resume"])
        .args(args)
        .arg(image)
        .arg(dest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn summary(output: &Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "import failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stderr}"))
}

/// Kills imports at random moments up to `kills` times (fewer if a resumed run finishes first), then lets one
/// finish. Returns its summary and how many runs resumed from a checkpoint.
fn kill_and_resume(args: &[&str], image: &Path, dest: &Path, seed: u64, kills: usize) -> (serde_json::Value, usize) {
    let mut rng = SplitMix64::new(seed);
    let mut resumed = 0;
    for _ in 0..kills {
        let mut child = start(args, image, dest);
        std::thread::sleep(Duration::from_millis(2500 + rng.below(2000)));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap();
        }
        let output = child.wait_with_output().unwrap();
        resumed += usize::from(String::from_utf8_lossy(&output.stderr).contains("resuming at offset"));
        if finished {
            return (summary(&output), resumed);
        }
    }
    let output = start(args, image, dest).wait_with_output().unwrap();
    resumed += usize::from(String::from_utf8_lossy(&output.stderr).contains("resuming at offset"));
    (summary(&output), resumed)
}

fn slow_device(bench: &Workbench, name: &str, size: u64) -> (LoopDevice, WriteThrottle) {
    let backing = bench.path(name);
    File::create(&backing).unwrap().set_len(size.next_multiple_of(MIB) + MIB).unwrap();
    let device = LoopDevice::attach(&backing, true).unwrap();
    let throttle = WriteThrottle::set(device.path(), WRITE_BPS, None).unwrap();
    (device, throttle)
}

/// Kills imports of `source` onto a slow device (state in a directory) and resumes them; the device must end
/// holding qemu-img's conversion of `image` (`want`, `size` bytes), with the digest reported and no state left.
fn assert_device_resumes(bench: &Workbench, source: &Path, want: &str, size: u64, seed: u64) {
    let (device, _throttle) = slow_device(bench, "device", size);
    let state_dir = bench.path("state");
    std::fs::create_dir(&state_dir).unwrap();
    let args = ["--state-dir", state_dir.to_str().unwrap()];
    let (summary, resumed) = kill_and_resume(&args, source, device.path(), seed, 3);
    assert!(resumed >= 1, "no run resumed from a checkpoint");
    assert_eq!(summary["sha256"].as_str(), Some(want), "reported digest");
    assert_eq!(sha256_prefix(device.path(), size), want, "device contents");
    assert_eq!(std::fs::read_dir(&state_dir).unwrap().count(), 0, "state left behind after success");
}

#[test]
fn sigkilled_imports_onto_a_device_resume_to_identical_output() {
    if !require_privileged("sigkilled_imports_onto_a_device_resume_to_identical_output") {
        return;
    }
    let bench = Workbench::new("resume-device");
    let (image, want, size) = image(&bench);
    assert_device_resumes(&bench, &image, &want, size, 1);
}

#[test]
fn sigkilled_imports_of_a_compressed_stream_resume_to_identical_output() {
    if !require_privileged("sigkilled_imports_of_a_compressed_stream_resume_to_identical_output") {
        return;
    }
    // A .qcow2.gz is read as a stream: a resumed run reads it again from the start (its modification time proves
    // it unchanged) and writes only from the watermark on; the digest covers the prefix read back.
    let bench = Workbench::new("resume-stream");
    let (image, want, size) = image(&bench);
    common::run(Command::new("gzip").arg("-1").arg("-k").arg(&image));
    assert_device_resumes(&bench, &image.with_extension("qcow2.gz"), &want, size, 3);
}

#[test]
fn sigkilled_imports_into_a_file_resume_to_identical_output() {
    if !require_privileged("sigkilled_imports_into_a_file_resume_to_identical_output") {
        return;
    }
    let bench = Workbench::new("resume-file");
    let (image, want, size) = image(&bench);
    let (device, _throttle) = slow_device(&bench, "device", size + 64 * MIB);
    let filesystem = MountedExt4::create(device.path()).unwrap();
    let dest = filesystem.path().join("disk.img");
    let (summary, resumed) = kill_and_resume(&[], &image, &dest, 2, 3);
    assert!(resumed >= 1, "no run resumed from a checkpoint");
    assert_eq!(summary["sha256"].as_str(), Some(want.as_str()));
    assert_eq!(sha256_prefix(&dest, size), want);
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), size);
    assert!(!filesystem.path().join(".disk.img.boundimport-resume").exists(), "state left behind");
}

#[test]
fn a_sigterm_stopped_import_resumes_where_it_said_it_stopped() {
    if !require_privileged("a_sigterm_stopped_import_resumes_where_it_said_it_stopped") {
        return;
    }
    let bench = Workbench::new("resume-sigterm");
    let (image, want, size) = image(&bench);
    let (device, _throttle) = slow_device(&bench, "device", size);
    let state_dir = bench.path("state");
    std::fs::create_dir(&state_dir).unwrap();
    let args = ["--state-dir", state_dir.to_str().unwrap()];

    let child = start(&args, &image, device.path());
    std::thread::sleep(Duration::from_secs(3));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let stopped = child.wait_with_output().unwrap();
    assert_eq!(stopped.status.code(), Some(143));
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    // Stopped on request: reported (not as an error) with the offset, and how to continue.
    let line = stderr.lines().find(|l| l.contains("stopped by SIGTERM")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.ends_with("run again with `--resume` to continue") && !stderr.contains("error:"), "{stderr}");
    let offset: u64 = line
        .split("below offset ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {line:?}"));
    assert!(offset > 0 && offset < size, "{line}");

    let summary = summary(&start(&args, &image, device.path()).wait_with_output().unwrap());
    assert_eq!(summary["resumed_at"].as_u64(), Some(offset), "{summary}");
    assert_eq!(summary["sha256"].as_str(), Some(want.as_str()));
    assert_eq!(sha256_prefix(device.path(), size), want);
}
