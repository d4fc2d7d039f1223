//! boundimport: import VM disk images onto a raw block device or file while keeping everything the import causes
//! to be charged to its memory cgroup (buffers and page cache) inside a budget.
//!
//! Data flows one way: [`source`] (bytes) → [`format`] (extents of guest space) → [`pipeline`] (aligned buffers,
//! decompression) → [`sink`] (writes), with the [`cgroup`] governor pacing buffered writes beside the sink.
//! [`import`] wires them together for a [`import::Plan`]; [`cli`] is the command-line front end and [`cdi`] the
//! entrypoint of a KubeVirt CDI importer pod, [`upload`] that of its upload server pod.
#![warn(missing_docs)]

pub mod budget;
pub mod buffer;
pub mod bytes;
pub(crate) mod cdi;
pub mod cgroup;
pub mod checksum;
pub mod cli;
pub mod diagnose;
pub mod error;
pub mod format;
pub mod import;
#[cfg(feature = "lab")]
pub mod lab;
pub mod pipeline;
pub(crate) mod process;
pub mod progress;
pub mod sink;
pub(crate) mod size;
pub mod source;
pub(crate) mod sys;
pub(crate) mod upload;
