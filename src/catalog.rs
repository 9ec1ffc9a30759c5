//! The catalog on the share (`<target>/metadata/backup-catalog.db`, SQLite), rebuilt from `backup-metadata.json` files.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
