//! Image formats: turn a source into extents of guest (virtual disk) space.
//!
//! A format never touches a file descriptor: it reads its metadata through [`ReadAt`] and answers
//! [`Image::map`] with [`Extent`]s saying, for each guest range, whether it reads as zeros, is stored verbatim
//! somewhere in a source, or lies inside a compressed unit. The pipeline does the data I/O.

mod block_table;
pub mod detect;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use detect::{detect, Detected};

use crate::error::{Error, Result};
use crate::source::ReadAt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Index of a source in [`Image::sources`]: 0 is the image itself, higher ones its backing chain.
pub type SourceId = usize;

/// Decompression applied to a compressed unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Raw deflate (RFC 1951), as in qcow2's default compression.
    Deflate,
    /// zlib-wrapped deflate (RFC 1950), as in vmdk streamOptimized grains.
    Zlib,
    /// A zstd frame, as in qcow2 with compression_type=zstd.
    Zstd,
}

/// A compressed unit (a qcow2 compressed cluster, a vmdk grain) and the part of it an extent covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    /// Source holding the compressed bytes.
    pub source: SourceId,
    /// Offset of the compressed bytes in the source.
    pub offset: u64,
    /// Number of compressed bytes to read (may run past the end of the source; the read is then short).
    pub src_len: u64,
    /// Size the unit decompresses to.
    pub unit_len: u64,
    /// Offset inside the decompressed unit at which this extent starts.
    pub skip: u64,
    /// How the unit is compressed.
    pub codec: Codec,
}

/// Where the bytes of a guest range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The range reads as zeros.
    Zero,
    /// The range is stored verbatim at `offset` in `source`.
    Data {
        /// Source holding the bytes.
        source: SourceId,
        /// Offset of the first byte in that source.
        offset: u64,
    },
    /// The range is part of a compressed unit.
    Compressed(Compressed),
}

/// A run of guest space with one kind of content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub guest: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Where the bytes come from.
    pub content: Content,
}

impl Extent {
    /// Guest offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.guest + self.len
    }

    /// The part of this extent inside guest `[start, end)`, which must overlap it.
    pub fn clip(&self, start: u64, end: u64) -> Extent {
        let from = start.max(self.guest);
        let to = end.min(self.end());
        let shift = from - self.guest;
        let content = match self.content {
            Content::Zero => Content::Zero,
            Content::Data { source, offset } => Content::Data { source, offset: offset + shift },
            Content::Compressed(unit) => Content::Compressed(Compressed { skip: unit.skip + shift, ..unit }),
        };
        Extent { guest: from, len: to - from, content }
    }
}

/// Appends `extent` to `out`, merging it into the previous one when both are zeros or both are contiguous
/// verbatim data from the same source.
pub fn push_extent(out: &mut Vec<Extent>, extent: Extent) {
    if extent.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end() == extent.guest {
            match (&last.content, &extent.content) {
                (Content::Zero, Content::Zero) => {
                    last.len += extent.len;
                    return;
                }
                (Content::Data { source: a, offset: o }, Content::Data { source: b, offset: p })
                    if a == b && o + last.len == *p =>
                {
                    last.len += extent.len;
                    return;
                }
                _ => {}
            }
        }
    }
    out.push(extent);
}

/// An opened disk image.
pub trait Image: Send {
    /// Format name for logs ("qcow2", "raw").
    fn format_name(&self) -> &'static str;

    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// The sources extents refer to, indexed by [`SourceId`].
    fn sources(&self) -> Vec<Arc<dyn ReadAt>>;

    /// Appends to `out` extents that exactly cover guest `[offset, offset + len)`, in guest order. The range lies
    /// within the virtual size. May read metadata from the sources.
    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()>;
}

/// How backing files may be followed.
///
/// By default a backing file (and a vmdk extent file) must stay inside the image's directory: its name is resolved
/// against `base_dir`, canonicalised (following `..` and symlinks), and must land under `root` (or `base_dir`
/// for the top image). Protocol prefixes (`nbd:`, `http://`, `json:`) are never followed.
#[derive(Debug, Clone, Default)]
pub struct BackingPolicy {
    /// Whether backing files may be read at all.
    pub allow: bool,
    /// Directory relative backing names are resolved against (the image's directory); `None` for sources that
    /// are not local files, where backing files are always refused.
    pub base_dir: Option<PathBuf>,
    /// Directory every file of the chain must stay inside; `None` means `base_dir` (set for images deeper in a
    /// chain, so a backing file in a subdirectory cannot climb above the top image's directory).
    pub root: Option<PathBuf>,
    /// Follow names that leave the image's directory: absolute paths, `..` and symlinks pointing elsewhere.
    pub allow_outside: bool,
}

/// Longest backing chain followed; deeper chains are refused rather than recursed into.
pub const MAX_BACKING_DEPTH: usize = 16;

/// Opens the image stored in `source`, detecting its format from the header.
pub fn open(source: Arc<dyn ReadAt>, backing: &BackingPolicy) -> Result<Box<dyn Image>> {
    open_at_depth(source, backing, 0)
}

