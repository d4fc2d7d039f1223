//! What a failed or stopped import leaves on its destination: nothing that looks like a complete image. A file it
//! created is removed, a file that was there is cut to 0 bytes, a block device has the partial image's ends
//! zeroed; only a durable checkpoint (`--resume`, CDI's pods) keeps what was written.

mod common;

use boundimport::lab::fixtures::LoopDevice;
use common::http::{ServerOptions, TestServer};
use common::privileged::require_privileged;
use common::*;
use nix::sys::signal::Signal;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn run_import(args: &[&std::ffi::OsStr]) -> Finished {
    Running::start(boundimport().args(["--progress", "none"]).args(args)).finish_within(LIMIT)
}

#[test]
fn a_checksum_mismatch_removes_a_new_file_and_cuts_an_existing_one() {
    let bench = Workbench::new("leftover-checksum");
    let source = bench.raw_mix("src.raw", 8 * MIB, 3);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let new = bench.path("new.raw");
    let ended = run_import(&["--checksum".as_ref(), wrong.as_ref(), source.as_os_str(), new.as_os_str()]);
    assert_eq!(ended.status.code(), Some(1), "{}", ended.stderr);
    assert!(ended.stderr.contains("checksum mismatch"), "{}", ended.stderr);
    assert!(!new.exists(), "a file the failed import created is left: {}", ended.stderr);

    let existing = bench.path("existing.raw");
    fs::write(&existing, vec![7u8; MIB as usize]).unwrap();
    let ended = run_import(&["--checksum".as_ref(), wrong.as_ref(), source.as_os_str(), existing.as_os_str()]);
    assert_eq!(ended.status.code(), Some(1), "{}", ended.stderr);
    assert_eq!(fs::metadata(&existing).unwrap().len(), 0, "an existing file is cut to 0 bytes: {}", ended.stderr);
}

#[test]
fn a_stop_without_resume_removes_the_partial_file_and_says_so() {
    let bench = Workbench::new("leftover-stop");
    let served = bench.path("served");
    fs::create_dir(&served).unwrap();
    write_raw(&served.join("disk.raw"), 64 * MIB, &[(0, 64 * MIB, Fill::Random(5))]);
    // 8 MiB/s: the import needs 8 s, and is stopped after about 1.
    let server = TestServer::start(&served, ServerOptions { ranges: true, rate: Some(8 * MIB), ..Default::default() });
    let url = server.url("disk.raw");
    for (resume, signal) in [(false, Signal::SIGINT), (false, Signal::SIGTERM), (true, Signal::SIGINT)] {
        let dest = bench.path(&format!("dest-{resume}-{signal}.raw"));
        let mut cmd = boundimport();
        cmd.args(["--progress", "none"]);
        if resume {
            cmd.arg("--resume");
        }
        let mut run = Running::start(cmd.arg(&url).arg(&dest));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dest.exists() || fs::metadata(&dest).map(|m| m.blocks_used()).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline && run.is_running(), "the import did not start writing");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        run.signal(signal);
        let ended = run.finish_within(LIMIT);
        assert_eq!(ended.status.code(), Some(128 + signal as i32), "{}", ended.stderr);
        let last = ended.stderr.lines().last().unwrap_or_default();
        assert!(last.contains(&format!("stopped by {signal}")), "{last}");
        if resume {
            assert!(last.contains("run again with `--resume` to continue"), "{last}");
            assert_eq!(fs::metadata(&dest).unwrap().len(), 64 * MIB, "kept for resuming");
        } else {
            assert!(last.contains("incomplete, so removed the partial image"), "{last}");
            assert!(!dest.exists(), "{signal}: the partial image is left: {}", ended.stderr);
        }
    }
}

trait BlocksUsed {
    fn blocks_used(&self) -> u64;
}

impl BlocksUsed for fs::Metadata {
    fn blocks_used(&self) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(self)
    }
}

#[test]
fn a_failure_before_anything_is_written_leaves_no_empty_file() {
    let bench = Workbench::new("leftover-efbig");
    // A 1 PiB qcow2: ext4 refuses a file that large (EFBIG) when the destination is sized.
    let image = bench.path("huge.qcow2");
    bench.qemu_img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "1P"]);
    let dest = bench.path("dest.raw");
    let ended = run_import(&[image.as_os_str(), dest.as_os_str()]);
    assert_eq!(ended.status.code(), Some(1), "{}", ended.stderr);
    assert!(ended.stderr.contains("sizing destination"), "{}", ended.stderr);
    assert!(!dest.exists(), "an empty destination is left: {}", ended.stderr);
}

