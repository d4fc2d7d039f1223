//! qcow2 images made by qemu-img and qemu-io, read back through `Image::map` + `fill` and compared byte for byte
//! (and by sha256) with `qemu-img convert -O raw` of the same image.

mod common;

use boundimport::error::ErrorKind;
use boundimport::format::{self, BackingPolicy, Content, Extent, Image};
use boundimport::pipeline::fill::{fill, Scratch};
use boundimport::source::files::LocalFiles;
use boundimport::source::{FileSource, ReadAt};
use common::{qemu_img, qemu_io, run, run_any, write_pattern_file, Fill, Workbench, KIB, MIB};
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// Guest bytes compared per window.
const WINDOW: u64 = MIB;

/// Kinds of extents a map produced, so tests can tell the variant exercised what it meant to.
#[derive(Debug, Default)]
struct Seen {
    data: usize,
    zero: usize,
    compressed: usize,
    /// Extents whose source is a backing file, by depth (index 0 = first backing file).
    backing: Vec<usize>,
}

impl Seen {
    /// Tallies `extents` by kind.
    fn count(&mut self, extents: &[Extent]) {
        for e in extents {
            match e.content {
                Content::Zero => self.zero += 1,
                Content::Data { source: 0, .. } => self.data += 1,
                Content::Compressed(c) if c.source == 0 => self.compressed += 1,
                Content::Data { source, .. } => self.backing_at(source),
                Content::Compressed(c) => self.backing_at(c.source),
            }
        }
    }

    /// Counts one extent from backing source `source` (1 = first backing file).
    fn backing_at(&mut self, source: usize) {
        if self.backing.len() < source {
            self.backing.resize(source, 0);
        }
        self.backing[source - 1] += 1;
    }
}

/// Reads `name` from the workbench with boundimport and with qemu-img, asserting they agree; returns the extent
/// kinds seen.
fn check(bench: &Workbench, name: &str) -> Seen {
    let policy = BackingPolicy {
        allow: true,
        files: Some(Arc::new(LocalFiles::in_dir(bench.dir.path(), false).unwrap())),
        rebase: None,
    };
    compare_with_qemu(&bench.path(name), &policy, &bench.path(&format!("{name}.ref.raw")))
}

/// Opens the image at `path` as boundimport's front ends do: file source, format detection.
fn open(path: &Path, policy: &BackingPolicy) -> boundimport::error::Result<Box<dyn Image>> {
    let source: Arc<dyn ReadAt> = Arc::new(FileSource::open(path)?);
    format::open(source, policy)
}

/// Maps `[offset, offset + buf.len())`, checks the extents tile it exactly, and fills `buf` from them.
fn read_checked(
    image: &mut dyn Image,
    sources: &[Arc<dyn ReadAt>],
    offset: u64,
    buf: &mut [u8],
    scratch: &mut Scratch,
    seen: &mut Seen,
) {
    let mut extents = Vec::new();
    image
        .map(offset, buf.len() as u64, &mut extents)
        .unwrap_or_else(|e| panic!("map {offset:#x}+{:#x}: {e}", buf.len()));
    let mut cursor = offset;
    for e in &extents {
        assert_eq!(e.guest, cursor, "extents not contiguous: {extents:?}");
        assert!(e.len > 0, "empty extent in {extents:?}");
        if let Content::Data { source, .. } | Content::Compressed(format::Compressed { source, .. }) = e.content {
            assert!(source < sources.len(), "unknown source in {e:?}");
        }
        cursor += e.len;
    }
    assert_eq!(cursor, offset + buf.len() as u64, "extents fall short: {extents:?}");
    seen.count(&extents);
    fill(sources, &extents, offset, buf, scratch).unwrap_or_else(|e| panic!("fill {offset:#x}+{:#x}: {e}", buf.len()));
}

