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
        // "… 12.0 MiB of 48.0 MiB, 4.00 MiB/s, eta 0:09, cgroup charge 21.3 MiB / 572 MiB"
        let charge = line.split(", cgroup charge ").nth(1).unwrap_or_else(|| panic!("no charge in {line:?}"));
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

/// In a cgroup shared with other work the cgroup's peak is mostly theirs: `--json` gives the import's own share
/// (`import_peak_share`) apart from the whole cgroup's peak (`cgroup_peak`, also under the old name
/// `cgroup_peak_charge`) and what the cgroup held as the import began; the closing log line names both.
#[test]
fn in_a_shared_cgroup_the_summary_tells_the_import_s_share_from_the_cgroup_s_peak() {
    if !require_privileged("in_a_shared_cgroup_the_summary_tells_the_import_s_share_from_the_cgroup_s_peak") {
        return;
    }
    const CO_TENANT: u64 = 160 * MIB;
    let bench = Workbench::new("summary-shared");
    let image = bench.qcow2_mix("disk.qcow2", 32 * MIB, "", &[]);
    let cgroup = ChildCgroup::create(&format!("summary-shared-{}", std::process::id()), 600_000_000).unwrap();
    // A co-tenant holding 160 MiB of anonymous memory for the whole import.
    let mut perl = std::process::Command::new("perl");
    perl.arg("-e").arg(format!(r#"$| = 1; my $a = "x" x {CO_TENANT}; print "ready\n"; sleep 120"#));
    let mut co_tenant = cgroup.spawn(perl.stdout(std::process::Stdio::piped())).unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(co_tenant.stdout.take().unwrap()), &mut ready).unwrap();
    assert_eq!(ready, "ready\n");
    let _co_tenant = Reap(co_tenant);

    let mut cmd = boundimport();
    cmd.args(["--json", "--io", "direct"]).arg(&image).arg(bench.path("out.raw"));
    let output = run_in(&cgroup, &mut cmd);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let memory = &summary["memory"];
    let field = |name: &str| memory[name].as_u64().unwrap_or_else(|| panic!("no {name} in {memory}"));
    let (share, peak, at_start) = (field("import_peak_share"), field("cgroup_peak"), field("cgroup_charge_at_start"));
    assert_eq!(field("cgroup_peak_charge"), peak, "the old name is the cgroup's peak: {memory}");
    assert!(at_start >= CO_TENANT && peak >= at_start, "{memory}");
    assert!(share > MIB && share < CO_TENANT / 2 && share >= field("process_peak_rss"), "{memory}");
    let line = stderr(&output).lines().find(|l| l.contains("memory: the import's own peak")).map(str::to_string);
    let line = line.unwrap_or_else(|| panic!("no memory line in {}", stderr(&output)));
    assert!(line.contains("its cgroup's peak") && line.contains("everything in the cgroup"), "{line}");
}

/// `-` as DEST is refused as a usage error (exit 2, one line) instead of creating a file named `-`.
#[test]
fn a_dash_as_dest_is_a_usage_error_and_creates_nothing() {
    let bench = Workbench::new("dash-dest");
    let image = bench.raw_mix("disk.raw", MIB, 1);
    let output = run_any(boundimport().current_dir(bench.dir.path()).arg(&image).arg("-"));
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");
    assert!(text.contains("DEST '-'") && text.contains("standard output"), "{text}");
    assert!(!bench.path("-").exists(), "a file named '-' was created");
}

/// `--help` names every kind of SOURCE and every wrapper the import reads.
#[test]
fn help_names_every_source_and_wrapper() {
    let output = run_any(boundimport().arg("--help"));
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{help}");
    for word in
        ["http://", "https://", "docker://", "oci-archive:", "gzip", "xz", "zstd", "bzip2", "zip", "vhdx", "vdi"]
    {
        assert!(help.contains(word), "--help does not mention {word}:\n{help}");
    }
}

/// A budget below the minimum says so in one line without brackets inside brackets.
#[test]
fn a_budget_too_small_reads_without_nested_brackets() {
    let bench = Workbench::new("small-limit");
    let image = bench.raw_mix("disk.raw", MIB, 2);
    let output = run_any(boundimport().args(["--limit", "16Mi"]).arg(&image).arg(bench.path("out.raw")));
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("16.00 MiB (--limit)") && text.contains("32.00 MiB"), "{text}");
    let mut depth = 0i32;
    for c in text.chars() {
        depth += match c {
            '(' => 1,
            ')' => -1,
            _ => 0,
        };
        assert!((0..=1).contains(&depth), "nested brackets in {text:?}");
    }
}

