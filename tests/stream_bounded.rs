//! The bound for a table-first format read as a stream: a 1 GiB dynamic vhd, gzipped, imported over HTTP without
//! Range (forward only, gunzipped in the importer) in a 600M memory cgroup must peak within the HTTP bound of
//! tests/http_bounded.rs (96 MiB) with no limit hit, create no file beside the destination, spool nothing, and
//! match `qemu-img convert -f vpc -O raw`. Needs root and a memory cgroup.

mod common;

use boundimport::lab::fixtures::{drop_caches, ChildCgroup};
use common::http::{ServerOptions, TestServer};
use common::privileged::require_privileged;
use common::{boundimport, qemu_img, run, sha256_prefix, write_raw, Fill, MIB};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

const IMAGE_SIZE: u64 = 1 << 30;
const POD_LIMIT: u64 = 600_000_000;

/// Builds (once, kept in Cargo's target temp dir) a 1 GiB dynamic vhd of mixed random, compressible and zero
/// data, its gzip, and the sha256 and length of qemu-img's raw output of it.
fn image() -> (PathBuf, String, u64) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vhd-stream-bounded");
    std::fs::create_dir_all(&dir).unwrap();
    let sidecar = dir.join("disk.sha256");
    if let (true, Ok(text)) = (dir.join("disk.vhd.gz").exists(), std::fs::read_to_string(&sidecar)) {
        if let Some((digest, len)) = text.trim().split_once(' ') {
            return (dir, digest.to_string(), len.parse().unwrap());
        }
    }
    let raw = dir.join("disk.raw");
    let segments: Vec<_> = (0..IMAGE_SIZE / (48 * MIB) + 1)
        .map(|i| {
            let at = i * 48 * MIB;
            let fill = match i % 8 {
                0 => Fill::Random(i),
                1..=4 => Fill::Pattern,
                _ => Fill::Zero,
            };
            (at, (48 * MIB).min(IMAGE_SIZE.saturating_sub(at)), fill)
        })
        .filter(|s| s.1 > 0)
        .collect();
    write_raw(&raw, IMAGE_SIZE, &segments);
    let vhd = dir.join("disk.vhd");
    run(Command::new(qemu_img())
        .args(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic"])
        .arg(&raw)
        .arg(&vhd));
    std::fs::remove_file(&raw).unwrap();
    let reference = dir.join("reference.raw");
    run(Command::new(qemu_img()).args(["convert", "-f", "vpc", "-O", "raw"]).arg(&vhd).arg(&reference));
    let len = std::fs::metadata(&reference).unwrap().len();
    let digest = sha256_prefix(&reference, len);
    std::fs::remove_file(&reference).unwrap();
    run(Command::new("gzip").args(["-1", "-f"]).arg(&vhd));
    std::fs::write(&sidecar, format!("{digest} {len}")).unwrap();
    (dir, digest, len)
}

#[test]
fn gzipped_dynamic_vhd_over_http_stays_under_96_mib_in_a_600m_cgroup_without_spooling() {
    if !require_privileged("gzipped_dynamic_vhd_over_http_stays_under_96_mib_in_a_600m_cgroup_without_spooling") {
        return;
    }
    let (dir, digest, len) = image();
    let out = common::scratch_dir("vhd-stream-bounded-out");
    let dest = out.path().join("disk.raw");
    let server = TestServer::start(&dir, ServerOptions { ranges: false, ..Default::default() });
    let cgroup = ChildCgroup::create(&format!("vhd-gz-{}", std::process::id()), POD_LIMIT).unwrap();
    drop_caches().unwrap();
    let started = Instant::now();
    let mut command = boundimport();
    command.args(["--progress", "none", "--json", "--no-digest", &server.url("disk.vhd.gz")]).arg(&dest);
    let child = cgroup.spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped())).unwrap();
    let output = child.wait_with_output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), len);
    assert_eq!(sha256_prefix(&dest, len), digest, "contents");
    let reader = cgroup.reader();
    let peak = reader.peak().unwrap().unwrap();
    let limit_hits = reader.events().unwrap().limit_hits;
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!(
        "vhd.gz over HTTP without Range: peak {} MiB, limit hits {limit_hits}, {seconds:.1}s ({:.0} MiB/s of guest \
         data), spooled {}, format {}, compression {}",
        peak / MIB,
        len as f64 / MIB as f64 / seconds,
        summary["spooled_bytes"],
        summary["format"],
        summary["compression"]
    );
    assert_eq!(summary["format"], "vpc");
    assert_eq!(summary["spooled_bytes"], 0, "{summary}");
    assert!(peak <= 96 * MIB, "peak {} MiB", peak / MIB);
    assert_eq!(limit_hits, 0);
    let files: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files, vec![std::ffi::OsString::from("disk.raw")], "files created besides the destination");
}
