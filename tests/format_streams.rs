//! Images read as streams, end to end through the binary: compressed (gzip, xz, zstd, bzip2, zip) or served
//! without Range support, every one must come out sha256-identical to `qemu-img convert -f FORMAT -O raw` of the
//! uncompressed image, name its format and wrappers in `--json`, and (for table-first layouts) spool nothing.

mod common;

use common::http::{ServerOptions, TestServer};
use common::images::{qemu_convert_from_raw, standard_content};
use common::{boundimport, patch, qemu_img, run, scratch_dir, sha256_prefix, write_raw, Fill, MIB};
use std::path::Path;
use std::process::{Command, Output};

fn import(args: &[&str], source: &str, dest: &Path) -> Output {
    boundimport().args(["--progress", "none", "--json"]).args(args).arg(source).arg(dest).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// sha256 and length of `qemu-img convert -f format -O raw image`.
fn reference(image: &Path, format: &str) -> (String, u64) {
    let out = image.with_extension("reference.raw");
    run(Command::new(qemu_img()).args(["convert", "-f", format, "-O", "raw"]).arg(image).arg(&out));
    let len = std::fs::metadata(&out).unwrap().len();
    let digest = sha256_prefix(&out, len);
    std::fs::remove_file(&out).unwrap();
    (digest, len)
}

/// Imports `source` into a fresh file and checks it against `want`; returns the `--json` summary.
fn import_ok(args: &[&str], source: &str, want: &(String, u64), label: &str) -> serde_json::Value {
    let out_dir = scratch_dir("stream-out");
    let dest = out_dir.path().join("out.raw");
    let output = import(args, source, &dest);
    assert!(output.status.success(), "{label}: {}", stderr(&output));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), want.1, "{label}: size");
    assert_eq!(sha256_prefix(&dest, want.1), want.0, "{label}: contents");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{label}: {e}"))
}

/// Imports `source`, which must fail; returns stderr, after checking that no destination file is left.
fn import_fails(args: &[&str], source: &str, label: &str) -> String {
    let out_dir = scratch_dir("stream-fail");
    let dest = out_dir.path().join("out.raw");
    let output = import(args, source, &dest);
    let text = stderr(&output);
    assert!(!output.status.success(), "{label}: succeeded: {text}");
    assert!(!dest.exists(), "{label}: a destination was left behind");
    assert_eq!(text.lines().filter(|l| l.contains("error")).count(), 1, "{label}: {text}");
    text
}

/// Runs `script` with `sh -c` in `dir`.
fn sh(dir: &Path, script: &str) {
    run(Command::new("sh").arg("-c").arg(script).current_dir(dir));
}

/// A raw image of `size` bytes with the standard content, converted by qemu-img to `format` with `options`.
fn qemu_image(dir: &Path, size: u64, format: &str, options: &str, name: &str) -> std::path::PathBuf {
    let raw = dir.join(format!("{name}.input"));
    write_raw(&raw, size, &standard_content(size));
    let image = dir.join(name);
    qemu_convert_from_raw(&raw, format, options, &image);
    std::fs::remove_file(&raw).unwrap();
    image
}

// ---- fixed vhd ----

