//! Differential tests of the vmdk, vhd (vpc), vhdx and vdi readers: images made by qemu-img from the same raw
//! content must read back, through `format::open` and `read_guest`, exactly as `qemu-img convert -O raw` of the
//! same image (length and sha256). Also detection, and refusals that must be clear errors.

mod common;

use boundimport::error::ErrorKind;
use common::images::*;
use common::{patch, qemu_img, qemu_io, run, scratch_dir, write_raw, Fill, SplitMix64};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
/// Sector-aligned, but not a multiple of any grain (64 KiB) or block (1, 2, 8 or 32 MiB) size.
const SIZE: u64 = 9 * MIB + 3 * 65536 + 3 * 512;

/// Writes the standard raw content of `size` bytes in `dir` and converts it with qemu-img.
fn make(dir: &Path, size: u64, format: &str, options: &str, name: &str) -> PathBuf {
    let raw = dir.join("input.raw");
    write_raw(&raw, size, &standard_content(size));
    let image = dir.join(name);
    qemu_convert_from_raw(&raw, format, options, &image);
    image
}

fn differential(format: &str, options: &str, name: &str, detected: &str) {
    let dir = scratch_dir(&format!("{format}-{}", options.replace([',', '='], "_")));
    let image = make(dir.path(), SIZE, format, options, name);
    assert_same_as_qemu(&image, format, detected);
}

fn open_error(path: &Path) -> boundimport::error::Error {
    match open_image(path) {
        Ok(image) => panic!("{} opened as {}", path.display(), image.format_name()),
        Err(e) => e,
    }
}

