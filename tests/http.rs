//! HTTP(S) and streamed sources, end to end through the binary: images served by the in-process test server (with
//! and without Range support, with faults), and local compressed files, must hash exactly like `qemu-img convert -O
//! raw` of the uncompressed image. Also checksums over the compressed bytes, network faults, TLS and auth.

mod common;

use common::http::{ServerOptions, TestServer};
use common::{boundimport, qemu_reference, run, sha256_prefix, Workbench, MIB};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The test images, built once: a qcow2 of the standard mix, its compressed variants, a raw image compressed, a
/// streamOptimized vmdk, and a qcow2 whose L2 table comes after its data.
struct Images {
    bench: Workbench,
    /// sha256 and length of qemu-img's raw output of the qcow2 (all variants hold the same disk).
    reference: (String, u64),
    /// The same for the out-of-order qcow2.
    reordered: (String, u64),
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let bench = Workbench::for_process("http-images");
        let size = 24 * MIB + 4096;
        let qcow2 = bench.qcow2_mix("disk.qcow2", size, "", &[]);
        let raw = bench.path("disk.raw");
        run(Command::new(common::qemu_img()).args(["convert", "-O", "raw"]).arg(&qcow2).arg(&raw));
        let sh = |script: &str| run(Command::new("sh").arg("-c").arg(script).current_dir(bench.dir.path()));
        sh("xz -k -T0 disk.qcow2 && gzip -k disk.qcow2 && zstd -q -k disk.qcow2 && xz -k disk.raw");
        // Multi-member gzip: two halves compressed separately and concatenated.
        sh("head -c 10000000 disk.raw | gzip > disk.raw.gz && tail -c +10000001 disk.raw | gzip >> disk.raw.gz");
        bench.qemu_img(&["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "disk.raw", "disk.vmdk"]);
        sh("xz -k disk.vmdk");
        let reference = qemu_reference(&qcow2, bench.dir.path());
        let reordered = reorder_l2(&bench, &qcow2);
        Images { bench, reference, reordered }
    })
}

/// The reordered qcow2 (its first L2 table after the data it maps), xz-compressed too, and its reference.
fn reorder_l2(bench: &Workbench, qcow2: &Path) -> (String, u64) {
    let path = bench.qcow2_with_l2_after_data(qcow2, "reordered.qcow2");
    run(Command::new("xz").args(["-k", "-T0"]).arg(&path));
    qemu_reference(&path, bench.dir.path())
}

fn import(args: &[&str], source: &str, dest: &Path) -> Output {
    boundimport().args(["--progress", "none", "--json"]).args(args).arg(source).arg(dest).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Imports `source` and checks the destination against `reference`; returns the JSON summary.
fn import_ok(args: &[&str], source: &str, reference: &(String, u64), label: &str) -> serde_json::Value {
    let out_dir = common::scratch_dir("http-out");
    let dest = out_dir.path().join("out.raw");
    let output = import(args, source, &dest);
    assert!(output.status.success(), "{label}: {}", stderr(&output));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), reference.1, "{label}: size");
    assert_eq!(sha256_prefix(&dest, reference.1), reference.0, "{label}: contents");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{label}: {e}"))
}

const VARIANTS: &[&str] = &[
    "disk.qcow2",
    "disk.qcow2.gz",
    "disk.qcow2.xz",
    "disk.qcow2.zst",
    "disk.raw.xz",
    "disk.raw.gz",
    "disk.vmdk",
    "disk.vmdk.xz",
];

#[test]
fn every_variant_over_http_with_and_without_range_matches_qemu() {
    let images = images();
    for ranges in [true, false] {
        let server = TestServer::start(images.bench.dir.path(), ServerOptions { ranges, ..Default::default() });
        for name in VARIANTS {
            let label = format!("{name} ranges={ranges}");
            let summary = import_ok(&[], &server.url(name), &images.reference, &label);
            if name.contains("qcow2") {
                assert_eq!(summary["spooled_bytes"], 0, "{label}: {summary}");
            }
            let requests = summary["http_requests"].as_u64().unwrap();
            eprintln!("{label}: {requests} HTTP requests");
            if name.contains("qcow2") {
                // qemu-img's layout reads front to back: the probe, then one long request (two with the tap); on
                // parallel range requests, one request per 1 MiB range besides.
                let parallel = !summary["range_window_bytes"].is_null();
                let ranges = if parallel { summary["downloaded_bytes"].as_u64().unwrap().div_ceil(MIB) } else { 0 };
                assert!(requests <= 4 + ranges, "{label}: {requests} requests");
            }
        }
    }
}

