//! Progress: counters the engine advances. Showing them is the front ends' business (a bar or log lines in
//! `process::render`, CDI's metric in `cdi::metrics`); they all read the same counters.

use crate::size::human;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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
    /// Guest bytes already done when this run began (a resumed import): rate and ETA count from there.
    resumed_bytes: AtomicU64,
    /// The memory cgroup's latest charge and the budget, for progress lines (0: not known).
    charge: Arc<AtomicU64>,
    budget: AtomicU64,
    /// Whether the import records resume checkpoints (a stop can be continued with `--resume`).
    resumable: AtomicBool,
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
            resumed_bytes: AtomicU64::new(0),
            charge: Arc::new(AtomicU64::new(0)),
            budget: AtomicU64::new(0),
            resumable: AtomicBool::new(false),
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

    /// Records that guest `[0, offset)` was written by an earlier run: counted as done, not as this run's rate.
    pub fn resume_from(&self, offset: u64) {
        self.advance(offset, offset);
        self.resumed_bytes.store(offset, Ordering::Relaxed);
    }

    /// A function that records the cgroup's charge, for a sampler thread that outlives any borrow.
    pub fn charge_feed(&self) -> impl Fn(u64) + Send + 'static {
        let charge = self.charge.clone();
        move |now| charge.store(now, Ordering::Relaxed)
    }

    /// Records the memory budget the import keeps within.
    pub fn set_budget(&self, budget: u64) {
        self.budget.store(budget, Ordering::Relaxed);
    }

    /// The cgroup's latest charge and the budget, when a cgroup is being read.
    pub fn charge(&self) -> Option<(u64, u64)> {
        match self.charge.load(Ordering::Relaxed) {
            0 => None,
            charge => Some((charge, self.budget.load(Ordering::Relaxed))),
        }
    }

    /// Bytes per second done by this run (a resumed import's earlier part excluded).
    pub fn rate(&self) -> f64 {
        let done = self.processed().saturating_sub(self.resumed_bytes.load(Ordering::Relaxed));
        done as f64 / self.elapsed().as_secs_f64().max(0.001)
    }

    /// Time left at this run's pace, once there is a pace to go by.
    pub fn eta(&self) -> Option<Duration> {
        let total = self.total();
        let elapsed = self.elapsed().as_secs_f64();
        // Progress this run has made, as a fraction of the whole, and what is left: guest bytes, or stored bytes
        // when the image size is not known yet.
        let (done, left) = if total > 0 {
            let processed = self.processed();
            let resumed = self.resumed_bytes.load(Ordering::Relaxed);
            (processed.saturating_sub(resumed) as f64 / total as f64, 1.0 - processed as f64 / total as f64)
        } else {
            let done = self.percent() / 100.0;
            (done, 1.0 - done)
        };
        (done > 0.0 && elapsed >= 1.0).then(|| Duration::from_secs_f64((elapsed * left.max(0.0) / done).min(1e9)))
    }

    /// Records that the import keeps resume checkpoints.
    pub fn set_resumable(&self) {
        self.resumable.store(true, Ordering::Relaxed);
    }

    /// Whether an interrupted import can be continued with `--resume`.
    pub fn resumable(&self) -> bool {
        self.resumable.load(Ordering::Relaxed)
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

    /// One log line: percent, bytes, and [`Progress::status`].
    pub fn log_line(&self) -> String {
        format!("{:5.1}% {} of {}, {}", self.percent(), human(self.processed()), human(self.total()), self.status())
    }

    /// Rate, time left, and the whole cgroup's charge against the budget: `310 MiB/s, eta 0:12, cgroup charge
    /// 21.0 MiB / 572 MiB` (the cgroup's, not the import's alone: `--json` has both).
    pub fn status(&self) -> String {
        let mut line = format!("{}/s", human(self.rate() as u64));
        if let Some(eta) = self.eta_text() {
            line += &format!(", eta {eta}");
        }
        if let Some((charge, budget)) = self.charge() {
            line += &format!(", cgroup charge {} / {}", human(charge), human(budget));
        }
        line
    }

    /// The most columns [`bar_status`](Self::bar_status) takes: `100%`, a rate (`1023.99 MiB/s`), an eta
    /// (`eta 10:00:00`) and a charge (`cgroup 1023.99 MiB`), with the spaces between them.
    pub const BAR_STATUS_MAX: usize = 4 + 1 + 13 + 1 + 12 + 1 + 18;

    /// What follows the bar: `45% 310.00 MiB/s eta 0:12 cgroup 21.00 MiB`, at most [`Self::BAR_STATUS_MAX`]
    /// columns (the whole cgroup's charge: `--json` tells the import's own share apart).
    pub fn bar_status(&self) -> String {
        let mut line = format!("{:3.0}% {}/s", self.percent().floor(), human(self.rate() as u64));
        if let Some(eta) = self.eta_text() {
            line += &format!(" eta {eta}");
        }
        if let Some((charge, _)) = self.charge() {
            line += &format!(" cgroup {}", human(charge));
        }
        line
    }

    /// Time left as `m:ss`, or `h:mm:ss` from an hour on.
    fn eta_text(&self) -> Option<String> {
        let secs = self.eta()?.as_secs();
        Some(match secs {
            0..=3599 => format!("{}:{:02}", secs / 60, secs % 60),
            _ => format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60),
        })
    }
}
