//! One reading of everything the troubleshooting checklist looks at: the cgroup's counters (through the same
//! reader as the governor), its processes and the files they write, the node's dirty settings, kernel OOM lines.
//!
//! Nothing here turns a failed read into a number: a reading that failed is `None` and the file is named in
//! [`Snapshot::unreadable`].

use super::kmsg::OomKill;
use super::writers::{OpenFile, Process};
use crate::cgroup::{self, MemCgroup, Version};
use crate::error::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A file (or directory) that could not be read, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    /// The file.
    pub path: PathBuf,
    /// The error, one line.
    pub error: String,
}

/// Memory pressure (PSI) and where it was read.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PressureReading {
    /// `cgroup` (its memory.pressure) or `node` (/proc/pressure/memory, when the cgroup has none: v1).
    pub scope: &'static str,
    /// Share of the last 10 s some task waited for memory, percent.
    pub some_avg10: f64,
    /// Share of the last 10 s all tasks waited for memory, percent.
    pub full_avg10: f64,
    /// Same over 60 s.
    pub some_avg60: f64,
    /// Total `some` stall time, microseconds.
    pub some_total_us: u64,
}

/// The node's memory and dirty-page settings: what decides when writers are throttled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Node {
    /// MemTotal.
    pub mem_total_bytes: Option<u64>,
    /// MemAvailable.
    pub mem_available_bytes: Option<u64>,
    /// Dirty (whole node).
    pub dirty_bytes: Option<u64>,
    /// Writeback (whole node).
    pub writeback_bytes: Option<u64>,
    /// vm.dirty_ratio (percent).
    pub dirty_ratio: Option<u64>,
    /// vm.dirty_background_ratio (percent).
    pub dirty_background_ratio: Option<u64>,
    /// vm.dirty_bytes (0: the ratio applies).
    pub vm_dirty_bytes: Option<u64>,
    /// vm.dirty_background_bytes (0: the ratio applies).
    pub vm_dirty_background_bytes: Option<u64>,
    /// vm.dirty_expire_centisecs.
    pub dirty_expire_centisecs: Option<u64>,
    /// vm.dirty_writeback_centisecs.
    pub dirty_writeback_centisecs: Option<u64>,
    /// The kernel's current node-wide dirty threshold (/proc/vmstat nr_dirty_threshold): above it writers are
    /// throttled. On cgroup v1, and for filesystems without cgroup writeback on v2, the only dirty limit.
    pub dirty_threshold_bytes: Option<u64>,
    /// The background threshold (nr_dirty_background_threshold): above it the flushers start.
    pub background_threshold_bytes: Option<u64>,
}

/// Everything one sample reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Seconds since the Unix epoch.
    pub time_unix: f64,
    /// The cgroup directory.
    pub cgroup: PathBuf,
    /// `v1` or `v2`.
    pub cgroup_version: &'static str,
    /// The effective limit (the smallest of this cgroup's and its ancestors'); `None` when unlimited or unreadable
    /// (then `unlimited` tells which).
    pub limit_bytes: Option<u64>,
    /// Whether the cgroup has no limit at all.
    pub unlimited: bool,
    /// memory.high (v2).
    pub high_bytes: Option<u64>,
    /// Charged bytes.
    pub usage_bytes: Option<u64>,
    /// Highest charge (memory.max_usage_in_bytes / memory.peak).
    pub peak_bytes: Option<u64>,
    /// usage − inactive_file: what the kubelet and `kubectl top` show.
    pub working_set_bytes: Option<u64>,
    /// Anonymous memory (RSS in v1's words).
    pub anon_bytes: Option<u64>,
    /// Page cache (shmem included).
    pub file_bytes: Option<u64>,
    /// Active file pages.
    pub active_file_bytes: Option<u64>,
    /// Inactive file pages.
    pub inactive_file_bytes: Option<u64>,
    /// Dirty page cache.
    pub dirty_bytes: Option<u64>,
    /// Page cache under writeback.
    pub writeback_bytes: Option<u64>,
    /// Shared memory / tmpfs.
    pub shmem_bytes: Option<u64>,
    /// Limit hits (v1 failcnt + memsw.failcnt, v2 memory.events max).
    pub limit_hits: Option<u64>,
    /// memory.high events (v2).
    pub high_events: Option<u64>,
    /// Times the OOM killer was invoked (v2 memory.events oom).
    pub oom_events: Option<u64>,
    /// The cgroup is in OOM now with its tasks stopped (v1 memory.oom_control under_oom, with oom_kill_disable).
    pub under_oom: Option<bool>,
    /// OOM kills (v2 memory.events oom_kill; v1 memory.oom_control oom_kill of the cgroup and all below it).
    pub oom_kills: Option<u64>,
    /// Memory pressure, the cgroup's where it has PSI, else the node's.
    pub pressure: Option<PressureReading>,
    /// The node's dirty settings and counters.
    pub node: Node,
    /// Processes in the cgroup and its descendants.
    pub processes: Vec<Process>,
    /// Files those processes have open for writing, with their page cache.
    pub writers: Vec<OpenFile>,
    /// Files open only for reading that hold page cache (a source read through the cache shows here).
    pub readers: Vec<OpenFile>,
    /// Kernel OOM kills in this cgroup found in /dev/kmsg; `None` when /dev/kmsg was not readable.
    pub kernel_oom_kills: Option<Vec<OomKill>>,
    /// Files that could not be read.
    pub unreadable: Vec<Unreadable>,
}

