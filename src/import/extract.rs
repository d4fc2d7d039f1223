//! Tar members extracted into a data directory (the archive job, [`super::archive`], feeds it the plain tar
//! stream), with a record of what it created so a failed import removes only that.
//!
//! Nothing is ever created outside the data directory and no link is ever followed while extracting: every path
//! is walked one component at a time from a handle on the data directory with `O_NOFOLLOW`, so a symlink placed
//! by an earlier member cannot redirect a later one. Members with `..` components are refused, leading slashes are
//! stripped (as GNU tar does), symlinks whose target would leave the data directory are skipped with a warning, and
//! hard links must point at an earlier member. Devices and FIFOs are skipped (an unprivileged pod cannot make
//! them). Modes are kept (without set-id bits), owners are not (CDI runs tar with `--no-same-owner`).
//!
//! File data goes through the write-behind window paced by the cgroup governor, and all-zero blocks stay holes, so
//! extraction is as bounded as an image import.

use crate::error::{Error, ErrorKind, Result};
use crate::sink::paced::PacedFile;
use crate::sink::paced::Pacing;
use crate::source::tar::{Entry, Kind, TarReader};
use nix::fcntl::AtFlags;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, mkdirat, Mode};
use nix::unistd::{linkat, symlinkat, unlinkat, UnlinkatFlags};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What an extraction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub directories: u64,
    /// Symbolic and hard links created.
    pub links: u64,
    /// Members skipped (escaping links, devices, FIFOs).
    pub skipped: u64,
    /// File bytes written as data (holes excluded).
    pub bytes_written: u64,
}

impl std::fmt::Display for Extracted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "extracted {} files, {} directories, {} links ({} members skipped), {} bytes written",
            self.files, self.directories, self.links, self.skipped, self.bytes_written
        )
    }
}

/// Bytes of member names [`Created`] keeps at most. It keeps only the outermost paths an extraction created
/// (what lies inside a directory it created is its own too), so this is reached only by an archive that puts
/// tens of thousands of members straight into directories that were there before.
const CREATED_RECORD_CAP: usize = 4 << 20;

/// What an extraction created in the data directory, so that a failed import removes that and nothing else.
pub struct Created {
    /// Outermost created paths, as `/`-joined member components.
    paths: HashSet<Vec<u8>>,
    /// Bytes of names in `paths`.
    bytes: usize,
    /// The record went past [`CREATED_RECORD_CAP`]: what was created after that is known only as top-level
    /// names that were not there before.
    overflowed: bool,
    /// Top-level names in the data directory before the import.
    before: HashSet<OsString>,
}

impl Created {
    /// An empty record for an extraction into `dir`, with the names already there.
    pub fn before(dir: &Path) -> Result<Self> {
        let listing = |e| Error::io("listing the data directory", e).at_path(dir);
        let mut before = HashSet::new();
        for entry in std::fs::read_dir(dir).map_err(listing)? {
            before.insert(entry.map_err(listing)?.file_name());
        }
        Ok(Created { paths: HashSet::new(), bytes: 0, overflowed: false, before })
    }

    /// Notes that the path `components` was created, unless a directory above it was.
    fn note(&mut self, components: &[Vec<u8>]) {
        let mut joined = Vec::new();
        for (depth, name) in components.iter().enumerate() {
            if depth > 0 {
                joined.push(b'/');
            }
            joined.extend_from_slice(name);
            if depth + 1 < components.len() && self.paths.contains(&joined) {
                return;
            }
        }
        if self.bytes + joined.len() > CREATED_RECORD_CAP {
            self.overflowed = true;
            return;
        }
        self.bytes += joined.len();
        self.paths.insert(joined);
    }

    /// Removes what the extraction created under `dir`, never following a link; what cannot be removed is
    /// logged (the failure that led here is the error to report).
    pub fn remove(&self, dir: &Path) {
        let root = match open_dir_handle(None, dir.as_os_str()) {
            Ok(root) => root,
            Err(e) => return log::warn!("{}: cannot open to remove what was extracted: {e}", dir.display()),
        };
        let mut removed = 0u64;
        for path in &self.paths {
            let components: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
            match remove_at(&root, &components) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => log::warn!("{}: cannot remove {}: {e}", dir.display(), String::from_utf8_lossy(path)),
            }
        }
        if self.overflowed {
            // Past the record's cap: what is new at the top level goes; members put into directories that
            // were there before stay, and are named as such.
            let listing = std::fs::read_dir(dir).into_iter().flatten().flatten();
            for name in listing.map(|entry| entry.file_name()).filter(|name| !self.before.contains(name)) {
                match remove_at(&root, &[name.as_bytes()]) {
                    Ok(true) => removed += 1,
                    Ok(false) => {}
                    Err(e) => log::warn!("{}: cannot remove {}: {e}", dir.display(), name.to_string_lossy()),
                }
            }
            log::warn!(
                "{}: more members were extracted into directories that existed before than this import records; \
                 those are left",
                dir.display()
            );
        }
        log::info!("{}: removed {removed} extracted paths; what was there before stays", dir.display());
    }
}

