//! The engine: backup (its phases and guards), restore, verify, prune, orphan repair, and
//! file-level restore (mount, files).
//!
//! It knows nothing of who drives it (the command line, the Bacula plugin, the tests): progress,
//! cancellation and the events of a run are injected.

pub mod backup;
pub mod files;
pub mod mount;
pub mod prune;
pub mod restore;
pub mod verify;
