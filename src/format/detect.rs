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
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop image"),
    (0, b"KDMV", "vmdk (magic \"KDMV\")"),
    (0, b"# Disk DescriptorFile", "vmdk descriptor"),
    (0, b"vhdxfile", "vhdx (magic \"vhdxfile\")"),
    (0, b"conectix", "vhd (magic \"conectix\")"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi (magic 0xbeda107f at 0x40)"),
    (0, b"\x1f\x8b", "gzip-compressed stream (magic 1f 8b)"),
    (0, b"\xfd7zXZ\0", "xz-compressed stream (magic fd 37 7a 58 5a 00)"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed stream (magic 28 b5 2f fd)"),
];

/// Reads the start of `source` and says which format it holds.
pub fn detect(source: &dyn ReadAt) -> Result<Detected> {
    let mut head = [0u8; 512];
    let got = source.read_at(0, &mut head)?;
    Ok(detect_bytes(&head[..got]))
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
            (vec![0u8; 512], Detected::Raw),
            (b"CD001 iso-ish".to_vec(), Detected::Raw),
            (Vec::new(), Detected::Raw),
        ];
        for (head, want) in cases {
            assert_eq!(detect_bytes(&head), want, "{head:?}");
        }
        for head in [
            b"QFI\xfb\0\0\0\x01".to_vec(),
            b"QED\0xxxx".to_vec(),
            vdi,
            b"\x1f\x8b\x08".to_vec(),
        ] {
            assert!(matches!(detect_bytes(&head), Detected::Unsupported(_)), "{head:?}");
        }
        let Detected::Unsupported(what) = detect_bytes(b"QFI\xfb\0\0\0\x01") else {
            unreachable!()
        };
        assert!(what.contains("version 1"), "{what}");
    }
}
