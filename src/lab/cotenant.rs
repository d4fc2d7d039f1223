//! The co-tenant probe: another process in the importer's memory cgroup that every interval maps, touches and
//! unmaps a block of anonymous memory, timing each round. Its latency is the stall a CDI pod's other processes
//! feel while the importer fills (or does not fill) the cgroup with page cache.
//!
//! The probe runs as its own process (`boundimport lab cotenant`, spawned into the cgroup) so that its charges
//! and its reclaim stalls are those of a real neighbour, not of a thread of the harness. It reports one line per
//! allocation on stdout; [`Cotenant`] reads them on the harness side.

use super::fixtures::ChildCgroup;
use super::ticker::Ticker;
use crate::error::{Error, ErrorKind, IoContext, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First line the probe prints, once its first allocation is done and it is warm.
const READY: &str = "ready";

/// How long the harness waits for the probe to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The probe's main loop (the `lab cotenant` subcommand): allocate and touch `bytes` every `interval`, print each
/// round's latency in microseconds. Returns when stdout is closed (the harness went away).
pub fn probe(bytes: u64, interval: Duration) -> Result<()> {
    let len = usize::try_from(bytes).map_err(|_| Error::usage("co-tenant size too large"))?;
    if len == 0 {
        return Err(Error::usage("co-tenant size must be positive"));
    }
    let mut out = std::io::stdout().lock();
    let mut ready = false;
    let mut ticker = Ticker::new(interval);
    loop {
        let latency = touch_block(len)?;
        let line = if ready {
            format!("{}\n", latency.as_micros())
        } else {
            ready = true;
            format!("{READY}\n")
        };
        if out.write_all(line.as_bytes()).and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        ticker.wait();
    }
}

/// Maps `len` bytes of anonymous memory, writes one byte per page (each write faults in and charges a page),
/// unmaps it, and returns how long that took.
fn touch_block(len: usize) -> Result<Duration> {
    let page = crate::sys::page_size() as usize;
    let started = Instant::now();
    let base = crate::sys::map_anonymous(len).map_err(|err| Error::io("mapping co-tenant memory", err))?.as_ptr();
    for offset in (0..len).step_by(page) {
        // SAFETY: offset < len, inside the mapping made above; volatile so the touch is not optimised away.
        unsafe { base.add(offset).write_volatile(1) };
    }
    let latency = started.elapsed();
    // SAFETY: unmaps exactly the mapping made above; nothing refers to it any more.
    if unsafe { libc::munmap(base.cast(), len) } != 0 {
        return Err(Error::io("unmapping co-tenant memory", std::io::Error::last_os_error()));
    }
    Ok(latency)
}

/// One allocation round of the probe, as the harness received it.
#[derive(Debug, Clone, Copy)]
pub struct Stall {
    /// When the round's report arrived (the round ended just before).
    pub at: Instant,
    /// How long mapping and touching the block took.
    pub latency: Duration,
}

/// A running probe process inside a cgroup, killed on drop.
pub struct Cotenant {
    child: Child,
    reader: Option<JoinHandle<()>>,
    stalls: Arc<Mutex<Vec<Stall>>>,
}

impl Cotenant {
    /// Starts `exe lab cotenant` inside `cgroup` and waits until its first round is done. `stop` aborts the wait.
    pub fn start(
        cgroup: &ChildCgroup,
        exe: &Path,
        bytes: u64,
        interval: Duration,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Self> {
        let mut command = Command::new(exe);
        command
            .args(["lab", "cotenant", "--bytes"])
            .arg(bytes.to_string())
            .arg("--interval-ms")
            .arg(interval.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Its own process group: a Ctrl-C on the terminal reaches the harness, which then stops the probe.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = cgroup.spawn(&mut command)?;
        let stdout = child.stdout.take().ok_or_else(|| Error::new(ErrorKind::Io, "co-tenant has no stdout pipe"))?;
        let stalls = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = stalls.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if line == READY {
                    let _ = ready_tx.send(());
                } else if let Ok(micros) = line.trim().parse::<u64>() {
                    let stall = Stall { at, latency: Duration::from_micros(micros) };
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(stall);
                }
            }
        });
        let mut cotenant = Cotenant { child, reader: Some(reader), stalls };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return Ok(cotenant),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = cotenant.child.wait().io_context("waiting for co-tenant")?;
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("co-tenant probe exited before its first round ({status})"),
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Interrupted, "interrupted"));
            }
            if Instant::now() > deadline {
                return Err(Error::new(ErrorKind::Io, "co-tenant probe did not finish its first round in time"));
            }
        }
    }

    /// Kills the probe and returns every round it reported.
    pub fn stop(mut self) -> Vec<Stall> {
        self.kill();
        std::mem::take(&mut *self.stalls.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Cotenant {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_a_block_takes_measurable_time() {
        let latency = touch_block(4 << 20).unwrap();
        assert!(latency > Duration::ZERO);
    }
}
