//! qcow2 (versions 2 and 3). Placeholder until the parser lands.

use super::{BackingPolicy, Extent, Image};
use crate::error::{Error, Result};
use crate::source::ReadAt;
use std::sync::Arc;

/// An opened qcow2 image.
pub struct Qcow2Image {
    source: Arc<dyn ReadAt>,
    virtual_size: u64,
}

impl Qcow2Image {
    /// Parses the header and prepares to map guest ranges.
    pub fn open(source: Arc<dyn ReadAt>, _backing: &BackingPolicy, _depth: usize) -> Result<Self> {
        Err(Error::unsupported("qcow2 is not implemented yet").at_path(source.name()))
    }
}

impl Image for Qcow2Image {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
        vec![self.source.clone()]
    }
    fn map(&mut self, _offset: u64, _len: u64, _out: &mut Vec<Extent>) -> Result<()> {
        unreachable!()
    }
}