/// Reads the whole guest disk of `path` in windows and at odd ranges, comparing with qemu's raw conversion.
fn compare_with_qemu(path: &Path, policy: &BackingPolicy, reference: &Path) -> Seen {
    run(Command::new(qemu_img()).args(["convert", "-O", "raw"]).arg(path).arg(reference));
    let expected = std::fs::File::open(reference).expect("opening reference");
    let size = expected.metadata().unwrap().len();
    let mut image = open(path, policy).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    assert_eq!(image.virtual_size(), size, "virtual size of {}", path.display());
    let sources = image.sources();
    let mut scratch = Scratch::default();
    let mut seen = Seen::default();
    let (mut ours, mut theirs) = (Sha256::new(), Sha256::new());
    let mut got = vec![0u8; WINDOW as usize];
    let mut want = vec![0u8; WINDOW as usize];
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(WINDOW) as usize;
        read_checked(&mut *image, &sources, offset, &mut got[..n], &mut scratch, &mut seen);
        expected.read_exact_at(&mut want[..n], offset).unwrap();
        if got[..n] != want[..n] {
            let first = got[..n].iter().zip(&want[..n]).position(|(a, b)| a != b).unwrap();
            panic!(
                "{}: guest byte {:#x} differs from qemu-img convert (ours {:#04x}, qemu {:#04x})",
                path.display(),
                offset + first as u64,
                got[first],
                want[first]
            );
        }
        ours.update(&got[..n]);
        theirs.update(&want[..n]);
        offset += n as u64;
    }
    assert_eq!(ours.finalize(), theirs.finalize(), "sha256 of {}", path.display());

    // Odd ranges: starting and ending mid-sector and mid-cluster, some spanning many clusters.
    let mut rng = common::SplitMix64::new(size);
    for _ in 0..48 {
        let len = 1 + rng.below((3 * MIB).min(size));
        let start = rng.below(size - len + 1);
        let mut got = vec![0u8; len as usize];
        let mut want = vec![0u8; len as usize];
        read_checked(&mut *image, &sources, start, &mut got, &mut scratch, &mut seen);
        expected.read_exact_at(&mut want, start).unwrap();
        assert!(got == want, "{}: range {start:#x}+{len:#x} differs", path.display());
    }
    seen
}

/// Incompatible feature bits of a qcow2 file.
fn incompatible_features(path: &Path) -> u64 {
    common::read_be64(path, 72)
}

#[test]
fn v3_default_64k_clusters() {
    let lab = Workbench::new("v3-64k");
    lab.qcow2_mix("a.qcow2", 8 * MIB, "", &[]);
    let seen = check(&lab, "a.qcow2");
    assert!(seen.data > 0 && seen.zero > 0, "{seen:?}");
}

#[test]
fn cluster_sizes_512_4k_2m() {
    let lab = Workbench::new("cluster-sizes");
    for cluster in ["512", "4k", "2M"] {
        let name = format!("c{cluster}.qcow2");
        lab.qcow2_mix(&name, 6 * MIB, &format!("cluster_size={cluster}"), &[]);
        // The mix has no hole as large as a 2 MiB cluster: make one.
        lab.qemu_io(&name, &["write -z -u 2M 2M"]);
        let seen = check(&lab, &name);
        assert!(seen.data > 0 && seen.zero > 0, "{cluster}: {seen:?}");
    }
}

#[test]
fn version_2_images() {
    let lab = Workbench::new("v2");
    let path = lab.qcow2_mix("v2.qcow2", 5 * MIB, "compat=0.10", &[]);
    assert_eq!(common::read_be64(&path, 0) & 0xffff_ffff, 2, "not a v2 image");
    lab.qemu_io("v2.qcow2", &["write -P 0x5a 64k 3k", "discard 1M 512k"]);
    check(&lab, "v2.qcow2");
}

#[test]
fn zero_clusters() {
    let lab = Workbench::new("zero");
    lab.qcow2_mix("z.qcow2", 8 * MIB, "", &[]);
    lab.qemu_io(
        "z.qcow2",
        &[
            "write -z 0 128k",
            "write -z -u 192k 64k",
            "write -z 1040k 100k",
            "write -z 3M 1M",
            "write -z -u 5000k 300k",
            "write -z 8128k 64k",
        ],
    );
    let seen = check(&lab, "z.qcow2");
    assert!(seen.zero > 0, "{seen:?}");
}

#[test]
fn discarded_regions() {
    let lab = Workbench::new("discard");
    lab.qcow2_mix("d.qcow2", 8 * MIB, "", &[]);
    lab.qemu_io("d.qcow2", &["discard 0 256k", "discard 3100k 300k", "discard 6M 2M"]);
    check(&lab, "d.qcow2");
}

