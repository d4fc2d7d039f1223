//! The verdict: a pure function of a snapshot (and, with `--watch`, of how it changed since the first sample).
//!
//! | verdict               | when (first match wins)                                                              |
//! |-----------------------|--------------------------------------------------------------------------------------|
//! | `unknown`             | usage or memory.stat could not be read                                               |
//! | `oom-killed`          | the cgroup's oom_kill counter is above zero, or the kernel log has a kill for it     |
//! | `page-cache-pressure` | dirty + writeback ≥ ¼ of the limit while near it, or ≥ ½ of the limit at all         |
//! | `anonymous-pressure`  | near the limit, anonymous ≥ ½ of the charge; or anonymous ≥ ½ of the limit, growing  |
//! | `clean-cache`         | near the limit (or `kubectl top` ≥ ½ of it) and the rest is mostly clean page cache  |
//! | `healthy`             | none of the above                                                                    |
//!
//! "Near the limit" is usage ≥ 90% of it, or a limit hit during `--watch`.

use super::snapshot::Snapshot;
use serde::Serialize;

/// Usage at or above this share of the limit counts as near it.
const NEAR_LIMIT: f64 = 0.90;

/// Anonymous growth (bytes/s, over the whole watch) that counts as growing.
const GROWING: f64 = 256.0 * 1024.0;

/// What the numbers mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Processes in the cgroup were OOM-killed.
    OomKilled,
    /// Dirty and writeback page cache fills the cgroup: writes outrun the storage.
    PageCachePressure,
    /// Anonymous memory fills the cgroup: the workload needs more, or leaks.
    AnonymousPressure,
    /// The charge is high but mostly clean page cache the kernel reclaims on demand.
    CleanCache,
    /// Nothing to worry about.
    Healthy,
    /// The counters could not be read.
    Unknown,
}

impl Kind {
    /// The name printed and put in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::OomKilled => "oom-killed",
            Kind::PageCachePressure => "page-cache-pressure",
            Kind::AnonymousPressure => "anonymous-pressure",
            Kind::CleanCache => "clean-cache",
            Kind::Healthy => "healthy",
            Kind::Unknown => "unknown",
        }
    }
}

/// How the cgroup changed between the first sample of a watch and this one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Trend {
    /// Seconds between the two samples.
    pub seconds: f64,
    /// Change of anonymous memory, bytes per second.
    pub anon_bytes_per_sec: Option<f64>,
    /// Limit hits in between.
    pub limit_hits: Option<u64>,
}

impl Trend {
    /// The change from `first` to `now`.
    pub fn between(first: &Snapshot, now: &Snapshot) -> Trend {
        let seconds = now.time_unix - first.time_unix;
        let anon = match (first.anon_bytes, now.anon_bytes) {
            (Some(a), Some(b)) if seconds > 0.0 => Some((b as f64 - a as f64) / seconds),
            _ => None,
        };
        let hits = match (first.limit_hits, now.limit_hits) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Trend { seconds, anon_bytes_per_sec: anon, limit_hits: hits }
    }
}

/// A verdict, the one line that explains it, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The verdict.
    pub verdict: Kind,
    /// One line naming the numbers and the culprit.
    pub reason: String,
    /// What to do, one line each, most useful first.
    pub advice: Vec<String>,
}

