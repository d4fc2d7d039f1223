//! The oVirt engine's side of an imageio download, as CDI's importer drives it through go-ovirt: an SSO token, the
//! disk (and a snapshot of it), an image transfer for download waited into its `transferring` phase, kept alive
//! while the volume is zeroed, and finalized on success or cancelled otherwise.
//!
//! The engine speaks XML (`Version: 4`); only the elements CDI reads are parsed.

use super::read_capped;
use crate::error::{Error, ErrorKind, Result};
use crate::source::http::Client;
use crate::source::HttpOptions;
use std::time::Duration;
use url::Url;

/// Largest engine answer read (a disk, a transfer, a list of snapshots).
const MAX_ANSWER: usize = 8 << 20;
/// Inactivity timeout asked for the transfer, seconds (CDI's).
const INACTIVITY_TIMEOUT: u64 = 60;
/// How long a transfer may stay `initializing` before the import gives up.
const INITIALIZING_LIMIT: Duration = Duration::from_secs(300);
/// Attempts at finalizing or cancelling a transfer, and the pause between them (CDI: 10, 2 s).
const CLEANUP_ATTEMPTS: u32 = 10;
const CLEANUP_DELAY: Duration = Duration::from_secs(2);

/// A logged-in connection to the engine's REST API.
pub struct Engine {
    client: Client,
    /// The API root, ending in `/`.
    api: Url,
    bearer: String,
}

/// What CDI reads of a disk.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The disk's id.
    pub id: String,
    /// Its size in bytes.
    pub total_size: u64,
    /// The id of its active volume (the checkpoint a final warm stage names).
    pub image_id: Option<String>,
    /// Storage domains holding it, where its snapshots are listed.
    pub storage_domains: Vec<String>,
}

/// A disk snapshot (one volume of the disk's chain).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Its id (a checkpoint name).
    pub id: String,
    /// Its allocated size.
    pub actual_size: Option<u64>,
}

/// The format a transfer serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferFormat {
    /// The disk's guest-visible bytes.
    Raw,
    /// The volume itself, as qcow2 (a warm-migration delta).
    Cow,
}

/// An image transfer in its `transferring` phase.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The transfer's id.
    pub id: String,
    /// The imageio daemon on the host (`transfer_url`).
    pub transfer_url: Option<String>,
    /// The engine's imageio proxy (`proxy_url`), used when the host cannot be reached.
    pub proxy_url: Option<String>,
}