#[test]
fn preallocation_metadata() {
    let lab = Workbench::new("prealloc");
    lab.qemu_img(&["create", "-f", "qcow2", "-o", "preallocation=metadata", "p.qcow2", "6M"]);
    lab.write("p.qcow2", Fill::Random(7), 100 * KIB, 300 * KIB);
    lab.write("p.qcow2", Fill::Pattern, 4 * MIB - 1000, 2 * MIB);
    let seen = check(&lab, "p.qcow2");
    assert!(seen.data > 0, "{seen:?}");
}

#[test]
fn dirty_image_with_lazy_refcounts() {
    let lab = Workbench::new("dirty");
    lab.qemu_img(&["create", "-f", "qcow2", "-o", "lazy_refcounts=on", "l.qcow2", "4M"]);
    let pattern = lab.path("pattern.bin");
    write_pattern_file(&pattern, Fill::Random(11), 0, 300_000);
    let output = run_any(
        Command::new(qemu_io())
            .current_dir(lab.dir.path())
            .args(["-f", "qcow2"])
            .args(["-c", &format!("write -s {} 4096 300000", pattern.display())])
            .args(["-c", "flush", "-c", "write -P 0x77 2M 70k", "-c", "abort"])
            .arg("l.qcow2"),
    );
    assert!(!output.status.success(), "qemu-io abort should kill qemu-io");
    let path = lab.path("l.qcow2");
    assert_eq!(incompatible_features(&path) & 1, 1, "dirty bit not set");
    let seen = check(&lab, "l.qcow2");
    assert!(seen.data > 0, "{seen:?}");
}

#[test]
fn corrupt_bit_is_accepted() {
    let lab = Workbench::new("corrupt");
    let path = lab.qcow2_mix("c.qcow2", 3 * MIB, "", &[]);
    common::write_be64(&path, 72, incompatible_features(&path) | 2);
    check(&lab, "c.qcow2");
}

#[test]
fn extended_l2_subclusters() {
    for cluster in ["64k", "2M"] {
        let lab = Workbench::new(&format!("ext-{cluster}"));
        // Converting the mix leaves holes at 4 KiB granularity: partly allocated clusters.
        lab.qcow2_mix("e.qcow2", 8 * MIB, &format!("extended_l2=on,cluster_size={cluster}"), &[]);
        lab.write("e.qcow2", Fill::Random(21), MIB + 3 * KIB, 5 * KIB);
        lab.qemu_io(
            "e.qcow2",
            &[
                "write -P 0x11 6M 512",
                "write -P 0x12 6208k 2k",
                "write -z 6272k 4k",
                "write -z 2M 192k",
                "write -z -u 4M 64k",
                "discard 5M 128k",
                "write -P 0x13 7M 1k",
            ],
        );
        let path = lab.path("e.qcow2");
        assert_ne!(incompatible_features(&path) & (1 << 4), 0, "no extended L2");
        let seen = check(&lab, "e.qcow2");
        assert!(seen.data > 0 && seen.zero > 0, "{cluster}: {seen:?}");
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    let lab = Workbench::new("compressed");
    for kind in ["zlib", "zstd"] {
        for cluster in ["4k", "64k", "2M"] {
            let name = format!("{kind}-{cluster}.qcow2");
            let path =
                lab.qcow2_mix(&name, 9 * MIB, &format!("compression_type={kind},cluster_size={cluster}"), &["-c"]);
            assert_eq!(incompatible_features(&path) & (1 << 3) != 0, kind == "zstd", "compression type bit of {name}");
            let seen = check(&lab, &name);
            assert!(seen.compressed > 0, "{name}: {seen:?}");
        }
    }
}

#[test]
fn compressed_with_extended_l2_and_odd_size() {
    let lab = Workbench::new("compressed-odd");
    let size = 5 * MIB + 3 * 512;
    lab.qcow2_mix("x.qcow2", size, "compression_type=zstd,extended_l2=on", &["-c"]);
    lab.qemu_io("x.qcow2", &["write -P 0x33 64k 2k", "write -z 1M 8k"]);
    let seen = check(&lab, "x.qcow2");
    assert!(seen.compressed > 0, "{seen:?}");
    lab.qcow2_mix("y.qcow2", MIB + 1536, "cluster_size=2M", &["-c"]);
    let seen = check(&lab, "y.qcow2");
    assert!(seen.compressed > 0, "{seen:?}");
}

#[test]
fn virtual_size_not_a_multiple_of_the_cluster_size() {
    let lab = Workbench::new("odd-size");
    for cluster in ["64k", "2M"] {
        let name = format!("odd-{cluster}.qcow2");
        lab.qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            &name,
            &(MIB + 1536).to_string(),
        ]);
        lab.write(&name, Fill::Random(31), MIB - 1000, 2536);
        lab.write(&name, Fill::Pattern, 4096, 10_000);
        check(&lab, &name);
        let name = format!("odd-mix-{cluster}.qcow2");
        lab.qcow2_mix(&name, 3 * MIB + 512, &format!("cluster_size={cluster}"), &[]);
        check(&lab, &name);
    }
}