/// Judges `s` (with `trend` from a watch).
pub fn judge(s: &Snapshot, trend: Option<&Trend>) -> Verdict {
    let (Some(usage), Some(file), Some(anon), Some(dw)) =
        (s.usage_bytes, s.file_bytes, s.anon_bytes, s.dirty_writeback())
    else {
        let files: Vec<String> = s.unreadable.iter().map(|u| u.path.display().to_string()).collect();
        return Verdict {
            verdict: Kind::Unknown,
            reason: format!("the cgroup's usage or memory.stat could not be read ({})", files.join(", ")),
            advice: vec!["run as root, or from inside the pod (kubectl exec … -- boundimport diagnose)".to_string()],
        };
    };
    let working_set = s.working_set_bytes.unwrap_or(usage);
    let kubectl = format!("kubectl top shows {}", mib(working_set));
    let anon_note = anon_note(anon, usage, trend);
    let hits_during = trend.and_then(|t| t.limit_hits).unwrap_or(0);
    let near = s.limit_bytes.is_some_and(|l| usage as f64 >= NEAR_LIMIT * l as f64) || hits_during > 0;
    let limit_text = s.limit_bytes.map_or_else(|| "no limit".to_string(), |l| format!("limit {}", mib(l)));

    let counted = s.oom_kills.unwrap_or(0);
    let logged = s.kernel_oom_kills.as_deref().unwrap_or_default();
    let kills = counted.max(logged.len() as u64);
    if kills > 0 {
        let last = logged.last().map_or(String::new(), |k| {
            let pid = k.pid.map_or(String::new(), |pid| format!(" (pid {pid})"));
            let whose = k.below.as_ref().map_or(String::new(), |child| format!(" in {child}"));
            format!("; the kernel killed {}{pid}{whose} at {:.1} s after boot", k.task, k.seconds)
        });
        let counter = match s.cgroup_version {
            "v1" => "memory.oom_control oom_kill",
            _ => "memory.events oom_kill",
        };
        // Whose kills they were: the counter counts this cgroup (and, on v1, its children while they exist); a
        // child's kill found only in the kernel log was in a cgroup since removed or outside the counter.
        let below: Vec<&str> = logged.iter().filter_map(|k| k.below.as_deref()).collect();
        let mut children = below.clone();
        children.dedup();
        let whose = if counted >= logged.len() as u64 {
            format!("{kills} process{} OOM-killed in this cgroup ({counter} {counted})", plural(kills))
        } else if below.is_empty() {
            format!(
                "{kills} process{} OOM-killed in this cgroup (kernel log; {counter} counts {counted})",
                plural(kills)
            )
        } else if below.len() == logged.len() {
            format!(
                "{kills} process{} OOM-killed below this cgroup, in {} (kernel log; this cgroup's {counter} counts \
                 {counted}: not its own kill)",
                plural(kills),
                children.join(", ")
            )
        } else {
            format!(
                "{kills} process{} OOM-killed in this cgroup and below it, in {} (kernel log; {counter} counts \
                 {counted})",
                plural(kills),
                children.join(", ")
            )
        };
        let page_cache = s.limit_bytes.is_some_and(|l| dw >= l / 4) || (file > anon && dw >= file / 2);
        let now = if page_cache {
            format!(
                "now {} of {} charged is file cache, {} of it dirty or under writeback — page cache filled it",
                mib(file),
                mib(usage),
                mib(dw)
            )
        } else {
            format!("now {} charged ({limit_text}): anonymous {}, file cache {}", mib(usage), mib(anon), mib(file))
        };
        let mut advice = vec![
            "the killed container's logs: kubectl logs --previous; the pod: kubectl describe pod (Reason: OOMKilled)"
                .to_string(),
        ];
        advice.extend(if page_cache { page_cache_advice(s) } else { anonymous_advice() });
        return Verdict { verdict: Kind::OomKilled, reason: format!("{whose}{last}; {now}; {kubectl}"), advice };
    }

    if let Some(limit) = s.limit_bytes {
        if (near && dw >= limit / 4) || dw >= limit / 2 {
            let culprit = culprit(s);
            let heading = if near { String::new() } else { " (not at the limit yet, heading there)".to_string() };
            return Verdict {
                verdict: Kind::PageCachePressure,
                reason: format!(
                    "{} of the {} charged ({limit_text}) is file cache, {} of it dirty or under writeback{heading}, \
                     {culprit}{}; {anon_note}; {kubectl}",
                    mib(file),
                    mib(usage),
                    mib(dw),
                    reader_note(s, file)
                ),
                advice: page_cache_advice(s),
            };
        }
        let growing = trend.and_then(|t| t.anon_bytes_per_sec).is_some_and(|r| r >= GROWING);
        if (near && anon >= usage / 2) || (growing && anon >= limit / 2) {
            let top = s.processes.iter().filter(|p| p.rss_bytes.is_some()).max_by_key(|p| p.anon_bytes.or(p.rss_bytes));
            let who = top.map_or(String::new(), |p| {
                format!(", most of it in {} (pid {}, {} resident)", p.command, p.pid, mib(p.rss_bytes.unwrap_or(0)))
            });
            let rate = match trend.and_then(|t| t.anon_bytes_per_sec) {
                Some(r) => format!("; growing {}/s over {:.0} s", mib_f(r), trend.map_or(0.0, |t| t.seconds)),
                None => String::new(),
            };
            return Verdict {
                verdict: Kind::AnonymousPressure,
                reason: format!(
                    "anonymous memory is {} of the {} charged ({limit_text}){who}{rate}; \
                     file cache {} ({} dirty or under writeback); {kubectl}",
                    mib(anon),
                    mib(usage),
                    mib(file),
                    mib(dw)
                ),
                advice: anonymous_advice(),
            };
        }
        if near || (working_set as f64 >= 0.5 * limit as f64 && file >= usage / 2) {
            return Verdict {
                verdict: Kind::CleanCache,
                reason: format!(
                    "{} of the {} charged ({limit_text}) is file cache, only {} of it dirty or under writeback: \
                     clean pages the kernel reclaims on demand{}; {anon_note}; {kubectl}",
                    mib(file),
                    mib(usage),
                    mib(dw),
                    reader_note(s, file)
                ),
                advice: vec![format!(
                    "nothing to fix: kubectl top counts {} of active page cache; \
                     watch limit hits and memory pressure (--watch) for stalls",
                    mib(working_set.saturating_sub(anon))
                )],
            };
        }
    }
    Verdict {
        verdict: Kind::Healthy,
        reason: format!(
            "{} charged ({limit_text}): anonymous {}, file cache {}, {} of it dirty or under writeback; {kubectl}",
            mib(usage),
            mib(anon),
            mib(file),
            mib(dw)
        ),
        advice: Vec::new(),
    }
}

