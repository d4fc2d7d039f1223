//! The vmdk text descriptor: `key=value` lines (createType, parentCID, parentFileNameHint) and extent lines
//! `ACCESS SECTORS TYPE "FILE" [OFFSET]`, as in VMware's Virtual Disk Format 5.0 and qemu's
//! `vmdk_parse_extents`. Parsing is pure; opening the files is the caller's job, after [`check_extent_name`].

use crate::error::{Error, Result};
use std::path::{Component, Path};

/// Largest descriptor read (a separate descriptor file, or the one embedded in a sparse extent).
pub const MAX_DESCRIPTOR: u64 = 64 << 10;
/// Most extents a descriptor may list (each is an open file while importing).
pub const MAX_EXTENTS: usize = 4096;

/// What an extent line says the extent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentKind {
    /// Raw data in `file`, starting `offset` sectors into it ("FLAT", or "VMFS" at offset 0).
    Flat {
        /// The extent file, relative to the descriptor's directory.
        file: String,
        /// Start of the data in the file, in sectors.
        offset: u64,
    },
    /// A hosted sparse extent ("SPARSE") in `file`.
    Sparse {
        /// The extent file, relative to the descriptor's directory.
        file: String,
    },
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Size in sectors as the line states it (sparse extents are sized by their own header, like qemu does).
    pub sectors: u64,
    /// Kind and file.
    pub kind: ExtentKind,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The createType value, if present.
    pub create_type: Option<String>,
    /// The parent named by parentFileNameHint, if any (non-empty).
    pub parent: Option<String>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
}

/// The value of a `key = "value"` line, unquoted, if `line` sets `key`.
fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let (k, v) = line.split_once('=')?;
    if k.trim() != key {
        return None;
    }
    let v = v.trim();
    Some(v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v))
}

/// Parses descriptor text. Extent lines are required only when `need_extents` (a separate descriptor file; the
/// descriptor embedded in a sparse extent describes that extent itself).
pub fn parse(text: &str, need_extents: bool) -> Result<Descriptor> {
    let mut descriptor = Descriptor { create_type: None, parent: None, extents: Vec::new() };
    for (number, raw) in text.lines().enumerate() {
        let line = raw.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(v) = value_of(line, "createType") {
            descriptor.create_type = Some(v.to_string());
        } else if let Some(v) = value_of(line, "parentFileNameHint") {
            descriptor.parent = (!v.is_empty()).then(|| v.to_string());
        } else if ["RW", "RDONLY", "NOACCESS"].iter().any(|a| line.split_whitespace().next() == Some(a)) {
            if !need_extents {
                continue;
            }
            if descriptor.extents.len() == MAX_EXTENTS {
                return Err(Error::unsupported(format!("vmdk descriptor lists more than {MAX_EXTENTS} extents")));
            }
            let extent = parse_extent_line(line)
                .map_err(|why| Error::bad_image(format!("vmdk descriptor line {}: {why}: {line:?}", number + 1)))?;
            descriptor.extents.push(extent?);
        }
    }
    if need_extents {
        if descriptor.create_type.is_none() {
            return Err(crate::bad_image!("vmdk descriptor has no createType"));
        }
        if descriptor.extents.is_empty() {
            return Err(crate::bad_image!("vmdk descriptor lists no extents"));
        }
    }
    Ok(descriptor)
}

/// Takes the next whitespace-separated word off the front of `rest`.
fn next_word<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let text = rest.trim_start();
    let end = text.find(char::is_whitespace).unwrap_or(text.len());
    let (word, after) = text.split_at(end);
    *rest = after;
    (!word.is_empty()).then_some(word)
}

/// Parses `ACCESS SECTORS TYPE "FILE" [OFFSET]`. The outer error is a malformed line; the inner one a
/// well-formed line this reader does not support.
fn parse_extent_line(line: &str) -> std::result::Result<Result<ExtentLine>, String> {
    let mut rest = line;
    let access = next_word(&mut rest).ok_or("no access mode")?;
    let sectors: u64 = next_word(&mut rest).and_then(|w| w.parse().ok()).ok_or("no sector count")?;
    let kind = next_word(&mut rest).ok_or("no extent type")?;
    let rest = rest.trim();
    let (file, tail) = match rest.strip_prefix('"') {
        Some(r) => {
            let end = r.find('"').ok_or("unterminated file name")?;
            (Some(&r[..end]), r[end + 1..].trim())
        }
        None => (None, rest),
    };
    let offset: Option<u64> =
        if tail.is_empty() { None } else { Some(tail.parse().map_err(|_| "offset is not a number")?) };
    if sectors == 0 {
        return Err("zero sectors".into());
    }
    if sectors > u64::MAX / 512 / 2 {
        return Err("sector count too large".into());
    }
    if access != "RW" {
        return Ok(Err(Error::unsupported(format!(
            "vmdk extent with access {access} is not supported (qemu ignores such extents)"
        ))));
    }
    let file = match (kind, file) {
        ("ZERO", _) => return Ok(Err(Error::unsupported("vmdk ZERO extents are not supported (qemu ignores them)"))),
        (_, None) => return Err("no file name".into()),
        (_, Some(file)) => file.to_string(),
    };
    let kind = match (kind, offset) {
        ("FLAT", Some(offset)) => ExtentKind::Flat { file, offset },
        ("FLAT", None) => return Err("FLAT extent without an offset".into()),
        ("VMFS", None) => ExtentKind::Flat { file, offset: 0 },
        ("SPARSE", None) => ExtentKind::Sparse { file },
        ("VMFS" | "SPARSE", Some(_)) => return Err(format!("{kind} extent with an offset")),
        (other, _) => return Ok(Err(Error::unsupported(format!("vmdk extent type {other} is not supported")))),
    };
    Ok(Ok(ExtentLine { sectors, kind }))
}

