//! Forward-only byte streams: a [`ReadAt`] read front to back ([`ReadAtReader`]), a checksum tap on a stream
//! ([`HashingReader`]), a reader that can look at its first bytes before handing them on ([`Peek`]), and one that
//! ends when a stop is asked for ([`StopReader`]).

use super::ReadAt;
use crate::buffer::AlignedBuf;
use crate::checksum::{Algorithm, Hasher};
use crate::error::Error;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Size of each read a [`ReadAtReader`] makes: aligned, so an O_DIRECT file is read without a bounce buffer.
pub const SEQUENTIAL_READ: usize = 1 << 20;

/// A [`ReadAt`] source as a [`Read`] stream from offset 0.
pub struct ReadAtReader {
    source: Arc<dyn ReadAt>,
    buf: AlignedBuf,
    /// Source offset of `buf[0]`.
    base: u64,
    filled: usize,
    used: usize,
}

impl ReadAtReader {
    /// Reads `source` from its start.
    pub fn new(source: Arc<dyn ReadAt>) -> Self {
        ReadAtReader { source, buf: AlignedBuf::new(SEQUENTIAL_READ), base: 0, filled: 0, used: 0 }
    }
}

impl Read for ReadAtReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.used == self.filled {
            self.base += self.filled as u64;
            self.used = 0;
            self.filled = self.source.read_at(self.base, &mut self.buf).map_err(io::Error::other)?;
            if self.filled == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.filled - self.used);
        out[..n].copy_from_slice(&self.buf[self.used..self.used + n]);
        self.used += n;
        Ok(n)
    }
}

/// A stream that fails once `stop` is raised (a stop signal), so a consumer that only reads ends promptly.
pub struct StopReader<'a, R> {
    inner: R,
    stop: &'a AtomicBool,
}

impl<'a, R: Read> StopReader<'a, R> {
    /// `inner`, ended by `stop`.
    pub fn new(inner: R, stop: &'a AtomicBool) -> Self {
        StopReader { inner, stop }
    }
}

impl<R: Read> Read for StopReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            // Not ErrorKind::Interrupted: read_exact would retry that forever.
            return Err(io::Error::other("stopped by a signal"));
        }
        self.inner.read(buf)
    }
}

/// The shared end of a [`HashingReader`]: the digest so far and the number of bytes read.
#[derive(Clone)]
pub struct StreamTap {
    hasher: Arc<Mutex<Option<Hasher>>>,
    bytes: Arc<AtomicU64>,
}

impl StreamTap {
    /// A tap digesting with `algorithm`, or only counting bytes when `None`.
    pub fn new(algorithm: Option<Algorithm>) -> Self {
        StreamTap { hasher: Arc::new(Mutex::new(algorithm.map(Hasher::new))), bytes: Arc::new(AtomicU64::new(0)) }
    }

    /// Bytes that passed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The digest of everything that passed (`None` when only counting).
    pub fn finish(&self) -> Option<Vec<u8>> {
        self.hasher.lock().unwrap_or_else(|p| p.into_inner()).take().map(Hasher::finish)
    }
}

/// A [`Read`] that feeds every byte it passes on to a [`StreamTap`].
pub struct HashingReader<R> {
    inner: R,
    tap: StreamTap,
}

impl<R: Read> HashingReader<R> {
    /// Taps `inner` into `tap`.
    pub fn new(inner: R, tap: StreamTap) -> Self {
        HashingReader { inner, tap }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        if let Some(h) = self.tap.hasher.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            h.update(&out[..n]);
        }
        self.tap.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A reader whose first bytes can be looked at before they are read.
pub struct Peek {
    head: Vec<u8>,
    at: usize,
    inner: Box<dyn Read + Send>,
}

impl Peek {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Read + Send>) -> Self {
        Peek { head: Vec::new(), at: 0, inner }
    }

    /// Up to the first `n` bytes not yet read (fewer only at the end of the stream).
    pub fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.at > 0 {
            self.head.drain(..self.at);
            self.at = 0;
        }
        while self.head.len() < n {
            let old = self.head.len();
            self.head.resize(n, 0);
            match self.inner.read(&mut self.head[old..]) {
                Ok(0) => {
                    self.head.truncate(old);
                    break;
                }
                Ok(got) => self.head.truncate(old + got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.head.truncate(old),
                Err(e) => {
                    self.head.truncate(old);
                    return Err(e);
                }
            }
        }
        Ok(&self.head[..n.min(self.head.len())])
    }
}

impl Read for Peek {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at < self.head.len() {
            let n = out.len().min(self.head.len() - self.at);
            out[..n].copy_from_slice(&self.head[self.at..self.at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Ok(n);
        }
        self.inner.read(out)
    }
}

/// Turns an error from a stream back into the crate's error: an [`Error`] carried inside the `io::Error` (from the
/// HTTP layer or a decompressor) as it is, anything else as an I/O error reading `name` at `offset`.
pub fn stream_error(e: io::Error, name: &str, offset: u64) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        return *e.into_inner().expect("checked").downcast::<Error>().expect("checked");
    }
    Error::io("reading the source stream", e).at_offset(offset).at_path(name)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
pub fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeked_bytes_are_read_again() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut peek = Peek::new(Box::new(io::Cursor::new(data.clone())));
        assert_eq!(peek.peek(6).unwrap(), &data[..6]);
        assert_eq!(peek.peek(10).unwrap(), &data[..10]);
        let mut first = [0u8; 3];
        peek.read_exact(&mut first).unwrap();
        assert_eq!(peek.peek(4).unwrap(), &data[3..7]);
        let mut rest = Vec::new();
        peek.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, &data[3..]);
        assert_eq!(peek.peek(4).unwrap(), &[] as &[u8]);
    }
}
