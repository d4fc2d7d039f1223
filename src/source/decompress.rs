//! Compressed wrappers around an image (gzip, xz, zstd, bzip2, a zip of one file), detected by their magic bytes
//! and unwrapped as many times as the data says (an `image.qcow2.xz`, a `disk.raw.gz.xz`, a `disk.img.zip`).
//! Decompressor memory is capped: xz by a memory limit the stream's dictionary must fit, zstd by the largest window
//! it may ask for; bzip2's is fixed by the format (`BZIP2_DECODER_MEMORY` in budget.rs), zip's deflate window
//! is 32 KiB.

use super::sequential::Peek;
use crate::error::Error;
use std::fmt;
use std::io::{self, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Most wrappers unwrapped.
pub const MAX_LAYERS: usize = 4;
/// Largest zstd window accepted (log2): 128 MiB, zstd's own default limit for streaming decoders.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Input buffer of each decoder.
const DECODER_INPUT: usize = 128 << 10;

/// A compression wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip (`1f 8b`), one or more members.
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`), one or more streams.
    Xz,
    /// zstd (`28 b5 2f fd`), one or more frames.
    Zstd,
    /// bzip2 (`BZh`, a block size digit, then a block or end-of-stream magic), one or more streams.
    Bzip2,
    /// A zip archive (`PK 03 04`) of one file, stored or deflated ([`super::zip`]).
    Zip,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Zip => "zip",
        })
    }
}

/// Bytes [`sniff`] looks at.
pub const SNIFF_LEN: usize = 10;

/// Whether `head` starts a bzip2 stream: "BZh", the block size in hundreds of kB (1-9), then the magic of the
/// first block (the digits of pi) or of the end of an empty stream (of sqrt(pi)); "BZh" alone is too common.
fn is_bzip2(head: &[u8]) -> bool {
    const BLOCK: [u8; 6] = [0x31, 0x41, 0x59, 0x26, 0x53, 0x59];
    const END: [u8; 6] = [0x17, 0x72, 0x45, 0x38, 0x50, 0x90];
    head.len() >= 10
        && head.starts_with(b"BZh")
        && (b'1'..=b'9').contains(&head[3])
        && (head[4..10] == BLOCK || head[4..10] == END)
}

/// The wrapper `head` (the first [`SNIFF_LEN`] bytes of a stream) starts with, if any.
pub fn sniff(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Compression::Xz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if is_bzip2(head) {
        Some(Compression::Bzip2)
    } else if head.starts_with(b"PK\x03\x04") {
        Some(Compression::Zip)
    } else {
        None
    }
}

/// Unwraps every compression layer of `reader` (named `name` in messages); returns the innermost stream, ready to be
/// peeked, and the layers from outermost to innermost. `xz_memlimit` caps an xz decoder's memory.
pub fn unwrap_layers(
    reader: Box<dyn Read + Send>,
    name: &str,
    xz_memlimit: u64,
) -> Result<(Peek, Vec<Compression>), Error> {
    let mut peek = Peek::new(reader);
    let mut layers = Vec::new();
    loop {
        let head = peek.peek(SNIFF_LEN).map_err(|e| super::sequential::stream_error(e, name, 0))?;
        let Some(kind) = sniff(head) else {
            return Ok((peek, layers));
        };
        if layers.len() == MAX_LAYERS {
            return Err(Error::unsupported(format!("more than {MAX_LAYERS} nested compression layers")).at_path(name));
        }
        layers.push(kind);
        let consumed = Arc::new(AtomicU64::new(0));
        let input = Box::new(Counted { inner: Box::new(peek), consumed: consumed.clone() });
        let decoder = decoder(kind, input, name, xz_memlimit).map_err(|e| e.at_path(name))?;
        let labeled = Labeled { inner: decoder, kind, name: name.to_string(), limit: xz_memlimit, consumed };
        peek = Peek::new(Box::new(labeled));
    }
}

fn decoder(
    kind: Compression,
    input: Box<dyn Read + Send>,
    name: &str,
    xz_memlimit: u64,
) -> Result<Box<dyn Read + Send>, Error> {
    if kind == Compression::Zip {
        let (entry, entry_name) = super::zip::open(input, name)?;
        log::info!("{name}: reading zip entry {entry_name:?}");
        return Ok(Box::new(entry));
    }
    let buffered = BufReader::with_capacity(DECODER_INPUT, input);
    Ok(match kind {
        Compression::Zip => unreachable!("opened above"),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(buffered)),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(xz_memlimit, liblzma::stream::CONCATENATED)
                .map_err(|e| Error::unsupported(format!("starting the xz decoder: {e}")))?;
            Box::new(liblzma::bufread::XzDecoder::new_stream(buffered, stream))
        }
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| Error::unsupported(format!("starting the zstd decoder: {e}")))?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| Error::unsupported(format!("configuring the zstd decoder: {e}")))?;
            Box::new(decoder)
        }
    })
}

/// Counts the compressed bytes a decoder has taken in, for naming where corruption was met.
struct Counted {
    inner: Box<dyn Read + Send>,
    consumed: Arc<AtomicU64>,
}

impl Read for Counted {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.consumed.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Names the layer in a decoder's own errors, with the compressed offset the decoder had read up to (its input
/// buffer reads ahead by at most 128 KiB); errors from below (the network, an inner layer) pass unchanged.
struct Labeled {
    inner: Box<dyn Read + Send>,
    kind: Compression,
    name: String,
    limit: u64,
    consumed: Arc<AtomicU64>,
}

impl Read for Labeled {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.inner.read(out).map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                return e;
            }
            let text = e.to_string();
            let err = if text.to_ascii_lowercase().contains("memory") || text.contains("window") {
                Error::unsupported(format!(
                    "{} data needs more decoder memory than allowed ({} MiB for xz, a 2^{ZSTD_WINDOW_LOG_MAX}-byte window for zstd): {text}",
                    self.kind,
                    self.limit >> 20
                ))
            } else {
                Error::bad_image(format!(
                    "{} data is corrupt or truncated (in the compressed bytes read up to this offset): {text}",
                    self.kind
                ))
            };
            io::Error::other(err.at_offset(self.consumed.load(Ordering::Relaxed)).at_path(&self.name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn xz(data: &[u8], preset: u32) -> Vec<u8> {
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), preset);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn unwrap_all(bytes: Vec<u8>, limit: u64) -> Result<(Vec<u8>, Vec<Compression>), Error> {
        let (mut peek, layers) = unwrap_layers(Box::new(io::Cursor::new(bytes)), "test", limit)?;
        let mut out = Vec::new();
        peek.read_to_end(&mut out).map_err(|e| super::super::sequential::stream_error(e, "test", 0))?;
        Ok((out, layers))
    }

    #[test]
    fn nested_and_concatenated_layers_unwrap() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut members = gzip(&data[..1000]);
        members.extend(gzip(&data[1000..]));
        let wrapped = zstd::encode_all(&xz(&members, 1)[..], 3).unwrap();
        let (out, layers) = unwrap_all(wrapped, 64 << 20).unwrap();
        assert_eq!(layers, vec![Compression::Zstd, Compression::Xz, Compression::Gzip]);
        assert_eq!(out, data);
        let mut streams = xz(&data[..5], 0);
        streams.extend(xz(&data[5..], 0));
        assert_eq!(unwrap_all(streams, 64 << 20).unwrap().0, data);
    }

    #[test]
    fn bzip2_and_zip_are_sniffed_by_their_full_magic() {
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        enc.write_all(b"disk").unwrap();
        let bz = enc.finish().unwrap();
        assert_eq!(sniff(&bz[..SNIFF_LEN]), Some(Compression::Bzip2));
        let (out, layers) = unwrap_all(bz, 64 << 20).unwrap();
        assert_eq!((out.as_slice(), layers), (&b"disk"[..], vec![Compression::Bzip2]));
        // "BZh" alone, or with a block size but no block magic, is not bzip2.
        assert_eq!(sniff(b"BZh9 is not it"), None);
        assert_eq!(sniff(b"BZh"), None);
        assert_eq!(sniff(b"PK\x03\x04\x14\0\0\0\x08\0"), Some(Compression::Zip));
        assert_eq!(sniff(b"PK\x05\x06\0\0\0\0\0\0"), None);
    }

    #[test]
    fn xz_dictionary_over_the_limit_is_refused_and_corruption_named() {
        let data = vec![7u8; 100_000];
        let err = unwrap_all(xz(&data, 9), 16 << 20).unwrap_err();
        assert!(err.to_string().contains("decoder memory"), "{err}");
        let mut bad = gzip(&data);
        let n = bad.len();
        bad.truncate(n - 20);
        let err = unwrap_all(bad, 64 << 20).unwrap_err();
        assert!(err.to_string().contains("gzip data is corrupt or truncated"), "{err}");
        assert_eq!(err.offset(), Some((n - 20) as u64), "the compressed offset reached: {err}");
        // Corruption in the middle of an xz stream names an offset past it, where the decoder noticed (here the
        // block's check at its end), within the stream.
        let mut noise = vec![0u8; 600_000];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut bad = xz(&noise, 0);
        bad[400_000] ^= 0xff;
        let len = bad.len() as u64;
        let err = unwrap_all(bad, 64 << 20).unwrap_err();
        let offset = err.offset().expect("an offset");
        assert!((400_000..=len).contains(&offset), "{err}");
    }
}
