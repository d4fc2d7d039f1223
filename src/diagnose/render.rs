//! Rendering: the full report for people, one vmstat-like line per `--watch` sample, the watch summary, and one
//! JSON object per sample.

use super::snapshot::Snapshot;
use super::verdict::{mib, Trend, Verdict};
use super::writers::{OpenFile, Residency};
use serde::Serialize;
use std::fmt::Write;

/// One JSON sample: the verdict, every reading, and the trend under `--watch`.
#[derive(Serialize)]
pub struct JsonSample<'a> {
    #[serde(flatten)]
    verdict: &'a Verdict,
    #[serde(flatten)]
    snapshot: &'a Snapshot,
    trend: Option<&'a Trend>,
}

/// The JSON line of a sample.
pub fn json(snapshot: &Snapshot, verdict: &Verdict, trend: Option<&Trend>) -> String {
    serde_json::to_string(&JsonSample { verdict, snapshot, trend }).expect("a sample serialises")
}

fn opt(value: Option<u64>) -> String {
    value.map_or_else(|| "unreadable".to_string(), mib)
}

/// The full report of one snapshot.
pub fn report(s: &Snapshot, v: &Verdict) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "cgroup        {} ({})", s.cgroup.display(), s.cgroup_version);
    let limit = match (s.limit_bytes, s.unlimited) {
        (Some(l), _) => format!("{} ({l} bytes)", mib(l)),
        (None, true) => "none".to_string(),
        (None, false) => "unreadable".to_string(),
    };
    let high = s.high_bytes.map_or(String::new(), |h| format!(", memory.high {}", mib(h)));
    let _ = writeln!(w, "limit         {limit}{high}");
    let share = match (s.usage_bytes, s.limit_bytes) {
        (Some(u), Some(l)) if l > 0 => format!(", {:.1}% of the limit", 100.0 * u as f64 / l as f64),
        _ => String::new(),
    };
    let peak = s.peak_bytes.map_or(String::new(), |p| format!(" (peak {})", mib(p)));
    let _ = writeln!(w, "usage         {}{share}{peak}", opt(s.usage_bytes));
    let _ = writeln!(w, "kubectl top   {}  (working set = usage − inactive_file)", opt(s.working_set_bytes));
    let _ = writeln!(w, "anonymous     {}", opt(s.anon_bytes));
    let _ = writeln!(
        w,
        "file cache    {}: active {}, inactive {}, shmem {}",
        opt(s.file_bytes),
        opt(s.active_file_bytes),
        opt(s.inactive_file_bytes),
        opt(s.shmem_bytes)
    );
    let _ = writeln!(w, "dirty         {}, writeback {}", opt(s.dirty_bytes), opt(s.writeback_bytes));
    let (hits_src, oom_src) = match s.cgroup_version {
        "v1" => ("memory.failcnt + memory.memsw.failcnt", "memory.oom_control oom_kill, with the cgroups below"),
        _ => ("memory.events max", "memory.events oom_kill"),
    };
    let high_events = s.high_events.map_or(String::new(), |h| format!(", {h} over memory.high"));
    let count = |v: Option<u64>| v.map_or_else(|| "unreadable".to_string(), |n| n.to_string());
    let _ = writeln!(w, "limit hits    {}{high_events}  ({hits_src})", count(s.limit_hits));
    let invoked = s.oom_events.map_or(String::new(), |n| format!(", OOM killer invoked {n} times"));
    let frozen = if s.under_oom == Some(true) { ", UNDER OOM NOW: tasks stopped (oom_kill_disable)" } else { "" };
    // Kills the kernel logged that the counter does not hold (a removed child's), so this line and the verdict agree.
    let logged = s.kernel_oom_kills.as_deref().unwrap_or_default();
    let beyond = match logged.iter().filter(|k| k.below.is_some()).count() {
        0 => String::new(),
        n => format!(", kernel log: {n} below this cgroup"),
    };
    let _ = writeln!(w, "OOM kills     {}{invoked}{frozen}{beyond}  ({oom_src})", count(s.oom_kills));
    let pressure = match s.pressure {
        Some(p) if p.scope == "cgroup" => {
            format!("some {:.2}% full {:.2}% of the last 10 s (memory.pressure)", p.some_avg10, p.full_avg10)
        }
        Some(p) => format!(
            "node: some {:.2}% full {:.2}% of the last 10 s \
             (/proc/pressure/memory; this cgroup has no memory.pressure)",
            p.some_avg10, p.full_avg10
        ),
        None => "not available (no PSI on this kernel)".to_string(),
    };
    let _ = writeln!(w, "pressure      {pressure}");
    let n = &s.node;
    let ratio = |bytes: Option<u64>, ratio: Option<u64>, name: &str| match (bytes, ratio) {
        (Some(b), _) if b > 0 => format!("vm.{name}_bytes {b}"),
        (_, Some(r)) => format!("vm.{name}_ratio {r}"),
        _ => format!("vm.{name}_* unreadable"),
    };
    let _ = writeln!(
        w,
        "node          MemAvailable {} of {}; Dirty {}, Writeback {}; writers throttled above {}, \
         flushers start above {} ({}, {}; expire {} cs)",
        opt(n.mem_available_bytes),
        opt(n.mem_total_bytes),
        opt(n.dirty_bytes),
        opt(n.writeback_bytes),
        opt(n.dirty_threshold_bytes),
        opt(n.background_threshold_bytes),
        ratio(n.vm_dirty_bytes, n.dirty_ratio, "dirty"),
        ratio(n.vm_dirty_background_bytes, n.dirty_background_ratio, "dirty_background"),
        n.dirty_expire_centisecs.map_or_else(|| "?".to_string(), |c| c.to_string()),
    );
    if s.processes.is_empty() {
        let _ = writeln!(w, "processes     none");
    } else {
        let _ = writeln!(w, "processes     {:>8} {:>10} {:>10}  COMMAND", "PID", "RSS", "ANON");
        for p in &s.processes {
            let _ = writeln!(
                w,
                "              {:>8} {:>10} {:>10}  {}",
                p.pid,
                opt(p.rss_bytes),
                opt(p.anon_bytes),
                p.command
            );
        }
    }
    files(w, "writing", &s.writers);
    files(w, "reading", &s.readers);
    match &s.kernel_oom_kills {
        None => {
            let _ = writeln!(w, "kernel log    not read (see unreadable)");
        }
        Some(kills) if kills.is_empty() => {
            let _ = writeln!(w, "kernel log    no OOM kill of this cgroup or below it in /dev/kmsg");
        }
        Some(kills) => {
            for k in kills {
                let line = k.killed.clone().unwrap_or_else(|| format!("oom-kill: task={} pid={:?}", k.task, k.pid));
                let whose = k.below.as_ref().map_or(String::new(), |child| format!(" (in {child}, below this cgroup)"));
                let _ = writeln!(w, "kernel log    [{:.3}] {line}{whose}", k.seconds);
            }
        }
    }
    for u in &s.unreadable {
        let _ = writeln!(w, "unreadable    {}: {}", u.path.display(), u.error);
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "verdict       {}", v.verdict.name());
    let _ = writeln!(w, "reason        {}", v.reason);
    for (i, a) in v.advice.iter().enumerate() {
        let _ = writeln!(w, "{}- {a}", if i == 0 { "do            " } else { "              " });
    }
    out
}

