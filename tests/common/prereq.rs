//! External prerequisites a test cannot provide itself: programs from Debian packages and Rust targets. A test
//! that lacks one prints `SKIP <test>: <what is missing>` and passes, so one missing tool never stops cargo before
//! the test files after it; under `BOUNDIMPORT_REQUIRE_PRIVILEGED=1` (set by `.ci/run`, which installs them all)
//! the same absence fails the test, naming it. Root, memory cgroups and loop devices are `privileged.rs`'s.

use super::privileged::privileged_required;
use std::process::Command;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy)]
pub enum Prereq {
    /// A program on `$PATH`, and the Debian package that has it.
    Tool(&'static str, &'static str),
    /// A Rust target installed with rustup (for static builds).
    RustTarget(&'static str),
}

/// podman, which runs the importer image.
pub const PODMAN: Prereq = Prereq::Tool("podman", "podman");
/// runc, the runtime podman uses here (crun refuses this machine's hybrid cgroup layout).
pub const RUNC: Prereq = Prereq::Tool("runc", "runc");
/// musl-gcc, which compiles the C parts of the static binary.
pub const MUSL_GCC: Prereq = Prereq::Tool("musl-gcc", "musl-tools");
/// Rust's musl target, for the importer image's static binary.
pub const MUSL_TARGET: Prereq = Prereq::RustTarget("x86_64-unknown-linux-musl");
/// What `scripts/build-image` needs for the static binary.
pub const STATIC_BUILD: &[Prereq] = &[MUSL_TARGET, MUSL_GCC];
/// tmux, a real terminal of a chosen width for the progress bar.
pub const TMUX: Prereq = Prereq::Tool("tmux", "tmux");
/// bzip2, to wrap images.
pub const BZIP2: Prereq = Prereq::Tool("bzip2", "bzip2");
/// zip, to wrap images.
pub const ZIP: Prereq = Prereq::Tool("zip", "zip");

impl Prereq {
    /// Why it is not usable here, or `None` when it is.
    pub fn missing(self) -> Option<String> {
        match self {
            Prereq::Tool(name, package) => {
                (!on_path(name)).then(|| format!("{name} not found (apt-get install {package})"))
            }
            Prereq::RustTarget(triple) => (!rust_target_installed(triple))
                .then(|| format!("Rust target {triple} missing (rustup target add {triple})")),
        }
    }
}

/// Whether `name` is an executable file in a `$PATH` directory.
pub fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .any(|dir| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Whether rustup lists `triple` as installed (the check `scripts/build-image` makes).
fn rust_target_installed(triple: &str) -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == triple))
}

/// Whether `test` can run with `needs`: true when all are here. Otherwise prints `SKIP <test>: <missing>` and
/// returns false, or panics naming them when `BOUNDIMPORT_REQUIRE_PRIVILEGED=1`.
pub fn require(test: &str, needs: &[Prereq]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(|need| need.missing()).collect();
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join(", ");
    if privileged_required() {
        panic!("{test}: {reason}, and BOUNDIMPORT_REQUIRE_PRIVILEGED=1 forbids skipping (.ci/run installs it)");
    }
    print_skip(test, &reason);
    false
}

/// Prints `SKIP <test>: <reason>` straight to stderr: the test harness captures `eprintln!` of a passing test, and a
/// skip must be seen.
pub fn print_skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
}
