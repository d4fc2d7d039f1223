//! Showing progress on stderr: an indicatif bar on a terminal, a log line every few seconds elsewhere.

use crate::progress::Progress;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

/// Interval between log lines when not on a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The bar on screen, if any, for [`beside_bar`].
static SHOWN: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Runs `write` (a log line going to stderr) with the bar, if one is drawn, cleared first and drawn again after:
/// a line written over the bar would leave the bar's text on screen in front of it.
pub fn beside_bar(write: impl FnOnce()) {
    let shown = SHOWN.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match shown {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// Columns the bar's line leaves free at the right: indicatif pads the line to the width it is given and keeps
/// the cursor after it, and the terminal echoes a Ctrl-C there as `^C`, which must not wrap.
const RIGHT_MARGIN: u16 = 2;

/// Columns of the bar itself so that the whole line — elapsed time (8), brackets and spaces (4), the bar and
/// [`Progress::bar_status`] (at most [`Progress::BAR_STATUS_MAX`]) — fits in the terminal less the margin.
fn bar_width(columns: u16) -> usize {
    (usize::from(columns.saturating_sub(RIGHT_MARGIN)).saturating_sub(12 + Progress::BAR_STATUS_MAX)).clamp(8, 40)
}

/// Standard error as indicatif's terminal, [`RIGHT_MARGIN`] columns narrower than it is.
#[derive(Debug)]
struct NarrowStderr;

impl NarrowStderr {
    fn emit(&self, text: &str) -> std::io::Result<()> {
        use std::io::Write;
        std::io::stderr().lock().write_all(text.as_bytes())
    }

    /// Moves the cursor `n` cells in ANSI direction `direction` (A up, B down, C right, D left); 0 is no move
    /// (the escape with 0 would move one).
    fn cursor(&self, n: usize, direction: char) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.emit(&format!("\x1b[{n}{direction}"))
    }
}

impl indicatif::TermLike for NarrowStderr {
    fn width(&self) -> u16 {
        terminal_columns().unwrap_or(80).saturating_sub(RIGHT_MARGIN).max(1)
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'A')
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'B')
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'C')
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'D')
    }

    fn write_line(&self, line: &str) -> std::io::Result<()> {
        self.emit(&format!("{line}\n"))
    }

    fn write_str(&self, text: &str) -> std::io::Result<()> {
        self.emit(text)
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.emit("\r\x1b[2K")
    }

    fn flush(&self) -> std::io::Result<()> {
        use std::io::Write;
        std::io::stderr().flush()
    }
}

/// The width of the terminal on stderr, if it is one.
fn terminal_columns() -> Option<u16> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we own; a descriptor that is not a terminal fails.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some(size.ws_col)
}

/// Records `bar` as the one on screen (or none), for [`beside_bar`].
fn show(bar: Option<&indicatif::ProgressBar>) {
    *SHOWN.lock().unwrap_or_else(|p| p.into_inner()) = bar.cloned();
}

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
            // The line stays narrower than the terminal: one that wraps (or ends in the last column, where the
            // terminal's `^C` echo then wraps) cannot be cleared, and its first half stays on screen.
            let target = indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(NarrowStderr), 20);
            let bar = indicatif::ProgressBar::with_draw_target(Some(progress.total()), target);
            let width = bar_width(terminal_columns().unwrap_or(80));
            bar.set_style(
                // Rate, ETA and charge are the counters' own (as in log lines): a resumed import's rate counts
                // from where it resumed, which indicatif's estimate cannot know.
                indicatif::ProgressStyle::with_template(&format!("{{elapsed_precise}} [{{bar:{width}}}] {{msg}}"))
                    .expect("valid progress template")
                    .progress_chars("=> "),
            );
            show(Some(&bar));
            while !progress.wait_finished(Duration::from_millis(200)) {
                bar.set_length(progress.total());
                bar.set_position(progress.processed());
                bar.set_message(progress.bar_status());
            }
            show(None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_line_leaves_the_last_column_free() {
        for columns in [80u16, 100, 132] {
            let line = 8 + 4 + bar_width(columns) + Progress::BAR_STATUS_MAX;
            assert!(line <= usize::from(columns - RIGHT_MARGIN), "{columns} columns: a line of {line}");
        }
        assert_eq!(bar_width(200), 40);
    }
}
