//! The cgroup's charge, sampled through an import: the peak it reached (what the bound is about, in every I/O
//! mode) and the latest reading for progress lines. The kernel's own peak counter cannot serve: it covers the
//! cgroup's whole life (a pod's earlier work included), and resetting it is not ours to do.

use super::MemCgroup;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Time between readings: fast enough to see a buffer pool fill, cheap (one small file read).
const INTERVAL: Duration = Duration::from_millis(100);

/// What the sampler saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChargeSummary {
    /// Highest charge read.
    pub peak: u64,
    /// The first charge read: what the cgroup held as the import began (other processes' memory included).
    pub first: u64,
    /// Readings taken.
    pub readings: u64,
}

/// A thread reading the cgroup's charge until stopped.
pub struct ChargeSampler {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<ChargeSummary>>,
    failed: Arc<AtomicBool>,
}

impl ChargeSampler {
    /// Starts sampling `cgroup`, handing each reading to `publish`.
    pub fn start(cgroup: MemCgroup, publish: impl Fn(u64) + Send + 'static) -> ChargeSampler {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let failed = Arc::new(AtomicBool::new(false));
        let (stop_flag, failed_flag) = (stop.clone(), failed.clone());
        let thread = std::thread::Builder::new().name("charge".into()).spawn(move || {
            let mut summary = ChargeSummary::default();
            let (lock, wake) = &*stop_flag;
            let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match cgroup.usage() {
                    Ok(charge) => {
                        summary.peak = summary.peak.max(charge);
                        if summary.readings == 0 {
                            summary.first = charge;
                        }
                        summary.readings += 1;
                        publish(charge);
                    }
                    // A cgroup that vanished or cannot be read: no figure rather than a wrong one.
                    Err(_) => {
                        failed_flag.store(true, Ordering::Relaxed);
                        return summary;
                    }
                }
                if *stopped {
                    return summary;
                }
                stopped = wake.wait_timeout(stopped, INTERVAL).unwrap_or_else(|p| p.into_inner()).0;
            }
        });
        ChargeSampler { stop, thread: thread.ok(), failed }
    }

    /// Takes a last reading and stops; `None` when the cgroup could not be read.
    pub fn stop(mut self) -> Option<ChargeSummary> {
        let summary = self.halt();
        summary.filter(|_| !self.failed.load(Ordering::Relaxed))
    }

    fn halt(&mut self) -> Option<ChargeSummary> {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for ChargeSampler {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Version;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn reports_the_highest_reading_and_publishes_each() {
        let dir = tempfile::tempdir().unwrap();
        let usage = dir.path().join("memory.usage_in_bytes");
        std::fs::write(&usage, "1000\n").unwrap();
        let latest = Arc::new(AtomicU64::new(0));
        let seen = latest.clone();
        let sampler =
            ChargeSampler::start(MemCgroup::at(dir.path(), Version::V1), move |c| seen.store(c, Ordering::Relaxed));
        while latest.load(Ordering::Relaxed) != 1000 {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write(&usage, "5000\n").unwrap();
        while latest.load(Ordering::Relaxed) != 5000 {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write(&usage, "2000\n").unwrap();
        let summary = sampler.stop().unwrap();
        assert_eq!(summary.peak, 5000);
        assert!(summary.readings >= 3, "{summary:?}");
    }

    #[test]
    fn an_unreadable_cgroup_gives_no_figure() {
        let dir = tempfile::tempdir().unwrap();
        let sampler = ChargeSampler::start(MemCgroup::at(dir.path().join("gone"), Version::V1), |_| {});
        assert_eq!(sampler.stop(), None);
    }
}
