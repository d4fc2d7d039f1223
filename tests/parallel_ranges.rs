//! Parallel range requests (issue 29), through the binary:
//! - over a server that honours Range (the in-process test server of tests/common/http.rs), qcow2, raw,
//!   `.qcow2.gz`, `.raw.xz`, vmdk, vhdx, vdi and vhd import byte for byte as `qemu-img convert -O raw` writes them,
//!   on several connections (`--json` says how many, and the window's bytes; the server saw 1 MiB ranges), adaptive
//!   against a server capping each connection, or fixed; `--connections 1` is one long request as before;
//! - hostile servers (tests/common/ranges.rs; no real server misbehaves on request): one that ignores Range is read
//!   on one connection; one that answers another range than asked, or changes its ETag between ranges, fails
//!   naming the URL and offset; one that refuses connections past two (503 or 429) is read on fewer.

mod common;

use common::http::{ServerOptions, TestServer};
use common::ranges::{Misbehave, RangeServer};
use common::{boundimport, qemu_reference, run, sha256_prefix, Workbench, MIB};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The test images, built once: one disk (the standard mix) in every format read over Range.
struct Images {
    bench: Workbench,
    /// sha256 and length of qemu-img's raw output (every image holds the same disk)…
    reference: (String, u64),
    /// …but the vhd, whose size qemu-img rounds up to a whole CHS geometry.
    vhd: (String, u64),
}

impl Images {
    fn reference(&self, name: &str) -> &(String, u64) {
        if name.ends_with(".vhd") {
            &self.vhd
        } else {
            &self.reference
        }
    }
}

/// 40 MiB: more than two windows of the default budget's 16 MiB.
const SIZE: u64 = 40 * MIB + 4096;

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let bench = Workbench::for_process("parallel-ranges");
        let qcow2 = bench.qcow2_mix("disk.qcow2", SIZE, "", &[]);
        let reference = qemu_reference(&qcow2, bench.dir.path());
        bench.qemu_img(&["convert", "-O", "raw", "disk.qcow2", "disk.raw"]);
        for (format, name) in [("vmdk", "disk.vmdk"), ("vhdx", "disk.vhdx"), ("vdi", "disk.vdi"), ("vpc", "disk.vhd")] {
            bench.qemu_img(&["convert", "-O", format, "disk.raw", name]);
        }
        let sh = |script: &str| run(Command::new("sh").arg("-c").arg(script).current_dir(bench.dir.path()));
        sh("gzip -k disk.qcow2 && xz -k -T0 disk.raw");
        let vhd = qemu_reference(&bench.path("disk.vhd"), bench.dir.path());
        Images { bench, reference, vhd }
    })
}

fn import(args: &[&str], url: &str, label: &str) -> (Output, tempfile::TempDir) {
    let out = common::scratch_dir("parallel-out");
    let dest = out.path().join("out.raw");
    let output = boundimport()
        .args(["--progress", "none", "--json", "--retries", "2"])
        .args(args)
        .arg(url)
        .arg(&dest)
        .output()
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    (output, out)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Imports `url`, checks the output against the reference and returns the `--json` summary.
fn import_ok(args: &[&str], url: &str, label: &str) -> serde_json::Value {
    let reference = images().reference(url);
    let (output, out) = import(args, url, label);
    assert!(output.status.success(), "{label}: {}", stderr(&output));
    let dest = out.path().join("out.raw");
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), reference.1, "{label}: size");
    assert_eq!(sha256_prefix(&dest, reference.1), reference.0, "{label}: contents");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{label}: {e}"))
}

const FORMATS: &[&str] =
    &["disk.qcow2", "disk.raw", "disk.qcow2.gz", "disk.raw.xz", "disk.vmdk", "disk.vhdx", "disk.vdi", "disk.vhd"];

#[test]
fn every_format_over_parallel_ranges_matches_qemu() {
    let images = images();
    let dir = images.bench.dir.path();
    // Connections pay only where each is capped, as object stores cap them: on a fast local server one 1 MiB body
    // is received before the next request is sent, and `http_connections` counts bodies received at once.
    let capped = ServerOptions { ranges: true, etag: true, connection_rate: Some(10_000_000), ..Default::default() };
    let capped = TestServer::start(dir, capped);
    for name in FORMATS {
        for connections in [None, Some("4")] {
            let server = &capped;
            let label = format!("{name} --connections {connections:?}");
            let args: Vec<&str> = connections.map(|n| vec!["--connections", n]).unwrap_or_default();
            let before = server.requests().len();
            let summary = import_ok(&args, &server.url(name), &label);
            let used = summary["http_connections"].as_u64().unwrap();
            // The slow start adds a connection after 300 ms and two ranges: a file of a second or less (the
            // compressed ones, 10 MiB) may end first on a loaded machine.
            let stored = std::fs::metadata(images.bench.path(name)).unwrap().len();
            if connections.is_some() || stored >= 32 * MIB {
                assert!(used >= 2, "{label}: {used} connections: {summary}");
            }
            if connections.is_some() {
                assert!(used <= 4, "{label}: {used} connections");
            }
            assert_eq!(summary["range_window_bytes"], 16 * MIB, "{label}: {summary}");
            let ranges: Vec<String> = server.requests()[before..].iter().filter_map(|r| r.range.clone()).collect();
            let whole_mib = |r: &String| {
                let (a, b) = r.strip_prefix("bytes=").and_then(|r| r.split_once('-')).unwrap();
                matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if b + 1 - a == MIB)
            };
            assert!(ranges.iter().filter(|r| whole_mib(r)).count() >= 8, "{label}: {ranges:?}");
        }
    }
}

