//! Restore a VM from a published backup, to its name or beside it.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
