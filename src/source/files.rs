//! The files an image names (qcow2 backing files, vmdk extents), opened on the format's behalf. Formats never
//! open a path themselves: they ask an [`Opener`] for a name as the image writes it, and get its bytes back.
//!
//! [`LocalFiles`] is the opener for an image on the local filesystem. Unless told to follow names anywhere, it
//! keeps the whole chain inside the top image's directory: with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! from a handle on that directory, so the kernel refuses `..` and symlinks that lead out in the same call that
//! opens the file (no window between checking a path and opening it). Kernels without openat2 (before 5.6) get
//! the canonicalise-then-check fallback.

use super::{FileSource, ReadAt};
use crate::error::{Error, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// A file an opener found.
pub struct Named {
    /// Its bytes.
    pub source: Arc<dyn ReadAt>,
    /// Where it is, for messages.
    pub path: PathBuf,
    /// The opener for names written inside it (resolved against its own directory, within the same bounds).
    pub opener: Arc<dyn Opener>,
}

/// Opens files named inside an image.
pub trait Opener: Send + Sync {
    /// Opens `name`, as written in the image, relative to the image's directory; the error says why not, in
    /// words that complete "image has a backing file NAME: …".
    fn open(&self, name: &str) -> std::result::Result<Named, String>;
}

/// Files beside a local image.
pub struct LocalFiles {
    /// The directory every file must stay inside, canonical.
    root: PathBuf,
    /// A handle on it, the base of every confined open.
    root_fd: Arc<OwnedFd>,
    /// The directory names are resolved against, relative to `root` (empty for `root` itself).
    dir: PathBuf,
    /// Follow names anywhere (absolute paths, `..`, symlinks out).
    anywhere: bool,
}

impl LocalFiles {
    /// The opener for names inside the image at `image`: relative to its directory (`.` for a bare file name),
    /// confined to it unless `anywhere`.
    pub fn beside(image: &Path, anywhere: bool) -> Result<LocalFiles> {
        match image.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => Self::in_dir(parent, anywhere),
            _ => Self::in_dir(Path::new("."), anywhere),
        }
    }

    /// The opener for names relative to `dir`, confined to it unless `anywhere`.
    pub fn in_dir(dir: &Path, anywhere: bool) -> Result<LocalFiles> {
        let root =
            std::fs::canonicalize(dir).map_err(|e| Error::io("resolving the image's directory", e).at_path(dir))?;
        let handle = File::open(&root).map_err(|e| Error::io("opening the image's directory", e).at_path(&root))?;
        Ok(LocalFiles { root, root_fd: Arc::new(OwnedFd::from(handle)), dir: PathBuf::new(), anywhere })
    }

    fn child(&self, opened: &Path) -> LocalFiles {
        let dir = opened.parent().unwrap_or(&self.root);
        LocalFiles {
            root: self.root.clone(),
            root_fd: self.root_fd.clone(),
            dir: dir.strip_prefix(&self.root).map(Path::to_path_buf).unwrap_or_default(),
            anywhere: self.anywhere,
        }
    }

    /// Opens `name` anywhere: absolute as written, relative against the current directory of the chain.
    fn open_anywhere(&self, name: &Path) -> std::result::Result<(File, PathBuf), String> {
        let path = if name.is_absolute() { name.to_path_buf() } else { self.root.join(&self.dir).join(name) };
        let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let canonical = std::fs::canonicalize(&path).unwrap_or(path);
        Ok((file, canonical))
    }

    /// Opens `name` so that it cannot leave `root`, by `..` or by a symlink.
    fn open_confined(&self, name: &Path) -> std::result::Result<(File, PathBuf), String> {
        let outside = "(pass --allow-backing-outside to follow it)";
        if name.is_absolute() {
            return Err(format!("an absolute path leaves the image's directory {outside}"));
        }
        let relative = self.dir.join(name);
        match openat2_beneath(&self.root_fd, &relative) {
            Ok(file) => {
                let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                    .unwrap_or_else(|_| self.root.join(&relative));
                Ok((file, path))
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                Err(escape(&self.root, &self.root.join(&self.dir), name))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                let path = confined_path(&self.root, &self.root.join(&self.dir), name)?;
                let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                Ok((file, path))
            }
            Err(e) => Err(format!("cannot resolve {}: {e}", self.root.join(&relative).display())),
        }
    }
}

impl Opener for LocalFiles {
    fn open(&self, name: &str) -> std::result::Result<Named, String> {
        check_name(name)?;
        let (file, path) =
            if self.anywhere { self.open_anywhere(Path::new(name))? } else { self.open_confined(Path::new(name))? };
        let source = FileSource::from_file(file, &path).map_err(|e| e.to_string())?;
        let opener = Arc::new(self.child(&path));
        Ok(Named { source: Arc::new(source), path, opener })
    }
}

/// Refuses names that are not local file names: empty, with a NUL byte, or with a protocol prefix (`nbd:`,
/// `http://`, `json:`), which qemu would read as a network or pseudo protocol.
fn check_name(name: &str) -> std::result::Result<(), String> {
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
    Ok(())
}

