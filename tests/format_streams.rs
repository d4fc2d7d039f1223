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

// ---- bzip2 and zip ----

/// Whether the first local header of `zip` has general purpose flag bit 3 (sizes in a data descriptor) and
/// whether it carries a zip64 extra field.
fn zip_layout(zip: &Path) -> (bool, bool) {
    let bytes = std::fs::read(zip).unwrap();
    assert_eq!(&bytes[..4], b"PK\x03\x04");
    let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
    let name_len = u16::from_le_bytes([bytes[26], bytes[27]]) as usize;
    let extra_len = u16::from_le_bytes([bytes[28], bytes[29]]) as usize;
    let mut extra = &bytes[30 + name_len..30 + name_len + extra_len];
    let mut zip64 = false;
    while extra.len() >= 4 {
        let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
        zip64 |= extra[..2] == [1, 0];
        extra = &extra[(4 + len).min(extra.len())..];
    }
    (flags & 8 != 0, zip64)
}

/// Images wrapped by the bzip2 and zip tools read like the image itself: bzip2 (one stream and two
/// concatenated), zip deflated, stored, streamed from a pipe (data descriptor), forced zip64, and with a directory
/// entry in front; locally and from a server without Range. `--json` names each wrapper.
#[test]
fn bzip2_and_zip_wrappers_match_qemu() {
    if !common::prereq::require("bzip2_and_zip_wrappers_match_qemu", &[common::prereq::BZIP2, common::prereq::ZIP]) {
        return;
    }
    let dir = scratch_dir("stream-bz2-zip");
    let d = dir.path();
    let size = 9 * MIB + 3 * 65536 + 3 * 512;
    let qcow2 = qemu_image(d, size, "qcow2", "", "disk.qcow2");
    let want = reference(&qcow2, "qcow2");
    let raw = d.join("disk.raw");
    run(Command::new(qemu_img()).args(["convert", "-O", "raw"]).arg(&qcow2).arg(&raw));
    sh(
        d,
        "bzip2 -k disk.qcow2 && bzip2 -k -1 disk.raw \
         && head -c 5000000 disk.raw | bzip2 > two.raw.bz2 && tail -c +5000001 disk.raw | bzip2 >> two.raw.bz2 \
         && zip -q deflate.zip disk.qcow2 && zip -q -0 stored.zip disk.qcow2 && zip -q -fz zip64.zip disk.qcow2 \
         && cat disk.qcow2 | zip -q - - | cat > piped.zip \
         && mkdir -p images && cp disk.raw images/ && zip -q -r withdir.zip images \
         && zip -q inner.qcow2.bz2.zip disk.qcow2.bz2",
    );
    assert_eq!(zip_layout(&d.join("deflate.zip")), (false, false));
    assert!(zip_layout(&d.join("piped.zip")).0, "a piped zip should use a data descriptor");
    assert!(zip_layout(&d.join("zip64.zip")).1, "zip -fz should write a zip64 extra field");
    let server = TestServer::start(d, ServerOptions { ranges: false, ..Default::default() });
    let cases: &[(&str, &[&str], &str)] = &[
        ("disk.qcow2.bz2", &["bzip2"], "qcow2"),
        ("disk.raw.bz2", &["bzip2"], "raw"),
        ("two.raw.bz2", &["bzip2"], "raw"),
        ("deflate.zip", &["zip"], "qcow2"),
        ("stored.zip", &["zip"], "qcow2"),
        ("zip64.zip", &["zip"], "qcow2"),
        ("piped.zip", &["zip"], "qcow2"),
        ("withdir.zip", &["zip"], "raw"),
        ("inner.qcow2.bz2.zip", &["zip", "bzip2"], "qcow2"),
    ];
    for &(name, wrappers, format) in cases {
        let local = d.join(name);
        for (source, label) in [(local.to_str().unwrap().to_string(), "local"), (server.url(name), "HTTP")] {
            let summary = import_ok(&[], &source, &want, &format!("{name} {label}"));
            assert_eq!(summary["compression"], serde_json::json!(wrappers), "{name} {label}: {summary}");
            assert_eq!(summary["format"], format, "{name} {label}: {summary}");
        }
    }
}

