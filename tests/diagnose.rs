//! `boundimport diagnose` against what it must recognise. Unprivileged: its own cgroup, and v2 and kubelet-layout
//! fixture trees (what this cgroup v1 host cannot create) found by `--pod`/`--container`. Privileged (root, a
//! memory cgroup, loop devices): real cgroups made to show each verdict — qemu-img `-t writeback` onto a throttled
//! loop device (page-cache-pressure naming qemu-img and the device), an anonymous allocation near the limit, an
//! OOM kill, an idle cgroup, and boundimport importing. Limits are small so each takes seconds.

mod common;

use boundimport::lab::fixtures::{ChildCgroup, LoopDevice, WriteThrottle};
use common::privileged::require_privileged;
use common::{boundimport, describe, qemu_img, scratch_dir, tool, write_raw, Fill, MIB};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `boundimport diagnose --json ARGS` and parses its one object.
fn diagnose_json(args: &[&str]) -> Value {
    let lines = diagnose_lines(args);
    assert_eq!(lines.len(), 1, "one object without --watch: {lines:?}");
    lines.into_iter().next().unwrap()
}

/// Runs `boundimport diagnose --json ARGS` and parses every line.
fn diagnose_lines(args: &[&str]) -> Vec<Value> {
    let mut cmd = boundimport();
    cmd.arg("diagnose").arg("--json").args(args);
    let output = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed: {}\n{stdout}",
        describe(&cmd),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("no string {key} in {v}")).to_string()
}

