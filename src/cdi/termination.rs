//! The pod's termination message (`/dev/termination-log`): what the CDI controller reads when the importer exits.
//!
//! Two shapes, as CDI writes them: JSON of its `TerminationMessage` struct (on success, and on a checksum
//! mismatch), and a plain line for every other failure. Both are one line; kubelet keeps at most 4096 bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// What kubelet keeps of a termination message, in bytes.
pub const MAX_LEN: usize = 4096;

/// The message of a successful import.
pub const COMPLETE: &str = "Import Complete";

/// CDI's `TerminationMessage`: every field optional and left out when unset, serialised in CDI's field order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TerminationMessage {
    /// The import needs a scratch volume (a stream that must be spooled, with no `/scratch` mounted).
    pub scratch_space_required: Option<bool>,
    /// The destination was preallocated.
    pub preallocation_applied: Option<bool>,
    /// A multi-stage import passed its deadline.
    pub deadline_passed: Option<bool>,
    /// Labels for the controller to copy onto the volume.
    pub labels: BTreeMap<String, String>,
    /// Human-readable outcome.
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

    /// The JSON exactly as Go's `encoding/json` renders CDI's struct: field order, no spaces, Go's string
    /// escaping (`<`, `>`, `&` as `\u003c` and so on). If it would exceed [`MAX_LEN`] bytes the message is
    /// shortened until it fits (CDI would fail instead).
    pub fn to_json(&self) -> String {
        let mut message = self.message.clone();
        loop {
            let json = self.render(message.as_deref());
            match message.as_mut() {
                Some(text) if json.len() > MAX_LEN && !text.is_empty() => {
                    let excess = json.len() - MAX_LEN;
                    let keep = floor_char_boundary(text, text.len().saturating_sub(excess.max(1)));
                    text.truncate(keep);
                }
                _ => return json,
            }
        }
    }

    fn render(&self, message: Option<&str>) -> String {
        let mut fields: Vec<String> = Vec::new();
        let flags = [
            ("scratchSpaceRequired", self.scratch_space_required),
            ("preallocationApplied", self.preallocation_applied),
            ("deadlinePassed", self.deadline_passed),
        ];
        for (name, value) in flags {
            if let Some(value) = value {
                fields.push(format!("\"{name}\":{value}"));
            }
        }
        if !self.labels.is_empty() {
            let labels: Vec<String> =
                self.labels.iter().map(|(k, v)| format!("{}:{}", go_json_string(k), go_json_string(v))).collect();
            fields.push(format!("\"labels\":{{{}}}", labels.join(",")));
        }
        if let Some(message) = message {
            fields.push(format!("\"message\":{}", go_json_string(message)));
        }
        format!("{{{}}}", fields.join(","))
    }
}

/// A JSON string literal escaped the way Go's `encoding/json` escapes it (HTML-safe by default).
pub fn go_json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `message` as CDI's `WriteTerminationMessage` leaves it: line breaks become spaces (so it is one line), and it
/// is cut to [`MAX_LEN`] bytes at a character boundary (kubelet would cut it there anyway).
pub fn one_line(message: &str) -> String {
    let mut line = message.replace(['\n', '\r'], " ");
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
        assert_eq!(go_json_string("a\"b\\c\n\t<x>&\u{1}\u{2028}é"), r#""a\"b\\c\n\t\u003cx\u003e\u0026\u0001\u2028é""#);
    }

    #[test]
    fn long_messages_are_cut_to_fit() {
        let msg = TerminationMessage::message_only("é".repeat(5000));
        let json = msg.to_json();
        assert!(json.len() <= MAX_LEN, "{}", json.len());
        assert!(json.ends_with("é\"}"));
        let plain = one_line(&format!("first\nsecond\r{}", "x".repeat(5000)));
        assert!(plain.starts_with("first second "));
        assert_eq!(plain.len(), MAX_LEN);
    }
}
