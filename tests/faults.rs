//! Faults under a running import, through the binary: a full filesystem (ENOSPC), a device whose writes fail
//! (a loop device whose backing file cannot grow), EIO on read and on write (the ext4 filesystem under the source,
//! or under the destination device's backing file, shut down mid-import with EXT4_IOC_SHUTDOWN: this kernel has
//! no device-mapper, so that is the reachable error injector), a source truncated mid-import, and a destination
//! removed mid-import (a file unlinked; a device-mapper device torn down where the kernel has device-mapper).
//! Each must end in exit code 1 with one stderr line naming the path and the offset, within a bounded time.
//! Needs root and loop devices.

mod common;

use boundimport::lab::fixtures::{DmDevice, LoopDevice, MountedExt4, WriteThrottle};
use common::privileged::require_privileged;
use common::{boundimport, write_raw, Fill, Running, Workbench, MIB};
use std::fs::File;
use std::path::Path;
use std::time::Duration;

/// Longest any fault case may take: they end in seconds; anything near this is a hang.
const LIMIT: Duration = Duration::from_secs(60);

/// Checks the one-line error: exit 1, a single stderr line naming `path`, an offset within `offsets`, and every
/// needle. Returns the offset.
fn assert_fault(finished: &common::Finished, path: &Path, offsets: std::ops::Range<u64>, needles: &[&str]) -> u64 {
    let stderr = finished.stderr.trim();
    assert_eq!(finished.status.code(), Some(1), "status {:?}: {stderr}", finished.status);
    assert_eq!(stderr.lines().count(), 1, "more than one line:\n{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "does not name {}: {stderr}", path.display());
    for needle in needles {
        assert!(stderr.contains(needle), "lacks {needle:?}: {stderr}");
    }
    let offset: u64 = stderr
        .split("at offset ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset: {stderr}"));
    assert!(offsets.contains(&offset), "offset {offset} outside {offsets:?}: {stderr}");
    offset
}

