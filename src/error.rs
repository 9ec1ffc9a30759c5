//! The crate-wide error type and the exit statuses of the `backup` command.
//!
//! Each module has its own error enum; [`Error`] gathers them for callers (CLI, C ABI) that
//! handle any failure of the engine.

use std::fmt;

/// Any failure of the engine, as seen by the command line and the C ABI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The copier failed.
    #[error(transparent)]
    Copy(#[from] crate::copier::CopyError),
    /// A libvirt call failed.
    #[error(transparent)]
    Libvirt(#[from] crate::hv::LibvirtError),
    /// The backup workflow failed.
    #[error(transparent)]
    Backup(#[from] crate::engine::backup::BackupError),
    /// A restore failed.
    #[error(transparent)]
    Restore(#[from] crate::engine::restore::RestoreError),
    /// Verification found a fault or could not run.
    #[error(transparent)]
    Verify(#[from] crate::engine::verify::VerifyError),
    /// The configuration or inventory is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The layout on the target is invalid.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
    /// The catalog on the share failed.
    #[error(transparent)]
    Catalog(#[from] crate::store::catalog::CatalogError),
    /// Retention planning or pruning failed.
    #[error(transparent)]
    Prune(#[from] crate::engine::prune::PruneError),
    /// The Bacula plugin string or job state is invalid.
    #[error(transparent)]
    Plugin(#[from] crate::bacula::PluginError),
    /// An I/O error with the path it concerns.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else, already worded for the operator.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The exit status of `vm-backup backup` (and of the C ABI's backup call), per DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitStatus {
    /// 0: the backup completed and every post-check passed.
    Success,
    /// 1: aborted before the VM was touched (a pre-check failed).
    PreCheckFailed,
    /// 2: failed; the VM was restored to normal and the partial backup removed.
    Failed,
    /// 3: completed, but a post-check warned.
    Warning,
}

impl ExitStatus {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::PreCheckFailed => 1,
            ExitStatus::Failed => 2,
            ExitStatus::Warning => 3,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            ExitStatus::Success => "success",
            ExitStatus::PreCheckFailed => "pre-check failed",
            ExitStatus::Failed => "failed",
            ExitStatus::Warning => "completed with warnings",
        };
        f.write_str(word)
    }
}
