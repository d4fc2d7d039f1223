//! Live readings of a memory cgroup (v1 or v2): limit, usage, dirty and writeback page cache, limit events.
//!
//! Read errors are errors: a governor that silently read zeros would stop pacing exactly when it matters.
//! (cgroups-rs turns failed reads into zeros and knows only v1 field names, so the live path reads the files
//! itself.)

pub mod governor;
pub mod sampler;

use crate::error::{Error, IoContext, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// Which cgroup hierarchy the memory controller lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Version {
    /// Legacy hierarchy (`memory.limit_in_bytes`, `memory.stat` with `total_*`).
    V1,
    /// Unified hierarchy (`memory.max`, `memory.stat` with `file_dirty`).
    V2,
}

/// v1 reports "no limit" as a huge page-aligned number; anything at or above this is unlimited.
const V1_UNLIMITED: u64 = 1 << 62;

/// A memory cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemCgroup {
    dir: PathBuf,
    version: Version,
}

/// One reading of the page-cache and usage counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemStat {
    /// Charged bytes (memory.usage_in_bytes / memory.current).
    pub usage: u64,
    /// Page cache (v1 total_cache, v2 file).
    pub file: u64,
    /// Anonymous memory (v1 total_rss, v2 anon).
    pub anon: u64,
    /// Dirty page cache (v1 total_dirty, v2 file_dirty).
    pub dirty: u64,
    /// Page cache under writeback (v1 total_writeback, v2 file_writeback).
    pub writeback: u64,
    /// Inactive file pages (v1 total_inactive_file, v2 inactive_file): what kubelet subtracts for working set.
    pub inactive_file: u64,
}

impl MemStat {
    /// Dirty plus writeback: the page cache that cannot be reclaimed without waiting for the device.
    pub fn dirty_writeback(&self) -> u64 {
        self.dirty + self.writeback
    }

    /// Usage less the clean page cache (reclaimable at once): anonymous memory, dirty and writeback pages, and
    /// kernel memory. Shared memory counted as file cache is treated as clean here, which errs on the side of
    /// writing.
    pub fn unreclaimable(&self) -> u64 {
        self.usage.saturating_sub(self.file.saturating_sub(self.dirty_writeback()))
    }

    /// What `kubectl top` and the kubelet working set show: usage minus inactive file pages.
    pub fn working_set(&self) -> u64 {
        self.usage.saturating_sub(self.inactive_file)
    }
}

/// Counters of the limit being hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemEvents {
    /// Times the limit was hit (v1 memory.failcnt, v2 memory.events `max`).
    pub limit_hits: u64,
    /// Processes killed by the cgroup OOM killer (`oom_kill`).
    pub oom_kills: u64,
}

impl MemCgroup {
    /// The memory cgroup of the calling process, or `None` when it has none with a readable directory (no memory
    /// controller mounted, or not in one).
    pub fn own() -> Result<Option<MemCgroup>> {
        let membership = read_text(Path::new("/proc/self/cgroup"))?;
        let mountinfo = read_text(Path::new("/proc/self/mountinfo"))?;
        Ok(locate(&membership, &mountinfo).filter(|cg| cg.dir.join(cg.version.usage_file()).exists()))
    }

    /// A cgroup at a known directory.
    pub fn at(dir: impl Into<PathBuf>, version: Version) -> Self {
        MemCgroup { dir: dir.into(), version }
    }

    /// The cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hierarchy version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The effective limit: the smallest limit of this cgroup and its ancestors, `None` when unlimited.
    pub fn limit(&self) -> Result<Option<u64>> {
        match self.version {
            Version::V1 => {
                // hierarchical_memory_limit already folds in the ancestors' limits.
                let stat = self.read_keyed("memory.stat")?;
                let limit = find_key(&stat, "hierarchical_memory_limit")
                    .map_or_else(|| self.read_number("memory.limit_in_bytes"), Ok)?;
                Ok((limit < V1_UNLIMITED).then_some(limit))
            }
            Version::V2 => {
                let mut best: Option<u64> = None;
                let mut dir = Some(self.dir.as_path());
                while let Some(d) = dir {
                    let file = d.join("memory.max");
                    if !file.exists() {
                        break;
                    }
                    let text = read_text(&file)?;
                    if text.trim() != "max" {
                        let value = parse_number(&text).ok_or_else(|| malformed(&file, &text))?;
                        best = Some(best.map_or(value, |b| b.min(value)));
                    }
                    dir = d.parent();
                }
                Ok(best)
            }
        }
    }

