//! Verify published backups: checksums from the chunk manifests, in parallel, and `qemu-img check`.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