fn files(w: &mut String, label: &str, files: &[OpenFile]) {
    if files.is_empty() {
        let _ = writeln!(w, "{label:<13} none");
        return;
    }
    let _ = writeln!(
        w,
        "{label:<13} {:>8} {:<12} {:>10} {:>10} {:>10}  PATH",
        "PID", "COMMAND", "CACHED", "DIRTY", "WRITEBACK"
    );
    for f in files {
        let how = match f.residency {
            Residency::Cachestat => "",
            Residency::Mincore => "  (mincore: dirty unknown)",
            Residency::Unknown => "  (page cache unknown)",
        };
        let unknown = |v: Option<u64>| v.map_or_else(|| "unknown".to_string(), mib);
        let _ = writeln!(
            w,
            "              {:>8} {:<12} {:>10} {:>10} {:>10}  {}{how}",
            f.pid,
            f.command,
            unknown(f.cached_bytes),
            unknown(f.dirty_bytes),
            unknown(f.writeback_bytes),
            f.path
        );
    }
}

/// The header of the `--watch` lines.
pub fn watch_header() -> String {
    format!(
        "{:<8} {:>8} {:>8} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>4} {:>6}  VERDICT",
        "TIME", "USAGE", "LIMIT", "%LIM", "KTOP", "ANON", "FILE", "DIRTY", "WBACK", "+HITS", "OOM", "PSI10"
    )
}

