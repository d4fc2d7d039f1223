//! Helpers for differential format tests: standard image content, qemu-img conversions, and reconstruction of a
//! guest image through boundimport's format layer. The generic helpers (PRNG, raw images, tool runners) live in
//! the parent module.
#![allow(dead_code)]

use super::{patch, qemu_img, run, sha256_prefix, Fill, MemSource};
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
    let policy = BackingPolicy {
        allow: false,
        files: Some(std::sync::Arc::new(LocalFiles::beside(path, false)?)),
        rebase: None,
    };
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

/// CRC32C as VHDX uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// Makes the current header of a vhdx name a log GUID and writes a valid-looking log entry for it: an image
/// that was not closed cleanly.
pub fn dirty_the_log(image: &Path) {
    let guid = [0x5a; 16];
    let mut current = (0u64, 0u64);
    for at in [64u64 << 10, 128 << 10] {
        let h = read_at(image, at, 4096);
        let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
        if seq >= current.1 {
            current = (at, seq);
        }
    }
    let mut h = read_at(image, current.0, 4096);
    h[48..64].copy_from_slice(&guid);
    h[4..8].fill(0);
    let sum = crc32c(&h);
    h[4..8].copy_from_slice(&sum.to_le_bytes());
    patch(image, current.0, &h);
    let log_offset = u64::from_le_bytes(h[72..80].try_into().unwrap());
    let file_len = std::fs::metadata(image).unwrap().len();
    // One entry: header + one zero descriptor (zero 4 KiB at offset 0 of the... header section is rejected by
    // qemu, so aim it at the end of the file).
    let mut entry = vec![0u8; 4096];
    entry[..4].copy_from_slice(b"loge");
    entry[8..12].copy_from_slice(&4096u32.to_le_bytes());
    entry[16..24].copy_from_slice(&1u64.to_le_bytes());
    entry[24..28].copy_from_slice(&1u32.to_le_bytes());
    entry[32..48].copy_from_slice(&guid);
    entry[48..56].copy_from_slice(&file_len.to_le_bytes());
    entry[56..64].copy_from_slice(&file_len.to_le_bytes());
    entry[64..68].copy_from_slice(b"zero");
    entry[72..80].copy_from_slice(&4096u64.to_le_bytes());
    entry[80..88].copy_from_slice(&(file_len - 4096).to_le_bytes());
    entry[88..96].copy_from_slice(&1u64.to_le_bytes());
    let sum = crc32c(&entry);
    entry[4..8].copy_from_slice(&sum.to_le_bytes());
    patch(image, log_offset, &entry);
}

/// `len` bytes of `path` at `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, offset))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    buf
}