fn qemu_refuses(path: &Path, format: &str) -> String {
    let out = Command::new(qemu_img())
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(path.with_extension("qemu-raw"))
        .output()
        .expect("running qemu-img");
    assert!(!out.status.success(), "qemu-img converted {}", path.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---- vmdk ----

#[test]
fn vmdk_monolithic_sparse() {
    differential("vmdk", "subformat=monolithicSparse", "disk.vmdk", "vmdk");
}

#[test]
fn vmdk_stream_optimized() {
    differential("vmdk", "subformat=streamOptimized", "disk.vmdk", "vmdk");
}

#[test]
fn vmdk_monolithic_flat() {
    differential("vmdk", "subformat=monolithicFlat", "disk.vmdk", "vmdk");
}

#[test]
fn vmdk_two_gb_max_extent_sparse() {
    differential("vmdk", "subformat=twoGbMaxExtentSparse", "disk.vmdk", "vmdk");
}

#[test]
fn vmdk_two_gb_max_extent_flat() {
    differential("vmdk", "subformat=twoGbMaxExtentFlat", "disk.vmdk", "vmdk");
}

#[test]
fn vmdk_odd_size_sparse_and_stream() {
    // A capacity that is not a multiple of the grain: the last grain of a compressed image is short.
    for subformat in ["monolithicSparse", "streamOptimized"] {
        let dir = scratch_dir(&format!("vmdk-odd-{subformat}"));
        let image = make(dir.path(), 7 * MIB + 4096 + 512, "vmdk", &format!("subformat={subformat}"), "odd.vmdk");
        assert_same_as_qemu(&image, "vmdk", "vmdk");
    }
}

/// Moves a qemu streamOptimized image's header to a footer, as VMware's streaming writers do: the header
/// says GD_AT_END and the last three sectors are a footer marker, the real header and an end-of-stream marker.
fn move_header_to_footer(image: &Path) {
    let header = read_at(image, 0, 512);
    let len = std::fs::metadata(image).unwrap().len();
    assert_eq!(read_at(image, len - 512, 512), vec![0u8; 512], "qemu ends with an EOS marker");
    let mut tail = vec![0u8; 1536];
    tail[12..16].copy_from_slice(&3u32.to_le_bytes());
    tail[512..1024].copy_from_slice(&header);
    patch(image, len - 512, &tail);
    patch(image, 56, &u64::MAX.to_le_bytes());
}

#[test]
fn vmdk_stream_optimized_with_footer() {
    let dir = scratch_dir("vmdk-footer");
    let image = make(dir.path(), SIZE, "vmdk", "subformat=streamOptimized", "disk.vmdk");
    move_header_to_footer(&image);
    assert_same_as_qemu(&image, "vmdk", "vmdk");
}

#[test]
fn vmdk_stream_optimized_without_eos_marker() {
    let dir = scratch_dir("vmdk-no-eos");
    let image = make(dir.path(), SIZE, "vmdk", "subformat=streamOptimized", "disk.vmdk");
    let len = std::fs::metadata(&image).unwrap().len();
    OpenOptions::new().write(true).open(&image).unwrap().set_len(len - 512).unwrap();
    assert_same_as_qemu(&image, "vmdk", "vmdk");
}

#[test]
fn vmdk_zero_grains() {
    let dir = scratch_dir("vmdk-zero-grain");
    let image = make(dir.path(), SIZE, "vmdk", "subformat=monolithicSparse,zeroed_grain=on", "disk.vmdk");
    // Zero whole grains over random data: qemu writes GT entry 1 for them.
    run(Command::new(qemu_io()).args(["-f", "vmdk", "-c", "write -z 0 512k", "-c", "write -z 8M 128k"]).arg(&image));
    assert_same_as_qemu(&image, "vmdk", "vmdk");
    let gd = u64::from_le_bytes(read_at(&image, 56, 8).try_into().unwrap());
    let gt = u32::from_le_bytes(read_at(&image, gd * 512, 4).try_into().unwrap()) as u64;
    let first_gte = u32::from_le_bytes(read_at(&image, gt * 512, 4).try_into().unwrap());
    assert_eq!(first_gte, 1, "qemu-io should have written a zero grain");
}

/// Writes, in `d`, a hand-written descriptor `mixed.vmdk` mixing a flat extent with an offset, a sparse extent
/// (made by qemu-img from `part_size` bytes) and a flat extent twice as long as its 1 MiB file.
fn mixed_descriptor(d: &Path, part_size: u64) -> PathBuf {
    write_raw(&d.join("data.bin"), 3 * MIB, &[(0, 3 * MIB, Fill::Random(11))]);
    write_raw(&d.join("part.raw"), part_size, &[(0, MIB + 4096, Fill::Random(12))]);
    qemu_convert_from_raw(&d.join("part.raw"), "vmdk", "subformat=monolithicSparse", &d.join("part.vmdk"));
    write_raw(&d.join("tail.bin"), MIB, &[(0, MIB, Fill::MostlyZero(13))]);
    // qemu's parser needs the "# Extent description" comment before the first extent line: without it, it
    // reads the first line twice.
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n\
         RW 2048 FLAT \"data.bin\" 8\n\
         RW {} SPARSE \"part.vmdk\"\n\
         RW 4096 FLAT \"tail.bin\" 0\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"ide\"\n",
        part_size / 512
    );
    std::fs::write(d.join("mixed.vmdk"), text).unwrap();
    d.join("mixed.vmdk")
}

#[test]
fn vmdk_descriptor_with_mixed_extents() {
    let dir = scratch_dir("vmdk-mixed");
    let image = mixed_descriptor(dir.path(), 3 * MIB + 65536);
    // Past the end of tail.bin both readers give zeros.
    assert_same_as_qemu(&image, "vmdk", "vmdk");
}

/// A sparse extent whose size is not a multiple of its grain, followed by another extent: qemu 10 reads the
/// short last grain as a whole one, so the first bytes of the next extent come back as zeros. boundimport
/// reads each extent to its end (deliberately not matching qemu here); checked against the composed bytes.
#[test]
fn vmdk_short_sparse_extent_followed_by_another() {
    let dir = scratch_dir("vmdk-mixed-short");
    let d = dir.path();
    let part_size = 3 * MIB + 4096;
    let image = mixed_descriptor(d, part_size);
    let mut want = read_at(&d.join("data.bin"), 4096, MIB as usize);
    want.extend(std::fs::read(d.join("part.raw")).unwrap());
    want.extend(std::fs::read(d.join("tail.bin")).unwrap());
    want.resize(want.len() + MIB as usize, 0);
    let mut opened = open_image(&image).unwrap();
    let mut got = vec![0u8; want.len()];
    assert_eq!(opened.virtual_size(), want.len() as u64);
    boundimport::pipeline::fill::read_guest(opened.as_mut(), 0, &mut got).unwrap();
    assert!(got == want, "guest bytes differ from the composed extents");
}

#[test]
fn vmdk_parent_is_refused_naming_it() {
    let dir = scratch_dir("vmdk-parent");
    let d = dir.path();
    let base = make(d, SIZE, "vmdk", "subformat=monolithicSparse", "base.vmdk");
    run(Command::new(qemu_img())
        .args(["create", "-f", "vmdk", "-F", "vmdk", "-b"])
        .arg(&base)
        .arg(d.join("child.vmdk")));
    let err = open_error(&d.join("child.vmdk"));
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("base.vmdk"), "{err}");
}

