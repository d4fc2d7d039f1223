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

/// What a second stop signal leaves on stderr: the process ends at once, so no stop line follows.
const STOPPED_AT_ONCE: &[u8] = b"\nstopped at once by a second signal: writes not yet synced may be lost, and the \
destination holds an incomplete image\n";

extern "C" fn on_stop_signal(signal: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // A second signal: the user does not want to wait for the flush. One line says what that leaves.
        // SAFETY: write(2) and _exit are async-signal-safe; the buffer is static.
        unsafe {
            libc::write(libc::STDERR_FILENO, STOPPED_AT_ONCE.as_ptr().cast(), STOPPED_AT_ONCE.len());
            libc::_exit(128 + signal)
        }
    }
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to the returned flag so an import stops cleanly: current writes finish, what was
/// written is synced, and the log says where it stopped. A second signal exits at once.
pub fn install_stop_handlers() -> &'static AtomicBool {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_stop_signal), SaFlags::SA_RESTART, SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches atomics, writes a static line and calls _exit.
        if let Err(e) = unsafe { sigaction(signal, &action) } {
            log::warn!("cannot install a {signal} handler: {e}");
        }
    }
    &STOP
}

/// The flag [`install_stop_handlers`] raises, for what must notice a stop without being handed the engine's (the
/// HTTP client's waits, through `HttpOptions::stop`).
pub fn stop_flag() -> &'static AtomicBool {
    &STOP
}

/// The line that reports an import stopped by SIGINT or SIGTERM, or `None` for any other failure: a stop the
/// user asked for is not an error. `written` is the bytes written as data; `resumable` whether resume state was
/// kept for this destination.
pub fn stopped_line(err: &Error, written: u64, resumable: bool) -> Option<String> {
    let (name, _) = stopped_by().filter(|_| err.kind() == ErrorKind::Interrupted)?;
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
    match stopped_by() {
        Some((_, code)) if err.kind() == ErrorKind::Interrupted => code,
        _ => err.exit_code(),
    }
}

/// The stop signal received, if any: its name and the exit code it calls for (128 + its number).
pub fn stopped_by() -> Option<(String, i32)> {
    let signal = STOP_SIGNAL.load(Ordering::SeqCst);
    (signal > 0).then(|| {
        let name =
            nix::sys::signal::Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.to_string());
        (name, 128 + signal)
    })
}
