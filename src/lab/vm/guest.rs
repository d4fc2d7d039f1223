//! `boundimport lab guest`: what runs inside the guest. One importer through the host lab's own run (cgroups,
//! co-tenant, sampler), then the measurements as `measured.json` for the host to read back.

use super::super::report::Measured;
use super::super::{run_one, Config, DestChoice, Importer};
use crate::cgroup::{MemCgroup, Version};
use crate::error::{Error, ErrorKind, IoContext, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// File name of the measurements in the result directory.
pub const MEASURED_FILE: &str = "measured.json";

/// A run measured in the guest (its times are relative to the importer's start, so they survive the trip out),
/// with what the guest saw of its own conditions.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GuestMeasured {
    /// The guest kernel (`uname -r`).
    pub kernel: String,
    /// The memory hierarchy version the importer ran on.
    pub cgroup_version: u8,
    /// Controllers of the unified hierarchy's root (`io` among them means cgroup writeback), empty on v1.
    pub v2_controllers: String,
    /// The limited cgroup's memory.events (v2) or memory.oom_control (v1) at the end, as the kernel wrote it.
    pub events_text: String,
    /// `/sys/kernel/mm/lru_gen/enabled` as the importer ran (`0x0007`: the multi-gen LRU on), `null` on a kernel
    /// without it.
    #[serde(default)]
    pub lru_gen: Option<String>,
    /// `vm.dirty_ratio` as the importer ran: the share of dirtyable memory (of the cgroup's, with cgroup writeback)
    /// a writer may dirty before it is throttled.
    #[serde(default)]
    pub dirty_ratio: Option<u32>,
    /// The run.
    #[serde(flatten)]
    pub measured: Measured,
}

impl GuestMeasured {
    fn new(measured: Measured, own: &MemCgroup, events_text: String) -> Self {
        GuestMeasured {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
            cgroup_version: match own.version() {
                Version::V1 => 1,
                Version::V2 => 2,
            },
            v2_controllers: fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            events_text,
            lru_gen: fs::read_to_string(super::init::LRU_GEN).ok().map(|s| s.trim().to_string()),
            dirty_ratio: fs::read_to_string("/proc/sys/vm/dirty_ratio").ok().and_then(|s| s.trim().parse().ok()),
            measured,
        }
    }

    /// Whether the multi-gen LRU was on (bit 0 of the switch), `None` on a kernel without it.
    pub fn mglru(&self) -> Option<bool> {
        let text = self.lru_gen.as_deref()?;
        let bits = u32::from_str_radix(text.trim_start_matches("0x"), 16).ok()?;
        Some(bits & 1 == 1)
    }

    /// Reads `measured.json` from a result directory.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MEASURED_FILE);
        let text =
            fs::read_to_string(&path).io_context("reading the guest's measurements").map_err(|e| e.at_path(&path))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::new(ErrorKind::Io, "parsing the guest's measurements").with_source(e).at_path(&path))
    }
}

/// Arguments of `boundimport lab guest`.
#[derive(Debug, Clone)]
pub struct GuestArgs {
    /// Importer under test.
    pub importer: Importer,
    /// Its source argument.
    pub source: String,
    /// Its destination.
    pub dest: PathBuf,
    /// The limit.
    pub limit: u64,
    /// The image's virtual size.
    pub virtual_size: u64,
    /// Standing co-tenant charge on `/cotenant` (tmpfs), 0 for none.
    pub cotenant_charge: u64,
    /// Co-tenant probe allocation per round, 0 for none.
    pub probe: u64,
    /// boundimport's `--io`, `None` for its default.
    pub io: Option<String>,
    /// Result directory.
    pub out: PathBuf,
}

/// Runs one importer inside the guest with the host lab's own run, and writes `measured.json` into `out`.
pub fn run(args: &GuestArgs, stop: &AtomicBool) -> Result<()> {
    fs::create_dir_all(&args.out).io_context("creating result directory").map_err(|e| e.at_path(&args.out))?;
    // The guest's /init runs in the hierarchy's root, which has no memory cgroup of its own to find.
    let own = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        MemCgroup::at("/sys/fs/cgroup", Version::V2)
    } else {
        MemCgroup::at("/sys/fs/cgroup/memory", Version::V1)
    };
    let config = Config {
        limit: args.limit,
        write_bps: None,
        dest: DestChoice::Path(args.dest.clone()),
        importers: vec![args.importer],
        cotenant_bytes: args.probe,
        qemu_img: PathBuf::from("qemu-img"),
        cotenant_charge: (args.cotenant_charge > 0).then(|| (PathBuf::from("/cotenant/charge"), args.cotenant_charge)),
        boundimport_args: args.io.iter().flat_map(|io| ["--io".to_string(), io.clone()]).collect(),
        ..Config::new(PathBuf::from(&args.source), &args.out)?
    };
    let (measured, events_text) = run_one(&config, args.importer, args.virtual_size, stop)?;
    let summary = measured.summarize();
    let result = GuestMeasured::new(measured, &own, events_text);
    let text = serde_json::to_string(&result)
        .map_err(|e| Error::new(ErrorKind::Io, "serialising the measurements").with_source(e))?;
    let path = args.out.join(MEASURED_FILE);
    fs::write(&path, text).io_context("writing the measurements").map_err(|e| e.at_path(&path))?;
    log::info!("lab guest: {} {} in {:.1}s", summary.importer, summary.verdict.as_str(), summary.wall_seconds);
    Ok(())
}
