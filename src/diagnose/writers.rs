//! The processes of a cgroup and the files they hold open: for each file open for writing (and each file open
//! for reading that holds page cache), how much of it sits in the page cache and how much is dirty or under
//! writeback.
//!
//! Residency comes from cachestat(2) where the kernel has it (6.5+: cached, dirty and writeback pages), else from
//! mincore(2) over a read-only shared mapping (cached pages only; dirty and writeback stay unknown), else it is
//! unknown. mincore is used only where the kernel answers it truthfully: for files we own or may write, or as
//! CAP_SYS_ADMIN — for other files it reports every page resident (mm/mincore.c `can_do_mincore`).
//!
//! Both count a file's pages whoever is charged for them: a page is charged to the cgroup that first brought it
//! into the cache, so a source another cgroup already read shows cached here without being charged here.

use super::snapshot::{meminfo_kib, Misses, Unreadable};
use crate::error::{IoContext, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A process in the cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// Its command name (/proc/PID/comm).
    pub command: String,
    /// Resident set (VmRSS): what `ps` and `top` show, which leaves out page cache the process is not mapping.
    pub rss_bytes: Option<u64>,
    /// Anonymous part of the RSS (RssAnon).
    pub anon_bytes: Option<u64>,
}

/// How a file's page cache was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Residency {
    /// cachestat(2): cached, dirty and writeback pages.
    Cachestat,
    /// mincore(2) over a mapping: cached pages only.
    Mincore,
    /// Not measurable here.
    Unknown,
}

/// A file a process in the cgroup has open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenFile {
    /// The process.
    pub pid: u32,
    /// Its command name.
    pub command: String,
    /// The file descriptor.
    pub fd: u32,
    /// The file's path as the process sees it (`/dev/loop3`, `/data/disk.img`, `... (deleted)`).
    pub path: String,
    /// `file` or `block device`.
    pub kind: &'static str,
    /// Whether it is open for writing.
    pub writing: bool,
    /// Size in bytes (a block device's capacity).
    pub size_bytes: Option<u64>,
    /// Bytes of it in the page cache; `None` when unknown.
    pub cached_bytes: Option<u64>,
    /// Dirty bytes of it; `None` when unknown (mincore cannot tell).
    pub dirty_bytes: Option<u64>,
    /// Bytes of it under writeback; `None` when unknown.
    pub writeback_bytes: Option<u64>,
    /// How the numbers were measured.
    pub residency: Residency,
}

impl OpenFile {
    /// Dirty plus writeback, when known.
    pub fn dirty_writeback(&self) -> Option<u64> {
        Some(self.dirty_bytes? + self.writeback_bytes?)
    }
}

/// The processes and open files of `pids`, read from `proc` (normally /proc).
pub fn scan(proc: &Path, pids: &[u32], misses: &mut Misses) -> (Vec<Process>, Vec<OpenFile>) {
    let mut processes = Vec::new();
    let mut files = Vec::new();
    let mut measured: HashMap<(u64, u64), Measured> = HashMap::new();
    for &pid in pids {
        let dir = proc.join(pid.to_string());
        let Some(command) = gone_or(misses, read_line(&dir.join("comm")), &dir) else { continue };
        let status = gone_or(misses, super::snapshot::read(&dir.join("status")), &dir);
        let kib = |key: &str| status.as_deref().and_then(|s| meminfo_kib(s, key)).map(|v| v * 1024);
        processes.push(Process { pid, command: command.clone(), rss_bytes: kib("VmRSS"), anon_bytes: kib("RssAnon") });
        let fd_dir = dir.join("fd");
        let entries = match std::fs::read_dir(&fd_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                misses.0.push(Unreadable { path: fd_dir, error: e.to_string() });
                continue;
            }
        };
        let mut fds: Vec<u32> =
            entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect::<Vec<u32>>();
        fds.sort_unstable();
        for fd in fds {
            let link = fd_dir.join(fd.to_string());
            let Ok(target) = std::fs::read_link(&link) else { continue };
            // Follows the magic link to the open file itself (a deleted file too).
            let Ok(meta) = std::fs::metadata(&link) else { continue };
            let kind = if meta.file_type().is_block_device() {
                "block device"
            } else if meta.is_file() {
                "file"
            } else {
                continue;
            };
            let fdinfo = dir.join("fdinfo").join(fd.to_string());
            let Some(info) = gone_or(misses, super::snapshot::read(&fdinfo), &fdinfo) else { continue };
            let Some(flags) = fdinfo_flags(&info) else {
                misses.0.push(Unreadable { path: fdinfo, error: "no flags line".to_string() });
                continue;
            };
            let writing = flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
            let key = (meta.dev(), meta.ino());
            let (cached, dirty, writeback, residency) =
                *measured.entry(key).or_insert_with(|| measure(&link, &meta, misses));
            let size = if kind == "file" { Some(meta.len()) } else { device_size(&link) };
            files.push(OpenFile {
                pid,
                command: command.clone(),
                fd,
                path: target.to_string_lossy().into_owned(),
                kind,
                writing,
                size_bytes: size,
                cached_bytes: cached,
                dirty_bytes: dirty,
                writeback_bytes: writeback,
                residency,
            });
        }
    }
    (processes, dedupe(files))
}

