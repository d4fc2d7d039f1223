//! Helpers shared by integration tests: finding and running external tools with clear failures, deterministic
//! pseudo-random data, raw guest images built from described segments, and scratch directories.
#![allow(dead_code)]

pub mod http;
pub mod images;
pub mod objstore;
pub mod prereq;
pub mod privileged;
pub mod proxy;
pub mod ranges;
pub mod registry;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One KiB.
pub const KIB: u64 = 1024;
/// One MiB.
pub const MIB: u64 = 1024 * 1024;

/// splitmix64: a tiny seeded generator, so test data is the same on every run without a `rand` dependency.
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

    /// A value in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Finds an external tool: `$ENV_VAR` if set, else `name` on `$PATH`. Panics with a hint when missing.
pub fn tool(name: &str, env_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{name} not found on PATH (install qemu-utils, or set {env_var} to its path)");
}

/// The qemu-img binary.
pub fn qemu_img() -> PathBuf {
    tool("qemu-img", "QEMU_IMG")
}

/// The qemu-io binary.
pub fn qemu_io() -> PathBuf {
    tool("qemu-io", "QEMU_IO")
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd`, returning its output; panics naming the command, its exit status and its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let output = run_any(cmd);
    if !output.status.success() {
        panic!(
            "command failed ({}): {}\nstdout:\n{}\nstderr:\n{}",
            output.status,
            describe(cmd),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Runs `cmd` whatever its exit status (for commands expected to fail, like qemu-io's `abort`).
pub fn run_any(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

/// A scratch directory for the whole test process (behind a `static`, which Rust never drops): copies that earlier,
/// killed runs left are removed first, and this one is removed when the process exits.
pub fn process_scratch_dir(label: &str) -> tempfile::TempDir {
    static AT_EXIT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn remove_all() {
        if let Ok(paths) = AT_EXIT.lock() {
            for path in paths.iter() {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let prefix = format!("{label}-");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = scratch_dir(label);
    let mut paths = AT_EXIT.lock().unwrap();
    if paths.is_empty() {
        // SAFETY: registers a plain function with no captured state; the test harness exits through libc's exit.
        unsafe { libc::atexit(remove_all) };
    }
    paths.push(dir.path().to_path_buf());
    dir
}

/// A fresh scratch directory under Cargo's per-target temporary directory, removed when dropped.
pub fn scratch_dir(label: &str) -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).expect("creating CARGO_TARGET_TMPDIR");
    tempfile::Builder::new().prefix(&format!("{label}-")).tempdir_in(&base).expect("creating a scratch directory")
}

/// What a segment of a generated raw image holds.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// Pseudo-random bytes from this seed (incompressible).
    Random(u64),
    /// Zeros (left as a hole).
    Zero,
    /// Zeros written out explicitly (not a hole), so formats see data that happens to be zero.
    ZeroWritten,
    /// Zeros with a pseudo-random byte every 8 KiB (half the 4 KiB blocks are all-zero).
    MostlyZero(u64),
    /// Repetitive text that compresses well, varying with the guest offset.
    Pattern,
}

/// Bytes of `fill` for guest range `[offset, offset + buf.len())`, written into `buf`.
pub fn fill_bytes(fill: Fill, offset: u64, buf: &mut [u8]) {
    match fill {
        Fill::Random(seed) => SplitMix64::new(seed ^ offset.rotate_left(17)).fill(buf),
        Fill::Zero | Fill::ZeroWritten => buf.fill(0),
        Fill::MostlyZero(seed) => {
            buf.fill(0);
            let mut rng = SplitMix64::new(seed ^ offset);
            for (i, b) in buf.iter_mut().enumerate() {
                if (offset + i as u64) % 8192 == 4000 {
                    *b = rng.next_u64() as u8 | 1;
                }
            }
        }
        Fill::Pattern => {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = offset + i as u64;
                let line = at / 64;
                let text = b"the quick brown fox jumps over the lazy dog, line ";
                let col = (at % 64) as usize;
                *b = if col < text.len() {
                    text[col]
                } else if col == 63 {
                    b'\n'
                } else {
                    b'0' + ((line >> ((62 - col) * 2)) & 7) as u8
                };
            }
        }
    }
}

/// Writes a raw image of `size` bytes at `path`: holes except for `segments` of (offset, length, fill).
pub fn write_raw(path: &Path, size: u64, segments: &[(u64, u64, Fill)]) {
    let file = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    file.set_len(size).expect("sizing raw image");
    let mut buf = vec![0u8; 1 << 20];
    for &(offset, len, fill) in segments {
        assert!(offset + len <= size, "segment {offset}+{len} outside {size}");
        if matches!(fill, Fill::Zero) {
            continue;
        }
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(buf.len() as u64) as usize;
            fill_bytes(fill, at, &mut buf[..n]);
            file.write_all_at(&buf[..n], at).expect("writing raw image");
            at += n as u64;
        }
    }
}

/// Writes `len` bytes of `fill` (for guest offset `offset`) to a pattern file for `qemu-io write -s`.
pub fn write_pattern_file(path: &Path, fill: Fill, offset: u64, len: usize) {
    let mut buf = vec![0u8; len];
    fill_bytes(fill, offset, &mut buf);
    std::fs::write(path, &buf).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Reads big-endian u64 at `offset` of a file.
pub fn read_be64(path: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut b, offset))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    u64::from_be_bytes(b)
}

/// Overwrites a big-endian u64 at `offset` of a file.
pub fn write_be64(path: &Path, offset: u64, value: u64) {
    patch(path, offset, &value.to_be_bytes());
}

/// Writes `bytes` at `offset` of a file.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(bytes, offset))
        .unwrap_or_else(|e| panic!("patching {}: {e}", path.display()));
}

/// An image held in memory, for tests that mutate bytes freely.
pub struct MemSource {
    /// What to call it in messages.
    pub name: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl boundimport::source::ReadAt for MemSource {
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

/// A scratch directory and the qemu tools to fill it with images.
pub struct Workbench {
    /// The scratch directory (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Workbench {
    /// A workbench in a fresh scratch directory named after `label`.
    pub fn new(label: &str) -> Self {
        Workbench { dir: scratch_dir(label) }
    }

    /// A workbench that lives as long as the test process (for images built once behind a `static`).
    pub fn for_process(label: &str) -> Self {
        Workbench { dir: process_scratch_dir(label) }
    }

    /// Path of `name` in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A copy of `qcow2` named `name` whose first L2 table is moved to the end of the file, after the data it
    /// maps: a forward reader sees that data before knowing where it belongs, so it must spool it.
    pub fn qcow2_with_l2_after_data(&self, qcow2: &Path, name: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::copy(qcow2, &path).unwrap();
        let cluster = 1u64 << (read_be64(&path, 16) & 0xffff_ffff);
        let l1 = read_be64(&path, 40);
        let entry = read_be64(&path, l1);
        let old = entry & 0x00ff_ffff_ffff_fe00;
        let len = std::fs::metadata(&path).unwrap().len();
        let new = len.div_ceil(cluster) * cluster;
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut table = vec![0u8; cluster as usize];
        file.read_exact_at(&mut table, old).unwrap();
        file.write_all_at(&table, new).unwrap();
        file.write_all_at(&vec![0u8; cluster as usize], old).unwrap();
        assert!(table.iter().any(|&b| b != 0));
        write_be64(&path, l1, (entry & !0x00ff_ffff_ffff_fe00) | new);
        path
    }

    /// `qemu-img ARGS`, run in the scratch directory (so relative backing names resolve there).
    pub fn qemu_img(&self, args: &[&str]) {
        run(Command::new(qemu_img()).args(args).current_dir(self.dir.path()));
    }

    /// `qemu-io -f qcow2 -c CMD... IMAGE`.
    pub fn qemu_io(&self, image: &str, commands: &[&str]) {
        let mut cmd = Command::new(qemu_io());
        cmd.current_dir(self.dir.path()).args(["-f", "qcow2"]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        run(cmd.arg(image));
    }

    /// Writes `len` bytes of `fill` at `offset` of `image` through qemu-io.
    pub fn write(&self, image: &str, fill: Fill, offset: u64, len: u64) {
        let pattern = self.path("pattern.bin");
        write_pattern_file(&pattern, fill, offset, len as usize);
        self.qemu_io(image, &[&format!("write -s {} {offset} {len}", pattern.display())]);
    }

    /// A raw image of `size` bytes holding the standard mix of data, zeros and patterns.
    pub fn raw_mix(&self, name: &str, size: u64, seed: u64) -> PathBuf {
        let path = self.path(name);
        write_raw(&path, size, &mix(size, seed));
        path
    }

    /// Converts the standard mix to qcow2 with `options` (and extra qemu-img convert flags).
    pub fn qcow2_mix(&self, name: &str, size: u64, options: &str, flags: &[&str]) -> PathBuf {
        let raw = format!("{name}.src.raw");
        self.raw_mix(&raw, size, size ^ 0x5eed);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(flags);
        if !options.is_empty() {
            args.extend_from_slice(&["-o", options]);
        }
        args.extend_from_slice(&[&raw, name]);
        self.qemu_img(&args);
        self.path(name)
    }
}

/// Segments of the standard mix for a disk of `size` bytes: random, zero, mostly-zero and pattern runs, with
/// boundaries that fall inside clusters.
pub fn mix(size: u64, seed: u64) -> Vec<(u64, u64, Fill)> {
    let kinds = [
        Fill::Random(seed),
        Fill::Zero,
        Fill::MostlyZero(seed + 1),
        Fill::Pattern,
        Fill::Random(seed + 2),
        Fill::Pattern,
        Fill::Zero,
        Fill::MostlyZero(seed + 3),
    ];
    let mut rng = SplitMix64::new(seed);
    let mut segments = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < size {
        // 100 KiB .. 1.1 MiB, at byte granularity.
        let len = (100 * KIB + rng.below(MIB)).min(size - at);
        segments.push((at, len, kinds[i % kinds.len()]));
        at += len;
        i += 1;
    }
    segments
}

/// Lower-case hex SHA-256 of the first `len` bytes at `path` (a file or a block device); panics if shorter.
pub fn sha256_prefix(path: &Path, len: u64) -> String {
    use sha2::{Digest, Sha256};
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at).unwrap_or_else(|e| panic!("reading {} at {at}: {e}", path.display()));
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 and length of `qemu-img convert -O raw IMAGE` (the reference output), converting into `scratch`.
pub fn qemu_reference(image: &Path, scratch: &Path) -> (String, u64) {
    let reference =
        scratch.join(format!("{}.reference.raw", image.file_name().and_then(|n| n.to_str()).unwrap_or("image")));
    run(Command::new(qemu_img()).args(["convert", "-O", "raw"]).arg(image).arg(&reference));
    let len = std::fs::metadata(&reference).expect("reference output").len();
    let digest = sha256_prefix(&reference, len);
    std::fs::remove_file(&reference).expect("removing reference output");
    (digest, len)
}

/// A command running the boundimport binary under test.
pub fn boundimport() -> Command {
    Command::new(env!("CARGO_BIN_EXE_boundimport"))
}

/// A process whose stderr is collected in the background, so a test can act on it while it runs.
pub struct Running {
    /// The child process.
    pub child: std::process::Child,
    /// When it was started.
    pub started: std::time::Instant,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// What a [`Running`] process ended with.
pub struct Finished {
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// When it exited.
    pub ended: std::time::Instant,
}

impl Running {
    /// Starts `cmd` with stdout discarded and stderr captured.
    pub fn start(cmd: &mut Command) -> Running {
        use std::io::Read;
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        Running { child, started: std::time::Instant::now(), stderr: Some(stderr) }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).expect("kill");
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the exit, at most `limit` from now; on timeout kills it and panics (a hang).
    pub fn finish_within(mut self, limit: std::time::Duration) -> Finished {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let ended = std::time::Instant::now();
                let stderr = self.stderr.take().expect("stderr reader").join().expect("stderr reader");
                return Finished { status, stderr, ended };
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.stderr.take().expect("stderr reader").join().unwrap_or_default();
                panic!("process still running after {limit:?} (a hang); stderr so far:\n{stderr}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sectors written to block device `device` so far (field 7 of /sys/class/block/NAME/stat), to watch a
/// destination change.
pub fn sectors_written(device: &Path) -> u64 {
    let real = std::fs::canonicalize(device).unwrap_or_else(|e| panic!("resolving {}: {e}", device.display()));
    let name = real.file_name().expect("device name").to_string_lossy().into_owned();
    let stat = std::fs::read_to_string(format!("/sys/class/block/{name}/stat"))
        .unwrap_or_else(|e| panic!("reading stat of {name}: {e}"));
    stat.split_whitespace().nth(6).and_then(|v| v.parse().ok()).expect("write sectors field")
}
