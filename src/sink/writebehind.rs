//! Buffered writes that never let page cache pile up: for destinations that refuse O_DIRECT.
//!
//! Each write is followed by `sync_file_range(WRITE)` so its writeback starts at once instead of when the global
//! dirty thresholds (sized for the host, not our cgroup) are reached. Before each write the [governor] is asked
//! whether there is room; if not, our oldest in-flight range is waited for
//! (`sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`) and dropped from the cache (`POSIX_FADV_DONTNEED`, which only
//! drops clean pages: hence after the wait).
//!
//! The governor sees the cgroup's dirty + writeback pages and, where the kernel has cachestat(2), everything our
//! destination holds in the page cache. That second figure matters: DONTNEED skips pages it cannot take at that
//! instant, and measured here, during write bursts tens of MiB of already-clean destination pages stayed cached for
//! half a second after their drain. Counting them keeps the whole charge bounded, not only the dirty part; the
//! recently drained ranges are dropped again on every drain and wait, which frees them as soon as the kernel lets
//! go.
//!
//! [governor]: crate::cgroup::governor

use crate::cgroup::governor::{Decision, Governor, GovernorSummary, OwnBytes};
use crate::error::{Error, Result};
use crate::sys;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::Duration;

/// Pause between readings while waiting for pages to leave the cache.
const WAIT_PAUSE: Duration = Duration::from_millis(5);

/// Longest one write waits for pressure it cannot drain (co-tenants' dirty pages, or our clean pages the kernel
/// still holds) before writing anyway: 400 × 5 ms = 2 s.
const WAIT_PATIENCE: u32 = 400;

/// How many drained ranges each drop covers again.
const SWEEP_RANGES: usize = 16;

/// The write-behind window: buffered writes whose writeback has been started but not yet waited for.
pub struct WriteBehind {
    governor: Governor,
    /// Held across decide + write so that every decision sees the previous write.
    admission: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// Written ranges whose writeback is not yet known to be complete, oldest first.
    inflight: VecDeque<(u64, u64)>,
    /// Their total length.
    inflight_bytes: u64,
    /// The most recently drained ranges, dropped again on each drain or wait.
    drained: VecDeque<(u64, u64)>,
    /// Whether cachestat(2) works here; cleared on the first refusal.
    cachestat: bool,
    /// Pauses spent waiting.
    waits: u64,
}

impl WriteBehind {
    /// A window paced by `governor`.
    pub fn new(governor: Governor) -> Self {
        WriteBehind { governor, admission: Mutex::new(Window { cachestat: true, ..Window::default() }) }
    }

    /// Writes `data` at `offset` through the page cache once the governor allows, and starts its writeback.
    pub fn write(&self, file: &File, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let mut window = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = false;
        let mut patience = WAIT_PATIENCE;
        loop {
            let own = OwnBytes { inflight: window.inflight_bytes, cached: window.cached(file)? };
            match self.governor.decide(len, own, fresh)? {
                Decision::Proceed => break,
                Decision::Drain => window.drain_oldest(file)?,
                Decision::Wait if patience > 0 => {
                    patience -= 1;
                    window.waits += 1;
                    std::thread::sleep(WAIT_PAUSE);
                    window.sweep(file)?;
                }
                Decision::Wait => break,
            }
            fresh = true;
        }
        file.write_all_at(data, offset).map_err(|e| Error::io("writing destination", e).at_offset(offset))?;
        sys::start_writeback(file, offset, len).map_err(|e| Error::io("starting writeback", e).at_offset(offset))?;
        window.inflight.push_back((offset, len));
        window.inflight_bytes += len;
        Ok(())
    }

    /// Waits for every in-flight range, drops them from the cache, and summarises the governor's readings.
    pub fn finish(&self, file: &File) -> Result<GovernorSummary> {
        let mut window = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        while !window.inflight.is_empty() {
            window.drain_oldest(file)?;
        }
        self.governor.finish()
    }
}

impl Window {
    /// Bytes of the destination in the page cache, if the kernel can tell.
    fn cached(&mut self, file: &File) -> Result<Option<u64>> {
        if !self.cachestat {
            return Ok(None);
        }
        match sys::cachestat(file) {
            Ok(Some(cache)) => Ok(Some(cache.cached)),
            Ok(None) => {
                self.cachestat = false;
                Ok(None)
            }
            Err(e) => Err(Error::io("reading destination page cache (cachestat)", e)),
        }
    }

    /// Waits for the oldest in-flight range to reach the device, then drops it and the other recent drains.
    fn drain_oldest(&mut self, file: &File) -> Result<()> {
        let Some((offset, len)) = self.inflight.pop_front() else {
            return Ok(());
        };
        sys::wait_writeback(file, offset, len).map_err(|e| Error::io("waiting for writeback", e).at_offset(offset))?;
        self.inflight_bytes -= len;
        if self.drained.len() == SWEEP_RANGES {
            self.drained.pop_front();
        }
        self.drained.push_back((offset, len));
        self.sweep(file)
    }

    /// Drops the recently drained ranges from the cache, in one call over their span: in-flight ranges inside it
    /// are dirty or under writeback, which DONTNEED leaves alone.
    fn sweep(&self, file: &File) -> Result<()> {
        let Some(start) = self.drained.iter().map(|&(o, _)| o).min() else {
            return Ok(());
        };
        let end = self.drained.iter().map(|&(o, l)| o + l).max().unwrap_or(start);
        sys::drop_cache(file, start, end - start).map_err(|e| Error::io("dropping written pages", e).at_offset(start))
    }
}
