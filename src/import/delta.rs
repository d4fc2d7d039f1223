//! A delta applied in place: the image (a warm migration's snapshot, a qcow2) is read with its backing file
//! standing for the destination, which already holds what that file holds, and only what the image holds itself
//! is written. What `qemu-img rebase -u -F raw -b DEST IMAGE; qemu-img commit IMAGE` does, without the scratch
//! copy of the image and through the bounded write paths.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{AcceptBacking, Rebase};
use crate::source::ReadAt;
use std::path::Path;
use std::sync::Arc;

/// The delta mode of a [`Plan`](super::Plan).
///
/// The destination must exist and hold the image; it is never truncated, resized, zeroed, scrubbed or removed,
/// not even after a failure, and nothing is resumed: a failed run leaves it mid-update, and running the same
/// delta again writes the same bytes over it (every range the delta holds is written whole, the rest untouched),
/// which completes the update.
#[derive(Clone)]
pub struct Delta {
    /// Says why the backing file name the image records is not what the destination holds (the message of
    /// the failure); asked before anything is written. An image without a backing file is shown `""`.
    pub accept_backing: AcceptBacking,
}

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Delta")
    }
}

impl Delta {
    /// The rebase that reads the image's backing file as `destination`.
    pub(super) fn rebase(&self, destination: &Path) -> Result<Rebase> {
        let probe = crate::sink::Probe::of(destination)?;
        let disk = DestinationAsBacking { name: destination.display().to_string(), len: probe.len };
        Ok(Rebase { disk: Arc::new(disk), accept: self.accept_backing.clone() })
    }
}

/// The destination in the place of a delta's backing file: its ranges are never read (the scheduler keeps them
/// as they are), so reading one is a bug, reported as an error.
struct DestinationAsBacking {
    name: String,
    len: u64,
}

impl ReadAt for DestinationAsBacking {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, _buf: &mut [u8]) -> Result<usize> {
        Err(Error::new(ErrorKind::Io, "a delta's backing ranges are kept on the destination, never read")
            .at_offset(offset)
            .at_path(&self.name))
    }
}