/// One entry per process and file (a process often holds a file on several descriptors); writing wins.
fn dedupe(files: Vec<OpenFile>) -> Vec<OpenFile> {
    let mut out: Vec<OpenFile> = Vec::new();
    for file in files {
        match out.iter_mut().find(|f| f.pid == file.pid && f.path == file.path) {
            Some(existing) => existing.writing |= file.writing,
            None => out.push(file),
        }
    }
    out
}

/// The value, or `None` — recording the failure unless the process simply exited meanwhile (ENOENT, ESRCH).
fn gone_or<T>(misses: &mut Misses, result: Result<T>, path: &Path) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) => None,
        Err(e) => {
            misses.record(&e, path);
            None
        }
    }
}

fn read_line(path: &Path) -> Result<String> {
    Ok(super::snapshot::read(path)?.trim_end().to_string())
}

/// The `flags:` field of /proc/PID/fdinfo/FD (octal open flags).
pub fn fdinfo_flags(text: &str) -> Option<u32> {
    text.lines().find_map(|l| u32::from_str_radix(l.strip_prefix("flags:")?.trim(), 8).ok())
}

fn device_size(link: &Path) -> Option<u64> {
    let file = File::open(link).ok()?;
    crate::sys::file_or_device_size(&file).ok()
}

/// Cached, dirty and writeback bytes of one file, and how they were measured.
type Measured = (Option<u64>, Option<u64>, Option<u64>, Residency);

/// Page cache of the file behind `link`: cachestat, else mincore where truthful, else unknown. A failure that
/// leaves it unknown is recorded.
fn measure(link: &Path, meta: &std::fs::Metadata, misses: &mut Misses) -> Measured {
    measure_with(link, meta, misses, crate::sys::cachestat)
}

/// [`measure`] with the cachestat call given (tests stand in a kernel without it).
fn measure_with(
    link: &Path,
    meta: &std::fs::Metadata,
    misses: &mut Misses,
    cachestat: impl Fn(&File) -> io::Result<Option<crate::sys::FileCache>>,
) -> Measured {
    let unknown = (None, None, None, Residency::Unknown);
    let file = match File::open(link).io_context("opening to measure its page cache") {
        Ok(f) => f,
        Err(e) => {
            misses.record(&e, link);
            return unknown;
        }
    };
    match cachestat(&file) {
        Ok(Some(c)) => return (Some(c.cached), Some(c.dirty), Some(c.writeback), Residency::Cachestat),
        Ok(None) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => {
            misses.0.push(Unreadable { path: link.to_path_buf(), error: format!("cachestat: {e}") });
            return unknown;
        }
    }
    if !mincore_is_truthful(&file, meta) {
        return unknown;
    }
    let len = if meta.is_file() { Some(meta.len()) } else { crate::sys::file_or_device_size(&file).ok() };
    match len.map(|len| mincore_resident(&file, len)) {
        Some(Ok(cached)) => (Some(cached), None, None, Residency::Mincore),
        Some(Err(e)) => {
            misses.0.push(Unreadable { path: link.to_path_buf(), error: format!("mincore: {e}") });
            unknown
        }
        None => unknown,
    }
}

