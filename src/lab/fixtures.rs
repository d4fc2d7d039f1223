//! Test and harness fixtures that change the machine: a child memory cgroup, a loop device, a block-device
//! write throttle, a scratch file, signal handlers. Each is a guard that undoes itself on drop, so a failing test
//! or an interrupted harness run leaves nothing behind. The machine-changing ones need root.

use crate::cgroup::{MemCgroup, Version};
use crate::error::{Error, ErrorKind, IoContext, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::ffi::CString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Whether this process runs as root (the fixtures need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Writes back dirty pages and drops the clean page cache of the whole machine, so a run starts cold.
pub fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3")
        .io_context("dropping caches")
        .map_err(|e| e.at_path("/proc/sys/vm/drop_caches"))
}

/// Bytes the v1 memory+swap limit exceeds the memory limit by (see [`ChildCgroup::create`]); more than one charge
/// batch (64 pages).
const MEMSW_MARGIN: i64 = 1 << 20;

/// A memory cgroup created under our own (or under the hierarchy root when we are in none), removed on drop.
/// Children made with [`create_child`](Self::create_child) must be dropped before their parent.
pub struct ChildCgroup {
    cgroup: cgroups_rs::Cgroup,
    reader: MemCgroup,
    /// Path relative to the memory hierarchy's root, as cgroups-rs names it.
    relative: PathBuf,
}

impl ChildCgroup {
    /// Creates a child memory cgroup named `name` with `limit` bytes and no swap beyond it.
    pub fn create(name: &str, limit: u64) -> Result<Self> {
        let hierarchy = cgroups_rs::hierarchies::auto();
        let root = hierarchy.root();
        let parent = match MemCgroup::own()? {
            Some(own) => own,
            // In the root of the unified hierarchy (a guest's /init) there is no memory.current to find: the
            // root itself is the parent.
            None if hierarchy.v2() && root.join("cgroup.controllers").exists() => MemCgroup::at(&root, Version::V2),
            None if !hierarchy.v2() && root.join("memory/memory.usage_in_bytes").exists() => {
                MemCgroup::at(root.join("memory"), Version::V1)
            }
            None => return Err(Error::unsupported("no memory cgroup hierarchy is mounted")),
        };
        let memory_root = match parent.version() {
            Version::V1 => root.join("memory"),
            Version::V2 => root,
        };
        let relative = parent.dir().strip_prefix(&memory_root).unwrap_or(Path::new("")).join(name);
        Self::create_at(relative, parent.dir().join(name), parent.version(), Some(limit))
    }

    /// Creates a cgroup named `name` inside this one, limited to `limit` bytes or, with `None`, sharing this
    /// one's limit (the layout of a pod whose containers share the pod's limit).
    pub fn create_child(&self, name: &str, limit: Option<u64>) -> Result<Self> {
        Self::create_at(self.relative.join(name), self.reader.dir().join(name), self.reader.version(), limit)
    }

    fn create_at(relative: PathBuf, dir: PathBuf, version: Version, limit: Option<u64>) -> Result<Self> {
        let fail = |what: &str, e: cgroups_rs::error::Error| {
            Error::new(ErrorKind::Io, format!("{what} cgroup {}: {e}", relative.display()))
        };
        let hierarchy = cgroups_rs::hierarchies::auto();
        let mut controllers = vec!["memory".to_string()];
        // On v2 the write throttle is the cgroup's io.max, which exists only with the io controller enabled.
        if version == Version::V2
            && fs::read_to_string(hierarchy.root().join("cgroup.controllers"))
                .is_ok_and(|list| list.split_whitespace().any(|c| c == "io"))
        {
            controllers.push("io".to_string());
        }
        let cgroup = cgroups_rs::Cgroup::new_with_specified_controllers(hierarchy, &relative, Some(controllers))
            .map_err(|e| fail("creating", e))?;
        let child = ChildCgroup { cgroup, reader: MemCgroup::at(dir, version), relative: relative.clone() };
        let Some(limit) = limit else {
            return Ok(child);
        };
        let memory: &cgroups_rs::memory::MemController =
            child.cgroup.controller_of().ok_or_else(|| Error::unsupported("memory controller not available"))?;
        let limit = i64::try_from(limit).map_err(|_| Error::usage("cgroup limit too large"))?;
        memory.set_limit(limit).map_err(|e| fail("limiting", e))?;
        // Pin swap where the kernel accounts it, so the limit cannot be dodged by swapping. On v1 the memory+swap
        // limit sits a little above the memory limit: a charge tries memory+swap first (in batches of up to 64
        // pages), and with equal limits every limit hit happens there, where 6.x kernels keep no failcnt, so
        // memory.failcnt would read 0 for a cgroup pinned at its limit (measured on 6.18). The margin lets
        // swap hold at most 1 MiB.
        let swap = match version {
            Version::V1 => ("memory.memsw.limit_in_bytes", (limit + MEMSW_MARGIN).to_string()),
            Version::V2 => ("memory.swap.max", "0".to_string()),
        };
        let swap_file = child.reader.dir().join(swap.0);
        if swap_file.exists() {
            fs::write(&swap_file, &swap.1).io_context("pinning swap limit").map_err(|e| e.at_path(&swap_file))?;
        }
        Ok(child)
    }

    /// A reader for the cgroup's counters.
    pub fn reader(&self) -> &MemCgroup {
        &self.reader
    }

    /// Spawns `command` inside the cgroup: the child moves itself in before exec, so everything it allocates and
    /// every page it reads is charged here from its first instruction.
    pub fn spawn(&self, command: &mut Command) -> Result<std::process::Child> {
        let procs = CString::new(self.reader.dir().join("cgroup.procs").into_os_string().into_encoded_bytes())
            .map_err(|_| Error::usage("cgroup path contains a NUL byte"))?;
        // SAFETY: the hook only calls async-signal-safe functions (open, write, close) on memory prepared before
        // the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" means the writing process itself.
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(err)
                }
            });
        }
        command.spawn().io_context("starting a process in the cgroup")
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // Processes still inside keep the directory busy: kill them, then retry removal for a while (the kernel
        // frees the cgroup asynchronously after the last task exits).
        for pid in self.cgroup.procs() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.pid as i32), nix::sys::signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cgroup.delete().is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device; with `direct_io`, the loop driver reads and writes the backing
    /// file with O_DIRECT (so the device behaves like a disk, not like a second page cache).
    pub fn attach(backing: &Path, direct_io: bool) -> Result<Self> {
        let output = Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(format!("--direct-io={}", if direct_io { "on" } else { "off" }))
            .arg(backing)
            .stderr(Stdio::piped())
            .output()
            .io_context("running losetup")?;
        if !output.status.success() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("losetup failed: {}", String::from_utf8_lossy(&output.stderr).trim()),
            )
            .at_path(backing));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Ok(LoopDevice { path })
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // A device still open (a killed writer's fd not yet closed) refuses to detach for a moment.
        for _ in 0..50 {
            match Command::new("losetup").arg("--detach").arg(&self.path).stderr(Stdio::null()).status() {
                Ok(status) if status.success() => return,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// `MAJ:MIN` of a block device node.
pub fn device_number(device: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(device).io_context("reading device number").map_err(|e| e.at_path(device))?.rdev();
    Ok(format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
}

/// A write-bandwidth limit on a block device, removed on drop.
///
/// cgroup v1: set in the blkio root, because buffered writeback is submitted by flusher threads that live there
/// (a limit on the importer's own cgroup would only catch its O_DIRECT writes). cgroup v2: `io.max` of the given
/// cgroup, where cgroup writeback attributes flusher I/O to the cgroup that dirtied the pages.
pub struct WriteThrottle {
    file: PathBuf,
    device: String,
    clear: String,
}

impl WriteThrottle {
    /// Limits writes to `device` to `bytes_per_sec`. `v2_cgroup` is the cgroup whose io.max to use on v2 hosts.
    pub fn set(device: &Path, bytes_per_sec: u64, v2_cgroup: Option<&MemCgroup>) -> Result<Self> {
        let device = device_number(device)?;
        let v1_file = PathBuf::from("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device");
        let (file, value, clear) = if v1_file.exists() {
            (v1_file, format!("{device} {bytes_per_sec}"), format!("{device} 0"))
        } else {
            let cg = v2_cgroup.ok_or_else(|| Error::unsupported("no blkio hierarchy and no v2 cgroup for io.max"))?;
            (cg.dir().join("io.max"), format!("{device} wbps={bytes_per_sec}"), format!("{device} wbps=max"))
        };
        fs::write(&file, &value).io_context("setting write throttle").map_err(|e| e.at_path(&file))?;
        Ok(WriteThrottle { file, device, clear })
    }

    /// `MAJ:MIN` of the throttled device.
    pub fn device(&self) -> &str {
        &self.device
    }
}

impl Drop for WriteThrottle {
    fn drop(&mut self) {
        let _ = fs::write(&self.file, &self.clear);
    }
}

/// A file created for a run (a loop device's backing file), removed on drop.
pub struct ScratchFile {
    path: PathBuf,
}

impl ScratchFile {
    /// Creates `path` afresh as a sparse file of `size` bytes (an existing file there is replaced).
    pub fn sparse(path: &Path, size: u64) -> Result<Self> {
        let file = fs::File::create(path).io_context("creating scratch file").map_err(|e| e.at_path(path))?;
        let scratch = ScratchFile { path: path.to_path_buf() };
        file.set_len(size).io_context("sizing scratch file").map_err(|e| e.at_path(path))?;
        Ok(scratch)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Set by the handler [`StopOnSignals`] installs; read with [`StopOnSignals::flag`].
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// The signal that set [`STOP_REQUESTED`].
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn request_stop(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM handlers that only raise a flag, so a long run can stop at its next check and let every
/// guard drop; the previous handlers come back on drop.
pub struct StopOnSignals {
    previous: Vec<(Signal, SigAction)>,
}

impl StopOnSignals {
    /// Installs the handlers and clears the flag.
    pub fn install() -> Result<Self> {
        STOP_REQUESTED.store(false, Ordering::SeqCst);
        STOP_SIGNAL.store(0, Ordering::SeqCst);
        let action = SigAction::new(SigHandler::Handler(request_stop), SaFlags::SA_RESTART, SigSet::empty());
        let mut guard = StopOnSignals { previous: Vec::new() };
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            let previous = unsafe { sigaction(signal, &action) }
                .map_err(|errno| Error::io(format!("installing a {signal} handler"), std::io::Error::from(errno)))?;
            guard.previous.push((signal, previous));
        }
        Ok(guard)
    }

    /// The flag the handlers raise.
    pub fn flag(&self) -> &'static AtomicBool {
        &STOP_REQUESTED
    }

    /// The signal received, if one was.
    pub fn signal(&self) -> Option<i32> {
        Some(STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s > 0)
    }
}

impl Drop for StopOnSignals {
    fn drop(&mut self) {
        for (signal, previous) in self.previous.drain(..).rev() {
            // SAFETY: restores the action that was installed before ours.
            let _ = unsafe { sigaction(signal, &previous) };
        }
    }
}

/// A fresh ext4 filesystem made on a block device and mounted on a temporary directory; unmounted on drop.
pub struct MountedExt4 {
    mountpoint: tempfile::TempDir,
}

impl MountedExt4 {
    /// Formats `device` (lazily: no inode-table or journal zeroing, so a throttled device formats at once) and
    /// mounts it.
    pub fn create(device: &Path) -> Result<Self> {
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(device)
            .stderr(Stdio::piped())
            .output()
            .io_context("running mkfs.ext4")?;
        if !mkfs.status.success() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&mkfs.stderr).trim()),
            )
            .at_path(device));
        }
        let mountpoint =
            tempfile::Builder::new().prefix("boundimport-mnt-").tempdir().io_context("creating a mount point")?;
        let mount = Command::new("mount")
            .arg(device)
            .arg(mountpoint.path())
            .stderr(Stdio::piped())
            .output()
            .io_context("running mount")?;
        if !mount.status.success() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("mount failed: {}", String::from_utf8_lossy(&mount.stderr).trim()),
            )
            .at_path(device));
        }
        Ok(MountedExt4 { mountpoint })
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }
}

