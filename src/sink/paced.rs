//! A buffered file written through a governed write-behind window, zero blocks left as holes: the sink for files
//! that are not the disk image (the members of an extracted archive), where O_DIRECT's alignment rules do not
//! fit arbitrary member sizes.

use super::for_each_run;
use super::writebehind::WriteBehind;
use crate::cgroup::governor::{Governor, Targets};
use crate::cgroup::MemCgroup;
use crate::error::{Error, Result};
use std::fs::File;

/// Unit of hole detection.
const HOLE_BLOCK: usize = 4096;

/// What paces buffered writes: the memory cgroup whose dirty pages are watched, and the governor's targets.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// The memory cgroup, if any.
    pub cgroup: Option<MemCgroup>,
    /// Governor targets.
    pub targets: Targets,
}

/// A file being written at increasing or arbitrary offsets.
pub struct PacedFile {
    file: File,
    window: WriteBehind,
    written: u64,
}

impl PacedFile {
    /// Writes into `file` (freshly created, empty) paced by `pacing`.
    pub fn new(file: File, pacing: &Pacing) -> Result<Self> {
        let window = WriteBehind::new(Governor::new(pacing.cgroup.clone(), pacing.targets)?);
        Ok(PacedFile { file, window, written: 0 })
    }

    /// Writes `chunk` at `offset`; its all-zero blocks are skipped (the file reads as zeros there).
    pub fn write(&mut self, offset: u64, chunk: &[u8]) -> Result<()> {
        let (file, window, written) = (&self.file, &self.window, &mut self.written);
        for_each_run(chunk, HOLE_BLOCK, |start, end, zero| {
            if zero {
                return Ok(());
            }
            window.write(file, offset + start as u64, &chunk[start..end])?;
            *written += (end - start) as u64;
            Ok(())
        })
    }

    /// Data bytes written so far (holes excluded).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Waits for every write to be on disk and out of the page cache, and sets the file's length to `len` (a file
    /// ending in zeros ends in a hole). Returns the file for its metadata.
    pub fn finish(self, len: u64) -> Result<File> {
        self.window.finish(&self.file)?;
        self.file.set_len(len).map_err(|e| Error::io("sizing a file", e))?;
        Ok(self.file)
    }
}
