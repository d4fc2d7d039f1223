//! `boundimport diagnose`: the importer-pod OOM checklist as one command. Reads a memory cgroup (its own by
//! default, or one named by path, process, pod or container) through the same reader as the governor, looks at
//! its processes and the files they write, the node's dirty settings and the kernel log, and says what it means.
//!
//! - [`snapshot`]: one reading of everything; a failed read is named, never a zero.
//! - [`writers`]: processes, their open files and those files' page cache (cachestat, else mincore).
//! - [`kmsg`]: kernel OOM-kill lines for the cgroup from /dev/kmsg.
//! - [`locate`]: pod / container → cgroup directory on a node (systemd and cgroupfs drivers).
//! - [`verdict`]: the verdict, a pure function of a snapshot.
//! - [`render`]: text, watch lines and JSON.

pub mod kmsg;
pub mod locate;
pub mod render;
pub mod snapshot;
pub mod verdict;
pub mod writers;

use crate::cgroup::MemCgroup;
use crate::error::{Error, ErrorKind, Result};
use snapshot::{Misses, Snapshot, Unreadable};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Explain a memory cgroup: limit, usage, what `kubectl top` shows, anonymous memory and page cache (dirty,
/// writeback), limit hits and OOM kills, pressure, the node's dirty settings, the processes and the files they
/// write with their page cache, kernel OOM lines — and a verdict with what to do. Default: this process's own
/// cgroup (run it with `kubectl exec POD -- boundimport diagnose`).
#[derive(Debug, clap::Args)]
pub struct DiagnoseArgs {
    /// A cgroup directory, absolute or relative to the memory hierarchy's mount point (as /proc/PID/cgroup shows
    /// it).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["pid", "pod"])]
    cgroup: Option<PathBuf>,

    /// The memory cgroup of this process.
    #[arg(long, value_name = "PID", conflicts_with = "pod")]
    pid: Option<u32>,

    /// The cgroup of this pod (its UID, `kubectl get pod NAME -o jsonpath='{.metadata.uid}'`), found on the node
    /// for the systemd and cgroupfs drivers.
    #[arg(long, value_name = "UID")]
    pod: Option<String>,

    /// With --pod: the container's own cgroup (its ID or a unique prefix; `containerd://…` accepted).
    #[arg(long, value_name = "ID", requires = "pod")]
    container: Option<String>,

    /// Where to look for --pod and relative --cgroup paths instead of the mounted memory hierarchy.
    #[arg(long, value_name = "DIR", hide = true)]
    cgroup_root: Option<PathBuf>,

    /// Sample every SECS seconds (default 1), one line each, until interrupted; a summary at the end.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,

    /// With --watch: stop after N samples.
    #[arg(long, value_name = "N", requires = "watch")]
    count: Option<u64>,

    /// JSON: one object per sample (a single object without --watch).
    #[arg(long)]
    json: bool,

    /// More log output.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only warnings and errors on stderr.
    #[arg(short, long)]
    quiet: bool,
}

/// Entry point of `boundimport diagnose`: returns the exit code.
pub fn main(args: DiagnoseArgs) -> i32 {
    crate::process::logging::init(args.verbose, args.quiet);
    match run(&args) {
        Ok(()) => 0,
        Err(err) => {
            log::error!("{err}");
            err.exit_code()
        }
    }
}

fn run(args: &DiagnoseArgs) -> Result<()> {
    let (cg, mount) = target(args)?;
    log::debug!("diagnosing {} ({:?})", cg.dir().display(), cg.version());
    let mut kernel = KernelLog::open(&cg, mount.as_deref());
    let Some(interval) = args.watch else {
        let snap = take(&cg, &mut kernel);
        let v = verdict::judge(&snap, None);
        if args.json {
            println!("{}", render::json(&snap, &v, None));
        } else {
            print!("{}", render::report(&snap, &v));
        }
        return Ok(());
    };
    if !(interval > 0.0 && interval.is_finite()) {
        return Err(Error::usage("--watch needs a positive number of seconds"));
    }
    let interval = Duration::from_secs_f64(interval);
    let stop = crate::process::install_stop_handlers();
    let mut first: Option<Snapshot> = None;
    let mut previous: Option<Snapshot> = None;
    let mut summary = render::Summary::default();
    let mut next = Instant::now();
    let mut taken = 0;
    loop {
        if !cg.dir().is_dir() {
            log::warn!("{}: the cgroup is gone (its pod or container was removed)", cg.dir().display());
            break;
        }
        let snap = take(&cg, &mut kernel);
        let base = first.get_or_insert_with(|| snap.clone());
        let trend = (taken > 0).then(|| verdict::Trend::between(base, &snap));
        let v = verdict::judge(&snap, trend.as_ref());
        let since = previous.as_ref().map_or(0.0, |p| snap.time_unix - p.time_unix);
        summary.add(base, &snap, &v, since);
        if args.json {
            println!("{}", render::json(&snap, &v, trend.as_ref()));
        } else {
            if taken == 0 {
                println!("{}", render::watch_header());
            }
            let hits = match (previous.as_ref().and_then(|p| p.limit_hits), snap.limit_hits) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                (None, b) if taken == 0 => b.map(|_| 0),
                _ => None,
            };
            println!("{}", render::watch_line(&snap, &v, hits));
            for u in snap.unreadable.iter().filter(|u| previous.as_ref().is_none_or(|p| !p.unreadable.contains(u))) {
                println!("unreadable: {}: {}", u.path.display(), u.error);
            }
        }
        previous = Some(snap);
        taken += 1;
        if args.count.is_some_and(|n| taken >= n) || stop.load(Ordering::SeqCst) {
            break;
        }
        next += interval;
        while Instant::now() < next && !stop.load(Ordering::SeqCst) {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    if args.json {
        log::info!("{}", summary.render());
    } else {
        println!("{}", summary.render());
        if let Some(last) = &previous {
            let v = verdict::judge(last, first.as_ref().map(|f| verdict::Trend::between(f, last)).as_ref());
            println!("verdict: {} — {}", v.verdict.name(), v.reason);
            for a in &v.advice {
                println!("  - {a}");
            }
        }
    }
    Ok(())
}

/// The cgroup to diagnose and the mount point of its hierarchy (for matching kernel log lines).
fn target(args: &DiagnoseArgs) -> Result<(MemCgroup, Option<PathBuf>)> {
    let mounted = crate::cgroup::memory_hierarchy()?;
    let root = args.cgroup_root.clone().or_else(|| mounted.as_ref().map(|(p, _)| p.clone()));
    let root_or_err =
        || root.clone().ok_or_else(|| Error::new(ErrorKind::Unsupported, "no memory cgroup hierarchy is mounted"));
    let mount = if args.cgroup_root.is_some() { None } else { mounted.map(|(p, _)| p) };
    if let Some(path) = &args.cgroup {
        let dir = if path.is_absolute() && path.is_dir() {
            path.clone()
        } else {
            root_or_err()?.join(path.strip_prefix("/").unwrap_or(path))
        };
        if !dir.is_dir() {
            let tried = if dir == *path { String::new() } else { format!(" (nor {})", dir.display()) };
            return Err(Error::usage(format!("--cgroup {}: no such cgroup: it does not exist{tried}", path.display())));
        }
        return Ok((MemCgroup::detect(dir)?, mount));
    }
    if let Some(pid) = args.pid {
        if !Path::new(&format!("/proc/{pid}")).is_dir() {
            return Err(Error::usage(format!("--pid {pid}: no such process")));
        }
        let cg = MemCgroup::of_pid(pid)?
            .ok_or_else(|| Error::new(ErrorKind::Unsupported, format!("process {pid} is in no memory cgroup here")))?;
        return Ok((cg, mount));
    }
    if let Some(uid) = &args.pod {
        let pod = locate::find_pod(&root_or_err()?, uid)?;
        let dir = match &args.container {
            Some(id) => locate::find_container(&pod, id)?,
            None => pod,
        };
        return Ok((MemCgroup::detect(dir)?, mount));
    }
    let own = MemCgroup::own()?
        .ok_or_else(|| Error::new(ErrorKind::Unsupported, "this process is in no memory cgroup (none mounted?)"))?;
    Ok((own, mount))
}

/// /dev/kmsg for one cgroup: open, unreadable (named), or not applicable (a cgroup outside the mounted
/// hierarchy, like a fixture tree).
enum KernelLog {
    Open(kmsg::Kmsg, String),
    Unreadable(Unreadable),
    NotApplicable,
}

impl KernelLog {
    fn open(cg: &MemCgroup, mount: Option<&Path>) -> KernelLog {
        let Some(relative) = mount.and_then(|m| cg.dir().strip_prefix(m).ok()) else {
            return KernelLog::NotApplicable;
        };
        let relative = format!("/{}", relative.display());
        match kmsg::Kmsg::open() {
            Ok(k) => KernelLog::Open(k, relative),
            Err(e) => KernelLog::Unreadable(unreadable(&e, Path::new("/dev/kmsg"))),
        }
    }
}

fn unreadable(err: &Error, fallback: &Path) -> Unreadable {
    let mut misses = Misses::default();
    misses.record(err, fallback);
    misses.0.remove(0)
}

/// Takes one snapshot of `cg`, with the kernel log lines read since the last one.
fn take(cg: &MemCgroup, kernel: &mut KernelLog) -> Snapshot {
    let mut misses = Misses::default();
    let mut snap = Snapshot {
        time_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        ..Snapshot::default()
    };
    snapshot::read_cgroup(cg, &mut snap, &mut misses);
    snap.node = snapshot::read_node(&mut misses);
    let pids = writers::all_procs(cg, &mut misses);
    let (processes, files) = writers::scan(&writers::proc_root(), &pids, &mut misses);
    snap.processes = processes;
    let (writing, reading): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| f.writing);
    snap.writers = writing;
    snap.readers = reading.into_iter().filter(|f| f.cached_bytes != Some(0)).collect();
    snap.kernel_oom_kills = match kernel {
        KernelLog::Open(k, relative) => match k.poll() {
            Ok(()) => Some(k.kills(relative)),
            Err(e) => {
                misses.record(&e, Path::new("/dev/kmsg"));
                None
            }
        },
        KernelLog::Unreadable(u) => {
            misses.0.push(u.clone());
            None
        }
        KernelLog::NotApplicable => None,
    };
    snap.unreadable = misses.0;
    snap
}