/// Removes the path `components` below `root` (a whole tree for a directory) without following a link on the
/// way. Returns false when nothing is there.
fn remove_at(root: &OwnedFd, components: &[&[u8]]) -> std::io::Result<bool> {
    let Some((name, parents)) = components.split_last() else { return Ok(false) };
    let mut parent = root.try_clone()?;
    for part in parents {
        parent = match open_dir_handle(Some(&parent), OsStr::from_bytes(part)) {
            Ok(next) => next,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)) => return Ok(false),
            Err(e) => return Err(e),
        };
    }
    remove_entry(&parent, OsStr::from_bytes(name))
}

/// Names read at a time while emptying a directory.
const REMOVAL_BATCH: usize = 1024;

/// Removes `name` in `parent`: unlinked, or emptied (depth first) and removed when it is a directory.
fn remove_entry(parent: &OwnedFd, name: &OsStr) -> std::io::Result<bool> {
    match unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(true),
        Err(nix::errno::Errno::ENOENT) => return Ok(false),
        Err(nix::errno::Errno::EISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    let dir = open_dir_handle(Some(parent), name)?;
    // An extracted directory may be read-only (its mode from the archive): ours to empty all the same.
    fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(0o700))?;
    loop {
        // Names in batches, read again from the start each time: a directory of a million members costs a
        // batch of memory, not a million names.
        let listing = nix::dir::Dir::openat(
            Some(dir.as_raw_fd()),
            ".",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut listing = listing;
        let batch: Vec<OsString> = listing
            .iter()
            .filter_map(|entry| entry.ok())
            .map(|entry| OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string())
            .filter(|name| name.as_bytes() != b"." && name.as_bytes() != b"..")
            .take(REMOVAL_BATCH)
            .collect();
        if batch.is_empty() {
            break;
        }
        for child in &batch {
            remove_entry(&dir, child)?;
        }
    }
    unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::RemoveDir)?;
    Ok(true)
}

