//! What a user reads while an import runs and after it: a file with no image header says it is imported as raw;
//! progress lines show rate, time left and the cgroup's charge against the budget (also when a bar was asked for
//! off a terminal); the `--json` summary shows the cgroup's peak charge and the import's own share in every I/O
//! mode.

mod common;

use boundimport::lab::fixtures::ChildCgroup;
use common::http::{ServerOptions, TestServer};
use common::privileged::require_privileged;
use common::{boundimport, run_any, Workbench, MIB};
use std::process::Output;

/// Runs `cmd` in `cgroup` to its end, its output collected.
fn run_in(cgroup: &ChildCgroup, cmd: &mut std::process::Command) -> Output {
    let piped = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    cgroup.spawn(piped).unwrap().wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_file_with_no_image_header_says_it_is_imported_as_raw() {
    let bench = Workbench::new("headerless");
    let text = bench.path("notes.txt");
    std::fs::write(&text, "this is not a disk\n").unwrap();
    let empty = bench.path("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let gz = bench.path("notes.txt.gz");
    common::run(std::process::Command::new("sh").arg("-c").arg(format!(
        "gzip -c '{}' > '{}'",
        text.display(),
        gz.display()
    )));
    for source in [&text, &empty, &gz] {
        let len = if source == &empty { 0 } else { 19 };
        let output = run_any(boundimport().arg(source).arg(bench.path("out.raw")));
        let log = stderr(&output);
        assert!(output.status.success(), "{log}");
        let line = format!("{}: no image header found: importing as raw, {len} bytes", source.display());
        assert!(log.contains(&line), "{} wants {line:?}: {log}", source.display());
        // The disk is what qemu-img makes of the same bytes (whole sectors).
        let (digest, want) = common::qemu_reference(if source == &gz { &text } else { source }, bench.dir.path());
        assert_eq!(std::fs::metadata(bench.path("out.raw")).unwrap().len(), want, "{log}");
        assert_eq!(common::sha256_prefix(&bench.path("out.raw"), want), digest, "{log}");
    }
    // An image is not called headerless.
    let qcow2 = bench.qcow2_mix("disk.qcow2", 4 * MIB, "", &[]);
    let log = stderr(&run_any(boundimport().arg(&qcow2).arg(bench.path("out.raw"))));
    assert!(!log.contains("no image header"), "{log}");
}

#[test]
fn progress_lines_show_rate_eta_and_the_charge_against_the_budget() {
    if !require_privileged("progress_lines_show_rate_eta_and_the_charge_against_the_budget") {
        return;
    }
    let bench = Workbench::new("progress-lines");
    bench.qcow2_mix("disk.qcow2", 48 * MIB, "", &[]);
    // 36 MiB stored, about 12 s at 3 MiB/s: two log lines at least, five seconds apart.
    let server = TestServer::start(bench.dir.path(), ServerOptions { rate: Some(3 << 20), ..Default::default() });
    let cgroup = ChildCgroup::create(&format!("progress-lines-{}", std::process::id()), 600_000_000).unwrap();
    // `--progress bar` with stderr a pipe: the bar's content comes out as log lines.
    let mut cmd = boundimport();
    cmd.args(["--progress", "bar"]).arg(server.url("disk.qcow2")).arg(bench.path("out.raw"));
    let output = run_in(&cgroup, &mut cmd);
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("% ") && l.contains("/s")).collect();
    assert!(lines.len() >= 2, "no progress lines: {log}");
    for line in &lines {
        // "… 12.0 MiB of 48.0 MiB, 4.00 MiB/s, eta 0:09, charge 21.3 MiB / 572 MiB"
        let charge = line.split(", charge ").nth(1).unwrap_or_else(|| panic!("no charge in {line:?}"));
        let (now, budget) = charge.split_once(" / ").unwrap_or_else(|| panic!("no budget in {line:?}"));
        assert!(now.ends_with("MiB") || now.ends_with("KiB"), "{line}");
        assert_eq!(budget, "572.20 MiB", "{line}");
    }
    assert!(lines.iter().any(|l| l.contains(", eta ")), "no ETA in {lines:?}");
}

#[test]
fn the_summary_shows_peak_charge_and_own_share_in_every_io_mode() {
    if !require_privileged("the_summary_shows_peak_charge_and_own_share_in_every_io_mode") {
        return;
    }
    let bench = Workbench::new("summary-memory");
    let image = bench.qcow2_mix("disk.qcow2", 64 * MIB, "", &[]);
    let cgroup = ChildCgroup::create(&format!("summary-memory-{}", std::process::id()), 600_000_000).unwrap();
    for io in ["direct", "writebehind"] {
        let mut cmd = boundimport();
        cmd.args(["--json", "--io", io]).arg(&image).arg(bench.path("out.raw"));
        let output = run_in(&cgroup, &mut cmd);
        assert!(output.status.success(), "{io}: {}", stderr(&output));
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let memory = &summary["memory"];
        let peak = memory["cgroup_peak_charge"].as_u64().unwrap_or_else(|| panic!("{io}: {memory}"));
        let rss = memory["process_peak_rss"].as_u64().unwrap();
        // The cgroup's own peak counter bounds the sampled peak from above (it saw every page).
        let kernel_peak = cgroup.reader().peak().unwrap().unwrap();
        assert!(peak > MIB && peak <= kernel_peak, "{io}: sampled {peak}, kernel {kernel_peak}");
        assert!(rss > MIB && rss < 600_000_000, "{io}: {memory}");
        eprintln!("{io}: peak charge {} MiB, own share (peak RSS) {} MiB", peak / MIB, rss / MIB);
    }
}
