//! The image walk: layers in order, each read once (gzip, zstd or plain tar, detected by magic bytes), every blob
//! checked against its digest as it streams, until the first regular, non-whiteout file under `disk/` (or
//! `./disk/`) — the file CDI takes. Its bytes are the stream handed to the import engine.
//!
//! The last [`HOLD_BACK`] bytes of the disk are handed out only after the rest of its layer has been read and the
//! layer's digest checked: a corrupt or truncated layer fails the import before the image could be complete.

use super::manifest::Descriptor;
use super::{fail, verified, BlobStore};
use crate::error::{Error, ErrorKind, Result};
use crate::source::decompress::unwrap_layers;
use crate::source::sequential::{stream_error, Peek};
use crate::source::tar::{Entry, Kind, TarReader};
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

/// Bytes of the disk held back until its layer is verified.
pub const HOLD_BACK: usize = 64 << 10;
/// Memory an xz-compressed layer's decoder may use (layers are gzip or zstd in practice).
const LAYER_XZ_MEMLIMIT: u64 = 64 << 20;

/// Layer media types that are not tar streams (foreign or non-distributable layers are skipped, as their bytes are
/// elsewhere).
fn skipped_media_type(media_type: &str) -> bool {
    media_type.contains("nondistributable") || media_type.contains("foreign")
}

/// Whether a member path names the disk: a regular file under `disk/` or `./disk/`, not a whiteout.
pub fn is_disk_path(path: &[u8]) -> bool {
    let path = path.strip_prefix(b"./").unwrap_or(path);
    let path = path.strip_prefix(b"/").unwrap_or(path);
    let Some(rest) = path.strip_prefix(b"disk/") else { return false };
    let base = rest.rsplit(|&b| b == b'/').next().unwrap_or(rest);
    !rest.is_empty() && !base.is_empty() && !base.starts_with(b".wh.")
}

/// A blob (verified, read ahead on its own thread, so hashing overlaps decompression) shared between the
/// decompressor reading it and the walk that finishes it.
#[derive(Clone)]
struct Shared(Arc<Mutex<Prefetch>>);

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).read(buf)
    }
}

/// One layer being read: its blob (verified) and the tar walk over its decompressed bytes.
struct Layer {
    what: String,
    blob: Shared,
    tar: TarReader<Peek>,
}

impl Layer {
    fn open(image: &str, store: &dyn BlobStore, descriptor: &Descriptor, what: String) -> Result<Layer> {
        let size = descriptor.checked_size(image, &format!("reading {what}"), None)?;
        let raw = store.blob(&descriptor.digest, size)?;
        let checked = verified(raw, image, &what, &descriptor.digest, size);
        let blob = Shared(Arc::new(Mutex::new(Prefetch::new(Box::new(checked)))));
        let name = format!("{image} {what}");
        let (stream, compression) = unwrap_layers(Box::new(blob.clone()), &name, LAYER_XZ_MEMLIMIT)
            .map_err(|e| super::step_error(image, &format!("reading {what}"), e))?;
        log::debug!(
            "{image}: {what} ({}, {size} bytes, {})",
            descriptor.digest,
            if compression.is_empty() {
                "uncompressed".to_string()
            } else {
                compression.iter().map(ToString::to_string).collect::<Vec<_>>().join(" in ")
            }
        );
        Ok(Layer { what, blob, tar: TarReader::new(stream) })
    }

    fn error(&self, image: &str, e: Error) -> Error {
        // Errors already naming the image (a digest mismatch, a failed download) pass as they are.
        if e.path().is_some_and(|p| p.as_os_str() == image) {
            return e;
        }
        super::step_error(image, &format!("reading {}", self.what), e)
    }

    /// Reads the rest of the layer (the tar after the disk, the compression trailer, the blob's end) and checks
    /// its digest.
    fn finish(self, image: &str) -> Result<()> {
        let Layer { what, blob, tar } = self;
        let mut rest = tar.into_inner();
        let mut sink = vec![0u8; 64 << 10];
        loop {
            match rest.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(layer_error(image, &what, e)),
            }
        }
        // A decompressor may stop at the end of its stream: the blob's own end is what its digest covers.
        let mut blob = blob;
        loop {
            match blob.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(layer_error(image, &what, e)),
            }
        }
        // The verifier ends its stream only after the digest matched.
        let verified = blob.0.lock().unwrap_or_else(|p| p.into_inner()).finished();
        if !verified {
            return Err(fail(
                image,
                ErrorKind::BadImage,
                &format!("reading {what}"),
                "the layer was not read to its end",
            ));
        }
        Ok(())
    }
}