    /// Charged bytes now.
    pub fn usage(&self) -> Result<u64> {
        self.read_number(self.version.usage_file())
    }

    /// Highest charge since creation or the last [`reset_peak`](Self::reset_peak) (`None` on v2 kernels without
    /// memory.peak).
    pub fn peak(&self) -> Result<Option<u64>> {
        let name = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        if self.version == Version::V2 && !self.dir.join(name).exists() {
            return Ok(None);
        }
        self.read_number(name).map(Some)
    }

    /// Usage and page-cache counters, read together.
    pub fn stat(&self) -> Result<MemStat> {
        let stat = self.read_keyed("memory.stat")?;
        let field = |name: &str| {
            find_key(&stat, name).ok_or_else(|| {
                Error::new(crate::error::ErrorKind::Io, format!("memory.stat has no {name} field"))
                    .at_path(self.dir.join("memory.stat"))
            })
        };
        let usage = self.usage()?;
        Ok(match self.version {
            Version::V1 => MemStat {
                usage,
                file: field("total_cache")?,
                anon: field("total_rss")?,
                dirty: field("total_dirty")?,
                writeback: field("total_writeback")?,
                inactive_file: field("total_inactive_file")?,
            },
            Version::V2 => MemStat {
                usage,
                file: field("file")?,
                anon: field("anon")?,
                dirty: field("file_dirty")?,
                writeback: field("file_writeback")?,
                inactive_file: field("inactive_file")?,
            },
        })
    }

    /// Limit-hit and OOM-kill counters.
    pub fn events(&self) -> Result<MemEvents> {
        match self.version {
            Version::V1 => {
                let oom = self.read_keyed("memory.oom_control")?;
                Ok(MemEvents {
                    limit_hits: self.read_number("memory.failcnt")?,
                    oom_kills: find_key(&oom, "oom_kill").unwrap_or(0),
                })
            }
            Version::V2 => {
                let events = self.read_keyed("memory.events")?;
                Ok(MemEvents {
                    limit_hits: find_key(&events, "max").unwrap_or(0),
                    oom_kills: find_key(&events, "oom_kill").unwrap_or(0),
                })
            }
        }
    }

    fn read_number(&self, name: &str) -> Result<u64> {
        let path = self.dir.join(name);
        let text = read_text(&path)?;
        parse_number(&text).ok_or_else(|| malformed(&path, &text))
    }

    fn read_keyed(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let path = self.dir.join(name);
        let text = read_text(&path)?;
        parse_keyed(&text).ok_or_else(|| malformed(&path, &text))
    }
}

/// Every memory.stat field the troubleshooting report shows, named the same on both hierarchies (v1 hierarchical
/// `total_*` fields, v2 fields), from one reading of memory.stat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemBreakdown {
    /// Page cache, shmem included (v1 total_cache, v2 file).
    pub file: u64,
    /// Anonymous memory (v1 total_rss, v2 anon).
    pub anon: u64,
    /// Dirty page cache (v1 total_dirty, v2 file_dirty).
    pub dirty: u64,
    /// Page cache under writeback (v1 total_writeback, v2 file_writeback).
    pub writeback: u64,
    /// Active file pages (v1 total_active_file, v2 active_file).
    pub active_file: u64,
    /// Inactive file pages (v1 total_inactive_file, v2 inactive_file).
    pub inactive_file: u64,
    /// Active anonymous pages (v1 total_active_anon, v2 active_anon).
    pub active_anon: u64,
    /// Inactive anonymous pages (v1 total_inactive_anon, v2 inactive_anon).
    pub inactive_anon: u64,
    /// Shared memory and tmpfs (v1 total_shmem, v2 shmem).
    pub shmem: u64,
    /// File pages mapped into processes (v1 total_mapped_file, v2 file_mapped).
    pub mapped_file: u64,
}

