//! The convention for tests that need root, a memory cgroup or a loop device: without them the test prints why
//! it skips and passes — unless `BOUNDIMPORT_REQUIRE_PRIVILEGED=1` (set by `.ci/run`), where a missing capability
//! fails the test instead.

use boundimport::cgroup::MemCgroup;

/// Whether missing privileges must fail tests rather than skip them.
pub fn privileged_required() -> bool {
    std::env::var("BOUNDIMPORT_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
}

/// Whether `test` can run its privileged part: root, a memory cgroup hierarchy, and loop devices. Prints a skip
/// line and returns false when it cannot; panics instead when privileges are required.
pub fn require_privileged(test: &str) -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if !matches!(MemCgroup::own(), Ok(Some(_))) {
        Some("no memory cgroup hierarchy")
    } else if !std::path::Path::new("/dev/loop-control").exists() {
        Some("no loop devices (/dev/loop-control)")
    } else {
        None
    };
    match missing {
        None => true,
        Some(reason) if privileged_required() => {
            panic!("{test}: {reason}, and BOUNDIMPORT_REQUIRE_PRIVILEGED=1 forbids skipping")
        }
        Some(reason) => {
            super::prereq::print_skip(test, reason);
            false
        }
    }
}
