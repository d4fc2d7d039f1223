//! Forward-only reading of table-first formats (dynamic vhd, vdi, monolithicSparse vmdk): a header, tables that map
//! guest blocks to file offsets, then the blocks. A walker reads its header and tables through [`TableCursor::meta`]
//! as the stream reaches them, turns them into [`Run`]s, and [`place_runs`] places each run's bytes as they pass.
//! Bytes the stream passes before the tables that map them wait in the [`Stash`] (every layout seen from Windows,
//! Hyper-V, VirtualBox, VMware and qemu puts its tables first, so nothing waits); so do bytes that find no free
//! chunk buffer because blocks arrive out of guest order.

use crate::error::{Error, Result};
use crate::format::stream::{Placement, Stash};
use crate::source::sequential::{read_full, stream_error};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest table read into memory from a stream (16 MiB: 4 M entries of 4 bytes, e.g. 8 TiB of 2 MiB vhd blocks).
pub const MAX_TABLE_BYTES: u64 = 16 << 20;

/// Most runs kept (24 bytes each); contiguous blocks merge into one run.
pub const MAX_RUNS: usize = 1 << 20;

/// Bytes read from the stream at a time.
const WINDOW: usize = 1 << 20;

/// Guest bytes `[guest, guest + len)` stored at stream offset `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Stream offset of the first byte.
    pub host: u64,
    /// Guest offset of the first byte.
    pub guest: u64,
    /// Length.
    pub len: u64,
}

/// Collects runs, merging each into the previous one when both are contiguous.
#[derive(Default)]
pub struct Runs {
    runs: Vec<Run>,
}

impl Runs {
    /// Adds guest `[guest, guest + len)` stored at `host`.
    pub fn push(&mut self, name: &str, host: u64, guest: u64, len: u64) -> Result<()> {
        if let Some(last) = self.runs.last_mut() {
            if last.host + last.len == host && last.guest + last.len == guest {
                last.len += len;
                return Ok(());
            }
        }
        if self.runs.len() >= MAX_RUNS {
            return Err(Error::unsupported(format!(
                "the image maps more than {MAX_RUNS} separate blocks, too many to track while streaming; import it \
                 from a random-access source (a local file, or a server that supports Range requests)"
            ))
            .at_path(name));
        }
        self.runs.push(Run { host, guest, len });
        Ok(())
    }
}

/// The stream, read forward, keeping what it passes over in the stash until the tables are read.
pub struct TableCursor<'a> {
    reader: &'a mut dyn Read,
    name: &'a str,
    stash: &'a mut dyn Stash,
    /// Stream offset of the next byte.
    pos: u64,
    /// Whether bytes passed over are still kept (until every table is read).
    keeping: bool,
    /// Stream ranges `[start, end)` where the format stores no data: passed bytes there are never kept.
    ignored: Vec<(u64, u64)>,
    stop: &'a AtomicBool,
}

impl<'a> TableCursor<'a> {
    /// A cursor at the start of `reader` (named `name` in errors).
    pub fn new(reader: &'a mut dyn Read, name: &'a str, stash: &'a mut dyn Stash, stop: &'a AtomicBool) -> Self {
        TableCursor { reader, name, stash, pos: 0, keeping: true, ignored: Vec::new(), stop }
    }

    /// Says that the format stores no data below stream offset `offset` (vdi's data area): padding passed before
    /// it is not kept.
    pub fn data_starts_at(&mut self, offset: u64) {
        self.ignore(0, offset);
    }

    /// Says that stream bytes `[at, at + len)` hold no data (a region of metadata not read): they are not kept.
    pub fn ignore(&mut self, at: u64, len: u64) {
        self.ignored.push((at, at.saturating_add(len)));
    }

    /// Keeps passed bytes `bytes` (stream offset `at`) that no ignored range covers.
    fn keep(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        let end = at + bytes.len() as u64;
        let mut ranges: Vec<(u64, u64)> =
            self.ignored.iter().filter(|&&(s, e)| s < end && e > at).map(|&(s, e)| (s.max(at), e.min(end))).collect();
        ranges.sort_unstable();
        let mut from = at;
        for (s, e) in ranges {
            if s > from {
                self.stash.put(from, &bytes[(from - at) as usize..(s - at) as usize])?;
            }
            from = from.max(e);
        }
        if from < end {
            self.stash.put(from, &bytes[(from - at) as usize..])?;
        }
        Ok(())
    }

    fn bad(&self, what: String, at: u64) -> Error {
        crate::bad_image!("{what}").at_offset(at).at_path(self.name)
    }

