//! A streaming tar reader: ustar, GNU (long names, old-style sparse files) and pax (path, linkpath, size, mtime,
//! sparse format 1.0), read forward only from any `Read`.
//!
//! Every size a header states is capped before it sizes an allocation: long names and pax records at
//! [`MAX_META`], sparse maps at [`MAX_SPARSE_SEGMENTS`]. Entry data is never held whole: callers receive it in
//! chunks with the offset it belongs at.

use crate::error::{Error, Result};
use std::io::Read;

/// Tar block size.
pub const BLOCK: usize = 512;

/// Largest GNU long name or pax header accepted.
pub const MAX_META: u64 = 1 << 20;

/// Most sparse segments accepted for one file.
pub const MAX_SPARSE_SEGMENTS: usize = 1 << 18;

/// Chunk size handed to data callbacks.
const CHUNK: usize = 1 << 20;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (also contiguous files and sparse files).
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A hard link to an earlier entry.
    HardLink,
    /// A character or block device, FIFO, or anything else that is not extracted.
    Other(u8),
}

/// How an entry's data is laid out in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// `stored` bytes, contiguous from offset 0.
    Plain,
    /// Data segments `(offset, len)` stored back to back; everything else is a hole.
    Sparse(Vec<(u64, u64)>),
}

/// One archive member.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path inside the archive, as bytes.
    pub path: Vec<u8>,
    /// Link target for symlinks and hard links.
    pub link: Vec<u8>,
    /// What it is.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Logical file size (for sparse files, including holes).
    pub size: u64,
    /// Bytes of data stored in the stream.
    stored: u64,
    layout: Layout,
}

impl Entry {
    /// Whether the entry is a sparse file (its holes are not stored).
    pub fn is_sparse(&self) -> bool {
        self.layout != Layout::Plain
    }
}

/// Reads entries from a tar stream.
pub struct TarReader<R> {
    inner: R,
    /// Bytes consumed from the stream.
    position: u64,
    /// Unread bytes (data and padding) of the current entry.
    pending: u64,
    /// The current entry's data has been handed out or skipped.
    done: bool,
}

impl<R: Read> TarReader<R> {
    /// A reader at the start of a tar stream.
    pub fn new(inner: R) -> Self {
        TarReader { inner, position: 0, pending: 0, done: true }
    }