fn layer_error(image: &str, what: &str, e: io::Error) -> Error {
    let e = stream_error(e, image, 0);
    if e.path().is_some_and(|p| p.as_os_str() == image) {
        return e;
    }
    super::step_error(image, &format!("reading {what}"), e)
}

/// The disk file of an image, as a forward-only stream.
pub struct DiskReader {
    image: String,
    layer: Option<Layer>,
    entry: Entry,
    /// Disk bytes not yet read from the layer.
    left: u64,
    /// The disk's last bytes, read once the layer is verified.
    held: Vec<u8>,
    held_at: usize,
    /// An error already returned: every later read returns it again.
    failed: Option<String>,
}

impl DiskReader {
    /// Walks `layers` of `image` (bottom first) until the disk file; earlier layers are read to their end and
    /// verified on the way.
    pub fn open(image: &str, store: Arc<dyn BlobStore>, layers: Vec<Descriptor>) -> Result<DiskReader> {
        let count = layers.len();
        if count == 0 {
            return Err(fail(image, ErrorKind::BadImage, "reading the manifest", "the image has no layers"));
        }
        for (index, descriptor) in layers.iter().enumerate() {
            let what = format!("layer {} of {count} ({})", index + 1, descriptor.digest);
            if skipped_media_type(&descriptor.media_type) {
                log::warn!(
                    "{image}: skipping {what}: media type {} is not a distributable tar layer",
                    descriptor.media_type
                );
                continue;
            }
            let mut layer = Layer::open(image, store.as_ref(), descriptor, what)?;
            loop {
                let entry = match layer.tar.next_entry() {
                    Ok(Some(entry)) => entry,
                    Ok(None) => break,
                    Err(e) => return Err(layer.error(image, e)),
                };
                if !is_disk_path(&entry.path) {
                    continue;
                }
                let path = String::from_utf8_lossy(&entry.path).into_owned();
                let step = format!("reading {}", layer.what);
                match entry.kind {
                    Kind::File => {}
                    Kind::Directory => continue,
                    Kind::Symlink | Kind::HardLink => {
                        return Err(fail(
                            image,
                            ErrorKind::Unsupported,
                            &step,
                            format!("{path} is a link, not the disk file itself"),
                        ))
                    }
                    Kind::Other(flag) => {
                        return Err(fail(
                            image,
                            ErrorKind::Unsupported,
                            &step,
                            format!("{path} is a special file (tar type {:?})", flag as char),
                        ))
                    }
                }
                if entry.is_sparse() {
                    return Err(fail(
                        image,
                        ErrorKind::Unsupported,
                        &step,
                        format!("{path} is stored as a sparse tar member"),
                    ));
                }
                if entry.size == 0 {
                    return Err(fail(image, ErrorKind::BadImage, &step, format!("{path} is empty")));
                }
                log::info!("{image}: disk {path} ({} bytes) in {}", entry.size, layer.what);
                let left = entry.size;
                return Ok(DiskReader {
                    image: image.to_string(),
                    layer: Some(layer),
                    entry,
                    left,
                    held: Vec::new(),
                    held_at: 0,
                    failed: None,
                });
            }
            let name = layer.what.clone();
            layer.finish(image)?;
            log::debug!("{image}: {name} has no disk/ file");
        }
        Err(fail(
            image,
            ErrorKind::BadImage,
            "finding the disk",
            format!(
                "no regular file under disk/ in its {count} layer{}: not a containerDisk",
                if count == 1 { "" } else { "s" }
            ),
        ))
    }

    /// Length of the disk file as stored in the layer.
    pub fn len(&self) -> u64 {
        self.entry.size
    }

