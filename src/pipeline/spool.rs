//! The spool: stream bytes kept for later, keyed by their offset in the stream. In memory up to a small cap, then in
//! a file in the scratch directory, written and read back without leaving page cache (each write is waited for and
//! dropped, each read dropped after it).

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::stream::Stash;
use crate::size::human;
use crate::sys;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes kept in memory before the spool moves to a file.
pub const MEMORY_CAP: usize = 8 << 20;

/// Where a run of spooled bytes lives.
enum Place {
    Memory(Vec<u8>),
    File(u64),
}

struct Run {
    len: u64,
    place: Place,
}

/// Spooled stream bytes by stream offset.
pub struct Spool {
    name: String,
    dir: Option<PathBuf>,
    runs: BTreeMap<u64, Run>,
    memory: usize,
    file: Option<(tempfile::NamedTempFile, u64)>,
    /// Bytes spooled in all.
    pub bytes: u64,
}

impl Spool {
    /// A spool for the stream named `name`, with its file (if one is needed) in `dir`.
    pub fn new(name: &str, dir: Option<&Path>) -> Self {
        Spool {
            name: name.to_string(),
            dir: dir.map(Path::to_path_buf),
            runs: BTreeMap::new(),
            memory: 0,
            file: None,
            bytes: 0,
        }
    }

    /// Keeps `bytes`, which are stream bytes `[at, at + bytes.len())`.
    pub fn put(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.bytes += bytes.len() as u64;
        if self.memory + bytes.len() <= MEMORY_CAP && self.file.is_none() {
            self.memory += bytes.len();
            if let Some((&start, last)) = self.runs.range_mut(..=at).next_back() {
                if let (true, Place::Memory(data)) = (start + last.len == at, &mut last.place) {
                    data.extend_from_slice(bytes);
                    last.len += bytes.len() as u64;
                    return Ok(());
                }
            }
            self.runs.insert(at, Run { len: bytes.len() as u64, place: Place::Memory(bytes.to_vec()) });
            return Ok(());
        }
        let offset = self.append_to_file(bytes)?;
        if let Some((&start, last)) = self.runs.range_mut(..=at).next_back() {
            if let Place::File(file_at) = last.place {
                if start + last.len == at && file_at + last.len == offset {
                    last.len += bytes.len() as u64;
                    return Ok(());
                }
            }
        }
        self.runs.insert(at, Run { len: bytes.len() as u64, place: Place::File(offset) });
        Ok(())
    }

    fn append_to_file(&mut self, bytes: &[u8]) -> Result<u64> {
        if self.file.is_none() {
            let Some(dir) = &self.dir else {
                return Err(Error::new(
                    ErrorKind::NeedsScratch,
                    format!(
                        "this stream must be partly spooled, and more than {} of it does not fit in memory: pass --scratch DIR for a spool file",
                        human(MEMORY_CAP as u64)
                    ),
                )
                .at_path(&self.name));
            };
            let file = tempfile::Builder::new()
                .prefix("boundimport-spool-")
                .tempfile_in(dir)
                .io_context("creating a spool file")
                .map_err(|e| e.at_path(dir))?;
            log::info!("{}: spooling to {}", self.name, file.path().display());
            self.file = Some((file, 0));
        }
        let (file, len) = self.file.as_mut().expect("created above");
        let at = *len;
        let handle = file.as_file();
        let dir = self.dir.as_deref().expect("a spool file lives in its directory");
        let failed = |e, what| spool_write_error(e, what, file.path(), dir, at);
        handle.write_all_at(bytes, at).map_err(|e| failed(e, "writing the spool file"))?;
        sys::wait_writeback(handle, at, bytes.len() as u64)
            .and_then(|()| sys::drop_cache(handle, at, bytes.len() as u64))
            .map_err(|e| failed(e, "flushing the spool file"))?;
        *len += bytes.len() as u64;
        Ok(at)
    }