#[test]
fn vmdk_extent_names_must_stay_beside_the_descriptor() {
    let dir = scratch_dir("vmdk-escape");
    let d = dir.path();
    write_raw(&d.join("data.bin"), MIB, &[]);
    for name in ["../data.bin", "/etc/hostname"] {
        let text =
            format!("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"{name}\" 0\n");
        std::fs::write(d.join("bad.vmdk"), text).unwrap();
        let err = open_error(&d.join("bad.vmdk"));
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
    }
    let text = "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"missing.bin\" 0\n";
    std::fs::write(d.join("missing.vmdk"), text).unwrap();
    let err = open_error(&d.join("missing.vmdk"));
    assert!(err.to_string().contains("missing.bin"), "{err}");
}

#[test]
fn vmdk_corrupt_grain_directory_is_an_error() {
    let dir = scratch_dir("vmdk-corrupt");
    let image = make(dir.path(), SIZE, "vmdk", "subformat=monolithicSparse", "disk.vmdk");
    patch(&image, 56, &(1u64 << 40).to_le_bytes());
    let err = open_error(&image);
    assert_eq!(err.kind(), ErrorKind::BadImage, "{err}");
    assert!(err.to_string().contains("disk.vmdk"), "{err}");
}

// ---- vhd ----

#[test]
fn vhd_fixed() {
    differential("vpc", "subformat=fixed", "disk.vhd", "vpc");
}

#[test]
fn vhd_dynamic() {
    differential("vpc", "subformat=dynamic", "disk.vhd", "vpc");
}

#[test]
fn vhd_fixed_force_size() {
    differential("vpc", "subformat=fixed,force_size=on", "disk.vhd", "vpc");
}

#[test]
fn vhd_dynamic_force_size() {
    differential("vpc", "subformat=dynamic,force_size=on", "disk.vhd", "vpc");
}

#[test]
fn vhd_creator_apps_choose_the_size_like_qemu() {
    // Rewrite the creator app of a dynamic disk (footer copies at 0 and at the end) and compare sizes.
    for app in [b"win ", b"vpc ", b"d2v ", b"tap\0"] {
        let dir = scratch_dir("vhd-creator");
        let image = make(dir.path(), SIZE, "vpc", "subformat=dynamic,force_size=on", "disk.vhd");
        let len = std::fs::metadata(&image).unwrap().len();
        for at in [0, len - 512] {
            let mut footer = read_at(&image, at, 512);
            footer[28..32].copy_from_slice(app);
            footer[64..68].fill(0);
            let sum = !footer.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32));
            footer[64..68].copy_from_slice(&sum.to_be_bytes());
            patch(&image, at, &footer);
        }
        assert_same_as_qemu(&image, "vpc", "vpc");
    }
}

