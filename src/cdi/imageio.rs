//! `IMPORTER_SOURCE=imageio`: an oVirt disk through an image transfer, as CDI's imageio data source gets it
//! (engine login, the disk or a checkpoint's snapshot, a download transfer), imported by the engine like any
//! random-access source, then the transfer finalized, or cancelled when the import failed or was stopped.
//!
//! A warm migration's later stage (`IMPORTER_PREVIOUS_CHECKPOINT` and `IMPORTER_CURRENT_CHECKPOINT` both set)
//! downloads the current checkpoint's volume as qcow2, whose backing file must be the previous checkpoint, and
//! the engine writes only what that volume holds onto the volume the earlier stages wrote ([`import::Delta`]),
//! where CDI downloads it to scratch and runs `qemu-img rebase` and `qemu-img commit`.

use super::env::{CdiEnv, ImageioEnv};
use super::termination::TerminationMessage;
use super::{Context, Finish};
use crate::import::{self, Delta, Plan};
use crate::sink::volume::{self as dest, Volume};
use crate::source::imageio::engine::{Engine, TransferFormat};
use crate::source::imageio::{self, TransferUrls};
use crate::source::Location;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A transfer that made no progress for this long gets its ticket extended (CDI: 30 s).
const KEEPALIVE_AFTER: Duration = Duration::from_secs(30);