#[test]
fn local_compressed_files_match_qemu() {
    let images = images();
    for name in VARIANTS {
        let path = images.bench.path(name);
        import_ok(&[], path.to_str().unwrap(), &images.reference, name);
    }
}

#[test]
fn a_dropped_connection_resumes() {
    let images = images();
    for ranges in [true, false] {
        for name in ["disk.qcow2", "disk.qcow2.xz", "disk.raw.gz"] {
            let options = ServerOptions { ranges, drop_at: Some((3 * MIB + 777, 2)), ..Default::default() };
            let server = TestServer::start(images.bench.dir.path(), options);
            let label = format!("{name} ranges={ranges}");
            import_ok(&[], &server.url(name), &images.reference, &label);
            let resumed =
                server.requests().iter().filter(|r| r.range.as_deref().is_some_and(|r| r != "bytes=0-0")).count();
            if ranges {
                assert!(resumed >= 1, "{label}: {:?}", server.requests());
            }
        }
    }
}

#[test]
fn a_file_replaced_mid_import_fails_instead_of_mixing_versions() {
    let bench = Workbench::new("http-replaced");
    let len = 16 * MIB;
    let source = bench.raw_mix("disk.raw", len, 1);
    // Slow (about 4 s for the file) and dropped once at the half, so the import reopens after the file changed.
    let options = ServerOptions {
        ranges: true,
        etag: true,
        rate: Some(len / 4),
        drop_at: Some((len / 2, 1)),
        ..Default::default()
    };
    let server = TestServer::start(bench.dir.path(), options);
    let out = common::scratch_dir("http-replaced-out");
    let dest = out.path().join("out.raw");
    let mut command = boundimport();
    command.args(["--progress", "none"]).arg(server.url("disk.raw")).arg(&dest);
    let child = command.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.bytes_served() < len / 4 {
        assert!(Instant::now() < deadline, "the import never got a quarter in");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Rewritten in place, another version of the same size: only its ETag tells.
    let other = bench.raw_mix("other.raw", len, 2);
    std::fs::write(&source, std::fs::read(other).unwrap()).unwrap();
    let output = child.wait_with_output().unwrap();
    let text = stderr(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("the file changed during the import"), "{text}");
    assert!(!dest.exists(), "no partial image left");
}

#[test]
fn retries_run_out() {
    let images = images();
    let options = ServerOptions { ranges: true, drop_at: Some((MIB, 100)), ..Default::default() };
    let server = TestServer::start(images.bench.dir.path(), options);
    let dir = common::scratch_dir("http-retries");
    let url = server.url("disk.qcow2.xz");
    let output = import(&["--retries", "2"], &url, &dir.path().join("out.raw"));
    let text = stderr(&output);
    assert!(!output.status.success());
    assert!(text.contains(&url) && text.contains("giving up"), "{text}");
}

#[test]
fn a_stall_fails_within_the_timeout() {
    let images = images();
    for ranges in [true, false] {
        let server = TestServer::start(
            images.bench.dir.path(),
            ServerOptions { ranges, stall_at: Some(2 * MIB), ..Default::default() },
        );
        let dir = common::scratch_dir("http-stall");
        let url = server.url("disk.qcow2");
        let started = Instant::now();
        let output = import(&["--stall-timeout", "1"], &url, &dir.path().join("out.raw"));
        let text = stderr(&output);
        assert!(!output.status.success(), "{text}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert!(text.contains(&url) && text.contains("stalled"), "{text}");
        assert_eq!(text.lines().filter(|l| l.contains("error:")).count(), 1, "{text}");
    }
}

#[test]
fn a_lying_content_length_is_detected() {
    let images = images();
    for lie in [-4096i64, 4096] {
        let server =
            TestServer::start(images.bench.dir.path(), ServerOptions { length_lie: lie, ..Default::default() });
        let dir = common::scratch_dir("http-lie");
        for name in ["disk.raw.xz", "disk.qcow2"] {
            let url = server.url(name);
            let output = import(&["--retries", "1"], &url, &dir.path().join("out.raw"));
            let text = stderr(&output);
            assert!(!output.status.success(), "lie {lie} {name}: {text}");
            assert!(text.contains(&url), "{text}");
        }
    }
}

#[test]
fn checksums_cover_the_bytes_as_downloaded() {
    let images = images();
    let server = TestServer::start(images.bench.dir.path(), ServerOptions { ranges: true, ..Default::default() });
    let file = images.bench.path("disk.qcow2.xz");
    for (algo, tool) in [("md5", "md5sum"), ("sha1", "sha1sum"), ("sha256", "sha256sum"), ("sha512", "sha512sum")] {
        let out = run(Command::new(tool).arg(&file));
        let digest = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string();
        let checksum = format!("{algo}:{digest}");
        let summary = import_ok(&["--checksum", &checksum], &server.url("disk.qcow2.xz"), &images.reference, algo);
        assert_eq!(summary["source_checksum"], checksum.as_str());
        import_ok(&["--checksum", &checksum], file.to_str().unwrap(), &images.reference, algo);
    }
    // A mismatch: an error naming it, and the destination holds nothing of the image: the file the import
    // created is gone (issue 31: no longer a full-size file of holes).
    let dir = common::scratch_dir("http-mismatch");
    let dest = dir.path().join("out.raw");
    let wrong = format!("sha256:{}", "0".repeat(64));
    for url in [server.url("disk.qcow2.xz"), server.url("disk.qcow2")] {
        let output = import(&["--checksum", &wrong], &url, &dest);
        assert!(!output.status.success());
        assert!(stderr(&output).contains("checksum mismatch"), "{}", stderr(&output));
        assert!(!dest.exists(), "{url}: written data was not discarded");
    }
}

#[test]
fn data_before_its_l2_table_is_spooled() {
    let images = images();
    let server = TestServer::start(images.bench.dir.path(), ServerOptions::default());
    let scratch = common::scratch_dir("http-spool");
    let url = server.url("reordered.qcow2.xz");
    let args = ["--scratch", scratch.path().to_str().unwrap()];
    let summary = import_ok(&args, &url, &images.reordered, "reordered");
    let spooled = summary["spooled_bytes"].as_u64().unwrap();
    eprintln!("reordered qcow2.xz: {spooled} bytes spooled");
    assert!(spooled > 8 * MIB, "{summary}");
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0, "spool file left behind");
    // Without a scratch directory the spool cannot grow past memory: a clear error saying what to pass.
    let dir = common::scratch_dir("http-spool-none");
    let output = import(&[], &url, &dir.path().join("out.raw"));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--scratch"), "{}", stderr(&output));
}

#[test]
fn https_with_a_ca_dir_or_insecure_and_unknown_cas_refused() {
    let images = images();
    let server =
        TestServer::start(images.bench.dir.path(), ServerOptions { ranges: true, tls: true, ..Default::default() });
    let ca = common::scratch_dir("http-ca");
    std::fs::write(ca.path().join("test-ca.pem"), server.cert_pem.as_ref().unwrap()).unwrap();
    let url = server.url("disk.qcow2.xz");
    import_ok(&["--ca-dir", ca.path().to_str().unwrap()], &url, &images.reference, "ca-dir");
    import_ok(&["--insecure"], &url, &images.reference, "insecure");
    let dir = common::scratch_dir("http-tls-refused");
    let output = import(&[], &url, &dir.path().join("out.raw"));
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains(&url) && text.to_lowercase().contains("certificate"), "{text}");
}

