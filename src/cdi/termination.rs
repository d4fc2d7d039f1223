//! The pod's termination message (`/dev/termination-log`): what the CDI controller reads when the importer exits.
//!
//! Two shapes, as CDI writes them: JSON of its `TerminationMessage` struct (on success, and on a checksum
//! mismatch), and a plain line for every other failure. Both are one line; kubelet keeps at most 4096 bytes.

use crate::error::{Error, ErrorKind};
use std::collections::BTreeMap;
use std::path::Path;

/// What kubelet keeps of a termination message, in bytes.
pub const MAX_LEN: usize = 4096;

/// The message of a successful import.
pub const COMPLETE: &str = "Import Complete";

/// CDI's `TerminationMessage`: every field optional and left out when unset, serialised in CDI's field order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TerminationMessage {
    /// The import needs a scratch volume (a stream that must be spooled, with no `/scratch` mounted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_space_required: Option<bool>,
    /// The destination was preallocated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preallocation_applied: Option<bool>,
    /// A multi-stage import passed its deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_passed: Option<bool>,
    /// Labels for the controller to copy onto the volume (sorted by key, as Go marshals a map).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Human-readable outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl TerminationMessage {
    /// What CDI writes after an import from a source: `{"scratchSpaceRequired":false,"preallocationApplied":..,
    /// "message":"Import Complete"}`.
    pub fn import_complete(preallocation_applied: bool) -> Self {
        TerminationMessage {
            scratch_space_required: Some(false),
            preallocation_applied: Some(preallocation_applied),
            message: Some(COMPLETE.to_string()),
            ..Default::default()
        }
    }

    /// What CDI writes when the import needs a scratch volume (`ErrRequiresScratchSpace`): the success message with
    /// `"scratchSpaceRequired":true`, nothing preallocated.
    pub fn scratch_space_required() -> Self {
        TerminationMessage { scratch_space_required: Some(true), ..Self::import_complete(false) }
    }

    /// What CDI writes after creating a blank disk: no `scratchSpaceRequired` field.
    pub fn blank_complete(preallocation_applied: bool) -> Self {
        TerminationMessage {
            preallocation_applied: Some(preallocation_applied),
            message: Some(COMPLETE.to_string()),
            ..Default::default()
        }
    }

    /// What CDI's upload server writes after an upload (`"Upload Complete"`) or a clone (`"Clone Complete"`):
    /// `{"preallocationApplied":..,"message":..}`.
    pub fn upload_complete(clone: bool, preallocation_applied: bool) -> Self {
        let message = if clone { "Clone Complete" } else { "Upload Complete" };
        TerminationMessage {
            preallocation_applied: Some(preallocation_applied),
            message: Some(message.to_string()),
            ..Default::default()
        }
    }

    /// What CDI's upload server writes when its deadline passed before an upload completed.
    pub fn deadline_passed() -> Self {
        TerminationMessage {
            deadline_passed: Some(true),
            message: Some("Deadline Passed".to_string()),
            ..Default::default()
        }
    }

    /// A message-only JSON report (CDI's shape for a checksum mismatch).
    pub fn message_only(message: impl Into<String>) -> Self {
        TerminationMessage { message: Some(message.into()), ..Default::default() }
    }

    /// The JSON as Go's `encoding/json` renders CDI's struct: field order, no spaces, Go's string escaping (`<`,
    /// `>`, `&` as `\u003c` and so on), with the message in CDI's wording ([`controller_wording`]). CDI refuses a
    /// message longer than [`MAX_LEN`] bytes and kubelet would cut it mid-JSON, so instead the message is
    /// shortened until the whole stays valid JSON within the limit.
    pub fn to_json(&self) -> String {
        let mut shown = self.clone();
        shown.message = self.message.as_deref().map(controller_wording);
        let json = shown.render();
        let Some(text) = shown.message.take().filter(|_| json.len() > MAX_LEN) else {
            return json;
        };
        // The JSON grows with every character kept: the longest prefix that fits, found by bisection over the
        // character boundaries (escapes make a character cost 1 to 6 bytes).
        let boundaries: Vec<usize> = text.char_indices().map(|(at, _)| at).chain([text.len()]).collect();
        let fits = |keep: usize| {
            let candidate = TerminationMessage { message: Some(text[..keep].to_string()), ..shown.clone() };
            let json = candidate.render();
            (json.len() <= MAX_LEN).then_some(json)
        };
        let (mut low, mut high) = (0, boundaries.len() - 1);
        while low < high {
            let mid = (low + high).div_ceil(2);
            if fits(boundaries[mid]).is_some() {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        fits(boundaries[low]).unwrap_or_else(|| TerminationMessage { message: None, ..shown }.render())
    }

    fn render(&self) -> String {
        let mut out = Vec::with_capacity(128);
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, GoEscapes);
        // A struct of strings, booleans and a string map cannot fail to serialise into memory.
        serde::Serialize::serialize(self, &mut serializer).expect("serialising a termination message");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }
}

