//! Speed against qemu-img and dd, measured the way issue 7 asks: the same inputs and destinations, runs of each
//! importer alternated, median and range of wall time, ratio to each baseline, and the peak memory-cgroup charge of
//! every run (each importer runs alone in a fresh 600M child cgroup, caches dropped first).
//!
//! Needs root (loop devices, cgroups, drop_caches). Run: `cargo bench --bench perf -- [--runs N]
//! [--cases incompressible,file,zlib,zstd,debian,mostly-zero,parallel,remote] [--pods 1,2,4,8] [--remote-size MiB]`;
//! without `--cases`, every case but `parallel` (many imports at once, about 8 minutes a run: see [`parallel`]) and
//! `remote` (through a server throttling each connection: see [`remote`]), which run only when named;
//! `--runs 0` only generates the images. Test images are generated once into target/bench-images/ (about 17 GiB
//! of disk: 8 of them the parallel case's eight 1 GiB copies; the 20 GiB image is sparse).
//!
//! The `debian` case is a real root filesystem: `debootstrap --variant=minbase bookworm` from deb.debian.org into
//! a 2 GiB ext4 image, compressed with `qemu-img convert -c` (zlib). Generating it needs the network and
//! debootstrap; the bench installs debootstrap with `apt-get install debootstrap` when it is missing.

mod parallel;
mod remote;

use boundimport::lab::fixtures::{drop_caches, is_root, ChildCgroup, LoopDevice};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Labels of boundimport's two rows.
const OURS: &str = "boundimport";
const OURS_DIGEST: &str = "boundimport --digest";
/// Label and flag of the bench's own serial copy (see [`serial_copy`]).
const SERIAL_COPY: &str = "serial copy 4M, huge pages";
const COPY_MODE: &str = "--serial-copy";
/// CDI's pod limit; every run gets a fresh cgroup of this size.
const LIMIT: u64 = 600_000_000;

/// One importer invocation: a label and a command line, with `{src}` and `{dst}` placeholders.
#[derive(Clone)]
struct Importer {
    label: &'static str,
    argv: Vec<String>,
}

/// A benchmark case: an image, a destination kind, the importers to compare.
struct Case {
    name: &'static str,
    image: PathBuf,
    /// Destination is a loop device (true) or a regular file on the host filesystem (false).
    block: bool,
    importers: Vec<Importer>,
}

