//! Helpers for differential format tests: standard image content, qemu-img conversions, and reconstruction of a
//! guest image through boundimport's format layer. The generic helpers (PRNG, raw images, tool runners) live in
//! the parent module.
#![allow(dead_code)]

use super::{qemu_img, run, sha256_prefix, Fill, MemSource};
use boundimport::format::{self, BackingPolicy, Image};
use boundimport::pipeline::fill::read_guest;
use boundimport::source::files::LocalFiles;
use boundimport::source::{FileSource, ReadAt};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// The standard test content for an image of `size` bytes: random data at the start, an explicit zero run, a
/// hole, a mostly-zero region, random data across block/grain boundaries, and random data up to the last byte.
pub fn standard_content(size: u64) -> Vec<(u64, u64, Fill)> {
    const MIB: u64 = 1 << 20;
    assert!(size > 6 * MIB, "standard content needs more than 6 MiB");
    vec![
        (0, MIB + 4096, Fill::Random(1)),
        (MIB + 4096, 300 * 1024, Fill::ZeroWritten),
        (2 * MIB + 512, MIB, Fill::MostlyZero(2)),
        (4 * MIB - 3 * 512, 5 * 512 + 65536, Fill::Random(3)),
        (size - MIB - 1536, MIB + 1536, Fill::Random(4)),
    ]
}

/// `qemu-img convert -f raw -O <format> [-o <options>] raw image`.
pub fn qemu_convert_from_raw(raw: &Path, format: &str, options: &str, image: &Path) {
    let mut cmd = Command::new(qemu_img());
    cmd.args(["convert", "-f", "raw", "-O", format]);
    if !options.is_empty() {
        cmd.args(["-o", options]);
    }
    run(cmd.arg(raw).arg(image));
}

/// Hex sha256 and length of a file.
pub fn sha256_file(path: &Path) -> (String, u64) {
    let len = std::fs::metadata(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).len();
    (sha256_prefix(path, len), len)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens `path` through boundimport's detection, with backing files refused and siblings resolved beside it.
pub fn open_image(path: &Path) -> boundimport::error::Result<Box<dyn Image>> {
    let source: Arc<dyn ReadAt> = Arc::new(FileSource::open(path)?);
    let policy = BackingPolicy { allow: false, files: Some(std::sync::Arc::new(LocalFiles::beside(path, false)?)) };
    format::open(source, &policy)
}

/// Guest bytes of `image` read in windows of `window` bytes with `read_guest`: hex sha256 and length.
pub fn reconstruct(image: &mut dyn Image, window: u64) -> (String, u64) {
    let size = image.virtual_size();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; window as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(window) as usize;
        read_guest(image, at, &mut buf[..n]).unwrap_or_else(|e| panic!("reading guest bytes at {at}: {e}"));
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    (hex(&hasher.finalize()), size)
}

/// The bytes of `qemu-img convert -f <format> -O raw image`.
pub fn qemu_raw_bytes(image: &Path, format: &str) -> Vec<u8> {
    let out = image.with_extension("qemu-raw");
    run(Command::new(qemu_img()).args(["convert", "-f", format, "-O", "raw"]).arg(image).arg(&out));
    let bytes = std::fs::read(&out).unwrap_or_else(|e| panic!("reading {}: {e}", out.display()));
    std::fs::remove_file(&out).ok();
    bytes
}

/// Asserts that boundimport reads `image` (detected as `format_name`) exactly as qemu-img converts it from
/// `qemu_format`: same length and sha256 when read in 1 MiB windows, and the same bytes when read in odd-sized
/// windows that cut grains and blocks in the middle.
pub fn assert_same_as_qemu(image: &Path, qemu_format: &str, format_name: &str) {
    let want_bytes = qemu_raw_bytes(image, qemu_format);
    let want = (hex(&Sha256::digest(&want_bytes)), want_bytes.len() as u64);
    let mut opened = open_image(image).unwrap_or_else(|e| panic!("opening {}: {e}", image.display()));
    assert_eq!(opened.format_name(), format_name, "{}", image.display());
    assert_eq!(opened.virtual_size(), want.1, "virtual size of {}", image.display());
    assert_eq!(reconstruct(opened.as_mut(), 1 << 20), want, "{} read in 1 MiB windows", image.display());
    let window = 3 * 65536 + 4096 + 512;
    let mut buf = vec![0u8; window];
    for (i, expected) in want_bytes.chunks(window).enumerate() {
        let at = (i * window) as u64;
        let got = &mut buf[..expected.len()];
        read_guest(opened.as_mut(), at, got).unwrap_or_else(|e| panic!("reading guest bytes at {at}: {e}"));
        assert!(got == expected, "{}: bytes at {at} differ in {window}-byte windows", image.display());
    }
}

/// Opens `bytes` as an image and reads guest windows at its start, middle and end, ignoring errors: for
/// mutation tests, where only a panic is a failure. Returns the format it opened as, if it opened.
pub fn exercise(name: &str, bytes: Vec<u8>) -> Option<&'static str> {
    let source: Arc<dyn ReadAt> = Arc::new(MemSource { name: name.to_string(), bytes });
    let Ok(mut image) = format::open(source, &BackingPolicy::default()) else {
        return None;
    };
    let size = image.virtual_size();
    let window = 1u64 << 20;
    let mut buf = vec![0u8; window as usize];
    for at in [0, size / 2, size.saturating_sub(window)] {
        if at >= size {
            continue;
        }
        let n = (size - at).min(window) as usize;
        let _ = read_guest(image.as_mut(), at, &mut buf[..n]);
    }
    Some(image.format_name())
}