/// `openat2(dir, path, O_RDONLY | O_CLOEXEC, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: EXDEV when the path
/// leads out of `dir`, ENOSYS on kernels before 5.6.
fn openat2_beneath(dir: &OwnedFd, path: &Path) -> std::io::Result<File> {
    let path = if path.as_os_str().is_empty() { Path::new(".") } else { path };
    let text = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; all-zero is its documented "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: every pointer argument points to a live, properly sized value for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            text.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// The fallback without openat2: resolves relative `name` against `dir` and checks, after canonicalising
/// (resolving `..` and symlinks), that it lies inside `root`. The file must exist.
fn confined_path(root: &Path, dir: &Path, name: &Path) -> std::result::Result<PathBuf, String> {
    let outside = "(pass --allow-backing-outside to follow it)";
    let joined = dir.join(name);
    let target = match std::fs::canonicalize(&joined) {
        Ok(target) => target,
        Err(e) => {
            // Say "outside" for a missing file whose name already climbs out, rather than "not found", so the
            // refusal does not depend on what exists outside.
            if climbs_out(root, dir, name) {
                return Err(escape(root, dir, name));
            }
            return Err(format!("cannot resolve {}: {e}", joined.display()));
        }
    };
    if !target.starts_with(root) {
        return Err(format!(
            "{:?} resolves to {}, outside the image's directory {} {outside}",
            name.display().to_string(),
            target.display(),
            root.display()
        ));
    }
    Ok(target)
}

/// The refusal of a name that leads out of `root`: by its `..` components, or through a symlink.
fn escape(root: &Path, dir: &Path, name: &Path) -> String {
    let shown = name.display().to_string();
    let outside = "(pass --allow-backing-outside to follow it)";
    if climbs_out(root, dir, name) {
        format!("{shown:?} leaves the image's directory {} {outside}", root.display())
    } else {
        format!("{shown:?} resolves outside the image's directory {} {outside}", root.display())
    }
}

/// Whether `name`'s `..` components alone take `dir/name` out of `root`.
fn climbs_out(root: &Path, dir: &Path, name: &Path) -> bool {
    name.components().any(|c| c == Component::ParentDir) && !lexically_inside(root, dir, name)
}

/// Whether `dir/name` stays inside `root` when `..` is applied lexically (used only to word a refusal).
fn lexically_inside(root: &Path, dir: &Path, name: &Path) -> bool {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    let mut parts: Vec<_> = dir.components().collect();
    for c in name.components() {
        match c {
            Component::ParentDir => {
                parts.pop();
            }
            Component::Normal(_) => parts.push(c),
            _ => {}
        }
    }
    parts.iter().collect::<PathBuf>().starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_protocols_are_refused() {
        for name in ["nbd:localhost:10809", "http://example/base", "json:{}", "file:base.raw", "", "a\0b"] {
            assert!(check_name(name).is_err(), "{name}");
        }
        for name in ["base.qcow2", "./a:b", "/abs/base.raw"] {
            assert!(check_name(name).is_ok(), "{name}");
        }
    }

    fn opened(files: &dyn Opener, name: &str) -> std::result::Result<PathBuf, String> {
        files.open(name).map(|named| named.path)
    }

    #[test]
    fn names_stay_inside_the_image_directory() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("images");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("top.qcow2"), b"x").unwrap();
        std::fs::write(dir.join("base.raw"), b"x").unwrap();
        std::fs::write(dir.join("sub/deep.raw"), b"x").unwrap();
        std::fs::write(top.path().join("secret.raw"), b"x").unwrap();
        std::os::unix::fs::symlink("../secret.raw", dir.join("escape.raw")).unwrap();
        std::os::unix::fs::symlink("sub/deep.raw", dir.join("inside.raw")).unwrap();
        let files = LocalFiles::beside(&dir.join("top.qcow2"), false).unwrap();
        let canonical = std::fs::canonicalize(&dir).unwrap();
        for (name, want) in [
            ("base.raw", "base.raw"),
            ("./base.raw", "base.raw"),
            ("sub/../base.raw", "base.raw"),
            ("inside.raw", "sub/deep.raw"),
            ("sub/deep.raw", "sub/deep.raw"),
        ] {
            assert_eq!(opened(&files, name).unwrap(), canonical.join(want), "{name}");
        }
        for (name, needle) in [
            ("../secret.raw", "leaves the image's directory"),
            ("../missing.raw", "leaves the image's directory"),
            ("sub/../../secret.raw", "leaves the image's directory"),
            ("escape.raw", "outside the image's directory"),
            ("/etc/passwd", "absolute path"),
            ("missing.raw", "cannot resolve"),
        ] {
            let why = opened(&files, name).unwrap_err();
            assert!(why.contains(needle), "{name}: {why}");
        }
        // Deeper in a chain, names resolve against the backing file's directory but stay under the root.
        let deeper = files.open("sub/deep.raw").unwrap().opener;
        assert_eq!(opened(deeper.as_ref(), "../base.raw").unwrap(), canonical.join("base.raw"));
        assert!(opened(deeper.as_ref(), "../../secret.raw").is_err());
        // Following names anywhere opens all of them.
        let anywhere = LocalFiles::beside(&dir.join("top.qcow2"), true).unwrap();
        for name in ["../secret.raw", "escape.raw", "/etc/passwd"] {
            assert!(opened(&anywhere, name).is_ok(), "{name}");
        }
        // The canonicalising fallback words its refusals the same way.
        assert!(confined_path(&canonical, &canonical, Path::new("escape.raw")).unwrap_err().contains("outside"));
        assert!(confined_path(&canonical, &canonical, Path::new("../missing.raw")).unwrap_err().contains("leaves"));
    }

    #[test]
    fn a_bare_image_name_resolves_against_the_current_directory() {
        let files = LocalFiles::beside(Path::new("image.qcow2"), false).unwrap();
        assert_eq!(files.root, std::fs::canonicalize(".").unwrap());
    }
}
