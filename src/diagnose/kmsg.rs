//! Kernel OOM-kill lines for one cgroup, from /dev/kmsg.
//!
//! The kernel logs every OOM kill as an `oom-kill:constraint=…,oom_memcg=…,task_memcg=…,task=…,pid=…` line
//! followed by `Memory cgroup out of memory: Killed process PID (COMM) …` (mm/oom_kill.c). /dev/kmsg is read
//! non-blocking, one record per read, until the buffer is drained; reading it needs CAP_SYSLOG or
//! `kernel.dmesg_restrict=0`.

use crate::error::{IoContext, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// One OOM kill the kernel logged for this cgroup.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OomKill {
    /// Seconds since boot, as dmesg shows them.
    pub seconds: f64,
    /// The killed process.
    pub pid: Option<u32>,
    /// Its command name.
    pub task: String,
    /// The cgroup whose limit was hit (relative to the hierarchy root).
    pub oom_memcg: String,
    /// The killed task's cgroup.
    pub task_memcg: String,
    /// The `Killed process …` line, if it was found.
    pub killed: Option<String>,
    /// The cgroup below the diagnosed one that held the killed task (`task_memcg`), when it was not the diagnosed
    /// cgroup itself: such a kill is in the kernel log but, once that child is removed, in no counter of ours.
    pub below: Option<String>,
}

/// An open /dev/kmsg that remembers what it read, so `--watch` only reads new records.
pub struct Kmsg {
    file: File,
    records: Vec<(f64, String)>,
}

impl Kmsg {
    /// Opens /dev/kmsg for non-blocking reads from the oldest record in the buffer.
    pub fn open() -> Result<Kmsg> {
        let path = Path::new("/dev/kmsg");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .io_context("opening")
            .map_err(|e| e.at_path(path))?;
        Ok(Kmsg { file, records: Vec::new() })
    }

    /// Reads the records logged since the last call; keeps only those that can matter (OOM lines).
    pub fn poll(&mut self) -> Result<()> {
        // One record per read; a record is at most about 8 KiB (a smaller buffer fails with EINVAL).
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    if let Some(record) = parse_record(&String::from_utf8_lossy(&buf[..n])) {
                        if record.1.starts_with("oom-kill:") || record.1.contains("Killed process") {
                            self.records.push(record);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // The oldest records were overwritten while we read: continue from the next one.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(crate::error::Error::io("reading", e).at_path("/dev/kmsg")),
            }
        }
    }

    /// The OOM kills logged so far for the cgroup at `relative` (its path below the hierarchy root).
    pub fn kills(&self, relative: &str) -> Vec<OomKill> {
        oom_kills(&self.records, relative)
    }
}

/// `prio,seq,usec,flags;message` (continuation lines after it start with a space) → (seconds, message).
fn parse_record(text: &str) -> Option<(f64, String)> {
    let (header, rest) = text.split_once(';')?;
    let usec: u64 = header.split(',').nth(2)?.parse().ok()?;
    let message = rest.lines().next()?.to_string();
    Some((usec as f64 / 1e6, message))
}

/// The OOM kills among kernel `records` whose limit-hitting or killed task's cgroup is `relative` or below it.
pub fn oom_kills(records: &[(f64, String)], relative: &str) -> Vec<OomKill> {
    let relative = format!("/{}", relative.trim_matches('/'));
    let inside = |cg: &str| {
        let cg = cg.trim_end_matches('/');
        relative == "/" || cg == relative || cg.strip_prefix(&relative).is_some_and(|r| r.starts_with('/'))
    };
    let mut kills = Vec::new();
    for (i, (seconds, message)) in records.iter().enumerate() {
        let Some(fields) = message.strip_prefix("oom-kill:") else { continue };
        let field = |key: &str| {
            fields.split(',').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).unwrap_or("").to_string()
        };
        let (oom_memcg, task_memcg) = (field("oom_memcg"), field("task_memcg"));
        if !inside(&oom_memcg) && !inside(&task_memcg) {
            continue;
        }
        let pid = field("pid").parse().ok();
        let killed = pid.and_then(|pid: u32| {
            records[i + 1..]
                .iter()
                .take(4)
                .find(|(_, m)| m.contains(&format!("Killed process {pid} ")))
                .map(|(_, m)| m.clone())
        });
        let below = (inside(&task_memcg) && task_memcg.trim_end_matches('/') != relative.trim_end_matches('/'))
            .then(|| task_memcg.clone());
        kills.push(OomKill { seconds: *seconds, pid, task: field("task"), oom_memcg, task_memcg, killed, below });
    }
    kills
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim shapes from a 6.18 kernel (this host), cgroup v1.
    const LOG: &[&str] = &[
        "6,2301,5123456789,-;perl invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "6,2330,5123460000,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,\
         oom_memcg=/process_api/abc/diag-oom,task_memcg=/process_api/abc/diag-oom,task=perl,pid=4242,uid=0",
        "3,2331,5123460100,-;Memory cgroup out of memory: Killed process 4242 (perl) total-vm:70000kB, \
         anon-rss:32000kB, file-rss:2000kB, shmem-rss:0kB, UID:0 pgtables:120kB oom_score_adj:0",
        "6,2340,5200000000,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,\
         oom_memcg=/other,task_memcg=/other/x,task=java,pid=99,uid=0",
    ];

    fn records() -> Vec<(f64, String)> {
        LOG.iter().map(|r| parse_record(r).unwrap()).collect()
    }

    #[test]
    fn records_parse_to_seconds_and_message() {
        let (seconds, message) = parse_record("6,1,1500000,-;hello\n SUBSYSTEM=x\n").unwrap();
        assert_eq!((seconds, message.as_str()), (1.5, "hello"));
        assert_eq!(parse_record("garbage"), None);
    }

    #[test]
    fn kills_of_this_cgroup_pair_with_their_killed_line() {
        let kills = oom_kills(&records(), "/process_api/abc/diag-oom");
        assert_eq!(kills.len(), 1);
        let k = &kills[0];
        assert_eq!((k.pid, k.task.as_str(), k.seconds), (Some(4242), "perl", 5123.46));
        assert!(k.killed.as_deref().unwrap().starts_with("Memory cgroup out of memory: Killed process 4242 (perl)"));
        assert_eq!(k.below, None, "killed in the diagnosed cgroup itself");
        let parent = oom_kills(&records(), "/process_api/abc");
        assert_eq!(parent[0].below.as_deref(), Some("/process_api/abc/diag-oom"), "killed in a child");
    }

    #[test]
    fn a_parent_sees_its_childrens_kills_and_strangers_are_left_out() {
        assert_eq!(oom_kills(&records(), "process_api/abc").len(), 1);
        assert_eq!(oom_kills(&records(), "/process_api/ab").len(), 0, "a name prefix is not a parent");
        assert_eq!(oom_kills(&records(), "/other").len(), 1);
        assert_eq!(oom_kills(&records(), "/").len(), 2);
    }
}
