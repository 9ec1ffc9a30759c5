//! The off-site copy's work: [`push`] published backups from the primary target to an
//! S3-compatible [`OffsiteStore`], [`verify`] what is there, [`restore`] a VM from it, and
//! [`prune`] it by its own retention, then collect the chunks no manifest references.
//!
//! The store (chunk ids, encryption, S3 requests, locks) is `store::offsite`; the format and
//! the choices are in `docs/offsite.md`.
//!
//! ```no_run
//! use vm_backup::engine::offsite::{push, PushOptions, Selection};
//! use vm_backup::progress::{CancelToken, NoProgress};
//! use vm_backup::store::offsite::{key, s3, OffsiteStore, S3Client, S3Config};
//! use vm_backup::store::FolderStore;
//!
//! let cfg = S3Config::new("http://127.0.0.1:9400", "backups", "site1");
//! let client = S3Client::new(&cfg, s3::credentials(&cfg, None)?)?;
//! let master = key::load("/etc/vm-backup/offsite.key".as_ref(), None)?;
//! let store = OffsiteStore::open(client, &master, true)?;
//! let primary = FolderStore::open("/mnt/backup")?;
//! let report = push(&primary, "hv1", &Selection::All, &store, &PushOptions::default(),
//!                   &NoProgress, &CancelToken::new())?;
//! println!("{} backups pushed", report.pushed().count());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod prune;
mod push;
mod restore;
mod verify;

use std::path::PathBuf;

pub use prune::{prune, PruneOptions, PruneReport};
pub use push::{push, PushOptions, PushReport, PushedBackup, Selection};
pub use restore::{restore, OffsiteRestoreRequest};
pub use verify::{verify, ChunkFault, OffsiteVerifyReport};

pub use crate::store::offsite::OffsiteStore;

/// Errors of the off-site work.
#[derive(Debug, thiserror::Error)]
pub enum OffsiteRunError {
    /// The off-site store failed (server, credentials, key, damaged object).
    #[error(transparent)]
    Store(#[from] crate::store::offsite::OffsiteError),
    /// The primary target refused (not initialised, busy, I/O).
    #[error(transparent)]
    Primary(#[from] crate::store::StoreError),
    /// A name on the primary target is invalid.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A backup on the primary target does not match its own manifest or checksums: it was
    /// altered or damaged since it was written, and is not copied off-site.
    #[error("backup {backup}: {file} chunk {chunk} does not match its recorded SHA-256 (expected {expected}, read {actual}): altered or damaged on the primary target, not pushed")]
    Altered {
        /// `host/vm/stamp`.
        backup: String,
        /// The file.
        file: String,
        /// The chunk index.
        chunk: u64,
        /// Recorded.
        expected: String,
        /// Read.
        actual: String,
    },
    /// A chunk off-site failed its check: restore refuses it.
    #[error("off-site backup {backup}: {file} chunk {chunk} (object {id}): {reason}")]
    Damaged {
        /// `host/vm/stamp`.
        backup: String,
        /// The file.
        file: String,
        /// The chunk index.
        chunk: u64,
        /// The chunk id.
        id: String,
        /// What failed.
        reason: String,
    },
    /// No such backup off-site.
    #[error("no off-site backup {0}")]
    NotFound(String),
    /// The restore of the staged backup failed.
    #[error(transparent)]
    Restore(#[from] Box<crate::engine::restore::RestoreError>),
    /// The run was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl OffsiteRunError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            OffsiteRunError::Store(e) => e.kind(),
            OffsiteRunError::Primary(e) => e.kind(),
            OffsiteRunError::Layout(e) => e.kind(),
            OffsiteRunError::Io { .. } => ErrorKind::Io,
            OffsiteRunError::Altered { .. } | OffsiteRunError::Damaged { .. } => ErrorKind::Corrupt,
            OffsiteRunError::NotFound(_) => ErrorKind::NotFound,
            OffsiteRunError::Restore(e) => e.kind(),
            OffsiteRunError::Cancelled => ErrorKind::Cancelled,
        }
    }

    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        OffsiteRunError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// `host/vm/stamp`, as messages name a backup.
pub(crate) fn backup_name(host: &str, vm: &str, stamp: &str) -> String {
    format!("{host}/{vm}/{stamp}")
}

/// Lowercase hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
