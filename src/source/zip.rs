//! A zip archive holding one image, read front to back (a Raspberry Pi or appliance download served without
//! Range, or a local `.zip`). The central directory sits at the end, so a stream only sees local headers: the
//! first file entry's data is the image (stored, or deflate); when it ends, its CRC-32 and sizes are checked
//! (from the local header, or from the data descriptor that follows the data when the header could not give
//! them), and the next record must be the central directory. A second file entry means the archive holds
//! several: refused, naming both, before the import can finish. Directory entries (a name ending in `/`, no
//! data) are passed over.

use super::sequential::stream_error;
use crate::bytes::{le16, le32, le64};
use crate::error::Error;
use std::io::{self, BufRead, BufReader, Read};

const LOCAL_HEADER: u32 = 0x0403_4b50;
const DATA_DESCRIPTOR: u32 = 0x0807_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_CENTRAL_DIRECTORY: u32 = 0x0605_4b50;
const ZIP64_END_OF_CENTRAL_DIRECTORY: u32 = 0x0606_4b50;
/// General purpose flag bit 0: the entry is encrypted.
const FLAG_ENCRYPTED: u16 = 1;
/// General purpose flag bit 3: CRC-32 and sizes follow the data in a data descriptor.
const FLAG_DESCRIPTOR: u16 = 1 << 3;
const METHOD_STORED: u16 = 0;
const METHOD_DEFLATE: u16 = 8;
/// Extra field holding 64-bit sizes.
const ZIP64_EXTRA: u16 = 0x0001;
/// Input buffer (deflate reads through it).
const INPUT_BUFFER: usize = 128 << 10;

/// A local file header.
#[derive(Debug, Clone)]
struct LocalHeader {
    /// Archive offset of the header.
    offset: u64,
    name: String,
    flags: u16,
    method: u16,
    crc: u32,
    compressed: u64,
    uncompressed: u64,
    /// Whether a zip64 extra field is present (a data descriptor then holds 8-byte sizes).
    zip64: bool,
}

impl LocalHeader {
    fn is_directory(&self) -> bool {
        self.name.ends_with('/') && self.uncompressed == 0 && self.flags & FLAG_DESCRIPTOR == 0
    }
}

/// The archive's bytes, counted.
struct Counted {
    inner: BufReader<Box<dyn Read + Send>>,
    pos: u64,
}

impl Read for Counted {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl BufRead for Counted {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.pos += n as u64;
        self.inner.consume(n)
    }
}

enum Body {
    Stored {
        input: Counted,
        left: u64,
    },
    Deflate(Box<flate2::bufread::DeflateDecoder<Counted>>),
    /// The entry ended and the rest of the archive checked out.
    Done,
}

/// The data of a zip archive's only file entry, as a stream.
pub struct ZipEntry {
    name: String,
    header: LocalHeader,
    body: Body,
    crc: crc32fast::Hasher,
    produced: u64,
    /// Archive offset where the entry's data starts.
    data_start: u64,
}

/// Reads exactly `buf.len()` bytes of the archive, or says which part it ends inside.
fn exact(input: &mut Counted, buf: &mut [u8], name: &str, what: &str) -> Result<(), Error> {
    let at = input.pos;
    let got = super::sequential::read_full(input, buf).map_err(|e| stream_error(e, name, at))?;
    if got < buf.len() {
        return Err(crate::bad_image!("zip archive ends inside {what}").at_offset(at).at_path(name));
    }
    Ok(())
}

/// Reads the next record's signature; `None` at the end of the archive.
fn signature(input: &mut Counted, name: &str) -> Result<Option<u32>, Error> {
    let at = input.pos;
    let mut sig = [0u8; 4];
    match super::sequential::read_full(input, &mut sig).map_err(|e| stream_error(e, name, at))? {
        0 => Ok(None),
        4 => Ok(Some(u32::from_le_bytes(sig))),
        _ => Err(crate::bad_image!("zip archive ends inside a record signature").at_offset(at).at_path(name)),
    }
}

