//! `IMPORTER_SOURCE=registry`: a containerDisk streamed from its layers onto the volume (no scratch space, unlike
//! CDI's importer, which copies the disk into `/scratch` first). The image's manifest and configuration are read
//! first — platform and bootc checks, the labels for the termination message — and the import then reads the
//! same manifest again by its digest, so the labels and the disk come from one image.

use super::env::CdiEnv;
use super::{Context, Finish};
use crate::sink::volume::Volume;
use crate::source::http::Client;
use crate::source::registry::{self, ImageRef};
use crate::source::{HttpOptions, Location};
use std::collections::BTreeMap;
use std::io::Read;

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
        match self.import_image(env, volume, Location::Registry(inspected.pinned), None) {
            // A layer that fails its digest is a failed pull (CDI retries it), not IMPORTER_CHECKSUM's final
            // verdict; the image file is already removed.
            Finish::ChecksumMismatch(text) => Finish::Failure(text),
            finish => finish.with_labels(inspected.labels),
        }
    }
}

/// Largest `/info` answer read (CDI's sidecar sends the image's environment: a few KiB).
const MAX_INFO_BYTES: u64 = 1 << 20;

/// What the node-pull sidecar's `/info` says (CDI's `ServerInfo`).
#[derive(serde::Deserialize)]
struct ServerInfo {
    #[serde(default)]
    env: Vec<String>,
}

/// The labels of a node-pulled registry image, as CDI's `GetTerminationMessage` finds them: the environment the
/// sidecar serving `endpoint` reports at `/info` on the same scheme and host, turned into labels. A failure is
/// logged and gives no labels, as in CDI: the import itself succeeded.
pub(super) fn node_pull_labels(endpoint: &Location) -> BTreeMap<String, String> {
    let Location::Url(endpoint) = endpoint else {
        return BTreeMap::new();
    };
    match server_info(endpoint) {
        Ok(info) => registry::manifest::envs_to_labels(&info.env),
        Err(e) => {
            log::error!("failed request containerimage-server info: {e}");
            BTreeMap::new()
        }
    }
}

fn server_info(endpoint: &str) -> std::result::Result<ServerInfo, String> {
    let mut url = url::Url::parse(endpoint).map_err(|e| format!("{endpoint}: {e}"))?;
    url.set_path("/info");
    url.set_query(None);
    // A plain client, as CDI's: no credentials or headers meant for the image.
    let client = Client::new(url.as_str(), &HttpOptions::default()).map_err(|e| e.to_string())?;
    let response = client.get(None, false).map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!("{url}: expected status code 200, got {}", response.status));
    }
    let mut body = Vec::new();
    response.take(MAX_INFO_BYTES + 1).read_to_end(&mut body).map_err(|e| format!("{url}: reading: {e}"))?;
    if body.len() as u64 > MAX_INFO_BYTES {
        return Err(format!("{url}: answer longer than {MAX_INFO_BYTES} bytes"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: failed to unmarshal: {e}"))
}