/// "written by qemu-img (pid 12) to /dev/vda", from the writer holding the most dirty + writeback (else cache).
fn culprit(s: &Snapshot) -> String {
    let best = s.writers.iter().max_by_key(|w| (w.dirty_writeback().unwrap_or(0), w.cached_bytes.unwrap_or(0)));
    match best {
        Some(w) => {
            let how = match (w.dirty_writeback(), w.cached_bytes) {
                (Some(dw), _) => format!(" ({} dirty or under writeback there)", mib(dw)),
                (None, Some(c)) => format!(" ({} of it cached there, how much dirty unknown)", mib(c)),
                (None, None) => " (its page cache unknown)".to_string(),
            };
            format!("written by {} (pid {}) to {}{how}", w.command, w.pid, w.path)
        }
        None if s.processes.is_empty() => "and no process is left in the cgroup to name".to_string(),
        None => "but no process in the cgroup has a file open for writing (the writer closed it or exited)".to_string(),
    }
}

/// "; /src.qcow2, read by qemu-img (pid 7), holds 120 MiB of page cache", for the reader holding the most cache
/// when that is at least a quarter of the cgroup's file cache. A file's cache counts pages whoever is charged for
/// them (the cgroup that first read them), so a file holding more than this cgroup's whole file cache is
/// evidently charged elsewhere and is not named.
fn reader_note(s: &Snapshot, file: u64) -> String {
    let best = s.readers.iter().filter(|r| r.cached_bytes.is_some_and(|c| c <= file)).max_by_key(|r| r.cached_bytes);
    match best {
        Some(r) if r.cached_bytes.unwrap_or(0) >= file / 4 && file > 0 => format!(
            "; {} read by {} (pid {}) holds {} of page cache",
            r.path,
            r.command,
            r.pid,
            mib(r.cached_bytes.unwrap_or(0)),
        ),
        _ => String::new(),
    }
}

