//! Thin, documented wrappers over the Linux calls the I/O paths need and std does not offer: direct-I/O
//! alignment, block-device geometry, write-behind, cache eviction, zeroing, and hole finding.
//! Every wrapper returns `io::Result`; callers add context.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

// From include/uapi/linux/fs.h:
//   #define BLKSSZGET  _IO(0x12,104)            /* get block device sector size */
//   #define BLKIOOPT   _IO(0x12,121)            /* optimal I/O size */
//   #define BLKPBSZGET _IO(0x12,123)            /* physical sector size */
//   #define BLKZEROOUT _IO(0x12,127)            /* zero a range: u64[2] = {start, len} in bytes */
//   #define BLKGETSIZE64 _IOR(0x12,114,size_t)  /* device size in bytes */
//   #define BLKROGET   _IO(0x12,94)             /* get read-only status (0 = read_write) */
// linux/fs.h:
//   #define FS_IOC_GETFLAGS _IOR('f', 1, long)   /* inode flags; FS_IMMUTABLE_FL 0x10, FS_APPEND_FL 0x20 */
mod ioctls {
    nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
    nix::ioctl_read_bad!(blkioopt, 0x1279, libc::c_uint);
    nix::ioctl_read_bad!(blkpbszget, 0x127b, libc::c_uint);
    nix::ioctl_write_ptr_bad!(blkzeroout, 0x127f, [u64; 2]);
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blkroget, 0x125e, libc::c_int);
    nix::ioctl_read!(fs_ioc_getflags, b'f', 1, libc::c_long);
}

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Whether the open file is a block device.
pub fn is_block_device(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

/// Size in bytes of a block device (BLKGETSIZE64) or regular file (st_size).
pub fn file_or_device_size(file: &File) -> io::Result<u64> {
    if is_block_device(file)? {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        unsafe { ioctls::blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(nix_err)?;
        Ok(size)
    } else {
        Ok(file.metadata()?.len())
    }
}

/// Whether a block device is read-only (BLKROGET): `losetup -r`, a write-protected disk. Writes to it fail with
/// EPERM although opening it for writing succeeds.
pub fn is_read_only_device(file: &File) -> io::Result<bool> {
    let mut read_only: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer.
    unsafe { ioctls::blkroget(file.as_raw_fd(), &mut read_only) }.map_err(nix_err)?;
    Ok(read_only != 0)
}

/// Whether the file at `path` is immutable or append-only (`chattr +i` / `+a`), which refuses opening it for
/// writing with EPERM even to root. `None` when the filesystem cannot tell.
pub fn immutable_flags(path: &std::path::Path) -> Option<&'static str> {
    let file = File::open(path).ok()?;
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long through the pointer (the kernel copies an int into it).
    unsafe { ioctls::fs_ioc_getflags(file.as_raw_fd(), &mut flags) }.ok()?;
    match flags {
        f if f & 0x10 != 0 => Some("immutable (chattr +i)"),
        f if f & 0x20 != 0 => Some("append-only (chattr +a)"),
        _ => None,
    }
}

/// Block-device geometry from the BLK* ioctls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGeometry {
    /// Logical block size: the O_DIRECT alignment unit.
    pub logical: u64,
    /// Physical block size: writes smaller than this cost a read-modify-write in the device.
    pub physical: u64,
    /// Optimal I/O size, 0 when the device does not say.
    pub optimal_io: u64,
}

/// Reads the logical, physical and optimal I/O sizes of a block device.
pub fn block_geometry(file: &File) -> io::Result<BlockGeometry> {
    let fd = file.as_raw_fd();
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    let mut optimal: libc::c_uint = 0;
    // SAFETY: each ioctl writes one integer of the declared type through the pointer.
    unsafe {
        ioctls::blksszget(fd, &mut logical).map_err(nix_err)?;
        ioctls::blkpbszget(fd, &mut physical).map_err(nix_err)?;
        ioctls::blkioopt(fd, &mut optimal).map_err(nix_err)?;
    }
    Ok(BlockGeometry { logical: logical as u64, physical: physical as u64, optimal_io: optimal as u64 })
}

