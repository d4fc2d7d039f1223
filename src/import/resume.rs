//! Resumable imports: a small state file records how much of the destination is durably written, so an import
//! killed part-way (an importer pod restarted, a node rebooted) continues where it stopped instead of starting
//! over.
//!
//! A checkpoint is written only after `fdatasync` of the destination, and only for the completed prefix of guest
//! space (the pipeline's watermark), atomically (temporary file, fsync, rename, fsync of the directory). A resumed
//! run first checks that the source is the same one (location, size, modification time, ETag or registry
//! manifest digest, and for a random-access source a digest of its first MiB) and that the destination is the
//! same and still the image's size; anything else starts over. Everything an interrupted run wrote beyond the
//! watermark is data of the same image, so a resumed run can simply rewrite from the watermark on.
//!
//! A random-access source is read from the watermark on. A stream (a registry layer, a compressed file, a server
//! without Range) cannot be entered part-way: it is read again from its start and only what lies at or past the
//! watermark is written, which saves the destination's time, the scarce resource under a memory limit.

use crate::checksum::{hex, Algorithm, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::sink::DestKind;
use crate::source::ReadAt;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes at the start of the source whose digest identifies it.
const HEADER_BYTES: usize = 1 << 20;

/// Version of the state file layout (2: the header digest is absent for a stream).
const STATE_VERSION: u32 = 2;

/// What a checkpoint records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumeState {
    /// Layout version.
    pub version: u32,
    /// The source location, as given.
    pub source: String,
    /// Source length in bytes.
    pub source_size: u64,
    /// The source's identity (modification time, ETag), if it has one.
    pub source_identity: Option<String>,
    /// SHA-256 of the source's first MiB (a random-access source only: a stream is not read before opening).
    pub source_header_sha256: Option<String>,
    /// The destination path.
    pub destination: PathBuf,
    /// Virtual size of the image.
    pub virtual_size: u64,
    /// Guest bytes below this offset are durably written.
    pub watermark: u64,
}

/// Where checkpoints of one import go, and what they must match.
pub struct Checkpoints {
    store: Store,
    expected: ResumeState,
}

/// Where the record of one import lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// A state file: beside a file destination, or in a state directory.
    File(PathBuf),
    /// The last [`TAIL_BLOCK`] bytes of a block device, past the image: on a volume that is all there is (a CDI
    /// block volume survives a pod; nothing else the pod can write does). Zeroed once the import ends.
    DeviceTail {
        /// The device.
        device: PathBuf,
        /// Where the record starts.
        offset: u64,
    },
}

/// The size of a record in a device's tail: one block, a multiple of every logical block size, written with
/// O_DIRECT.
pub const TAIL_BLOCK: u64 = 4096;

/// What a record in a device's tail starts with; anything else there is not ours.
const TAIL_MAGIC: &[u8] = b"boundimport-resume\n";

impl Store {
    /// Where the state of importing an image of `virtual_size` bytes into `destination` (a `kind` of `len`
    /// bytes) lives: `state_dir` when given; beside a file; in a device's tail with `device_tail` when the device
    /// has a block to spare past the image. `None` when a device has neither.
    pub fn choose(
        destination: &Path,
        kind: DestKind,
        len: u64,
        virtual_size: u64,
        state_dir: Option<&Path>,
        device_tail: bool,
    ) -> Result<Option<Store>> {
        if kind == DestKind::BlockDevice && state_dir.is_none() && device_tail {
            let offset = (len / TAIL_BLOCK).saturating_sub(1) * TAIL_BLOCK;
            if len < TAIL_BLOCK || offset < virtual_size {
                log::info!(
                    "{}: no block to spare past the image for resume state; an interrupted import starts over",
                    destination.display()
                );
                return Ok(None);
            }
            return Ok(Some(Store::DeviceTail { device: destination.to_path_buf(), offset }));
        }
        state_path(destination, kind, state_dir).map(|path| Some(Store::File(path)))
    }

    fn name(&self) -> String {
        match self {
            Store::File(path) => path.display().to_string(),
            Store::DeviceTail { device, offset } => format!("{} at offset {offset}", device.display()),
        }
    }