/// Whether mincore reports real residency for this file to us (owner, write permission, or CAP_SYS_ADMIN, which
/// root is assumed to have).
fn mincore_is_truthful(file: &File, meta: &std::fs::Metadata) -> bool {
    use std::os::fd::AsRawFd;
    let euid = nix::unistd::geteuid();
    if euid.is_root() || meta.uid() == euid.as_raw() {
        return true;
    }
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    nix::unistd::access(path.as_str(), nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Bytes of `file`'s first `len` bytes resident in the page cache, by mincore over read-only shared mappings of
/// at most 256 MiB at a time (the residency vector is one byte per page).
fn mincore_resident(file: &File, len: u64) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    const WINDOW: u64 = 256 << 20;
    let page = crate::sys::page_size();
    let mut vec = vec![0u8; (WINDOW / page) as usize];
    let mut resident = 0;
    let mut offset = 0;
    while offset < len {
        let span = (len - offset).min(WINDOW);
        // SAFETY: a fresh read-only shared mapping of our own descriptor; nothing reads through it, it is only
        // handed to mincore and unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let pages = span.div_ceil(page) as usize;
        // SAFETY: `addr` maps `span` bytes; `vec` holds at least one byte per page of it.
        let ret = unsafe { libc::mincore(addr, span as usize, vec.as_mut_ptr()) };
        let err = io::Error::last_os_error();
        // SAFETY: unmaps exactly the mapping made above.
        unsafe { libc::munmap(addr, span as usize) };
        if ret != 0 {
            return Err(err);
        }
        resident += vec[..pages].iter().filter(|&&b| b & 1 == 1).count() as u64 * page;
        offset += span;
    }
    Ok(resident.min(len.next_multiple_of(page)))
}

/// The processes of a cgroup and all its descendants (a pod's processes live in its containers' cgroups).
pub fn all_procs(cg: &crate::cgroup::MemCgroup, misses: &mut Misses) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![cg.clone()];
    while let Some(c) = stack.pop() {
        if let Some(mut p) = misses.take(c.procs(), &c.dir().join("cgroup.procs")) {
            pids.append(&mut p);
        }
        if let Some(mut children) = misses.take(c.children(), c.dir()) {
            stack.append(&mut children);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `proc` for the real system.
pub fn proc_root() -> PathBuf {
    PathBuf::from("/proc")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn fdinfo_flags_are_octal() {
        assert_eq!(fdinfo_flags("pos:\t0\nflags:\t0100001\nmnt_id:\t25\n"), Some(0o100001));
        assert_eq!(fdinfo_flags("pos: 0\n"), None);
    }

    #[test]
    fn our_own_written_file_is_found_with_its_dirty_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("written");
        let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
        file.write_all(&vec![7u8; 1 << 20]).unwrap();
        let reader = File::open(dir.path().join("written")).unwrap();
        let mut misses = Misses::default();
        let (processes, files) = scan(&proc_root(), &[std::process::id()], &mut misses);
        assert_eq!(processes.len(), 1);
        assert!(processes[0].rss_bytes.unwrap() > 0);
        let ours: Vec<&OpenFile> = files.iter().filter(|f| Path::new(&f.path) == path).collect();
        assert_eq!(ours.len(), 1, "one entry per process and file: {ours:?}");
        let f = ours[0];
        assert!(f.writing, "open for writing on one of the descriptors");
        assert_eq!((f.kind, f.size_bytes), ("file", Some(1 << 20)));
        match f.residency {
            Residency::Cachestat => {
                assert_eq!(f.cached_bytes, Some(1 << 20));
                assert!(f.dirty_writeback().unwrap() > 0 || f.cached_bytes.unwrap() > 0);
            }
            Residency::Mincore => assert_eq!(f.cached_bytes, Some(1 << 20)),
            Residency::Unknown => panic!("our own file must be measurable: {misses:?}"),
        }
        drop(reader);
    }

    #[test]
    fn without_cachestat_mincore_gives_cached_bytes_and_dirty_stays_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![3u8; 5 * 4096]).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let mut misses = Misses::default();
        let no_cachestat = |_: &File| Ok(None);
        let (cached, dirty, writeback, how) = measure_with(&path, &meta, &mut misses, no_cachestat);
        assert_eq!((cached, dirty, writeback, how), (Some(5 * 4096), None, None, Residency::Mincore));
        let refused = |_: &File| Err(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(measure_with(&path, &meta, &mut misses, refused).3, Residency::Mincore, "EPERM falls back");
        let broken = |_: &File| Err(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(measure_with(&path, &meta, &mut misses, broken), (None, None, None, Residency::Unknown));
        assert!(misses.0.iter().any(|u| u.error.starts_with("cachestat:")), "a failure is named: {misses:?}");
        let gone = dir.path().join("gone");
        assert_eq!(measure_with(&gone, &meta, &mut misses, no_cachestat).3, Residency::Unknown);
    }

    #[test]
    fn mincore_counts_resident_pages() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![1u8; 3 * 4096 + 10]).unwrap();
        assert_eq!(mincore_resident(&file, 3 * 4096 + 10).unwrap(), 4 * 4096);
        crate::sys::drop_cache(&file, 0, 0).unwrap();
        // Dirty pages cannot be dropped; after a sync they can.
        file.sync_all().unwrap();
        crate::sys::drop_cache(&file, 0, 0).unwrap();
        assert!(mincore_resident(&file, 3 * 4096 + 10).unwrap() < 4 * 4096);
    }
}