/// Extracts the tar stream `reader` into `dir`, noting in `created` every path it creates. `on_progress` is
/// called with the bytes consumed from the stream after each member and each data chunk.
pub fn extract(
    reader: impl Read,
    dir: &Path,
    pacing: &Pacing,
    created: &mut Created,
    mut on_progress: impl FnMut(u64),
) -> Result<Extracted> {
    let root =
        open_dir_handle(None, dir.as_os_str()).map_err(|e| Error::io("opening the data directory", e).at_path(dir))?;
    let mut tar = TarReader::new(reader);
    let mut done = Extracted::default();
    let mut directories: Vec<(Vec<Vec<u8>>, u32, i64)> = Vec::new();
    while let Some(entry) = tar.next_entry()? {
        let shown = String::from_utf8_lossy(&entry.path).into_owned();
        let ctx = |e: Error| e.at_path(dir.join(&shown));
        let Some(components) = member_components(&entry.path).map_err(ctx)? else {
            continue; // "./" or the like: the data directory itself.
        };
        match entry.kind {
            Kind::Directory => {
                let parent = walk_parents(&root, &components, created).map_err(ctx)?;
                if make_dir(&parent, components.last().expect("non-empty")).map_err(ctx)? {
                    created.note(&components);
                }
                directories.push((components, entry.mode, entry.mtime));
                done.directories += 1;
            }
            Kind::File => {
                let parent = walk_parents(&root, &components, created).map_err(ctx)?;
                // Noted before it is written: a member that fails half-way is removed too.
                created.note(&components);
                let written = write_file(
                    &mut tar,
                    &entry,
                    &parent,
                    components.last().expect("non-empty"),
                    pacing,
                    &mut on_progress,
                )
                .map_err(ctx)?;
                done.bytes_written += written;
                done.files += 1;
            }
            Kind::Symlink => {
                if !symlink_stays_inside(&components, &entry.link) {
                    log::warn!(
                        "{}: skipping symlink {shown} -> {}: it points outside the data directory",
                        dir.display(),
                        String::from_utf8_lossy(&entry.link)
                    );
                    done.skipped += 1;
                    continue;
                }
                let parent = walk_parents(&root, &components, created).map_err(ctx)?;
                let name = components.last().expect("non-empty");
                remove_existing(&parent, name).map_err(ctx)?;
                created.note(&components);
                symlinkat(OsStr::from_bytes(&entry.link), Some(parent.as_raw_fd()), OsStr::from_bytes(name))
                    .map_err(|e| ctx(Error::io("creating a symlink", e.into())))?;
                done.links += 1;
            }
            Kind::HardLink => {
                let target = member_components(&entry.link)
                    .map_err(ctx)?
                    .ok_or_else(|| ctx(Error::bad_image("hard link to the data directory itself")))?;
                let target_parent = walk_parents(&root, &target, created).map_err(ctx)?;
                let parent = walk_parents(&root, &components, created).map_err(ctx)?;
                let name = components.last().expect("non-empty");
                remove_existing(&parent, name).map_err(ctx)?;
                created.note(&components);
                // Without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself, never what it names.
                linkat(
                    Some(target_parent.as_raw_fd()),
                    OsStr::from_bytes(target.last().expect("non-empty")),
                    Some(parent.as_raw_fd()),
                    OsStr::from_bytes(name),
                    AtFlags::empty(),
                )
                .map_err(|e| ctx(Error::io("creating a hard link to an earlier member", e.into())))?;
                done.links += 1;
            }
            Kind::Other(flag) => {
                log::warn!("{}: skipping {shown}: member type {:?} is not extracted", dir.display(), flag as char);
                done.skipped += 1;
            }
        }
        on_progress(tar.position());
    }
    // Directory modes last, deepest first, so a read-only directory does not stop its own extraction.
    directories.sort_by_key(|(components, _, _)| std::cmp::Reverse(components.len()));
    for (components, mode, mtime) in directories {
        let parent = walk_parents(&root, &components, created)?;
        let handle = open_dir_handle(Some(&parent), OsStr::from_bytes(components.last().expect("non-empty")))
            .map_err(|e| Error::io("reopening an extracted directory", e))?;
        set_mode_and_time(handle.as_raw_fd(), mode & 0o1777, mtime)?;
    }
    on_progress(tar.position());
    Ok(done)
}

/// Longest member path extracted: Linux's PATH_MAX, as for any tool that extracts by path (CDI's does). It also
/// bounds how deep a tree an archive makes, and so the removal's recursion after a failure.
const MAX_MEMBER_PATH: usize = 4095;

/// The normal components of a member path: `None` for the archive root itself; an error for `..` and for a path
/// longer than [`MAX_MEMBER_PATH`].
fn member_components(path: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
    if path.len() > MAX_MEMBER_PATH {
        return Err(Error::new(
            ErrorKind::BadImage,
            format!("archive member path of {} bytes is longer than {MAX_MEMBER_PATH}; refusing it", path.len()),
        ));
    }
    let mut components = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(Error::new(ErrorKind::BadImage, "archive member path contains \"..\"; refusing it")),
            name => components.push(name.to_vec()),
        }
    }
    Ok((!components.is_empty()).then_some(components))
}

/// Whether a symlink at `components` with `target` resolves inside the data directory, judged on the text alone
/// (every directory on the way is a real directory: extraction never follows links).
fn symlink_stays_inside(components: &[Vec<u8>], target: &[u8]) -> bool {
    if target.is_empty() || target.starts_with(b"/") {
        return false;
    }
    let mut depth = components.len() as i64 - 1;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// Opens a directory without following a symlink, relative to `parent` (or the working directory).
fn open_dir_handle(parent: Option<&OwnedFd>, name: &OsStr) -> std::io::Result<OwnedFd> {
    let dirfd = parent.map(|p| p.as_raw_fd());
    let fd = openat(
        dirfd,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Walks (creating as needed, and noting what it creates in `created`) every directory above the member at
/// `components`, never following a symlink; returns a handle on the member's parent.
fn walk_parents(root: &OwnedFd, components: &[Vec<u8>], created: &mut Created) -> Result<OwnedFd> {
    let mut current = root.try_clone().map_err(|e| Error::io("duplicating a directory handle", e))?;
    for (depth, name) in components[..components.len() - 1].iter().enumerate() {
        let name_os = OsStr::from_bytes(name);
        current = match open_dir_handle(Some(&current), name_os) {
            Ok(next) => next,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                make_dir(&current, name)?;
                created.note(&components[..=depth]);
                open_dir_handle(Some(&current), name_os).map_err(|e| Error::io("opening a created directory", e))?
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                return Err(Error::new(
                    ErrorKind::BadImage,
                    format!(
                        "{:?} on the member's path is a symlink or not a directory; extraction never follows links",
                        String::from_utf8_lossy(name)
                    ),
                ))
            }
            Err(e) => return Err(Error::io("opening a directory", e)),
        };
    }
    Ok(current)
}

/// Creates directory `name` (owner-writable until the final modes are set); an existing directory is fine.
/// Returns whether it made one.
fn make_dir(parent: &OwnedFd, name: &[u8]) -> Result<bool> {
    match mkdirat(Some(parent.as_raw_fd()), OsStr::from_bytes(name), Mode::from_bits_truncate(0o700)) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EEXIST) => match open_dir_handle(Some(parent), OsStr::from_bytes(name)) {
            Ok(_) => Ok(false),
            Err(_) => {
                // A file or symlink in the way: replaced, as tar replaces it.
                remove_existing(parent, name)?;
                mkdirat(Some(parent.as_raw_fd()), OsStr::from_bytes(name), Mode::from_bits_truncate(0o700))
                    .map_err(|e| Error::io("creating a directory", e.into()))?;
                Ok(true)
            }
        },
        Err(e) => Err(Error::io("creating a directory", e.into())),
    }
}

