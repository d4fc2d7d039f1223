//! Progress: counters the engine advances. Showing them is the front ends' business (a bar or log lines in
//! `process::render`, CDI's metric in `cdi::metrics`); they all read the same counters.

use crate::size::human;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Shared import progress.
pub struct Progress {
    total: AtomicU64,
    processed: AtomicU64,
    watermark: AtomicU64,
    written: AtomicU64,
    /// Bytes of the source as stored, and how many of them were consumed: the measure of progress for a stream
    /// whose image size is known only at its end (a compressed raw image).
    stored_total: AtomicU64,
    stored_read: AtomicU64,
    started: Instant,
    finished: Mutex<bool>,
    wake: Condvar,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            total: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            watermark: AtomicU64::new(0),
            written: AtomicU64::new(0),
            stored_total: AtomicU64::new(0),
            stored_read: AtomicU64::new(0),
            started: Instant::now(),
            finished: Mutex::new(false),
            wake: Condvar::new(),
        }
    }
}

impl Progress {
    /// Sets the number of guest bytes the import will cover.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// Records `len` more guest bytes done, and the completed-prefix watermark.
    pub fn advance(&self, len: u64, watermark: u64) {
        self.processed.fetch_add(len, Ordering::Relaxed);
        self.watermark.fetch_max(watermark, Ordering::Relaxed);
    }

    /// Records the destination's running count of bytes written as data (zeros excluded).
    pub fn note_written(&self, written: u64) {
        self.written.fetch_max(written, Ordering::Relaxed);
    }

    /// Bytes written to the destination as data so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Guest bytes done so far.
    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Guest bytes to do.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Everything below this guest offset has been written.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Relaxed)
    }

    /// Sets the number of source bytes as stored, for a stream whose image size is not known yet.
    pub fn set_stored_total(&self, total: u64) {
        self.stored_total.store(total, Ordering::Relaxed);
    }

    /// Records how many source bytes (as stored) have been consumed.
    pub fn note_stored(&self, read: u64) {
        self.stored_read.fetch_max(read, Ordering::Relaxed);
    }

    /// Percent done, 0–100: guest bytes against the image size, or, before the image size is known, source
    /// bytes consumed against the source's length.
    pub fn percent(&self) -> f64 {
        let ratio = |done: u64, total: u64| (done as f64 * 100.0 / total as f64).min(100.0);
        match (self.total(), self.stored_total.load(Ordering::Relaxed)) {
            (0, 0) => 0.0,
            (0, stored) => ratio(self.stored_read.load(Ordering::Relaxed), stored),
            (total, _) => ratio(self.processed(), total),
        }
    }

    /// Seconds since the counters were created.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Marks the import over, releasing the reporter.
    pub fn finish(&self) {
        *self.finished.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Waits up to `timeout` for the import to finish; returns whether it has.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        let finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        let (finished, _) =
            self.wake.wait_timeout_while(finished, timeout, |done| !*done).unwrap_or_else(|p| p.into_inner());
        *finished
    }

    /// One log line: percent, bytes, rate.
    pub fn log_line(&self) -> String {
        let secs = self.elapsed().as_secs_f64().max(0.001);
        format!(
            "{:5.1}% {} of {}, {}/s",
            self.percent(),
            human(self.processed()),
            human(self.total()),
            human((self.processed() as f64 / secs) as u64)
        )
    }
}
