//! The governor: turns live readings of our own memory cgroup into write-behind decisions, so that the dirty
//! and writeback page cache of the whole cgroup (ours and co-tenants') stays under a target share of the budget.
//!
//! The write-behind sink asks before every buffered write: proceed, drain one of our own in-flight ranges first
//! (wait for its writeback and drop it from the cache), or wait for the device when the pressure is not ours.
//! Without a memory cgroup the governor falls back to counting our own in-flight bytes.

use super::{MemCgroup, MemStat};
use crate::error::{IoContext, Result};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How old a reading may be before it is taken again. memory.stat is cheap (tens of microseconds) but writes
/// arrive every few hundred microseconds on fast devices.
const READING_MAX_AGE: Duration = Duration::from_millis(5);

/// Pages each CPU may count locally before memcg statistics are folded in (the kernel's MEMCG_CHARGE_BATCH): a
/// reading can trail the truth by this much per CPU, so decisions keep that margin below the target. Measured
/// here without the margin: readings up to 7 pages over.
const MEMCG_STAT_BATCH_PAGES: u64 = 64;

/// What the write-behind sink should do before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write now.
    Proceed,
    /// Wait for our oldest in-flight range to reach the device and drop it, then ask again.
    Drain,
    /// The pressure is not ours to drain: sleep a little, then ask again.
    Wait,
}

/// Page cache that is ours: what the write-behind window knows it has in flight, and what the kernel says our
/// destination holds (cachestat), which also counts clean pages that could not be dropped yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnBytes {
    /// Bytes written whose writeback is not yet known to be complete.
    pub inflight: u64,
    /// Bytes of the destination in the page cache, if the kernel can tell.
    pub cached: Option<u64>,
}

impl OwnBytes {
    /// The larger of the two: our share of the page cache, whatever state it is in.
    pub fn footprint(&self) -> u64 {
        self.inflight.max(self.cached.unwrap_or(0))
    }
}

/// Limits the governor enforces.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    /// Dirty + writeback bytes of the cgroup, and page cache of our destination, not to exceed.
    pub dirty_writeback: u64,
    /// Cgroup usage above which we drain before adding more page cache (`None`: no limit to respect).
    pub usage_ceiling: Option<u64>,
}

/// Sees every reading the governor takes and what it decided: a front end attaches one to record a timeline.
pub trait Observer: Send {
    /// One reading, `elapsed` after the governor started.
    fn reading(
        &mut self,
        elapsed: Duration,
        stat: &MemStat,
        own: OwnBytes,
        targets: Targets,
        decision: Decision,
    ) -> std::io::Result<()>;
    /// The governor is done.
    fn finish(&mut self) -> std::io::Result<()>;
}

/// Makes an observer for each governor an import creates (a front end's choice, carried by the plan).
#[derive(Clone)]
pub struct ObserverFactory(pub Arc<dyn Fn() -> Result<Box<dyn Observer>> + Send + Sync>);

impl std::fmt::Debug for ObserverFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObserverFactory")
    }
}

/// Paces buffered writes from live cgroup readings.
pub struct Governor {
    cgroup: Option<MemCgroup>,
    targets: Targets,
    started: Instant,
    /// Margin kept below the target for statistics not yet folded in.
    stat_slack: u64,
    state: Mutex<State>,
}

struct State {
    last: Option<(Instant, MemStat)>,
    observer: Option<Box<dyn Observer>>,
    /// Whether the first wait has been explained in the log.
    said_why: bool,
    peak_dirty_writeback: u64,
    readings: u64,
}

/// What the governor saw over an import.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GovernorSummary {
    /// Highest dirty + writeback reading of the cgroup.
    pub peak_dirty_writeback: u64,
    /// Number of cgroup readings taken.
    pub readings: u64,
    /// The dirty + writeback target.
    pub target: u64,
}

impl Governor {
    /// A governor reading `cgroup` (or none) against `targets`.
    pub fn new(cgroup: Option<MemCgroup>, targets: Targets) -> Result<Self> {
        Ok(Governor {
            cgroup,
            targets,
            started: Instant::now(),
            stat_slack: MEMCG_STAT_BATCH_PAGES
                * crate::sys::page_size()
                * std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
            state: Mutex::new(State {
                last: None,
                observer: None,
                said_why: false,
                peak_dirty_writeback: 0,
                readings: 0,
            }),
        })
    }