    /// The recorded text, if there is a record.
    fn read(&self) -> Result<Option<String>> {
        match self {
            Store::File(path) => match fs::read_to_string(path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("reading resume state", e).at_path(path)),
            },
            Store::DeviceTail { device, offset } => {
                use std::os::unix::fs::FileExt;
                let mut block = crate::buffer::AlignedBuf::new(TAIL_BLOCK as usize);
                let ctx = |e: std::io::Error| Error::io("reading resume state", e).at_path(device).at_offset(*offset);
                open_direct(device, false).and_then(|file| file.read_exact_at(&mut block, *offset)).map_err(ctx)?;
                let Some(record) = block.strip_prefix(TAIL_MAGIC) else {
                    return Ok(None);
                };
                let end = record.iter().position(|&b| b == 0).unwrap_or(record.len());
                Ok(Some(String::from_utf8_lossy(&record[..end]).into_owned()))
            }
        }
    }

    /// Replaces the record with `text` durably (`None`: no record).
    fn write(&self, text: Option<&str>) -> Result<()> {
        match (self, text) {
            (Store::File(path), Some(text)) => {
                let temporary = path.with_extension("tmp");
                let write = || -> std::io::Result<()> {
                    let mut file = File::create(&temporary)?;
                    file.write_all(text.as_bytes())?;
                    file.sync_all()?;
                    fs::rename(&temporary, path)?;
                    sync_parent(path)
                };
                write().io_context("writing resume state").map_err(|e| e.at_path(path))
            }
            (Store::File(path), None) => match fs::remove_file(path) {
                Ok(()) => sync_parent(path).io_context("removing resume state").map_err(|e| e.at_path(path)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io("removing resume state", e).at_path(path)),
            },
            (Store::DeviceTail { device, offset }, text) => {
                use std::os::unix::fs::FileExt;
                let mut block = crate::buffer::AlignedBuf::new(TAIL_BLOCK as usize);
                block.fill(0);
                if let Some(text) = text {
                    let record = [TAIL_MAGIC, text.as_bytes()].concat();
                    if record.len() >= block.len() {
                        return Err(Error::usage("resume state does not fit in one block").at_path(device));
                    }
                    block[..record.len()].copy_from_slice(&record);
                }
                // One aligned block is all-or-nothing on the devices we write (a sector's atomicity covers it on
                // 4 KiB-sector disks; elsewhere a torn record fails to parse and the import starts over).
                let write = || -> std::io::Result<()> {
                    let file = open_direct(device, true)?;
                    file.write_all_at(&block, *offset)?;
                    file.sync_data()
                };
                write().io_context("writing resume state").map_err(|e| e.at_path(device).at_offset(*offset))
            }
        }
    }
}

fn open_direct(device: &Path, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().read(!write).write(write).custom_flags(libc::O_DIRECT).open(device)
}

/// What recognises a source again in a later run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceId {
    /// Its length in bytes, as stored.
    pub size: u64,
    /// What changes when its contents are replaced (modification time, ETag, manifest digest), if it has one.
    pub identity: Option<String>,
    /// SHA-256 of its first MiB, for a source that can be read before the import.
    pub header_sha256: Option<String>,
}

impl SourceId {
    /// A random-access source: its size, identity and first MiB.
    pub fn read(source: &dyn ReadAt) -> Result<SourceId> {
        let mut header = vec![0u8; HEADER_BYTES.min(source.len() as usize)];
        let got = source.read_at(0, &mut header)?;
        let mut hasher = Hasher::new(Algorithm::Sha256);
        hasher.update(&header[..got]);
        Ok(SourceId { size: source.len(), identity: source.identity(), header_sha256: Some(hex(&hasher.finish())) })
    }

    /// A stream of `size` bytes whose contents `identity` names.
    pub fn stream(size: u64, identity: Option<String>) -> SourceId {
        SourceId { size, identity, header_sha256: None }
    }
}

impl Checkpoints {
    /// Checkpoints for importing the source `id` (named `location`) into `destination`, recorded in `store`.
    pub fn new(location: &str, id: SourceId, destination: &Path, virtual_size: u64, store: Store) -> Self {
        let expected = ResumeState {
            version: STATE_VERSION,
            source: location.to_string(),
            source_size: id.size,
            source_identity: id.identity,
            source_header_sha256: id.header_sha256,
            destination: destination.to_path_buf(),
            virtual_size,
            watermark: 0,
        };
        Checkpoints { store, expected }
    }

    /// The offset to resume from: the recorded watermark if a record exists and matches this import, the source
    /// can prove it is unchanged (a file's modification time, an HTTP ETag or Last-Modified) and the destination
    /// still has the image's size; else 0 (a stale or foreign record is removed).
    pub fn resume_point(&self, destination_size: Option<u64>) -> Result<u64> {
        let Some(text) = self.store.read()? else {
            return Ok(0);
        };
        let why_not = match serde_json::from_str::<ResumeState>(&text) {
            Err(e) => format!("unreadable ({e})"),
            Ok(state) => {
                let watermark = state.watermark;
                let same = ResumeState { watermark: 0, ..state } == self.expected;
                if !same {
                    "it is for another source or destination".to_string()
                } else if self.expected.source_identity.is_none() {
                    // Size and first MiB alone do not prove the rest unchanged.
                    "the source has nothing (ETag, Last-Modified) that proves it unchanged".to_string()
                } else if destination_size != Some(self.expected.virtual_size) {
                    "the destination no longer has the image's size".to_string()
                } else if watermark > self.expected.virtual_size {
                    "its watermark lies past the image".to_string()
                } else {
                    log::info!("resuming at offset {watermark} from {}", self.store.name());
                    return Ok(watermark);
                }
            }
        };
        log::info!("ignoring resume state {}: {why_not}", self.store.name());
        self.clear()?;
        Ok(0)
    }