/// A zip of several files is refused naming two of them, after the first entry's data was read: the partial
/// image is removed. So are a stored entry whose size only follows its data, and an entry whose CRC-32 is wrong.
#[test]
fn zips_that_are_not_one_readable_image_are_refused() {
    if !common::prereq::require("zips_that_are_not_one_readable_image_are_refused", &[common::prereq::ZIP]) {
        return;
    }
    let dir = scratch_dir("stream-zip-refused");
    let d = dir.path();
    write_raw(&d.join("a.raw"), 3 * MIB, &[(0, 3 * MIB, Fill::Random(7))]);
    write_raw(&d.join("b.raw"), MIB, &[(0, MIB, Fill::Random(8))]);
    sh(d, "zip -q two.zip a.raw b.raw && cat a.raw | zip -q -0 - - | cat > piped-stored.zip && cp two.zip crc.zip");
    let text = import_fails(&[], d.join("two.zip").to_str().unwrap(), "two entries");
    assert!(text.contains("two.zip") && text.contains("\"a.raw\"") && text.contains("\"b.raw\""), "{text}");
    let server = TestServer::start(d, ServerOptions { ranges: false, ..Default::default() });
    let text = import_fails(&[], &server.url("two.zip"), "two entries over HTTP");
    assert!(text.contains("several files"), "{text}");
    assert!(zip_layout(&d.join("piped-stored.zip")).0, "a piped zip should use a data descriptor");
    let text = import_fails(&[], d.join("piped-stored.zip").to_str().unwrap(), "stored with a descriptor");
    assert!(text.contains("stored without its size"), "{text}");
    // Flip the CRC-32 of the first entry's local header.
    let bytes = std::fs::read(d.join("crc.zip")).unwrap();
    patch(&d.join("crc.zip"), 14, &[bytes[14] ^ 0xff]);
    let text = import_fails(&[], d.join("crc.zip").to_str().unwrap(), "bad CRC");
    assert!(text.contains("CRC-32") && text.contains("a.raw"), "{text}");
}

// ---- table-first formats walked forward ----

fn be32_at(path: &Path, at: u64) -> u32 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 4];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    u32::from_be_bytes(b)
}

/// File offset of a dynamic vhd's BAT (footer copy → dynamic header → BAT).
fn vhd_bat(image: &Path) -> u64 {
    let dynamic = common::read_be64(image, 16);
    common::read_be64(image, dynamic + 16)
}

/// A dynamic vhd read as a gzip stream, and plain from a server without Range, is walked BAT first: identical to
/// qemu, nothing spooled. Also with two BAT entries swapped, so the stream holds a later guest block first.
#[test]
fn dynamic_vhd_streams_without_spooling() {
    let dir = scratch_dir("stream-vhd-dynamic");
    let d = dir.path();
    let size = 9 * MIB + 3 * 65536 + 3 * 512;
    let image = qemu_image(d, size, "vpc", "subformat=dynamic", "disk.vhd");
    let swapped = d.join("swapped.vhd");
    std::fs::copy(&image, &swapped).unwrap();
    let bat = vhd_bat(&swapped);
    let (first, last) = (be32_at(&swapped, bat), be32_at(&swapped, bat + 16));
    assert!(first != u32::MAX && last != u32::MAX, "blocks 0 and 4 should be allocated");
    patch(&swapped, bat, &last.to_be_bytes());
    patch(&swapped, bat + 16, &first.to_be_bytes());
    sh(d, "gzip -k disk.vhd && xz -k -T0 swapped.vhd");
    let server = TestServer::start(d, ServerOptions { ranges: false, ..Default::default() });
    for (source, want, label) in [
        (d.join("disk.vhd.gz").to_str().unwrap().to_string(), reference(&image, "vpc"), "disk.vhd.gz"),
        (server.url("disk.vhd"), reference(&image, "vpc"), "disk.vhd without Range"),
        (server.url("disk.vhd.gz"), reference(&image, "vpc"), "disk.vhd.gz over HTTP"),
        (d.join("swapped.vhd.xz").to_str().unwrap().to_string(), reference(&swapped, "vpc"), "swapped.vhd.xz"),
    ] {
        let summary = import_ok(&[], &source, &want, label);
        assert_eq!(summary["format"], "vpc", "{label}: {summary}");
        assert_eq!(summary["spooled_bytes"], 0, "{label}: {summary}");
    }
    assert!(server.requests().iter().all(|r| r.status == 200), "{:?}", server.requests());
}

