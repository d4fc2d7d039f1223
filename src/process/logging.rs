//! A minimal stderr logger for the `log` facade: one line per record, prefixed with the program name, so
//! messages read the same in a terminal, a CI log and a pod log.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // TLS library chatter (handshake details) only at trace level.
        let floor = if metadata.target().starts_with("rustls") && log::max_level() < LevelFilter::Trace {
            Level::Warn
        } else {
            Level::Trace
        };
        metadata.level() <= log::max_level() && metadata.level() <= floor
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        // Keep every record on one line, whatever the message holds.
        let message = message.replace('\n', " ");
        match record.level() {
            Level::Error => eprintln!("boundimport: error: {message}"),
            Level::Warn => eprintln!("boundimport: warning: {message}"),
            _ => eprintln!("boundimport: {message}"),
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger: `verbosity` 0 shows warnings and info, 1 adds debug, 2 and more add trace; `quiet` keeps
/// only warnings and errors.
pub fn init(verbosity: u8, quiet: bool) {
    let level = match (quiet, verbosity) {
        (true, _) => LevelFilter::Warn,
        (false, 0) => LevelFilter::Info,
        (false, 1) => LevelFilter::Debug,
        (false, _) => LevelFilter::Trace,
    };
    // A second init (tests, embedding) keeps the first logger and only changes the level.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
