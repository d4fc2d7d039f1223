//! Signals mid-import, through the binary, onto a loop device throttled with blkio so the import is reliably in
//! the middle when the signal lands:
//! - SIGTERM and SIGINT: writes stop within a second (the device's write counter stops moving), the process exits
//!   with 128 + the signal after flushing, and its one error line says where it stopped; everything below that
//!   offset is the image's data. A second signal exits at once.
//! - SIGKILL at random moments, each followed by a rerun without flags: the rerun overwrites whatever the killed
//!   run left, and the device ends up byte-identical to qemu-img's conversion.
//!
//! Needs root, loop devices and the blkio throttle.

mod common;

use boundimport::lab::fixtures::{LoopDevice, WriteThrottle};
use common::privileged::require_privileged;
use common::{boundimport, sectors_written, sha256_prefix, write_raw, Fill, Running, SplitMix64, Workbench, MIB};
use nix::sys::signal::Signal;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest wait for any run to end.
const LIMIT: Duration = Duration::from_secs(120);

/// A throttled loop device over a sparse file in `bench`.
struct Device {
    _throttle: WriteThrottle,
    device: LoopDevice,
}

impl Device {
    fn new(bench: &Workbench, name: &str, size: u64, bps: u64) -> Device {
        let backing = bench.path(name);
        File::create(&backing).unwrap().set_len(size).unwrap();
        let device = LoopDevice::attach(&backing, true).unwrap();
        let throttle = WriteThrottle::set(device.path(), bps, None).unwrap();
        Device { _throttle: throttle, device }
    }

    fn path(&self) -> &Path {
        self.device.path()
    }
}

/// Waits until the import has written at least `bytes` to `device` since `before`.
fn wait_for_progress(run: &mut Running, device: &Path, before: u64, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sectors_written(device) < before + bytes / 512 {
        assert!(run.is_running(), "import ended before the signal");
        assert!(Instant::now() < deadline, "import made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The offset in a line "... below offset N (0x...) ...".
fn reported_offset(line: &str) -> u64 {
    line.split("below offset ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {line:?}"))
}

#[test]
fn sigterm_and_sigint_stop_writing_within_a_second() {
    if !require_privileged("sigterm_and_sigint_stop_writing_within_a_second") {
        return;
    }
    let bench = Workbench::new("signals");
    const SIZE: u64 = 192 * MIB;
    let source = bench.path("data.raw");
    write_raw(&source, SIZE, &[(0, SIZE, Fill::Random(11))]);
    // 32 MB/s: the import needs about 6 s, and the writes in flight (at most 8 chunks of 2 MiB) drain in 0.5 s.
    let device = Device::new(&bench, "disk.img", 256 * MIB, 32 << 20);
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let before = sectors_written(device.path());
        let mut run = Running::start(boundimport().arg(&source).arg(device.path()));
        wait_for_progress(&mut run, device.path(), before, 24 * MIB);
        run.signal(signal);
        let signalled = Instant::now();
        // Watch the device's write counter until the process is gone.
        let mut last = sectors_written(device.path());
        let mut last_change = signalled;
        while run.is_running() {
            let now = sectors_written(device.path());
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            assert!(signalled.elapsed() < Duration::from_secs(30), "{signal} did not stop the import");
            std::thread::sleep(Duration::from_millis(5));
        }
        let finished = run.finish_within(Duration::from_secs(1));
        // Writes that completed between the last sample and the exit count as late as the exit.
        let at_exit = sectors_written(device.path());
        if at_exit != last {
            last = at_exit;
            last_change = finished.ended;
        }
        let exited = finished.ended - signalled;
        let stopped_writing = last_change - signalled;
        // Nothing may move after the exit.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(sectors_written(device.path()), last, "{signal}: writes after the exit");

        assert_eq!(finished.status.code(), Some(128 + signal as i32), "{signal}: {}", finished.stderr);
        // A stop the user asked for is reported, not called an error; without --resume no rerun hint.
        assert!(!finished.stderr.contains("error:"), "{signal}: {}", finished.stderr);
        let stopped: Vec<&str> =
            finished.stderr.lines().filter(|l| l.contains(&format!("stopped by {signal} after writing "))).collect();
        assert_eq!(stopped.len(), 1, "{signal}: {}", finished.stderr);
        assert_eq!(finished.stderr.lines().last(), Some(stopped[0]), "{signal}: {}", finished.stderr);
        assert!(!stopped[0].contains("--resume"), "{signal}: {}", stopped[0]);
        let offset = reported_offset(stopped[0]);
        assert!(offset > 0 && offset < SIZE, "{signal}: stopped at {offset}");
        assert!(stopped_writing <= Duration::from_secs(1), "{signal}: writes went on for {stopped_writing:?}");
        assert!(exited <= Duration::from_millis(1500), "{signal}: exited after {exited:?}");
        // Everything below the reported offset is on the device.
        assert_eq!(
            sha256_prefix(device.path(), offset),
            sha256_prefix(&source, offset),
            "{signal}: the data below {offset} is not the image's"
        );
        eprintln!(
            "{signal}: writes stopped {stopped_writing:?} and the process exited {exited:?} after the signal; {}",
            stopped[0]
        );
    }

    // With --resume the stop line says how to continue, and doing so finishes the image from where it stopped.
    let state = bench.path("state");
    std::fs::create_dir(&state).unwrap();
    let resume = || {
        let mut cmd = boundimport();
        cmd.args(["--resume", "--progress", "log", "--state-dir"]).arg(&state).arg(&source).arg(device.path());
        cmd
    };
    let before = sectors_written(device.path());
    let mut run = Running::start(&mut resume());
    wait_for_progress(&mut run, device.path(), before, 24 * MIB);
    run.signal(Signal::SIGINT);
    let stopped = run.finish_within(LIMIT);
    assert_eq!(stopped.status.code(), Some(130), "{}", stopped.stderr);
    let line = stopped.stderr.lines().last().unwrap_or_default().to_string();
    assert!(line.contains("stopped by SIGINT") && line.ends_with("run again with `--resume` to continue"), "{line}");
    let offset = reported_offset(&line);
    let resumed = Running::start(&mut resume()).finish_within(LIMIT);
    assert!(resumed.status.success(), "{}", resumed.stderr);
    assert!(resumed.stderr.contains(&format!("resuming at offset {offset}")), "{}", resumed.stderr);
    assert_eq!(sha256_prefix(device.path(), SIZE), sha256_prefix(&source, SIZE), "resumed image");
    eprintln!("SIGINT with --resume: {line}");

    // A second signal does not wait for the flush.
    let before = sectors_written(device.path());
    let mut run = Running::start(boundimport().arg("--quiet").arg(&source).arg(device.path()));
    wait_for_progress(&mut run, device.path(), before, 8 * MIB);
    run.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(20));
    run.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    let finished = run.finish_within(Duration::from_secs(5));
    assert_eq!(finished.status.code(), Some(143), "{}", finished.stderr);
    // Even at once, it says what it leaves.
    let last = finished.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("stopped at once by a second signal") && last.contains("incomplete"),
        "{}",
        finished.stderr
    );
    eprintln!("second SIGTERM: exited {:?} after it", finished.ended - signalled);
    // "At once" still waits for the O_DIRECT writes already in the device queue (a thread in one cannot be
    // killed until it completes): up to 16 MiB at 32 MB/s here.
    assert!(finished.ended - signalled < Duration::from_secs(1));
}

