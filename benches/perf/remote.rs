//! Remote imports at the network's speed (`--cases remote`, issue 29): a server that gives each connection
//! 20 MB/s and answers every request 20 ms late (scripts/serve-throttled, `--per-connection --latency`: the cap
//! object stores and CDNs put on one connection), serving an incompressible qcow2, the same disk raw, and the
//! qcow2 gzip'd. Per image, runs alternating: one `curl` GET of the file (the single-connection rate),
//! boundimport on one connection (`--connections 1`, the behaviour before parallel range requests), and boundimport
//! as it runs by default (parallel range requests, slow start); each in a fresh 600M cgroup with caches dropped,
//! onto a file. Reports wall time (median, min–max), MB/s of the file as stored, connections used (from `--json`),
//! the window's bytes, the peak charge, and the rate against curl's.
//!
//! The image size is `--remote-size MiB` (default 512; the 2 GiB takes 107 s a curl run at 20 MB/s).
//! qemu-img here has no curl block driver, so CDI's own way over HTTP (qemu-img reading the URL) is not a row.

use crate::{ensure_image, measure, median, random_qcow2, Sample, MIB};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What each connection gets, and the latency of every answer.
const PER_CONNECTION: u64 = 20_000_000;
const LATENCY_MS: u64 = 20;

/// The throttled server, stopped on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/serve-throttled");
        let port_file = dir.join("remote-server.port");
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new(script)
            .arg(dir)
            .args(["--per-connection", &PER_CONNECTION.to_string(), "--latency", &LATENCY_MS.to_string()])
            .arg("--port-file")
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting scripts/serve-throttled");
        let started = Instant::now();
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse().expect("a port");
            }
            assert!(started.elapsed() < Duration::from_secs(20), "serve-throttled did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        Server { child, port }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the case and prints its table.
pub fn run(dir: &Path, boundimport: &Path, runs: usize, size_mib: u64) {
    let qcow2_name = format!("remote-{size_mib}m.qcow2");
    let qcow2 = ensure_image(dir, &qcow2_name, || random_qcow2(dir, size_mib * MIB));
    let raw_name = format!("remote-{size_mib}m.raw");
    ensure_image(dir, &raw_name, || {
        let out = dir.join("generating.raw");
        crate::run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&qcow2).arg(&out));
        out
    });
    let gz_name = format!("{qcow2_name}.gz");
    ensure_image(dir, &gz_name, || {
        let out = dir.join("generating.gz");
        let file = std::fs::File::create(&out).unwrap();
        crate::run(Command::new("gzip").args(["-1", "-c"]).arg(&qcow2).stdout(file));
        out
    });
    if runs == 0 {
        return;
    }
    let server = Server::start(dir);
    let bi = boundimport.to_string_lossy().into_owned();
    let dest = dir.join("remote-destination.img");
    let dst = dest.to_string_lossy().into_owned();
    let importers: [(&str, Vec<String>); 3] = [
        ("curl GET", vec!["curl".into(), "-sS".into(), "-o".into(), dst.clone()]),
        ("boundimport --connections 1", vec![bi.clone(), "--json".into(), "--connections".into(), "1".into()]),
        ("boundimport", vec![bi.clone(), "--json".into()]),
    ];
    println!(
        "| remote ({} MB/s a connection, {LATENCY_MS} ms) | importer | median s | min–max s | MB/s | connections | \
         window MiB | peak MiB | rate ÷ curl's |",
        PER_CONNECTION / 1_000_000
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for name in [&qcow2_name, &raw_name, &gz_name] {
        let url = server.url(name);
        let stored = std::fs::metadata(dir.join(name)).unwrap().len();
        let mut samples: Vec<Vec<(Sample, Option<serde_json::Value>)>> = vec![Vec::new(); importers.len()];
        for run in 0..runs {
            for ((label, argv), samples) in importers.iter().zip(samples.iter_mut()) {
                let _ = std::fs::remove_file(&dest);
                let mut argv = argv.clone();
                argv.push(url.clone());
                if label.starts_with("boundimport") {
                    argv.splice(1..1, ["--progress".to_string(), "none".to_string()]);
                    argv.push(dst.clone());
                }
                let sample = measure(&argv, &format!("remote-{run}"));
                let summary = serde_json::from_slice::<serde_json::Value>(&sample.stdout).ok();
                eprintln!(
                    "{name} / {label}: {:.2}s, peak {} MiB, {} connections",
                    sample.wall,
                    sample.peak / MIB,
                    summary.as_ref().map_or("1".into(), |s| s["http_connections"].to_string())
                );
                samples.push((sample, summary));
            }
        }
        let _ = std::fs::remove_file(&dest);
        let curl = median(&samples[0].iter().map(|(s, _)| s.wall).collect::<Vec<_>>());
        for ((label, _), samples) in importers.iter().zip(&samples) {
            let walls: Vec<f64> = samples.iter().map(|(s, _)| s.wall).collect();
            let med = median(&walls);
            let (min, max) = walls.iter().fold((f64::MAX, 0f64), |(lo, hi), &w| (lo.min(w), hi.max(w)));
            let peak = samples.iter().map(|(s, _)| s.peak).max().unwrap_or(0) / MIB;
            // The range of a `--json` field over the runs, in `unit`s; `none` when no run reported it.
            let field = |key: &str, unit: u64, none: &str| {
                let values: Vec<u64> =
                    samples.iter().filter_map(|(_, j)| j.as_ref()?[key].as_u64()).map(|v| v / unit).collect();
                match (values.iter().min(), values.iter().max()) {
                    (Some(lo), Some(hi)) if lo == hi => lo.to_string(),
                    (Some(lo), Some(hi)) => format!("{lo}–{hi}"),
                    _ => none.to_string(),
                }
            };
            let window = field("range_window_bytes", MIB, "—");
            println!(
                "| {name} | {label} | {med:.2} | {min:.2}–{max:.2} | {:.1} | {} | {window} | {peak} | {:.2} |",
                stored as f64 / med / 1e6,
                field("http_connections", 1, "1"),
                curl / med
            );
        }
    }
}