/// Direct-I/O alignment of an open file from statx(STATX_DIOALIGN) (Linux 6.1+): `(memory, offset)` alignment,
/// or `None` when the kernel or filesystem does not report it (0 means O_DIRECT is unsupported there).
pub fn statx_dio_alignment(file: &File) -> io::Result<Option<(u64, u64)>> {
    // SAFETY: statx fills the zero-initialised struct; the empty path with AT_EMPTY_PATH names the fd itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) })?;
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_mem_align as u64, stx.stx_dio_offset_align as u64)))
}

/// Reopens an already open file by its /proc/self/fd link with new flags (e.g. to drop O_DIRECT).
pub fn reopen(file: &File, flags: libc::c_int) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    let access = flags & libc::O_ACCMODE;
    std::fs::OpenOptions::new()
        .read(access == libc::O_RDONLY || access == libc::O_RDWR)
        .write(access == libc::O_WRONLY || access == libc::O_RDWR)
        .custom_flags(flags & !libc::O_ACCMODE)
        .open(link)
}

/// posix_fadvise(POSIX_FADV_DONTNEED): drops the clean page-cache pages of the range (len 0 = to EOF).
pub fn drop_cache(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fadvise(file, offset, len, libc::POSIX_FADV_DONTNEED)
}

/// posix_fadvise with the given advice.
pub fn fadvise(file: &File, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; posix_fadvise returns the error number instead of setting errno.
    let ret = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, advice) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// sync_file_range(SYNC_FILE_RANGE_WRITE): starts writeback of the dirty pages of the range without waiting.
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    sync_file_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER): writes the range out and waits until it is on the device
/// (not a durability barrier: no metadata, no device cache flush; finish with fdatasync).
pub fn wait_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    sync_file_range(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a valid fd.
        let ret = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(drop),
        }
    }
}

/// fallocate(mode) over a range, retrying on EINTR.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a valid fd.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(drop),
        }
    }
}

/// BLKZEROOUT: the block layer zeroes the range (offloaded where the device can, else by writing zeros from
/// the zero page, never through our page cache).
pub fn blkzeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads a u64[2] through the pointer.
    unsafe { ioctls::blkzeroout(file.as_raw_fd(), &range) }.map(drop).map_err(nix_err)
}

/// The first data byte at or after `offset` and the end of that data run (lseek SEEK_DATA / SEEK_HOLE), or
/// `None` when only a hole remains. Filesystems without hole tracking report everything as data.
pub fn next_data_run(file: &File, offset: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a valid fd; it does not touch memory.
    let start = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_DATA) };
    if start < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((start as u64, end as u64)))
}

// From include/uapi/linux/mman.h (Linux 6.5+; the number is the same on every architecture):
//   struct cachestat_range { __u64 off; __u64 len; };
//   struct cachestat { __u64 nr_cache; __u64 nr_dirty; __u64 nr_writeback; __u64 nr_evicted;
//                      __u64 nr_recently_evicted; };
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct CachestatRaw {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Page cache held by one file, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileCache {
    /// All cached bytes (clean, dirty and under writeback).
    pub cached: u64,
    /// Dirty bytes.
    pub dirty: u64,
    /// Bytes under writeback.
    pub writeback: u64,
}

/// cachestat(2) over the whole file: how much of its page cache exists, is dirty, is under writeback. `None` on
/// kernels without the call (before 6.5).
pub fn cachestat(file: &File) -> io::Result<Option<FileCache>> {
    let range = CachestatRange { off: 0, len: 0 };
    let mut raw = CachestatRaw::default();
    // SAFETY: the kernel reads `range` and writes `raw`, both live for the call and laid out as the uapi structs.
    let ret = unsafe { libc::syscall(SYS_CACHESTAT, file.as_raw_fd(), &range, &mut raw, 0u32) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(err),
        };
    }
    let page = page_size();
    Ok(Some(FileCache { cached: raw.nr_cache * page, dirty: raw.nr_dirty * page, writeback: raw.nr_writeback * page }))
}