    /// Bytes consumed from the stream so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The underlying reader, positioned after what was consumed.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next entry, or `None` at the end of the archive. Unread data of the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        self.skip(self.pending)?;
        self.pending = 0;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let header_at = self.position;
            let mut header = [0u8; BLOCK];
            if !self.read_block_or_eof(&mut header)? {
                // A stream that simply ends after the last entry (no end blocks) is accepted.
                return Ok(None);
            }
            if header.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            verify_checksum(&header).map_err(|e| e.at_offset(header_at))?;
            let typeflag = header[156];
            let stored = parse_number(&header[124..136]).map_err(|e| e.at_offset(header_at))?;
            match typeflag {
                b'L' | b'K' | b'x' | b'g' => {
                    if stored > MAX_META {
                        return Err(Error::bad_image(format!(
                            "tar extension header of {stored} bytes (more than {MAX_META})"
                        ))
                        .at_offset(header_at));
                    }
                    let mut data = vec![0u8; stored as usize];
                    self.read_exact(&mut data)?;
                    self.skip(padding(stored))?;
                    match typeflag {
                        b'L' => long_name = Some(trim_nul(&data).to_vec()),
                        b'K' => long_link = Some(trim_nul(&data).to_vec()),
                        b'x' => pax = parse_pax(&data).map_err(|e| e.at_offset(header_at))?,
                        _ => log::debug!("ignoring a pax global header at offset {header_at}"),
                    }
                    continue;
                }
                _ => {}
            }
            let mut entry = self.entry_from_header(&header, stored, header_at)?;
            if let Some(name) = long_name.take() {
                entry.path = name;
            }
            if let Some(link) = long_link.take() {
                entry.link = link;
            }
            self.apply_pax(&mut entry, &pax, header_at)?;
            self.pending = entry.stored + padding(entry.stored);
            self.done = false;
            return Ok(Some(entry));
        }
    }

    /// Hands the current entry's data to `sink` as `(offset in the file, bytes)` chunks, in increasing offset
    /// order; holes of sparse files are not handed out.
    pub fn read_data(&mut self, entry: &Entry, mut sink: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        if self.done {
            return Err(Error::bad_image("tar entry data read twice"));
        }
        self.done = true;
        let segments = match &entry.layout {
            Layout::Plain => vec![(0, entry.stored)],
            Layout::Sparse(map) => map.clone(),
        };
        let mut buf = vec![0u8; CHUNK.min(entry.stored.max(1) as usize)];
        let mut consumed = 0u64;
        for (offset, len) in segments {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                self.read_exact(&mut buf[..n])?;
                sink(offset + done, &buf[..n])?;
                done += n as u64;
            }
            consumed += len;
        }
        let rest = self.pending - consumed;
        self.skip(rest)?;
        self.pending = 0;
        Ok(())
    }

    /// Reads the next bytes of the current entry's data into `buf` (pull-style, for a consumer that is itself a
    /// reader); returns 0 at the end of the data, after skipping its padding. Sparse entries are refused: their
    /// holes have no bytes in the stream to hand out in order.
    pub fn read_plain(&mut self, entry: &Entry, buf: &mut [u8]) -> Result<usize> {
        if entry.layout != Layout::Plain {
            return Err(Error::unsupported("a sparse tar entry read as a stream"));
        }
        if self.done {
            return Ok(0);
        }
        let pad = padding(entry.stored);
        let left = self.pending.saturating_sub(pad);
        if left == 0 {
            self.skip(self.pending)?;
            self.pending = 0;
            self.done = true;
            return Ok(0);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let want = left.min(buf.len() as u64) as usize;
        loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(Error::bad_image("tar stream ends inside an entry").at_offset(self.position)),
                Ok(n) => {
                    self.position += n as u64;
                    self.pending -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(archive_error(e, self.position)),
            }
        }
    }

    fn entry_from_header(&mut self, header: &[u8; BLOCK], stored: u64, header_at: u64) -> Result<Entry> {
        let ustar = &header[257..263] == b"ustar\0";
        let mut path = trim_nul(&header[0..100]).to_vec();
        if ustar {
            let prefix = trim_nul(&header[345..500]);
            if !prefix.is_empty() {
                let mut full = prefix.to_vec();
                full.push(b'/');
                full.extend_from_slice(&path);
                path = full;
            }
        }
        let typeflag = header[156];
        let kind = match typeflag {
            b'0' | 0 | b'7' | b'S' => Kind::File,
            b'5' | b'D' => Kind::Directory,
            b'2' => Kind::Symlink,
            b'1' => Kind::HardLink,
            b'M' => return Err(Error::unsupported("multi-volume tar archives").at_offset(header_at)),
            // Old tar writes directories as regular files whose name ends in a slash.
            _ if path.ends_with(b"/") => Kind::Directory,
            other => Kind::Other(other),
        };
        let kind = if kind == Kind::File && path.ends_with(b"/") && typeflag != b'S' { Kind::Directory } else { kind };
        let mode = parse_number(&header[100..108]).map_err(|e| e.at_offset(header_at))? as u32;
        let mtime = parse_number(&header[136..148]).unwrap_or(0) as i64;
        let mut entry = Entry {
            path,
            link: trim_nul(&header[157..257]).to_vec(),
            kind,
            mode,
            mtime,
            size: stored,
            stored,
            layout: Layout::Plain,
        };
        // Directories, links and devices carry no data whatever their size field says (GNU dumpdirs do: skipped).
        if matches!(entry.kind, Kind::Symlink | Kind::HardLink) {
            entry.stored = 0;
            entry.size = 0;
        }
        if typeflag == b'S' {
            self.read_gnu_sparse(header, &mut entry, header_at)?;
        }
        Ok(entry)
    }

    /// Old GNU sparse files: up to four segments in the header, more in extension blocks that follow it.
    fn read_gnu_sparse(&mut self, header: &[u8; BLOCK], entry: &mut Entry, header_at: u64) -> Result<()> {
        let mut map = Vec::new();
        push_sparse(&mut map, &header[386..482], 4, header_at)?;
        let mut extended = header[482] != 0;
        while extended {
            let at = self.position;
            let mut block = [0u8; BLOCK];
            self.read_exact(&mut block)?;
            push_sparse(&mut map, &block[..504], 21, at)?;
            extended = block[504] != 0;
        }
        entry.size = parse_number(&header[483..495]).map_err(|e| e.at_offset(header_at))?;
        entry.layout = checked_layout(map, entry.stored, entry.size, header_at)?;
        Ok(())
    }

    fn apply_pax(&mut self, entry: &mut Entry, pax: &[(String, Vec<u8>)], header_at: u64) -> Result<()> {
        let text = |v: &[u8]| String::from_utf8_lossy(v).trim().to_string();
        let mut sparse_major = None;
        let mut sparse_minor = None;
        let mut real_size = None;
        // Sparse formats 0.0 (offset/numbytes pairs of keys) and 0.1 (one comma-separated map).
        let mut listed: Vec<u64> = Vec::new();
        for (key, value) in pax {
            match key.as_str() {
                "path" => entry.path = value.clone(),
                "linkpath" => entry.link = value.clone(),
                "size" => {
                    let size =
                        text(value).parse().map_err(|_| Error::bad_image("bad pax size").at_offset(header_at))?;
                    if entry.kind == Kind::File || entry.kind == Kind::Directory {
                        entry.stored = size;
                        entry.size = size;
                    }
                }
                "mtime" => {
                    let whole = text(value);
                    let seconds = whole.split('.').next().unwrap_or("0");
                    entry.mtime = seconds.parse().unwrap_or(entry.mtime);
                }
                "GNU.sparse.major" => sparse_major = text(value).parse::<u32>().ok(),
                "GNU.sparse.minor" => sparse_minor = text(value).parse::<u32>().ok(),
                "GNU.sparse.name" => entry.path = value.clone(),
                "GNU.sparse.realsize" | "GNU.sparse.size" => real_size = text(value).parse::<u64>().ok(),
                "GNU.sparse.offset" | "GNU.sparse.numbytes" | "GNU.sparse.map" => {
                    for number in text(value).split(',').filter(|n| !n.is_empty()) {
                        if listed.len() >= 2 * MAX_SPARSE_SEGMENTS {
                            return Err(Error::bad_image("pax sparse map too long").at_offset(header_at));
                        }
                        listed.push(
                            number
                                .parse()
                                .map_err(|_| Error::bad_image("bad number in a pax sparse map").at_offset(header_at))?,
                        );
                    }
                }
                _ => {}
            }
        }
        match (sparse_major, sparse_minor) {
            (Some(1), Some(0)) => {
                // Sparse format 1.0: the map is at the start of the data, as decimal lines padded to a block.
                let real =
                    real_size.ok_or_else(|| Error::bad_image("pax sparse file without a size").at_offset(header_at))?;
                let (map, map_len) = self.read_pax_sparse_map(header_at)?;
                let stored = entry
                    .stored
                    .checked_sub(map_len)
                    .ok_or_else(|| Error::bad_image("pax sparse map longer than the entry").at_offset(header_at))?;
                // The map has been consumed; what is left of the entry is its data.
                self.pending = 0;
                entry.size = real;
                entry.layout = checked_layout(map, stored, real, header_at)?;
                // `pending` is recomputed by the caller from `stored`, which now excludes the map.
                entry.stored = stored;
            }
            (None, None) | (Some(0), _) if real_size.is_some() => {
                if listed.len() % 2 != 0 {
                    return Err(Error::bad_image("pax sparse map with an odd count").at_offset(header_at));
                }
                let map = listed.chunks(2).map(|pair| (pair[0], pair[1])).collect();
                entry.size = real_size.unwrap_or(0);
                entry.layout = checked_layout(map, entry.stored, entry.size, header_at)?;
            }
            (None, None) => {}
            (major, minor) => {
                return Err(Error::unsupported(format!(
                    "pax sparse format {}.{}",
                    major.unwrap_or(0),
                    minor.unwrap_or(0)
                ))
                .at_offset(header_at))
            }
        }
        Ok(())
    }

    /// Reads a sparse 1.0 map; returns it and the bytes it took (a multiple of the block size).
    fn read_pax_sparse_map(&mut self, header_at: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut block = [0u8; BLOCK];
        let mut pending: Vec<u8> = Vec::new();
        let mut used = 0u64;
        let mut numbers: Vec<u64> = Vec::new();
        let mut wanted: Option<usize> = None;
        loop {
            if let Some(count) = wanted {
                if numbers.len() == 1 + 2 * count {
                    break;
                }
            }
            if !pending.contains(&b'\n') {
                if pending.len() > 64 {
                    return Err(Error::bad_image("pax sparse map number too long").at_offset(header_at));
                }
                self.read_exact(&mut block)?;
                used += BLOCK as u64;
                pending.extend_from_slice(&block);
                continue;
            }
            let line_end = pending.iter().position(|&b| b == b'\n').unwrap_or(0);
            let number: u64 = std::str::from_utf8(&pending[..line_end])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::bad_image("bad number in a pax sparse map").at_offset(header_at))?;
            pending.drain(..=line_end);
            if wanted.is_none() {
                if number as usize > MAX_SPARSE_SEGMENTS {
                    return Err(Error::bad_image(format!("sparse map of {number} segments")).at_offset(header_at));
                }
                wanted = Some(number as usize);
            }
            numbers.push(number);
        }
        let map = numbers[1..].chunks(2).map(|pair| (pair[0], pair[1])).collect();
        Ok((map, used))
    }

    fn read_block_or_eof(&mut self, block: &mut [u8; BLOCK]) -> Result<bool> {
        let mut got = 0;
        while got < BLOCK {
            match self.inner.read(&mut block[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(Error::bad_image("tar stream ends inside a header").at_offset(self.position)),
                Ok(n) => {
                    got += n;
                    self.position += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(archive_error(e, self.position)),
            }
        }
        Ok(true)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            let at = self.position;
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::bad_image("tar stream ends inside an entry").at_offset(at)
            } else {
                archive_error(e, at)
            }
        })?;
        self.position += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, mut len: u64) -> Result<()> {
        let mut buf = [0u8; 8192];
        while len > 0 {
            let n = len.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..n])?;
            len -= n as u64;
        }
        Ok(())
    }
}