#[derive(Clone)]
struct Sample {
    wall: f64,
    peak: u64,
    /// What the importer printed (boundimport's `--json` summary when asked for).
    stdout: Vec<u8>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == COPY_MODE) {
        return serial_copy(Path::new(&args[at + 1]), Path::new(&args[at + 2]));
    }
    if !is_root() {
        eprintln!("perf bench: needs root (loop devices, memory cgroups); skipped");
        return;
    }
    let runs: usize = option(&args, "--runs").map_or(3, |v| v.parse().expect("--runs N"));
    let wanted: Option<Vec<String>> = option(&args, "--cases").map(|v| v.split(',').map(String::from).collect());
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-images");
    std::fs::create_dir_all(&dir).unwrap();
    let boundimport = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/boundimport");
    assert!(boundimport.exists(), "build the release binary first: cargo build --release");
    let bi = boundimport.to_string_lossy().into_owned();

    // Every case ends with boundimport twice: as the CLI and the CDI entrypoint run by default (no output
    // digest), and with `--digest` (the SHA-256 of the written image, a core hashing at about 2 GB/s with SHA-NI).
    let ours = [
        importer(OURS, &format!("{bi} --progress none {{src}} {{dst}}")),
        importer(OURS_DIGEST, &format!("{bi} --progress none --digest {{src}} {{dst}}")),
    ];
    let qemu_fast = importer("qemu-img -t none -W -m 16", "qemu-img convert -t none -W -m 16 -O raw {src} {dst}");
    let qemu_bounded =
        importer("qemu-img -T none -t none", "qemu-img convert -T none -t none -W -m 16 -O raw {src} {dst}");
    let dd = importer("dd direct 4M", "dd if={src} of={dst} bs=4M iflag=direct oflag=direct status=none");
    // dd's buffer is malloc'd in 4 KiB pages, so each 4 MiB request splits at the disk's max_segments; this is dd's
    // serial loop again with boundimport's huge-page buffer, a fairer device-limit proxy.
    let this = std::env::current_exe().unwrap().to_string_lossy().into_owned();
    let serial = importer(SERIAL_COPY, &format!("{this} {COPY_MODE} {{src}} {{dst}}"));
    let with_ours =
        |baselines: &[&Importer]| -> Vec<Importer> { baselines.iter().copied().chain(&ours).cloned().collect() };

    let mut cases = Vec::new();
    let want = |name: &str| wanted.as_ref().is_none_or(|w| w.iter().any(|c| c == name));
    if want("incompressible") || want("file") {
        let image = ensure_image(&dir, "incompressible-3g.qcow2", || random_qcow2(&dir, 3 * GIB));
        let importers = with_ours(&[&qemu_fast, &qemu_bounded, &dd, &serial]);
        if want("incompressible") {
            let importers = importers.clone();
            cases.push(Case { name: "incompressible 3 GiB -> loop", image: image.clone(), block: true, importers });
        }
        if want("file") {
            cases.push(Case { name: "incompressible 3 GiB -> ext4 file", image, block: false, importers });
        }
    }
    for (name, codec) in [("zlib", "zlib"), ("zstd", "zstd")] {
        if want(name) {
            let file = format!("text-2g-{codec}.qcow2");
            let image = ensure_image(&dir, &file, || text_qcow2(&dir, 2 * GIB, codec));
            let name = if codec == "zlib" { "zlib text 2 GiB -> loop" } else { "zstd text 2 GiB -> loop" };
            cases.push(Case { name, image, block: true, importers: with_ours(&[&qemu_fast]) });
        }
    }
    if want("debian") {
        let image = ensure_image(&dir, "debian-bookworm-minbase-2g-zlib.qcow2", || debian_qcow2(&dir));
        cases.push(Case {
            name: "Debian root 2 GiB, zlib -> loop",
            image,
            block: true,
            importers: with_ours(&[&qemu_fast]),
        });
    }
    if want("mostly-zero") {
        let image = ensure_image(&dir, "mostly-zero-20g.qcow2", || mostly_zero_qcow2(&dir));
        cases.push(Case {
            name: "mostly-zero 20 GiB -> loop",
            image,
            block: true,
            importers: with_ours(&[&qemu_fast]),
        });
    }

    // Many pods at once takes longer than all the other cases together: only when asked for by name.
    if wanted.as_ref().is_some_and(|w| w.iter().any(|c| c == "parallel")) {
        let pods: Vec<usize> = option(&args, "--pods")
            .map_or(parallel::PODS.to_vec(), |v| v.split(',').map(|n| n.parse().expect("--pods N,N,…")).collect());
        parallel::run(&dir, &boundimport, runs, &pods);
    }
    // Remote imports through a throttled server: only when asked for by name (a curl run alone is 27 s).
    if wanted.as_ref().is_some_and(|w| w.iter().any(|c| c == "remote")) {
        let size = option(&args, "--remote-size").map_or(512, |v| v.parse().expect("--remote-size MiB"));
        remote::run(&dir, &boundimport, runs, size);
    }
    if runs == 0 {
        eprintln!("images ready in {}", dir.display());
        return;
    }
    if cases.is_empty() {
        return;
    }
    println!("| case | importer | median s | min–max s | peak MiB | {OURS} ÷ this | {OURS_DIGEST} ÷ this |");
    println!("|---|---|---|---|---|---|---|");
    for case in &cases {
        let results = run_case(case, &dir, runs);
        let walls = |samples: &[Sample]| samples.iter().map(|s| s.wall).collect::<Vec<_>>();
        let median_of =
            |label: &str| results.iter().find(|(l, _)| *l == label).map(|(_, samples)| median(&walls(samples)));
        let (ours, ours_digest) = (median_of(OURS).expect("runs"), median_of(OURS_DIGEST).expect("runs"));
        for (label, samples) in &results {
            let med = median(&walls(samples));
            let (min, max) = samples.iter().fold((f64::MAX, 0f64), |(lo, hi), s| (lo.min(s.wall), hi.max(s.wall)));
            let peak = samples.iter().map(|s| s.peak).max().unwrap_or(0) / MIB;
            let ratios = if label.starts_with(OURS) {
                "— | —".to_string()
            } else {
                format!("{:.2} | {:.2}", ours / med, ours_digest / med)
            };
            println!("| {} | {label} | {med:.2} | {min:.2}–{max:.2} | {peak} | {ratios} |", case.name);
        }
    }
}