    /// Whether the disk file is empty (never: an empty one is refused).
    pub fn is_empty(&self) -> bool {
        self.entry.size == 0
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            if self.held_at < self.held.len() {
                let n = buf.len().min(self.held.len() - self.held_at);
                buf[..n].copy_from_slice(&self.held[self.held_at..self.held_at + n]);
                self.held_at += n;
                return Ok(n);
            }
            let Some(layer) = self.layer.as_mut() else { return Ok(0) };
            if self.left > HOLD_BACK as u64 {
                let want = (self.left - HOLD_BACK as u64).min(buf.len() as u64) as usize;
                let n = layer.tar.read_plain(&self.entry, &mut buf[..want]).map_err(|e| layer.error(&self.image, e))?;
                self.left -= n as u64;
                return Ok(n);
            }
            // The end of the disk: read it aside, finish and verify the layer, then hand it out.
            let mut held = vec![0u8; self.left as usize];
            let mut got = 0;
            while got < held.len() {
                let n = layer.tar.read_plain(&self.entry, &mut held[got..]).map_err(|e| layer.error(&self.image, e))?;
                got += n;
            }
            self.left = 0;
            let layer = self.layer.take().expect("checked above");
            layer.finish(&self.image)?;
            log::debug!("{}: disk layer verified", self.image);
            self.held = held;
            self.held_at = 0;
        }
    }
}

impl Read for DiskReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = &self.failed {
            return Err(io::Error::other(Error::new(ErrorKind::Io, why.clone())));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        self.read_some(buf).map_err(|e| {
            self.failed = Some(e.to_string());
            self.layer = None;
            io::Error::other(e)
        })
    }
}

/// Chunks a [`Prefetch`] reads ahead.
const PREFETCH_CHUNK: usize = 1 << 20;
/// Chunks in flight between the reading thread and the consumer (the memory is `(DEPTH + 2) * CHUNK`).
const PREFETCH_DEPTH: usize = 4;

/// A reader run on a thread of its own, a few chunks ahead of its consumer: the download, its SHA-256, the layer's
/// decompression and the tar walk overlap the import's own work instead of taking turns with it. Errors arrive in
/// order, after the bytes read before them.
pub struct Prefetch {
    chunks: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
    done: bool,
    ended: bool,
}

impl Prefetch {
    /// Reads `inner` on a new thread.
    pub fn new(mut inner: Box<dyn Read + Send>) -> Prefetch {
        let (send, chunks) = std::sync::mpsc::sync_channel(PREFETCH_DEPTH);
        std::thread::Builder::new()
            .name("registry-read".into())
            .spawn(move || loop {
                let mut chunk = vec![0u8; PREFETCH_CHUNK];
                let mut filled = 0;
                let result = loop {
                    match inner.read(&mut chunk[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == chunk.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                chunk.truncate(filled);
                let end = filled < PREFETCH_CHUNK || result.is_err();
                // A consumer that went away ends the thread.
                if filled > 0 && send.send(Ok(chunk)).is_err() {
                    return;
                }
                if let Err(e) = result {
                    let _ = send.send(Err(e));
                    return;
                }
                if end {
                    let _ = send.send(Ok(Vec::new()));
                    return;
                }
            })
            .expect("spawning a thread");
        Prefetch { chunks, current: Vec::new(), at: 0, done: false, ended: false }
    }

    /// Whether the inner reader ended its stream (not with an error).
    pub fn finished(&self) -> bool {
        self.ended
    }
}

impl Read for Prefetch {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            match self.chunks.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => {
                    self.done = true;
                    self.ended = true;
                }
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.at = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => return Err(io::Error::other("the registry reader thread ended early")),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_keeps_bytes_and_errors_in_order() {
        let data: Vec<u8> = (0..3 * PREFETCH_CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        Prefetch::new(Box::new(io::Cursor::new(data.clone()))).read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let failing = io::Cursor::new(data.clone()).chain(Failing);
        let mut reader = Prefetch::new(Box::new(failing));
        let mut out = Vec::new();
        let err = reader.read_to_end(&mut out).unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert_eq!(out, data);
    }

    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("boom"))
        }
    }

    #[test]
    fn disk_paths() {
        for yes in ["disk/a.img", "./disk/a.qcow2", "/disk/x", "disk/sub/x"] {
            assert!(is_disk_path(yes.as_bytes()), "{yes}");
        }
        for no in ["disk", "disk/", "disk/.wh.a.img", "disks/a", "a/disk/b", "./disk/sub/.wh.x", "diskx/y"] {
            assert!(!is_disk_path(no.as_bytes()), "{no}");
        }
    }
}