/// Checks that an extent file name is a plain relative path that stays inside the descriptor's directory.
pub fn check_extent_name(name: &str) -> Result<()> {
    let path = Path::new(name);
    let plain = !name.is_empty()
        && !name.contains('\0')
        && path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(Error::unsupported(format!(
            "vmdk extent file {name:?} is not a relative path inside the descriptor's directory"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const QEMU_FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=98f28136\nparentCID=ffffffff\n\
        createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\nRW 4194304 FLAT \"d-f001.vmdk\" 0\n\
        RW 1954 FLAT \"d-f002.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n";

    #[test]
    fn qemu_descriptor_parses() {
        let d = parse(QEMU_FLAT, true).unwrap();
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentFlat"));
        assert_eq!(d.parent, None);
        assert_eq!(
            d.extents,
            vec![
                ExtentLine { sectors: 4194304, kind: ExtentKind::Flat { file: "d-f001.vmdk".into(), offset: 0 } },
                ExtentLine { sectors: 1954, kind: ExtentKind::Flat { file: "d-f002.vmdk".into(), offset: 0 } },
            ]
        );
    }

    #[test]
    fn sparse_vmfs_spaces_and_parent() {
        let text = "createType = \"twoGbMaxExtentSparse\"\r\nparentFileNameHint=\"base.vmdk\"\r\n\
            RW 100 SPARSE \"my disk-s001.vmdk\"\r\nRW 8 VMFS \"flat.bin\"\r\nRW 8  FLAT  \"f.bin\"  7\r\n";
        let d = parse(text, true).unwrap();
        assert_eq!(d.parent.as_deref(), Some("base.vmdk"));
        assert_eq!(
            d.extents.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
            vec![
                ExtentKind::Sparse { file: "my disk-s001.vmdk".into() },
                ExtentKind::Flat { file: "flat.bin".into(), offset: 0 },
                ExtentKind::Flat { file: "f.bin".into(), offset: 7 },
            ]
        );
        assert_eq!(parse("parentFileNameHint=\"\"\ncreateType=\"x\"\nRW 1 SPARSE \"a\"", true).unwrap().parent, None);
    }

    #[test]
    fn malformed_and_unsupported_lines() {
        let cases: Vec<(&str, ErrorKind)> = vec![
            ("RW 10 FLAT \"a\"", ErrorKind::BadImage),
            ("RW 10 SPARSE \"a\" 5", ErrorKind::BadImage),
            ("RW 10 FLAT \"a", ErrorKind::BadImage),
            ("RW 0 FLAT \"a\" 0", ErrorKind::BadImage),
            ("RW x FLAT \"a\" 0", ErrorKind::BadImage),
            ("RW 10 FLAT \"a\" -1", ErrorKind::BadImage),
            ("RW 10 FLAT a 0", ErrorKind::BadImage),
            ("RW 99999999999999999 FLAT \"a\" 0", ErrorKind::BadImage),
            ("RDONLY 10 FLAT \"a\" 0", ErrorKind::Unsupported),
            ("NOACCESS 10 FLAT \"a\" 0", ErrorKind::Unsupported),
            ("RW 10 ZERO", ErrorKind::Unsupported),
            ("RW 10 VMFSSPARSE \"a\"", ErrorKind::Unsupported),
            ("RW 10 SESPARSE \"a\"", ErrorKind::Unsupported),
        ];
        for (line, kind) in cases {
            let text = format!("createType=\"monolithicFlat\"\n{line}\n");
            let err = parse(&text, true).unwrap_err();
            assert_eq!(err.kind(), kind, "{line}: {err}");
        }
        assert!(parse("RW 10 FLAT \"a\" 0\n", true).is_err());
        assert!(parse("createType=\"monolithicFlat\"\n", true).is_err());
        // The embedded descriptor of a sparse extent needs neither.
        assert!(parse("parentCID=ffffffff\n", false).is_ok());
    }

    #[test]
    fn too_many_extents() {
        let mut text = String::from("createType=\"twoGbMaxExtentFlat\"\n");
        for i in 0..=MAX_EXTENTS {
            text.push_str(&format!("RW 1 FLAT \"f{i}\" 0\n"));
        }
        assert_eq!(parse(&text, true).unwrap_err().kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn extent_names_stay_inside_the_directory() {
        for ok in ["a.vmdk", "sub/a.vmdk", "./a.vmdk", "my disk.vmdk"] {
            assert!(check_extent_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../a.vmdk", "sub/../../a", "a\0b"] {
            assert!(check_extent_name(bad).is_err(), "{bad:?}");
        }
    }
}
