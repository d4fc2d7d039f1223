//! The pipeline: a fixed set of workers, each owning one aligned buffer, turning extents into writes.

pub mod fill;
