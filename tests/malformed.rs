//! Hostile and broken images through the real binary (`boundimport SRC DEST`): every case must fail with exit
//! code 1 and one stderr line naming the problem and the file offset, within a second, under a hard memory cap
//! (RLIMIT_AS) whatever the header claims, with a peak RSS far below it, and without writing past the virtual
//! size (a header that is refused leaves no destination behind at all).
//!
//! Images are made by qemu-img and then damaged one field at a time, in the spirit of `qcow2_map.rs`'s
//! corrupted-table test (which checks the library's errors; this table checks what a user sees).

mod common;

use common::{boundimport, patch, read_be64, write_be64, Fill, Workbench, KIB, MIB};
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Hard cap on the child's address space. Far above what an import maps (thread stacks, malloc arenas, the
/// buffer pool) and far below what the absurd header values would need if they sized anything.
const ADDRESS_SPACE_CAP: u64 = 512 * MIB;
/// Largest peak RSS accepted for a refused image.
const MAX_PEAK_RSS: u64 = 64 * MIB;
/// Each case must be over within this time.
const DEADLINE: Duration = Duration::from_secs(1);
/// Virtual size of the qcow2 test images.
const SIZE: u64 = 4 * MIB;

/// What one run of the binary did.
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    elapsed: Duration,
    peak_rss: u64,
}

/// Runs `boundimport ARGS SRC DEST` under the address-space cap, measuring wall time and peak RSS (wait4).
// The child is reaped with wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_capped(args: &[&str], source: &Path, dest: &Path) -> Run {
    let mut cmd = boundimport();
    cmd.args(args).arg(source).arg(dest).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: ADDRESS_SPACE_CAP, rlim_max: ADDRESS_SPACE_CAP };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("starting boundimport");
    let mut stderr = String::new();
    child.stderr.take().expect("piped stderr").read_to_string(&mut stderr).expect("reading stderr");
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; `child` is not waited on through std afterwards.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    assert_eq!(pid, child.id() as i32, "wait4: {}", std::io::Error::last_os_error());
    let status = std::process::ExitStatus::from_raw(status);
    Run { code: status.code(), signal: status.signal(), stderr, elapsed, peak_rss: usage.ru_maxrss as u64 * KIB }
}

/// One malformed image and what the error must say.
struct Case {
    /// Short name (also the image file name).
    name: String,
    /// Extra flags before SOURCE DEST.
    args: Vec<&'static str>,
    /// Substrings the error line must contain (besides the path).
    needles: Vec<String>,
    /// The file offset the error must name.
    offset: u64,
    /// Whether the header is refused before the destination is created.
    refused_at_open: bool,
    /// Virtual size of the image (destination must not grow past it).
    virtual_size: u64,
    /// The error is about the destination, so the line names it instead of the image.
    names_destination: bool,
}

/// Copies `good` to `name` in the bench, applies `damage` to the copy, and returns its path.
fn damaged(bench: &Workbench, good: &Path, name: &str, damage: impl FnOnce(&Path)) -> PathBuf {
    let path = bench.path(name);
    std::fs::copy(good, &path).unwrap();
    damage(&path);
    path
}

