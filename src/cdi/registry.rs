//! `IMPORTER_SOURCE=registry`: a containerDisk streamed from its layers onto the volume (no scratch space, unlike
//! CDI's importer, which copies the disk into `/scratch` first). The image's manifest and configuration are read
//! first — platform and bootc checks, the labels for the termination message — and the import then reads the
//! same manifest again by its digest, so the labels and the disk come from one image.

use super::dest::Volume;
use super::env::CdiEnv;
use super::{Context, Finish};
use crate::source::registry::{self, ImageRef};
use crate::source::Location;

impl Context<'_> {
    /// Imports the containerDisk `image`; the termination message carries the labels of its environment.
    pub(super) fn import_registry(&self, env: &CdiEnv, volume: &Volume, image: &ImageRef) -> Finish {
        let http = match super::connect::http_options(&self.args.proxy_cert_dir, &self.args.extra_headers_dir, env) {
            Ok(http) => http,
            Err(message) => return Finish::Failure(message),
        };
        let inspected = match registry::inspect(image, &http) {
            Ok(inspected) => inspected,
            Err(e) => return Finish::Failure(format!("Unable to process data: Failed to read registry image: {e}")),
        };
        log::info!(
            "{image}: {} image, pinned as {}, {} labels",
            inspected.architecture,
            inspected.pinned,
            inspected.labels.len()
        );
        match self.import_image(env, volume, Location::Registry(inspected.pinned)) {
            Finish::Success(mut message) => {
                message.labels = inspected.labels;
                Finish::Success(message)
            }
            Finish::ScratchRequired(mut message) => {
                message.labels = inspected.labels;
                Finish::ScratchRequired(message)
            }
            // A layer that fails its digest is a failed pull (CDI retries it), not IMPORTER_CHECKSUM's final
            // verdict; the image file is already removed.
            Finish::ChecksumMismatch(text) => Finish::Failure(text),
            failure => failure,
        }
    }
}