/// A sparse backing file of `size` bytes for a loop device.
fn backing_file(bench: &Workbench, name: &str, size: u64) -> std::path::PathBuf {
    let path = bench.path(name);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// A unique device-mapper name for this test process.
fn dm_name(label: &str) -> String {
    format!("boundimport-test-{label}-{}", std::process::id())
}

#[test]
fn enospc_on_a_small_filesystem() {
    if !require_privileged("enospc_on_a_small_filesystem") {
        return;
    }
    let bench = Workbench::new("fault-enospc");
    let loop_dev = LoopDevice::attach(&backing_file(&bench, "fs.img", 48 * MIB), false).unwrap();
    let fs = MountedExt4::create(loop_dev.path()).unwrap();
    let source = bench.path("big.raw");
    write_raw(&source, 96 * MIB, &[(0, 96 * MIB, Fill::Random(1))]);
    let dest = fs.path().join("out.raw");
    let run = Running::start(boundimport().arg("--quiet").arg(&source).arg(&dest));
    let started = run.started;
    let finished = run.finish_within(LIMIT);
    let offset = assert_fault(&finished, &dest, 16 * MIB..96 * MIB, &["No space left on device"]);
    eprintln!("ENOSPC at {offset} after {:?}: {}", finished.ended - started, finished.stderr.trim());
    drop(fs);
}

#[test]
fn write_error_from_a_device_whose_backing_file_cannot_grow() {
    if !require_privileged("write_error_from_a_device_whose_backing_file_cannot_grow") {
        return;
    }
    // A 64 MiB sparse backing file on a 24 MiB filesystem: once the filesystem is full, the loop driver's writes
    // to its backing file fail, and the device fails our writes (with ENOSPC passed through on current kernels,
    // EIO on older ones).
    let bench = Workbench::new("fault-eio");
    let small = LoopDevice::attach(&backing_file(&bench, "fs.img", 24 * MIB), false).unwrap();
    let fs = MountedExt4::create(small.path()).unwrap();
    let backing = fs.path().join("disk.img");
    File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let disk = LoopDevice::attach(&backing, true).unwrap();
    let source = bench.path("data.raw");
    write_raw(&source, 64 * MIB, &[(0, 64 * MIB, Fill::Random(2))]);
    let run = Running::start(boundimport().arg("--quiet").arg(&source).arg(disk.path()));
    let started = run.started;
    let finished = run.finish_within(LIMIT);
    let offset = assert_fault(&finished, disk.path(), 4 * MIB..64 * MIB, &["writing destination"]);
    let text = finished.stderr.trim();
    assert!(text.contains("No space left on device") || text.contains("Input/output error"), "{text}");
    eprintln!("device write error at {offset} after {:?}: {}", finished.ended - started, finished.stderr.trim());
    drop(disk);
    drop(fs);
}

/// Shuts down the ext4 filesystem mounted at `mountpoint` (EXT4_IOC_SHUTDOWN, no log flush): every later I/O on
/// it fails with EIO, as when the storage under it disappears.
fn shut_down_filesystem(mountpoint: &Path) {
    use std::os::fd::AsRawFd;
    // include/uapi/linux/ext4.h: #define EXT4_IOC_SHUTDOWN _IOR ('X', 125, __u32);
    // #define EXT4_GOING_FLAGS_NOLOGFLUSH 0x2
    const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
    let dir = File::open(mountpoint).unwrap();
    let flags: u32 = 2;
    // SAFETY: the ioctl reads one u32 from the pointer.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN, &flags) };
    assert_eq!(rc, 0, "EXT4_IOC_SHUTDOWN: {}", std::io::Error::last_os_error());
}

#[test]
fn eio_reading_a_source_whose_filesystem_fails() {
    if !require_privileged("eio_reading_a_source_whose_filesystem_fails") {
        return;
    }
    let bench = Workbench::new("fault-eio-read");
    let (dest, _throttle) = throttled_device(&bench, "dest.img", 64 * MIB, 8 << 20);
    let fs_dev = LoopDevice::attach(&backing_file(&bench, "fs.img", 96 * MIB), false).unwrap();
    let fs = MountedExt4::create(fs_dev.path()).unwrap();
    let source = fs.path().join("data.raw");
    write_raw(&source, 48 * MIB, &[(0, 48 * MIB, Fill::Random(6))]);
    let before = common::sectors_written(dest.path());
    let mut run = Running::start(boundimport().arg("--quiet").arg(&source).arg(dest.path()));
    wait_until_writing(&mut run, dest.path(), before);
    shut_down_filesystem(fs.path());
    let failed = std::time::Instant::now();
    let finished = run.finish_within(LIMIT);
    let offset = assert_fault(&finished, &source, 0..48 * MIB, &["Input/output error"]);
    eprintln!("read EIO {:?} after the shutdown, at {offset}: {}", finished.ended - failed, finished.stderr.trim());
}

/// A loop device of `size` bytes, written with direct I/O and throttled to `bps`.
fn throttled_device(bench: &Workbench, name: &str, size: u64, bps: u64) -> (LoopDevice, WriteThrottle) {
    let device = LoopDevice::attach(&backing_file(bench, name, size), true).unwrap();
    let throttle = WriteThrottle::set(device.path(), bps, None).unwrap();
    (device, throttle)
}

/// Waits until the import under `run` has written something to `device` (it is mid-import), at most 20 s.
fn wait_until_writing(run: &mut Running, device: &Path, before: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while common::sectors_written(device) <= before + 2048 {
        assert!(run.is_running(), "import ended before it was interrupted");
        assert!(std::time::Instant::now() < deadline, "import never started writing");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn source_truncated_mid_import() {
    if !require_privileged("source_truncated_mid_import") {
        return;
    }
    let bench = Workbench::new("fault-truncated");
    let (device, _throttle) = throttled_device(&bench, "dest.img", 64 * MIB, 8 << 20);
    for (label, make) in [("raw", false), ("qcow2", true)] {
        let raw = bench.path(&format!("{label}.raw"));
        write_raw(&raw, 48 * MIB, &[(0, 48 * MIB, Fill::Random(3))]);
        let source = if make {
            let qcow2 = bench.path("source.qcow2");
            bench.qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), "source.qcow2"]);
            qcow2
        } else {
            raw
        };
        let before = common::sectors_written(device.path());
        let mut run = Running::start(boundimport().arg("--quiet").arg(&source).arg(device.path()));
        wait_until_writing(&mut run, device.path(), before);
        File::options().write(true).open(&source).unwrap().set_len(8 * MIB).unwrap();
        let truncated = std::time::Instant::now();
        let finished = run.finish_within(LIMIT);
        let offset = assert_fault(&finished, &source, 0..48 * MIB + MIB, &[]);
        let text = finished.stderr.trim();
        assert!(
            text.contains("truncated") || text.contains("shrank") || text.contains("past the end of the file"),
            "{text}"
        );
        eprintln!("{label}: stopped {:?} after the truncation, at {offset}: {text}", finished.ended - truncated);
    }
}

