//! Many importer pods on one node (`--cases parallel`): N = 1, 2, 4, 8 imports of a 1 GiB incompressible qcow2
//! started at once, each in a pod cgroup of its own (600M, an importer leaf inside, as a pod holds its containers)
//! and onto a loop device of its own, all of them on one disk.
//!
//! The disk is one loop device (direct I/O, over a sparse file on the host's disk) with an ext4 filesystem on it;
//! each pod's volume is a file there behind a loop device of its own (direct I/O too), the way file-backed volumes
//! share a node's disk. (Device-mapper slices of one device would model LVM volumes, but this kernel has no
//! device-mapper.) Throttled runs cap the disk at 100 MB/s in the blkio root: every pod's writes, O_DIRECT ones
//! and the flusher's writeback alike, reach the disk from the volumes' loop workers, all in the root blkio cgroup,
//! so they share one throttle group and one budget (blkio v1 throttles per cgroup per device; a throttle per volume
//! would give each its own 100 MB/s). Measured with 4 × `dd` of 256 MiB onto 4 volumes at once: 100 MB/s in total
//! with `oflag=direct`, 71 MB/s buffered with `conv=fsync`; the throttled rows' aggregate is the same check.
//!
//! Each importer reads its own copy of the image (`parallel-1g-I.qcow2`), as pods pulling their own downloads do:
//! one shared source would let qemu-img's cached reads serve all N from one disk read. Pod 0 also runs the
//! co-tenant probe (`boundimport lab cotenant`: 64 MiB allocated and touched every 0.5 s) in a leaf beside its
//! importer; its worst latency is the stall a neighbour in that pod feels.
//!
//! Per (throttle, N, importer), runs alternating between importers: aggregate MB/s (N × virtual size ÷ time until
//! the last import finished, medians and min–max), the largest and smallest importer peak charge of the N, the peak
//! of the sum of the N importers' charges, the peak of their dirty + writeback pages (memory.stat), the node's
//! Dirty + Writeback peak (/proc/meminfo: other tenants of the machine included), limit hits (memory.failcnt of the N pods, summed) and the co-tenant's worst stall. Cgroups,
//! volumes, the filesystem, the throttle and the disk are guards, undone on drop, on a panic and on Ctrl-C.

use crate::{ensure_image, median, random_qcow2, virtual_size, GIB, LIMIT, MIB, OURS};
use boundimport::cgroup::MemCgroup;
use boundimport::lab::cotenant::Cotenant;
use boundimport::lab::fixtures::{
    drop_caches, ChildCgroup, LoopDevice, MountedExt4, ScratchFile, StopOnSignals, WriteThrottle,
};
use boundimport::lab::sampler::events;
use boundimport::lab::ticker::Ticker;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Numbers of imports started at once, unless `--pods` names others.
pub const PODS: [usize; 4] = [1, 2, 4, 8];
/// The shared disk's write budget in throttled runs.
const DISK_BPS: u64 = 100_000_000;
/// The co-tenant in pod 0: bytes allocated and touched per round, and time between rounds.
const COTENANT_BYTES: u64 = 64 * MIB;
const COTENANT_INTERVAL: Duration = Duration::from_millis(500);
/// Time between readings of the pods and /proc/meminfo.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// One importer as a pod runs it, `{src}` and `{dst}` replaced per pod.
struct Importer {
    label: &'static str,
    argv: Vec<String>,
}

/// What one batch of N simultaneous imports measured.
struct Batch {
    /// N × virtual size ÷ seconds until the last import finished, in MB/s.
    aggregate_mbps: f64,
    /// Largest and smallest importer peak charge among the N.
    peak_max: u64,
    peak_min: u64,
    /// Highest sums of charges and of dirty + writeback pages.
    peaks: Peaks,
    /// Limit hits of the N pod cgroups, summed.
    limit_hits: u64,
    /// The co-tenant's slowest round.
    worst_stall: Duration,
}