#[test]
fn basic_auth_from_options_or_userinfo() {
    let images = images();
    let options = ServerOptions { ranges: true, auth: Some(("alice".into(), "s3cret".into())), ..Default::default() };
    let server = TestServer::start(images.bench.dir.path(), options);
    let url = server.url("disk.qcow2");
    import_ok(&["--user", "alice:s3cret"], &url, &images.reference, "--user");
    let with_userinfo = url.replace("http://", "http://alice:s3cret@");
    import_ok(&[], &with_userinfo, &images.reference, "userinfo");
    let dir = common::scratch_dir("http-auth");
    let output = import(&["--user", "alice:wrong"], &url, &dir.path().join("out.raw"));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("401"), "{}", stderr(&output));
    assert!(!stderr(&output).contains("s3cret"));
}

#[test]
fn a_preallocated_qcow2_streams_with_its_tables_first() {
    // A v2 image with preallocated metadata: every one of its 384Ki clusters is allocated (no zero flag in v2),
    // mostly over holes of the file, so the forward reader names and places them all; only the written ones hold
    // data.
    let bench = Workbench::new("http-prealloc");
    bench.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,preallocation=metadata,cluster_size=4k",
        "p.qcow2",
        "1536M",
    ]);
    bench.qemu_io("p.qcow2", &["write -P 0x3c 1M 3M", "write -P 0x3d 200M 64k", "write -z 2M 4k"]);
    run(Command::new("xz").args(["-k", "-T0", "-0"]).arg(bench.path("p.qcow2")));
    let reference = qemu_reference(&bench.path("p.qcow2"), bench.dir.path());
    let summary = import_ok(&[], bench.path("p.qcow2.xz").to_str().unwrap(), &reference, "preallocated qcow2.xz");
    // At most a refcount block passes before the tables that say it is one.
    assert!(summary["spooled_bytes"].as_u64().unwrap() <= 64 << 10, "{summary}");
}