#[test]
fn destination_file_removed_mid_import() {
    if !require_privileged("destination_file_removed_mid_import") {
        return;
    }
    let bench = Workbench::new("fault-unlinked");
    let (device, _throttle) = throttled_device(&bench, "fs.img", 128 * MIB, 8 << 20);
    let fs = MountedExt4::create(device.path()).unwrap();
    let source = bench.path("data.raw");
    write_raw(&source, 48 * MIB, &[(0, 48 * MIB, Fill::Random(4))]);
    let dest = fs.path().join("out.raw");
    let before = common::sectors_written(device.path());
    let mut run = Running::start(boundimport().arg("--quiet").arg(&source).arg(&dest));
    wait_until_writing(&mut run, device.path(), before);
    std::fs::remove_file(&dest).unwrap();
    let removed = std::time::Instant::now();
    let finished = run.finish_within(LIMIT);
    let offset = assert_fault(&finished, &dest, 0..48 * MIB, &["destination file was removed"]);
    eprintln!("stopped {:?} after the unlink, at {offset}: {}", finished.ended - removed, finished.stderr.trim());
    drop(fs);
}

#[test]
fn destination_device_loses_its_storage_mid_import() {
    if !require_privileged("destination_device_loses_its_storage_mid_import") {
        return;
    }
    // The destination is a loop device over a file on a filesystem that is shut down mid-import: the device node
    // stays, everything under it is gone (a detached network disk). A detached loop device would not do: the
    // kernel defers the detach until the last close, and writes keep succeeding.
    let bench = Workbench::new("fault-gone");
    let (lower, _throttle) = throttled_device(&bench, "fs.img", 128 * MIB, 8 << 20);
    let fs = MountedExt4::create(lower.path()).unwrap();
    let backing = fs.path().join("disk.img");
    File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let disk = LoopDevice::attach(&backing, true).unwrap();
    let source = bench.path("data.raw");
    write_raw(&source, 48 * MIB, &[(0, 48 * MIB, Fill::Random(5))]);
    let before = common::sectors_written(disk.path());
    let mut run = Running::start(boundimport().arg("--quiet").arg(&source).arg(disk.path()));
    wait_until_writing(&mut run, disk.path(), before);
    shut_down_filesystem(fs.path());
    let removed = std::time::Instant::now();
    let finished = run.finish_within(LIMIT);
    let offset = assert_fault(&finished, disk.path(), 0..48 * MIB, &["Input/output error"]);
    eprintln!("stopped {:?} after the storage went, at {offset}: {}", finished.ended - removed, finished.stderr.trim());
}

/// Whether the kernel has device-mapper (it is a module some kernels lack).
fn device_mapper_available() -> bool {
    std::fs::read_to_string("/proc/misc").is_ok_and(|m| m.contains("device-mapper"))
}

#[test]
fn destination_device_removed_mid_import() {
    if !require_privileged("destination_device_removed_mid_import") {
        return;
    }
    if !device_mapper_available() {
        // A kernel feature, not a privilege: skipped even under BOUNDIMPORT_REQUIRE_PRIVILEGED=1;
        // destination_device_loses_its_storage_mid_import covers the same failure without it.
        common::prereq::print_skip("destination_device_removed_mid_import", "no device-mapper in this kernel");
        return;
    }
    let bench = Workbench::new("fault-removed");
    let (device, _throttle) = throttled_device(&bench, "disk.img", 64 * MIB, 8 << 20);
    let dm = DmDevice::create(&dm_name("gone"), &format!("0 131072 linear {} 0", device.path().display())).unwrap();
    let source = bench.path("data.raw");
    write_raw(&source, 48 * MIB, &[(0, 48 * MIB, Fill::Random(5))]);
    let before = common::sectors_written(device.path());
    let mut run = Running::start(boundimport().arg("--quiet").arg(&source).arg(dm.path()));
    wait_until_writing(&mut run, device.path(), before);
    dm.force_remove().unwrap();
    let removed = std::time::Instant::now();
    let finished = run.finish_within(LIMIT);
    let offset = assert_fault(&finished, dm.path(), 0..48 * MIB, &["Input/output error"]);
    eprintln!("stopped {:?} after the removal, at {offset}: {}", finished.ended - removed, finished.stderr.trim());
}
