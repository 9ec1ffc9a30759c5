//! Site configuration (`/etc/vm-backup/vm-backup.conf`) and the inventory (`vm-list.yaml`).

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