/// A qcow2 served without Range and cut at half its length: read forward, the import fails part-way.
fn cut_qcow2_stream(bench: &Workbench, size: u64) -> (TestServer, String) {
    let served = bench.path("served");
    fs::create_dir_all(&served).unwrap();
    let qcow2 = bench.qcow2_mix("full.qcow2", size, "", &[]);
    let bytes = fs::read(&qcow2).unwrap();
    fs::write(served.join("cut.qcow2"), &bytes[..bytes.len() / 2]).unwrap();
    let server = TestServer::start(&served, ServerOptions { ranges: false, ..Default::default() });
    let url = server.url("cut.qcow2");
    (server, url)
}

#[test]
fn a_failed_import_onto_a_block_device_zeroes_the_partial_images_ends() {
    if !require_privileged("a_failed_import_onto_a_block_device_zeroes_the_partial_images_ends") {
        return;
    }
    let bench = Workbench::new("leftover-device");
    let (_server, url) = cut_qcow2_stream(&bench, 32 * MIB);
    let backing = bench.path("device.img");
    fs::write(&backing, vec![0xa5u8; 48 * MIB as usize]).unwrap();
    let device = LoopDevice::attach(&backing, true).unwrap();
    let ended = run_import(&["--retries".as_ref(), "0".as_ref(), url.as_ref(), device.path().as_os_str()]);
    assert_eq!(ended.status.code(), Some(1), "{}", ended.stderr);
    assert!(ended.stderr.contains("zeroed the partial image's first and last MiB"), "{}", ended.stderr);
    let read = |offset: u64| {
        let mut buf = vec![0u8; MIB as usize];
        std::os::unix::fs::FileExt::read_exact_at(&fs::File::open(device.path()).unwrap(), &mut buf, offset).unwrap();
        buf
    };
    assert!(read(0).iter().all(|&b| b == 0), "the image's first MiB (its header) is left");
    assert!(read(31 * MIB).iter().all(|&b| b == 0), "the image's last MiB is left");
    assert!(read(40 * MIB).iter().all(|&b| b == 0xa5), "past the image nothing is touched");
}

#[test]
fn cdi_removes_disk_img_after_a_failed_stream_import_with_nothing_to_resume() {
    let bench = Workbench::new("leftover-cdi");
    let (_server, url) = cut_qcow2_stream(&bench, 16 * MIB);
    let data = bench.path("data");
    fs::create_dir(&data).unwrap();
    let termination = bench.path("termination-log");
    let output = boundimport()
        .args(["cdi", "--data-dir"])
        .arg(&data)
        .arg("--block-path")
        .arg(bench.path("no-block-volume"))
        .arg("--termination-log")
        .arg(&termination)
        .arg("--scratch-dir")
        .arg(bench.path("no-scratch"))
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--proxy-cert-dir", "/nonexistent-proxycerts", "--extra-headers-dir", "/nonexistent-headers"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs([
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("IMPORTER_ENDPOINT", url.as_str()),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("PREALLOCATION", "false"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let left: Vec<_> = fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left on the volume: {left:?}\n{stderr}");
    assert!(!Path::new(&data.join("disk.img")).exists());
}

/// A tmpfs of `size` bytes mounted at `dir`, unmounted when dropped.
struct SmallTmpfs(std::path::PathBuf);

impl SmallTmpfs {
    fn mount(dir: &Path, size: u64) -> SmallTmpfs {
        fs::create_dir_all(dir).unwrap();
        run(std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(dir));
        SmallTmpfs(dir.to_path_buf())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_scratch_volume_is_named_as_the_scratch_not_the_images() {
    if !require_privileged("a_full_scratch_volume_is_named_as_the_scratch_not_the_images") {
        return;
    }
    let bench = Workbench::new("leftover-scratch");
    // Random data ahead of its L2 table: more than the memory spool holds, so it goes to the scratch file.
    let qcow2 = bench.path("random.qcow2");
    let raw = bench.path("random.raw");
    write_raw(&raw, 24 * MIB, &[(0, 24 * MIB, Fill::Random(9))]);
    bench.qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), qcow2.to_str().unwrap()]);
    let served = bench.path("served");
    fs::create_dir(&served).unwrap();
    bench.qcow2_with_l2_after_data(&qcow2, "served/reordered.qcow2");
    let server = TestServer::start(&served, ServerOptions { ranges: false, ..Default::default() });
    let scratch = SmallTmpfs::mount(&bench.path("scratch"), 4 * MIB);
    let dest = bench.path("dest.raw");
    let ended = run_import(&[
        "--scratch".as_ref(),
        scratch.0.as_os_str(),
        server.url("reordered.qcow2").as_ref(),
        dest.as_os_str(),
    ]);
    assert_eq!(ended.status.code(), Some(1), "{}", ended.stderr);
    let last = ended.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("the scratch space is full") && last.contains(&scratch.0.display().to_string()), "{last}");
    assert!(!last.contains("No space left on device"), "CDI's controller reads that as the image's volume: {last}");
    assert!(!dest.exists(), "{}", ended.stderr);
}