fn anon_note(anon: u64, usage: u64, trend: Option<&Trend>) -> String {
    let growing = trend.and_then(|t| t.anon_bytes_per_sec);
    match growing {
        Some(r) if r >= GROWING => format!("anonymous memory {} and growing {}/s", mib(anon), mib_f(r)),
        _ if anon * 4 <= usage => format!("anonymous memory {} — not a leak", mib(anon)),
        _ => format!("anonymous memory {}", mib(anon)),
    }
}

fn page_cache_advice(s: &Snapshot) -> Vec<String> {
    let mut advice = vec![
        "import with boundimport (O_DIRECT, or buffered writes paced by this cgroup's dirty pages): \
         its charge stays near 30 MiB whatever the storage speed"
            .to_string(),
        "with qemu-img: -t none -T none (cache=none for destination and source), \
         where the destination accepts O_DIRECT"
            .to_string(),
    ];
    let node = match (s.node.dirty_threshold_bytes, s.limit_bytes) {
        (Some(t), Some(l)) if t > l => {
            format!("; the node lets {} be dirty before it throttles writers, more than this cgroup's limit", mib(t))
        }
        _ => String::new(),
    };
    let scope = if s.cgroup_version == "v1" {
        "cgroup v1 has no per-cgroup dirty limit"
    } else {
        "cgroup v2 limits dirty pages per cgroup only on filesystems with cgroup writeback (not NFS or FUSE)"
    };
    advice.push(format!("a larger limit only buys time while writes outrun the device: {scope}{node}"));
    advice
}

fn anonymous_advice() -> Vec<String> {
    vec![
        "a larger limit if the workload needs this much (compare with its requests and limits)".to_string(),
        "if it keeps growing under --watch, a leak in the process named: its heap, not the page cache".to_string(),
    ]
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "es"
    }
}

/// Bytes as whole MiB (KiB below 1 MiB), the unit the checklist speaks in.
pub fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{} MiB", (bytes + (1 << 19)) >> 20)
    }
}