#[test]
fn sigkill_at_random_points_then_a_rerun_matches_qemu() {
    if !require_privileged("sigkill_at_random_points_then_a_rerun_matches_qemu") {
        return;
    }
    let bench = Workbench::new("sigkill");
    // Data, zeros, compressed clusters: the rerun must both overwrite and zero what the killed run left.
    let image = bench.qcow2_mix("image.qcow2", 64 * MIB, "cluster_size=64k", &["-c"]);
    let (want, len) = common::qemu_reference(&image, bench.dir.path());
    let device = Device::new(&bench, "disk.img", 96 * MIB, 16 << 20);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("delays from seed {seed}");
    let mut rng = SplitMix64::new(seed);
    let mut killed_mid_import = 0;
    for round in 0..5 {
        let delay = Duration::from_millis(50 + rng.below(3000));
        let mut run = Running::start(boundimport().arg("--quiet").arg(&image).arg(device.path()));
        std::thread::sleep(delay);
        let was_running = run.is_running();
        run.signal(Signal::SIGKILL);
        killed_mid_import += usize::from(was_running);
        let killed = run.finish_within(Duration::from_secs(10));
        assert!(!was_running || killed.status.code().is_none(), "round {round}: not killed: {}", killed.stderr);
        let rerun = Running::start(boundimport().arg("--quiet").arg(&image).arg(device.path())).finish_within(LIMIT);
        assert!(rerun.status.success(), "round {round}: rerun failed: {}", rerun.stderr);
        assert_eq!(
            sha256_prefix(device.path(), len),
            want,
            "round {round}: killed after {delay:?}, the rerun did not produce qemu's image"
        );
        eprintln!("round {round}: killed after {delay:?}, rerun identical to qemu-img");
    }
    assert!(killed_mid_import >= 3, "only {killed_mid_import} of 5 kills landed mid-import");
}