/// dd's loop (read 4 MiB, write it, repeat; O_DIRECT both ways, one request at a time) with a huge-page
/// buffer. The last partial block is written rounded up to 4 KiB, as O_DIRECT needs.
fn serial_copy(src: &Path, dst: &Path) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let direct = |write: bool, path: &Path| {
        File::options()
            .read(!write)
            .write(write)
            .create(write)
            .truncate(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap()
    };
    let (input, output) = (direct(false, src), direct(true, dst));
    let mut buffer = boundimport::buffer::AlignedBuf::new(4 << 20);
    let mut offset = 0u64;
    loop {
        let n = input.read_at(&mut buffer, offset).unwrap();
        if n == 0 {
            break;
        }
        let padded = n.next_multiple_of(4096);
        buffer[n..padded].fill(0);
        output.write_all_at(&buffer[..padded], offset).unwrap();
        offset += n as u64;
    }
    output.sync_data().unwrap();
}

fn option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn importer(label: &'static str, command: &str) -> Importer {
    Importer { label, argv: command.split_whitespace().map(String::from).collect() }
}

/// Runs every importer of `case` `runs` times, alternating, onto a fresh destination each time.
fn run_case(case: &Case, dir: &Path, runs: usize) -> Vec<(&'static str, Vec<Sample>)> {
    let virtual_size = virtual_size(&case.image);
    let mut results: Vec<(&'static str, Vec<Sample>)> = case.importers.iter().map(|i| (i.label, Vec::new())).collect();
    for run in 0..runs {
        for (importer, (_, samples)) in case.importers.iter().zip(results.iter_mut()) {
            let backing = dir.join("destination.img");
            let _ = std::fs::remove_file(&backing);
            // dd copies the qcow2 file itself, which is a little larger than the virtual disk.
            let size = (virtual_size.max(std::fs::metadata(&case.image).unwrap().len()) + MIB).next_multiple_of(MIB);
            let device = if case.block {
                File::create(&backing).unwrap().set_len(size).unwrap();
                Some(LoopDevice::attach(&backing, true).unwrap())
            } else {
                None
            };
            let dst = device.as_ref().map_or(backing.clone(), |d| d.path().to_path_buf());
            let argv: Vec<String> = importer
                .argv
                .iter()
                .map(|a| a.replace("{src}", &case.image.to_string_lossy()).replace("{dst}", &dst.to_string_lossy()))
                .collect();
            let sample = measure(&argv, &format!("perf-{run}"));
            eprintln!("{} / {}: {:.2}s, peak {} MiB", case.name, importer.label, sample.wall, sample.peak / MIB);
            samples.push(sample);
            drop(device);
            let _ = std::fs::remove_file(&backing);
        }
    }
    results
}

/// Runs `argv` alone in a fresh 600M cgroup with caches dropped, returning wall time and peak charge.
fn measure(argv: &[String], name: &str) -> Sample {
    let cgroup = ChildCgroup::create(&format!("{name}-{}", std::process::id()), LIMIT).unwrap();
    drop_caches().unwrap();
    let started = Instant::now();
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = cgroup.spawn(&mut command).unwrap().wait_with_output().unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert!(output.status.success(), "{argv:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    let peak = cgroup.reader().peak().unwrap().unwrap_or(0);
    Sample { wall, peak, stdout: output.stdout }
}

/// The middle value (the upper middle of an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted[sorted.len() / 2]
}

fn virtual_size(image: &Path) -> u64 {
    let out = Command::new("qemu-img").args(["info", "--output=json"]).arg(image).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

/// The image at `dir/name`, generated by `make` if missing (generation writes a temporary name first, so an
/// interrupted generation is not mistaken for an image).
fn ensure_image(dir: &Path, name: &str, make: impl FnOnce() -> PathBuf) -> PathBuf {
    let path = dir.join(name);
    if !path.exists() {
        eprintln!("generating {}", path.display());
        let made = make();
        std::fs::rename(made, &path).unwrap();
    }
    path
}

/// Fills `path` with `size` bytes from `block`, a generator of 1 MiB blocks.
fn write_raw(path: &Path, size: u64, mut block: impl FnMut(u64, &mut [u8])) {
    let mut out = BufWriter::new(File::create(path).unwrap());
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..size / MIB {
        block(i, &mut buf);
        out.write_all(&buf).unwrap();
    }
    out.flush().unwrap();
}

fn convert(raw: &Path, args: &[&str], out: &Path) {
    let status =
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).args(args).arg(raw).arg(out).status();
    assert!(status.unwrap().success(), "qemu-img convert failed");
    std::fs::remove_file(raw).unwrap();
}

fn random_qcow2(dir: &Path, size: u64) -> PathBuf {
    let raw = dir.join("generating.raw");
    let mut state = 0x5eed_u64;
    write_raw(&raw, size, |_, buf| {
        for chunk in buf.chunks_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..chunk.len()]);
        }
    });
    let out = dir.join("generating.qcow2");
    convert(&raw, &[], &out);
    out
}

