//! A minimal stderr logger for the `log` facade: one line per record. On the command line each line is prefixed
//! with the program name; in CDI's pods (`cdi`, `upload-server`) each line carries klog's header instead, so
//! cluster log tooling reads boundimport's lines as it reads CDI's.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Whether lines carry klog's header (set by [`init_klog`]).
static KLOG: AtomicBool = AtomicBool::new(false);

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
        if KLOG.load(Ordering::Relaxed) {
            let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let file = record.file().map(|f| f.rsplit('/').next().unwrap_or(f)).unwrap_or(record.target());
            let header = klog_header(record.level(), since_epoch, std::process::id(), file, record.line());
            eprintln!("{header}{message}");
            return;
        }
        super::render::beside_bar(|| match record.level() {
            Level::Error => eprintln!("boundimport: error: {message}"),
            Level::Warn => eprintln!("boundimport: warning: {message}"),
            _ => eprintln!("boundimport: {message}"),
        });
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger with klog's line header (the levels as in [`init`]).
pub fn init_klog(verbosity: u8) {
    KLOG.store(true, Ordering::Relaxed);
    init(verbosity, false);
}

/// klog's header, `Lmmdd hh:mm:ss.uuuuuu PID file:line] ` (klog's `FormatHeader`): the severity letter (debug and
/// trace are klog's V-levels, so `I`), the UTC date and time to the microsecond, the process id right-aligned in 7
/// columns, the source file's base name and line.
fn klog_header(level: Level, since_epoch: std::time::Duration, pid: u32, file: &str, line: Option<u32>) -> String {
    let letter = match level {
        Level::Error => 'E',
        Level::Warn => 'W',
        _ => 'I',
    };
    let seconds = since_epoch.as_secs();
    let (_, month, day) = civil_from_days((seconds / 86_400) as i64);
    let in_day = seconds % 86_400;
    format!(
        "{letter}{month:02}{day:02} {:02}:{:02}:{:02}.{:06} {pid:>7} {file}:{}] ",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60,
        since_epoch.subsec_micros(),
        line.unwrap_or(0)
    )
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn klog_header_has_klogs_columns() {
        // 2026-12-01 07:38:54.123456 UTC = 1 796 110 734 s after the epoch (date -ud @1796110734).
        let at = Duration::new(1_796_110_734, 123_456_789);
        assert_eq!(klog_header(Level::Info, at, 7, "mod.rs", Some(12)), "I1201 07:38:54.123456       7 mod.rs:12] ");
        assert!(
            klog_header(Level::Error, at, 1234567, "a.rs", None).starts_with("E1201 07:38:54.123456 1234567 a.rs:0] ")
        );
        assert!(klog_header(Level::Warn, Duration::ZERO, 1, "b.rs", Some(1)).starts_with("W0101 00:00:00.000000 "));
        assert!(klog_header(Level::Trace, at, 1, "b.rs", Some(1)).starts_with('I'));
    }

    #[test]
    fn days_become_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2000-02-29 and 2100-03-01 (2100 is not a leap year): 11 016 and 47 541 days after the epoch.
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
    }
}