fn open_at_depth(source: Arc<dyn ReadAt>, backing: &BackingPolicy, depth: usize) -> Result<Box<dyn Image>> {
    match detect(source.as_ref())? {
        Detected::Raw => Ok(Box::new(raw::RawImage::new(source))),
        Detected::Qcow2 => Ok(Box::new(qcow2::Qcow2Image::open(source, backing, depth)?)),
        Detected::Vhd => Ok(Box::new(vhd::VhdImage::open(source)?)),
        Detected::Vdi => Ok(Box::new(vdi::VdiImage::open(source)?)),
        Detected::Vhdx => Ok(Box::new(vhdx::VhdxImage::open(source)?)),
        Detected::Vmdk => Ok(Box::new(vmdk::VmdkImage::open(source, backing)?)),
        Detected::Unsupported(what) => {
            Err(Error::unsupported(format!("unsupported image format: {what}")).at_path(source.name()))
        }
    }
}

/// Resolves and opens a backing file named inside an image, applying `policy`. `format_hint` is the format the
/// image names for it ("raw", "qcow2"), if any; `name_offset` is where the image stores the name (named in
/// refusals).
pub fn open_backing(
    image_name: &str,
    backing_name: &str,
    format_hint: Option<&str>,
    name_offset: u64,
    policy: &BackingPolicy,
    depth: usize,
) -> Result<Box<dyn Image>> {
    let refuse = |why: &str| {
        Error::unsupported(format!("image has a backing file {backing_name:?}{why}"))
            .at_offset(name_offset)
            .at_path(image_name)
    };
    if !policy.allow {
        return Err(refuse(" (pass --allow-backing to read it)"));
    }
    if depth + 1 >= MAX_BACKING_DEPTH {
        return Err(refuse(&format!(": backing chain deeper than {MAX_BACKING_DEPTH}")));
    }
    let Some(base_dir) = &policy.base_dir else {
        return Err(refuse(": backing files are only followed for local images"));
    };
    let path = resolve_backing_path(policy, base_dir, backing_name).map_err(|why| refuse(&format!(": {why}")))?;
    let source: Arc<dyn ReadAt> = Arc::new(crate::source::FileSource::open(&path)?);
    let child_policy = BackingPolicy {
        allow: true,
        base_dir: path.parent().map(Path::to_path_buf),
        root: Some(policy.root.clone().unwrap_or_else(|| base_dir.clone())),
        allow_outside: policy.allow_outside,
    };
    let image = open_at_depth(source, &child_policy, depth + 1)?;
    if let Some(hint) = format_hint {
        if hint != image.format_name() {
            return Err(refuse(&format!(": named as {hint} but its header says {}", image.format_name())));
        }
    }
    Ok(image)
}

/// Resolves a backing file name against the image's directory, refusing protocol prefixes (`nbd:`, `http://`,
/// `json:`), which qemu would interpret as network or pseudo protocols, not files, and, unless
/// `policy.allow_outside`, any name that leaves the directory (see [`confined_path`]).
fn resolve_backing_path(policy: &BackingPolicy, base_dir: &Path, name: &str) -> std::result::Result<PathBuf, String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.contains('\0') {
        return Err("the name contains a NUL byte".into());
    }
    if let Some((prefix, _)) = name.split_once(':') {
        if !prefix.contains('/') {
            return Err(format!("protocol prefix {prefix:?} is not a local file"));
        }
    }
    let path = Path::new(name);
    if policy.allow_outside {
        return Ok(if path.is_absolute() { path.to_path_buf() } else { base_dir.join(path) });
    }
    if path.is_absolute() {
        return Err("an absolute path leaves the image's directory (pass --allow-backing-outside to follow it)".into());
    }
    let root = policy.root.as_deref().unwrap_or(base_dir);
    confined_path(root, base_dir, path)
}

/// Resolves relative `name` against `dir` and checks, after canonicalising (resolving `..` and symlinks), that it
/// lies inside `root`: the file must exist, and a name that climbs out of `root` or a symlink that points out
/// of it is refused. Returns the canonical path, so the file opened is the file checked.
pub fn confined_path(root: &Path, dir: &Path, name: &Path) -> std::result::Result<PathBuf, String> {
    let outside = "(pass --allow-backing-outside to follow it)";
    let root = std::fs::canonicalize(root).map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
    let joined = dir.join(name);
    let target = match std::fs::canonicalize(&joined) {
        Ok(target) => target,
        Err(e) => {
            // Say "leaves the directory" for a missing file whose name already climbs out, rather than
            // "not found", so the refusal does not depend on what exists outside.
            if name.components().any(|c| c == std::path::Component::ParentDir) && !lexically_inside(&root, dir, name) {
                return Err(format!("{:?} leaves the image's directory {outside}", name.display().to_string()));
            }
            return Err(format!("cannot resolve {}: {e}", joined.display()));
        }
    };
    if !target.starts_with(&root) {
        return Err(format!(
            "{:?} resolves to {}, outside the image's directory {} {outside}",
            name.display().to_string(),
            target.display(),
            root.display()
        ));
    }
    Ok(target)
}