/// Truncates a file to `len` bytes.
fn truncate(path: &Path, len: u64) {
    OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

/// Big-endian u32 at `offset` of a file.
fn read_be32(path: &Path, offset: u64) -> u32 {
    (read_be64(path, offset) >> 32) as u32
}

/// Overwrites a big-endian u32.
fn write_be32(path: &Path, offset: u64, value: u32) {
    patch(path, offset, &value.to_be_bytes());
}

/// Little-endian u32 at `offset` of a file.
fn read_le32(path: &Path, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u32::from_le_bytes(b)
}

/// Host offset of the first allocated L2 table, of the L1 table, and of the first allocated cluster mapped by that
/// L2 table (with its L2 entry's offset).
struct Qcow2Layout {
    l1: u64,
    l2: u64,
    first_entry_at: u64,
    first_entry: u64,
}

/// Reads the layout of a qemu-made qcow2 whose first guest cluster is allocated.
fn layout(path: &Path) -> Qcow2Layout {
    let l1 = read_be64(path, 40);
    let l2 = read_be64(path, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "{}: first L1 entry unallocated", path.display());
    let first_entry = read_be64(path, l2);
    assert_ne!(first_entry, 0, "{}: first cluster unallocated", path.display());
    Qcow2Layout { l1, l2, first_entry_at: l2, first_entry }
}

/// The whole table of cases, built on `bench`.
fn cases(bench: &Workbench) -> Vec<(Case, PathBuf)> {
    let mut out = Vec::new();
    let mut add = |name: &str,
                   image: PathBuf,
                   args: &[&'static str],
                   needles: &[&str],
                   offset: u64,
                   refused_at_open: bool,
                   virtual_size: u64| {
        out.push((
            Case {
                name: name.to_string(),
                args: args.to_vec(),
                needles: needles.iter().map(|s| s.to_string()).collect(),
                offset,
                refused_at_open,
                virtual_size,
                names_destination: false,
            },
            image,
        ));
    };

    // ---- qcow2: a 4 MiB image with 64 KiB clusters, random data from guest offset 0 ----
    let good = bench.qcow2_mix("good.qcow2", SIZE, "", &[]);
    let g = layout(&good);
    let file_len = std::fs::metadata(&good).unwrap().len();
    let damage = |name: &str, f: &dyn Fn(&Path)| damaged(bench, &good, &format!("{name}.qcow2"), f);

    add(
        "truncated-in-header",
        damage("truncated-in-header", &|p| truncate(p, 50)),
        &[],
        &["qcow2 header truncated", "50 of 72 bytes"],
        50,
        true,
        SIZE,
    );
    add(
        "truncated-before-l1",
        damage("truncated-before-l1", &|p| truncate(p, g.l1)),
        &[],
        &["L1 table", "ends past the end of the file"],
        40,
        true,
        SIZE,
    );
    add(
        "truncated-in-l1",
        damage("truncated-in-l1", &|p| truncate(p, g.l1 + 4)),
        &[],
        &["L1 table", "ends past the end of the file"],
        40,
        true,
        SIZE,
    );
    add(
        "truncated-in-l2",
        damage("truncated-in-l2", &|p| truncate(p, g.l2 + 100)),
        &[],
        &["L1 entry 0", "L2 table", "past the end of the file"],
        g.l1,
        false,
        SIZE,
    );
    let data0 = g.first_entry & 0x00ff_ffff_ffff_fe00;
    add(
        "truncated-at-data",
        damage("truncated-at-data", &|p| truncate(p, data0)),
        &[],
        &["L2 entry 0", "cluster", "past the end of the file"],
        g.first_entry_at,
        false,
        SIZE,
    );
    add(
        "l1-entry-past-eof",
        damage("l1-entry-past-eof", &|p| write_be64(p, g.l1, 1 << 63 | 1 << 40)),
        &[],
        &["L1 entry 0", "past the end of the file"],
        g.l1,
        false,
        SIZE,
    );
    add(
        "l1-entry-unaligned",
        damage("l1-entry-unaligned", &|p| write_be64(p, g.l1, g.l2 + 512)),
        &[],
        &["L1 entry 0", "not aligned"],
        g.l1,
        false,
        SIZE,
    );
    add(
        "l1-entry-into-header",
        damage("l1-entry-into-header", &|p| write_be64(p, g.l1, 1 << 63 | 0x200)),
        &[],
        &["L1 entry 0", "not aligned"],
        g.l1,
        false,
        SIZE,
    );
    add(
        "l1-entry-into-l1",
        damage("l1-entry-into-l1", &|p| write_be64(p, g.l1, 1 << 63 | g.l1)),
        &[],
        &["L1 entry 0", "overlaps the L1 table"],
        g.l1,
        false,
        SIZE,
    );
    add(
        "l1-entry-reserved-bits",
        damage("l1-entry-reserved-bits", &|p| write_be64(p, g.l1, read_be64(p, g.l1) | 1)),
        &[],
        &["L1 entry 0", "reserved bits 0x1"],
        g.l1,
        false,
        SIZE,
    );
    add(
        "l2-entry-past-eof",
        damage("l2-entry-past-eof", &|p| write_be64(p, g.l2, g.first_entry + (1 << 40))),
        &[],
        &["L2 entry 0", "past the end of the file"],
        g.l2,
        false,
        SIZE,
    );
    add(
        "l2-entry-unaligned",
        damage("l2-entry-unaligned", &|p| write_be64(p, g.l2, g.first_entry + 4096)),
        &[],
        &["L2 entry 0", "not aligned"],
        g.l2,
        false,
        SIZE,
    );
    add(
        "l2-entry-reserved-bits",
        damage("l2-entry-reserved-bits", &|p| write_be64(p, g.l2, g.first_entry | 2)),
        &[],
        &["L2 entry 0", "reserved bits 0x2"],
        g.l2,
        false,
        SIZE,
    );
    add(
        "l1-size-absurd",
        damage("l1-size-absurd", &|p| write_be32(p, 36, u32::MAX)),
        &[],
        &["L1 table of 4294967295 entries", "larger than the 32 MiB maximum"],
        36,
        true,
        SIZE,
    );
    add(
        "l1-size-zero",
        damage("l1-size-zero", &|p| write_be32(p, 36, 0)),
        &[],
        &["L1 table of 0 entries is too small"],
        36,
        true,
        SIZE,
    );
    add(
        "virtual-size-max",
        damage("virtual-size-max", &|p| write_be64(p, 24, u64::MAX)),
        &[],
        &["too small for the virtual size 18446744073709551615"],
        36,
        true,
        u64::MAX,
    );
    // 2^61 bytes need an L1 table of 2^32 entries with 64 KiB clusters: capped before it sizes anything.
    add(
        "virtual-size-2e61-l1-to-match",
        damage("virtual-size-2e61-l1-to-match", &|p| {
            write_be64(p, 24, 1 << 61);
            write_be32(p, 36, u32::MAX);
        }),
        &[],
        &["larger than the 32 MiB maximum"],
        36,
        true,
        1 << 61,
    );
    // A well-formed image of 1 EiB (qemu-img makes it: 2 MiB clusters, a 4 MiB L1 table) opens, but no file can be
    // that large: refused when the destination is sized, before anything is written.
    bench.qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "exabyte.qcow2", "1E"]);
    add(
        "virtual-size-1EiB-well-formed",
        bench.path("exabyte.qcow2"),
        &[],
        &["sizing destination to 1152921504606846976 bytes", "File too large"],
        1 << 60,
        false,
        0,
    );
    for (bits, needle) in [
        (8u32, "cluster_bits 8 is below the minimum of 9"),
        (22, "cluster_bits 22 is above the maximum of 21"),
        (u32::MAX, "cluster_bits 4294967295 is above the maximum of 21"),
        (0, "cluster_bits 0 is below the minimum of 9"),
    ] {
        let name = format!("cluster-bits-{bits}");
        add(&name, damage(&name, &|p| write_be32(p, 20, bits)), &[], &[needle], 20, true, SIZE);
    }
    add(
        "unknown-incompatible-feature-5",
        damage("unknown-incompatible-feature-5", &|p| write_be64(p, 72, read_be64(p, 72) | 1 << 5)),
        &[],
        &["unsupported incompatible feature", "bit 5"],
        72,
        true,
        SIZE,
    );
    add(
        "unknown-incompatible-feature-63",
        damage("unknown-incompatible-feature-63", &|p| write_be64(p, 72, read_be64(p, 72) | 1 << 63)),
        &[],
        &["unsupported incompatible feature", "bit 63"],
        72,
        true,
        SIZE,
    );
    assert!(file_len > g.l2);

    // ---- qcow2 compressed clusters: 4 KiB clusters, zlib and zstd ----
    for (codec, options, garbage_needle) in [
        ("zlib", "cluster_size=4k", "invalid deflate data"),
        ("zstd", "cluster_size=4k,compression_type=zstd", "invalid zstd data"),
    ] {
        let good = compressed_image(bench, codec, options);
        let c = layout(&good);
        assert_ne!(c.first_entry & 1 << 62, 0, "first cluster of {codec} image is not compressed");
        // Compressed descriptor: bits 0..x-1 host offset, x..61 (additional sectors); x = 62 - (cluster_bits - 8).
        let offset_bits = 62 - (12 - 8);
        let host = c.first_entry & ((1 << offset_bits) - 1);
        let len_sectors = (c.first_entry >> offset_bits) & ((1 << (62 - offset_bits)) - 1);
        let file_len = std::fs::metadata(&good).unwrap().len();
        let name = format!("compressed-{codec}-garbage");
        add(
            &name,
            damaged(bench, &good, &format!("{name}.qcow2"), |p| patch(p, host, &[0xff; 512])),
            &[],
            &[garbage_needle],
            host,
            false,
            SIZE,
        );
        // A descriptor whose data starts in the last sector and claims more sectors than are left.
        let near_end = (file_len - 100) & !511;
        let name = format!("compressed-{codec}-past-eof");
        let entry = 1 << 62 | 0xf << offset_bits | near_end;
        add(
            &name,
            damaged(bench, &good, &format!("{name}.qcow2"), |p| write_be64(p, c.l2, entry)),
            &[],
            &[garbage_needle],
            near_end,
            false,
            SIZE,
        );
        let name = format!("compressed-{codec}-starts-past-eof");
        let entry = 1 << 62 | len_sectors << offset_bits | (file_len + 4096);
        add(
            &name,
            damaged(bench, &good, &format!("{name}.qcow2"), |p| write_be64(p, c.l2, entry)),
            &[],
            &["compressed cluster", "past the end of the file"],
            c.l2,
            false,
            SIZE,
        );
    }

    // ---- backing file names ----
    for (label, backing, needle) in [
        ("dotdot", "../outside.raw", "leaves the image's directory"),
        ("absolute", "/etc/hostname", "absolute path"),
        ("nbd", "nbd:localhost:10809", "protocol prefix \"nbd\""),
        ("http", "http://127.0.0.1/base.raw", "protocol prefix \"http\""),
        ("json", "json:{\"file.driver\":\"file\"}", "protocol prefix \"json\""),
    ] {
        let name = format!("backing-{label}.qcow2");
        bench.qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", &name, "4M"]);
        let image = bench.path(&name);
        let name_at = read_be64(&image, 8);
        let quoted = format!("{backing:?}");
        add(
            &format!("backing-{label}-refused"),
            image.clone(),
            &[],
            &[quoted.as_str(), "pass --allow-backing"],
            name_at,
            true,
            SIZE,
        );
        add(
            &format!("backing-{label}-allowed"),
            image,
            &["--allow-backing"],
            &[quoted.as_str(), needle],
            name_at,
            true,
            SIZE,
        );
    }

    // ---- vmdk, vhd, vhdx, vdi: one structural field each ----
    let raw = bench.path("content.raw");
    common::write_raw(&raw, SIZE, &[(0, MIB, Fill::Random(7)), (3 * MIB, 4096, Fill::Pattern)]);
    let convert = |format: &str, options: &str, name: &str| -> PathBuf {
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", format];
        if !options.is_empty() {
            args.extend_from_slice(&["-o", options]);
        }
        let raw = raw.to_str().unwrap();
        args.extend_from_slice(&[raw, name]);
        bench.qemu_img(&args);
        bench.path(name)
    };

    let vmdk = convert("vmdk", "", "good.vmdk");
    add(
        "vmdk-grain-size-zero",
        damaged(bench, &vmdk, "vmdk-grain-size-zero.vmdk", |p| patch(p, 20, &0u64.to_le_bytes())),
        &[],
        &["vmdk grain of 0 sectors"],
        20,
        true,
        SIZE,
    );
    add(
        "vmdk-gd-past-eof",
        damaged(bench, &vmdk, "vmdk-gd-past-eof.vmdk", |p| patch(p, 56, &(1u64 << 40).to_le_bytes())),
        &[],
        &["vmdk grain directory", "lies outside the file"],
        56,
        true,
        SIZE,
    );
    let gd = u64::from(read_le32(&vmdk, 56)) * 512;
    add(
        "vmdk-gt-past-eof",
        damaged(bench, &vmdk, "vmdk-gt-past-eof.vmdk", |p| patch(p, gd, &0x7fff_fff0u32.to_le_bytes())),
        &[],
        &["vmdk grain directory entry 0", "grain table at sector 2147483632", "past the end of the file"],
        gd,
        false,
        SIZE,
    );

    let vhd = convert("vpc", "", "good.vhd");
    let vhd_size = virtual_size(&vhd);
    // The dynamic header follows the footer copy at offset 0; its block size field is at +32.
    let dyn_at = read_be64(&vhd, 16);
    add(
        "vhd-block-size-not-power-of-two",
        damaged(bench, &vhd, "vhd-block-size.vhd", |p| write_be32(p, dyn_at + 32, 3 << 20)),
        &[],
        &["vhd block size 3145728 is not a power of two"],
        dyn_at + 32,
        true,
        vhd_size,
    );
    add(
        "vhd-bat-past-eof",
        damaged(bench, &vhd, "vhd-bat-past-eof.vhd", |p| write_be64(p, dyn_at + 16, 1 << 40)),
        &[],
        &["vhd BAT", "ends past the end of the file"],
        dyn_at + 16,
        true,
        vhd_size,
    );

    let bat = read_be64(&vhd, dyn_at + 16);
    let block0 = u64::from(read_be32(&vhd, bat));
    add(
        "vhd-truncated-at-data",
        damaged(bench, &vhd, "vhd-truncated.vhd", |p| truncate(p, block0 * 512 + 512)),
        &[],
        &["vhd BAT entry 0: block at sector", "lies past the end of the file"],
        bat,
        false,
        vhd_size,
    );

    let vhdx = convert("vhdx", "", "good.vhdx");
    // Region table 1 at 192 KiB, its copy at 256 KiB: damage both checksums.
    add(
        "vhdx-region-tables-corrupt",
        damaged(bench, &vhdx, "vhdx-regions.vhdx", |p| {
            patch(p, 192 * KIB + 4, &[0xde, 0xad, 0xbe, 0xef]);
            patch(p, 256 * KIB + 4, &[0xde, 0xad, 0xbe, 0xef]);
        }),
        &[],
        &["region table"],
        192 * KIB,
        true,
        SIZE,
    );

    let vdi = convert("vdi", "", "good.vdi");
    add(
        "vdi-block-size",
        damaged(bench, &vdi, "vdi-block-size.vdi", |p| patch(p, 0x178, &(2u32 << 20).to_le_bytes())),
        &[],
        &["vdi block size 2097152 is not 1048576"],
        0x178,
        true,
        SIZE,
    );
    let bmap = u64::from(read_le32(&vdi, 0x154));
    add(
        "vdi-data-offset-past-eof",
        damaged(bench, &vdi, "vdi-data-past-eof.vdi", |p| patch(p, 0x158, &0xffff_fe00u32.to_le_bytes())),
        &[],
        &["vdi block map entry 0: block at 0xfffffe00 lies past the end of the file"],
        bmap,
        false,
        SIZE,
    );
    let data_at = u64::from(read_le32(&vdi, 0x158));
    add(
        "vdi-truncated-at-data",
        damaged(bench, &vdi, "vdi-truncated.vdi", |p| truncate(p, data_at)),
        &[],
        &["vdi block map entry 0: block at", "lies past the end of the file"],
        bmap,
        false,
        SIZE,
    );
    for (case, _) in &mut out {
        case.names_destination = case.name == "virtual-size-1EiB-well-formed";
    }
    out
}

