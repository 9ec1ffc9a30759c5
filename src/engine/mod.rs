//! The engine: backup (its phases and guards), restore, verify, prune and orphan repair.
//!
//! It knows nothing of who drives it (the command line, the Bacula plugin, the tests): progress,
//! cancellation and the events of a run are injected.

pub mod backup;
pub mod prune;
pub mod restore;
mod sink;
pub mod verify;