impl Snapshot {
    /// Dirty plus writeback, when both were read.
    pub fn dirty_writeback(&self) -> Option<u64> {
        Some(self.dirty_bytes? + self.writeback_bytes?)
    }
}

/// Collects failed reads while a snapshot is taken.
#[derive(Debug, Default)]
pub struct Misses(pub Vec<Unreadable>);

impl Misses {
    /// The value of `result`, or `None` with the failure recorded (the error's path, else `fallback`).
    pub fn take<T>(&mut self, result: Result<T>, fallback: &Path) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(err) => {
                self.record(&err, fallback);
                None
            }
        }
    }

    /// Records `err` against its path (else `fallback`).
    pub fn record(&mut self, err: &Error, fallback: &Path) {
        let path = err.path().unwrap_or(fallback).to_path_buf();
        let text = err.to_string();
        // The path is its own field; keep the message without it.
        let prefix = format!("{}: ", path.display());
        let error = text.strip_prefix(&prefix).unwrap_or(&text).to_string();
        if !self.0.iter().any(|u| u.path == path && u.error == error) {
            self.0.push(Unreadable { path, error });
        }
    }
}

/// Reads the cgroup counters into `snap` (everything but processes, files, node and kernel lines).
pub fn read_cgroup(cg: &MemCgroup, snap: &mut Snapshot, misses: &mut Misses) {
    let dir = cg.dir();
    snap.cgroup = dir.to_path_buf();
    snap.cgroup_version = match cg.version() {
        Version::V1 => "v1",
        Version::V2 => "v2",
    };
    match cg.limit() {
        Ok(limit) => {
            snap.limit_bytes = limit;
            snap.unlimited = limit.is_none();
        }
        Err(err) => misses.record(&err, dir),
    }
    snap.high_bytes = misses.take(cg.high(), dir).flatten();
    snap.usage_bytes = misses.take(cg.usage(), dir);
    snap.peak_bytes = misses.take(cg.peak(), dir).flatten();
    if let Some(b) = misses.take(cg.breakdown(), &dir.join("memory.stat")) {
        snap.anon_bytes = Some(b.anon);
        snap.file_bytes = Some(b.file);
        snap.active_file_bytes = Some(b.active_file);
        snap.inactive_file_bytes = Some(b.inactive_file);
        snap.dirty_bytes = Some(b.dirty);
        snap.writeback_bytes = Some(b.writeback);
        snap.shmem_bytes = Some(b.shmem);
        snap.working_set_bytes = snap.usage_bytes.map(|u| u.saturating_sub(b.inactive_file));
    }
    if let Some(events) = misses.take(cg.event_counts(), dir) {
        snap.limit_hits = Some(events.limit_hits);
        snap.high_events = events.high;
        snap.oom_events = events.oom;
        snap.under_oom = events.under_oom;
        snap.oom_kills = events.oom_kills;
        if cg.version() == Version::V1 {
            // v1 counts a kill only in the victim's own cgroup (v2's memory.events is hierarchical): a pod's
            // count is the sum over its containers.
            snap.oom_kills = snap.oom_kills.and_then(|own| Some(own + descendant_oom_kills(cg, misses)?));
        }
        if events.oom_kills.is_none() {
            let file = if cg.version() == Version::V1 { "memory.oom_control" } else { "memory.events" };
            misses.0.push(Unreadable {
                path: dir.join(file),
                error: "has no oom_kill counter (kernel before 4.13)".to_string(),
            });
        }
    }
    snap.pressure = match misses.take(cg.pressure(), dir) {
        Some(Some(p)) => Some(pressure_reading("cgroup", p)),
        Some(None) => {
            let node = Path::new("/proc/pressure/memory");
            if node.exists() {
                misses.take(cgroup::read_pressure(node), node).map(|p| pressure_reading("node", p))
            } else {
                None
            }
        }
        None => None,
    };
}

/// The v1 oom_kill counters of every cgroup below `cg`; `None` if one could not be read (it is recorded).
fn descendant_oom_kills(cg: &MemCgroup, misses: &mut Misses) -> Option<u64> {
    let mut total = 0;
    for child in misses.take(cg.children(), cg.dir())? {
        let own = misses.take(child.event_counts(), child.dir())?.oom_kills.unwrap_or(0);
        total += own + descendant_oom_kills(&child, misses)?;
    }
    Some(total)
}

fn pressure_reading(scope: &'static str, p: cgroup::Pressure) -> PressureReading {
    PressureReading {
        scope,
        some_avg10: p.some_avg[0],
        full_avg10: p.full_avg[0],
        some_avg60: p.some_avg[1],
        some_total_us: p.some_total_us,
    }
}

