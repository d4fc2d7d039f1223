//! The memory budget (`--limit`) and how the import sizes itself from it.
//!
//! The budget covers everything the process causes to be charged to its memory cgroup: our buffers (anonymous
//! memory) and the page cache our reads and writes create. boundimport plans to use a small share of it and leaves
//! the rest to co-tenants (a CDI pod's other processes share the cgroup).

use crate::cgroup::governor::Targets;
use crate::cgroup::MemCgroup;
use crate::error::Result;
use crate::size::human;
use std::fmt;

/// Budget assumed when neither `--limit` nor a cgroup limit says otherwise: CDI's default importer pod limit.
pub const DEFAULT_BUDGET: u64 = 600_000_000;

const MIB: u64 = 1 << 20;

/// The smallest budget an import runs in: the smallest pool and write-behind window (4 x 1 MiB buffers, a 4 MiB
/// window), the program's own pages (about 11 MiB of page cache for the binary and libc, measured), and room for
/// the kernel's batched accounting. Below it the import would crawl against its own ceiling or be killed.
pub const MIN_BUDGET: u64 = 32 * MIB;

/// The buffer pool never grows past this: more buffers stop paying once the device queue is full, while each one
/// is charged to the cgroup. 4 MiB chunks are what a virtio disk takes as one request (its max_sectors_kb here)
/// now that buffers are huge pages (see `buffer`). Measured onto a direct-io loop device, 3 GiB qcow2, medians of
/// 4 alternating runs: 3 x 4, 4 x 4, 8 x 2 and 2 x 8 MiB all took 1.70-1.75 s, the disk's limit here; 16 MiB keeps
/// room for devices with longer latency and the whole charge under 32 MiB.
const MAX_POOL: u64 = 16 * MIB;

/// Where the budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetOrigin {
    /// `--limit` (or the CDI front end).
    Explicit,
    /// The limit of our own memory cgroup.
    Cgroup,
    /// No limit anywhere: [`DEFAULT_BUDGET`].
    Default,
}

/// A memory budget in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Budget {
    /// Bytes.
    pub bytes: u64,
    /// Where it came from.
    pub origin: BudgetOrigin,
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = match self.origin {
            BudgetOrigin::Explicit => "--limit",
            BudgetOrigin::Cgroup => "memory cgroup limit",
            BudgetOrigin::Default => "default, no cgroup limit",
        };
        write!(f, "{} ({origin})", human(self.bytes))
    }
}

/// How the import sizes its buffers and write-behind window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Sizing {
    /// Pipeline workers, each with one chunk buffer.
    pub workers: usize,
    /// Chunk size in bytes.
    pub chunk: u64,
    /// Dirty + writeback bytes of the cgroup the write-behind path keeps under.
    pub dirty_target: u64,
    /// Cgroup usage above which the write-behind path drains before writing more.
    pub usage_ceiling: u64,
}

/// Explicit worker count and chunk size replacing what the budget would choose (benchmarking knobs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizingOverride {
    /// Number of workers.
    pub workers: Option<usize>,
    /// Chunk size in bytes (rounded up to a power of two, at least 64 KiB).
    pub chunk: Option<u64>,
}

impl SizingOverride {
    /// `sizing` with the overrides applied.
    pub fn apply(&self, sizing: Sizing) -> Sizing {
        Sizing {
            workers: self.workers.unwrap_or(sizing.workers).clamp(1, 64),
            chunk: self.chunk.map_or(sizing.chunk, |c| c.clamp(64 << 10, 64 << 20).next_power_of_two()),
            ..sizing
        }
    }
}

impl Budget {
    /// The budget: `explicit` if given, else the effective limit of `cgroup`, else [`DEFAULT_BUDGET`].
    pub fn resolve(explicit: Option<u64>, cgroup: Option<&MemCgroup>) -> Result<Budget> {
        let budget = match (explicit, cgroup) {
            (Some(bytes), _) => Budget { bytes, origin: BudgetOrigin::Explicit },
            (None, Some(cg)) => match cg.limit()? {
                Some(bytes) => Budget { bytes, origin: BudgetOrigin::Cgroup },
                None => Budget { bytes: DEFAULT_BUDGET, origin: BudgetOrigin::Default },
            },
            (None, None) => Budget { bytes: DEFAULT_BUDGET, origin: BudgetOrigin::Default },
        };
        if budget.bytes < MIN_BUDGET {
            return Err(crate::error::Error::usage(format!(
                "the memory budget, {budget}, is below the {} an import needs for its buffers, write-behind \
                 window and own pages",
                human(MIN_BUDGET)
            )));
        }
        Ok(budget)
    }

    /// Bytes the reorder window of parallel range requests may hold: a thirty-second of the budget, between 4 and
    /// 16 MiB (16 MiB in CDI's 600M pod, beside the 48 MiB of [`sizing`](Self::sizing): 64 MiB planned in all).
    pub fn range_window(&self) -> u64 {
        (self.bytes / 32).clamp(4 * MIB, 16 * MIB)
    }