/// qemu reads an allocated block of a dynamic disk as stored, whatever its sector bitmap says; so does
/// boundimport (a cleared bitmap over written data reads as the data, not as zeros).
#[test]
fn vhd_sector_bitmap_is_ignored_like_qemu() {
    let dir = scratch_dir("vhd-bitmap");
    let image = make(dir.path(), SIZE, "vpc", "subformat=dynamic", "disk.vhd");
    let data_offset = u64::from_be_bytes(read_at(&image, 16, 8).try_into().unwrap());
    let bat = u64::from_be_bytes(read_at(&image, data_offset + 16, 8).try_into().unwrap());
    let block0 = u32::from_be_bytes(read_at(&image, bat, 4).try_into().unwrap()) as u64;
    assert_ne!(block0, 0xffff_ffff, "block 0 holds random data");
    patch(&image, block0 * 512, &[0u8; 512]);
    assert_same_as_qemu(&image, "vpc", "vpc");
    let mut opened = open_image(&image).unwrap();
    let mut first = vec![0u8; 512];
    boundimport::pipeline::fill::read_guest(opened.as_mut(), 0, &mut first).unwrap();
    assert_ne!(first, vec![0u8; 512]);
}

/// qemu refuses a footer whose checksum does not match ("Incorrect header checksum"); so does boundimport,
/// naming both sums and the footer's offset.
#[test]
fn vhd_bad_footer_checksum_is_refused_like_qemu() {
    let dir = scratch_dir("vhd-checksum");
    let image = make(dir.path(), SIZE, "vpc", "subformat=dynamic", "disk.vhd");
    let footer = read_at(&image, 0, 512);
    let stored = u32::from_be_bytes(footer[64..68].try_into().unwrap());
    patch(&image, 64, &(stored ^ 0x10).to_be_bytes());
    let qemu = qemu_refuses(&image, "vpc");
    assert!(qemu.contains("checksum"), "qemu-img said: {qemu}");
    let err = open_error(&image);
    assert_eq!(err.kind(), ErrorKind::BadImage, "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("{:#010x}", stored ^ 0x10)) && text.contains(&format!("{stored:#010x}")), "{text}");
    assert_eq!(err.offset(), Some(64), "{text}");
}

#[test]
fn vhd_differencing_is_refused_naming_the_parent() {
    let dir = scratch_dir("vhd-diff");
    let image = make(dir.path(), SIZE, "vpc", "subformat=dynamic", "disk.vhd");
    let len = std::fs::metadata(&image).unwrap().len();
    let data_offset = u64::from_be_bytes(read_at(&image, 16, 8).try_into().unwrap());
    let name: Vec<u8> = "parent.vhd".encode_utf16().flat_map(|u| u.to_be_bytes()).collect();
    patch(&image, data_offset + 64, &name);
    for at in [0, len - 512] {
        let mut footer = read_at(&image, at, 512);
        footer[60..64].copy_from_slice(&4u32.to_be_bytes());
        footer[64..68].fill(0);
        let sum = !footer.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32));
        footer[64..68].copy_from_slice(&sum.to_be_bytes());
        patch(&image, at, &footer);
    }
    let err = open_error(&image);
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("parent.vhd"), "{err}");
}

// ---- vhdx ----

#[test]
fn vhdx_dynamic() {
    differential("vhdx", "subformat=dynamic", "disk.vhdx", "vhdx");
}

#[test]
fn vhdx_fixed() {
    differential("vhdx", "subformat=fixed", "disk.vhdx", "vhdx");
}

#[test]
fn vhdx_dynamic_small_blocks() {
    differential("vhdx", "subformat=dynamic,block_size=1M", "disk.vhdx", "vhdx");
}

#[test]
fn vhdx_dynamic_without_zero_state() {
    differential("vhdx", "subformat=dynamic,block_size=8M,block_state_zero=off", "disk.vhdx", "vhdx");
}

/// File offset of the BAT of a vhdx, from its first region table.
fn vhdx_bat_offset(image: &Path) -> u64 {
    let table = read_at(image, 192 << 10, 64 << 10);
    let count = u32::from_le_bytes(table[8..12].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| &table[16 + 32 * i..48 + 32 * i])
        .find(|e| e[..4] == [0x66, 0x77, 0xc2, 0x2d])
        .map(|e| u64::from_le_bytes(e[16..24].try_into().unwrap()))
        .expect("BAT region")
}