/// Reads the rest of a local header whose signature was just read.
fn local_header(input: &mut Counted, name: &str) -> Result<LocalHeader, Error> {
    let offset = input.pos - 4;
    let mut fixed = [0u8; 30];
    exact(input, &mut fixed[4..], name, "a local file header")?;
    // Both lengths are u16: at most 64 KiB each.
    let mut variable = vec![0u8; le16(&fixed, 26) as usize + le16(&fixed, 28) as usize];
    exact(input, &mut variable, name, "a local file header")?;
    let (entry, mut extra) = variable.split_at(le16(&fixed, 26) as usize);
    let mut header = LocalHeader {
        offset,
        name: String::from_utf8_lossy(entry).into_owned(),
        flags: le16(&fixed, 6),
        method: le16(&fixed, 8),
        crc: le32(&fixed, 14),
        compressed: u64::from(le32(&fixed, 18)),
        uncompressed: u64::from(le32(&fixed, 22)),
        zip64: false,
    };
    while extra.len() >= 4 {
        let (id, len) = (le16(extra, 0), le16(extra, 2) as usize);
        let data = &extra[4..(4 + len).min(extra.len())];
        if id == ZIP64_EXTRA {
            header.zip64 = true;
            // In a local header the 64-bit sizes are present for the fields that say 0xffffffff, in this order.
            let mut at = 0;
            for field in [&mut header.uncompressed, &mut header.compressed] {
                if *field == u64::from(u32::MAX) && data.len() >= at + 8 {
                    *field = le64(data, at);
                    at += 8;
                }
            }
        }
        extra = &extra[(4 + len).min(extra.len())..];
    }
    Ok(header)
}

/// Opens the zip archive `input` (named `name`): reads up to the first file entry's data. Returns the entry's
/// stream and its name.
pub fn open(input: Box<dyn Read + Send>, name: &str) -> Result<(ZipEntry, String), Error> {
    let mut input = Counted { inner: BufReader::with_capacity(INPUT_BUFFER, input), pos: 0 };
    let mut next = signature(&mut input, name)?;
    let header = loop {
        if next != Some(LOCAL_HEADER) {
            return Err(crate::bad_image!("zip archive holds no file (only directories, or none)")
                .at_offset(input.pos)
                .at_path(name));
        }
        let header = local_header(&mut input, name)?;
        if !header.is_directory() {
            break header;
        }
        skip(&mut input, header.compressed, name)?;
        next = signature(&mut input, name)?;
    };
    let refuse = |what: String| Error::unsupported(what).at_offset(header.offset).at_path(name);
    if header.flags & FLAG_ENCRYPTED != 0 {
        return Err(refuse(format!("zip entry {:?} is encrypted", header.name)));
    }
    let data_start = input.pos;
    let body = match header.method {
        METHOD_STORED if header.flags & FLAG_DESCRIPTOR != 0 && header.compressed == 0 => {
            return Err(refuse(format!(
                "zip entry {:?} is stored without its size in the local header (written by a streaming zipper): \
                 it cannot be read as a stream; unzip it first",
                header.name
            )))
        }
        METHOD_STORED => Body::Stored { input, left: header.compressed },
        METHOD_DEFLATE => Body::Deflate(Box::new(flate2::bufread::DeflateDecoder::new(input))),
        other => {
            return Err(refuse(format!(
                "zip entry {:?} uses compression method {other}; only stored (0) and deflate (8) are read",
                header.name
            )))
        }
    };
    let entry = header.name.clone();
    Ok((
        ZipEntry { name: name.to_string(), header, body, crc: crc32fast::Hasher::new(), produced: 0, data_start },
        entry,
    ))
}

/// Reads and drops `len` bytes of the archive.
fn skip(input: &mut Counted, len: u64, name: &str) -> Result<(), Error> {
    let at = input.pos;
    let copied = io::copy(&mut input.take(len), &mut io::sink()).map_err(|e| stream_error(e, name, at))?;
    if copied < len {
        return Err(crate::bad_image!("zip archive ends inside a directory entry").at_offset(at).at_path(name));
    }
    Ok(())
}