/// serde_json's compact output with the extra escapes of Go's `encoding/json` (HTML-safe by default): `<`, `>`,
/// `&`, U+2028 and U+2029 as `\u` sequences, so the bytes are the ones CDI's importer writes.
struct GoEscapes;

impl serde_json::ser::Formatter for GoEscapes {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some(at) = rest.find(['<', '>', '&', '\u{2028}', '\u{2029}']) {
            writer.write_all(&rest.as_bytes()[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(writer, "\\u{:04x}", c as u32)?;
            rest = &rest[at + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }
}

/// The termination message of a failed import from an HTTP(S) source, in the words of CDI's importer (v1.58 to
/// v1.66) for each failure class it names, with boundimport's own error after them:
/// - no answer (unknown host, refused connection, TLS): `Unable to connect to http data source: HTTP request
///   errored: …`;
/// - an answer other than 2xx: `Unable to connect to http data source: expected status code 200, got 404. Status:
///   404 Not Found: …` (CDI's e2e tests match this prefix);
/// - the image larger than the volume: `Unable to process data: Unable to convert source data to target format: …`;
/// - a checksum mismatch: `Unable to process data: Unable to transfer source data to target file: …`;
/// - anything else: `Unable to process data: …`.
pub fn import_failure(e: &Error) -> String {
    match FailureClass::of(e) {
        FailureClass::Request => format!("Unable to connect to http data source: HTTP request errored: {e}"),
        FailureClass::Status(code) => format!(
            "Unable to connect to http data source: expected status code 200, got {code}. Status: {}: {e}",
            status_line(code)
        ),
        FailureClass::Size => format!("Unable to process data: Unable to convert source data to target format: {e}"),
        FailureClass::Checksum => format!("Unable to process data: Unable to transfer source data to target file: {e}"),
        FailureClass::Other => format!("Unable to process data: {e}"),
    }
}

/// Which of CDI's failure classes an import error falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureClass {
    /// The request got no HTTP answer: name resolution, connection, TLS, proxy.
    Request,
    /// The server answered with this status instead of 2xx.
    Status(u16),
    /// The destination cannot hold the image.
    Size,
    /// The downloaded bytes did not match `IMPORTER_CHECKSUM`.
    Checksum,
    /// Everything else.
    Other,
}

/// What the HTTP client was doing when a request got no answer (`source::http::client`'s operations).
const REQUEST_STEPS: &[&str] =
    &["resolving ", "connecting to ", "starting TLS", "talking to the proxy", "reading the proxy's answer", "proxy "];

impl FailureClass {
    fn of(e: &Error) -> Self {
        match e.kind() {
            ErrorKind::TooSmall => return FailureClass::Size,
            ErrorKind::ChecksumMismatch => return FailureClass::Checksum,
            ErrorKind::Io => {}
            _ => return FailureClass::Other,
        }
        // The HTTP client names the URL as the error's path.
        let from_http =
            e.path().and_then(|p| p.to_str()).is_some_and(|p| p.starts_with("http://") || p.starts_with("https://"));
        if !from_http {
            return FailureClass::Other;
        }
        let operation = e.operation();
        if let Some(code) = answered_status(operation) {
            return FailureClass::Status(code);
        }
        if REQUEST_STEPS.iter().any(|step| operation.starts_with(step)) {
            return FailureClass::Request;
        }
        FailureClass::Other
    }
}

/// The status of a refused answer, from the client's `server answered HTTP 404 …`, `authentication required (HTTP
/// 401)` or `credentials refused (HTTP 401)`.
fn answered_status(operation: &str) -> Option<u16> {
    let rest = operation
        .strip_prefix("server answered HTTP ")
        .or_else(|| operation.strip_prefix("authentication required (HTTP "))
        .or_else(|| operation.strip_prefix("credentials refused (HTTP "))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Go's `resp.Status` for `code`: the code and the standard reason phrase (CDI echoes the server's own phrase,
/// which is this one for the usual servers).
fn status_line(code: u16) -> String {
    let reason = match code {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        416 => "Requested Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => return code.to_string(),
    };
    format!("{code} {reason}")
}

/// The errors CDI's controller recognises by their text (pkg/controller/util.go `simplifyKnownMessage`, which shows
/// them as "DataVolume too small to contain image"), with the words Go's syscall package gives them. The third
/// phrase it matches, "is larger than the reported available", is already in boundimport's own too-small error.
const CONTROLLER_ERRNO_WORDS: &[(i32, &str)] =
    &[(libc::ENOSPC, "no space left on device"), (libc::EDQUOT, "disk quota exceeded")];

/// `message` with this system's rendering of those errors (`No space left on device (os error 28)`; musl calls
/// EDQUOT `Quota exceeded`) replaced by Go's words, so the controller matches them as it matches CDI's importer.
pub fn controller_wording(message: &str) -> String {
    let mut text = message.to_string();
    for &(errno, go_words) in CONTROLLER_ERRNO_WORDS {
        let ours = std::io::Error::from_raw_os_error(errno).to_string();
        if text.contains(&ours) {
            text = text.replace(&ours, go_words);
        }
    }
    text
}

/// `message` as CDI's `WriteTerminationMessage` leaves it, in CDI's wording ([`controller_wording`]): line
/// breaks become spaces (so it is one line), and it is cut to [`MAX_LEN`] bytes at a character boundary (kubelet would cut it there anyway).
pub fn one_line(message: &str) -> String {
    let mut line = controller_wording(message).replace(['\n', '\r'], " ");
    line.truncate(floor_char_boundary(&line, MAX_LEN));
    line
}

/// Writes `message` as the whole termination log (mode 0600, replacing what was there), one line.
pub fn write_plain(path: &Path, message: &str) -> std::io::Result<()> {
    write_file(path, &one_line(message))
}

/// Writes `message` as JSON.
pub fn write_json(path: &Path, message: &TerminationMessage) -> std::io::Result<()> {
    write_file(path, &message.to_json())
}

/// Creates the done file (`IMPORTER_DONE_FILE`), CDI's signal to a node-pull sidecar that the pod is done.
pub fn touch_done_file(done: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    if let Err(e) = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o666).open(done) {
        log::error!("Failed creating file {}: {e}", done.display());
    }
}

fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// The largest index `<= at` that is a char boundary of `text`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    (0..=at).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_json_matches_cdi_byte_for_byte() {
        assert_eq!(
            TerminationMessage::import_complete(false).to_json(),
            r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete"}"#
        );
        assert_eq!(
            TerminationMessage::import_complete(true).to_json(),
            r#"{"scratchSpaceRequired":false,"preallocationApplied":true,"message":"Import Complete"}"#
        );
        assert_eq!(
            TerminationMessage::scratch_space_required().to_json(),
            r#"{"scratchSpaceRequired":true,"preallocationApplied":false,"message":"Import Complete"}"#
        );
        assert_eq!(
            TerminationMessage::blank_complete(true).to_json(),
            r#"{"preallocationApplied":true,"message":"Import Complete"}"#
        );
        assert_eq!(TerminationMessage::default().to_json(), "{}");
    }