impl Drop for MountedExt4 {
    fn drop(&mut self) {
        for _ in 0..50 {
            match Command::new("umount").arg(self.mountpoint.path()).stderr(Stdio::null()).status() {
                Ok(status) if status.success() => return,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        // Still busy: detach it lazily rather than leave it mounted.
        let _ = Command::new("umount").arg("--lazy").arg(self.mountpoint.path()).status();
    }
}

/// A device-mapper device built from a table (`dmsetup create`), removed on drop. With an `error` target in the
/// table, I/O to that range fails with EIO: a disk with bad sectors, for fault tests.
pub struct DmDevice {
    name: String,
    path: PathBuf,
}

impl DmDevice {
    /// Creates `/dev/mapper/NAME` from `table` (dmsetup's format: `START LEN TARGET ARGS`, in 512-byte sectors, one
    /// line per segment).
    pub fn create(name: &str, table: &str) -> Result<Self> {
        let output = Command::new("dmsetup")
            .args(["create", name, "--table", table])
            .stderr(Stdio::piped())
            .output()
            .io_context("running dmsetup")?;
        if !output.status.success() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("dmsetup create {name} failed: {}", String::from_utf8_lossy(&output.stderr).trim()),
            ));
        }
        let device = DmDevice { name: name.to_string(), path: PathBuf::from("/dev/mapper").join(name) };
        // udev may create the node a moment after dmsetup returns.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !device.path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !device.path.exists() {
            let _ = Command::new("dmsetup").args(["mknodes", name]).status();
        }
        Ok(device)
    }

    /// A device whose sectors `[error_start, error_start + error_len)` fail every I/O and whose other sectors map
    /// linearly onto `backing` (a block device of at least `total` sectors).
    pub fn with_error_range(name: &str, backing: &Path, total: u64, error_start: u64, error_len: u64) -> Result<Self> {
        let dev = backing.display();
        let error_end = error_start + error_len;
        let mut table = String::new();
        if error_start > 0 {
            table.push_str(&format!("0 {error_start} linear {dev} 0\n"));
        }
        table.push_str(&format!("{error_start} {error_len} error\n"));
        if error_end < total {
            table.push_str(&format!("{error_end} {} linear {dev} {error_end}\n", total - error_end));
        }
        Self::create(name, &table)
    }

    /// The device node, `/dev/mapper/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the table with an all-`error` one and removes the device even while it is open
    /// (`dmsetup remove --force`): what a disk torn out from under a writer looks like.
    pub fn force_remove(&self) -> Result<()> {
        let status = Command::new("dmsetup")
            .args(["remove", "--force", &self.name])
            .stderr(Stdio::null())
            .status()
            .io_context("running dmsetup")?;
        if !status.success() {
            return Err(Error::new(ErrorKind::Io, format!("dmsetup remove --force {} failed", self.name)));
        }
        Ok(())
    }
}

impl Drop for DmDevice {
    fn drop(&mut self) {
        for _ in 0..50 {
            match Command::new("dmsetup").args(["remove", &self.name]).stderr(Stdio::null()).status() {
                Ok(status) if status.success() => return,
                _ if !self.path.exists() && !dm_exists(&self.name) => return,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let _ = Command::new("dmsetup").args(["remove", "--force", &self.name]).status();
    }
}

/// Whether a device-mapper device named `name` exists.
fn dm_exists(name: &str) -> bool {
    Command::new("dmsetup")
        .args(["info", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
