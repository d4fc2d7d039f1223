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

/// Largest table read into memory from a stream (8 MiB: 2 M entries of 4 bytes, every vhd's BAT with 2 MiB blocks,
/// a 2 TiB vdi's block map).
pub const MAX_TABLE_BYTES: u64 = 8 << 20;

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
                // A file cut short: refused, as the random-access reader refuses it, never read as zeros.
                return Err(cursor.bad(
                    format!("image data lies past the end of the stream ({host} bytes): the image is truncated"),
                    host,
                ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Stream bytes kept in memory, by offset.
    #[derive(Default)]
    struct Kept(BTreeMap<u64, Vec<u8>>, u64);

    impl Stash for Kept {
        fn put(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
            self.1 += bytes.len() as u64;
            for (i, &b) in bytes.iter().enumerate() {
                self.0.insert(at + i as u64, vec![b]);
            }
            Ok(())
        }

        fn get(&self, at: u64, out: &mut [u8]) -> Result<bool> {
            for (i, slot) in out.iter_mut().enumerate() {
                match self.0.get(&(at + i as u64)) {
                    Some(b) => *slot = b[0],
                    None => return Ok(false),
                }
            }
            Ok(true)
        }

        fn kept(&self) -> u64 {
            self.1
        }
    }

    /// A disk in memory that refuses the first `refusals` placements (as a full chunk pool would).
    struct Disk {
        bytes: Vec<u8>,
        resolved: Vec<bool>,
        refusals: usize,
    }

    impl Placement for Disk {
        fn chunk(&self) -> u64 {
            4096
        }
        fn begin(&mut self, size: u64) -> Result<()> {
            self.bytes = vec![0xee; size as usize];
            self.resolved = vec![false; size as usize];
            Ok(())
        }
        fn data(&mut self, guest: u64, bytes: &[u8]) -> Result<bool> {
            if self.refusals > 0 {
                self.refusals -= 1;
                return Ok(false);
            }
            let at = guest as usize;
            self.bytes[at..at + bytes.len()].copy_from_slice(bytes);
            self.resolved[at..at + bytes.len()].fill(true);
            Ok(true)
        }
        fn zero(&mut self, guest: u64, len: u64) -> Result<()> {
            let (at, end) = (guest as usize, (guest + len) as usize);
            self.bytes[at..end].fill(0);
            self.resolved[at..end].fill(true);
            Ok(())
        }
        fn has_buffer(&self, _: u64) -> bool {
            false
        }
        fn finish(&mut self) -> Result<()> {
            assert!(self.resolved.iter().all(|&r| r), "unresolved guest bytes");
            Ok(())
        }
    }

    /// A stream whose one data block (guest 8192..12288, at 512) comes before the table naming it (at 4608), and
    /// whose second block (guest 0..4096, at 8192) comes after; each placed by the table, the first from the stash.
    #[test]
    fn data_before_its_table_is_stashed_and_placed_from_there() {
        let mut stream = vec![0u8; 12288];
        stream[512..4608].fill(0xa1);
        stream[4608..4616].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 16]);
        stream[8192..12288].fill(0xb2);
        for refusals in [0, 2] {
            let stop = AtomicBool::new(false);
            let mut kept = Kept::default();
            let mut reader = &stream[..];
            let mut cursor = TableCursor::new(&mut reader, "test", &mut kept, &stop);
            cursor.ignore(0, 512);
            let table = cursor.meta(4608, 8, "the table").unwrap();
            let mut runs = Runs::default();
            for (i, sector) in table.chunks_exact(4).enumerate() {
                let sector = u32::from_be_bytes(sector.try_into().unwrap()) as u64;
                runs.push("test", sector * 512, [8192, 0][i], 4096).unwrap();
            }
            let mut disk = Disk { bytes: Vec::new(), resolved: Vec::new(), refusals };
            disk.begin(16384).unwrap();
            let stashed = place_runs(cursor, runs, 16384, &mut disk).unwrap();
            assert!(disk.bytes[8192..12288].iter().all(|&b| b == 0xa1), "refusals {refusals}");
            assert!(disk.bytes[..4096].iter().all(|&b| b == 0xb2), "refusals {refusals}");
            assert!(disk.bytes[4096..8192].iter().chain(&disk.bytes[12288..]).all(|&b| b == 0));
            // The block before the table is kept; a refused block after it is kept too.
            assert_eq!(stashed, 4096 + if refusals > 1 { 4096 } else { 0 }, "refusals {refusals}");
        }
    }

    #[test]
    fn a_table_naming_bytes_passed_and_not_kept_is_an_error() {
        let stream = vec![0u8; 8192];
        let stop = AtomicBool::new(false);
        let mut kept = Kept::default();
        let mut reader = &stream[..];
        let mut cursor = TableCursor::new(&mut reader, "test", &mut kept, &stop);
        cursor.data_starts_at(4096);
        cursor.meta(4096, 8, "the table").unwrap();
        let mut runs = Runs::default();
        runs.push("test", 512, 0, 512).unwrap();
        let mut disk = Disk { bytes: Vec::new(), resolved: Vec::new(), refusals: 0 };
        disk.begin(4096).unwrap();
        let err = place_runs(cursor, runs, 4096, &mut disk).unwrap_err();
        assert!(err.to_string().contains("not kept"), "{err}");
    }

    #[test]
    fn tables_larger_than_the_cap_are_refused_before_allocating() {
        let stop = AtomicBool::new(false);
        let mut kept = Kept::default();
        let mut reader: &[u8] = &[];
        let mut cursor = TableCursor::new(&mut reader, "test", &mut kept, &stop);
        let err = cursor.meta(0, MAX_TABLE_BYTES + 1, "the BAT").unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Unsupported, "{err}");
    }
}
