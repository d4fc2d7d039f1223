//! Showing progress on stderr: an indicatif bar on a terminal, a log line every few seconds elsewhere.

use crate::progress::Progress;
use std::io::IsTerminal;
use std::time::Duration;

/// Interval between log lines when not on a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// How progress is shown (`--progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressStyle {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    /// Always a bar.
    Bar,
    /// Log lines every few seconds.
    Log,
    /// Nothing.
    None,
}

/// Shows `progress` in `style` until [`Progress::finish`] is called. Run it on its own thread.
pub fn report(progress: &Progress, style: ProgressStyle) {
    let style = match style {
        // Off a terminal a bar draws nothing: its content goes out as log lines instead.
        ProgressStyle::Auto | ProgressStyle::Bar if std::io::stderr().is_terminal() => ProgressStyle::Bar,
        ProgressStyle::Auto | ProgressStyle::Bar => ProgressStyle::Log,
        other => other,
    };
    match style {
        ProgressStyle::Bar => {
            // No bar until there is something to measure (an empty bar would stay on screen for a resumed or
            // failed import).
            while progress.total() == 0 && progress.percent() == 0.0 {
                if progress.wait_finished(Duration::from_millis(100)) {
                    return;
                }
            }
            let bar = indicatif::ProgressBar::new(progress.total());
            bar.set_style(
                // Rate, ETA and charge are the counters' own (as in log lines): a resumed import's rate counts
                // from where it resumed, which indicatif's estimate cannot know.
                indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {bytes}/{total_bytes} {msg}")
                    .expect("valid progress template")
                    .progress_chars("=> "),
            );
            while !progress.wait_finished(Duration::from_millis(200)) {
                bar.set_length(progress.total());
                bar.set_position(progress.processed());
                bar.set_message(progress.status());
            }
            bar.set_position(progress.processed());
            bar.finish_and_clear();
        }
        ProgressStyle::Log => {
            while !progress.wait_finished(LOG_INTERVAL) {
                log::info!("{}", progress.log_line());
            }
        }
        ProgressStyle::None | ProgressStyle::Auto => while !progress.wait_finished(Duration::from_secs(3600)) {},
    }
}