#[test]
fn own_cgroup_unprivileged_report_and_watch() {
    let v = diagnose_json(&[]);
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
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert!(v["usage_bytes"].as_u64().unwrap() > 0);
    assert!(v["writers"].is_array());
    let me = std::process::id() as u64;
    assert!(v["processes"].as_array().unwrap().iter().any(|p| p["pid"] == me), "the test itself is in its cgroup");

    let samples = diagnose_lines(&["--watch", "0.1", "--count", "3"]);
    assert_eq!(samples.len(), 3);
    assert!(samples[0]["trend"].is_null() && samples[2]["trend"]["seconds"].as_f64().unwrap() >= 0.15);

    let out = boundimport().args(["diagnose", "--watch", "0.1", "--count", "2"]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(report.starts_with("TIME") && report.contains("summary: 2 samples"), "{report}");
}

/// A fake cgroup directory with memory files; `v2` picks the file names.
fn fake_cgroup(dir: &Path, v2: bool, limit: u64, anon: u64, file: u64, dirty: u64, writeback: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    let usage = anon + file;
    let inactive = file / 8;
    if v2 {
        write("memory.current", format!("{usage}\n"));
        write("memory.max", format!("{limit}\n"));
        write("memory.high", "max\n".into());
        write(
            "memory.stat",
            format!(
                "anon {anon}\nfile {file}\nfile_dirty {dirty}\nfile_writeback {writeback}\nactive_file {}\n\
                 inactive_file {inactive}\nactive_anon {anon}\ninactive_anon 0\nshmem 0\nfile_mapped 0\n",
                file - inactive
            ),
        );
        write("memory.events", "low 0\nhigh 0\nmax 4051\noom 0\noom_kill 0\n".into());
        write(
            "memory.pressure",
            "some avg10=31.20 avg60=12.00 avg300=3.00 total=9000000\n\
             full avg10=25.00 avg60=9.00 avg300=2.00 total=7000000\n"
                .into(),
        );
    } else {
        write("memory.usage_in_bytes", format!("{usage}\n"));
        write("memory.limit_in_bytes", format!("{limit}\n"));
        write("memory.max_usage_in_bytes", format!("{limit}\n"));
        write("memory.failcnt", "77\n".into());
        write("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n".into());
        write(
            "memory.stat",
            format!(
                "hierarchical_memory_limit {limit}\ntotal_cache {file}\ntotal_rss {anon}\ntotal_dirty {dirty}\n\
                 total_writeback {writeback}\ntotal_active_file {}\ntotal_inactive_file {inactive}\n\
                 total_active_anon {anon}\ntotal_inactive_anon 0\ntotal_shmem 0\ntotal_mapped_file 0\n",
                file - inactive
            ),
        );
    }
    write("cgroup.procs", String::new());
}

const UID: &str = "0b8e1c52-3f7a-4d1e-9c2b-5a6f7e8d9c0b";
const CTR: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";

#[test]
fn v2_systemd_containerd_pod_fixture() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
    let pod = root
        .path()
        .join("kubepods.slice/kubepods-burstable.slice")
        .join(format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_")));
    let ctr = pod.join(format!("cri-containerd-{CTR}.scope"));
    // CDI's importer pod at its 600M limit: 14 MiB anonymous, 556 MiB file cache, 498 MiB dirty or writeback.
    fake_cgroup(&pod, true, 600_000_000, 14 * MIB, 556 * MIB, 300 * MIB, 198 * MIB);
    fake_cgroup(&ctr, true, 600_000_000, 14 * MIB, 556 * MIB, 300 * MIB, 198 * MIB);
    fake_cgroup(&pod.join(format!("cri-containerd-{}.scope", "1".repeat(64))), true, u64::MAX >> 2, MIB, 0, 0, 0);
    let root_arg = root.path().to_str().unwrap();

    let v = diagnose_json(&["--cgroup-root", root_arg, "--pod", UID, "--container", &format!("containerd://{CTR}")]);
    assert_eq!(PathBuf::from(text(&v, "cgroup")), ctr);
    assert_eq!(text(&v, "cgroup_version"), "v2");
    assert_eq!(text(&v, "verdict"), "page-cache-pressure", "{v}");
    assert_eq!(v["limit_bytes"], 600_000_000u64);
    assert_eq!(v["working_set_bytes"], (570 * MIB - 556 * MIB / 8));
    assert_eq!((v["limit_hits"].as_u64(), v["oom_kills"].as_u64()), (Some(4051), Some(0)));
    assert_eq!(v["pressure"]["scope"], "cgroup");
    let reason = text(&v, "reason");
    assert!(reason.contains("556 MiB of the 570 MiB charged"), "{reason}");
    assert!(reason.contains("498 MiB of it dirty or under writeback"), "{reason}");
    assert!(v["unreadable"].as_array().unwrap().is_empty(), "{v}");

    // The pod's own cgroup, by UID alone.
    let v = diagnose_json(&["--cgroup-root", root_arg, "--pod", UID]);
    assert_eq!(PathBuf::from(text(&v, "cgroup")), pod);

    // A relative --cgroup path resolves against the root; an unreadable file is named, its counters null.
    std::fs::remove_file(ctr.join("memory.events")).unwrap();
    std::fs::create_dir(ctr.join("memory.events")).unwrap();
    let relative = ctr.strip_prefix(root.path()).unwrap().to_str().unwrap().to_string();
    let v = diagnose_json(&["--cgroup-root", root_arg, "--cgroup", &relative]);
    assert!(v["limit_hits"].is_null() && v["oom_kills"].is_null(), "{v}");
    let unreadable = v["unreadable"].as_array().unwrap();
    assert!(
        unreadable.iter().any(|u| ctr.join("memory.events").as_path() == Path::new(u["path"].as_str().unwrap())),
        "{v}"
    );
    let out = boundimport().args(["diagnose", "--cgroup-root", root_arg, "--cgroup", &relative]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("limit hits    unreadable"), "{report}");
    assert!(report.contains(&format!("unreadable    {}", ctr.join("memory.events").display())), "{report}");

    // No such pod: an error naming the root, exit 2.
    let out = boundimport().args(["diagnose", "--cgroup-root", root_arg, "--pod", "ffffffff-0000"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cgroup of pod"));
}

#[test]
fn v1_cgroupfs_fixtures_for_crio_and_docker() {
    for (name, container_dir) in [("crio", format!("crio-{CTR}")), ("docker", CTR.to_string())] {
        let root = tempfile::tempdir().unwrap();
        let ctr = root.path().join(format!("kubepods/besteffort/pod{UID}")).join(&container_dir);
        // Anonymous memory at the limit, with past OOM kills counted in memory.oom_control.
        fake_cgroup(&ctr, false, 256 * MIB, 240 * MIB, 10 * MIB, 0, 0);
        let v =
            diagnose_json(&["--cgroup-root", root.path().to_str().unwrap(), "--pod", UID, "--container", &CTR[..12]]);
        assert_eq!(PathBuf::from(text(&v, "cgroup")), ctr, "{name}");
        assert_eq!(text(&v, "cgroup_version"), "v1");
        assert_eq!(text(&v, "verdict"), "oom-killed", "{name}: {v}");
        assert_eq!((v["limit_hits"].as_u64(), v["oom_kills"].as_u64()), (Some(77), Some(3)));
        assert!(text(&v, "reason").starts_with("3 processes OOM-killed in this cgroup (memory.oom_control oom_kill 3)"));
        assert!(v["kernel_oom_kills"].is_null(), "a fixture is outside the hierarchy: no kernel lines to match");
        // v1 counts a kill in the victim's cgroup only: the pod's count adds its containers'.
        fake_cgroup(ctr.parent().unwrap(), false, 256 * MIB, 240 * MIB, 10 * MIB, 0, 0);
        let v = diagnose_json(&["--cgroup-root", root.path().to_str().unwrap(), "--pod", UID]);
        assert_eq!(v["oom_kills"], 6, "{name}: 3 in the pod's own cgroup, 3 in the container's");
    }
}

// ---- privileged: real cgroups -------------------------------------------------------------------------------

/// What a privileged test sets up, torn down in the one safe order: the throttle first (so pages still dirty
/// drain at full speed), then the processes, the cgroup, the loop device.
struct Scene {
    throttle: Option<WriteThrottle>,
    children: Vec<Child>,
    cgroup: Option<ChildCgroup>,
    device: Option<LoopDevice>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.throttle.take();
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cgroup.take();
        self.device.take();
        self.dir.take();
    }
}

impl Scene {
    fn new(label: &str, limit: u64) -> Scene {
        let name = format!("diag-{label}-{}", std::process::id());
        let cgroup = ChildCgroup::create(&name, limit).unwrap();
        Scene {
            throttle: None,
            children: Vec::new(),
            cgroup: Some(cgroup),
            device: None,
            dir: Some(scratch_dir(label)),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn cgroup_dir(&self) -> String {
        self.cgroup.as_ref().unwrap().reader().dir().to_str().unwrap().to_string()
    }

    /// A loop device over a sparse file, throttled to `bps` bytes per second.
    fn throttled_device(&mut self, size: u64, bps: u64) -> PathBuf {
        let backing = self.dir().join("device");
        std::fs::File::create(&backing).unwrap().set_len(size).unwrap();
        let device = LoopDevice::attach(&backing, true).unwrap();
        self.throttle = Some(WriteThrottle::set(device.path(), bps, None).unwrap());
        let path = device.path().to_path_buf();
        self.device = Some(device);
        path
    }

    /// A raw source of `size` incompressible bytes.
    fn source(&self, size: u64) -> PathBuf {
        let path = self.dir().join("source.raw");
        write_raw(&path, size, &[(0, size, Fill::Random(size))]);
        path
    }

    fn spawn(&mut self, cmd: &mut Command) -> u32 {
        let child = self.cgroup.as_ref().unwrap().spawn(cmd).unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Waits until `ready` holds for the cgroup's stat (at most `limit`), panicking with the last reading.
    fn wait_for(&self, limit: Duration, what: &str, ready: impl Fn(&boundimport::cgroup::MemStat) -> bool) {
        let reader = self.cgroup.as_ref().unwrap().reader();
        let deadline = Instant::now() + limit;
        loop {
            let stat = reader.stat().unwrap();
            if ready(&stat) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not reached in {limit:?}; last reading {stat:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `perl` allocating `mib` MiB of anonymous memory, 1 MiB at a time, then saying "ready" and sleeping.
fn allocator(mib: u64) -> Command {
    growing_allocator(mib, 0)
}

/// `perl` allocating `first` MiB at once, saying "ready", then 1 MiB every 100 ms up to `first + more` MiB,
/// saying "done", and sleeping.
fn growing_allocator(first: u64, more: u64) -> Command {
    let mut cmd = Command::new(tool("perl", "PERL"));
    cmd.arg("-e")
        .arg(format!(
            r#"$| = 1; my @a; push @a, "x" x 1048576 for 1..{first}; print "ready\n";
               for (1..{more}) {{ select(undef, undef, undef, 0.1); push @a, "x" x 1048576 }}
               print "done\n"; sleep 60"#
        ))
        .stdout(Stdio::piped());
    cmd
}

fn wait_ready(child: &mut Child) {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
}

#[test]
fn qemu_img_writeback_onto_a_throttled_device_is_page_cache_pressure() {
    if !require_privileged("qemu_img_writeback_onto_a_throttled_device_is_page_cache_pressure") {
        return;
    }
    const LIMIT: u64 = 128 * MIB;
    let mut scene = Scene::new("qemu", LIMIT);
    let source = scene.source(192 * MIB);
    let device = scene.throttled_device(256 * MIB, 4 * MIB);
    // CDI's command line.
    let pid = scene.spawn(
        Command::new(qemu_img())
            .args(["convert", "-t", "writeback", "-p", "-O", "raw"])
            .arg(&source)
            .arg(&device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    scene.wait_for(Duration::from_secs(30), "qemu-img filling the cgroup", |s| {
        s.usage as f64 >= 0.9 * LIMIT as f64 && s.dirty_writeback() >= LIMIT / 4
    });
    let v = diagnose_json(&["--cgroup", &scene.cgroup_dir()]);
    eprintln!("{}", text(&v, "reason"));
    assert_eq!(text(&v, "verdict"), "page-cache-pressure", "{v}");
    let reason = text(&v, "reason");
    let device = device.to_str().unwrap();
    assert!(reason.contains(&format!("written by qemu-img (pid {pid}) to {device}")), "{reason}");
    let writer = v["writers"].as_array().unwrap().iter().find(|w| w["path"] == device).cloned().expect("device writer");
    assert_eq!(writer["command"], "qemu-img");
    assert!(writer["cached_bytes"].as_u64().unwrap() >= LIMIT / 4, "{writer}");
    if writer["residency"] == "cachestat" {
        assert!(writer["dirty_bytes"].as_u64().unwrap() + writer["writeback_bytes"].as_u64().unwrap() >= LIMIT / 4);
    }
    assert!(v["advice"][0].as_str().unwrap().contains("boundimport"));
}

#[test]
fn anonymous_allocation_near_the_limit_is_anonymous_pressure() {
    if !require_privileged("anonymous_allocation_near_the_limit_is_anonymous_pressure") {
        return;
    }
    const LIMIT: u64 = 64 * MIB;
    let mut scene = Scene::new("anon", LIMIT);
    let pid = scene.spawn(&mut growing_allocator(40, 17));
    wait_ready(scene.children.last_mut().unwrap());
    // While it grows by 10 MiB/s, --watch sees the rate.
    let samples = diagnose_lines(&["--cgroup", &scene.cgroup_dir(), "--watch", "0.4", "--count", "4"]);
    let last = samples.last().unwrap();
    eprintln!("{}", text(last, "reason"));
    assert_eq!(text(last, "verdict"), "anonymous-pressure", "{last}");
    assert!(text(last, "reason").contains(" MiB/s over "), "{last}");
    assert!(last["trend"]["anon_bytes_per_sec"].as_f64().unwrap() > 4.0 * MIB as f64, "{last}");
    // Once it is done growing, one sample alone says the same.
    scene.wait_for(Duration::from_secs(10), "all 57 MiB allocated, near the limit", |s| {
        s.anon >= 56 * MIB && s.usage as f64 >= 0.9 * LIMIT as f64
    });
    let v = diagnose_json(&["--cgroup", &scene.cgroup_dir()]);
    eprintln!("{}", text(&v, "reason"));
    assert_eq!(text(&v, "verdict"), "anonymous-pressure", "{v}");
    assert!(text(&v, "reason").contains(&format!("perl (pid {pid}")), "{v}");
    let process = v["processes"].as_array().unwrap().iter().find(|p| p["pid"] == pid).cloned().unwrap();
    assert!(process["anon_bytes"].as_u64().unwrap() >= 56 * MIB, "{process}");
}

#[test]
fn a_cgroup_whose_task_was_oom_killed_is_oom_killed_with_the_count() {
    if !require_privileged("a_cgroup_whose_task_was_oom_killed_is_oom_killed_with_the_count") {
        return;
    }
    let mut scene = Scene::new("oom", 32 * MIB);
    let mut cmd = allocator(64);
    scene.spawn(cmd.stdout(Stdio::null()));
    let status = scene.children.last_mut().unwrap().wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "perl was not OOM-killed: {status:?}");
    let v = diagnose_json(&["--cgroup", &scene.cgroup_dir()]);
    eprintln!("{}", text(&v, "reason"));
    assert_eq!(text(&v, "verdict"), "oom-killed", "{v}");
    assert_eq!(v["oom_kills"], 1);
    assert!(text(&v, "reason").starts_with("1 process OOM-killed in this cgroup"), "{v}");
    // As root /dev/kmsg is readable: the kernel's own line names the victim.
    let kills = v["kernel_oom_kills"].as_array().expect("kernel log read as root");
    assert!(kills.iter().any(|k| k["task"] == "perl"), "{v}");
}

/// The kill was in a child cgroup (a test's, made and removed): the parent's counter shows none, and the verdict
/// says so and names the child, instead of `OOM kills 0` beside "1 process OOM-killed in this cgroup".
#[test]
fn a_kill_in_a_removed_child_cgroup_is_named_as_the_childs() {
    if !require_privileged("a_kill_in_a_removed_child_cgroup_is_named_as_the_childs") {
        return;
    }
    let scene = Scene::new("oom-child", 256 * MIB);
    let child = scene.cgroup.as_ref().unwrap().create_child("test-child", Some(32 * MIB)).unwrap();
    let mut cmd = allocator(64);
    let mut perl = child.spawn(cmd.stdout(Stdio::null())).unwrap();
    let status = perl.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "perl was not OOM-killed: {status:?}");
    drop(child);
    let v = diagnose_json(&["--cgroup", &scene.cgroup_dir()]);
    let reason = text(&v, "reason");
    eprintln!("{reason}");
    assert_eq!(text(&v, "verdict"), "oom-killed", "{v}");
    let kills = v["kernel_oom_kills"].as_array().expect("kernel log read as root");
    let below = kills[0]["below"].as_str().unwrap_or_else(|| panic!("the kill is not placed below: {v}"));
    assert!(below.ends_with("/test-child"), "{v}");
    let counted = v["oom_kills"].as_u64().expect("a readable counter");
    if counted == 0 {
        let said = format!("1 process OOM-killed below this cgroup, in {below} (kernel log; this cgroup's ");
        assert!(reason.starts_with(&said) && reason.contains("counts 0: not its own kill"), "{reason}");
    }
    assert!(reason.contains(&format!("the kernel killed perl (pid {}) in {below}", perl.id())), "{reason}");
    // The text report's counts line says the same.
    let output = boundimport().args(["diagnose", "--cgroup", &scene.cgroup_dir()]).output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    let line = report.lines().find(|l| l.starts_with("OOM kills")).unwrap_or_else(|| panic!("{report}"));
    assert!(line.contains("kernel log: 1 below this cgroup"), "{line}");
}

/// A cgroup path that does not exist, or a pid with no process, is said to be so, not "not a memory cgroup" or a
/// file under /proc.
#[test]
fn a_missing_cgroup_or_process_is_named_as_missing() {
    for (args, says) in [
        (["--cgroup", "/nope-boundimport-test"], "--cgroup /nope-boundimport-test: no such cgroup: it does not exist"),
        (["--pid", "999999999"], "--pid 999999999: no such process"),
    ] {
        let output = boundimport().arg("diagnose").args(args).output().unwrap();
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(!text.contains("not a memory cgroup") && !text.contains("/proc/"), "{args:?}: {text}");
    }
}

#[test]
fn an_idle_cgroup_is_healthy() {
    if !require_privileged("an_idle_cgroup_is_healthy") {
        return;
    }
    let mut scene = Scene::new("idle", 64 * MIB);
    let pid = scene.spawn(Command::new("sleep").arg("30"));
    let v = diagnose_json(&["--cgroup", &scene.cgroup_dir()]);
    assert_eq!(text(&v, "verdict"), "healthy", "{v}");
    assert!(v["processes"].as_array().unwrap().iter().any(|p| p["pid"] == pid && p["command"] == "sleep"));
    assert_eq!((v["limit_bytes"].as_u64(), v["oom_kills"].as_u64()), (Some(64 * MIB), Some(0)));
    // --pid finds the same cgroup.
    let by_pid = diagnose_json(&["--pid", &pid.to_string()]);
    assert_eq!(by_pid["cgroup"], v["cgroup"]);
}

#[test]
fn unprivileged_it_reads_its_own_cgroup_and_names_what_it_cannot_read() {
    if !require_privileged("unprivileged_it_reads_its_own_cgroup_and_names_what_it_cannot_read") {
        return;
    }
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    // As nobody, in this test's own cgroup, beside root's processes (this test among them).
    let output = boundimport().args(["diagnose", "--json"]).uid(NOBODY).gid(NOBODY).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let v: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(v["usage_bytes"].as_u64().unwrap() > 0 && v["file_bytes"].is_u64(), "{v}");
    let unreadable: Vec<String> =
        v["unreadable"].as_array().unwrap().iter().map(|u| u["path"].as_str().unwrap().to_string()).collect();
    let me = format!("/proc/{}/fd", std::process::id());
    assert!(unreadable.contains(&me), "root's descriptors are named, not skipped: {unreadable:?}");
    let restricted = std::fs::read_to_string("/proc/sys/kernel/dmesg_restrict").is_ok_and(|t| t.trim() == "1");
    if restricted {
        assert!(unreadable.iter().any(|p| p == "/dev/kmsg"), "{unreadable:?}");
        assert!(v["kernel_oom_kills"].is_null());
    }
    assert_ne!(text(&v, "verdict"), "unknown", "{v}");
}

#[test]
fn boundimport_importing_onto_a_throttled_device_is_healthy_or_clean_cache() {
    if !require_privileged("boundimport_importing_onto_a_throttled_device_is_healthy_or_clean_cache") {
        return;
    }
    const LIMIT: u64 = 128 * MIB;
    let mut scene = Scene::new("bounded", LIMIT);
    let source = scene.source(192 * MIB);
    let device = scene.throttled_device(256 * MIB, 4 * MIB);
    let pid = scene.spawn(
        boundimport()
            .args(["--progress", "none", "--no-digest"])
            .arg(&source)
            .arg(&device)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    // Let it reach the steady state: writes waiting on the throttled device.
    std::thread::sleep(Duration::from_millis(1500));
    let samples = diagnose_lines(&["--cgroup", &scene.cgroup_dir(), "--watch", "0.25", "--count", "4"]);
    for v in &samples {
        let verdict = text(v, "verdict");
        assert!(verdict == "healthy" || verdict == "clean-cache", "{v}");
        assert!(v["usage_bytes"].as_u64().unwrap() < LIMIT / 2, "{v}");
    }
    let last = samples.last().unwrap();
    eprintln!("{}", text(last, "reason"));
    let device = device.to_str().unwrap();
    assert!(
        last["writers"].as_array().unwrap().iter().any(|w| w["pid"] == pid && w["path"] == device),
        "boundimport writing the device: {last}"
    );
}