/// Every limit and OOM counter the kernel keeps for a memory cgroup. A counter this kernel does not keep is
/// `None`; a file that cannot be read is an error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemEventCounts {
    /// Times a charge hit the limit: v1 memory.failcnt plus memory.memsw.failcnt where present (a failed charge
    /// is counted in at most one of them), v2 memory.events `max`.
    pub limit_hits: u64,
    /// Times usage went over memory.high and was throttled (v2 memory.events `high`; v1 has no such limit).
    pub high: Option<u64>,
    /// Times the OOM killer was invoked for this cgroup (v2 memory.events `oom`).
    pub oom: Option<u64>,
    /// Processes the OOM killer killed (v2 memory.events `oom_kill`, v1 memory.oom_control `oom_kill`, since
    /// Linux 4.13).
    pub oom_kills: Option<u64>,
    /// Whether the cgroup is in OOM now, its tasks stopped (v1 memory.oom_control `under_oom`, only with
    /// oom_kill_disable).
    pub under_oom: Option<bool>,
}

/// Pressure stall information of one resource: the share of wall time some (or all) tasks waited for memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Pressure {
    /// `some` averages over 10, 60 and 300 seconds, in percent.
    pub some_avg: [f64; 3],
    /// `full` averages over 10, 60 and 300 seconds, in percent.
    pub full_avg: [f64; 3],
    /// Total `some` stall time in microseconds.
    pub some_total_us: u64,
    /// Total `full` stall time in microseconds.
    pub full_total_us: u64,
}

impl MemCgroup {
    /// The memory cgroup of process `pid`, found from /proc/PID/cgroup and our own mount table (paths in
    /// /proc/PID/cgroup are relative to the reader's cgroup namespace). `None` when it is in no memory cgroup
    /// visible here.
    pub fn of_pid(pid: u32) -> Result<Option<MemCgroup>> {
        let membership = read_text(&PathBuf::from(format!("/proc/{pid}/cgroup")))?;
        let mountinfo = read_text(Path::new("/proc/self/mountinfo"))?;
        Ok(locate(&membership, &mountinfo).filter(|cg| cg.dir.join(cg.version.usage_file()).exists()))
    }

    /// The memory cgroup at `dir`, its version told by the files it holds (memory.current: v2,
    /// memory.usage_in_bytes: v1).
    pub fn detect(dir: impl Into<PathBuf>) -> Result<MemCgroup> {
        let dir = dir.into();
        for version in [Version::V2, Version::V1] {
            if dir.join(version.usage_file()).exists() {
                return Ok(MemCgroup { dir, version });
            }
        }
        Err(Error::new(
            crate::error::ErrorKind::Usage,
            "not a memory cgroup (neither memory.current nor memory.usage_in_bytes is there)",
        )
        .at_path(dir))
    }

    /// memory.high (v2), `None` when it is `max` or on v1, which has no such limit.
    pub fn high(&self) -> Result<Option<u64>> {
        match self.version {
            Version::V1 => Ok(None),
            Version::V2 => self.read_max("memory.high"),
        }
    }