/// Log-like text: compresses about 4:1 with zlib, like a guest filesystem full of text and binaries would not,
/// but like the text-heavy images the issue describes.
fn text_qcow2(dir: &Path, size: u64, codec: &str) -> PathBuf {
    let raw = dir.join("generating.raw");
    let words = ["kernel", "systemd", "started", "network", "eth0", "link", "up", "mount", "ext4", "error", "ok"];
    let mut line = 0u64;
    write_raw(&raw, size, |_, buf| {
        let mut at = 0;
        while at < buf.len() {
            line += 1;
            let text = format!(
                "{:010}.{:06} host{} {}[{}]: {} {} {}\n",
                line / 977,
                line * 7919 % 1_000_000,
                line % 13,
                words[(line % 11) as usize],
                line * 31 % 65_536,
                words[(line * 7 % 11) as usize],
                words[(line * 3 % 11) as usize],
                line.wrapping_mul(2_654_435_761) % 1_000_003
            );
            let n = text.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&text.as_bytes()[..n]);
            at += n;
        }
    });
    let out = dir.join("generating.qcow2");
    convert(&raw, &["-c", "-o", &format!("compression_type={codec}")], &out);
    out
}

/// A Debian root filesystem, the image a VM batch is typically provisioned from: `debootstrap --variant=minbase
/// bookworm` from deb.debian.org (debootstrap is installed with apt-get first if missing) copied into a fresh
/// 2 GiB ext4 filesystem by `mkfs.ext4 -d`, then `qemu-img convert -c` (zlib clusters, qemu-img's default).
fn debian_qcow2(dir: &Path) -> PathBuf {
    if Command::new("debootstrap").arg("--version").stdout(Stdio::null()).status().is_err() {
        eprintln!("installing debootstrap");
        run(Command::new("apt-get").args(["update", "-q"]));
        run(Command::new("apt-get").args(["install", "-y", "-q", "debootstrap"]));
    }
    let root = dir.join("generating-root");
    let _ = std::fs::remove_dir_all(&root);
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&root)
        .arg("http://deb.debian.org/debian"));
    let raw = dir.join("generating.raw");
    File::create(&raw).unwrap().set_len(2 * GIB).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&root).arg(&raw));
    std::fs::remove_dir_all(&root).unwrap();
    let out = dir.join("generating.qcow2");
    convert(&raw, &["-c"], &out);
    out
}

/// Runs a generation step, which must succeed.
fn run(command: &mut Command) {
    let status = command.status().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(status.success(), "{command:?} failed: {status}");
}

/// 20 GiB virtual, 256 MiB of data in 64 scattered 4 MiB extents.
fn mostly_zero_qcow2(dir: &Path) -> PathBuf {
    let raw = dir.join("generating.raw");
    let file = File::create(&raw).unwrap();
    file.set_len(20 * GIB).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    for i in 0..64u64 {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = (i as usize * 31 + j * 7 + j / 4096) as u8;
        }
        use std::os::unix::fs::FileExt;
        file.write_all_at(&buf, i * 320 * MIB + i * 4096).unwrap();
    }
    drop(file);
    let out = dir.join("generating.qcow2");
    convert(&raw, &[], &out);
    out
}
