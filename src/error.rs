//! One error type for the whole import: what failed (kind), what we were doing (operation), where (path and
//! offset), and the underlying cause. Rendered as a single line, because it ends up in a terminal, a log line, or
//! CDI's termination message.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What kind of failure this is; decides the exit code and how front ends react.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The image or its header is malformed or lies about itself.
    BadImage,
    /// The image is valid but uses something boundimport refuses (backing file, encryption, feature bits).
    Unsupported,
    /// The destination cannot hold the image.
    TooSmall,
    /// The source bytes do not match the expected checksum.
    ChecksumMismatch,
    /// The command line or environment was wrong.
    Usage,
    /// A system call failed.
    Io,
    /// The import was stopped by a signal.
    Interrupted,
    /// A stream must be spooled beyond the memory share and there is no scratch directory for the spool (CDI's
    /// `ErrRequiresScratchSpace`: the controller answers it with a scratch volume).
    NeedsScratch,
}

/// An error with enough context to be acted upon from one line.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    operation: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` that happened while doing `operation`.
    pub fn new(kind: ErrorKind, operation: impl Into<String>) -> Self {
        Error { kind, operation: operation.into(), path: None, offset: None, source: None }
    }

    /// A malformed-input error.
    pub fn bad_image(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadImage, what)
    }

    /// A refused-feature error.
    pub fn unsupported(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, what)
    }

    /// A stream that needs a spool file, with no scratch directory to put it in.
    pub fn needs_scratch(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::NeedsScratch, what)
    }

    /// A usage error (bad flag value, bad environment).
    pub fn usage(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, what)
    }

    /// The import into `destination` stopped on request; everything below `watermark` is written.
    pub fn interrupted(destination: &Path, watermark: u64) -> Self {
        Self::new(ErrorKind::Interrupted, "import stopped; everything below this offset was written")
            .at_offset(watermark)
            .at_path(destination)
    }

    /// An import stopped by a signal whose destination was then removed or cut (`done` says which): there was
    /// nothing a rerun could resume from, because resuming was not asked for (`resuming` false) or no checkpoint
    /// had been recorded yet.
    pub fn interrupted_and_abandoned(destination: &Path, done: &str, resuming: bool) -> Self {
        let why = match resuming {
            true => "no checkpoint had been recorded yet",
            false => "with --resume a stop keeps what was written",
        };
        Self::new(ErrorKind::Interrupted, format!("incomplete, so {done} ({why})")).at_path(destination)
    }

    /// A failed system call while doing `operation`.
    pub fn io(operation: impl Into<String>, err: io::Error) -> Self {
        Self::new(ErrorKind::Io, operation).with_source(err)
    }

    /// Attaches the file the error is about (kept if one is already set: the innermost path is the precise one).
    pub fn at_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Attaches the byte offset the error is about (kept if one is already set).
    pub fn at_offset(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// Places the error inside a structure that starts at file offset `base`: an offset the parser of that
    /// structure set (relative to its start) becomes `base + offset`; without one, the offset is `base`.
    pub fn within(mut self, base: u64) -> Self {
        self.offset = Some(self.offset.map_or(base, |relative| base.saturating_add(relative)));
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file the error is about, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The offset the error is about, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// What was being done, without path, offset or cause.
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// The errno of the underlying system call, if the cause is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref()?.downcast_ref::<io::Error>()?.raw_os_error()
    }

    /// Process exit code for this error: 2 for usage errors, 1 for everything else that is a failure.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Usage => 2,
            ErrorKind::Interrupted => 3,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        f.write_str(&self.operation)?;
        if let Some(offset) = self.offset {
            write!(f, " at offset {offset} ({offset:#x})")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Adds context to `io::Result`s at the call site: `file.read_at(..).io_context("reading L2 table")?`.
pub trait IoContext<T> {
    /// Turns an `io::Error` into an [`Error`] of kind `Io` with `operation` as context.
    fn io_context(self, operation: impl Into<String>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn io_context(self, operation: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::io(operation, e))
    }
}

/// Shorthand for returning a [`ErrorKind::BadImage`] error from a format parser.
#[macro_export]
macro_rules! bad_image {
    ($($arg:tt)*) => { $crate::error::Error::bad_image(format!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_line_with_path_offset_and_cause() {
        let err = Error::io("reading L2 table", io::Error::from_raw_os_error(libc::EIO))
            .at_offset(0x30000)
            .at_path("/img/disk.qcow2");
        let text = err.to_string();
        assert_eq!(
            text,
            "/img/disk.qcow2: reading L2 table at offset 196608 (0x30000): Input/output error (os error 5)"
        );
        assert!(!text.contains('\n'));
        assert_eq!(err.exit_code(), 1);
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn innermost_context_wins() {
        let err = Error::bad_image("x").at_offset(1).at_offset(2).at_path("a").at_path("b");
        assert_eq!(err.offset(), Some(1));
        assert_eq!(err.path(), Some(Path::new("a")));
    }

    #[test]
    fn offsets_inside_a_structure_become_file_offsets() {
        assert_eq!(Error::bad_image("x").at_offset(32).within(512).offset(), Some(544));
        assert_eq!(Error::bad_image("x").within(512).offset(), Some(512));
    }

    #[test]
    fn usage_errors_exit_2() {
        assert_eq!(Error::usage("bad --limit").exit_code(), 2);
    }
}
