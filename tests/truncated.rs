//! Images cut short (issue 30, item 4), through the binary:
//! - every format with data past the cut (qcow2, vmdk, vpc, vdi, vhdx) is refused from a file, over HTTP Range
//!   and as a stream (a server without Range), with an error naming the source and the offset; none exits 0;
//! - a random-cut property: for seeded cut points of every fixture (the five formats, a compressed-cluster qcow2
//!   and a streamOptimized vmdk), from a file and as a stream, boundimport never exits 0 with output different
//!   from `qemu-img convert -O raw` of the same cut file (qemu-img refusing is fine when boundimport refuses).

mod common;

use common::http::{ServerOptions, TestServer};
use common::{boundimport, qemu_img, run_any, sha256_prefix, write_raw, Fill, SplitMix64, Workbench, MIB};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// (file name, qemu-img format) of every fixture.
const FIXTURES: [(&str, &str); 7] = [
    ("disk.qcow2", "qcow2"),
    ("disk.vmdk", "vmdk"),
    ("disk.vpc", "vpc"),
    ("disk.vdi", "vdi"),
    ("disk.vhdx", "vhdx"),
    ("compressed.qcow2", "qcow2"),
    ("stream.vmdk", "vmdk"),
];

/// The fixtures, made once from a 6 MiB disk of random, zero and compressible parts.
fn fixtures() -> &'static Workbench {
    static BENCH: OnceLock<Workbench> = OnceLock::new();
    BENCH.get_or_init(|| {
        let bench = Workbench::for_process("truncated");
        let raw = bench.path("disk.raw");
        write_raw(
            &raw,
            6 * MIB,
            &[(0, MIB, Fill::Random(30)), (2 * MIB, 2 * MIB, Fill::Pattern), (4 * MIB, 2 * MIB, Fill::Random(31))],
        );
        for (name, format) in &FIXTURES[..5] {
            bench.qemu_img(&["convert", "-O", format, "disk.raw", name]);
        }
        bench.qemu_img(&["convert", "-c", "-O", "qcow2", "disk.raw", "compressed.qcow2"]);
        bench.qemu_img(&["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "disk.raw", "stream.vmdk"]);
        bench
    })
}

/// Copies the first `len` bytes of fixture `name` to `cut`.
fn cut(bench: &Workbench, name: &str, len: u64, cut: &str) {
    let bytes = std::fs::read(bench.path(name)).unwrap();
    std::fs::write(bench.path(cut), &bytes[..len as usize]).unwrap();
}

/// Runs boundimport from `source` to `dest`: (success, stderr).
fn import(source: &str, dest: &Path) -> (bool, String) {
    let _ = std::fs::remove_file(dest);
    let output = boundimport().args(["--progress", "none"]).arg(source).arg(dest).output().unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn data_past_the_end_is_refused_from_a_file_over_range_and_as_a_stream() {
    let bench = fixtures();
    let ranged = TestServer::start(bench.dir.path(), ServerOptions { ranges: true, ..Default::default() });
    let plain = TestServer::start(bench.dir.path(), ServerOptions::default());
    let dest = bench.path("out-refused.raw");
    for (name, _) in &FIXTURES[..5] {
        let len = std::fs::metadata(bench.path(name)).unwrap().len();
        // Into the middle of the data, on a block boundary and inside a block.
        for at in [len / 2, len / 2 + 12_345] {
            let cut_name = format!("cut-{at}-{name}");
            cut(bench, name, at, &cut_name);
            let file = bench.path(&cut_name).to_string_lossy().into_owned();
            for (how, source) in [("file", file), ("range", ranged.url(&cut_name)), ("stream", plain.url(&cut_name))] {
                let (ok, stderr) = import(&source, &dest);
                let last = stderr.lines().last().unwrap_or_default();
                assert!(!ok, "{name} cut at {at}, {how}: exit 0\n{stderr}");
                assert!(last.contains(&source) && last.contains("offset"), "{name} cut at {at}, {how}: {last}");
                assert!(last.contains("past the end"), "{name} cut at {at}, {how}: {last}");
            }
        }
    }
}

#[test]
fn a_random_cut_never_imports_differently_from_qemu() {
    let bench = fixtures();
    let plain = TestServer::start(bench.dir.path(), ServerOptions::default());
    let (dest, reference) = (bench.path("out-cut.raw"), bench.path("qemu-cut.raw"));
    let mut rng = SplitMix64::new(0x30);
    let mut outcomes = [0u32; 3];
    for (name, format) in FIXTURES {
        let len = std::fs::metadata(bench.path(name)).unwrap().len();
        for round in 0..4 {
            let at = 1 + rng.below(len - 1);
            let cut_name = format!("random-{round}-{name}");
            cut(bench, name, at, &cut_name);
            let _ = std::fs::remove_file(&reference);
            let qemu = run_any(
                Command::new(qemu_img())
                    .args(["convert", "-f", format, "-O", "raw"])
                    .arg(bench.path(&cut_name))
                    .arg(&reference),
            );
            let file = bench.path(&cut_name).to_string_lossy().into_owned();
            for (how, source) in [("file", file), ("stream", plain.url(&cut_name))] {
                let label = format!("{name} cut at {at} of {len}, {how}");
                let (ok, stderr) = import(&source, &dest);
                outcomes[usize::from(ok) + usize::from(ok && qemu.status.success())] += 1;
                if !ok {
                    continue;
                }
                assert!(qemu.status.success(), "{label}: boundimport exits 0 where qemu-img refuses\n{stderr}");
                let want = std::fs::metadata(&reference).unwrap().len();
                assert_eq!(std::fs::metadata(&dest).unwrap().len(), want, "{label}: size");
                assert_eq!(sha256_prefix(&dest, want), sha256_prefix(&reference, want), "{label}: content");
            }
        }
    }
    eprintln!("random cuts: {} refused, {} imported like qemu-img", outcomes[0], outcomes[2]);
}