    /// Fills `out` with stream bytes `[at, at + out.len())`; `false` if any of them was not kept.
    pub fn get(&self, at: u64, out: &mut [u8]) -> Result<bool> {
        let end = at + out.len() as u64;
        let mut pos = at;
        while pos < end {
            let Some((&start, run)) = self.runs.range(..=pos).next_back() else {
                return Ok(false);
            };
            if start + run.len <= pos {
                return Ok(false);
            }
            let n = (start + run.len).min(end) - pos;
            let dst = &mut out[(pos - at) as usize..(pos - at + n) as usize];
            let skip = pos - start;
            match &run.place {
                Place::Memory(data) => dst.copy_from_slice(&data[skip as usize..(skip + n) as usize]),
                Place::File(file_at) => {
                    let (file, _) = self.file.as_ref().expect("file runs have a file");
                    let handle = file.as_file();
                    handle
                        .read_exact_at(dst, file_at + skip)
                        .and_then(|()| sys::drop_cache(handle, file_at + skip, n))
                        .io_context("reading the spool file")
                        .map_err(|e| e.at_path(file.path()))?;
                }
            }
            pos += n;
        }
        Ok(true)
    }
}

impl Stash for Spool {
    fn put(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        Spool::put(self, at, bytes)
    }

    fn get(&self, at: u64, out: &mut [u8]) -> Result<bool> {
        Spool::get(self, at, out)
    }

    fn kept(&self) -> u64 {
        self.bytes
    }
}

/// A failed write to a spool file: when the scratch space is full (ENOSPC, EDQUOT), a line that says so, naming
/// the scratch directory and how much was spooled, without the system's "No space left on device", which CDI's
/// controller takes for the image's own volume ("DataVolume too small"); any other error as it is.
fn spool_write_error(e: std::io::Error, operation: &str, file: &Path, dir: &Path, spooled: u64) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::new(
            ErrorKind::Io,
            format!(
                "the scratch space is full after spooling {spooled} bytes ({}) of the stream: the scratch volume, not \
                 the image's, needs more room",
                human(spooled)
            ),
        )
        .at_path(dir),
        _ => Error::io(operation, e).at_path(file),
    }
}

/// Copies a whole stream into a spool file in `dir`, written without leaving page cache; returns the file (removed
/// when dropped) and its length.
pub fn spool_all(
    reader: &mut dyn std::io::Read,
    name: &str,
    dir: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(tempfile::NamedTempFile, u64)> {
    let file = tempfile::Builder::new()
        .prefix("boundimport-spool-")
        .tempfile_in(dir)
        .io_context("creating a spool file")
        .map_err(|e| e.at_path(dir))?;
    log::info!("{name}: spooling the whole stream to {}", file.path().display());
    let handle = file.as_file();
    let mut buf = crate::buffer::AlignedBuf::new(4 << 20);
    let mut len = 0u64;
    let mut previous: Option<(u64, u64)> = None;
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::new(ErrorKind::Interrupted, "import stopped while spooling"));
        }
        let n = crate::source::sequential::read_full(reader, &mut buf)
            .map_err(|e| crate::source::sequential::stream_error(e, name, len))?;
        if n == 0 {
            break;
        }
        let failed = |e, what| spool_write_error(e, what, file.path(), dir, len);
        handle.write_all_at(&buf[..n], len).map_err(|e| failed(e, "writing the spool file"))?;
        sys::start_writeback(handle, len, n as u64).map_err(|e| failed(e, "writing the spool file"))?;
        // One write in flight while the next is read; the one before is waited for and dropped.
        if let Some((at, count)) = previous {
            sys::wait_writeback(handle, at, count)
                .and_then(|()| sys::drop_cache(handle, at, count))
                .map_err(|e| failed(e, "flushing the spool file"))?;
        }
        previous = Some((len, n as u64));
        len += n as u64;
    }
    if let Some((at, count)) = previous {
        sys::wait_writeback(handle, at, count)
            .and_then(|()| sys::drop_cache(handle, at, count))
            .map_err(|e| spool_write_error(e, "flushing the spool file", file.path(), dir, len))?;
    }
    Ok((file, len))
}