/// Gives back the page cache that loading this program's own executable filled, and reads the rest of it a page
/// at a time as it runs. Those pages are charged to our memory cgroup: a fault in a mapped file reads a whole
/// read-ahead window around it (8 MiB on some virtio disks), so a 10 MiB binary is in memory, all of it charged,
/// before `main` starts, though an import runs a small part of it. The executable's clean mappings (code, read-only
/// data) are unmapped and refault from the file on the next access, now one page per fault; the relocated ones
/// (holding anonymous copies) are left alone. Best effort: nothing fails if it cannot be done.
pub fn shed_executable_cache() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else { return };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return };
    let mut clean_ranges = Vec::new();
    let mut current: Option<(usize, usize, bool)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            // A mapping's header: "start-end perms offset dev inode path".
            clean_ranges.extend(current.take().filter(|&(_, _, clean)| clean).map(|(s, e, _)| (s, e)));
            let perms = fields.next().unwrap_or("");
            let ours = fields.nth(3).is_some_and(|path| std::path::Path::new(path) == exe);
            if let (true, Ok(start), Ok(end)) = (ours, usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
            {
                // SAFETY: advice on our own mapping of our executable; MADV_RANDOM changes no contents.
                unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_RANDOM) };
                current = Some((start, end, !perms.contains('w')));
            }
        } else if let (Some(current), "Anonymous:") = (current.as_mut(), first) {
            // Pages copied on write (relocations) exist only in this mapping: it must stay.
            current.2 &= fields.next() == Some("0");
        }
    }
    clean_ranges.extend(current.filter(|&(_, _, clean)| clean).map(|(s, e, _)| (s, e)));
    for (start, end) in clean_ranges {
        // SAFETY: a private, read-only mapping of our executable with no anonymous pages: dropping its page table
        // entries loses nothing, and every later access refaults the same bytes from the file.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
    if let Ok(file) = File::open(&exe) {
        let _ = fadvise(&file, 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// The highest resident set this process has reached (anonymous memory and mapped file pages), in bytes.
pub fn peak_rss() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid selector.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    // Linux reports kilobytes.
    usage.ru_maxrss.max(0) as u64 * 1024
}

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// A fresh private anonymous read-write mapping of `len` bytes (zeroed, charged page by page as it is touched).
/// The caller owns it and unmaps it with `munmap`.
pub fn map_anonymous(len: usize) -> io::Result<std::ptr::NonNull<u8>> {
    // SAFETY: no address hint and no file: the kernel picks a free range that nothing else refers to.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    std::ptr::NonNull::new(raw.cast()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux applies setpriority(PRIO_PROCESS, tid) to
/// one thread). Raising the nice value needs no privilege.
pub fn lower_thread_priority(nice: libc::c_int) -> io::Result<()> {
    // SAFETY: gettid and setpriority take no pointers.
    let tid = unsafe { libc::gettid() };
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fdatasync, retrying on EINTR.
pub fn fdatasync(file: &File) -> io::Result<()> {
    loop {
        match file.sync_data() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn regular_file_size_and_holes() {
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all(&[1u8; 4096]).unwrap();
        assert_eq!(file_or_device_size(&file).unwrap(), 8 << 20);
        assert!(!is_block_device(&file).unwrap());
        let (start, end) = next_data_run(&file, 0).unwrap().expect("data at 0");
        assert_eq!(start, 0);
        assert!((4096..=8 << 20).contains(&end));
    }

    #[test]
    fn write_behind_calls_accept_a_regular_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 65536]).unwrap();
        start_writeback(&file, 0, 65536).unwrap();
        wait_writeback(&file, 0, 65536).unwrap();
        drop_cache(&file, 0, 65536).unwrap();
        fdatasync(&file).unwrap();
        if let Some(cache) = cachestat(&file).unwrap() {
            assert_eq!((cache.dirty, cache.writeback), (0, 0));
            file.write_all(&[8u8; 8192]).unwrap();
            let after = cachestat(&file).unwrap().unwrap();
            assert!(after.dirty >= 8192, "{after:?}");
        }
    }
}
