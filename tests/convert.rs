//! Differential tests of the command line: images made by qemu-img and qemu-io, imported by the boundimport binary
//! into a regular file and onto a loop block device, must hash (sha256) exactly like `qemu-img convert -O raw` of
//! the same image. Also the refusals: backing file without permission, destination too small, checksum mismatch.

mod common;

use common::privileged::require_privileged;
use common::{boundimport, qemu_reference, run_any, sha256_prefix, Fill, Workbench, KIB, MIB};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;

/// How a test image is made: a raw mix converted with qemu-img options, then edited with qemu-io.
struct Variant {
    name: &'static str,
    /// Virtual size in bytes.
    size: u64,
    /// `qemu-img convert -O qcow2 -o ...` options, or `None` for a raw image.
    options: Option<&'static str>,
    /// Extra `qemu-img convert` flags (`-c` to compress).
    flags: &'static [&'static str],
    /// qemu-io commands run on the qcow2 afterwards.
    edits: &'static [&'static str],
}

const VARIANTS: &[Variant] = &[
    Variant { name: "raw-odd-size", size: 20 * MIB + 12345, options: None, flags: &[], edits: &[] },
    Variant { name: "v3-64k", size: 40 * MIB, options: Some(""), flags: &[], edits: &[] },
    Variant { name: "cluster-512", size: 9 * MIB, options: Some("cluster_size=512"), flags: &[], edits: &[] },
    Variant {
        name: "cluster-2m",
        size: 40 * MIB,
        options: Some("cluster_size=2M"),
        flags: &[],
        edits: &["write -z -u 8M 6M"],
    },
    Variant {
        name: "v2-compat",
        size: 24 * MIB,
        options: Some("compat=0.10"),
        flags: &[],
        edits: &["write -P 0x5a 64k 3k", "discard 10M 4M"],
    },
    Variant {
        name: "zero-clusters",
        size: 48 * MIB,
        options: Some(""),
        flags: &[],
        edits: &["write -z 0 128k", "write -z -u 4M 12M", "write -z 20M 100k", "write -z 40M 8M"],
    },
    Variant {
        name: "lazy-refcounts",
        size: 24 * MIB,
        options: Some("lazy_refcounts=on"),
        flags: &[],
        edits: &["write -P 0x31 3M 1M", "discard 9M 2M"],
    },
    Variant {
        name: "extended-l2-64k",
        size: 24 * MIB,
        options: Some("extended_l2=on,cluster_size=64k"),
        flags: &[],
        edits: &["write -P 0x11 6M 512", "write -z 6272k 4k", "write -z -u 4M 64k", "discard 5M 128k"],
    },
    Variant {
        name: "extended-l2-2m",
        size: 24 * MIB,
        options: Some("extended_l2=on,cluster_size=2M"),
        flags: &[],
        edits: &["write -P 0x12 6208k 2k", "write -z 2M 192k", "discard 12M 2M"],
    },
    Variant {
        name: "compressed-zlib",
        size: 40 * MIB,
        options: Some("compression_type=zlib"),
        flags: &["-c"],
        edits: &[],
    },
    Variant {
        name: "compressed-zstd",
        size: 40 * MIB,
        options: Some("compression_type=zstd"),
        flags: &["-c"],
        edits: &["write -P 0x22 1M 70k"],
    },
    Variant {
        name: "compressed-zstd-2m-odd",
        size: 17 * MIB + 1536,
        options: Some("compression_type=zstd,cluster_size=2M"),
        flags: &["-c"],
        edits: &[],
    },
    Variant {
        name: "compressed-extended-l2-4k",
        size: 12 * MIB,
        options: Some("compression_type=zlib,extended_l2=on,cluster_size=16k"),
        flags: &["-c"],
        edits: &["write -z 1M 8k"],
    },
    Variant {
        name: "odd-size-64k",
        size: 33 * MIB + 1536,
        options: Some("cluster_size=64k"),
        flags: &[],
        edits: &["write -P 0x41 33M 1536"],
    },
];

/// Builds `variant` on `bench`, returning the image path.
fn build(bench: &Workbench, variant: &Variant) -> PathBuf {
    let Some(options) = variant.options else {
        return bench.raw_mix(&format!("{}.raw", variant.name), variant.size, 7);
    };
    let name = format!("{}.qcow2", variant.name);
    bench.qcow2_mix(&name, variant.size, options, variant.flags);
    if !variant.edits.is_empty() {
        bench.qemu_io(&name, variant.edits);
    }
    bench.path(&name)
}

/// Runs `boundimport --json ARGS` and returns its output.
fn import(args: &[&str], source: &Path, dest: &Path) -> Output {
    run_any(boundimport().args(["--progress", "none", "--json", "--digest"]).args(args).arg(source).arg(dest))
}

