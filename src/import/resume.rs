//! Resumable imports: a small state file records how much of the destination is durably written, so an import
//! killed part-way (an importer pod restarted, a node rebooted) continues where it stopped instead of starting
//! over.
//!
//! A checkpoint is written only after `fdatasync` of the destination, and only for the completed prefix of guest
//! space (the pipeline's watermark), atomically (temporary file, fsync, rename, fsync of the directory). A resumed
//! run first checks that the source is the same one (location, size, modification time or ETag, and a digest of
//! its first MiB) and that the destination is the same and still the image's size; anything else starts over.
//! Everything an interrupted run wrote beyond the watermark is data of the same image, so a resumed run can simply
//! rewrite from the watermark on.

use crate::checksum::{hex, Algorithm, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::sink::DestKind;
use crate::source::ReadAt;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes at the start of the source whose digest identifies it.
const HEADER_BYTES: usize = 1 << 20;

/// Version of the state file layout.
const STATE_VERSION: u32 = 1;

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
    /// SHA-256 of the source's first MiB.
    pub source_header_sha256: String,
    /// The destination path.
    pub destination: PathBuf,
    /// Virtual size of the image.
    pub virtual_size: u64,
    /// Guest bytes below this offset are durably written.
    pub watermark: u64,
}

/// Where checkpoints of one import go, and what they must match.
pub struct Checkpoints {
    path: PathBuf,
    expected: ResumeState,
}

impl Checkpoints {
    /// Checkpoints for importing `source` (named `location`) into `destination`. File destinations keep their
    /// state beside them (`.NAME.boundimport-resume`); block devices need `state_dir`.
    pub fn new(
        location: &str,
        source: &dyn ReadAt,
        destination: &Path,
        kind: DestKind,
        virtual_size: u64,
        state_dir: Option<&Path>,
    ) -> Result<Self> {
        let path = state_path(destination, kind, state_dir)?;
        let mut header = vec![0u8; HEADER_BYTES.min(source.len() as usize)];
        let got = source.read_at(0, &mut header)?;
        let mut hasher = Hasher::new(Algorithm::Sha256);
        hasher.update(&header[..got]);
        let expected = ResumeState {
            version: STATE_VERSION,
            source: location.to_string(),
            source_size: source.len(),
            source_identity: source.identity(),
            source_header_sha256: hex(&hasher.finish()),
            destination: destination.to_path_buf(),
            virtual_size,
            watermark: 0,
        };
        Ok(Checkpoints { path, expected })
    }

    /// The offset to resume from: the recorded watermark if a state file exists and matches this import and the
    /// destination still has the image's size, else 0 (a stale or foreign state file is removed).
    pub fn resume_point(&self, destination_size: Option<u64>) -> Result<u64> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("reading resume state", e).at_path(&self.path)),
        };
        let why_not = match serde_json::from_str::<ResumeState>(&text) {
            Err(e) => Some(format!("unreadable ({e})")),
            Ok(state) => {
                let watermark = state.watermark;
                let same = ResumeState { watermark: 0, ..state } == self.expected;
                if !same {
                    Some("it is for another source or destination".to_string())
                } else if destination_size != Some(self.expected.virtual_size) {
                    Some("the destination no longer has the image's size".to_string())
                } else if watermark > self.expected.virtual_size {
                    Some("its watermark lies past the image".to_string())
                } else {
                    log::info!("resuming at offset {watermark} from {}", self.path.display());
                    return Ok(watermark);
                }
            }
        };
        log::info!("ignoring resume state {}: {}", self.path.display(), why_not.unwrap_or_default());
        self.clear()?;
        Ok(0)
    }

    /// Records that guest `[0, watermark)` is durable. The caller must have synced the destination first.
    pub fn record(&self, watermark: u64) -> Result<()> {
        let state = ResumeState { watermark, ..self.expected.clone() };
        let text = serde_json::to_string(&state).expect("resume state serialises");
        let temporary = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&temporary, &self.path)?;
            sync_parent(&self.path)
        };
        write().io_context("writing resume state").map_err(|e| e.at_path(&self.path))
    }

    /// Removes the state file (the import finished, or its state no longer applies).
    pub fn clear(&self) -> Result<()> {
        match fs::remove_file(&self.path) {
            Ok(()) => sync_parent(&self.path).io_context("removing resume state").map_err(|e| e.at_path(&self.path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing resume state", e).at_path(&self.path)),
        }
    }
}

/// Where the state of an import into `destination` lives.
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
        Checkpoints::new("image.raw", &file, dest, DestKind::RegularFile, 3 << 20, None).unwrap()
    }

    #[test]
    fn a_recorded_watermark_is_resumed_only_for_the_same_import() {
        let (_dir, source, dest) = setup();
        let cp = checkpoints(&source, &dest);
        assert_eq!(cp.path, dest.parent().unwrap().join(".disk.img.boundimport-resume"));
        assert_eq!(cp.resume_point(Some(3 << 20)).unwrap(), 0);
        cp.record(2 << 20).unwrap();
        assert_eq!(checkpoints(&source, &dest).resume_point(Some(3 << 20)).unwrap(), 2 << 20);

        // A destination of the wrong size: start over, and the state is gone.
        assert_eq!(cp.resume_point(Some(1 << 20)).unwrap(), 0);
        assert!(!cp.path.exists());

        // A changed source (same size, other bytes): start over.
        cp.record(2 << 20).unwrap();
        fs::write(&source, vec![8u8; 3 << 20]).unwrap();
        assert_eq!(checkpoints(&source, &dest).resume_point(Some(3 << 20)).unwrap(), 0);
    }

    #[test]
    fn garbage_state_is_ignored() {
        let (_dir, source, dest) = setup();
        let cp = checkpoints(&source, &dest);
        fs::write(&cp.path, "{not json").unwrap();
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