/// Whether `dir/name` stays inside `root` when `..` is applied lexically (used only to word a refusal).
fn lexically_inside(root: &Path, dir: &Path, name: &Path) -> bool {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    let mut parts: Vec<_> = dir.components().collect();
    for c in name.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::Normal(_) => parts.push(c),
            _ => {}
        }
    }
    parts.iter().collect::<PathBuf>().starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(guest: u64, len: u64, offset: u64) -> Extent {
        Extent { guest, len, content: Content::Data { source: 0, offset } }
    }

    #[test]
    fn adjacent_extents_merge_only_when_contiguous() {
        let mut out = Vec::new();
        push_extent(&mut out, data(0, 10, 100));
        push_extent(&mut out, data(10, 10, 110));
        push_extent(&mut out, data(20, 10, 500));
        push_extent(&mut out, Extent { guest: 30, len: 5, content: Content::Zero });
        push_extent(&mut out, Extent { guest: 35, len: 5, content: Content::Zero });
        push_extent(&mut out, Extent { guest: 40, len: 0, content: Content::Zero });
        assert_eq!(
            out,
            vec![data(0, 20, 100), data(20, 10, 500), Extent { guest: 30, len: 10, content: Content::Zero }]
        );
    }

    #[test]
    fn clipping_shifts_source_offsets() {
        assert_eq!(data(100, 50, 1000).clip(120, 400), data(120, 30, 1020));
        let unit = Compressed { source: 0, offset: 7, src_len: 9, unit_len: 64, skip: 0, codec: Codec::Zstd };
        let whole = Extent { guest: 0, len: 64, content: Content::Compressed(unit) };
        let part = whole.clip(16, 32);
        assert_eq!(part.guest, 16);
        assert_eq!(part.len, 16);
        assert_eq!(part.content, Content::Compressed(Compressed { skip: 16, ..unit }));
    }

    /// A policy confined to `dir`.
    fn confined(dir: &Path) -> BackingPolicy {
        BackingPolicy { allow: true, base_dir: Some(dir.to_path_buf()), root: None, allow_outside: false }
    }

    #[test]
    fn backing_names_with_protocols_are_refused() {
        let base = Path::new("/images");
        let free = BackingPolicy { allow_outside: true, ..confined(base) };
        assert_eq!(resolve_backing_path(&free, base, "base.qcow2").unwrap(), Path::new("/images/base.qcow2"));
        assert_eq!(resolve_backing_path(&free, base, "/abs/base.raw").unwrap(), Path::new("/abs/base.raw"));
        assert_eq!(resolve_backing_path(&free, base, "./a:b").unwrap(), Path::new("/images/./a:b"));
        for name in ["nbd:localhost:10809", "http://example/base", "json:{}", "file:base.raw", "", "a\0b"] {
            assert!(resolve_backing_path(&free, base, name).is_err(), "{name}");
            assert!(resolve_backing_path(&confined(base), base, name).is_err(), "{name}");
        }
    }

    #[test]
    fn backing_names_stay_inside_the_image_directory() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("images");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("base.raw"), b"x").unwrap();
        std::fs::write(dir.join("sub/deep.raw"), b"x").unwrap();
        std::fs::write(top.path().join("secret.raw"), b"x").unwrap();
        std::os::unix::fs::symlink("../secret.raw", dir.join("escape.raw")).unwrap();
        std::os::unix::fs::symlink("sub/deep.raw", dir.join("inside.raw")).unwrap();
        let policy = confined(&dir);
        let canonical = std::fs::canonicalize(&dir).unwrap();
        for (name, want) in [
            ("base.raw", "base.raw"),
            ("./base.raw", "base.raw"),
            ("sub/../base.raw", "base.raw"),
            ("inside.raw", "sub/deep.raw"),
            ("sub/deep.raw", "sub/deep.raw"),
        ] {
            assert_eq!(resolve_backing_path(&policy, &dir, name).unwrap(), canonical.join(want), "{name}");
        }
        for (name, needle) in [
            ("../secret.raw", "outside the image's directory"),
            ("../missing.raw", "leaves the image's directory"),
            ("sub/../../secret.raw", "outside the image's directory"),
            ("escape.raw", "outside the image's directory"),
            ("/etc/passwd", "absolute path"),
            ("missing.raw", "cannot resolve"),
        ] {
            let why = resolve_backing_path(&policy, &dir, name).unwrap_err();
            assert!(why.contains(needle), "{name}: {why}");
        }
        // Deeper in a chain, names resolve against the backing file's directory but stay under the root.
        let deeper = BackingPolicy { root: Some(dir.clone()), ..confined(&dir.join("sub")) };
        assert_eq!(resolve_backing_path(&deeper, &dir.join("sub"), "../base.raw").unwrap(), canonical.join("base.raw"));
        assert!(resolve_backing_path(&deeper, &dir.join("sub"), "../../secret.raw").is_err());
        // The explicit flag follows all of them.
        let free = BackingPolicy { allow_outside: true, ..policy };
        for name in ["../secret.raw", "escape.raw", "/etc/passwd"] {
            assert!(resolve_backing_path(&free, &dir, name).is_ok(), "{name}");
        }
    }
}