impl Engine {
    /// Logs in to the engine at `endpoint` (its API URL, `https://engine/ovirt-engine/api`) with its SSO password
    /// grant.
    pub fn connect(endpoint: &str, user: &str, password: &str, options: &HttpOptions) -> Result<Engine> {
        // No stop flag: the transfer's own life cycle (finalize, cancel) must still reach the engine after a stop.
        let options =
            HttpOptions { username: None, password: None, headers: Vec::new(), stop: None, ..options.clone() };
        let client = Client::new(endpoint, &options)?;
        let mut api = Url::parse(endpoint).map_err(|e| Error::usage(format!("invalid URL: {e}")).at_path(endpoint))?;
        if !api.path().ends_with('/') {
            api.set_path(&format!("{}/", api.path()));
        }
        // go-ovirt's SSO service lives beside the API on the same origin.
        let sso = api.join("/ovirt-engine/sso/oauth/token").expect("an absolute path joins");
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "password")
            .append_pair("scope", "ovirt-app-api")
            .append_pair("username", user)
            .append_pair("password", password)
            .finish();
        let headers = [("Content-Type", "application/x-www-form-urlencoded"), ("Accept", "application/json")];
        let response = client.call("POST", &sso, &headers, form.as_bytes())?;
        let status = response.status;
        let body = read_capped(&client, response, MAX_ANSWER, "the SSO answer")?;
        let answer: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            client.error(ErrorKind::Io, format!("SSO answered HTTP {status} with something that is not JSON: {e}"))
        })?;
        let text = |name: &str| answer.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        match text("access_token") {
            token if !token.is_empty() && status == 200 => {
                Ok(Engine { client, api, bearer: format!("Bearer {token}") })
            }
            _ => Err(client.error(
                ErrorKind::Io,
                format!(
                    "Error during SSO authentication {} : {} (HTTP {status})",
                    text("error"),
                    text("error_description")
                ),
            )),
        }
    }

    /// Sends `method` to `path` under the API root and parses the XML answer; statuses other than 2xx are errors
    /// carrying the engine's fault text.
    fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let url =
            self.api.join(path).map_err(|e| self.client.error(ErrorKind::Io, format!("bad API path {path}: {e}")))?;
        let headers = [
            ("Authorization", self.bearer.as_str()),
            ("Version", "4"),
            ("Accept", "application/xml"),
            ("Content-Type", "application/xml"),
        ];
        let response = self.client.call(method, &url, &headers, body.as_bytes())?;
        let status = response.status;
        let bytes = read_capped(&self.client, response, MAX_ANSWER, "the engine's answer")?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !(200..300).contains(&status) {
            let fault = fault_text(&text);
            return Err(Error::new(ErrorKind::Io, format!("{method} {url}: HTTP {status}{fault}")));
        }
        Ok((status, text))
    }

    /// The disk `id`.
    pub fn disk(&self, id: &str) -> Result<Disk> {
        let (_, xml) = self.call("GET", &format!("disks/{id}"), "")?;
        let doc = parse(&xml)?;
        let disk = doc.root_element();
        if disk.tag_name().name() != "disk" {
            return Err(Error::new(ErrorKind::Io, format!("disk {id} not found")));
        }
        let total_size = child_text(disk, "total_size")
            .ok_or_else(|| Error::new(ErrorKind::Io, "Error total disk size not available"))?
            .parse::<u64>()
            .map_err(|_| Error::new(ErrorKind::Io, "disk size is negative or not a number"))?;
        let storage_domains = disk
            .children()
            .filter(|n| n.has_tag_name("storage_domains"))
            .flat_map(|n| n.children().filter(|d| d.has_tag_name("storage_domain")))
            .filter_map(|d| d.attribute("id").map(str::to_string))
            .collect();
        Ok(Disk {
            id: disk.attribute("id").unwrap_or(id).to_string(),
            total_size,
            image_id: child_text(disk, "image_id").map(str::to_string),
            storage_domains,
        })
    }

    /// The snapshot `id` of `disk`, searched in its storage domains.
    pub fn snapshot(&self, disk: &Disk, id: &str) -> Result<Snapshot> {
        if disk.storage_domains.is_empty() {
            return Err(Error::new(ErrorKind::Io, format!("no storage domains listed for disk {}", disk.id)));
        }
        for domain in &disk.storage_domains {
            let (_, xml) = self.call("GET", &format!("storagedomains/{domain}/disksnapshots"), "")?;
            let doc = parse(&xml)?;
            let found = doc
                .root_element()
                .children()
                .find(|n| n.has_tag_name("disk_snapshot") && n.attribute("id") == Some(id));
            if let Some(node) = found {
                log::info!("Successfully located snapshot {id} on disk {}, in storage domain {domain}", disk.id);
                let actual_size = child_text(node, "actual_size").and_then(|s| s.parse().ok());
                return Ok(Snapshot { id: id.to_string(), actual_size });
            }
        }
        Err(Error::new(ErrorKind::Io, format!("could not find snapshot {id} on disk {}", disk.id)))
    }

    /// Starts a download of `disk` (or of its `snapshot`) as `format` and waits until the transfer is
    /// `transferring`. On an error after the transfer exists, it is cancelled.
    pub fn start_download(&self, disk: &Disk, snapshot: Option<&Snapshot>, format: TransferFormat) -> Result<Transfer> {
        let subject = match snapshot {
            Some(s) => format!("<snapshot id=\"{}\"/>", xml_escape(&s.id)),
            None => format!("<image id=\"{}\"/>", xml_escape(&disk.id)),
        };
        let format = match format {
            TransferFormat::Raw => "raw",
            TransferFormat::Cow => "cow",
        };
        let body = format!(
            "<image_transfer>{subject}<direction>download</direction><format>{format}</format>\
             <inactivity_timeout>{INACTIVITY_TIMEOUT}</inactivity_timeout></image_transfer>"
        );
        let (_, xml) = self
            .call("POST", "imagetransfers", &body)
            .map_err(|e| Error::new(ErrorKind::Io, format!("Error sending transfer image request: {e}")))?;
        let mut transfer = parse_transfer(&xml)?;
        let started = std::time::Instant::now();
        loop {
            match transfer.1.as_str() {
                "transferring" => break,
                "initializing" if started.elapsed() < INITIALIZING_LIMIT => {
                    std::thread::sleep(Duration::from_secs(1));
                    let (_, xml) = self.call("GET", &format!("imagetransfers/{}", transfer.0.id), "")?;
                    transfer = parse_transfer(&xml)?;
                }
                phase => {
                    let error = Error::new(ErrorKind::Io, format!("Error transfer phase: {phase}"));
                    self.finish(&transfer.0.id, false);
                    return Err(error);
                }
            }
        }
        Ok(transfer.0)
    }

    /// Extends the transfer's ticket (its inactivity timer restarts).
    pub fn extend(&self, id: &str) -> Result<()> {
        self.call("POST", &format!("imagetransfers/{id}/extend"), "<action/>").map(drop)
    }

    /// Ends transfer `id`: finalized after a successful copy, cancelled otherwise, as far as its phase still needs
    /// it; retried as CDI retries. Failures are logged: the engine unlocks the disk after the inactivity timeout.
    pub fn finish(&self, id: &str, success: bool) {
        for attempt in 1..=CLEANUP_ATTEMPTS {
            let phase = match self.call("GET", &format!("imagetransfers/{id}"), "") {
                Ok((_, xml)) => parse_transfer(&xml).map(|t| t.1),
                Err(e) if e.to_string().contains("HTTP 404") => {
                    log::info!("Transfer ticket cleaned up.");
                    return;
                }
                Err(e) => Err(e),
            };
            let action = match phase.as_deref() {
                Ok("transferring") if success => "finalize",
                Ok(
                    "cancelled" | "cancelled_system" | "cancelled_user" | "finalizing_failure" | "finalizing_success"
                    | "finished_failure" | "finished_success" | "finalizing_cleanup",
                ) => {
                    log::info!("No cleanup action required for image transfer {id} ({}).", phase.unwrap_or_default());
                    return;
                }
                _ => "cancel",
            };
            log::info!("{} image transfer {id}.", if action == "finalize" { "Finalizing" } else { "Cancelling" });
            match self.call("POST", &format!("imagetransfers/{id}/{action}"), "<action/>") {
                Ok(_) => return,
                Err(e) => log::warn!("Unable to {action} image transfer {id} (attempt {attempt}): {e}"),
            }
            std::thread::sleep(CLEANUP_DELAY);
        }
        log::error!(
            "retry limit exceeded for transfer ticket cleanup, disk may remain locked until inactivity timeout"
        );
    }
}