/// A tmux session of its own (its own server socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` (run by bash) in a detached 80×24 terminal.
    fn start(label: &str, command: &str) -> Tmux {
        let tmux = Tmux { socket: format!("boundimport-{label}-{}", std::process::id()) };
        common::run(std::process::Command::new("tmux").args([
            "-L",
            &tmux.socket,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "80",
            "-y",
            "24",
            command,
        ]));
        tmux
    }

    /// The screen, wrapped lines joined back into one (so a line wider than 80 columns shows its real width).
    fn screen(&self) -> Vec<String> {
        let output =
            common::run(std::process::Command::new("tmux").args(["-L", &self.socket, "capture-pane", "-p", "-J"]));
        String::from_utf8_lossy(&output.stdout).lines().map(|l| l.trim_end().to_string()).collect()
    }

    fn send(&self, keys: &str) {
        common::run(std::process::Command::new("tmux").args(["-L", &self.socket, "send-keys", keys]));
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}

/// The progress bar in a real 80-column terminal (tmux): every line it draws fits without wrapping, and after a
/// Ctrl-C nothing of it is left on screen.
#[test]
fn the_progress_bar_fits_80_columns_and_leaves_no_remnant_on_ctrl_c() {
    use common::prereq::{require, TMUX};
    if !require("the_progress_bar_fits_80_columns_and_leaves_no_remnant_on_ctrl_c", &[TMUX]) {
        return;
    }
    let bench = Workbench::new("bar-80");
    bench.raw_mix("disk.raw", 24 * MIB, 3);
    // 24 MiB at 3 MB/s: about 8 s of bar.
    let server = TestServer::start(bench.dir.path(), ServerOptions { rate: Some(3_000_000), ..Default::default() });
    let command = format!(
        "trap true INT; {} --progress bar {} {}; echo EXIT=$?; sleep 60",
        env!("CARGO_BIN_EXE_boundimport"),
        server.url("disk.raw"),
        bench.path("out.raw").display()
    );
    let tmux = Tmux::start("bar", &command);
    let is_bar = |line: &str| line.contains("] ") && line.contains("/s");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut bars = Vec::new();
    while bars.len() < 5 {
        assert!(std::time::Instant::now() < deadline, "no progress bar drawn: {:?}", tmux.screen());
        let drawn: Vec<String> = tmux.screen().into_iter().filter(|l| is_bar(l)).collect();
        for line in &drawn {
            assert!(line.chars().count() <= 80, "a bar of {} columns wraps: {line:?}", line.chars().count());
        }
        bars.extend(drawn);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    tmux.send("C-c");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let screen = loop {
        let screen = tmux.screen();
        if screen.iter().any(|l| l.starts_with("EXIT=")) {
            break screen;
        }
        assert!(std::time::Instant::now() < deadline, "no exit after Ctrl-C: {screen:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(screen.iter().any(|l| l == "EXIT=130"), "stopped by the signal: {screen:?}");
    let remnant: Vec<&String> = screen.iter().filter(|l| is_bar(l) || l.contains("[=") || l.contains("==>")).collect();
    assert!(remnant.is_empty(), "bar left on screen after Ctrl-C: {remnant:?}\nscreen: {screen:?}\nbars: {bars:?}");
}
