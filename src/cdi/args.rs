//! The arguments of `boundimport cdi`: boundimport's own options, the klog flags CDI's controller passes, and
//! the hand-over to CDI's own importer for sources boundimport does not import.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// klog flags the controller (or a pod spec) may pass as `-name` or `-name=value`.
const KLOG_FLAGS: &[&str] = &["v", "alsologtostderr", "logtostderr", "stderrthreshold", "vmodule"];

/// The klog flags CDI's pods are started with (`-alsologtostderr -v=N`), for the importer and the upload server.
#[derive(Debug, Clone, clap::Args)]
pub struct KlogFlags {
    /// klog verbosity, as the controller passes it (`-v=N`): 0-1 info, 2-3 debug, 4 and more trace.
    #[arg(long = "v", value_name = "N", default_value_t = 0)]
    pub verbosity: u8,

    /// Accepted for klog compatibility: logs always go to stderr.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub alsologtostderr: Option<String>,

    /// Accepted for klog compatibility: logs always go to stderr.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub logtostderr: Option<String>,

    /// Accepted for klog compatibility and ignored.
    #[arg(long, value_name = "LEVEL", hide = true)]
    pub stderrthreshold: Option<String>,

    /// Accepted for klog compatibility and ignored.
    #[arg(long, value_name = "PATTERN", hide = true)]
    pub vmodule: Option<String>,
}

impl KlogFlags {
    /// Installs the stderr logger with klog's line header, at the level `-v` asks for: 0-1 info, 2-3 debug, 4
    /// and more trace.
    pub fn init_logging(&self) {
        let verbosity = match self.verbosity {
            0..=1 => 0,
            2..=3 => 1,
            _ => 2,
        };
        crate::process::logging::init_klog(verbosity);
    }
}

/// What both of CDI's pods (the importer and the upload server) are told on their command line: logging, their
/// volume, scratch, and where the result goes.
#[derive(Debug, Clone, clap::Args)]
pub struct PodArgs {
    /// The klog flags CDI's controller passes.
    #[command(flatten)]
    pub klog: KlogFlags,

    /// Data directory of a filesystem volume: the image goes to DATA_DIR/disk.img, archives (and an upload's
    /// filesystem clone) are extracted here.
    #[arg(long, value_name = "DIR", default_value = "/data")]
    pub data_dir: PathBuf,

    /// Device node of a block volume; used when it exists.
    #[arg(long, value_name = "PATH", default_value = "/dev/cdi-block-volume")]
    pub block_path: PathBuf,

    /// Where the result is written for the controller.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_TERMINATION_LOG)]
    pub termination_log: PathBuf,

    /// Scratch volume for streams that must be spooled (a qcow2 with more data before its tables than the memory
    /// spool holds, a vmdk a forward walk cannot follow); used when it exists.
    #[arg(long, value_name = "DIR", default_value = "/scratch")]
    pub scratch_dir: PathBuf,
}

/// Options of `boundimport cdi`. Everything else comes from the environment CDI's controller sets.
#[derive(Debug, Clone, clap::Args)]
pub struct CdiArgs {
    /// What both pods take.
    #[command(flatten)]
    pub pod: PodArgs,

    /// Listen address of the HTTPS progress endpoint (`:PORT` means every interface).
    #[arg(long, value_name = "[HOST]:PORT", default_value = ":8443")]
    pub metrics_addr: String,

    /// Directory of the cluster proxy's CA certificates (read when it exists).
    #[arg(long, value_name = "DIR", default_value = "/proxycerts/")]
    pub proxy_cert_dir: PathBuf,

    /// Directory of secret extra-header files (read when it exists).
    #[arg(long, value_name = "DIR", default_value = "/extraheaders")]
    pub extra_headers_dir: PathBuf,

    /// Keep serving the final metrics this many seconds after a successful import (default: exit at once).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub metrics_linger: f64,

    /// Another importer (CDI's own `cdi-importer`) to exec, with the same arguments, when IMPORTER_SOURCE is one
    /// boundimport does not import (vddk).
    #[arg(long, value_name = "PATH", env = "BOUNDIMPORT_CDI_FALLBACK")]
    pub fallback: Option<PathBuf>,
}

/// Rewrites klog-style single-dash long flags (`-v=3`, `-alsologtostderr`) after the `cdi` subcommand into the
/// double-dash form clap parses. A binary invoked as `cdi-importer` runs `cdi` (for images that replace CDI's
/// binary in place). Returns the arguments and whether they select the `cdi` subcommand.
/// The same holds for `upload-server` (klog flags after it; a binary invoked as `cdi-uploadserver` runs it).
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> (Vec<OsString>, bool) {
    let mut args: Vec<OsString> = args.into_iter().collect();
    let invoked_as = args.first().and_then(|arg0| Path::new(arg0).file_name()).map(|n| n.to_os_string());
    match invoked_as.as_ref().and_then(|name| name.to_str()) {
        Some("cdi-importer") => args.insert(1, OsString::from("cdi")),
        Some("cdi-uploadserver") => args.insert(1, OsString::from("upload-server")),
        _ => {}
    }
    let Some(cdi_at) = args.iter().skip(1).position(|a| a == "cdi" || a == "upload-server").map(|i| i + 1) else {
        return (args, false);
    };
    // Only the subcommand itself, not a SOURCE or DEST that happens to be named "cdi".
    if args[1..cdi_at].iter().any(|a| !a.to_string_lossy().starts_with('-')) {
        return (args, false);
    }
    for arg in &mut args[cdi_at + 1..] {
        let text = arg.to_string_lossy();
        if let Some(rest) = text.strip_prefix('-').filter(|r| !r.starts_with('-')) {
            let name = rest.split('=').next().unwrap_or("");
            if KLOG_FLAGS.contains(&name) {
                *arg = OsString::from(format!("-{text}"));
            }
        }
    }
    (args, true)
}