/// The virtual size qemu-img reports for `image`.
fn virtual_size(image: &Path) -> u64 {
    let output = common::run(std::process::Command::new(common::qemu_img()).args(["info", "--output=json"]).arg(image));
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("qemu-img info JSON");
    info["virtual-size"].as_u64().expect("virtual-size")
}

/// A 4 MiB qcow2 with 4 KiB clusters, compressed with `options`, holding compressible text at guest 0.
fn compressed_image(bench: &Workbench, codec: &str, options: &str) -> PathBuf {
    let raw = bench.path(&format!("{codec}.raw"));
    common::write_raw(&raw, SIZE, &[(0, 2 * MIB, Fill::Pattern)]);
    let name = format!("good-{codec}.qcow2");
    bench.qemu_img(&["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", options, raw.to_str().unwrap(), &name]);
    bench.path(&name)
}

#[test]
fn malformed_images_fail_fast_with_one_line_naming_the_offset() {
    let bench = Workbench::new("malformed");
    let mut problems = Vec::new();
    let mut table = String::new();
    for (case, image) in cases(&bench) {
        let dest = bench.path(&format!("{}.out", case.name));
        let _ = std::fs::remove_file(&dest);
        for quiet in [true, false] {
            let mut args = case.args.clone();
            if quiet {
                args.push("--quiet");
            }
            let run = run_capped(&args, &image, &dest);
            let mut bad = |what: String| problems.push(format!("{} ({}): {what}", case.name, args.join(" ")));
            let lines: Vec<&str> = run.stderr.lines().collect();
            let errors: Vec<&&str> = lines.iter().filter(|l| l.contains("error:")).collect();
            if run.code != Some(1) {
                bad(format!("exit code {:?} (signal {:?}), stderr: {}", run.code, run.signal, run.stderr));
                continue;
            }
            let line = match (quiet, lines.as_slice(), errors.as_slice()) {
                (true, [only], _) => *only,
                (false, [.., last], [error]) if last == *error => *last,
                _ => {
                    bad(format!("stderr is not one error line: {:?}", run.stderr));
                    continue;
                }
            };
            if !quiet && lines.iter().any(|l| l.contains("warning:")) {
                bad(format!("unexpected warning: {:?}", run.stderr));
            }
            let offset = format!("at offset {} ({:#x})", case.offset, case.offset);
            for needle in case.needles.iter().chain([&offset]) {
                if !line.contains(needle.as_str()) {
                    bad(format!("error line lacks {needle:?}: {line}"));
                }
            }
            let named = if case.names_destination { &dest } else { &image };
            if !line.contains(named.file_name().unwrap().to_str().unwrap()) {
                bad(format!("error line does not name {}: {line}", named.display()));
            }
            if run.elapsed > DEADLINE {
                bad(format!("took {:?}", run.elapsed));
            }
            if run.peak_rss > MAX_PEAK_RSS {
                bad(format!("peak RSS {} MiB", run.peak_rss / MIB));
            }
            match std::fs::metadata(&dest) {
                Ok(_) if case.refused_at_open => bad("destination created for a refused header".into()),
                Ok(meta) if meta.len() > case.virtual_size => bad(format!("destination grew to {}", meta.len())),
                _ => {}
            }
            if quiet {
                table.push_str(&format!(
                    "{:<34} {:>5} ms {:>5} MiB  {line}\n",
                    case.name,
                    run.elapsed.as_millis(),
                    run.peak_rss / MIB
                ));
            }
        }
    }
    eprintln!("{table}");
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

/// The cap itself leaves room for a real import: a valid image imports under it.
#[test]
fn a_valid_image_imports_under_the_same_cap() {
    let bench = Workbench::new("malformed-ok");
    let good = bench.qcow2_mix("ok.qcow2", 16 * MIB, "", &[]);
    let dest = bench.path("ok.out");
    let run = run_capped(&["--quiet"], &good, &dest);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let (want, len) = common::qemu_reference(&good, bench.dir.path());
    assert_eq!(common::sha256_prefix(&dest, len), want);
}

/// An L1 entry naming the L1 table's own cluster as its L2 table is refused the same way from a file and as a
/// stream (a server without Range support): one check, shared by the random-access reader and the walker.
#[test]
fn an_l1_entry_pointing_at_the_l1_table_is_refused_from_a_file_and_as_a_stream() {
    let bench = Workbench::new("l1-self");
    let qcow2 = bench.qcow2_mix("self.qcow2", 4 * MIB, "", &[]);
    let l1 = read_be64(&qcow2, 40);
    write_be64(&qcow2, l1, l1 | 1 << 63);
    let server = common::http::TestServer::start(bench.dir.path(), Default::default());
    let file = qcow2.to_string_lossy().into_owned();
    for (how, source) in [("file", file), ("stream", server.url("self.qcow2"))] {
        let dest = bench.path(&format!("out-{how}.raw"));
        let output = boundimport().args(["--progress", "none"]).arg(&source).arg(&dest).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{how}: exit 0\n{stderr}");
        assert!(stderr.contains("overlaps the L1 table") && stderr.contains(&source), "{how}: {stderr}");
    }
}

/// A vmdk text descriptor served as a stream is refused naming the URL, with or without `--scratch`: its
/// extents are other files, so spooling it cannot help (it used to advise `--scratch`, then fail naming the
/// deleted spool file).
#[test]
fn a_streamed_vmdk_descriptor_is_refused_naming_the_url() {
    let bench = Workbench::new("vmdk-descriptor-stream");
    let descriptor = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                      createType=\"monolithicFlat\"\nRW 8192 FLAT \"flat.raw\" 0\n";
    std::fs::write(bench.path("desc.vmdk"), descriptor).unwrap();
    std::fs::create_dir(bench.path("scratch")).unwrap();
    let server = common::http::TestServer::start(bench.dir.path(), Default::default());
    let url = server.url("desc.vmdk");
    for scratch in [false, true] {
        let mut cmd = boundimport();
        cmd.args(["--progress", "none"]);
        if scratch {
            cmd.arg("--scratch").arg(bench.path("scratch"));
        }
        let output = cmd.arg(&url).arg(bench.path("out.raw")).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(!output.status.success(), "--scratch {scratch}: {stderr}");
        assert!(last.contains(&url) && last.contains("descriptor"), "--scratch {scratch}: {last}");
        assert!(!last.contains("--scratch") && !last.contains("spool"), "--scratch {scratch}: {last}");
    }
}
