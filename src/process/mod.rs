//! What the front ends (`cli`, `cdi`, and the servers on top of the engine) share about running as a process:
//! stop signals, the stderr logger, showing progress, and recording the governor's readings. The core library
//! below never installs handlers, prints, or renders.

pub mod logging;
pub mod render;
pub mod timeline;

use crate::error::{Error, ErrorKind};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Raised by SIGINT/SIGTERM: workers finish their current item and the import stops.
static STOP: AtomicBool = AtomicBool::new(false);
/// The signal that raised [`STOP`].
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // A second signal: the user does not want to wait for the flush.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) }
    }
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to the returned flag so an import stops cleanly: current writes finish, what was
/// written is synced, and the log says where it stopped. A second signal exits at once.
pub fn install_stop_handlers() -> &'static AtomicBool {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_stop_signal), SaFlags::SA_RESTART, SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches atomics and calls _exit.
        if let Err(e) = unsafe { sigaction(signal, &action) } {
            log::warn!("cannot install a {signal} handler: {e}");
        }
    }
    &STOP
}

/// The line that reports an import stopped by SIGINT or SIGTERM, or `None` for any other failure: a stop the
/// user asked for is not an error. `written` is the bytes written as data; `resumable` whether resume state was
/// kept for this destination.
pub fn stopped_line(err: &Error, written: u64, resumable: bool) -> Option<String> {
    let signal = STOP_SIGNAL.load(Ordering::SeqCst);
    if err.kind() != ErrorKind::Interrupted || signal <= 0 {
        return None;
    }
    let name =
        nix::sys::signal::Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.to_string());
    let mut line = format!("stopped by {name} after writing {}", crate::size::human(written));
    match (err.offset(), err.path()) {
        (Some(offset), Some(path)) => {
            line += &format!("; everything below offset {offset} ({offset:#x}) of {} is written", path.display())
        }
        (None, Some(path)) => line += &format!("; {}: {}", path.display(), err.operation()),
        _ => {}
    }
    if resumable {
        line += "; run again with `--resume` to continue";
    }
    Some(line)
}

/// The exit code for `err`: 128 + the signal number for an import stopped by a signal, as shells report them.
pub fn exit_code(err: &Error) -> i32 {
    match (err.kind(), STOP_SIGNAL.load(Ordering::SeqCst)) {
        (ErrorKind::Interrupted, signal) if signal > 0 => 128 + signal,
        _ => err.exit_code(),
    }
}