/// A BAT entry pointing past the end of the stream, or a BAT the stream never reaches, fails naming the image,
/// with nothing left behind.
#[test]
fn broken_dynamic_vhd_streams_fail_cleanly() {
    let dir = scratch_dir("stream-vhd-broken");
    let d = dir.path();
    let image = qemu_image(d, 9 * MIB, "vpc", "subformat=dynamic", "disk.vhd");
    let bat = vhd_bat(&image);
    let past = d.join("past.vhd");
    std::fs::copy(&image, &past).unwrap();
    patch(&past, bat, &0x0100_0000u32.to_be_bytes());
    let cut = d.join("cut.vhd");
    std::fs::copy(&image, &cut).unwrap();
    std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(bat + 4).unwrap();
    sh(d, "gzip -k past.vhd && gzip -k cut.vhd");
    let text = import_fails(&[], d.join("past.vhd.gz").to_str().unwrap(), "block past the end");
    assert!(text.contains("past.vhd.gz") && text.contains("past the end of the stream"), "{text}");
    let text = import_fails(&[], d.join("cut.vhd.gz").to_str().unwrap(), "stream ends in the BAT");
    assert!(text.contains("cut.vhd.gz") && text.contains("BAT"), "{text}");
}

/// A qemu vdi moved to VirtualBox's layout: block map at 1 MiB, data area at 2 MiB (the padding between is
/// neither data nor spooled).
fn virtualbox_layout(qemu_vdi: &Path, out: &Path) {
    let bytes = std::fs::read(qemu_vdi).unwrap();
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let (map, data, blocks) = (le32(0x154), le32(0x158), le32(0x180));
    let mut moved = bytes[..512].to_vec();
    moved[0x154..0x158].copy_from_slice(&(MIB as u32).to_le_bytes());
    moved[0x158..0x15c].copy_from_slice(&(2 * MIB as u32).to_le_bytes());
    moved.resize(MIB as usize, 0);
    moved.extend_from_slice(&bytes[map..map + 4 * blocks]);
    moved.resize(2 * MIB as usize, 0);
    moved.extend_from_slice(&bytes[data..]);
    std::fs::write(out, moved).unwrap();
}

/// A vdi (dynamic, static, and in VirtualBox's layout) read as a gzip stream, and plain from a server without
/// Range, is walked block map first: identical to qemu, nothing spooled.
#[test]
fn vdi_streams_without_spooling() {
    let dir = scratch_dir("stream-vdi");
    let d = dir.path();
    let size = 9 * MIB + 3 * 65536 + 3 * 512;
    qemu_image(d, size, "vdi", "static=off", "dynamic.vdi");
    qemu_image(d, size, "vdi", "static=on", "static.vdi");
    virtualbox_layout(&d.join("dynamic.vdi"), &d.join("vbox.vdi"));
    sh(d, "gzip -k dynamic.vdi static.vdi vbox.vdi");
    let server = TestServer::start(d, ServerOptions { ranges: false, ..Default::default() });
    for name in ["dynamic.vdi", "static.vdi", "vbox.vdi"] {
        let want = reference(&d.join(name), "vdi");
        let gz = d.join(format!("{name}.gz"));
        for (source, label) in [(gz.to_str().unwrap().to_string(), "gzip"), (server.url(name), "without Range")] {
            let summary = import_ok(&[], &source, &want, &format!("{name} {label}"));
            assert_eq!(summary["format"], "vdi", "{name} {label}: {summary}");
            assert_eq!(summary["spooled_bytes"], 0, "{name} {label}: {summary}");
        }
    }
}