/// A fixed VHD gzipped, xz'd or zstd'd, or served without Range, is the vpc image qemu reads, footer not
/// included; sizes whose footer ends exactly on a chunk boundary, and ones where it does not.
#[test]
fn fixed_vhd_as_a_stream_reads_as_vpc() {
    let dir = scratch_dir("stream-fixed-vhd");
    let d = dir.path();
    // qemu's CHS-rounded size, and an exact 8 MiB - 512 (force_size) whose footer fills the last 512 bytes of a
    // 4 MiB chunk.
    let images = [
        ("chs.vhd", 9 * MIB + 3 * 65536 + 3 * 512, "subformat=fixed"),
        ("exact.vhd", 8 * MIB - 512, "subformat=fixed,force_size=on"),
    ];
    let server = TestServer::start(d, ServerOptions { ranges: false, ..Default::default() });
    for (name, size, options) in images {
        let image = qemu_image(d, size, "vpc", options, name);
        let want = reference(&image, "vpc");
        sh(d, &format!("gzip -k {name} && xz -k -T0 {name} && zstd -q -k {name}"));
        for (file, wrapper) in
            [(format!("{name}.gz"), "gzip"), (format!("{name}.xz"), "xz"), (format!("{name}.zst"), "zstd")]
        {
            let summary = import_ok(&[], d.join(&file).to_str().unwrap(), &want, &file);
            assert_eq!(summary["format"], "vpc", "{file}: {summary}");
            assert_eq!(summary["compression"], serde_json::json!([wrapper]), "{file}: {summary}");
            assert_eq!(summary["virtual_size"], want.1, "{file}: {summary}");
        }
        let summary = import_ok(&[], &server.url(name), &want, &format!("{name} without Range"));
        assert_eq!(summary["format"], "vpc", "{name} over HTTP: {summary}");
        assert!(server.requests().iter().all(|r| r.status == 200), "{:?}", server.requests());
        let summary = import_ok(&[], &server.url(&format!("{name}.gz")), &want, &format!("{name}.gz over HTTP"));
        assert_eq!(summary["format"], "vpc", "{name}.gz over HTTP: {summary}");
    }
}

/// A raw disk whose last sector is a fixed-disk footer for a different length stays raw in a stream, as it does
/// from a local file, and a fixed VHD whose geometry is smaller than its data (qemu reads only the geometry's
/// bytes) cannot be cut short in a stream: refused, nothing left behind.
#[test]
fn fixed_vhd_footers_that_do_not_fit_the_stream() {
    let dir = scratch_dir("stream-fixed-vhd-misfit");
    let d = dir.path();
    let image = qemu_image(d, 7 * MIB, "vpc", "subformat=fixed", "disk.vhd");
    let len = std::fs::metadata(&image).unwrap().len();
    // A 1 MiB longer raw disk ending in the same footer.
    let footer = std::fs::read(&image).unwrap()[len as usize - 512..].to_vec();
    let longer = d.join("longer.raw");
    write_raw(&longer, len + MIB, &[(0, len + MIB, Fill::Random(5))]);
    patch(&longer, len + MIB - 512, &footer);
    let want = (sha256_prefix(&longer, len + MIB), len + MIB);
    sh(d, "gzip -k longer.raw");
    let summary = import_ok(&[], longer.to_str().unwrap(), &want, "longer.raw");
    assert_eq!(summary["format"], "raw", "{summary}");
    let summary = import_ok(&[], d.join("longer.raw.gz").to_str().unwrap(), &want, "longer.raw.gz");
    assert_eq!(summary["format"], "raw", "{summary}");

    // Geometry one cylinder short of the data, creator "vpc " (qemu uses the geometry for it).
    let mut footer = footer;
    footer[28..32].copy_from_slice(b"vpc ");
    let cylinders = u16::from_be_bytes([footer[56], footer[57]]) - 1;
    footer[56..58].copy_from_slice(&cylinders.to_be_bytes());
    footer[64..68].fill(0);
    let sum = !footer.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32));
    footer[64..68].copy_from_slice(&sum.to_be_bytes());
    patch(&image, len - 512, &footer);
    let want = reference(&image, "vpc");
    assert!(want.1 < len - 512, "the geometry should be smaller than the data");
    let summary = import_ok(&[], image.to_str().unwrap(), &want, "short geometry, local");
    assert_eq!(summary["format"], "vpc", "{summary}");
    sh(d, "gzip -k disk.vhd");
    let text = import_fails(&[], d.join("disk.vhd.gz").to_str().unwrap(), "short geometry, gzip");
    assert!(text.contains("disk.vhd.gz") && text.contains("geometry") && text.contains("random-access"), "{text}");
}
