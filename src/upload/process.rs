//! What one upload does with its body, by content: a disk image through the import engine, an archive or a
//! filesystem clone extracted into the data directory, a block-device clone written byte for byte. And, when it
//! fails, what it leaves: nothing that looks like a complete disk.
//!
//! CDI's clone source sends its stream in the snappy framing format (golang/snappy `NewBufferedWriter` in
//! cmd/cdi-cloner, `snappy.NewReader` in pkg/uploadserver, CDI v1.66): `filesystem-clone` is a tar of the source
//! volume's files (GNU tar, `-S` sparse unless preallocated), `blockdevice-clone` the source device's bytes.

use crate::error::{Error, ErrorKind, Result};
use crate::import::archive::{run_archive, Archive};
use crate::import::{self, Plan};
use crate::progress::Progress;
use crate::sink::volume::{self as dest, Volume};
use crate::source::tar::{Kind, TarReader};
use crate::source::Location;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{sync_channel, Receiver};

/// What an upload carries, from its path and its `x-cdi-content-type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// A disk image in any format and wrapper the engine reads.
    Image,
    /// A tar archive (optionally compressed) for the data directory.
    Archive,
    /// `filesystem-clone`: a snappy-framed tar of a source volume's files.
    FilesystemClone,
    /// `blockdevice-clone`: a snappy-framed raw device stream.
    BlockdeviceClone,
}

impl Content {
    /// The content of an upload to an archive path or not, with header value `header` (CDI reads the header only
    /// for the clone types).
    pub fn of(archive_path: bool, header: Option<&str>) -> Content {
        match header {
            Some("filesystem-clone") => Content::FilesystemClone,
            Some("blockdevice-clone") => Content::BlockdeviceClone,
            _ if archive_path => Content::Archive,
            _ => Content::Image,
        }
    }

    /// Whether this is a clone target (reported "Clone Complete").
    pub fn is_clone(self) -> bool {
        matches!(self, Content::FilesystemClone | Content::BlockdeviceClone)
    }
}

/// How a successful upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Reported as `preallocationApplied`.
    pub preallocation_applied: bool,
    /// Reported as "Clone Complete" rather than "Upload Complete".
    pub clone: bool,
}

/// Where and how uploads are written.
pub struct Job {
    /// The volume.
    pub volume: Volume,
    /// Where a disk image goes (the device, or the image file).
    pub image: PathBuf,
    /// Where archives and filesystem clones are extracted.
    pub data_dir: PathBuf,
    /// Scratch directory for streams that need spooling, when it exists.
    pub scratch: Option<PathBuf>,
    /// `UPLOAD_IMAGE_SIZE`.
    pub image_size: Option<u64>,
    /// `FILESYSTEM_OVERHEAD`.
    pub filesystem_overhead: f64,
    /// `PREALLOCATION`.
    pub preallocation: bool,
    /// Our memory cgroup and budget, resolved once for every upload.
    pub ctx: import::Context,
}

/// The name uploads carry in messages.
const UPLOAD_NAME: &str = "upload";

impl Job {
    /// Runs one upload of `content` from `body` (`len` bytes, when known).
    pub fn run(
        &self,
        content: Content,
        body: Box<dyn Read + Send>,
        len: Option<u64>,
        progress: &Progress,
        stop: &AtomicBool,
    ) -> Result<Done> {
        let started = std::time::Instant::now();
        let result = match content {
            Content::Image => self.image(body, len, progress, stop),
            Content::Archive => self.archive(body, len, false, progress, stop),
            Content::FilesystemClone => {
                let stream = Box::new(snap::read::FrameDecoder::new(body));
                match self.volume {
                    // CDI reports preallocation for a filesystem-to-filesystem clone (fileToFileCloneProcessor).
                    Volume::Filesystem(_) => self
                        .archive(stream, None, true, progress, stop)
                        .map(|_| Done { preallocation_applied: true, clone: true }),
                    Volume::Block(_) => {
                        let disk = tar_member(stream, dest::DISK_IMAGE_NAME)?;
                        self.raw_clone(disk, progress, stop)
                    }
                }
            }
            Content::BlockdeviceClone => self.raw_clone(Box::new(snap::read::FrameDecoder::new(body)), progress, stop),
        };
        match &result {
            Ok(_) => log::info!("upload processed in {:.2}s", started.elapsed().as_secs_f64()),
            Err(e) => {
                log::warn!("upload failed ({e}); removing what it wrote");
                self.clean_after_failure(content);
            }
        }
        result
    }