/// A monolithicSparse vmdk (plain, with zero grains written by qemu-io, and of a size that is no multiple of the
/// grain) read as a gzip stream, and plain from a server without Range, is walked grain directory first: identical
/// to qemu, nothing spooled.
#[test]
fn sparse_vmdk_streams_without_spooling() {
    let dir = scratch_dir("stream-vmdk-sparse");
    let d = dir.path();
    let size = 9 * MIB + 3 * 65536 + 3 * 512;
    qemu_image(d, size, "vmdk", "subformat=monolithicSparse", "plain.vmdk");
    let zeroed = qemu_image(d, size, "vmdk", "subformat=monolithicSparse,zeroed_grain=on", "zeroed.vmdk");
    run(Command::new(common::qemu_io())
        .args(["-f", "vmdk", "-c", "write -z 0 512k", "-c", "write -z 8M 128k"])
        .arg(&zeroed));
    qemu_image(d, 7 * MIB + 4096 + 512, "vmdk", "subformat=monolithicSparse", "odd.vmdk");
    sh(d, "gzip -k plain.vmdk zeroed.vmdk odd.vmdk");
    let server = TestServer::start(d, ServerOptions { ranges: false, ..Default::default() });
    for name in ["plain.vmdk", "zeroed.vmdk", "odd.vmdk"] {
        let want = reference(&d.join(name), "vmdk");
        let gz = d.join(format!("{name}.gz"));
        for (source, label) in [(gz.to_str().unwrap().to_string(), "gzip"), (server.url(name), "without Range")] {
            let summary = import_ok(&[], &source, &want, &format!("{name} {label}"));
            assert_eq!(summary["format"], "vmdk", "{name} {label}: {summary}");
            assert_eq!(summary["spooled_bytes"], 0, "{name} {label}: {summary}");
        }
    }
}

/// A vhdx (dynamic, fixed, 1 MiB blocks) read as a gzip stream, and plain from a server without Range, is walked
/// region table, metadata and BAT first: identical to qemu, nothing spooled. One whose log needs replaying is
/// refused in a stream too, as qemu refuses it.
#[test]
fn vhdx_streams_without_spooling_and_a_dirty_log_is_refused() {
    let dir = scratch_dir("stream-vhdx");
    let d = dir.path();
    let size = 9 * MIB + 3 * 65536 + 3 * 512;
    qemu_image(d, size, "vhdx", "subformat=dynamic", "dynamic.vhdx");
    qemu_image(d, size, "vhdx", "subformat=fixed", "fixed.vhdx");
    qemu_image(d, size, "vhdx", "subformat=dynamic,block_size=1M", "small.vhdx");
    let dirty = qemu_image(d, size, "vhdx", "subformat=dynamic", "dirty.vhdx");
    common::images::dirty_the_log(&dirty);
    sh(d, "gzip -k dynamic.vhdx fixed.vhdx small.vhdx dirty.vhdx");
    let server = TestServer::start(d, ServerOptions { ranges: false, ..Default::default() });
    for name in ["dynamic.vhdx", "fixed.vhdx", "small.vhdx"] {
        let want = reference(&d.join(name), "vhdx");
        let gz = d.join(format!("{name}.gz"));
        for (source, label) in [(gz.to_str().unwrap().to_string(), "gzip"), (server.url(name), "without Range")] {
            let summary = import_ok(&[], &source, &want, &format!("{name} {label}"));
            assert_eq!(summary["format"], "vhdx", "{name} {label}: {summary}");
            assert_eq!(summary["spooled_bytes"], 0, "{name} {label}: {summary}");
        }
    }
    let text = import_fails(&[], d.join("dirty.vhdx.gz").to_str().unwrap(), "dirty log");
    assert!(text.contains("dirty.vhdx.gz") && text.contains("log") && text.contains("replay"), "{text}");
}
