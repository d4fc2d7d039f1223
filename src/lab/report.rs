//! What a lab session concludes: per-importer figures and verdicts (`report.json`), the raw timeline
//! (`timeline.csv`), the co-tenant's allocation latencies (`stalls.csv`) and a short table for the terminal.

use super::cotenant::Stall;
use super::sampler::Sample;
use crate::error::{IoContext, Result};
use crate::size::human;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::Instant;

/// Share of the limit at or above which the cgroup counts as pinned.
pub const PINNED_SHARE: f64 = 0.95;

/// Explanation attached to a PINNED run: this kernel stalls where others kill.
pub const PINNED_NOTE: &str = "The cgroup sat at its limit but nothing was killed: on cgroup v1 current kernels make \
memcg reclaim wait for the pages under writeback, and on v2 with cgroup writeback the writer is throttled at the \
cgroup's dirty limit, so the importer and its co-tenants stall instead. The same import is OOM-killed where neither \
holds: cgroup v2 with destinations on filesystems without cgroup writeback (NFS, FUSE: the common CDI setting with NFS \
or Longhorn RWX volumes) when the storage stalls, and there even on storage that keeps up on kernels before 6.13 with \
the multi-gen LRU (MGLRU reclaim does not wake the flushers; fixed by \"mm/vmscan: wake up flushers conditionally to \
avoid cgroup OOM\"), and older kernels. PINNED here means OOMKILLED there.";

/// How an importer fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Verdict {
    /// Killed: SIGKILL exit or an OOM kill in the cgroup.
    #[serde(rename = "OOMKILLED")]
    OomKilled,
    /// Completed, but the cgroup reached at least 95% of its limit.
    #[serde(rename = "PINNED")]
    Pinned,
    /// Completed below 95% of the limit.
    #[serde(rename = "BOUNDED")]
    Bounded,
    /// Exited with an error without being killed: no memory verdict (see the importer's log).
    #[serde(rename = "FAILED")]
    Failed,
}

impl Verdict {
    /// The verdict as written in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::OomKilled => "OOMKILLED",
            Verdict::Pinned => "PINNED",
            Verdict::Bounded => "BOUNDED",
            Verdict::Failed => "FAILED",
        }
    }
}

/// The machine and the conditions of the session.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Host {
    /// `uname -r`.
    pub kernel: String,
    /// 1 or 2.
    pub cgroup_version: u8,
    /// The memory limit of the cgroup the importers ran in.
    pub limit_bytes: u64,
    /// Write bandwidth of the destination, `null` when unthrottled.
    pub write_bps: Option<u64>,
    /// For a session in a guest (`lab --vm`): its conditions; `kernel` and `cgroup_version` are then the guest's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestConditions>,
}

/// The conditions of a guest session beyond the host's fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestConditions {
    /// The Debian package the guest kernel came from.
    pub kernel_package: String,
    /// Whether the importer's dirty pages were attributed to its cgroup (io controller on the v2 hierarchy): cgroup
    /// writeback, per-cgroup dirty limits.
    pub cgroup_writeback: bool,
    /// Destination stalls: seconds of progress, then seconds suspended (`15:25`), `null` for none.
    pub stall: Option<(u32, u32)>,
    /// Guest RAM.
    pub guest_mem_bytes: u64,
    /// The co-tenant's standing charge (a tmpfs file written from inside the cgroup).
    pub cotenant_charge_bytes: u64,
    /// The multi-gen LRU as the importers ran, read back from the guest; `null` on a kernel without it.
    pub mglru: Option<bool>,
    /// Whether the lab switched the multi-gen LRU (`--mglru`) or left the kernel's own setting.
    pub mglru_set: bool,
    /// The guest's `vm.dirty_ratio` as the importers ran (`--dirty-ratio`, or the kernel's 20).
    pub dirty_ratio: Option<u32>,
}

impl GuestConditions {
    /// `on (--mglru)`, `off (the kernel's own setting)`, `absent`.
    pub fn mglru_text(&self) -> String {
        match self.mglru {
            None => "absent".to_string(),
            Some(on) => format!(
                "{} ({})",
                if on { "on" } else { "off" },
                if self.mglru_set { "--mglru" } else { "the kernel's own setting" }
            ),
        }
    }
}

