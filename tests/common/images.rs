//! Helpers for differential format tests: a deterministic PRNG, raw guest images built from described segments,
//! a qemu-img runner, sha256 of files, and reconstruction of a guest image through boundimport's format layer.
#![allow(dead_code)]

use boundimport::format::{self, BackingPolicy, Image};
use boundimport::pipeline::fill::read_guest;
use boundimport::source::{FileSource, ReadAt};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

/// splitmix64: a tiny seeded generator, so test data is the same on every run.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// What a segment of a generated raw image holds.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// Pseudo-random bytes from this seed.
    Random(u64),
    /// Zeros written out explicitly (not a hole), so formats see data that happens to be zero.
    Zero,
    /// Zeros with one pseudo-random byte every 8 KiB (compressible, not all-zero).
    MostlyZero(u64),
}

/// Writes a raw image of `size` bytes: holes except for `segments` of (offset, length, fill).
pub fn write_raw(path: &Path, size: u64, segments: &[(u64, u64, Fill)]) {
    let file = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    file.set_len(size).expect("sizing raw image");
    for &(offset, len, fill) in segments {
        assert!(offset + len <= size, "segment {offset}+{len} outside {size}");
        let mut buf = vec![0u8; len as usize];
        match fill {
            Fill::Random(seed) => SplitMix64::new(seed).fill(&mut buf),
            Fill::Zero => {}
            Fill::MostlyZero(seed) => {
                let mut rng = SplitMix64::new(seed);
                for b in buf.iter_mut().step_by(8192) {
                    *b = rng.next_u64() as u8 | 1;
                }
            }
        }
        file.write_all_at(&buf, offset).expect("writing raw image");
    }
}

/// The standard test content for an image of `size` bytes: random data at the start, an explicit zero run, a
/// hole, a mostly-zero region, random data across block/grain boundaries, and random data up to the last byte.
pub fn standard_content(size: u64) -> Vec<(u64, u64, Fill)> {
    const MIB: u64 = 1 << 20;
    assert!(size > 6 * MIB, "standard content needs more than 6 MiB");
    vec![
        (0, MIB + 4096, Fill::Random(1)),
        (MIB + 4096, 300 * 1024, Fill::Zero),
        (2 * MIB + 512, MIB, Fill::MostlyZero(2)),
        (4 * MIB - 3 * 512, 5 * 512 + 65536, Fill::Random(3)),
        (size - MIB - 1536, MIB + 1536, Fill::Random(4)),
    ]
}

/// The qemu-img binary: `$QEMU_IMG`, else on `$PATH`.
pub fn qemu_img() -> PathBuf {
    tool("qemu-img", "QEMU_IMG")
}

/// The qemu-io binary: `$QEMU_IO`, else on `$PATH`.
pub fn qemu_io() -> PathBuf {
    tool("qemu-io", "QEMU_IO")
}

fn tool(name: &str, env_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} not found on PATH (install qemu-utils, or set {env_var})"))
}

/// Runs `cmd`, panicking with its command line and output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "command failed ({}): {cmd:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
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

/// A fresh scratch directory under Cargo's per-target temporary directory, removed when dropped.
pub fn scratch_dir(label: &str) -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).expect("creating CARGO_TARGET_TMPDIR");
    tempfile::Builder::new()
        .prefix(&format!("{label}-"))
        .tempdir_in(&base)
        .expect("creating a scratch directory")
}

/// Hex sha256 and length of a file.
pub fn sha256_file(path: &Path) -> (String, u64) {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0;
    loop {
        let n = file.read(&mut buf).expect("reading for sha256");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    (hex(&hasher.finalize()), len)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens `path` through boundimport's detection, with backing files refused and siblings resolved beside it.
pub fn open_image(path: &Path) -> boundimport::error::Result<Box<dyn Image>> {
    let source: Arc<dyn ReadAt> = Arc::new(FileSource::open(path)?);
    let policy = BackingPolicy {
        allow: false,
        base_dir: path.parent().map(Path::to_path_buf),
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
    run(Command::new(qemu_img())
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&out));
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
    assert_eq!(
        reconstruct(opened.as_mut(), 1 << 20),
        want,
        "{} read in 1 MiB windows",
        image.display()
    );
    let window = 3 * 65536 + 4096 + 512;
    let mut buf = vec![0u8; window];
    for (i, expected) in want_bytes.chunks(window).enumerate() {
        let at = (i * window) as u64;
        let got = &mut buf[..expected.len()];
        read_guest(opened.as_mut(), at, got).unwrap_or_else(|e| panic!("reading guest bytes at {at}: {e}"));
        assert!(
            got == expected,
            "{}: bytes at {at} differ in {window}-byte windows",
            image.display()
        );
    }
}

/// An image held in memory, for tests that mutate bytes freely.
pub struct MemSource {
    /// What to call it in messages.
    pub name: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl ReadAt for MemSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> boundimport::error::Result<usize> {
        let len = self.bytes.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let n = buf.len().min((len - offset) as usize);
        buf[..n].copy_from_slice(&self.bytes[offset as usize..offset as usize + n]);
        Ok(n)
    }
}

/// Opens `bytes` as an image and reads guest windows at its start, middle and end, ignoring errors: for
/// mutation tests, where only a panic is a failure. Returns the format it opened as, if it opened.
pub fn exercise(name: &str, bytes: Vec<u8>) -> Option<&'static str> {
    let source: Arc<dyn ReadAt> = Arc::new(MemSource {
        name: name.to_string(),
        bytes,
    });
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