impl Context<'_> {
    /// Imports the disk (or the checkpoint's snapshot) of `source` onto `volume`, or in a delta stage applies the
    /// checkpoint's snapshot onto it.
    pub(super) fn import_imageio(&self, env: &CdiEnv, volume: &Volume, source: &ImageioEnv) -> Finish {
        // CDI's IsDeltaCopy: both checkpoints set.
        let previous = source.previous_checkpoint.as_deref().filter(|_| source.current_checkpoint.is_some());
        let http = match super::connect::http_options(&self.args.proxy_cert_dir, &self.args.extra_headers_dir, env) {
            Ok(http) => http,
            Err(message) => return Finish::Failure(message),
        };
        let engine = match Engine::connect(&source.endpoint, &source.user, &source.password, &http) {
            Ok(engine) => engine,
            Err(e) => return Finish::Failure(format!("Error creating connection: {e}")),
        };
        let disk = match engine.disk(&source.disk_id) {
            Ok(disk) => disk,
            Err(e) => return Finish::Failure(format!("error fetching disk {}: {e}", source.disk_id)),
        };
        let snapshot = match &source.current_checkpoint {
            None => None,
            Some(checkpoint) => match engine.snapshot(&disk, checkpoint) {
                Ok(snapshot) => Some(snapshot),
                // A checkpoint naming the disk's active volume copies the disk itself, as in CDI.
                Err(_) if disk.image_id.as_deref() == Some(checkpoint.as_str()) => {
                    log::info!("Snapshot ID {checkpoint} found on disk {}, transferring active disk", disk.id);
                    None
                }
                Err(e) => return Finish::Failure(format!("snapshot {checkpoint} not found: {e}")),
            },
        };
        // A full copy reads the guest's bytes; a delta the checkpoint's volume itself, as qcow2 (CDI's choice).
        let format = match previous {
            Some(_) => TransferFormat::Cow,
            None => TransferFormat::Raw,
        };
        let transfer = match engine.start_download(&disk, snapshot.as_ref(), format) {
            Ok(transfer) => transfer,
            Err(e) => return Finish::Failure(e.to_string()),
        };
        log::info!("image transfer {} is transferring", transfer.id);
        let urls = TransferUrls { transfer_url: transfer.transfer_url.clone(), proxy_url: transfer.proxy_url.clone() };
        let done = AtomicBool::new(false);
        let finish = std::thread::scope(|scope| {
            scope.spawn(|| self.keep_alive(&engine, &transfer.id, &urls, &http, &done));
            let location = Location::Imageio(urls.clone());
            let finish = match previous {
                Some(previous) => self.apply_delta(env, volume, location, http.clone(), previous),
                None => self.import_image(env, volume, location, None),
            };
            done.store(true, Ordering::SeqCst);
            finish
        });
        engine.finish(&transfer.id, matches!(finish, Finish::Success(_)));
        finish
    }

    /// Writes the qcow2 at `location`, whose backing file must be the `previous` checkpoint, onto the image the
    /// earlier stages left on `volume`: only the clusters it holds. A failure leaves the volume as it is, mid-update
    /// (the stage is retried by a new pod, and the same delta applied again completes it).
    fn apply_delta(
        &self,
        env: &CdiEnv,
        volume: &Volume,
        location: Location,
        http: crate::source::HttpOptions,
        previous: &str,
    ) -> Finish {
        let expected = previous.to_string();
        let accept_backing = move |name: &str| {
            let found = go_base(name);
            match found == expected {
                true => Ok(()),
                false => Err(format!(
                    "snapshot backing file '{found}' does not match expected checkpoint '{expected}', unable to \
                     safely rebase snapshot"
                )),
            }
        };
        let plan = Plan {
            http,
            output_digest: false,
            file_mode: dest::FILE_MODE,
            preallocate: env.preallocation,
            delta: Some(Delta { accept_backing: Arc::new(accept_backing) }),
            ..Plan::new(location, volume.image_path())
        };
        match import::run_in(self.engine, &plan, self.progress, self.stop) {
            Ok(outcome) => {
                log::info!(
                    "applied a {} delta of {} bytes: {} bytes written, {} zeroed, {:.2}s",
                    outcome.format,
                    outcome.virtual_size,
                    outcome.bytes_written,
                    outcome.zero_bytes_zeroed,
                    outcome.seconds
                );
                Finish::Success(TerminationMessage::import_complete(env.preallocation))
            }
            Err(e) => Finish::Failure(format!("Unable to process data: {e}")),
        }
    }

    /// Until `done`: whenever no data reached the volume for [`KEEPALIVE_AFTER`], extends the transfer's ticket and
    /// reads a few bytes, so neither the engine nor the daemon sees it idle. Data, not progress: while the volume
    /// zeroes a long zero run the import moves on but the daemon serves nothing, and the engine pauses a transfer
    /// idle past its inactivity timeout (CDI counts zero extents as progress, and is paused there).
    fn keep_alive(
        &self,
        engine: &Engine,
        id: &str,
        urls: &TransferUrls,
        http: &crate::source::HttpOptions,
        done: &AtomicBool,
    ) {
        let mut seen = self.progress.written();
        let mut since = Instant::now();
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.progress.written();
            if now != seen {
                (seen, since) = (now, Instant::now());
                continue;
            }
            if since.elapsed() >= KEEPALIVE_AFTER {
                log::info!("No data in the last {KEEPALIVE_AFTER:?}, attempting ticket renewal to avoid timeout");
                if let Err(e) = engine.extend(id).and_then(|()| imageio::touch(urls, http)) {
                    log::info!("Error renewing ticket: {e}");
                }
                since = Instant::now();
            }
        }
    }
}

/// The last element of `path`, as Go's `filepath.Base` gives it (CDI compares that with the checkpoint): `.` for
/// an empty path, `/` for slashes only.
fn go_base(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    match (path.is_empty(), trimmed.is_empty()) {
        (true, _) => ".",
        (false, true) => "/",
        _ => trimmed.rsplit('/').next().unwrap_or(trimmed),
    }
}

#[cfg(test)]
mod tests {
    use super::go_base;

    #[test]
    fn backing_names_reduce_to_their_base_as_in_go() {
        let cases = [("", "."), ("/", "/"), ("s1", "s1"), ("../img/s1", "s1"), ("/rhev/data/img/s1/", "s1")];
        for (path, base) in cases {
            assert_eq!(go_base(path), base, "{path:?}");
        }
    }
}