/// A failed read of the archive at `at`; an error of ours carried through the stream (a failed digest, a dropped
/// transfer) stays itself.
fn archive_error(e: std::io::Error, at: u64) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        return *e.into_inner().expect("checked").downcast::<Error>().expect("checked");
    }
    Error::io("reading the archive", e).at_offset(at)
}

/// Bytes of padding after `len` bytes of data.
fn padding(len: u64) -> u64 {
    (BLOCK as u64 - len % BLOCK as u64) % BLOCK as u64
}

fn trim_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// A numeric header field: octal text (space or NUL terminated), or GNU base-256 when the top bit is set.
fn parse_number(field: &[u8]) -> Result<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return Err(Error::bad_image("negative number in a tar header"));
        }
        let mut value: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            value = value
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or_else(|| Error::bad_image("number too large in a tar header"))?;
        }
        return Ok(value);
    }
    let text = trim_nul(field);
    let text = std::str::from_utf8(text)
        .map_err(|_| Error::bad_image("non-ASCII number in a tar header"))?
        .trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| Error::bad_image(format!("bad octal number {text:?} in a tar header")))
}

fn verify_checksum(header: &[u8; BLOCK]) -> Result<()> {
    let not_tar = || Error::bad_image("tar header checksum mismatch (not a tar archive, or corrupt)");
    let stated = parse_number(&header[148..156]).map_err(|_| not_tar())?;
    let unsigned: u64 =
        header.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { b' ' as u64 } else { b as u64 }).sum();
    let signed: i64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| if (148..156).contains(&i) { b' ' as i64 } else { b as i8 as i64 })
        .sum();
    if stated == unsigned || stated as i64 == signed {
        Ok(())
    } else {
        Err(not_tar())
    }
}