#[test]
fn backing_chain_qcow2_on_raw() {
    let lab = Workbench::new("backing-raw");
    lab.raw_mix("base.raw", 4 * MIB, 41);
    // The overlay is larger than its backing file: the excess reads as zeros.
    lab.qemu_img(&["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "6M"]);
    lab.write("top.qcow2", Fill::Random(42), 100 * KIB, 8 * KIB);
    lab.qemu_io("top.qcow2", &["write -z 1M 64k", "write -P 0x44 3M 1M", "write -P 0x45 5M 4k"]);
    let seen = check(&lab, "top.qcow2");
    assert!(seen.data > 0 && seen.backing.first() > Some(&0), "{seen:?}");
}

#[test]
fn backing_chain_qcow2_on_qcow2() {
    let lab = Workbench::new("backing-qcow2");
    lab.qcow2_mix("base.qcow2", 4 * MIB, "cluster_size=64k", &["-c"]);
    lab.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=32k",
        "mid.qcow2",
        "5M",
    ]);
    lab.qemu_io("mid.qcow2", &["write -P 0x51 10k 3k", "write -z 2M 2k", "write -P 0x52 4M 100k"]);
    lab.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "top.qcow2",
        "6M",
    ]);
    lab.write("top.qcow2", Fill::Random(43), 3 * MIB + 100, 50_000);
    lab.qemu_io("top.qcow2", &["write -z 8k 8k", "discard 1M 64k"]);
    let seen = check(&lab, "top.qcow2");
    assert!(seen.backing.len() == 2 && seen.backing.iter().all(|&n| n > 0), "{seen:?}");
}