/// Runs the case for each number of `pods` and prints its table. `boundimport` is the release binary (importer
/// and co-tenant probe).
pub fn run(dir: &Path, boundimport: &Path, runs: usize, pods: &[usize]) {
    let most = pods.iter().copied().max().unwrap_or(0);
    let images: Vec<PathBuf> = (0..most).map(|i| source_image(dir, i)).collect();
    if runs == 0 {
        return;
    }
    let bi = boundimport.to_string_lossy();
    let importers = [
        // CDI's importer: the same command the importer pod runs.
        Importer { label: "qemu-img -t writeback", argv: argv("qemu-img convert -t writeback -O raw {src} {dst}") },
        // boundimport as the CDI pod runs it: defaults (budget from the cgroup, --io auto, no digest).
        Importer { label: OURS, argv: argv(&format!("{bi} {{src}} {{dst}}")) },
    ];
    let virtual_size = virtual_size(&images[0]);
    let stop = StopOnSignals::install().unwrap();
    println!(
        "| disk | N | importer | aggregate MB/s | min–max | boundimport ÷ this (MB/s) | peak MiB max / min | sum of charges \
         peak MiB | pods' dirty+writeback peak MiB | node Dirty+Writeback peak MiB | limit hits | co-tenant worst \
         stall ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for throttle in [Some(DISK_BPS), None] {
        let disk_label = throttle.map_or("unthrottled".to_string(), |bps| format!("{} MB/s", bps / 1_000_000));
        for &n in pods {
            let mut results: Vec<Vec<Batch>> = importers.iter().map(|_| Vec::new()).collect();
            for run in 0..runs {
                for (importer, batches) in importers.iter().zip(results.iter_mut()) {
                    let batch =
                        run_batch(importer, &images[..n], virtual_size, throttle, dir, boundimport, stop.flag());
                    eprintln!(
                        "parallel {disk_label} N={n} run {run} / {}: {:.1} MB/s, peaks {}–{} MiB, sum {} MiB, \
                         dirty+writeback {} MiB (node {} MiB), {} limit hits, stall {} ms",
                        importer.label,
                        batch.aggregate_mbps,
                        batch.peak_min / MIB,
                        batch.peak_max / MIB,
                        batch.peaks.charges / MIB,
                        batch.peaks.dirty_writeback / MIB,
                        batch.peaks.node_dirty_writeback / MIB,
                        batch.limit_hits,
                        batch.worst_stall.as_millis()
                    );
                    batches.push(batch);
                }
            }
            let rates = |batches: &[Batch]| batches.iter().map(|b| b.aggregate_mbps).collect::<Vec<_>>();
            let ours = importers.iter().zip(&results).find(|(i, _)| i.label == OURS).map(|(_, b)| median(&rates(b)));
            for (importer, batches) in importers.iter().zip(&results) {
                let rates = rates(batches);
                let (lo, hi) = rates.iter().fold((f64::MAX, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
                let med = median(&rates);
                let ratio = match ours {
                    Some(ours) if importer.label != OURS => format!("{:.2}", ours / med),
                    _ => "—".to_string(),
                };
                let max_of = |f: fn(&Batch) -> u64| batches.iter().map(f).max().unwrap_or(0);
                let peak_min = batches.iter().map(|b| b.peak_min).min().unwrap_or(0);
                let stall = batches.iter().map(|b| b.worst_stall).max().unwrap_or_default();
                println!(
                    "| {disk_label} | {n} | {} | {med:.0} | {lo:.0}–{hi:.0} | {ratio} | {} / {} | {} | {} | {} | {} | {} |",
                    importer.label,
                    max_of(|b| b.peak_max) / MIB,
                    peak_min / MIB,
                    max_of(|b| b.peaks.charges) / MIB,
                    max_of(|b| b.peaks.dirty_writeback) / MIB,
                    max_of(|b| b.peaks.node_dirty_writeback) / MIB,
                    max_of(|b| b.limit_hits),
                    stall.as_millis()
                );
            }
        }
    }
}

fn argv(command: &str) -> Vec<String> {
    command.split_whitespace().map(String::from).collect()
}

/// Pod `index`'s source: a copy of one 1 GiB incompressible qcow2, each copy its own file (and page cache).
fn source_image(dir: &Path, index: usize) -> PathBuf {
    let first = ensure_image(dir, "parallel-1g-0.qcow2", || random_qcow2(dir, GIB));
    if index == 0 {
        return first;
    }
    ensure_image(dir, &format!("parallel-1g-{index}.qcow2"), || {
        let copy = dir.join("generating.qcow2");
        std::fs::copy(&first, &copy).unwrap();
        copy
    })
}

/// One disk for a batch: a loop device over a fresh sparse file (the disk), an ext4 filesystem on it holding one
/// sparse file per pod, and each of those attached to a loop device of its own (the pod's volume). Every loop
/// device does direct I/O, so a pod's writes reach the disk as they leave its volume, not through a second page
/// cache. Fields drop in order: volumes detached, throttle lifted, filesystem unmounted, disk detached, its file
/// removed.
struct SharedDisk {
    volumes: Vec<LoopDevice>,
    throttle: Option<WriteThrottle>,
    _filesystem: MountedExt4,
    _disk: LoopDevice,
    _backing: ScratchFile,
}

impl SharedDisk {
    fn create(dir: &Path, count: usize, volume_bytes: u64, throttle: Option<u64>) -> Self {
        // Room for ext4's own metadata besides the volumes' blocks.
        let disk_bytes = count as u64 * volume_bytes * 17 / 16 + 256 * MIB;
        let backing = ScratchFile::sparse(&dir.join("parallel-disk.img"), disk_bytes).unwrap();
        let disk = LoopDevice::attach(backing.path(), true).unwrap();
        let filesystem = MountedExt4::create(disk.path()).unwrap();
        let volumes = (0..count)
            .map(|i| {
                let file = filesystem.path().join(format!("volume-{i}"));
                File::create(&file).unwrap().set_len(volume_bytes).unwrap();
                LoopDevice::attach(&file, true).unwrap()
            })
            .collect();
        let own = MemCgroup::own().unwrap();
        let throttle = throttle.map(|bps| WriteThrottle::set(disk.path(), bps, own.as_ref()).unwrap());
        SharedDisk { volumes, throttle, _filesystem: filesystem, _disk: disk, _backing: backing }
    }
}

/// A pod cgroup with the importer's leaf inside (and the co-tenant's, in pod 0). Leaves drop before the pod.
struct Pod {
    importer: ChildCgroup,
    cotenant: Option<ChildCgroup>,
    cgroup: ChildCgroup,
}

impl Pod {
    fn create(index: usize) -> Self {
        let cgroup = ChildCgroup::create(&format!("perf-parallel-{}-{index}", std::process::id()), LIMIT).unwrap();
        let cotenant = (index == 0).then(|| cgroup.create_child("cotenant", None).unwrap());
        Pod { importer: cgroup.create_child("importer", None).unwrap(), cotenant, cgroup }
    }
}

/// An importer process, killed and reaped if still running when dropped; its stderr goes to an unnamed file.
struct Running {
    child: Child,
    stderr: File,
    finished: Option<Instant>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.finished.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `importer` once per image at the same moment, each in its own pod onto its own volume of one disk, and
/// measures the batch.
fn run_batch(
    importer: &Importer,
    images: &[PathBuf],
    virtual_size: u64,
    throttle: Option<u64>,
    dir: &Path,
    boundimport: &Path,
    stop: &AtomicBool,
) -> Batch {
    let mut disk = SharedDisk::create(dir, images.len(), (virtual_size + MIB).next_multiple_of(MIB), throttle);
    let pods: Vec<Pod> = (0..images.len()).map(Pod::create).collect();
    drop_caches().unwrap();
    let cotenant_leaf = pods[0].cotenant.as_ref().unwrap();
    let cotenant = Cotenant::start(cotenant_leaf, boundimport, COTENANT_BYTES, COTENANT_INTERVAL, stop).unwrap();
    let sampler = NodeSampler::start(pods.iter().map(|p| p.importer.reader().clone()).collect());
    let started = Instant::now();
    let mut running: Vec<Running> = images
        .iter()
        .zip(&disk.volumes)
        .zip(&pods)
        .map(|((image, volume), pod)| {
            let args: Vec<String> = importer
                .argv
                .iter()
                .map(|a| {
                    a.replace("{src}", &image.to_string_lossy()).replace("{dst}", &volume.path().to_string_lossy())
                })
                .collect();
            let stderr = tempfile::tempfile().unwrap();
            let mut command = Command::new(&args[0]);
            command.args(&args[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr.try_clone().unwrap());
            Running { child: pod.importer.spawn(&mut command).unwrap(), stderr, finished: None }
        })
        .collect();
    while running.iter().any(|r| r.finished.is_none()) {
        if stop.load(Ordering::SeqCst) {
            // Killed importers stuck behind throttled writeback exit once it drains: lift the throttle first.
            disk.throttle = None;
            panic!("interrupted");
        }
        for r in running.iter_mut().filter(|r| r.finished.is_none()) {
            if let Some(status) = r.child.try_wait().unwrap() {
                r.finished = Some(Instant::now());
                if !status.success() {
                    let mut log = String::new();
                    use std::io::{Read, Seek};
                    r.stderr.rewind().unwrap();
                    r.stderr.read_to_string(&mut log).unwrap();
                    panic!("{} failed ({status}): {log}", importer.label);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = running.iter().filter_map(|r| r.finished).max().unwrap();
    let seconds = last.duration_since(started).as_secs_f64();
    let peaks = sampler.finish();
    let worst_stall = cotenant.stop().iter().map(|s| s.latency).max().unwrap_or_default();
    let importer_peaks: Vec<u64> = pods.iter().map(|p| p.importer.reader().peak().unwrap().unwrap_or(0)).collect();
    Batch {
        aggregate_mbps: (images.len() as u64 * virtual_size) as f64 / seconds / 1e6,
        peak_max: importer_peaks.iter().copied().max().unwrap(),
        peak_min: importer_peaks.iter().copied().min().unwrap(),
        peaks,
        limit_hits: pods.iter().map(|p| events(p.cgroup.reader()).unwrap().limit_hits).sum(),
        worst_stall,
    }
}

/// The highest sums seen at one reading.
#[derive(Default)]
struct Peaks {
    /// The N importers' charges.
    charges: u64,
    /// The N importers' dirty and writeback page cache.
    dirty_writeback: u64,
    /// The whole node's Dirty + Writeback.
    node_dirty_writeback: u64,
}

/// A thread reading the importers' cgroups and /proc/meminfo every [`SAMPLE_INTERVAL`], keeping the [`Peaks`].
/// Dropped unfinished (a batch that panicked), it stops without being waited for.
struct NodeSampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Peaks>>,
}

impl NodeSampler {
    fn start(importers: Vec<MemCgroup>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peaks = Peaks::default();
            let mut ticker = Ticker::new(SAMPLE_INTERVAL);
            while !flag.load(Ordering::SeqCst) {
                let stats: Vec<_> = importers.iter().map(|c| c.stat().unwrap()).collect();
                peaks.charges = peaks.charges.max(stats.iter().map(|s| s.usage).sum());
                peaks.dirty_writeback = peaks.dirty_writeback.max(stats.iter().map(|s| s.dirty_writeback()).sum());
                peaks.node_dirty_writeback = peaks.node_dirty_writeback.max(node_dirty_writeback());
                ticker.wait();
            }
            peaks
        });
        NodeSampler { stop, handle: Some(handle) }
    }

    /// Stops the thread and returns what it saw.
    fn finish(mut self) -> Peaks {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for NodeSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The node's Dirty + Writeback from /proc/meminfo, in bytes.
fn node_dirty_writeback() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    meminfo
        .lines()
        .filter_map(|line| line.strip_prefix("Dirty:").or_else(|| line.strip_prefix("Writeback:")))
        .map(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024)
        .sum()
}