/// Parses pax records `LEN KEY=VALUE\n`.
fn parse_pax(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut records = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let space = data.iter().position(|&b| b == b' ').ok_or_else(|| Error::bad_image("malformed pax record"))?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&len| len > space + 1 && len <= data.len())
            .ok_or_else(|| Error::bad_image("malformed pax record length"))?;
        let record = &data[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(|| Error::bad_image("pax record without '='"))?;
        records.push((String::from_utf8_lossy(&record[..eq]).into_owned(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

fn push_sparse(map: &mut Vec<(u64, u64)>, area: &[u8], slots: usize, at: u64) -> Result<()> {
    for slot in 0..slots {
        let field = &area[slot * 24..slot * 24 + 24];
        if field[0] == 0 {
            break;
        }
        let offset = parse_number(&field[..12]).map_err(|e| e.at_offset(at))?;
        let len = parse_number(&field[12..]).map_err(|e| e.at_offset(at))?;
        if map.len() >= MAX_SPARSE_SEGMENTS {
            return Err(
                Error::bad_image(format!("sparse map of more than {MAX_SPARSE_SEGMENTS} segments")).at_offset(at)
            );
        }
        map.push((offset, len));
    }
    Ok(())
}

/// A sparse layout after checking that its segments are ordered, inside the file, and add up to what is stored.
fn checked_layout(map: Vec<(u64, u64)>, stored: u64, size: u64, at: u64) -> Result<Layout> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(offset, len) in &map {
        let seg_end = offset.checked_add(len).filter(|&e| e <= size && offset >= end);
        end = seg_end
            .ok_or_else(|| Error::bad_image("sparse map segments overlap or pass the file size").at_offset(at))?;
        total += len;
    }
    if total != stored {
        return Err(Error::bad_image(format!("sparse map covers {total} bytes but {stored} are stored")).at_offset(at));
    }
    Ok(Layout::Sparse(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header for `name` with the checksum filled in.
    fn header(name: &str, typeflag: u8, size: u64, link: &str) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000001\0");
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        seal(&mut h);
        h
    }

    fn seal(h: &mut [u8; BLOCK]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn member(out: &mut Vec<u8>, h: [u8; BLOCK], data: &[u8]) {
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len() + padding(data.len() as u64) as usize, 0);
    }

    fn collect(bytes: &[u8]) -> Result<Vec<(Entry, Vec<u8>)>> {
        let mut reader = TarReader::new(bytes);
        let mut out = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            let mut data = vec![0u8; entry.size as usize];
            if entry.kind == Kind::File {
                reader.read_data(&entry, |at, chunk| {
                    data[at as usize..at as usize + chunk.len()].copy_from_slice(chunk);
                    Ok(())
                })?;
            }
            out.push((entry, data));
        }
        Ok(out)
    }

    #[test]
    fn reads_ustar_members_and_gnu_long_names() {
        let mut tar = Vec::new();
        member(&mut tar, header("dir/", b'5', 0, ""), b"");
        member(&mut tar, header("dir/a.txt", b'0', 5, ""), b"hello");
        member(&mut tar, header("link", b'2', 0, "dir/a.txt"), b"");
        let long = format!("{}/file", "d".repeat(150));
        member(&mut tar, header("././@LongLink", b'L', long.len() as u64 + 1, ""), format!("{long}\0").as_bytes());
        member(&mut tar, header("truncated", b'0', 3, ""), b"abc");
        tar.extend_from_slice(&[0u8; 1024]);
        let entries = collect(&tar).unwrap();
        let summary: Vec<(Kind, String, Vec<u8>)> =
            entries.iter().map(|(e, d)| (e.kind, String::from_utf8_lossy(&e.path).into_owned(), d.clone())).collect();
        assert_eq!(
            summary,
            vec![
                (Kind::Directory, "dir/".into(), vec![]),
                (Kind::File, "dir/a.txt".into(), b"hello".to_vec()),
                (Kind::Symlink, "link".into(), vec![]),
                (Kind::File, long, b"abc".to_vec()),
            ]
        );
        assert_eq!(entries[2].0.link, b"dir/a.txt");
        assert_eq!(entries[1].0.mode, 0o644);
    }

    #[test]
    fn pax_overrides_path_and_size_is_capped() {
        let mut tar = Vec::new();
        let record = "24 path=über/long.name\n";
        assert_eq!(record.len(), 24);
        member(&mut tar, header("PaxHeader", b'x', record.len() as u64, ""), record.as_bytes());
        member(&mut tar, header("short", b'0', 2, ""), b"hi");
        let entries = collect(&tar).unwrap();
        assert_eq!(entries[0].0.path, "über/long.name".as_bytes());

        let mut huge = Vec::new();
        member(&mut huge, header("PaxHeader", b'x', MAX_META + 1, ""), b"");
        let err = collect(&huge).unwrap_err().to_string();
        assert!(err.contains("extension header"), "{err}");
    }

    #[test]
    fn gnu_sparse_files_place_segments_at_their_offsets() {
        let mut h = header("sparse.img", b'S', 8, "");
        // Segments: 4 bytes at 100, 4 bytes at 5000; real size 8192.
        h[257..265].copy_from_slice(b"ustar  \0");
        h[386..398].copy_from_slice(b"00000000144\0");
        h[398..410].copy_from_slice(b"00000000004\0");
        h[410..422].copy_from_slice(b"00000011610\0");
        h[422..434].copy_from_slice(b"00000000004\0");
        h[483..495].copy_from_slice(b"00000020000\0");
        seal(&mut h);
        let mut tar = Vec::new();
        member(&mut tar, h, b"AAAABBBB");
        let entries = collect(&tar).unwrap();
        let (entry, data) = &entries[0];
        assert_eq!(entry.size, 8192);
        assert_eq!(&data[100..104], b"AAAA");
        assert_eq!(&data[5000..5004], b"BBBB");
        assert_eq!(data.iter().filter(|&&b| b != 0).count(), 8);
    }

    #[test]
    fn garbage_is_refused() {
        let err = collect(&[0x42u8; 1024]).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        let mut short = Vec::new();
        member(&mut short, header("f", b'0', 100, ""), b"");
        short.truncate(BLOCK + 10);
        assert!(collect(&short).is_err());
        assert_eq!(parse_number(b"\x80\0\0\0\0\0\0\0\0\0\x01\0").unwrap(), 256);
    }
}