#[test]
fn vhdx_block_states() {
    // Block 0 holds random data (fully present); qemu-img marks never-written blocks ZERO (2) or NOT_PRESENT (0).
    // Rewriting block 0's state: UNDEFINED (1), UNMAPPED (3) and the pre-1.0 UNMAPPED (5) read as zeros in
    // both readers; PARTIALLY_PRESENT (7) only exists in differencing disks and is refused by both.
    for state in [1u64, 3, 5, 7] {
        let dir = scratch_dir(&format!("vhdx-state-{state}"));
        let image = make(dir.path(), SIZE, "vhdx", "subformat=dynamic,block_size=1M", "disk.vhdx");
        let bat = vhdx_bat_offset(&image);
        let entry = u64::from_le_bytes(read_at(&image, bat, 8).try_into().unwrap());
        assert_eq!(entry & 7, 6, "block 0 should be fully present");
        patch(&image, bat, &((entry & !7) | state).to_le_bytes());
        if state == 7 {
            qemu_refuses(&image, "vhdx");
            let mut opened = open_image(&image).unwrap();
            let mut buf = vec![0u8; 4096];
            let err = boundimport::pipeline::fill::read_guest(opened.as_mut(), 0, &mut buf).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        } else {
            assert_same_as_qemu(&image, "vhdx", "vhdx");
        }
    }
}

#[test]
fn vhdx_dirty_log_is_refused_like_qemu() {
    let dir = scratch_dir("vhdx-log");
    let image = make(dir.path(), SIZE, "vhdx", "subformat=dynamic", "disk.vhdx");
    dirty_the_log(&image);
    let qemu = qemu_refuses(&image, "vhdx");
    assert!(qemu.contains("log"), "qemu-img said: {qemu}");
    let err = open_error(&image);
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("log"), "{err}");
}

#[test]
fn vhdx_corrupt_region_table_is_an_error() {
    let dir = scratch_dir("vhdx-corrupt");
    let image = make(dir.path(), SIZE, "vhdx", "subformat=dynamic", "disk.vhdx");
    patch(&image, (192 << 10) + 100, &[0xff]);
    let err = open_error(&image);
    assert_eq!(err.kind(), ErrorKind::BadImage, "{err}");
    qemu_refuses(&image, "vhdx");
}

// ---- vdi ----

#[test]
fn vdi_dynamic() {
    differential("vdi", "static=off", "disk.vdi", "vdi");
}

#[test]
fn vdi_static() {
    differential("vdi", "static=on", "disk.vdi", "vdi");
}

#[test]
fn vdi_odd_disk_size_rounds_up_like_qemu() {
    let dir = scratch_dir("vdi-odd");
    let image = make(dir.path(), SIZE, "vdi", "static=off", "disk.vdi");
    patch(&image, 0x170, &(SIZE - 700).to_le_bytes());
    assert_same_as_qemu(&image, "vdi", "vdi");
}

#[test]
fn vdi_parent_is_refused() {
    let dir = scratch_dir("vdi-parent");
    let image = make(dir.path(), SIZE, "vdi", "static=off", "disk.vdi");
    patch(&image, 0x1b8, &[1; 16]);
    let err = open_error(&image);
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    qemu_refuses(&image, "vdi");
}

// ---- detection ----

#[test]
fn recognised_but_unsupported_formats_name_their_magic() {
    let dir = scratch_dir("detect");
    let d = dir.path();
    run(Command::new(qemu_img()).args(["create", "-f", "qed"]).arg(d.join("disk.qed")).arg("1M"));
    let err = open_error(&d.join("disk.qed"));
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("QED"), "{err}");
    let mut dmg = vec![0u8; 4096];
    dmg[4096 - 512..4096 - 508].copy_from_slice(b"koly");
    std::fs::write(d.join("disk.dmg"), &dmg).unwrap();
    let err = open_error(&d.join("disk.dmg"));
    assert!(err.to_string().contains("koly"), "{err}");
}

