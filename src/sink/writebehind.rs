//! Buffered writes that never let dirty page cache pile up: for destinations that refuse O_DIRECT.
//!
//! Each write is followed by `sync_file_range(WRITE)` so its writeback starts at once instead of when the global
//! dirty thresholds (sized for the host, not our cgroup) are reached. Before each write the [governor] is asked
//! whether the cgroup has room; if not, our oldest in-flight range is waited for
//! (`sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`) and dropped from the cache (`POSIX_FADV_DONTNEED`, which only
//! drops clean pages: hence after the wait).
//!
//! [governor]: crate::cgroup::governor

use crate::cgroup::governor::{Decision, Governor, GovernorSummary};
use crate::error::{Error, Result};
use crate::sys;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::Duration;

/// Pause between readings while the cgroup is over its target through no bytes of ours.
const FOREIGN_PRESSURE_PAUSE: Duration = Duration::from_millis(5);

/// Longest we wait for co-tenants' dirty pages to drain before writing anyway (we cannot drain theirs).
const FOREIGN_PRESSURE_PATIENCE: u32 = 400;

/// The write-behind window: buffered writes whose writeback has been started but not yet waited for.
pub struct WriteBehind {
    governor: Governor,
    /// Held across decide + write so that every decision sees the previous write.
    admission: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    ranges: VecDeque<(u64, u64)>,
    bytes: u64,
    foreign_waits: u64,
}

impl WriteBehind {
    /// A window paced by `governor`.
    pub fn new(governor: Governor) -> Self {
        WriteBehind {
            governor,
            admission: Mutex::new(Window::default()),
        }
    }

    /// Writes `data` at `offset` through the page cache once the governor allows, and starts its writeback.
    pub fn write(&self, file: &File, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let mut window = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = false;
        let mut patience = FOREIGN_PRESSURE_PATIENCE;
        loop {
            match self.governor.decide(len, window.bytes, fresh)? {
                Decision::Proceed => break,
                Decision::Drain => drain_oldest(file, &mut window)?,
                Decision::Wait if patience > 0 => {
                    patience -= 1;
                    window.foreign_waits += 1;
                    std::thread::sleep(FOREIGN_PRESSURE_PAUSE);
                }
                Decision::Wait => break,
            }
            fresh = true;
        }
        file.write_all_at(data, offset)
            .map_err(|e| Error::io("writing destination", e).at_offset(offset))?;
        sys::start_writeback(file, offset, len).map_err(|e| Error::io("starting writeback", e).at_offset(offset))?;
        window.ranges.push_back((offset, len));
        window.bytes += len;
        Ok(())
    }

    /// Waits for every in-flight range, drops them from the cache, and summarises the governor's readings.
    pub fn finish(&self, file: &File) -> Result<GovernorSummary> {
        let mut window = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        while !window.ranges.is_empty() {
            drain_oldest(file, &mut window)?;
        }
        self.governor.finish()
    }

    /// Times a write waited on pressure that was not ours.
    pub fn foreign_waits(&self) -> u64 {
        self.admission.lock().unwrap_or_else(|p| p.into_inner()).foreign_waits
    }
}

fn drain_oldest(file: &File, window: &mut Window) -> Result<()> {
    let Some((offset, len)) = window.ranges.pop_front() else {
        return Ok(());
    };
    sys::wait_writeback(file, offset, len).map_err(|e| Error::io("waiting for writeback", e).at_offset(offset))?;
    sys::drop_cache(file, offset, len).map_err(|e| Error::io("dropping written pages", e).at_offset(offset))?;
    window.bytes -= len;
    Ok(())
}