impl Host {
    /// One line naming the conditions, printed above the table.
    pub fn header(&self) -> String {
        let bw = self.write_bps.map_or_else(|| "unthrottled".to_string(), |b| format!("{}/s", human(b)));
        let base = format!(
            "kernel {}, cgroup v{}, limit {}, writes {bw}",
            self.kernel,
            self.cgroup_version,
            human(self.limit_bytes)
        );
        match &self.guest {
            None => format!("host: {base}"),
            Some(g) => format!(
                "guest ({}, {} RAM): {base}, cgroup writeback {}, multi-gen LRU {}, stalls {}, co-tenant charge {}, \
                 vm.dirty_ratio {}",
                g.kernel_package,
                human(g.guest_mem_bytes),
                if g.cgroup_writeback { "on" } else { "off" },
                g.mglru_text(),
                g.stall.map_or_else(|| "none".to_string(), |(run, stop)| format!("{stop} s after every {run} s")),
                human(g.cotenant_charge_bytes),
                g.dirty_ratio.map_or_else(|| "?".to_string(), |r| r.to_string()),
            ),
        }
    }
}

/// One importer's run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    /// "qemu-img" or "boundimport".
    pub importer: String,
    /// How it fared.
    pub verdict: Verdict,
    /// Exit code, or 128 + signal number when killed by a signal (137 = SIGKILL, as Kubernetes reports it).
    pub exit_status: i32,
    /// From start to exit.
    pub wall_seconds: f64,
    /// Virtual size over wall time; `null` unless the import completed.
    pub throughput_bytes_per_sec: Option<f64>,
    /// Highest charge of the importer's cgroup.
    pub peak_bytes: u64,
    /// Highest working set (usage − inactive_file) of the importer's cgroup: what `kubectl top` shows.
    pub kubectl_top_peak_bytes: u64,
    /// Highest sampled dirty + writeback page cache of the importer's cgroup: what reclaim cannot free without the
    /// device.
    pub dirty_writeback_peak_bytes: u64,
    /// Time the limited cgroup spent at or above 95% of its limit.
    pub pinned_seconds: f64,
    /// Times the limit was hit during the run.
    pub limit_hits: u64,
    /// OOM kills in the cgroup during the run.
    pub oom_kills: u64,
    /// Median co-tenant allocation latency during the run, `null` without a co-tenant.
    pub stall_p50_ms: Option<f64>,
    /// 99th percentile of the co-tenant allocation latency.
    pub stall_p99_ms: Option<f64>,
    /// Worst co-tenant allocation latency.
    pub stall_max_ms: Option<f64>,
    /// What the verdict means on other kernels (set for PINNED runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The whole session: `report.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Machine and conditions.
    pub host: Host,
    /// One entry per importer, in the order they ran.
    pub runs: Vec<Run>,
}

/// A co-tenant round on a run's timeline.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StallAt {
    /// When the round ended, in seconds since the importer started (negative: before it started).
    pub t: f64,
    /// How long the round took, in milliseconds.
    pub latency_ms: f64,
}

impl StallAt {
    /// `stall` on the timeline of an importer started at `started`.
    pub fn on_timeline(stall: &Stall, started: Instant) -> StallAt {
        let t = match stall.at.checked_duration_since(started) {
            Some(after) => after.as_secs_f64(),
            None => -started.duration_since(stall.at).as_secs_f64(),
        };
        StallAt { t, latency_ms: stall.latency.as_secs_f64() * 1000.0 }
    }
}

/// Everything measured about one importer run, before it is summarised. Times are relative to the importer's
/// start, so a run measured in a guest comes back whole (`lab::vm::guest`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Measured {
    /// Importer name.
    pub importer: String,
    /// Exit code or 128 + signal.
    pub exit_status: i32,
    /// Whether the importer died of SIGKILL.
    pub sigkilled: bool,
    /// Seconds from start to exit.
    pub wall_seconds: f64,
    /// Bytes the import covers (virtual size).
    pub bytes: u64,
    /// The cgroup limit.
    pub limit: u64,
    /// The importer cgroup's kernel-recorded peak, if the kernel keeps one.
    pub importer_peak: Option<u64>,
    /// The limited cgroup's kernel-recorded peak, if the kernel keeps one.
    pub pod_peak: Option<u64>,
    /// Limit hits of the limited cgroup before the importer started.
    pub limit_hits_before: u64,
    /// OOM kills in the limited cgroup (all its members) during the run.
    pub oom_kills: u64,
    /// The sampled timeline.
    pub samples: Vec<Sample>,
    /// Co-tenant rounds reported while the co-tenant ran (some end before the importer started).
    pub stalls: Vec<StallAt>,
}