impl ZipEntry {
    /// The entry's data ended (`input` is right after it): checks it against the header or data descriptor and
    /// checks that nothing but the central directory follows, reading it to the end.
    fn finish(&mut self, mut input: Counted) -> Result<(), Error> {
        let name = self.name.as_str();
        let h = &self.header;
        let compressed = input.pos - self.data_start;
        let (mut crc, mut stored_compressed, mut uncompressed) = (h.crc, h.compressed, h.uncompressed);
        if h.flags & FLAG_DESCRIPTOR != 0 {
            // The descriptor's own signature is optional: without it, the first four bytes are the CRC-32.
            let mut descriptor = [0u8; 24];
            let len = if h.zip64 { 24 } else { 16 };
            exact(&mut input, &mut descriptor[..4], name, "a data descriptor")?;
            let signed = le32(&descriptor, 0) == DATA_DESCRIPTOR;
            let end = if signed { len } else { len - 4 };
            exact(&mut input, &mut descriptor[4..end], name, "a data descriptor")?;
            let descriptor = &descriptor[if signed { 4 } else { 0 }..];
            crc = le32(descriptor, 0);
            (stored_compressed, uncompressed) = match h.zip64 {
                true => (le64(descriptor, 4), le64(descriptor, 12)),
                false => (u64::from(le32(descriptor, 4)), u64::from(le32(descriptor, 8))),
            };
        }
        let computed = std::mem::take(&mut self.crc).finalize();
        let bad = |what: String| crate::bad_image!("zip entry {:?}: {what}", h.name).at_offset(h.offset).at_path(name);
        if computed != crc {
            return Err(bad(format!("CRC-32 is {crc:#010x} but its data gives {computed:#010x}")));
        }
        // Without zip64 the sizes are kept modulo 2^32.
        let fits = |stored: u64, actual: u64| stored == actual || (!h.zip64 && stored == actual & 0xffff_ffff);
        if !fits(uncompressed, self.produced) || !fits(stored_compressed, compressed) {
            return Err(bad(format!(
                "sizes say {stored_compressed} bytes inflating to {uncompressed}, the data is {compressed} bytes \
                 inflating to {}",
                self.produced
            )));
        }
        loop {
            let at = input.pos;
            match signature(&mut input, name)? {
                Some(LOCAL_HEADER) => {
                    let next = local_header(&mut input, name)?;
                    if next.is_directory() {
                        skip(&mut input, next.compressed, name)?;
                        continue;
                    }
                    return Err(Error::unsupported(format!(
                        "zip archive holds several files ({:?} and {:?}, perhaps more): an image import reads a zip \
                         of one file; unzip it and import the one you mean",
                        h.name, next.name
                    ))
                    .at_offset(at)
                    .at_path(name));
                }
                Some(CENTRAL_HEADER | END_OF_CENTRAL_DIRECTORY | ZIP64_END_OF_CENTRAL_DIRECTORY) => break,
                Some(other) => {
                    return Err(crate::bad_image!(
                        "zip archive has an unknown record (signature {other:#010x}) after entry {:?}",
                        h.name
                    )
                    .at_offset(at)
                    .at_path(name))
                }
                None => {
                    return Err(crate::bad_image!("zip archive ends without its central directory")
                        .at_offset(at)
                        .at_path(name))
                }
            }
        }
        // The central directory and end record: read (the source checksum covers them) and not needed.
        let at = input.pos;
        io::copy(&mut input, &mut io::sink()).map_err(|e| stream_error(e, name, at))?;
        Ok(())
    }
}

impl Read for ZipEntry {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let n = match &mut self.body {
            Body::Done => return Ok(0),
            Body::Stored { input, left } if *left > 0 => {
                let want = out.len().min((*left).min(usize::MAX as u64) as usize);
                let at = input.pos;
                let n = input.read(&mut out[..want])?;
                if n == 0 {
                    let err = crate::bad_image!("zip archive ends inside entry {:?}", self.header.name);
                    return Err(io::Error::other(err.at_offset(at).at_path(&self.name)));
                }
                *left -= n as u64;
                n
            }
            Body::Stored { .. } => 0,
            Body::Deflate(decoder) => decoder.read(out).map_err(|e| {
                if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                    return e;
                }
                let err =
                    crate::bad_image!("zip entry {:?}: deflate data is corrupt or truncated: {e}", self.header.name)
                        .at_offset(decoder.get_ref().pos)
                        .at_path(&self.name);
                io::Error::other(err)
            })?,
        };
        if n > 0 {
            self.crc.update(&out[..n]);
            self.produced += n as u64;
            return Ok(n);
        }
        let input = match std::mem::replace(&mut self.body, Body::Done) {
            Body::Stored { input, .. } => input,
            Body::Deflate(decoder) => decoder.into_inner(),
            Body::Done => unreachable!("handled above"),
        };
        self.finish(input).map_err(io::Error::other)?;
        Ok(0)
    }
}