    #[test]
    fn labels_sit_between_flags_and_message_sorted_by_key() {
        let mut msg = TerminationMessage::message_only("m");
        msg.deadline_passed = Some(true);
        msg.labels.insert("b".into(), "2".into());
        msg.labels.insert("a".into(), "1".into());
        assert_eq!(msg.to_json(), r#"{"deadlinePassed":true,"labels":{"a":"1","b":"2"},"message":"m"}"#);
    }

    #[test]
    fn strings_escape_like_go() {
        let msg = TerminationMessage::message_only("a\"b\\c\n\t<x>&\u{1}\u{2028}é");
        assert_eq!(msg.to_json(), r#"{"message":"a\"b\\c\n\t\u003cx\u003e\u0026\u0001\u2028é"}"#);
    }

    #[test]
    fn out_of_space_errors_carry_the_words_the_controller_matches() {
        for (errno, words) in [(libc::ENOSPC, "no space left on device"), (libc::EDQUOT, "disk quota exceeded")] {
            let err =
                crate::error::Error::io("writing", std::io::Error::from_raw_os_error(errno)).at_path("/data/disk.img");
            let line = one_line(&format!("Unable to process data: {err}"));
            assert_eq!(line, format!("Unable to process data: /data/disk.img: writing: {words}"));
            let json: serde_json::Value =
                serde_json::from_str(&TerminationMessage::message_only(line).to_json()).unwrap();
            assert!(json["message"].as_str().unwrap().contains(words), "{json}");
        }
        let other = std::io::Error::from_raw_os_error(libc::EIO).to_string();
        assert_eq!(controller_wording(&other), other);
    }

    #[test]
    fn long_messages_are_cut_to_fit() {
        let msg = TerminationMessage::message_only("é".repeat(5000));
        let json = msg.to_json();
        assert!(json.len() <= MAX_LEN, "{}", json.len());
        assert!(json.ends_with("é\"}"));
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(parsed["message"].as_str().unwrap().chars().all(|c| c == 'é'));
        // Escapes make the JSON longer than the message: the cut still lands within the limit, valid.
        let mut labelled = TerminationMessage::message_only("<&>".repeat(2000));
        labelled.labels.insert("instancetype.kubevirt.io/default-instancetype".into(), "u1.small".into());
        let json = labelled.to_json();
        assert!(json.len() <= MAX_LEN && json.len() > MAX_LEN - 6, "{}", json.len());
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["labels"]["instancetype.kubevirt.io/default-instancetype"], "u1.small");
        let plain = one_line(&format!("first\nsecond\r{}", "x".repeat(5000)));
        assert!(plain.starts_with("first second "));
        assert_eq!(plain.len(), MAX_LEN);
    }
}
