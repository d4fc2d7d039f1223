//! The sampler: a thread that reads the importer's cgroup and the limited (pod) cgroup around it at a fixed rate
//! while an importer runs, building the timeline the report and the plot are made from.

use super::ticker::Ticker;
use crate::cgroup::{MemCgroup, MemEvents, MemStat, Version};
use crate::error::{Error, ErrorKind, IoContext, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default sampling interval: 10 Hz, twice the rate the harness promises.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

/// One reading of both cgroups.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Seconds since the importer was started.
    pub t: f64,
    /// The importer's own cgroup: what the importer is charged for.
    pub importer: MemStat,
    /// The limited cgroup holding importer and co-tenant: what the limit applies to.
    pub pod: MemStat,
    /// Limit events of the limited cgroup.
    pub pod_events: MemEvents,
}

/// A running sampling thread.
/// Dropping it unfinished stops the thread without waiting for it.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Vec<Sample>>>>,
}

impl Sampler {
    /// Starts sampling `importer` and `pod` every `interval`, timestamps relative to `t0`.
    pub fn start(importer: MemCgroup, pod: MemCgroup, t0: Instant, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut ticker = Ticker::new(interval);
            loop {
                // Read once more after the stop request, so the timeline ends after the importer did.
                let last = flag.load(Ordering::SeqCst);
                samples.push(read(&importer, &pod, t0)?);
                if last {
                    return Ok(samples);
                }
                ticker.wait();
            }
        });
        Sampler { stop, handle: Some(handle) }
    }

    /// Takes a last reading, stops the thread and returns the timeline.
    pub fn finish(mut self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Io, "the cgroup sampler was already finished"))?
            .join()
            .map_err(|_| Error::new(ErrorKind::Io, "the cgroup sampler thread panicked"))?
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn read(importer: &MemCgroup, pod: &MemCgroup, t0: Instant) -> Result<Sample> {
    Ok(Sample { t: t0.elapsed().as_secs_f64(), importer: importer.stat()?, pod: pod.stat()?, pod_events: events(pod)? })
}

/// Limit events of a cgroup the lab made. On v1 a charge can fail on the memory+swap counter too (when swap is in
/// use), which kernels that track it count in memory.memsw.failcnt: both counters are added, as each failed charge
/// is counted in at most one of them.
pub fn events(cgroup: &MemCgroup) -> Result<MemEvents> {
    let mut events = cgroup.events()?;
    let memsw = cgroup.dir().join("memory.memsw.failcnt");
    if cgroup.version() == Version::V1 && memsw.exists() {
        let text = std::fs::read_to_string(&memsw).io_context("reading cgroup file").map_err(|e| e.at_path(&memsw))?;
        let hits: u64 = text
            .trim()
            .parse()
            .map_err(|_| Error::new(ErrorKind::Io, format!("unexpected contents {:?}", text.trim())).at_path(&memsw))?;
        events.limit_hits += hits;
    }
    Ok(events)
}