    fn plan(&self) -> Plan {
        Plan {
            scratch: self.scratch.clone(),
            output_digest: false,
            file_mode: dest::FILE_MODE,
            preallocate: self.preallocation,
            ..Plan::new(Location::Path(PathBuf::from(UPLOAD_NAME)), &self.image)
        }
    }

    /// A disk image: converted to raw onto the volume, refused before anything is written when it does not fit.
    fn image(
        &self,
        body: Box<dyn Read + Send>,
        len: Option<u64>,
        progress: &Progress,
        stop: &AtomicBool,
    ) -> Result<Done> {
        if let Volume::Filesystem(_) = self.volume {
            dest::remove_stale(&self.image)?;
        }
        let available = dest::available_space(&self.volume, self.image_size, 0)?;
        log::info!("space available for the image: {available} bytes");
        let grow_file_to = match self.volume {
            Volume::Filesystem(_) => dest::file_size_target(self.image_size, available, self.filesystem_overhead),
            Volume::Block(_) => None,
        };
        // The engine sizes the file as CDI does and syncs the destination.
        let plan = Plan { max_virtual_size: Some(available), grow_file_to, ..self.plan() };
        let outcome = import::run_stream_in(&self.ctx, &plan, body, len, progress, stop)?;
        if outcome.virtual_size == 0 {
            return Err(Error::bad_image("the upload holds no image (an empty body)").at_path(UPLOAD_NAME));
        }
        log::info!(
            "uploaded {} image of {} bytes: {} bytes written ({} write path)",
            outcome.format,
            outcome.virtual_size,
            outcome.bytes_written,
            outcome.io
        );
        Ok(Done { preallocation_applied: self.preallocation, clone: false })
    }

    /// A raw clone stream: written byte for byte (no format detection), never resized.
    fn raw_clone(&self, stream: Box<dyn Read + Send>, progress: &Progress, stop: &AtomicBool) -> Result<Done> {
        if let Volume::Filesystem(_) = self.volume {
            dest::remove_stale(&self.image)?;
        }
        let plan = Plan { verbatim: true, ..self.plan() };
        let outcome = import::run_stream_in(&self.ctx, &plan, stream, None, progress, stop)?;
        if outcome.virtual_size == 0 {
            return Err(Error::bad_image("the clone stream holds no data").at_path(UPLOAD_NAME));
        }
        log::info!("cloned {} bytes ({} written as data)", outcome.virtual_size, outcome.bytes_written);
        // CDI's cloneProcessor reports no preallocation for these.
        Ok(Done { preallocation_applied: false, clone: true })
    }

    /// A tar stream extracted into the data directory; `verbatim` skips unwrapping compression (clone streams).
    /// A failure removes what the extraction created, and nothing that was there before.
    fn archive(
        &self,
        body: Box<dyn Read + Send>,
        len: Option<u64>,
        verbatim: bool,
        progress: &Progress,
        stop: &AtomicBool,
    ) -> Result<Done> {
        let Volume::Filesystem(_) = self.volume else {
            return Err(Error::usage("an archive needs a filesystem volume, not a block volume"));
        };
        let archive = Archive { name: UPLOAD_NAME, dir: &self.data_dir, checksum: None, verbatim };
        run_archive(&self.ctx, &archive, body, len, progress, stop)?;
        // CDI never preallocates an extracted archive.
        Ok(Done { preallocation_applied: false, clone: false })
    }

    /// After a failed upload of a disk image or raw clone: a partial image file is removed, a device with a
    /// partial image is scrubbed. (An archive job cleans up after itself.)
    fn clean_after_failure(&self, content: Content) {
        let extracted = matches!(content, Content::Archive)
            || (content == Content::FilesystemClone && matches!(self.volume, Volume::Filesystem(_)));
        let result = match (&self.volume, extracted) {
            (Volume::Filesystem(_), true) => Ok(()),
            (Volume::Filesystem(_), false) => dest::remove_stale(&self.image),
            (Volume::Block(device), _) => dest::scrub_device(device),
        };
        if let Err(e) = result {
            log::error!("cannot clean up after the failed upload: {e}");
        }
    }
}

/// Chunks of a tar member in flight between the tar reader's thread and the consumer.
const MEMBER_CHUNKS_IN_FLIGHT: usize = 2;