#[test]
fn raw_and_iso_stay_raw() {
    let dir = scratch_dir("detect-raw");
    let d = dir.path();
    let mut iso = vec![0u8; 64 << 10];
    iso[0x8001..0x8006].copy_from_slice(b"CD001");
    std::fs::write(d.join("disk.iso"), &iso).unwrap();
    assert_eq!(open_image(&d.join("disk.iso")).unwrap().format_name(), "raw");
    // A raw disk whose last sector starts with "conectix" but is no valid fixed-disk footer stays raw.
    let mut raw = vec![0u8; 64 << 10];
    raw[(64 << 10) - 512..(64 << 10) - 504].copy_from_slice(b"conectix");
    std::fs::write(d.join("disk.raw"), &raw).unwrap();
    assert_eq!(open_image(&d.join("disk.raw")).unwrap().format_name(), "raw");
}

// ---- mutations ----

/// Offsets of the vhdx BAT and metadata region, read from the (first) region table.
fn vhdx_hot_ranges(bytes: &[u8]) -> Vec<(usize, usize)> {
    let table = 192 << 10;
    let count = u32::from_le_bytes(bytes[table + 8..table + 12].try_into().unwrap()) as usize;
    (0..count.min(8))
        .map(|i| {
            let at = table + 16 + 32 * i;
            let offset = u64::from_le_bytes(bytes[at + 16..at + 24].try_into().unwrap()) as usize;
            (offset, 4096)
        })
        .collect()
}

/// Random byte mutations of small images of every format, in their headers, metadata and tails: opening and
/// reading them may fail, but must never panic.
#[test]
fn mutated_images_never_panic() {
    let dir = scratch_dir("mutate");
    let d = dir.path();
    let raw = d.join("input.raw");
    let size = 3 * MIB + 65536 + 512;
    write_raw(&raw, size, &[(0, MIB, Fill::Random(21)), (2 * MIB, MIB, Fill::MostlyZero(22))]);
    let variants = [
        ("vmdk", "subformat=monolithicSparse,zeroed_grain=on"),
        ("vmdk", "subformat=streamOptimized"),
        ("vpc", "subformat=dynamic"),
        ("vpc", "subformat=fixed"),
        ("vhdx", "subformat=dynamic,block_size=1M"),
        ("vdi", "static=off"),
    ];
    let mut rng = SplitMix64::new(0x5eed);
    for (i, (format, options)) in variants.iter().enumerate() {
        let image = d.join(format!("{i}.{format}"));
        qemu_convert_from_raw(&raw, format, options, &image);
        let original = std::fs::read(&image).unwrap();
        let len = original.len();
        let mut hot = vec![(0, 96), (0x140, 0x90), (0, 2048), (len - 2048, 2048), (64 << 10, 8192), (0, len)];
        if *format == "vhdx" {
            hot.extend(vhdx_hot_ranges(&original));
        }
        let mut opened = 0;
        for round in 0..300 {
            let mut bytes = original.clone();
            let mut edits = Vec::new();
            for _ in 0..1 + rng.next_u64() % 4 {
                let (start, span) = hot[(rng.next_u64() % hot.len() as u64) as usize];
                let at = (start + (rng.next_u64() % span as u64) as usize).min(len - 8);
                let edit: Vec<u8> = match rng.next_u64() % 4 {
                    0 => vec![0xff; 8],
                    1 => vec![0; 4],
                    2 => vec![rng.next_u64() as u8],
                    _ => rng.next_u64().to_le_bytes()[..4].to_vec(),
                };
                bytes[at..at + edit.len()].copy_from_slice(&edit);
                edits.push((at, edit));
            }
            let name = format!("{format} {options} round {round}");
            let outcome = std::panic::catch_unwind(|| exercise(&name, bytes));
            assert!(outcome.is_ok(), "{name}: panicked after edits {edits:?}");
            opened += (outcome.unwrap() == Some(*format)) as u32;
        }
        // Some mutated images must still open as the format and some not (refused, or a fixed vhd whose footer
        // no longer checks out opening as raw), or the mutations are not reaching the parser.
        assert!((1..300).contains(&opened), "{format} {options}: {opened} of 300 mutated images opened");
    }
}