/// Writes a failure that happened before the arguments could be parsed to the termination log: the
/// `--termination-log` among `args` if one is there (the rest may be what failed to parse), else the default.
pub fn report_usage_error(args: &[OsString], message: &str) {
    let path = termination_log_arg(args).unwrap_or_else(|| PathBuf::from(DEFAULT_TERMINATION_LOG));
    if let Err(e) = super::termination::write_plain(&path, message) {
        log::debug!("{}: {e}", path.display());
    }
}

/// Where the controller reads the termination message, unless `--termination-log` says otherwise.
const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";

/// The last `--termination-log PATH` or `--termination-log=PATH` among `args`.
fn termination_log_arg(args: &[OsString]) -> Option<PathBuf> {
    let mut found = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            break;
        }
        if text == "--termination-log" {
            found = args.next().map(PathBuf::from);
        } else if let Some(path) = text.strip_prefix("--termination-log=") {
            found = Some(PathBuf::from(path));
        }
    }
    found
}

/// The klog flags among the arguments given after the `cdi` subcommand (or after the program name, when invoked
/// as `cdi-importer`): what CDI's own importer understands, without boundimport's options.
fn klog_args(all: &[OsString]) -> Vec<OsString> {
    let invoked_as_importer =
        all.first().and_then(|a| Path::new(a).file_name()).is_some_and(|name| name == "cdi-importer");
    let start = if invoked_as_importer { 1 } else { all.iter().skip(1).position(|a| a == "cdi").map_or(1, |i| i + 2) };
    let mut kept = Vec::new();
    let mut rest = all.get(start..).unwrap_or_default().iter();
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy();
        let flag = text.trim_start_matches('-');
        let (name, has_value) = match flag.split_once('=') {
            Some((name, _)) => (name, true),
            None => (flag, false),
        };
        if text.starts_with('-') && KLOG_FLAGS.contains(&name) {
            kept.push(arg.clone());
            if !has_value && matches!(name, "v" | "stderrthreshold" | "vmodule") {
                kept.extend(rest.next().cloned());
            }
        }
    }
    kept
}

/// Replaces this process with `fallback`, passing on our arguments; returns only if the exec failed.
pub(super) fn exec_fallback(fallback: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    log::info!("IMPORTER_SOURCE is not imported by boundimport: handing over to {}", fallback.display());
    let all: Vec<OsString> = std::env::args_os().collect();
    std::process::Command::new(fallback).args(klog_args(&all)).exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_termination_log_is_found_before_the_arguments_parse() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(termination_log_arg(&args(&["bi", "cdi", "--bogus"])), None);
        let given = args(&["bi", "cdi", "--termination-log", "/t/a", "--bogus", "--termination-log=/t/b"]);
        assert_eq!(termination_log_arg(&given), Some(PathBuf::from("/t/b")), "the last one wins, as in clap");
        assert_eq!(termination_log_arg(&args(&["bi", "cdi", "--", "--termination-log", "/t/a"])), None);
        assert_eq!(termination_log_arg(&args(&["bi", "cdi", "--termination-log"])), None);
    }

    fn normalized(args: &[&str]) -> (Vec<String>, bool) {
        let (out, cdi) = normalize_args(args.iter().map(OsString::from));
        (out.into_iter().map(|a| a.into_string().unwrap()).collect(), cdi)
    }

    #[test]
    fn klog_flags_become_long_flags_after_cdi_only() {
        assert_eq!(
            normalized(&["boundimport", "cdi", "-alsologtostderr", "-v=3", "-v", "2", "--data-dir", "/d", "-h"]),
            (
                vec!["boundimport", "cdi", "--alsologtostderr", "--v=3", "--v", "2", "--data-dir", "/d", "-h"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                true
            )
        );
        assert!(!normalized(&["boundimport", "-v", "a", "cdi"]).1);
        assert!(!normalized(&["boundimport", "img", "out"]).1);
        let (args, cdi) = normalized(&["/usr/bin/cdi-importer", "-v=1"]);
        assert!(cdi);
        assert_eq!(args, ["/usr/bin/cdi-importer", "cdi", "--v=1"]);
    }

    #[test]
    fn the_fallback_gets_only_klog_flags() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            klog_args(&args(&[
                "boundimport",
                "cdi",
                "--fallback",
                "/x",
                "-alsologtostderr",
                "-v",
                "3",
                "--data-dir",
                "/d"
            ])),
            args(&["-alsologtostderr", "-v", "3"])
        );
        assert_eq!(klog_args(&args(&["/usr/bin/cdi-importer", "-v=1"])), args(&["-v=1"]));
        assert!(klog_args(&args(&["boundimport", "cdi"])).is_empty());
    }
}