/// The data of the first regular-file member of `stream` whose name contains `name` (CDI's
/// `newTarDiskImageReader`), as a forward-only stream, holes of sparse members read as zeros.
fn tar_member(stream: Box<dyn Read + Send>, name: &str) -> Result<Box<dyn Read + Send>> {
    let (chunks, receiver) = sync_channel::<Result<(u64, Vec<u8>)>>(MEMBER_CHUNKS_IN_FLIGHT);
    let (sizes, size) = sync_channel::<Result<u64>>(1);
    let name = name.as_bytes().to_vec();
    std::thread::Builder::new()
        .name("clone-tar".into())
        .spawn(move || {
            let mut tar = TarReader::new(stream);
            let entry = loop {
                match tar.next_entry() {
                    Ok(Some(entry))
                        if entry.kind == Kind::File && entry.path.windows(name.len()).any(|w| w == name) =>
                    {
                        break entry
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let _ = sizes.send(Err(Error::bad_image("no disk image found in tar")));
                        return;
                    }
                    Err(e) => {
                        let _ = sizes.send(Err(e));
                        return;
                    }
                }
            };
            if sizes.send(Ok(entry.size)).is_err() {
                return;
            }
            let read = tar.read_data(&entry, |offset, bytes| {
                chunks
                    .send(Ok((offset, bytes.to_vec())))
                    .map_err(|_| Error::new(ErrorKind::Io, "the clone stream's reader went away"))
            });
            if let Err(e) = read {
                let _ = chunks.send(Err(e));
            }
        })
        .map_err(|e| Error::io("starting the tar reader", e))?;
    let size = size.recv().map_err(|_| Error::new(ErrorKind::Io, "the tar reader stopped"))??;
    Ok(Box::new(MemberReader { receiver, size, at: 0, chunk: Vec::new(), chunk_at: 0, used: 0 }))
}

/// Reads what [`tar_member`]'s thread sends.
struct MemberReader {
    receiver: Receiver<Result<(u64, Vec<u8>)>>,
    size: u64,
    /// Position in the member.
    at: u64,
    chunk: Vec<u8>,
    chunk_at: u64,
    used: usize,
}

impl Read for MemberReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at >= self.size || out.is_empty() {
            return Ok(0);
        }
        if self.used == self.chunk.len() && self.chunk_at + (self.chunk.len() as u64) <= self.at {
            match self.receiver.recv() {
                Ok(Ok((offset, bytes))) => {
                    if offset < self.at {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "tar member data out of order"));
                    }
                    self.chunk = bytes;
                    self.chunk_at = offset;
                    self.used = 0;
                }
                Ok(Err(e)) => return Err(io::Error::other(e)),
                // The member's data ended: the rest (a sparse tail) is zeros.
                Err(_) => {
                    self.chunk.clear();
                    self.chunk_at = self.size;
                    self.used = 0;
                }
            }
        }
        let n = if self.at < self.chunk_at {
            // A hole before the next chunk.
            let n = out.len().min((self.chunk_at.min(self.size) - self.at) as usize);
            out[..n].fill(0);
            n
        } else {
            let n = out.len().min(self.chunk.len() - self.used);
            out[..n].copy_from_slice(&self.chunk[self.used..self.used + n]);
            self.used += n;
            n
        };
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_like_cdi() {
        assert_eq!(Content::of(false, None), Content::Image);
        assert_eq!(Content::of(false, Some("kubevirt")), Content::Image);
        assert_eq!(Content::of(false, Some("archive")), Content::Image, "only the path selects archives");
        assert_eq!(Content::of(true, None), Content::Archive);
        assert_eq!(Content::of(true, Some("blockdevice-clone")), Content::BlockdeviceClone);
        assert_eq!(Content::of(false, Some("filesystem-clone")), Content::FilesystemClone);
        assert!(Content::FilesystemClone.is_clone() && !Content::Archive.is_clone());
    }

    #[test]
    fn a_tar_member_streams_with_its_holes() {
        // A GNU sparse member would need GNU tar; a plain member plus an unrelated one first is what CDI sends.
        let mut tar = Vec::new();
        let mut add = |name: &str, data: &[u8]| {
            let mut header = [0u8; 512];
            header[..name.len()].copy_from_slice(name.as_bytes());
            header[100..107].copy_from_slice(b"0000644");
            header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
            header[136..147].copy_from_slice(b"00000000000");
            header[156] = b'0';
            header[257..263].copy_from_slice(b"ustar\0");
            header[263..265].copy_from_slice(b"00");
            header[148..156].fill(b' ');
            let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
            header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            tar.extend_from_slice(&header);
            tar.extend_from_slice(data);
            tar.resize(tar.len().next_multiple_of(512), 0);
        };
        add("./notes.txt", b"hello");
        let disk: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        add("./disk.img", &disk);
        tar.extend_from_slice(&[0u8; 1024]);
        let mut reader = tar_member(Box::new(io::Cursor::new(tar.clone())), "disk.img").unwrap();
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, disk);
        let missing = tar_member(Box::new(io::Cursor::new(tar[..1024].to_vec())), "disk.img");
        assert!(missing.is_err());
    }
}