/// The transfer and its phase.
fn parse_transfer(xml: &str) -> Result<(Transfer, String)> {
    let doc = parse(xml)?;
    let node = doc.root_element();
    let id = node
        .attribute("id")
        .filter(|_| node.has_tag_name("image_transfer"))
        .ok_or_else(|| Error::new(ErrorKind::Io, "Error image transfer not available"))?;
    let phase = child_text(node, "phase").ok_or_else(|| Error::new(ErrorKind::Io, "Error phase not available"))?;
    let url = |name: &str| child_text(node, name).filter(|u| !u.is_empty()).map(str::to_string);
    let transfer = Transfer { id: id.to_string(), transfer_url: url("transfer_url"), proxy_url: url("proxy_url") };
    Ok((transfer, phase.to_string()))
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>> {
    roxmltree::Document::parse(xml)
        .map_err(|e| Error::new(ErrorKind::Io, format!("the engine's answer is not XML: {e}")))
}

fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children().find(|n| n.has_tag_name(name)).and_then(|n| n.text()).map(str::trim)
}

/// `: reason (detail)` from an engine `<fault>`, or the start of a non-XML answer.
fn fault_text(body: &str) -> String {
    match roxmltree::Document::parse(body) {
        Ok(doc) => {
            let root = doc.root_element();
            let parts: Vec<&str> = ["reason", "detail"].iter().filter_map(|n| child_text(root, n)).collect();
            if parts.is_empty() {
                String::new()
            } else {
                format!(": {}", parts.join(": "))
            }
        }
        Err(_) => {
            let line = body.lines().next().unwrap_or_default().trim();
            if line.is_empty() {
                String::new()
            } else {
                format!(": {}", line.chars().take(200).collect::<String>())
            }
        }
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_parse_as_cdi_reads_them() {
        let xml = r#"<image_transfer href="/x" id="t1"><phase>transferring</phase>
            <transfer_url>https://h:54322/images/abc</transfer_url><proxy_url></proxy_url></image_transfer>"#;
        let (t, phase) = parse_transfer(xml).unwrap();
        assert_eq!((t.id.as_str(), phase.as_str()), ("t1", "transferring"));
        assert_eq!(t.transfer_url.as_deref(), Some("https://h:54322/images/abc"));
        assert_eq!(t.proxy_url, None);
        assert!(parse_transfer("<fault><reason>x</reason></fault>").is_err());
    }

    #[test]
    fn faults_become_one_line() {
        assert_eq!(
            fault_text("<fault><reason>Operation Failed</reason><detail>Entity not found</detail></fault>"),
            ": Operation Failed: Entity not found"
        );
        assert_eq!(fault_text("404 page not found\n"), ": 404 page not found");
        assert_eq!(fault_text(""), "");
    }
}