/// The `sha256` field of a successful import's JSON summary, after checking the run succeeded.
fn reported_digest(output: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what}: boundimport failed: {stderr}");
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{what}: bad JSON summary ({e}): {stderr}"));
    summary["sha256"].as_str().unwrap_or_else(|| panic!("{what}: no sha256 in {summary}")).to_string()
}

/// A file of `len` bytes filled with 0xAA, so anything the import fails to write or zero shows up.
fn garbage_file(path: &Path, len: u64) {
    let file = File::create(path).unwrap();
    let block = vec![0xAAu8; MIB as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MIB) as usize;
        file.write_all_at(&block[..n], at).unwrap();
        at += n as u64;
    }
}

/// Imports the variant named `name` into a stale, larger file and, with privileges, onto a loop device full of
/// garbage; both must hash like qemu-img's conversion.
fn check_variant(name: &str) {
    let variant = VARIANTS.iter().find(|v| v.name == name).unwrap_or_else(|| panic!("no variant {name}"));
    let bench = Workbench::new(&format!("convert-{name}"));
    let image = build(&bench, variant);
    let (want, size) = qemu_reference(&image, bench.dir.path());

    let dest = bench.path("out.raw");
    // A stale, larger destination must be truncated, not patched.
    garbage_file(&dest, size + 3 * MIB);
    let output = import(&[], &image, &dest);
    assert_eq!(reported_digest(&output, name), want, "{name}: reported digest");
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), size, "{name}: destination size");
    assert_eq!(sha256_prefix(&dest, size), want, "{name}: destination contents");
    std::fs::remove_file(&dest).unwrap();

    if !require_privileged(&format!("{name} onto a block device")) {
        return;
    }
    // The device is larger than the image and full of garbage: zeros must be written as zeros, and nothing past
    // the image may change.
    let backing = bench.path("device");
    let device_size = size.next_multiple_of(MIB) + MIB;
    garbage_file(&backing, device_size);
    let device = boundimport::lab::fixtures::LoopDevice::attach(&backing, true).unwrap();
    let output = import(&[], &image, device.path());
    assert_eq!(reported_digest(&output, name), want, "{name}: reported digest (device)");
    assert_eq!(sha256_prefix(device.path(), size), want, "{name}: device contents");
    let mut tail = vec![0u8; (device_size - size) as usize];
    File::open(device.path()).unwrap().read_exact_at(&mut tail, size).unwrap();
    assert!(tail.iter().all(|&b| b == 0xAA), "{name}: bytes past the image were changed");
}

/// One test per variant, so they run in parallel and fail separately.
macro_rules! variant_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { check_variant($name) })*

        #[test]
        fn every_variant_has_a_test() {
            let tested = [$($name),*];
            let defined: Vec<&str> = VARIANTS.iter().map(|v| v.name).collect();
            assert_eq!(tested.len(), defined.len(), "{tested:?} vs {defined:?}");
            assert!(defined.iter().all(|d| tested.contains(d)), "{tested:?} vs {defined:?}");
        }
    };
}

variant_tests! {
    raw_odd_size => "raw-odd-size",
    v3_64k => "v3-64k",
    cluster_512 => "cluster-512",
    cluster_2m => "cluster-2m",
    v2_compat => "v2-compat",
    zero_clusters => "zero-clusters",
    lazy_refcounts => "lazy-refcounts",
    extended_l2_64k => "extended-l2-64k",
    extended_l2_2m => "extended-l2-2m",
    compressed_zlib => "compressed-zlib",
    compressed_zstd => "compressed-zstd",
    compressed_zstd_2m_odd => "compressed-zstd-2m-odd",
    compressed_extended_l2 => "compressed-extended-l2-4k",
    odd_size_64k => "odd-size-64k",
}

#[test]
fn mostly_zero_image_stays_sparse_and_zeroes_a_device() {
    let bench = Workbench::new("convert-sparse");
    let name = "sparse.qcow2";
    bench.qemu_img(&["create", "-f", "qcow2", name, "2G"]);
    bench.write(name, Fill::Random(3), 5 * MIB + 3 * KIB, 3 * MIB);
    bench.write(name, Fill::MostlyZero(4), 1500 * MIB, 4 * MIB);
    let image = bench.path(name);
    let (want, size) = qemu_reference(&image, bench.dir.path());

    let dest = bench.path("sparse.out.raw");
    let output = import(&[], &image, &dest);
    assert_eq!(reported_digest(&output, "file"), want);
    assert_eq!(sha256_prefix(&dest, size), want);
    let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
    assert!(allocated <= 8 * MIB, "destination not sparse: {allocated} bytes allocated");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(summary["bytes_written"].as_u64().unwrap() <= 6 * MIB, "{summary}");
    assert!(summary["zero_bytes_skipped"].as_u64().unwrap() >= size - 6 * MIB, "{summary}");
    // Unallocated clusters are never read back: at most the image file itself (7 MiB of data, its metadata and
    // alignment padding) comes off the disk, not the 2 GiB it describes.
    let image_len = std::fs::metadata(&image).unwrap().len();
    let read = summary["source_bytes_read"].as_u64().expect("a local source counts its reads");
    assert!(read >= 7 * MIB && read <= image_len + MIB, "read {read} bytes of a {image_len}-byte image");

    if !require_privileged("mostly_zero_image_stays_sparse_and_zeroes_a_device") {
        return;
    }
    let backing = bench.path("sparse.device");
    garbage_file(&backing, size);
    let device = boundimport::lab::fixtures::LoopDevice::attach(&backing, true).unwrap();
    let output = import(&[], &image, device.path());
    assert_eq!(reported_digest(&output, "device"), want);
    assert_eq!(sha256_prefix(device.path(), size), want);
    // With --target-is-zero nothing is zeroed: the garbage stays where the image is empty.
    let output = import(&["--target-is-zero"], &image, device.path());
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["zero_bytes_zeroed"].as_u64(), Some(0), "{summary}");
}