    fn check_stop(&self) -> Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(Error::new(crate::error::ErrorKind::Interrupted, "import stopped"));
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes at the cursor; fewer only at the end of the stream.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = read_full(self.reader, buf).map_err(|e| stream_error(e, self.name, self.pos))?;
        self.pos += n as u64;
        Ok(n)
    }

    /// Moves the cursor to `to`, keeping the bytes passed over while tables are still being read.
    fn pass_to(&mut self, to: u64, what: &str) -> Result<()> {
        let mut window = vec![0u8; WINDOW.min((to - self.pos) as usize)];
        while self.pos < to {
            self.check_stop()?;
            let at = self.pos;
            let n = ((to - at) as usize).min(window.len());
            if self.read(&mut window[..n])? < n {
                return Err(self.bad(format!("{what} at stream offset {to} lies past the end of the stream"), at));
            }
            if self.keeping {
                self.keep(at, &window[..n])?;
            }
        }
        Ok(())
    }

    /// The `len` bytes of metadata (`what`) at stream offset `at`: read when the stream reaches them, or from the
    /// stash if it already passed them.
    pub fn meta(&mut self, at: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        if len > MAX_TABLE_BYTES {
            return Err(Error::unsupported(format!(
                "{what} of {len} bytes is larger than the {MAX_TABLE_BYTES} bytes read from a stream; import it from \
                 a random-access source"
            ))
            .at_offset(at)
            .at_path(self.name));
        }
        let mut out = vec![0u8; len as usize];
        let end = at.checked_add(len).ok_or_else(|| self.bad(format!("{what} lies past any stream"), at))?;
        if at < self.pos {
            let kept = (end.min(self.pos) - at) as usize;
            if !self.stash.get(at, &mut out[..kept])? {
                return Err(self.bad(format!("{what} lies behind data already passed and not kept"), at));
            }
            if end <= self.pos {
                return Ok(out);
            }
        } else {
            self.pass_to(at, what)?;
        }
        let from = (self.pos - at) as usize;
        if self.read(&mut out[from..])? < len as usize - from {
            return Err(self.bad(format!("the stream ends inside {what}"), at));
        }
        // Not stashed: metadata is no image's data (one whose table pointed into it is refused when placed).
        Ok(out)
    }
}

/// A run's bytes that found no free chunk buffer, kept in the stash until the end.
struct Deferred {
    host: u64,
    guest: u64,
    len: u64,
}

/// Places every guest byte of a disk of `size` bytes: the gaps between `runs` as zeros, each run's bytes as the
/// stream passes them (or from the stash, when it passed them while tables were read). Reads the stream to its
/// end. Returns the bytes the stash holds.
pub fn place_runs(mut cursor: TableCursor, runs: Runs, size: u64, place: &mut dyn Placement) -> Result<u64> {
    let mut runs = runs.runs;
    // Zeros first: chunks complete as soon as their data arrives.
    runs.sort_unstable_by_key(|r| r.guest);
    let mut resolved = 0;
    for run in &runs {
        if run.guest < resolved || run.guest + run.len > size {
            return Err(cursor
                .bad(format!("the image maps guest offset {:#x} twice or past the disk's end", run.guest), run.host));
        }
        place.zero(resolved, run.guest - resolved)?;
        resolved = run.guest + run.len;
    }
    place.zero(resolved, size - resolved)?;
    cursor.keeping = false;
    runs.sort_unstable_by_key(|r| r.host);
    let mut deferred = Vec::new();
    let mut window = vec![0u8; WINDOW];
    for run in runs {
        let (mut host, mut guest, end) = (run.host, run.guest, run.host + run.len);
        if host < cursor.pos {
            // Passed while tables were being read: kept in the stash.
            let kept = end.min(cursor.pos) - host;
            let mut at = 0;
            while at < kept {
                let n = (kept - at).min(WINDOW as u64) as usize;
                if !cursor.stash.get(host + at, &mut window[..n])? {
                    return Err(cursor.bad(
                        format!("data of guest offset {:#x} was passed before its table and not kept", guest + at),
                        host + at,
                    ));
                }
                if !place.data(guest + at, &window[..n])? {
                    deferred.push(Deferred { host: host + at, guest: guest + at, len: n as u64 });
                }
                at += n as u64;
            }
            host += kept;
            guest += kept;
        }
        if host >= end {
            continue;
        }
        if host > cursor.pos {
            cursor.pass_to(host, "a data block")?;
        }
        while host < end {
            cursor.check_stop()?;
            let n = ((end - host) as usize).min(WINDOW);
            let got = cursor.read(&mut window[..n])?;
            if got == 0 {
                // The last block of a file cut short: the rest reads as zeros, as in the random-access reader.
                place.zero(guest, end - host)?;
                break;
            }
            if !place.data(guest, &window[..got])? {
                cursor.stash.put(host, &window[..got])?;
                deferred.push(Deferred { host, guest, len: got as u64 });
            }
            host += got as u64;
            guest += got as u64;
        }
    }
    // Chunks that already hold a buffer first, so they complete and free it.
    deferred.sort_by_key(|d| (!place.has_buffer(d.guest), d.guest));
    for piece in deferred {
        let mut bytes = vec![0u8; piece.len as usize];
        cursor.stash.get(piece.host, &mut bytes)?;
        if !place.data(piece.guest, &bytes)? {
            return Err(cursor.bad("out of chunk buffers while placing spooled blocks".into(), piece.host));
        }
    }
    place.finish()?;
    // The rest of the stream (a footer copy, trailing metadata) is read for the source checksum, and ignored.
    while cursor.read(&mut window)? > 0 {
        cursor.check_stop()?;
    }
    Ok(cursor.stash.kept())
}