#[test]
fn one_connection_is_one_long_request() {
    let images = images();
    let server = TestServer::start(images.bench.dir.path(), ServerOptions { ranges: true, ..Default::default() });
    for name in ["disk.qcow2", "disk.qcow2.gz"] {
        let before = server.requests().len();
        let summary = import_ok(&["--connections", "1"], &server.url(name), name);
        assert_eq!(summary["http_connections"], 1, "{name}: {summary}");
        assert!(summary["range_window_bytes"].is_null(), "{name}: {summary}");
        let requests = server.requests().len() - before;
        assert!(requests <= 4, "{name}: {requests} requests");
    }
}

#[test]
fn a_server_that_ignores_range_is_read_on_one_connection() {
    let images = images();
    let server = TestServer::start(images.bench.dir.path(), ServerOptions { ranges: false, ..Default::default() });
    for name in ["disk.qcow2", "disk.qcow2.gz"] {
        let before = server.requests().len();
        let summary = import_ok(&[], &server.url(name), name);
        assert_eq!(summary["http_connections"], 1, "{name}: {summary}");
        let statuses: Vec<u16> = server.requests()[before..].iter().map(|r| r.status).collect();
        assert!(statuses.iter().all(|&s| s == 200), "{name}: {statuses:?}");
    }
}

/// The raw disk's bytes, served by a hostile server.
fn raw_disk() -> Vec<u8> {
    std::fs::read(images().bench.path("disk.raw")).unwrap()
}

/// Imports from a server misbehaving as `misbehave` and checks it fails naming the URL, an offset, and `what`.
fn fails_clearly(misbehave: Misbehave, what: &str) {
    let server = RangeServer::start(raw_disk(), misbehave);
    let url = server.url("disk.raw");
    let (output, out) = import(&["--connections", "4"], &url, what);
    let message = stderr(&output);
    assert!(!output.status.success(), "{what}: succeeded: {message}");
    assert!(message.contains(&url), "{what}: no URL: {message}");
    assert!(message.contains("offset"), "{what}: no offset: {message}");
    assert!(message.contains(what), "{what}: {message}");
    assert!(!message.contains("panicked"), "{what}: {message}");
    // Nothing that looks like a complete import is left.
    let dest = out.path().join("out.raw");
    let left = std::fs::metadata(&dest).map_or(0, |m| m.len());
    assert!(left < images().reference.1, "{what}: {left} bytes left at the destination");
}

#[test]
fn a_server_answering_another_range_fails_naming_url_and_offset() {
    fails_clearly(Misbehave::WrongRange { after: 6 }, "got");
}

#[test]
fn an_etag_change_between_ranges_fails_without_mixing_versions() {
    fails_clearly(Misbehave::NewEtag { after: 6 }, "the file changed during the import");
}

#[test]
fn a_server_refusing_more_connections_is_read_on_fewer() {
    for status in [503, 429] {
        let server = RangeServer::start(raw_disk(), Misbehave::Limit { connections: 2, status });
        let label = format!("HTTP {status} past 2 connections");
        let (output, out) = import(&["--connections", "6"], &server.url("disk.raw"), &label);
        let message = stderr(&output);
        assert!(output.status.success(), "{label}: {message}");
        let reference = &images().reference;
        assert_eq!(sha256_prefix(&out.path().join("out.raw"), reference.1), reference.0, "{label}: contents");
        assert!(message.contains(&format!("HTTP {status}")) && message.contains("continuing on"), "{label}: {message}");
        assert!(server.statuses().contains(&status), "{label}: the server never refused");
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let used = summary["http_connections"].as_u64().unwrap();
        assert!((1..=2).contains(&used), "{label}: {used} connections: {summary}");
        assert!(server.peak_connections() <= 2, "{label}: server served {} at once", server.peak_connections());
    }
}