    /// All memory.stat fields of [`MemBreakdown`]; a missing field is an error naming it.
    pub fn breakdown(&self) -> Result<MemBreakdown> {
        let stat = self.read_keyed("memory.stat")?;
        let field = |name: &str| {
            find_key(&stat, name).ok_or_else(|| {
                Error::new(crate::error::ErrorKind::Io, format!("memory.stat has no {name} field"))
                    .at_path(self.dir.join("memory.stat"))
            })
        };
        let names = match self.version {
            Version::V1 => [
                "total_cache",
                "total_rss",
                "total_dirty",
                "total_writeback",
                "total_active_file",
                "total_inactive_file",
                "total_active_anon",
                "total_inactive_anon",
                "total_shmem",
                "total_mapped_file",
            ],
            Version::V2 => [
                "file",
                "anon",
                "file_dirty",
                "file_writeback",
                "active_file",
                "inactive_file",
                "active_anon",
                "inactive_anon",
                "shmem",
                "file_mapped",
            ],
        };
        Ok(MemBreakdown {
            file: field(names[0])?,
            anon: field(names[1])?,
            dirty: field(names[2])?,
            writeback: field(names[3])?,
            active_file: field(names[4])?,
            inactive_file: field(names[5])?,
            active_anon: field(names[6])?,
            inactive_anon: field(names[7])?,
            shmem: field(names[8])?,
            mapped_file: field(names[9])?,
        })
    }

    /// Every limit and OOM counter; see [`MemEventCounts`].
    pub fn event_counts(&self) -> Result<MemEventCounts> {
        match self.version {
            Version::V1 => {
                let oom = self.read_keyed("memory.oom_control")?;
                let mut limit_hits = self.read_number("memory.failcnt")?;
                if self.dir.join("memory.memsw.failcnt").exists() {
                    limit_hits += self.read_number("memory.memsw.failcnt")?;
                }
                Ok(MemEventCounts {
                    limit_hits,
                    high: None,
                    oom: None,
                    oom_kills: find_key(&oom, "oom_kill"),
                    under_oom: find_key(&oom, "under_oom").map(|v| v != 0),
                })
            }
            Version::V2 => {
                let path = self.dir.join("memory.events");
                let events = self.read_keyed("memory.events")?;
                let limit_hits = find_key(&events, "max").ok_or_else(|| {
                    Error::new(crate::error::ErrorKind::Io, "memory.events has no max field").at_path(&path)
                })?;
                Ok(MemEventCounts {
                    limit_hits,
                    high: find_key(&events, "high"),
                    oom: find_key(&events, "oom"),
                    oom_kills: find_key(&events, "oom_kill"),
                    under_oom: None,
                })
            }
        }
    }

    /// memory.pressure (v2 with PSI), `None` where the file does not exist (v1, or a kernel without PSI).
    pub fn pressure(&self) -> Result<Option<Pressure>> {
        let path = self.dir.join("memory.pressure");
        if !path.exists() {
            return Ok(None);
        }
        read_pressure(&path).map(Some)
    }

    /// The processes of this cgroup itself (cgroup.procs; not those of its children).
    pub fn procs(&self) -> Result<Vec<u32>> {
        let path = self.dir.join("cgroup.procs");
        let text = read_text(&path)?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().parse().map_err(|_| malformed(&path, l)))
            .collect()
    }

    /// The cgroups directly below this one (each a directory holding the same kind of memory cgroup).
    pub fn children(&self) -> Result<Vec<MemCgroup>> {
        let entries = fs::read_dir(&self.dir).io_context("listing cgroup").map_err(|e| e.at_path(&self.dir))?;
        let mut children = Vec::new();
        for entry in entries {
            let entry = entry.io_context("listing cgroup").map_err(|e| e.at_path(&self.dir))?;
            let path = entry.path();
            if path.is_dir() && path.join(self.version.usage_file()).exists() {
                children.push(MemCgroup { dir: path, version: self.version });
            }
        }
        children.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok(children)
    }

    /// Reads a v2 `max`-or-number file: `None` for `max`.
    fn read_max(&self, name: &str) -> Result<Option<u64>> {
        let path = self.dir.join(name);
        let text = read_text(&path)?;
        if text.trim() == "max" {
            return Ok(None);
        }
        parse_number(&text).map(Some).ok_or_else(|| malformed(&path, &text))
    }
}

/// Where the memory controller's hierarchy is mounted here, from /proc/self/mountinfo: the v1 `memory` hierarchy
/// if there is one, else the unified one. `None` when neither is mounted.
pub fn memory_hierarchy() -> Result<Option<(PathBuf, Version)>> {
    let mountinfo = read_text(Path::new("/proc/self/mountinfo"))?;
    Ok(hierarchy_mount(&mountinfo))
}