/// Reads the node's memory counters and dirty settings.
pub fn read_node(misses: &mut Misses) -> Node {
    let mut node = Node::default();
    let meminfo = Path::new("/proc/meminfo");
    if let Some(text) = misses.take(read(meminfo), meminfo) {
        let kib = |key: &str| meminfo_kib(&text, key).map(|v| v * 1024);
        node.mem_total_bytes = kib("MemTotal");
        node.mem_available_bytes = kib("MemAvailable");
        node.dirty_bytes = kib("Dirty");
        node.writeback_bytes = kib("Writeback");
    }
    let mut sysctl = |name: &str| {
        let path = PathBuf::from(format!("/proc/sys/vm/{name}"));
        let text = misses.take(read(&path), &path)?;
        let value = text.trim().parse().ok();
        if value.is_none() {
            misses.0.push(Unreadable { path, error: format!("unexpected contents {:?}", text.trim()) });
        }
        value
    };
    node.dirty_ratio = sysctl("dirty_ratio");
    node.dirty_background_ratio = sysctl("dirty_background_ratio");
    node.vm_dirty_bytes = sysctl("dirty_bytes");
    node.vm_dirty_background_bytes = sysctl("dirty_background_bytes");
    node.dirty_expire_centisecs = sysctl("dirty_expire_centisecs");
    node.dirty_writeback_centisecs = sysctl("dirty_writeback_centisecs");
    let vmstat = Path::new("/proc/vmstat");
    if let Some(text) = misses.take(read(vmstat), vmstat) {
        let page = crate::sys::page_size();
        let pages =
            |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse::<u64>().ok());
        node.dirty_threshold_bytes = pages("nr_dirty_threshold").map(|p| p * page);
        node.background_threshold_bytes = pages("nr_dirty_background_threshold").map(|p| p * page);
    }
    node
}

/// A value in KiB from /proc/meminfo or /proc/PID/status text (`Key:   123 kB`).
pub fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Reads a text file with the path in the error.
pub fn read(path: &Path) -> Result<String> {
    use crate::error::IoContext;
    std::fs::read_to_string(path).io_context("reading").map_err(|e| e.at_path(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_values() {
        let text = "MemTotal:       24683520 kB\nDirty:              1024 kB\nWriteback:             0 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal"), Some(24_683_520));
        assert_eq!(meminfo_kib(text, "Dirty"), Some(1024));
        assert_eq!(meminfo_kib(text, "Writeback"), Some(0));
        assert_eq!(meminfo_kib(text, "WritebackTmp"), None);
    }

    #[test]
    fn misses_name_the_file_once() {
        let mut misses = Misses::default();
        let err = || Error::io("reading", std::io::Error::from_raw_os_error(libc::EACCES)).at_path("/x/memory.stat");
        assert_eq!(misses.take::<u64>(Err(err()), Path::new("/x")), None);
        misses.record(&err(), Path::new("/x"));
        assert_eq!(misses.0.len(), 1);
        assert_eq!(misses.0[0].path, Path::new("/x/memory.stat"));
        assert!(misses.0[0].error.starts_with("reading: Permission denied"), "{}", misses.0[0].error);
    }

    #[test]
    fn a_v2_tree_with_an_unreadable_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("memory.current", "104857600\n");
        write("memory.max", "209715200\n");
        write("memory.high", "max\n");
        write("memory.peak", "115343360\n");
        write(
            "memory.stat",
            "anon 10485760\nfile 94371840\nfile_dirty 41943040\nfile_writeback 10485760\nactive_file 73400320\n\
             inactive_file 20971520\nactive_anon 10485760\ninactive_anon 0\nshmem 0\nfile_mapped 0\n",
        );
        write(
            "memory.pressure",
            "some avg10=1.50 avg60=0.40 avg300=0.10 total=12345\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=678\n",
        );
        std::fs::create_dir(dir.path().join("memory.events")).unwrap(); // reading a directory fails
        let cg = MemCgroup::detect(dir.path()).unwrap();
        let mut snap = Snapshot::default();
        let mut misses = Misses::default();
        read_cgroup(&cg, &mut snap, &mut misses);
        assert_eq!(snap.cgroup_version, "v2");
        assert_eq!(snap.limit_bytes, Some(200 << 20));
        assert_eq!(snap.usage_bytes, Some(100 << 20));
        assert_eq!(snap.working_set_bytes, Some(80 << 20));
        assert_eq!(snap.dirty_writeback(), Some(50 << 20));
        assert_eq!(snap.peak_bytes, Some(110 << 20));
        assert_eq!(snap.high_bytes, None);
        let pressure = snap.pressure.unwrap();
        assert_eq!((pressure.scope, pressure.some_avg10, pressure.full_avg10), ("cgroup", 1.5, 0.5));
        assert_eq!((snap.limit_hits, snap.oom_kills), (None, None), "unreadable counters are not zeros");
        assert_eq!(misses.0.len(), 1, "{:?}", misses.0);
        assert_eq!(misses.0[0].path, dir.path().join("memory.events"));
    }
}
