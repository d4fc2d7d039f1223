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