fn hierarchy_mount(mountinfo: &str) -> Option<(PathBuf, Version)> {
    let mut v2 = None;
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else { continue };
        let fields: Vec<&str> = before.split(' ').collect();
        let tail: Vec<&str> = after.split(' ').collect();
        if fields.len() < 5 || tail.len() < 3 {
            continue;
        }
        let mountpoint = PathBuf::from(unescape_mount_path(fields[4]));
        match tail[0] {
            "cgroup" if tail[2].split(',').any(|o| o == "memory") => return Some((mountpoint, Version::V1)),
            "cgroup2" if v2.is_none() => v2 = Some((mountpoint, Version::V2)),
            _ => {}
        }
    }
    v2
}

/// Reads a PSI file (`some avg10=0.00 avg60=0.00 avg300=0.00 total=0`, then `full ...`): a cgroup's
/// memory.pressure or the node's /proc/pressure/memory.
pub fn read_pressure(path: &Path) -> Result<Pressure> {
    let text = read_text(path)?;
    parse_pressure(&text).ok_or_else(|| malformed(path, &text))
}

fn parse_pressure(text: &str) -> Option<Pressure> {
    let mut pressure = Pressure::default();
    let mut seen = (false, false);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let kind = parts.next()?;
        let mut avg = [0.0; 3];
        let mut total = 0;
        for part in parts {
            let (key, value) = part.split_once('=')?;
            match key {
                "avg10" => avg[0] = value.parse().ok()?,
                "avg60" => avg[1] = value.parse().ok()?,
                "avg300" => avg[2] = value.parse().ok()?,
                "total" => total = value.parse().ok()?,
                _ => {}
            }
        }
        match kind {
            "some" => (pressure.some_avg, pressure.some_total_us, seen.0) = (avg, total, true),
            "full" => (pressure.full_avg, pressure.full_total_us, seen.1) = (avg, total, true),
            _ => return None,
        }
    }
    seen.0.then_some(pressure)
}

impl Version {
    fn usage_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).io_context("reading cgroup file").map_err(|e| e.at_path(path))
}

fn malformed(path: &Path, text: &str) -> Error {
    let first = text.lines().next().unwrap_or("");
    Error::new(crate::error::ErrorKind::Io, format!("unexpected contents {first:?}")).at_path(path)
}

fn parse_number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Parses `key value` lines (memory.stat, memory.events, memory.oom_control).
fn parse_keyed(text: &str) -> Option<Vec<(String, u64)>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            let key = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

fn find_key(pairs: &[(String, u64)], key: &str) -> Option<u64> {
    pairs.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
}

/// Finds the memory cgroup directory from /proc/self/cgroup and /proc/self/mountinfo contents. A v1 memory
/// hierarchy wins over v2 (the controller can be bound to only one, and hybrid hosts mount both).
fn locate(membership: &str, mountinfo: &str) -> Option<MemCgroup> {
    let mut v2_path = None;
    let mut v1_path = None;
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if id == "0" && controllers.is_empty() {
            v2_path = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1_path = Some(path);
        }
    }
    for line in mountinfo.lines() {
        // Fields: id parent maj:min root mountpoint options [optional...] - fstype source superoptions
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let tail: Vec<&str> = after.split(' ').collect();
        if fields.len() < 5 || tail.len() < 3 {
            continue;
        }
        let (root, mountpoint, fstype, superopts) = (fields[3], fields[4], tail[0], tail[2]);
        let (path, version) = match (fstype, v1_path, v2_path) {
            ("cgroup", Some(p), _) if superopts.split(',').any(|o| o == "memory") => (p, Version::V1),
            ("cgroup2", None, Some(p)) => (p, Version::V2),
            _ => continue,
        };
        let relative = path.strip_prefix(root).unwrap_or(path).trim_start_matches('/');
        return Some(MemCgroup::at(Path::new(&unescape_mount_path(mountpoint)).join(relative), version));
    }
    None
}