#[test]
fn backing_chain_is_refused_unless_allowed() {
    let bench = Workbench::new("convert-backing");
    bench.raw_mix("base.raw", 6 * MIB, 9);
    bench.qemu_img(&["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "8M"]);
    bench.qemu_io("mid.qcow2", &["write -P 0x61 1M 64k"]);
    bench.qemu_img(&["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "8M"]);
    bench.qemu_io("top.qcow2", &["write -z 2M 1M", "write -P 0x62 7M 4k"]);
    let image = bench.path("top.qcow2");
    let dest = bench.path("top.out.raw");

    let refused = import(&[], &image, &dest);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("\"mid.qcow2\"") && stderr.contains("--allow-backing"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(!dest.exists(), "destination created for a refused image");

    let (want, _) = qemu_reference(&image, bench.dir.path());
    let output = import(&["--allow-backing"], &image, &dest);
    assert_eq!(reported_digest(&output, "backing chain"), want);
}

#[test]
fn destination_too_small_is_refused_before_writing() {
    if !require_privileged("destination_too_small_is_refused_before_writing") {
        return;
    }
    let bench = Workbench::new("convert-small");
    let image = bench.qcow2_mix("big.qcow2", 9 * MIB, "", &[]);
    let backing = bench.path("small.device");
    garbage_file(&backing, 8 * MIB);
    let device = boundimport::lab::fixtures::LoopDevice::attach(&backing, true).unwrap();
    let output = import(&[], &image, device.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("device holds 8388608 bytes") && stderr.contains("needs 9437184 bytes"), "{stderr}");
    let mut contents = vec![0u8; 8 * MIB as usize];
    File::open(device.path()).unwrap().read_exact_at(&mut contents, 0).unwrap();
    assert!(contents.iter().all(|&b| b == 0xAA), "the device was written to");
}

#[test]
fn source_checksum_is_verified() {
    let bench = Workbench::new("convert-checksum");
    let image = bench.qcow2_mix("c.qcow2", 12 * MIB, "cluster_size=4k", &[]);
    let source_digest = sha256_prefix(&image, std::fs::metadata(&image).unwrap().len());
    let dest = bench.path("c.out.raw");

    let good = import(&["--checksum", &format!("sha256:{source_digest}")], &image, &dest);
    let (want, _) = qemu_reference(&image, bench.dir.path());
    assert_eq!(reported_digest(&good, "good checksum"), want);
    let summary: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(summary["source_checksum"].as_str(), Some(format!("sha256:{source_digest}").as_str()));

    let wrong = format!("sha256:{}", "0".repeat(64));
    let bad = import(&["--checksum", &wrong], &image, &dest);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("checksum mismatch") && stderr.contains(&source_digest), "{stderr}");

    let usage = import(&["--checksum", "sha256:xyz"], &image, &dest);
    assert_eq!(usage.status.code(), Some(2), "{}", String::from_utf8_lossy(&usage.stderr));
}

#[test]
fn usage_errors_exit_2_and_bad_images_exit_1() {
    let bench = Workbench::new("convert-errors");
    let dest = bench.path("out.raw");
    let no_args = run_any(&mut boundimport());
    assert_eq!(no_args.status.code(), Some(2));
    let bad_limit = import(&["--limit", "12MB"], Path::new("x"), &dest);
    assert_eq!(bad_limit.status.code(), Some(2));
    let missing = import(&[], &bench.path("missing.qcow2"), &dest);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("missing.qcow2") && stderr.trim().lines().count() == 1, "{stderr}");

    let truncated = bench.qcow2_mix("t.qcow2", 4 * MIB, "", &[]);
    File::options().write(true).open(&truncated).unwrap().set_len(100).unwrap();
    let output = import(&[], &truncated, &dest);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("t.qcow2") && stderr.trim().lines().count() == 1, "{stderr}");
}