impl Measured {
    /// Co-tenant latencies in milliseconds, sorted, of rounds that ended while the importer ran.
    fn stall_ms(&self) -> Vec<f64> {
        let end = self.wall_seconds;
        let mut ms: Vec<f64> =
            self.stalls.iter().filter(|s| (0.0..=end).contains(&s.t)).map(|s| s.latency_ms).collect();
        ms.sort_by(f64::total_cmp);
        ms
    }

    /// Applies the verdict rules and computes the figures of the report.
    pub fn summarize(&self) -> Run {
        let threshold = (self.limit as f64 * PINNED_SHARE) as u64;
        let sampled_pod_peak = self.samples.iter().map(|s| s.pod.usage).max().unwrap_or(0);
        let pod_peak = self.pod_peak.unwrap_or(0).max(sampled_pod_peak);
        let sampled_peak = self.samples.iter().map(|s| s.importer.usage).max().unwrap_or(0);
        let kubectl_top_peak = self.samples.iter().map(|s| s.importer.working_set()).max().unwrap_or(0);
        let pinned_seconds =
            self.samples.windows(2).filter(|w| w[1].pod.usage >= threshold).fold(0.0, |sum, w| sum + (w[1].t - w[0].t));
        let limit_hits =
            self.samples.last().map_or(0, |s| s.pod_events.limit_hits).saturating_sub(self.limit_hits_before);
        let verdict = if self.sigkilled || self.oom_kills > 0 {
            Verdict::OomKilled
        } else if self.exit_status != 0 {
            Verdict::Failed
        } else if pod_peak >= threshold {
            Verdict::Pinned
        } else {
            Verdict::Bounded
        };
        let completed = self.exit_status == 0;
        let stalls = self.stall_ms();
        Run {
            importer: self.importer.clone(),
            verdict,
            exit_status: self.exit_status,
            wall_seconds: round(self.wall_seconds, 3),
            throughput_bytes_per_sec: (completed && self.wall_seconds > 0.0)
                .then(|| (self.bytes as f64 / self.wall_seconds).round()),
            peak_bytes: self.importer_peak.unwrap_or(0).max(sampled_peak),
            kubectl_top_peak_bytes: kubectl_top_peak,
            dirty_writeback_peak_bytes: self.samples.iter().map(|s| s.importer.dirty_writeback()).max().unwrap_or(0),
            pinned_seconds: round(pinned_seconds, 1),
            limit_hits,
            oom_kills: self.oom_kills,
            stall_p50_ms: percentile(&stalls, 50.0).map(|v| round(v, 1)),
            stall_p99_ms: percentile(&stalls, 99.0).map(|v| round(v, 1)),
            stall_max_ms: stalls.last().map(|&v| round(v, 1)),
            note: (verdict == Verdict::Pinned).then(|| PINNED_NOTE.to_string()),
        }
    }
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Nearest-rank percentile of sorted values, `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Report {
    /// Writes `report.json` into `dir`.
    pub fn write_json(&self, dir: &Path) -> Result<()> {
        let path = dir.join("report.json");
        let mut text = serde_json::to_string_pretty(self).map_err(|e| {
            crate::error::Error::new(crate::error::ErrorKind::Io, "serialising the report").with_source(e)
        })?;
        text.push('\n');
        fs::write(&path, text).io_context("writing report").map_err(|e| e.at_path(&path))
    }

    /// A short table for the terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if self.host.guest.is_some() {
            let _ = writeln!(out, "{}", self.host.header());
        }
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:>8} {:>9} {:>10} {:>11} {:>8} {:>10} {:>24}",
            "importer",
            "verdict",
            "wall s",
            "MB/s",
            "peak",
            "kubectl-top",
            "pinned s",
            "limit hits",
            "stall p50/p99/max ms"
        );
        for run in &self.runs {
            let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
            let _ = writeln!(
                out,
                "{:<12} {:<10} {:>8.1} {:>9} {:>10} {:>11} {:>8.1} {:>10} {:>24}",
                run.importer,
                run.verdict.as_str(),
                run.wall_seconds,
                run.throughput_bytes_per_sec.map_or_else(|| "-".to_string(), |b| format!("{:.1}", b / 1e6)),
                human(run.peak_bytes),
                human(run.kubectl_top_peak_bytes),
                run.pinned_seconds,
                run.limit_hits,
                format!("{}/{}/{}", ms(run.stall_p50_ms), ms(run.stall_p99_ms), ms(run.stall_max_ms)),
            );
        }
        // What a verdict means elsewhere, once, under the table: the terminal is where it is read.
        let mut notes: Vec<&str> = self.runs.iter().filter_map(|run| run.note.as_deref()).collect();
        notes.dedup();
        for note in notes {
            let _ = writeln!(out, "\n{}", wrap(note, 110));
        }
        out
    }
}

/// `text` broken into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in text.split_whitespace() {
        if line > 0 && line + 1 + word.len() > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out
}

/// Header of `timeline.csv`.
pub const TIMELINE_HEADER: &str = "importer,t_s,usage_bytes,file_bytes,anon_bytes,dirty_bytes,writeback_bytes,\
inactive_file_bytes,kubectl_top_bytes,cgroup_usage_bytes,limit_hits";

/// Writes every importer's samples to `dir/timeline.csv`: the importer cgroup's counters, what `kubectl top`
/// would show, and the limited cgroup's usage (importer plus co-tenant) and limit hits.
pub fn write_timeline(dir: &Path, runs: &[(&str, &[Sample])]) -> Result<()> {
    let mut text = String::from(TIMELINE_HEADER);
    text.push('\n');
    for (importer, samples) in runs {
        for s in *samples {
            let m = &s.importer;
            let _ = writeln!(
                text,
                "{importer},{:.3},{},{},{},{},{},{},{},{},{}",
                s.t,
                m.usage,
                m.file,
                m.anon,
                m.dirty,
                m.writeback,
                m.inactive_file,
                m.working_set(),
                s.pod.usage,
                s.pod_events.limit_hits
            );
        }
    }
    let path = dir.join("timeline.csv");
    fs::write(&path, text).io_context("writing timeline").map_err(|e| e.at_path(&path))
}

/// Writes every co-tenant round to `dir/stalls.csv` (seconds since the importer started, 0 for rounds before it;
/// latency in ms).
pub fn write_stalls(dir: &Path, runs: &[(&str, &[StallAt])]) -> Result<()> {
    let mut text = String::from("importer,t_s,latency_ms\n");
    for (importer, stalls) in runs {
        for s in *stalls {
            let _ = writeln!(text, "{importer},{:.3},{:.3}", s.t.max(0.0), s.latency_ms);
        }
    }
    let path = dir.join("stalls.csv");
    fs::write(&path, text).io_context("writing stalls").map_err(|e| e.at_path(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{MemEvents, MemStat};

    const LIMIT: u64 = 1000;

    fn sample(t: f64, importer: u64, pod: u64, hits: u64) -> Sample {
        Sample {
            t,
            importer: MemStat { usage: importer, inactive_file: importer / 2, ..MemStat::default() },
            pod: MemStat { usage: pod, ..MemStat::default() },
            pod_events: MemEvents { limit_hits: hits, oom_kills: 0 },
        }
    }

    fn measured(samples: Vec<Sample>) -> Measured {
        Measured {
            importer: "qemu-img".into(),
            exit_status: 0,
            sigkilled: false,
            wall_seconds: 4.0,
            bytes: 4_000_000,
            limit: LIMIT,
            importer_peak: None,
            pod_peak: None,
            limit_hits_before: 2,
            oom_kills: 0,
            samples,
            stalls: [5u64, 1, 3, 2, 4, 900]
                .iter()
                .enumerate()
                .map(|(i, &ms)| StallAt { t: (500 * i as u64 + 1) as f64 / 1000.0, latency_ms: ms as f64 })
                .collect(),
        }
    }

    #[test]
    fn pinned_when_the_cgroup_reaches_95_percent_and_seconds_are_counted() {
        let run = measured(vec![
            sample(0.0, 100, 150, 2),
            sample(1.0, 900, 960, 10),
            sample(2.0, 900, 990, 50),
            sample(3.0, 500, 600, 60),
        ])
        .summarize();
        assert_eq!(run.verdict, Verdict::Pinned);
        assert_eq!(run.pinned_seconds, 2.0);
        assert_eq!(run.limit_hits, 58);
        assert_eq!(run.peak_bytes, 900);
        assert_eq!(run.kubectl_top_peak_bytes, 450);
        assert_eq!(run.throughput_bytes_per_sec, Some(1_000_000.0));
        assert!(run.note.as_deref().unwrap().contains("MGLRU"));
        // The terminal shows the explanation under the table, in lines that fit it.
        let report = Report {
            host: Host { kernel: "6.18".into(), cgroup_version: 1, limit_bytes: LIMIT, write_bps: None, guest: None },
            runs: vec![run],
        };
        let table = report.table();
        assert!(table.contains("PINNED") && table.contains("PINNED here means OOMKILLED there."), "{table}");
        assert!(table.lines().all(|line| line.len() <= 160), "{table}");
    }

    #[test]
    fn bounded_below_95_percent_and_kernel_peak_counts() {
        let mut m = measured(vec![sample(0.0, 10, 50, 2), sample(1.0, 20, 60, 2)]);
        m.importer_peak = Some(30);
        let run = m.summarize();
        assert_eq!(run.verdict, Verdict::Bounded);
        assert_eq!(run.peak_bytes, 30);
        assert_eq!((run.pinned_seconds, run.limit_hits), (0.0, 0));
        assert_eq!(run.note, None);
        // A peak between samples still pins.
        m.pod_peak = Some(LIMIT);
        assert_eq!(m.summarize().verdict, Verdict::Pinned);
    }

    #[test]
    fn killed_beats_everything_and_failures_are_not_memory_verdicts() {
        let mut m = measured(vec![sample(0.0, 10, 990, 2)]);
        m.sigkilled = true;
        m.exit_status = 137;
        let run = m.summarize();
        assert_eq!(run.verdict, Verdict::OomKilled);
        assert_eq!(run.throughput_bytes_per_sec, None);
        m.sigkilled = false;
        m.oom_kills = 1;
        m.exit_status = 0;
        assert_eq!(m.summarize().verdict, Verdict::OomKilled);
        m.oom_kills = 0;
        m.exit_status = 1;
        assert_eq!(m.summarize().verdict, Verdict::Failed);
    }

    #[test]
    fn stalls_sit_on_the_importers_timeline_and_a_run_survives_json() {
        let started = Instant::now() + std::time::Duration::from_secs(10);
        let at = |offset_ms: i64| {
            let d = std::time::Duration::from_millis(offset_ms.unsigned_abs());
            let at = if offset_ms < 0 { started - d } else { started + d };
            Stall { at, latency: std::time::Duration::from_micros(2500) }
        };
        assert_eq!(StallAt::on_timeline(&at(1500), started), StallAt { t: 1.5, latency_ms: 2.5 });
        assert_eq!(StallAt::on_timeline(&at(-250), started), StallAt { t: -0.25, latency_ms: 2.5 });

        // What a guest writes and the host reads back is the same run.
        let mut m = measured(vec![sample(0.5, 10, 20, 1)]);
        m.stalls.push(StallAt { t: -0.25, latency_ms: 7.0 });
        let text = serde_json::to_string(&m).unwrap();
        let back: Measured = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        assert_eq!(back.summarize().stall_max_ms, m.summarize().stall_max_ms, "a round before the start is left out");
    }

    #[test]
    fn stall_figures_cover_rounds_during_the_run() {
        // The 900 ms round ends at 2.5 s, inside the 4 s run; with a 2 s run it is left out.
        let mut m = measured(vec![sample(0.0, 1, 1, 0)]);
        let run = m.summarize();
        assert_eq!((run.stall_p50_ms, run.stall_p99_ms, run.stall_max_ms), (Some(3.0), Some(900.0), Some(900.0)));
        m.wall_seconds = 2.0;
        assert_eq!(m.summarize().stall_max_ms, Some(5.0));
        m.stalls.clear();
        assert_eq!(m.summarize().stall_p50_ms, None);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn report_json_has_the_documented_fields() {
        let report = Report {
            host: Host { kernel: "6.18".into(), cgroup_version: 1, limit_bytes: LIMIT, write_bps: None, guest: None },
            runs: vec![measured(vec![sample(0.0, 1, 1, 0)]).summarize()],
        };
        let value = serde_json::to_value(&report).unwrap();
        let host = value["host"].as_object().unwrap();
        for key in ["kernel", "cgroup_version", "limit_bytes", "write_bps"] {
            assert!(host.contains_key(key), "{key}");
        }
        let run = value["runs"][0].as_object().unwrap();
        for key in [
            "importer",
            "verdict",
            "exit_status",
            "wall_seconds",
            "throughput_bytes_per_sec",
            "peak_bytes",
            "kubectl_top_peak_bytes",
            "dirty_writeback_peak_bytes",
            "pinned_seconds",
            "limit_hits",
            "oom_kills",
            "stall_p50_ms",
            "stall_p99_ms",
            "stall_max_ms",
        ] {
            assert!(run.contains_key(key), "{key}");
        }
        assert_eq!(run["verdict"], "BOUNDED");
        assert!(report.table().contains("BOUNDED"));
    }
}