/// mountinfo escapes spaces and a few other bytes as octal (`\040`).
fn unescape_mount_path(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_CGROUP: &str = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTINFO: &str = "\
25 20 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
28 25 0:25 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
33 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_memory_hierarchy_wins_on_hybrid_hosts() {
        let cg = locate(HYBRID_CGROUP, HYBRID_MOUNTINFO).unwrap();
        assert_eq!(cg, MemCgroup::at("/sys/fs/cgroup/memory/process_api/abc", Version::V1));
    }

    #[test]
    fn v2_unified_with_namespaced_root() {
        let membership = "0::/kubepods/pod1/ctr\n";
        let mountinfo = "40 30 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let cg = locate(membership, mountinfo).unwrap();
        assert_eq!(cg, MemCgroup::at("/sys/fs/cgroup/ctr", Version::V2));
    }

    #[test]
    fn no_memory_controller_means_none() {
        assert_eq!(locate("1:cpu:/\n", "28 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"), None);
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/mnt/with\\040space"), "/mnt/with space");
    }

    fn fake_v2(files: &[(&str, &str)]) -> (tempfile::TempDir, MemCgroup) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        let cg = MemCgroup::at(dir.path(), Version::V2);
        (dir, cg)
    }

    #[test]
    fn v2_readings() {
        let stat = "anon 100\nfile 2000\nfile_dirty 30\nfile_writeback 40\ninactive_file 500\n";
        let (_dir, cg) = fake_v2(&[
            ("memory.current", "4096\n"),
            ("memory.max", "600000000\n"),
            ("memory.stat", stat),
            ("memory.events", "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n"),
        ]);
        let s = cg.stat().unwrap();
        assert_eq!((s.usage, s.file, s.anon, s.dirty_writeback(), s.working_set()), (4096, 2000, 100, 70, 3596));
        assert_eq!(cg.events().unwrap(), MemEvents { limit_hits: 7, oom_kills: 1 });
        assert_eq!(cg.limit().unwrap(), Some(600_000_000));
    }

    #[test]
    fn unreadable_or_malformed_files_are_errors_not_zeros() {
        let (_dir, cg) = fake_v2(&[("memory.current", "lots\n"), ("memory.stat", "anon 1\n")]);
        assert!(cg.usage().is_err());
        let err = cg.stat().unwrap_err();
        assert!(err.to_string().contains("memory.current") || err.to_string().contains("file"), "{err}");
        let missing = MemCgroup::at("/nonexistent/cgroup", Version::V1);
        assert!(missing.stat().is_err());
        assert!(missing.usage().is_err());
    }

    #[test]
    fn v2_breakdown_events_pressure_and_procs() {
        let stat = "anon 100\nfile 2000\nfile_dirty 30\nfile_writeback 40\nactive_file 1500\ninactive_file 500\n\
                    active_anon 90\ninactive_anon 10\nshmem 5\nfile_mapped 7\n";
        let (dir, cg) = fake_v2(&[
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.high", "300000000\n"),
            ("memory.stat", stat),
            ("memory.events", "low 0\nhigh 3\nmax 7\noom 2\noom_kill 1\n"),
            (
                "memory.pressure",
                "some avg10=2.50 avg60=1.00 avg300=0.20 total=999\nfull avg10=1.25 avg60=0.50 avg300=0.10 total=444\n",
            ),
            ("cgroup.procs", "12\n34\n"),
        ]);
        let b = cg.breakdown().unwrap();
        assert_eq!(
            (b.file, b.anon, b.dirty, b.writeback, b.active_file, b.inactive_file),
            (2000, 100, 30, 40, 1500, 500)
        );
        assert_eq!((b.active_anon, b.inactive_anon, b.shmem, b.mapped_file), (90, 10, 5, 7));
        let e = cg.event_counts().unwrap();
        assert_eq!((e.limit_hits, e.high, e.oom, e.oom_kills, e.under_oom), (7, Some(3), Some(2), Some(1), None));
        let p = cg.pressure().unwrap().unwrap();
        assert_eq!((p.some_avg, p.full_avg[0], p.some_total_us, p.full_total_us), ([2.5, 1.0, 0.2], 1.25, 999, 444));
        assert_eq!(cg.procs().unwrap(), vec![12, 34]);
        assert_eq!((cg.limit().unwrap(), cg.high().unwrap()), (None, Some(300_000_000)));
        assert_eq!(MemCgroup::detect(dir.path()).unwrap().version(), Version::V2);
        // A child cgroup is a directory with the usage file.
        fs::create_dir(dir.path().join("ctr")).unwrap();
        fs::write(dir.path().join("ctr/memory.current"), "1\n").unwrap();
        fs::create_dir(dir.path().join("not-a-cgroup")).unwrap();
        assert_eq!(cg.children().unwrap(), vec![MemCgroup::at(dir.path().join("ctr"), Version::V2)]);
    }

    #[test]
    fn missing_fields_and_files_are_named() {
        let (_dir, cg) = fake_v2(&[("memory.stat", "anon 1\nfile 2\n"), ("memory.events", "oom 1\n")]);
        let err = cg.breakdown().unwrap_err().to_string();
        assert!(err.contains("memory.stat") && err.contains("file_dirty"), "{err}");
        assert!(cg.event_counts().unwrap_err().to_string().contains("no max field"));
        assert_eq!(cg.pressure().unwrap(), None, "no memory.pressure: a kernel without PSI, not an error");
        assert!(cg.procs().unwrap_err().to_string().contains("cgroup.procs"));
        assert!(MemCgroup::detect("/nonexistent").is_err());
        assert_eq!(parse_pressure("some avg10=x\n"), None);
    }

    #[test]
    fn hierarchy_mount_prefers_v1_memory() {
        assert_eq!(hierarchy_mount(HYBRID_MOUNTINFO), Some((PathBuf::from("/sys/fs/cgroup/memory"), Version::V1)));
        let unified = "33 25 0:30 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(hierarchy_mount(unified), Some((PathBuf::from("/sys/fs/cgroup"), Version::V2)));
        assert_eq!(hierarchy_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn v1_readers_on_this_hosts_memcg() {
        // The real v1 memcg of this host (skipped where the host has v2 only: the v2 tests above use fixtures).
        let Some(cg) = MemCgroup::own().unwrap() else { return };
        if cg.version() != Version::V1 {
            return;
        }
        let b = cg.breakdown().unwrap();
        let s = cg.stat().unwrap();
        // Two readings a moment apart (other tests write files meanwhile): the same fields, nearly the same values.
        for (x, y) in [(b.file, s.file), (b.anon, s.anon), (b.inactive_file, s.inactive_file)] {
            assert!(x.abs_diff(y) < 64 << 20, "breakdown {b:?} against stat {s:?}");
        }
        assert!(b.active_file + b.inactive_file <= b.file + (1 << 20));
        let e = cg.event_counts().unwrap();
        assert!(e.oom_kills.is_some(), "6.x kernels keep oom_kill in memory.oom_control");
        assert_eq!(e.high, None);
        assert!(cg.procs().unwrap().contains(&std::process::id()));
        assert_eq!(cg.pressure().unwrap(), None, "v1 memcgs have no memory.pressure");
        assert_eq!(MemCgroup::detect(cg.dir()).unwrap(), cg);
        assert_eq!(MemCgroup::of_pid(std::process::id()).unwrap(), Some(cg.clone()));
        let (mount, version) = memory_hierarchy().unwrap().unwrap();
        assert!(cg.dir().starts_with(&mount) && version == Version::V1);
    }

    #[test]
    fn own_cgroup_reads_on_this_host() {
        // Whatever this host has, reading it must not fail once found.
        if let Some(cg) = MemCgroup::own().unwrap() {
            let stat = cg.stat().unwrap();
            assert!(stat.usage > 0);
            cg.limit().unwrap();
            cg.events().unwrap();
        }
    }
}
