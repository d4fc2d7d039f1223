//! The lab: reproduces what importer pods suffer (a memory cgroup against throttled storage) and measures
//! importers side by side. [`fixtures`] holds the machine-changing guards it and the tests share.

pub mod fixtures;
