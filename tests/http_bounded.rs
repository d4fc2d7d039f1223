//! The bound over the network: a ≥ 1 GiB qcow2.xz imported over HTTP (no Range: a forward-only stream, xz-decoded
//! in the importer) in a 600M memory cgroup must peak at ≤ 96 MiB with no limit hit, create no file outside the
//! destination, and spool nothing. The uncompressed qcow2 is also imported over HTTP with Range and from the local
//! file in the same run, for throughput. Needs root and a memory cgroup.

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

/// Builds (once, kept in Cargo's target temp dir) a 1 GiB qcow2 of mixed random and compressible data, its xz, and
/// the sha256 of the guest disk.
fn image() -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("http-bounded");
    std::fs::create_dir_all(&dir).unwrap();
    let qcow2 = dir.join("disk.qcow2");
    let sidecar = dir.join("disk.sha256");
    if let (true, true, Ok(digest)) =
        (qcow2.exists(), dir.join("disk.qcow2.xz").exists(), std::fs::read_to_string(&sidecar))
    {
        return (dir, digest.trim().to_string());
    }
    let raw = dir.join("disk.raw");
    let mut segments = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < IMAGE_SIZE {
        let len = (48 * MIB).min(IMAGE_SIZE - at);
        // Mostly compressible data: incompressible runs are what make xz slow to build the test image.
        let fill = match i % 8 {
            0 => Fill::Random(i),
            1..=4 => Fill::Pattern,
            _ => Fill::Zero,
        };
        segments.push((at, len, fill));
        at += len;
        i += 1;
    }
    write_raw(&raw, IMAGE_SIZE, &segments);
    let digest = sha256_prefix(&raw, IMAGE_SIZE);
    run(Command::new(qemu_img()).args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2));
    std::fs::remove_file(&raw).unwrap();
    run(Command::new("xz").args(["-k", "-f", "-T0", "-0"]).arg(&qcow2));
    std::fs::write(&sidecar, &digest).unwrap();
    (dir, digest)
}

struct Run {
    peak: u64,
    limit_hits: u64,
    seconds: f64,
    summary: serde_json::Value,
}

fn import_in_cgroup(name: &str, source: &str, dest: &std::path::Path, digest: &str) -> Run {
    let cgroup = ChildCgroup::create(&format!("{name}-{}", std::process::id()), POD_LIMIT).unwrap();
    drop_caches().unwrap();
    let started = Instant::now();
    let mut command = boundimport();
    command.args(["--progress", "none", "--json", "--no-digest", source]).arg(dest);
    let child = cgroup.spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped())).unwrap();
    let output = child.wait_with_output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(sha256_prefix(dest, IMAGE_SIZE), digest, "{name}: contents");
    let reader = cgroup.reader();
    let run = Run {
        peak: reader.peak().unwrap().unwrap(),
        limit_hits: reader.events().unwrap().limit_hits,
        seconds,
        summary: serde_json::from_slice(&output.stdout).unwrap(),
    };
    eprintln!(
        "{name}: peak {} MiB, limit hits {}, {:.1}s ({:.0} MiB/s of guest data), spooled {}, requests {}",
        run.peak / MIB,
        run.limit_hits,
        seconds,
        IMAGE_SIZE as f64 / MIB as f64 / seconds,
        run.summary["spooled_bytes"],
        run.summary["http_requests"]
    );
    run
}

#[test]
fn qcow2_xz_over_http_stays_under_96_mib_in_a_600m_cgroup() {
    if !require_privileged("qcow2_xz_over_http_stays_under_96_mib_in_a_600m_cgroup") {
        return;
    }
    let (dir, digest) = image();
    let out = common::scratch_dir("http-bounded-out");
    let dest = out.path().join("disk.raw");

    let stream_server = TestServer::start(&dir, ServerOptions::default());
    let streamed = import_in_cgroup("http-qcow2-xz", &stream_server.url("disk.qcow2.xz"), &dest, &digest);
    assert!(streamed.peak <= 96 * MIB, "peak {} MiB", streamed.peak / MIB);
    assert_eq!(streamed.limit_hits, 0);
    assert_eq!(streamed.summary["spooled_bytes"], 0);
    let files: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files, vec![std::ffi::OsString::from("disk.raw")], "files created besides the destination");

    // Throughput, same image, same run: HTTP with Range against the local file.
    let range_server = TestServer::start(&dir, ServerOptions { ranges: true, ..Default::default() });
    let http = import_in_cgroup("http-qcow2-range", &range_server.url("disk.qcow2"), &dest, &digest);
    let local = import_in_cgroup("local-qcow2", dir.join("disk.qcow2").to_str().unwrap(), &dest, &digest);
    assert!(http.peak <= 96 * MIB && http.limit_hits == 0, "http peak {} MiB", http.peak / MIB);
    eprintln!(
        "throughput: http+range {:.0} MiB/s, local {:.0} MiB/s, qcow2.xz stream {:.0} MiB/s",
        1024.0 / http.seconds,
        1024.0 / local.seconds,
        1024.0 / streamed.seconds
    );
}