fn mib_f(bytes_per_sec: f64) -> String {
    format!("{:.1} MiB", bytes_per_sec / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::super::kmsg::OomKill;
    use super::super::writers::{OpenFile, Process, Residency};
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A v1 cgroup limited to 572 MiB charged with `anon` and `file` MiB, `dw` MiB of the file dirty.
    fn snapshot(anon: u64, file: u64, dw: u64) -> Snapshot {
        Snapshot {
            time_unix: 1000.0,
            cgroup: "/sys/fs/cgroup/memory/pod".into(),
            cgroup_version: "v1",
            limit_bytes: Some(572 * MIB),
            usage_bytes: Some((anon + file) * MIB),
            working_set_bytes: Some((anon + file - file / 10) * MIB),
            anon_bytes: Some(anon * MIB),
            file_bytes: Some(file * MIB),
            inactive_file_bytes: Some(file / 10 * MIB),
            dirty_bytes: Some(dw * MIB * 3 / 5),
            writeback_bytes: Some(dw * MIB - dw * MIB * 3 / 5),
            limit_hits: Some(0),
            oom_kills: Some(0),
            ..Snapshot::default()
        }
    }

    fn writer(command: &str, path: &str, dw: u64) -> OpenFile {
        OpenFile {
            pid: 4242,
            command: command.into(),
            fd: 9,
            path: path.into(),
            kind: "block device",
            writing: true,
            size_bytes: Some(10 << 30),
            cached_bytes: Some(dw * MIB),
            dirty_bytes: Some(dw * MIB / 2),
            writeback_bytes: Some(dw * MIB / 2),
            residency: Residency::Cachestat,
        }
    }

    #[test]
    fn the_cdi_pathology_is_page_cache_pressure_naming_writer_and_device() {
        let mut s = snapshot(14, 556, 498);
        s.writers = vec![writer("qemu-img", "/dev/vda", 490), writer("sh", "/tmp/log", 1)];
        s.node.dirty_threshold_bytes = Some(4 << 30);
        let v = judge(&s, None);
        assert_eq!(v.verdict, Kind::PageCachePressure, "{v:?}");
        assert!(v.reason.contains("556 MiB of the 570 MiB charged (limit 572 MiB) is file cache"), "{}", v.reason);
        assert!(v.reason.contains("498 MiB of it dirty or under writeback"), "{}", v.reason);
        assert!(
            v.reason.contains("written by qemu-img (pid 4242) to /dev/vda (490 MiB dirty or under writeback there)"),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("anonymous memory 14 MiB — not a leak"), "{}", v.reason);
        assert!(v.reason.contains("kubectl top shows"), "{}", v.reason);
        assert!(v.advice[0].contains("boundimport"));
        assert!(v.advice.iter().any(|a| a.contains("-t none")));
        assert!(v.advice.iter().any(|a| a.contains("4096 MiB be dirty")), "{:?}", v.advice);
    }

    #[test]
    fn dirty_cache_heading_for_the_limit_is_pressure_before_it_gets_there() {
        let v = judge(&snapshot(10, 320, 300), None);
        assert_eq!(v.verdict, Kind::PageCachePressure);
        assert!(v.reason.contains("heading there"));
        assert!(v.reason.contains("no process is left"), "{}", v.reason);
    }

    #[test]
    fn anonymous_memory_near_the_limit() {
        let mut s = snapshot(540, 20, 0);
        s.processes =
            vec![Process { pid: 7, command: "java".into(), rss_bytes: Some(538 * MIB), anon_bytes: Some(536 * MIB) }];
        let v = judge(&s, None);
        assert_eq!(v.verdict, Kind::AnonymousPressure);
        assert!(v.reason.contains("anonymous memory is 540 MiB of the 560 MiB charged"), "{}", v.reason);
        assert!(v.reason.contains("java (pid 7"), "{}", v.reason);
    }

    #[test]
    fn anonymous_growth_under_watch_is_reported_with_its_rate() {
        let first = snapshot(200, 20, 0);
        let mut now = snapshot(320, 20, 0);
        now.time_unix = first.time_unix + 60.0;
        let trend = Trend::between(&first, &now);
        assert_eq!(trend.anon_bytes_per_sec, Some(2.0 * MIB as f64));
        let v = judge(&now, Some(&trend));
        assert_eq!(v.verdict, Kind::AnonymousPressure, "{v:?}");
        assert!(v.reason.contains("growing 2.0 MiB/s over 60 s"), "{}", v.reason);
        assert_eq!(judge(&now, None).verdict, Kind::Healthy, "one sample cannot see growth");
    }

    #[test]
    fn oom_kills_win_and_say_what_fills_the_cgroup() {
        let mut s = snapshot(30, 520, 450);
        s.oom_kills = Some(2);
        let v = judge(&s, None);
        assert_eq!(v.verdict, Kind::OomKilled);
        assert!(
            v.reason.starts_with("2 processes OOM-killed in this cgroup (memory.oom_control oom_kill 2)"),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("page cache filled it"), "{}", v.reason);
        assert!(v.advice.iter().any(|a| a.contains("boundimport")));

        let mut s = snapshot(30, 2, 0);
        s.cgroup_version = "v2";
        s.oom_kills = Some(0);
        s.kernel_oom_kills = Some(vec![OomKill {
            seconds: 5123.46,
            pid: Some(4242),
            task: "perl".into(),
            oom_memcg: "/pod".into(),
            task_memcg: "/pod".into(),
            killed: None,
            below: None,
        }]);
        let v = judge(&s, None);
        assert_eq!(v.verdict, Kind::OomKilled);
        assert!(
            v.reason.starts_with("1 process OOM-killed in this cgroup (kernel log; memory.events oom_kill counts 0)"),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("killed perl (pid 4242) at 5123.5 s"), "{}", v.reason);
        assert!(v.advice.iter().any(|a| a.contains("larger limit")));
    }

    /// A kill in a child cgroup (since removed), found only in the kernel log: the verdict names the child and says
    /// this cgroup's counter has none, so the counts and the verdict tell one story.
    #[test]
    fn a_kill_in_a_child_cgroup_is_named_as_the_childs() {
        let mut s = snapshot(30, 2, 0);
        s.oom_kills = Some(0);
        s.kernel_oom_kills = Some(vec![OomKill {
            seconds: 77.0,
            pid: Some(99),
            task: "perl".into(),
            oom_memcg: "/pod/test-child".into(),
            task_memcg: "/pod/test-child".into(),
            killed: None,
            below: Some("/pod/test-child".into()),
        }]);
        let v = judge(&s, None);
        assert_eq!(v.verdict, Kind::OomKilled);
        assert!(
            v.reason.starts_with(
                "1 process OOM-killed below this cgroup, in /pod/test-child (kernel log; this cgroup's \
                 memory.oom_control oom_kill counts 0: not its own kill); the kernel killed perl (pid 99) in \
                 /pod/test-child at 77.0 s"
            ),
            "{}",
            v.reason
        );
    }

    #[test]
    fn clean_cache_near_the_limit_is_not_a_problem() {
        let v = judge(&snapshot(20, 520, 3), None);
        assert_eq!(v.verdict, Kind::CleanCache, "{v:?}");
        assert!(v.reason.contains("only 3 MiB of it dirty or under writeback"), "{}", v.reason);
        let mut s = snapshot(20, 520, 3);
        let mut source = writer("qemu-img", "/data/image.qcow2", 400);
        source.writing = false;
        s.readers = vec![source];
        let v = judge(&s, None);
        assert!(
            v.reason.contains("/data/image.qcow2 read by qemu-img (pid 4242) holds 400 MiB of page cache"),
            "{}",
            v.reason
        );
        s.readers[0].cached_bytes = Some(4000 * MIB);
        assert!(!judge(&s, None).reason.contains("image.qcow2"), "cache charged elsewhere is not named");
        // A limit hit during a watch counts as near even below 90%.
        let first = snapshot(20, 300, 3);
        let mut now = first.clone();
        now.time_unix += 5.0;
        now.limit_hits = Some(10);
        assert_eq!(judge(&now, Some(&Trend::between(&first, &now))).verdict, Kind::CleanCache);
    }

    #[test]
    fn idle_and_bounded_are_healthy() {
        assert_eq!(judge(&snapshot(2, 1, 0), None).verdict, Kind::Healthy);
        // boundimport importing: ~30 MiB charged, a few MiB in flight.
        let v = judge(&snapshot(18, 12, 8), None);
        assert_eq!(v.verdict, Kind::Healthy);
        assert!(v.advice.is_empty());
        let mut unlimited = snapshot(2, 500, 400);
        unlimited.limit_bytes = None;
        unlimited.unlimited = true;
        assert!(judge(&unlimited, None).reason.contains("no limit"));
    }

    #[test]
    fn unreadable_counters_are_unknown_not_healthy() {
        let mut s = snapshot(2, 1, 0);
        s.anon_bytes = None;
        s.unreadable = vec![super::super::snapshot::Unreadable {
            path: "/sys/fs/cgroup/memory/pod/memory.stat".into(),
            error: "Permission denied".into(),
        }];
        let v = judge(&s, None);
        assert_eq!(v.verdict, Kind::Unknown);
        assert!(v.reason.contains("/sys/fs/cgroup/memory/pod/memory.stat"));
    }
}
