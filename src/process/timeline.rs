//! `--governor-log CSV`: every reading of the write-behind governor, one line each, for plotting and debugging.

use crate::cgroup::governor::{Decision, Observer, ObserverFactory, OwnBytes, Targets};
use crate::cgroup::MemStat;
use crate::error::{IoContext, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Writes readings to a CSV file.
struct CsvTimeline(BufWriter<File>);

impl Observer for CsvTimeline {
    fn reading(
        &mut self,
        elapsed: Duration,
        stat: &MemStat,
        own: OwnBytes,
        targets: Targets,
        decision: Decision,
    ) -> std::io::Result<()> {
        writeln!(
            self.0,
            "{},{},{},{},{},{},{},{decision:?}",
            elapsed.as_millis(),
            stat.usage,
            stat.dirty,
            stat.writeback,
            own.inflight,
            own.cached.map_or(String::new(), |c| c.to_string()),
            targets.dirty_writeback,
        )
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn create(path: &Path) -> Result<Box<dyn Observer>> {
    let file = File::create(path).io_context("creating governor timeline").map_err(|e| e.at_path(path))?;
    let mut w = BufWriter::new(file);
    writeln!(w, "elapsed_ms,usage,dirty,writeback,own_inflight,own_cached,target,decision")
        .io_context("writing governor timeline")
        .map_err(|e| e.at_path(path))?;
    Ok(Box::new(CsvTimeline(w)))
}

/// An observer factory that records to `path` (each governor starts the file anew).
pub fn csv(path: PathBuf) -> ObserverFactory {
    ObserverFactory(Arc::new(move || create(&path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reading_is_a_line() {
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut observer = (csv(out.path().to_path_buf()).0)().unwrap();
        let stat = MemStat { usage: 10, dirty: 1, writeback: 2, ..MemStat::default() };
        let targets = Targets { dirty_writeback: 32, usage_ceiling: None };
        observer.reading(Duration::from_millis(7), &stat, OwnBytes::default(), targets, Decision::Proceed).unwrap();
        observer.finish().unwrap();
        let text = std::fs::read_to_string(out.path()).unwrap();
        assert_eq!(text.lines().nth(1), Some("7,10,1,2,0,,32,Proceed"), "{text}");
    }
}