/// One `--watch` line; `hits` is the number of limit hits since the previous sample.
pub fn watch_line(s: &Snapshot, v: &Verdict, hits: Option<u64>) -> String {
    let m = |b: Option<u64>| b.map_or_else(|| "?".to_string(), |b| format!("{}M", (b + (1 << 19)) >> 20));
    let share = match (s.usage_bytes, s.limit_bytes) {
        (Some(u), Some(l)) if l > 0 => format!("{:.1}", 100.0 * u as f64 / l as f64),
        _ => "-".to_string(),
    };
    format!(
        "{:<8} {:>8} {:>8} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>4} {:>6}  {}",
        clock(s.time_unix),
        m(s.usage_bytes),
        if s.unlimited { "none".to_string() } else { m(s.limit_bytes) },
        share,
        m(s.working_set_bytes),
        m(s.anon_bytes),
        m(s.file_bytes),
        m(s.dirty_bytes),
        m(s.writeback_bytes),
        hits.map_or_else(|| "?".to_string(), |h| h.to_string()),
        s.oom_kills.map_or_else(|| "?".to_string(), |n| n.to_string()),
        s.pressure.map_or_else(|| "-".to_string(), |p| format!("{:.2}", p.some_avg10)),
        v.verdict.name()
    )
}

/// `HH:MM:SS` (UTC) of a Unix time.
fn clock(unix: f64) -> String {
    let secs = unix as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// What a watch saw, summed up at its end.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Samples taken.
    pub samples: u64,
    /// Seconds from the first to the last.
    pub seconds: f64,
    /// Highest usage.
    pub peak_usage_bytes: u64,
    /// Highest working set.
    pub peak_working_set_bytes: u64,
    /// Highest dirty + writeback.
    pub peak_dirty_writeback_bytes: u64,
    /// Seconds with usage ≥ 90% of the limit (each sample counts for the interval before it).
    pub seconds_near_limit: f64,
    /// Limit hits during the watch.
    pub limit_hits: u64,
    /// OOM kills during the watch.
    pub oom_kills: u64,
    /// Samples per verdict, in order of first appearance.
    pub verdicts: Vec<(String, u64)>,
    /// The last verdict's reason.
    pub last_reason: String,
}

