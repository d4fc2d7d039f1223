//! Format detection by magic bytes, never by file name.

use crate::error::Result;
use crate::source::ReadAt;

/// What the header of a source says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// No known magic: a raw disk image (also what an ISO is imported as).
    Raw,
    /// qcow2 (`QFI\xfb`, version 2 or 3).
    Qcow2,
    /// vmdk: a sparse extent (`KDMV`) or a text descriptor (`# Disk DescriptorFile`, `version=N`).
    Vmdk,
    /// vhd (vpc): `conectix` footer copy at offset 0 (dynamic), or a fixed-disk footer in the last 512 bytes.
    Vhd,
    /// vhdx (`vhdxfile`).
    Vhdx,
    /// vdi (signature 0xbeda107f at 0x40).
    Vdi,
    /// A recognised format boundimport does not import; the text names it and its magic.
    Unsupported(String),
}

/// Magic numbers of formats that are recognised but not imported, with how to describe them.
const REFUSED: &[(usize, &[u8], &str)] = &[
    (0, b"QED\0", "QED (magic \"QED\\0\")"),
    (0, b"LUKS\xba\xbe", "LUKS-encrypted image (magic \"LUKS\\xba\\xbe\")"),
    (0, b"WithoutFreeSpace", "Parallels image (magic \"WithoutFreeSpace\")"),
    (0, b"WithouFreSpacExt", "Parallels image (magic \"WithouFreSpacExt\")"),
    (0, b"Bochs Virtual HD Image", "Bochs image"),
    (0, b"COWD", "vmdk version 3 / ESX COW disk (magic \"COWD\")"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop image"),
    (0, b"\x1f\x8b", "gzip-compressed stream (magic 1f 8b)"),
    (0, b"\xfd7zXZ\0", "xz-compressed stream (magic fd 37 7a 58 5a 00)"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed stream (magic 28 b5 2f fd)"),
];

/// Reads the start (and, when that names nothing, the last 512 bytes) of `source` and says which format it
/// holds.
pub fn detect(source: &dyn ReadAt) -> Result<Detected> {
    let mut head = [0u8; 512];
    let got = source.read_at(0, &mut head)?;
    let found = detect_bytes(&head[..got]);
    if found != Detected::Raw || source.len() < 1024 {
        return Ok(found);
    }
    let mut tail = [0u8; 512];
    let got = source.read_at(source.len() - 512, &mut tail)?;
    Ok(detect_tail(&tail[..got], source.len()).unwrap_or(Detected::Raw))
}

/// Detection from the last 512 bytes of a source of `len` bytes whose start names no format: a fixed vhd keeps
/// its only footer there, a dmg its "koly" trailer. A fixed vhd footer must also carry a valid checksum, the fixed
/// disk type and the length of the data before it ([`super::vhd::is_fixed_footer`]), so that a raw disk whose
/// last sector merely starts with "conectix" stays raw.
pub fn detect_tail(tail: &[u8], len: u64) -> Option<Detected> {
    if tail.len() < 512 {
        return None;
    }
    if tail.starts_with(b"conectix") {
        let footer: &[u8; 512] = tail[..512].try_into().ok()?;
        return super::vhd::is_fixed_footer(footer, len.checked_sub(512)?).then_some(Detected::Vhd);
    }
    if tail.starts_with(b"koly") {
        return Some(Detected::Unsupported("Apple disk image (dmg, trailer magic \"koly\")".into()));
    }
    None
}

/// Whether `head` is a vmdk text descriptor: after comment and blank lines, a `version=1|2|3` line, which is
/// how qemu recognises descriptors that do not start with the usual "# Disk DescriptorFile" comment.
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let mut rest = head;
    loop {
        let line_end = rest.iter().position(|&b| b == b'\n');
        let line = &rest[..line_end.unwrap_or(rest.len())];
        let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
        let trimmed = trimmed.iter().position(|&b| b != b' ' && b != b'\t').map_or(&[][..], |i| &trimmed[i..]);
        if trimmed.is_empty() || trimmed[0] == b'#' {
            match line_end {
                // A comment line cut off by the end of the probe buffer says nothing either way.
                Some(end) => rest = &rest[end + 1..],
                None => return false,
            }
            continue;
        }
        return line_end.is_some() && matches!(trimmed, b"version=1" | b"version=2" | b"version=3");
    }
}

/// Detection from the first bytes of a source (at most 512 are looked at).
pub fn detect_bytes(head: &[u8]) -> Detected {
    if head.starts_with(b"QFI\xfb") {
        return match head.get(4..8) {
            Some(v) if v == [0, 0, 0, 2] || v == [0, 0, 0, 3] => Detected::Qcow2,
            Some(v) => Detected::Unsupported(format!(
                "qcow version {} (magic \"QFI\\xfb\")",
                u32::from_be_bytes([v[0], v[1], v[2], v[3]])
            )),
            None => Detected::Unsupported("truncated qcow header (magic \"QFI\\xfb\")".into()),
        };
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") || is_vmdk_descriptor(head) {
        return Detected::Vmdk;
    }
    if head.starts_with(b"vhdxfile") {
        return Detected::Vhdx;
    }
    if head.starts_with(b"conectix") {
        return Detected::Vhd;
    }
    if head.get(0x40..0x44) == Some(b"\x7f\x10\xda\xbe") {
        return Detected::Vdi;
    }
    for &(at, magic, what) in REFUSED {
        if head.get(at..at + magic.len()) == Some(magic) {
            return Detected::Unsupported(what.to_string());
        }
    }
    Detected::Raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_table() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(b"\x7f\x10\xda\xbe");
        let cases: Vec<(Vec<u8>, Detected)> = vec![
            (b"QFI\xfb\0\0\0\x03rest".to_vec(), Detected::Qcow2),
            (b"QFI\xfb\0\0\0\x02".to_vec(), Detected::Qcow2),
            (b"KDMV\x01\0\0\0".to_vec(), Detected::Vmdk),
            (b"# Disk DescriptorFile\nversion=1\n".to_vec(), Detected::Vmdk),
            (b"# comment\r\n\n  version=3\r\nCID=1".to_vec(), Detected::Vmdk),
            (b"vhdxfile\0\0".to_vec(), Detected::Vhdx),
            (b"conectix\0\0".to_vec(), Detected::Vhd),
            (vdi, Detected::Vdi),
            (vec![0u8; 512], Detected::Raw),
            (b"CD001 iso-ish".to_vec(), Detected::Raw),
            (b"# a shell script\necho version=1\n".to_vec(), Detected::Raw),
            (b"# only a comment".to_vec(), Detected::Raw),
            (b"version=1".to_vec(), Detected::Raw),
            (Vec::new(), Detected::Raw),
        ];
        for (head, want) in cases {
            assert_eq!(detect_bytes(&head), want, "{:?}", String::from_utf8_lossy(&head));
        }
        for head in
            [b"QFI\xfb\0\0\0\x01".to_vec(), b"QED\0xxxx".to_vec(), b"COWD\x01\0\0\0".to_vec(), b"\x1f\x8b\x08".to_vec()]
        {
            assert!(matches!(detect_bytes(&head), Detected::Unsupported(_)), "{head:?}");
        }
        let Detected::Unsupported(what) = detect_bytes(b"QFI\xfb\0\0\0\x01") else { unreachable!() };
        assert!(what.contains("version 1"), "{what}");
    }

    #[test]
    fn tail_magic() {
        let mut koly = vec![0u8; 512];
        koly[..4].copy_from_slice(b"koly");
        let Some(Detected::Unsupported(what)) = detect_tail(&koly, 4096) else { panic!("koly trailer not recognised") };
        assert!(what.contains("dmg") && what.contains("koly"), "{what}");
        // A "conectix" sector that is not a valid fixed-disk footer leaves the source raw.
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        assert_eq!(detect_tail(&footer, 4096), None);
        footer[60..64].copy_from_slice(&2u32.to_be_bytes());
        footer[48..56].copy_from_slice(&3584u64.to_be_bytes());
        let sum = super::super::vhd::checksum(&footer, 64);
        footer[64..68].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(detect_tail(&footer, 4096), Some(Detected::Vhd));
        assert_eq!(detect_tail(&footer, 8192), None, "current size and length disagree");
        assert_eq!(detect_tail(&footer[..100], 4096), None);
        assert_eq!(detect_tail(&[0u8; 512], 4096), None);
    }
}