    /// Records that guest `[0, watermark)` is durable. The caller must have synced the destination first.
    pub fn record(&self, watermark: u64) -> Result<()> {
        let state = ResumeState { watermark, ..self.expected.clone() };
        let text = serde_json::to_string(&state).expect("resume state serialises");
        self.store.write(Some(&text))
    }

    /// Removes the record (the import finished, or its state no longer applies).
    pub fn clear(&self) -> Result<()> {
        self.store.write(None)
    }
}

/// Where the state file of an import into `destination` lives.
pub fn state_path(destination: &Path, kind: DestKind, state_dir: Option<&Path>) -> Result<PathBuf> {
    let name = destination.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match (kind, state_dir) {
        (_, Some(dir)) => {
            // A flat name derived from the whole path, so two devices never share a state file.
            let flat = destination.to_string_lossy().trim_start_matches('/').replace('/', "-");
            Ok(dir.join(format!("{flat}.boundimport-resume")))
        }
        (DestKind::RegularFile, None) => {
            let dir = destination.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            Ok(dir.join(format!(".{name}.boundimport-resume")))
        }
        (DestKind::BlockDevice, None) => {
            Err(Error::usage("resuming onto a block device needs --state-dir for its state file").at_path(destination))
        }
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Readies an image file (CDI's `/data/disk.img`) for an import: an earlier attempt's image with resume state beside it is kept (the
/// engine continues it if the state matches this source, and starts over otherwise); any other stale image is
/// removed. Returns the bytes a kept image occupies, which count as available space: they are the image's own.
pub fn keep_resumable_or_remove_stale(image: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let state = state_path(image, DestKind::RegularFile, None)?;
    match (std::fs::symlink_metadata(image), state.is_file()) {
        (Ok(meta), true) if meta.is_file() => {
            log::info!("{}: kept for resuming; resume state in {}", image.display(), state.display());
            Ok(meta.blocks().saturating_mul(512))
        }
        _ => {
            crate::sink::volume::remove_stale(&state)?;
            crate::sink::volume::remove_stale(image).map(|()| 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileSource;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("image.raw");
        fs::write(&source, vec![7u8; 3 << 20]).unwrap();
        let dest = dir.path().join("disk.img");
        (dir, source, dest)
    }

    fn checkpoints(source: &Path, dest: &Path) -> Checkpoints {
        let file = FileSource::open(source).unwrap();
        let store = Store::choose(dest, DestKind::RegularFile, 0, 3 << 20, None, false).unwrap().unwrap();
        Checkpoints::new("image.raw", SourceId::read(&file).unwrap(), dest, 3 << 20, store)
    }

    fn state_file(cp: &Checkpoints) -> PathBuf {
        match &cp.store {
            Store::File(path) => path.clone(),
            other => panic!("not a file: {other:?}"),
        }
    }

    /// A source that cannot say which version it is (an HTTP server without ETag or Last-Modified).
    struct Anonymous(Vec<u8>);

    impl ReadAt for Anonymous {
        fn name(&self) -> &str {
            "anonymous"
        }
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
            let from = (offset as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - from);
            buf[..n].copy_from_slice(&self.0[from..from + n]);
            Ok(n)
        }
    }

    #[test]
    fn a_source_without_identity_is_never_resumed() {
        let (_dir, _source, dest) = setup();
        let source = Anonymous(vec![5u8; 3 << 20]);
        let store = || Store::File(dest.with_file_name(".disk.img.boundimport-resume"));
        let id = || SourceId::read(&source).unwrap();
        let cp = Checkpoints::new("anonymous", id(), &dest, 3 << 20, store());
        cp.record(1 << 20).unwrap();
        let again = Checkpoints::new("anonymous", id(), &dest, 3 << 20, store());
        assert_eq!(again.resume_point(Some(3 << 20)).unwrap(), 0);
        assert!(!state_file(&again).exists());
    }

    #[test]
    fn a_stream_is_recognised_by_its_length_and_what_names_its_contents() {
        let (_dir, _source, dest) = setup();
        let store = || Store::File(dest.with_file_name(".disk.img.boundimport-resume"));
        let manifest = |digest: &str| SourceId::stream(5 << 20, Some(format!("manifest sha256:{digest}")));
        let at = |id: SourceId| Checkpoints::new("docker://r/disk:v1", id, &dest, 3 << 20, store());
        at(manifest("aa")).record(2 << 20).unwrap();
        assert_eq!(at(manifest("aa")).resume_point(Some(3 << 20)).unwrap(), 2 << 20);
        // Another manifest under the same tag: start over, and the record is gone.
        assert_eq!(at(manifest("bb")).resume_point(Some(3 << 20)).unwrap(), 0);
        assert_eq!(at(manifest("aa")).resume_point(Some(3 << 20)).unwrap(), 0);
        // The same length, nothing that names the contents: never resumed.
        at(SourceId::stream(5 << 20, None)).record(2 << 20).unwrap();
        assert_eq!(at(SourceId::stream(5 << 20, None)).resume_point(Some(3 << 20)).unwrap(), 0);
    }

    #[test]
    fn a_device_keeps_its_state_in_its_last_block_past_the_image() {
        let (dir, source, _) = setup();
        // A regular file stands in for the device: the record is read and written the same way.
        let device = dir.path().join("device");
        let len = (3 << 20) + 2 * TAIL_BLOCK;
        fs::write(&device, vec![0xaau8; len as usize]).unwrap();
        let kind = DestKind::BlockDevice;
        assert_eq!(Store::choose(&device, kind, 3 << 20, 3 << 20, None, true).unwrap(), None, "no room");
        assert_eq!(
            Store::choose(&device, kind, len - TAIL_BLOCK - 1, 3 << 20, None, true).unwrap(),
            None,
            "no whole block"
        );
        let store = Store::choose(&device, kind, len, 3 << 20, None, true).unwrap().unwrap();
        assert_eq!(store, Store::DeviceTail { device: device.clone(), offset: len - TAIL_BLOCK });
        assert!(matches!(Store::choose(&device, kind, len, 1, Some(dir.path()), true).unwrap(), Some(Store::File(_))));

        let file = FileSource::open(&source).unwrap();
        let make = || Checkpoints::new("image.raw", SourceId::read(&file).unwrap(), &device, 3 << 20, store.clone());
        // Foreign bytes in the tail are no record.
        assert_eq!(make().resume_point(Some(3 << 20)).unwrap(), 0);
        make().record(2 << 20).unwrap();
        assert_eq!(make().resume_point(Some(3 << 20)).unwrap(), 2 << 20);
        make().clear().unwrap();
        let bytes = fs::read(&device).unwrap();
        assert!(bytes[(len - TAIL_BLOCK) as usize..].iter().all(|&b| b == 0), "cleared to zeros");
        assert!(bytes[..(len - TAIL_BLOCK) as usize].iter().all(|&b| b == 0xaa), "nothing else touched");
        assert_eq!(make().resume_point(Some(3 << 20)).unwrap(), 0);
    }

    #[test]
    fn a_recorded_watermark_is_resumed_only_for_the_same_import() {
        let (_dir, source, dest) = setup();
        let cp = checkpoints(&source, &dest);
        assert_eq!(cp.store, Store::File(dest.parent().unwrap().join(".disk.img.boundimport-resume")));
        assert_eq!(cp.resume_point(Some(3 << 20)).unwrap(), 0);
        cp.record(2 << 20).unwrap();
        assert_eq!(checkpoints(&source, &dest).resume_point(Some(3 << 20)).unwrap(), 2 << 20);

        // A destination of the wrong size: start over, and the state is gone.
        assert_eq!(cp.resume_point(Some(1 << 20)).unwrap(), 0);
        assert!(!state_file(&cp).exists());

        // A changed source (same size, other bytes): start over.
        cp.record(2 << 20).unwrap();
        fs::write(&source, vec![8u8; 3 << 20]).unwrap();
        assert_eq!(checkpoints(&source, &dest).resume_point(Some(3 << 20)).unwrap(), 0);
    }

    #[test]
    fn garbage_state_is_ignored() {
        let (_dir, source, dest) = setup();
        let cp = checkpoints(&source, &dest);
        fs::write(state_file(&cp), "{not json").unwrap();
        assert_eq!(cp.resume_point(Some(3 << 20)).unwrap(), 0);
        cp.clear().unwrap();
        cp.clear().unwrap();
    }

    #[test]
    fn block_devices_need_a_state_dir() {
        let dev = Path::new("/dev/loop7");
        assert!(state_path(dev, DestKind::BlockDevice, None).is_err());
        let path = state_path(dev, DestKind::BlockDevice, Some(Path::new("/var/lib/x"))).unwrap();
        assert_eq!(path, Path::new("/var/lib/x/dev-loop7.boundimport-resume"));
    }
}
