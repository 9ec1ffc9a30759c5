//! The on-disk contract as code: where a backup lives on the target, its folder names, and the
//! versioned `backup-metadata.json` with its chunk manifests.
//!
//! Nothing here does I/O on the target beyond what its own types describe; every other room may
//! use it, and it uses none of them.

pub mod layout;
pub mod metadata;