    /// The planned footprint: an eighth of the budget, between 8 and 64 MiB. Up to half of it, at most
    /// [`MAX_POOL`], is buffers; half is the write-behind window.
    pub fn sizing(&self) -> Sizing {
        let share = (self.bytes / 8).clamp(8 * MIB, 64 * MIB);
        let pool = (share / 2).min(MAX_POOL);
        let chunk = match pool {
            p if p >= 16 * MIB => 4 * MIB,
            p if p >= 8 * MIB => 2 * MIB,
            _ => MIB,
        };
        let workers = (pool / chunk).clamp(2, 8) as usize;
        Sizing { workers, chunk, dirty_target: (share / 2).max(2 * chunk), usage_ceiling: self.bytes - self.bytes / 8 }
    }
}

impl Sizing {
    /// Chunk buffers of a forward-only import: the same pool as the workers', but at least two, so one can be
    /// filled from the stream while the writer thread drains the other.
    pub fn stream_buffers(&self) -> usize {
        self.workers.max(2)
    }

    /// What the write-behind governor keeps the cgroup under.
    pub fn governor_targets(&self) -> Targets {
        Targets { dirty_writeback: self.dirty_target, usage_ceiling: Some(self.usage_ceiling) }
    }
}

/// Memory an xz decoder may use for a budget of `budget` bytes: a quarter of it, between 16 and 72 MiB (enough
/// for `xz -9`'s 64 MiB dictionary when the budget allows, refused with a clear error otherwise).
pub fn xz_memlimit(budget: u64) -> u64 {
    (budget / 4).clamp(16 << 20, 72 << 20)
}

/// Memory a bzip2 decoder takes, whatever the input: fixed by the format, whose largest block (`bzip2 -9`) is
/// 900 000 symbols held as 4-byte entries, plus about 64 KiB of tables; libbzip2 documents 3 700 kB for
/// decompression. Small beside the smallest budget (32 MiB) and xz's limit (16 to 72 MiB): it needs no limit of its
/// own. One per bzip2 layer, and at most four layers are unwrapped (`MAX_LAYERS` in source/decompress.rs).
pub const BZIP2_DECODER_MEMORY: u64 = 3_700_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn sizing(bytes: u64) -> Sizing {
        Budget { bytes, origin: BudgetOrigin::Explicit }.sizing()
    }

    #[test]
    fn small_budgets_get_small_pools_and_large_ones_a_modest_share() {
        let cdi = sizing(600_000_000);
        assert_eq!((cdi.workers, cdi.chunk, cdi.dirty_target), (4, 4 * MIB, 32 * MIB));
        let small = sizing(128 * MIB);
        assert_eq!((small.workers, small.chunk, small.dirty_target), (4, 2 * MIB, 8 * MIB));
        let tiny = sizing(32 * MIB);
        assert_eq!((tiny.workers, tiny.chunk), (4, MIB));
        assert!(tiny.workers as u64 * tiny.chunk + tiny.dirty_target <= 16 * MIB);
        let huge = sizing(64 << 30);
        assert_eq!(huge.workers as u64 * huge.chunk + huge.dirty_target, 48 * MIB);
        for bytes in [32 * MIB, 128 * MIB, 600_000_000, 64 << 30] {
            let s = sizing(bytes);
            assert!(s.workers as u64 * s.chunk + s.dirty_target <= (bytes / 4).max(16 * MIB), "{bytes}");
            assert!(s.usage_ceiling < bytes);
        }
    }

    #[test]
    fn budgets_below_the_minimum_are_refused_naming_it() {
        for bytes in [0, 1, 8 * MIB, MIN_BUDGET - 1] {
            let err = Budget::resolve(Some(bytes), None).unwrap_err();
            assert!(err.to_string().contains("32.00 MiB an import needs"), "{err}");
        }
        assert!(Budget::resolve(Some(MIN_BUDGET), None).is_ok());
    }

    #[test]
    fn the_range_window_and_the_plan_stay_within_64_mib_in_a_cdi_pod() {
        let cdi = Budget { bytes: 600_000_000, origin: BudgetOrigin::Cgroup };
        let sizing = cdi.sizing();
        assert_eq!(cdi.range_window(), 16 * MIB);
        assert!(sizing.workers as u64 * sizing.chunk + sizing.dirty_target + cdi.range_window() <= 64 * MIB);
        assert_eq!(Budget { bytes: MIN_BUDGET, origin: BudgetOrigin::Explicit }.range_window(), 4 * MIB);
    }

    #[test]
    fn a_bzip2_decoder_fits_the_smallest_budget_beside_the_plan() {
        let tiny = sizing(MIN_BUDGET);
        let planned = tiny.workers as u64 * tiny.chunk + tiny.dirty_target;
        // The program's own pages: about 11 MiB (see MIN_BUDGET).
        assert!(planned + BZIP2_DECODER_MEMORY + 11 * MIB < MIN_BUDGET, "{planned}");
    }

    #[test]
    fn explicit_limit_wins() {
        let b = Budget::resolve(Some(123 * MIB), None).unwrap();
        assert_eq!(b, Budget { bytes: 123 * MIB, origin: BudgetOrigin::Explicit });
        let d = Budget::resolve(None, None).unwrap();
        assert_eq!(d.origin, BudgetOrigin::Default);
    }
}