/// Removes a non-directory at `name`, if any (tar's default: unlink before extracting over it).
fn remove_existing(parent: &OwnedFd, name: &[u8]) -> Result<()> {
    match unlinkat(Some(parent.as_raw_fd()), OsStr::from_bytes(name), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EISDIR) => {
            Err(Error::new(ErrorKind::BadImage, "a directory is in the way of a non-directory member"))
        }
        Err(e) => Err(Error::io("replacing an existing file", e.into())),
    }
}

/// Writes a regular member: created fresh (`O_EXCL|O_NOFOLLOW`), zero blocks left as holes, written through a
/// governed write-behind window. Returns the data bytes written.
fn write_file<R: Read>(
    tar: &mut TarReader<R>,
    entry: &Entry,
    parent: &OwnedFd,
    name: &[u8],
    pacing: &Pacing,
    on_progress: &mut impl FnMut(u64),
) -> Result<u64> {
    remove_existing(parent, name)?;
    let fd = openat(
        Some(parent.as_raw_fd()),
        OsStr::from_bytes(name),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| Error::io("creating a file", e.into()))?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut out = PacedFile::new(file, pacing)?;
    let mut last_report = 0u64;
    tar.read_data(entry, |offset, chunk| {
        out.write(offset, chunk)?;
        let through = offset + chunk.len() as u64;
        if through - last_report >= 4 << 20 {
            last_report = through;
            on_progress(through);
        }
        Ok(())
    })?;
    let written = out.written();
    let file = out.finish(entry.size)?;
    set_mode_and_time(file.as_raw_fd(), entry.mode & 0o777, entry.mtime)?;
    Ok(written)
}

/// Sets permission bits and the modification time of an open file or directory.
fn set_mode_and_time(fd: RawFd, mode: u32, mtime: i64) -> Result<()> {
    fchmod(fd, Mode::from_bits_truncate(mode)).map_err(|e| Error::io("setting a mode", e.into()))?;
    let time = nix::sys::time::TimeSpec::new(mtime, 0);
    nix::sys::stat::futimens(fd, &time, &time).map_err(|e| Error::io("setting a modification time", e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths_are_normalised_and_dotdot_refused() {
        let c = |p: &str| member_components(p.as_bytes()).map(|o| o.map(|v| v.len()));
        assert_eq!(c("./a/b/").unwrap(), Some(2));
        assert_eq!(c("/etc/passwd").unwrap(), Some(2));
        assert_eq!(c("./").unwrap(), None);
        assert!(c("a/../../x").is_err());
    }

    #[test]
    fn symlink_targets_are_judged_by_text() {
        let at = |p: &str| member_components(p.as_bytes()).unwrap().unwrap();
        assert!(symlink_stays_inside(&at("a/link"), b"b"));
        assert!(symlink_stays_inside(&at("a/link"), b"../b"));
        assert!(!symlink_stays_inside(&at("a/link"), b"../../b"));
        assert!(!symlink_stays_inside(&at("link"), b"/etc"));
        assert!(!symlink_stays_inside(&at("link"), b".."));
        assert!(symlink_stays_inside(&at("a/b/link"), b"./../c/../../d"));
        assert!(!symlink_stays_inside(&at("link"), b""));
    }
}