impl Summary {
    /// Adds a sample taken `interval` seconds after the previous one.
    pub fn add(&mut self, first: &Snapshot, s: &Snapshot, v: &Verdict, interval: f64) {
        self.samples += 1;
        self.seconds = s.time_unix - first.time_unix;
        self.peak_usage_bytes = self.peak_usage_bytes.max(s.usage_bytes.unwrap_or(0));
        self.peak_working_set_bytes = self.peak_working_set_bytes.max(s.working_set_bytes.unwrap_or(0));
        self.peak_dirty_writeback_bytes = self.peak_dirty_writeback_bytes.max(s.dirty_writeback().unwrap_or(0));
        if let (Some(u), Some(l)) = (s.usage_bytes, s.limit_bytes) {
            if u as f64 >= 0.9 * l as f64 {
                self.seconds_near_limit += interval;
            }
        }
        self.limit_hits = s.limit_hits.unwrap_or(0).saturating_sub(first.limit_hits.unwrap_or(0));
        self.oom_kills = s.oom_kills.unwrap_or(0).saturating_sub(first.oom_kills.unwrap_or(0));
        let name = v.verdict.name().to_string();
        match self.verdicts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => self.verdicts.push((name, 1)),
        }
        self.last_reason = v.reason.clone();
    }

    /// The summary for people.
    pub fn render(&self) -> String {
        let verdicts: Vec<String> = self.verdicts.iter().map(|(n, c)| format!("{n} ×{c}")).collect();
        format!(
            "summary: {} samples over {:.1} s; peak usage {}, peak kubectl top {}, peak dirty + writeback {}; \
             {:.1} s at ≥ 90% of the limit; {} limit hits, {} OOM kills during the watch; verdicts: {}",
            self.samples,
            self.seconds,
            mib(self.peak_usage_bytes),
            mib(self.peak_working_set_bytes),
            mib(self.peak_dirty_writeback_bytes),
            self.seconds_near_limit,
            self.limit_hits,
            self.oom_kills,
            verdicts.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::verdict::judge;

    fn sample(t: f64, usage_mib: u64, hits: u64) -> Snapshot {
        Snapshot {
            time_unix: t,
            cgroup: "/cg".into(),
            cgroup_version: "v1",
            limit_bytes: Some(100 << 20),
            usage_bytes: Some(usage_mib << 20),
            working_set_bytes: Some(usage_mib << 20),
            anon_bytes: Some(1 << 20),
            file_bytes: Some((usage_mib - 1) << 20),
            dirty_bytes: Some((usage_mib - 1) << 20),
            writeback_bytes: Some(0),
            limit_hits: Some(hits),
            oom_kills: Some(0),
            ..Snapshot::default()
        }
    }

    #[test]
    fn json_has_the_fields_the_issue_lists() {
        let s = sample(1000.0, 95, 3);
        let v = judge(&s, None);
        let value: serde_json::Value = serde_json::from_str(&json(&s, &v, None)).unwrap();
        for key in [
            "verdict",
            "reason",
            "limit_bytes",
            "usage_bytes",
            "working_set_bytes",
            "anon_bytes",
            "file_bytes",
            "dirty_bytes",
            "writeback_bytes",
            "limit_hits",
            "oom_kills",
            "writers",
            "cgroup",
            "cgroup_version",
        ] {
            assert!(value.get(key).is_some(), "missing {key}: {value}");
        }
        assert_eq!(value["verdict"], "page-cache-pressure");
        assert_eq!(value["cgroup_version"], "v1");
    }

    #[test]
    fn watch_summary_counts_peaks_and_time_near_the_limit() {
        let samples = [sample(1000.0, 50, 0), sample(1001.0, 95, 10), sample(1002.0, 96, 25), sample(1003.0, 40, 25)];
        let mut summary = Summary::default();
        for (i, s) in samples.iter().enumerate() {
            let v = judge(s, None);
            assert!(!watch_line(s, &v, Some(0)).is_empty());
            summary.add(&samples[0], s, &v, if i == 0 { 0.0 } else { 1.0 });
        }
        assert_eq!((summary.samples, summary.seconds, summary.seconds_near_limit), (4, 3.0, 2.0));
        assert_eq!((summary.peak_usage_bytes, summary.limit_hits), (96 << 20, 25));
        assert!(summary.render().contains("2.0 s at ≥ 90% of the limit"), "{}", summary.render());
        assert_eq!(clock(86_400.0 * 3.0 + 3600.0 * 9.0 + 61.0), "09:01:01");
    }
}
