//! The engine: backup (its phases and guards), restore, verify, prune, orphan repair, and
//! file-level restore (mount, files).
//!
//! It knows nothing of who drives it (the command line, the Bacula plugin, the tests): progress,
//! cancellation and the events of a run are injected.

pub mod backup;
pub mod files;
pub mod mount;
pub mod offsite;
pub mod prune;
pub mod restore;
mod sink;
pub mod verifier;
pub mod verify;

/// The copier's hashing, for a driver that reads a disk's bytes itself instead of having the
/// engine copy them (the Bacula plugin's stream mode): the same whole-file digest and chunk
/// manifest as a backup's copy, cut at [`STREAM_CHUNK_SIZE`].
pub use crate::copier::{FileDigests, StreamHasher};

/// The chunk size of the manifests of a backup (the copier's default, as direct mode uses).
pub const STREAM_CHUNK_SIZE: u64 = crate::copier::DEFAULT_CHUNK_SIZE;