    /// Hands every reading to `observer` too.
    pub fn observed_by(self, observer: Box<dyn Observer>) -> Self {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).observer = Some(observer);
        self
    }

    /// The targets enforced.
    pub fn targets(&self) -> Targets {
        self.targets
    }

    /// Decides what to do before writing `incoming` bytes given our own page cache `own`. `fresh` forces a new
    /// reading (after a drain changed things).
    pub fn decide(&self, incoming: u64, own: OwnBytes, fresh: bool) -> Result<Decision> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let stat = match &self.cgroup {
            None => None,
            Some(cg) => match state.last {
                Some((at, stat)) if !fresh && at.elapsed() < READING_MAX_AGE => Some(stat),
                _ => {
                    let stat = cg.stat()?;
                    state.last = Some((Instant::now(), stat));
                    state.readings += 1;
                    state.peak_dirty_writeback = state.peak_dirty_writeback.max(stat.dirty_writeback());
                    Some(stat)
                }
            },
        };
        // Our own page cache is the floor of what the cgroup holds for us, whatever the (batched) reading says.
        let pressure = stat.map_or(0, |s| s.dirty_writeback()).max(own.footprint());
        let over_dirty = pressure + incoming + self.stat_slack > self.targets.dirty_writeback;
        // Clean page cache is not pressure: the kernel reclaims it at once (a co-tenant reading a large file
        // fills the cgroup with it). What counts is what it cannot take back without waiting: anonymous memory,
        // dirty and writeback pages.
        let over_usage = match (stat, self.targets.usage_ceiling) {
            (Some(s), Some(ceiling)) => s.unreclaimable() + incoming > ceiling,
            _ => false,
        };
        let decision = if !over_dirty && !over_usage {
            Decision::Proceed
        } else if own.inflight > 0 {
            Decision::Drain
        } else if over_dirty && incoming > self.targets.dirty_writeback {
            // A single write larger than the target can never fit; let it through alone.
            Decision::Proceed
        } else {
            Decision::Wait
        };
        if let (Decision::Wait, Some(stat), false) = (decision, stat, state.said_why) {
            state.said_why = true;
            log::info!(
                "write-behind waits for the device: the cgroup holds {} dirty or under writeback (target {}), {} \
                 of it not ours, and {} it cannot reclaim at once (ceiling {})",
                crate::size::human(stat.dirty_writeback()),
                crate::size::human(self.targets.dirty_writeback),
                crate::size::human(stat.dirty_writeback().saturating_sub(own.footprint())),
                crate::size::human(stat.unreclaimable()),
                self.targets.usage_ceiling.map_or("none".into(), crate::size::human)
            );
        }
        if let (Some(stat), Some(observer)) = (stat, state.observer.as_mut()) {
            observer
                .reading(self.started.elapsed(), &stat, own, self.targets, decision)
                .io_context("recording a governor reading")?;
        }
        Ok(decision)
    }

    /// Tells the observer the readings are over and summarises them.
    pub fn finish(&self) -> Result<GovernorSummary> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(observer) = state.observer.as_mut() {
            observer.finish().io_context("recording governor readings")?;
        }
        Ok(GovernorSummary {
            peak_dirty_writeback: state.peak_dirty_writeback,
            readings: state.readings,
            target: self.targets.dirty_writeback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Version;
    use std::fs;

    fn cgroup_with(dirty: u64, writeback: u64, usage: u64) -> (tempfile::TempDir, MemCgroup) {
        cgroup_with_file(dirty, writeback, usage, dirty + writeback)
    }

    fn cgroup_with_file(dirty: u64, writeback: u64, usage: u64, file: u64) -> (tempfile::TempDir, MemCgroup) {
        let dir = tempfile::tempdir().unwrap();
        let stat = format!("anon 0\nfile {file}\nfile_dirty {dirty}\nfile_writeback {writeback}\ninactive_file 0\n");
        fs::write(dir.path().join("memory.stat"), stat).unwrap();
        fs::write(dir.path().join("memory.current"), format!("{usage}\n")).unwrap();
        let cg = MemCgroup::at(dir.path(), Version::V2);
        (dir, cg)
    }

    const MIB: u64 = 1 << 20;
    const TARGETS: Targets = Targets { dirty_writeback: 32 * MIB, usage_ceiling: Some(500 * MIB) };

    #[test]
    fn decisions_follow_readings() {
        // (dirty, writeback, usage, incoming, own in flight, own cached) -> decision
        let cases = [
            ((4 * MIB, 4 * MIB, 100 * MIB, 2 * MIB, 8 * MIB, None), Decision::Proceed),
            ((20 * MIB, 11 * MIB, 100 * MIB, 2 * MIB, 8 * MIB, None), Decision::Drain),
            ((20 * MIB, 11 * MIB, 100 * MIB, 2 * MIB, 0, None), Decision::Wait),
            ((0, 0, 499 * MIB, 2 * MIB, 4 * MIB, None), Decision::Drain),
            ((0, 0, 100 * MIB, 64 * MIB, 0, None), Decision::Proceed),
            // The reading lags our own writes: own in-flight bytes count even if memory.stat does not show them.
            ((0, 0, 100 * MIB, 2 * MIB, 31 * MIB, None), Decision::Drain),
            // Clean pages of ours the kernel has not dropped yet count too; with nothing to drain, wait.
            ((2 * MIB, 2 * MIB, 100 * MIB, 2 * MIB, 4 * MIB, Some(31 * MIB)), Decision::Drain),
            ((0, 0, 100 * MIB, 2 * MIB, 0, Some(31 * MIB)), Decision::Wait),
            ((0, 0, 100 * MIB, 2 * MIB, 0, Some(4 * MIB)), Decision::Proceed),
        ];
        for ((dirty, wb, usage, incoming, inflight, cached), want) in cases {
            let (_dir, cg) = cgroup_with(dirty, wb, usage);
            let governor = Governor::new(Some(cg), TARGETS).unwrap();
            let own = OwnBytes { inflight, cached };
            let got = governor.decide(incoming, own, true).unwrap();
            assert_eq!(got, want, "{dirty} {wb} {usage} {incoming} {own:?}");
        }
    }

    #[test]
    fn clean_page_cache_is_not_pressure() {
        // A co-tenant's 560 MiB of clean cache in a cgroup at 590 MiB: reclaimable at once, so write.
        let (_dir, cg) = cgroup_with_file(MIB, MIB, 590 * MIB, 562 * MIB);
        let governor = Governor::new(Some(cg), TARGETS).unwrap();
        let own = OwnBytes { inflight: 4 * MIB, cached: Some(4 * MIB) };
        assert_eq!(governor.decide(2 * MIB, own, true).unwrap(), Decision::Proceed);
        // The same usage as anonymous memory is pressure.
        let (_dir, cg) = cgroup_with_file(MIB, MIB, 590 * MIB, 2 * MIB);
        let governor = Governor::new(Some(cg), TARGETS).unwrap();
        assert_eq!(governor.decide(2 * MIB, own, true).unwrap(), Decision::Drain);
    }

    #[test]
    fn a_vanished_cgroup_is_an_error() {
        let (dir, cg) = cgroup_with(0, 0, 0);
        let governor = Governor::new(Some(cg), TARGETS).unwrap();
        drop(dir);
        assert!(governor.decide(MIB, OwnBytes::default(), true).is_err());
    }

    #[test]
    fn without_a_cgroup_own_bytes_are_the_reading() {
        let governor = Governor::new(None, TARGETS).unwrap();
        let own = |inflight| OwnBytes { inflight, cached: None };
        assert_eq!(governor.decide(2 * MIB, own(10 * MIB), true).unwrap(), Decision::Proceed);
        assert_eq!(governor.decide(2 * MIB, own(31 * MIB), true).unwrap(), Decision::Drain);
    }

    #[test]
    fn the_observer_sees_each_reading() {
        struct Count(Arc<Mutex<Vec<Decision>>>);
        impl Observer for Count {
            fn reading(
                &mut self,
                _: Duration,
                _: &MemStat,
                _: OwnBytes,
                _: Targets,
                d: Decision,
            ) -> std::io::Result<()> {
                self.0.lock().unwrap().push(d);
                Ok(())
            }
            fn finish(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (_dir, cg) = cgroup_with(MIB, MIB, 10 * MIB);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let governor = Governor::new(Some(cg), TARGETS).unwrap().observed_by(Box::new(Count(seen.clone())));
        governor.decide(MIB, OwnBytes::default(), true).unwrap();
        governor.decide(MIB, OwnBytes::default(), true).unwrap();
        let summary = governor.finish().unwrap();
        assert_eq!(summary.readings, 2);
        assert_eq!(summary.peak_dirty_writeback, 2 * MIB);
        assert_eq!(*seen.lock().unwrap(), [Decision::Proceed, Decision::Proceed]);
    }
}