#[test]
fn backing_file_refused_unless_allowed() {
    let lab = Workbench::new("backing-refused");
    lab.raw_mix("base.raw", MIB, 51);
    lab.qemu_img(&["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "1M"]);
    let policy = BackingPolicy {
        allow: false,
        files: Some(Arc::new(LocalFiles::in_dir(lab.dir.path(), false).unwrap())),
        rebase: None,
    };
    let err = match open(&lab.path("top.qcow2"), &policy) {
        Ok(_) => panic!("backing file was followed without permission"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    let text = err.to_string();
    assert!(text.contains("\"base.raw\"") && text.contains("top.qcow2"), "{text}");
}

/// A new value for a table entry, from the old one and the L1 table offset.
type Patch = fn(u64, u64) -> u64;

/// Offset of the first allocated L2 table and of the L1 table of a qcow2 file.
fn first_l2_table(path: &Path) -> (u64, u64) {
    let l1_offset = common::read_be64(path, 40);
    let l2 = common::read_be64(path, l1_offset) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "first L1 entry is unallocated");
    (l1_offset, l2)
}

/// Reads the whole guest disk of `path` (no backing files), returning the first error.
fn read_all(path: &Path) -> boundimport::error::Result<()> {
    let mut image = open(path, &BackingPolicy::default())?;
    let mut buf = vec![0u8; WINDOW as usize];
    let size = image.virtual_size();
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(WINDOW) as usize;
        boundimport::pipeline::fill::read_guest(&mut *image, offset, &mut buf[..n])?;
        offset += n as u64;
    }
    Ok(())
}

#[test]
fn corrupted_tables_are_reported_with_their_offsets() {
    let lab = Workbench::new("broken");
    let good = lab.qcow2_mix("good.qcow2", 2 * MIB, "", &[]);
    read_all(&good).unwrap();
    let (l1, l2) = first_l2_table(&good);
    let cases: [(&str, u64, Patch, &str); 7] = [
        ("l1-reserved", l1, |e, _| e | 1 << 60, "L1 entry 0"),
        ("l1-unaligned", l1, |e, _| e + 512, "not aligned"),
        ("l1-on-l1", l1, |_, l1| l1, "overlaps the L1 table"),
        ("l1-past-eof", l1, |_, _| 1 << 40, "past the end of the file"),
        ("l2-reserved", l2, |e, _| e | 2, "reserved bits 0x2"),
        ("l2-unaligned", l2, |e, _| e + 4096, "not aligned"),
        ("l2-past-eof", l2, |e, _| e + (1 << 40), "past the end of the file"),
    ];
    for (name, at, patch, needle) in cases {
        let path = lab.path(&format!("{name}.qcow2"));
        std::fs::copy(&good, &path).unwrap();
        let entry = common::read_be64(&path, at);
        common::write_be64(&path, at, patch(entry, l1));
        let err = read_all(&path).expect_err(name);
        let text = err.to_string();
        assert_eq!(err.kind(), ErrorKind::BadImage, "{name}: {text}");
        assert!(text.contains(needle), "{name}: {text}");
        assert!(text.contains(&format!("{name}.qcow2")), "{name}: {text}");
        assert_eq!(err.offset(), Some(at), "{name}: {text}");
        assert!(!text.contains('\n'), "{name}: {text}");
    }
}

/// Opens `bytes` as an image and reads up to 8 MiB of it plus a few ranges across the whole virtual size: errors
/// are fine, panics are not.
fn read_mutated(bytes: Vec<u8>, rng: &mut common::SplitMix64) -> boundimport::error::Result<()> {
    let source: Arc<dyn ReadAt> = Arc::new(common::MemSource { name: "mutated.qcow2".into(), bytes });
    let mut image = format::open(source, &BackingPolicy::default())?;
    let size = image.virtual_size();
    let mut buf = vec![0u8; WINDOW as usize];
    let mut offset = 0;
    while offset < size.min(8 * MIB) {
        let n = (size - offset).min(WINDOW) as usize;
        boundimport::pipeline::fill::read_guest(&mut *image, offset, &mut buf[..n])?;
        offset += n as u64;
    }
    for _ in 0..4 {
        if size == 0 {
            break;
        }
        let len = 1 + rng.below(WINDOW.min(size));
        let start = rng.below(size - len + 1);
        boundimport::pipeline::fill::read_guest(&mut *image, start, &mut buf[..len as usize])?;
    }
    Ok(())
}

#[test]
fn mutated_metadata_never_panics() {
    let lab = Workbench::new("mutated");
    let variants = [
        ("std.qcow2", "cluster_size=64k", &[][..]),
        ("ext.qcow2", "extended_l2=on,cluster_size=64k", &[][..]),
        ("zstd.qcow2", "compression_type=zstd,cluster_size=4k", &["-c"][..]),
        ("small.qcow2", "cluster_size=512,compat=0.10", &[][..]),
    ];
    let mut failures = 0;
    for (name, options, flags) in variants {
        let original = std::fs::read(lab.qcow2_mix(name, 3 * MIB, options, flags)).unwrap();
        let l1 = u64::from_be_bytes(original[40..48].try_into().unwrap()) as usize;
        let l2 = (u64::from_be_bytes(original[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
        let mut rng = common::SplitMix64::new(l1 as u64 ^ l2 as u64);
        for round in 0..150 {
            let mut bytes = original.clone();
            for _ in 0..1 + rng.below(4) {
                // Aim at the header, the L1 table and the first L2 table; flip bits or plant extreme values.
                let at = match rng.below(3) {
                    0 => rng.below(112) as usize,
                    1 => l1 + rng.below(64) as usize,
                    _ => l2 + rng.below(512) as usize,
                };
                match rng.below(3) {
                    0 => bytes[at] ^= 1 << rng.below(8),
                    1 => bytes[at] = 0xff,
                    _ => bytes[at] = rng.next_u64() as u8,
                }
            }
            let seed = rng.next_u64();
            let result = std::panic::catch_unwind(move || read_mutated(bytes, &mut common::SplitMix64::new(seed)));
            match result {
                Err(_) => panic!("{name}: round {round} panicked"),
                Ok(Err(e)) => {
                    failures += 1;
                    let text = e.to_string();
                    assert!(!text.contains('\n'), "{text}");
                    assert!(text.starts_with("mutated.qcow2: "), "{text}");
                }
                Ok(Ok(())) => {}
            }
        }
    }
    // Most mutations of metadata must be caught.
    assert!(failures > 150, "only {failures} of 600 mutations were rejected");
}
