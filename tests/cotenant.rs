//! Write-behind beside a co-tenant that fills the cgroup with clean page cache (reading a large file, as a log
//! shipper or a second container of the pod might): clean cache is reclaimable at once, so the import must not
//! treat it as pressure and crawl. Measured as the import's wall time with the co-tenant against without, in the
//! same 600M memory cgroup. Needs root, a memory cgroup and loop devices.

mod common;

use boundimport::lab::fixtures::{drop_caches, ChildCgroup};
use common::privileged::require_privileged;
use common::{boundimport, scratch_dir, sha256_prefix, MIB};
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const POD_LIMIT: u64 = 600_000_000;
const IMAGE_SIZE: u64 = 512 * MIB;

/// Imports `image` with write-behind into a fresh file inside `cgroup`; returns the wall time.
fn import(cgroup: &ChildCgroup, image: &std::path::Path, dest: &std::path::Path) -> Duration {
    let _ = std::fs::remove_file(dest);
    let started = Instant::now();
    let child = cgroup
        .spawn(
            boundimport()
                .args(["--io", "writebehind", "--progress", "none", "--no-digest"])
                .arg(image)
                .arg(dest)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let wall = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for line in stderr.lines().filter(|l| l.contains("waits")) {
        eprintln!("  {line}");
    }
    wall
}

#[test]
fn a_cotenant_reading_a_large_file_does_not_slow_write_behind() {
    if !require_privileged("a_cotenant_reading_a_large_file_does_not_slow_write_behind") {
        return;
    }
    let dir = scratch_dir("cotenant");
    let image = dir.path().join("image.raw");
    common::write_pattern_file(&image, common::Fill::Random(42), 0, IMAGE_SIZE as usize);
    let want = sha256_prefix(&image, IMAGE_SIZE);
    // Reading a sparse file's holes fills the page cache just like data: 1.5 GB of clean cache, cheaply.
    let big = dir.path().join("cotenant.dat");
    File::create(&big).unwrap().set_len(1_500_000_000).unwrap();
    let dest = dir.path().join("dest.raw");
    let cgroup = ChildCgroup::create(&format!("cotenant-{}", std::process::id()), POD_LIMIT).unwrap();

    drop_caches().unwrap();
    let alone = import(&cgroup, &image, &dest);
    assert_eq!(sha256_prefix(&dest, IMAGE_SIZE), want);

    drop_caches().unwrap();
    let mut reader = cgroup
        .spawn(Command::new("sh").arg("-c").arg(format!("while :; do cat '{}' > /dev/null; done", big.display())))
        .unwrap();
    // Wait for the co-tenant to fill the cgroup with clean cache.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cgroup.reader().stat().unwrap().file < POD_LIMIT / 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stat = cgroup.reader().stat().unwrap();
    let beside = import(&cgroup, &image, &dest);
    let _ = reader.kill();
    let _ = reader.wait();
    assert_eq!(sha256_prefix(&dest, IMAGE_SIZE), want);
    eprintln!(
        "write-behind of {} MiB: {:.2} s alone, {:.2} s beside a co-tenant holding {} MiB of clean cache \
         (usage {} MiB)",
        IMAGE_SIZE / MIB,
        alone.as_secs_f64(),
        beside.as_secs_f64(),
        stat.file / MIB,
        stat.usage / MIB
    );
    assert!(stat.file >= POD_LIMIT / 2, "the co-tenant did not fill the cgroup: {stat:?}");
    assert!(
        beside.as_secs_f64() <= 2.0 * alone.as_secs_f64() + 0.5,
        "at {:.2} s beside the co-tenant against {:.2} s alone, write-behind ran at under half its speed",
        beside.as_secs_f64(),
        alone.as_secs_f64()
    );
}
