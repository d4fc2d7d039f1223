//! `IMPORTER_SOURCE=imageio`: an oVirt disk through an image transfer, as CDI's imageio data source gets it
//! (engine login, the disk or a checkpoint's snapshot, a download transfer), imported by the engine like any
//! random-access source, then the transfer finalized, or cancelled when the import failed or was stopped.

use super::env::{CdiEnv, ImageioEnv};
use super::{Context, Finish};
use crate::sink::volume::Volume;
use crate::source::imageio::engine::{Engine, TransferFormat};
use crate::source::imageio::{self, TransferUrls};
use crate::source::Location;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A transfer that made no progress for this long gets its ticket extended (CDI: 30 s).
const KEEPALIVE_AFTER: Duration = Duration::from_secs(30);

impl Context<'_> {
    /// Imports the disk (or the checkpoint's snapshot) of `source` onto `volume`.
    pub(super) fn import_imageio(&self, env: &CdiEnv, volume: &Volume, source: &ImageioEnv) -> Finish {
        if source.previous_checkpoint.is_some() && source.current_checkpoint.is_some() {
            return Finish::Failure(
                "Unable to process data: warm-migration delta stages (IMPORTER_PREVIOUS_CHECKPOINT) are not \
                 supported by boundimport yet"
                    .into(),
            );
        }
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
        let transfer = match engine.start_download(&disk, snapshot.as_ref(), TransferFormat::Raw) {
            Ok(transfer) => transfer,
            Err(e) => return Finish::Failure(e.to_string()),
        };
        log::info!("image transfer {} is transferring", transfer.id);
        let urls = TransferUrls { transfer_url: transfer.transfer_url.clone(), proxy_url: transfer.proxy_url.clone() };
        let done = AtomicBool::new(false);
        let finish = std::thread::scope(|scope| {
            scope.spawn(|| self.keep_alive(&engine, &transfer.id, &urls, &http, &done));
            let finish = self.import_image(env, volume, Location::Imageio(urls.clone()), None);
            done.store(true, Ordering::SeqCst);
            finish
        });
        engine.finish(&transfer.id, matches!(finish, Finish::Success(_)));
        finish
    }

    /// Until `done`: whenever no byte was processed for [`KEEPALIVE_AFTER`] (the volume zeroing a long zero run),
    /// extends the transfer's ticket and reads a few bytes, so neither the engine nor the daemon sees it idle.
    fn keep_alive(
        &self,
        engine: &Engine,
        id: &str,
        urls: &TransferUrls,
        http: &crate::source::HttpOptions,
        done: &AtomicBool,
    ) {
        let mut seen = self.progress.processed();
        let mut since = Instant::now();
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.progress.processed();
            if now != seen {
                (seen, since) = (now, Instant::now());
                continue;
            }
            if since.elapsed() >= KEEPALIVE_AFTER {
                log::info!("No progress in the last {KEEPALIVE_AFTER:?}, attempting ticket renewal to avoid timeout");
                if let Err(e) = engine.extend(id).and_then(|()| imageio::touch(urls, http)) {
                    log::info!("Error renewing ticket: {e}");
                }
                since = Instant::now();
            }
        }
    }
}
