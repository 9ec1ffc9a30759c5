//! The backup workflow: pre-checks, freeze/snapshot, copy, commit, publish, post-checks; guards, journal and orphan repair.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
