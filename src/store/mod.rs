//! The backup target: the only code that touches its files, and the catalog index on it.
//!
//! A backup is written into `<stamp>.partial/` ([`PartialBackup`], from
//! [`FolderStore::begin`]); every file goes in durably (temporary name, fsync, rename, fsync
//! of the folder: [`write_atomic`] from bytes, [`StagedFile`] for what the copier fills), and
//! [`PartialBackup::publish`] renames the folder to `<stamp>` once all is synced. Dropped
//! unpublished, the guard removes the folder. Names come from [`crate::format::layout`];
//! the metadata bytes from [`crate::format::metadata`].
//!
//! [`BackupStore`] holds the operations any target offers (list, read, write a small file,
//! delete); [`FolderStore`] is the one implementation today, a local or NFS-mounted folder.
//! An object-storage target is a second implementation of that trait (with its own partial
//! upload), without a change to the engine's callers of the trait.

use std::path::{Path, PathBuf};

use crate::error::ErrorKind;

pub mod catalog;
mod dirfd;
mod durable;
mod folder;
pub mod offsite;
mod target;
pub mod verified_read;

pub use durable::{write_atomic, StagedFile};
pub use folder::{
    delete_backup, remove_partial, write_backup_file, write_metadata, FolderStore, PartialBackup,
};
pub use target::{LockMode, TargetLock, TargetMarker, TARGET_FORMAT_VERSION};

/// The operations any backup target offers, by host, VM and stamp (object-safe).
pub trait BackupStore: std::fmt::Debug + Send + Sync {
    /// Where the target is, for logs and messages.
    fn location(&self) -> String;
    /// The stamps of the published backups of `vm` on `host`, oldest first (none: empty).
    fn backups(&self, host: &str, vm: &str) -> Result<Vec<String>, StoreError>;
    /// The content of the file `name` of a published backup.
    fn read(&self, host: &str, vm: &str, stamp: &str, name: &str) -> Result<Vec<u8>, StoreError>;
    /// Replaces (durably) the small file `name` of a published backup: metadata, log.
    fn write(
        &self,
        host: &str,
        vm: &str,
        stamp: &str,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError>;
    /// Deletes a published backup; returns where it was.
    fn delete(&self, host: &str, vm: &str, stamp: &str) -> Result<PathBuf, StoreError>;
}

/// Errors of the backup target.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on the target failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A name from the layout is invalid.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
    /// A file or folder name would leave its folder or is hidden.
    #[error("{0:?} is not a valid name inside a backup")]
    BadName(String),
    /// The backup to begin is already published.
    #[error("backup folder {0} already exists")]
    Exists(PathBuf),
    /// The backup asked for is not there.
    #[error("backup folder {0} does not exist")]
    NotFound(PathBuf),
    /// The folder has no target marker: not mounted, or not initialised.
    #[error("{0} is not an initialised backup target (no .vm-backup-target.json): mount the share or run `vm-backup init`")]
    NotInitialised(PathBuf),
    /// The target marker does not parse.
    #[error("target marker {path} is unreadable: {reason}")]
    BadMarker {
        /// The marker file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A group to give access to does not exist.
    #[error("no group named {0:?}")]
    UnknownGroup(String),
    /// A symlink was found where the store writes or reads; it is never followed.
    #[error("{0} is a symlink; the target's files are never reached through one")]
    Symlink(PathBuf),
    /// Another run holds the VM's lock on the target.
    #[error("another vm-backup run holds the lock {0}")]
    Busy(PathBuf),
    /// The metadata could not be encoded.
    #[error("cannot encode backup-metadata.json: {0}")]
    Encode(#[source] serde_json::Error),
}

/// For callers whose errors carry an `io::Error` and the path already (the journal, metrics,
/// appliance configs): an I/O failure is its own `io::Error` (OS error code kept), any other
/// failure wraps the store error.
impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io { source, .. } => source,
            other => std::io::Error::other(other),
        }
    }
}

impl StoreError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Io { source, .. } => ErrorKind::from_target_io(source),
            StoreError::Layout(e) => e.kind(),
            StoreError::BadName(_) => ErrorKind::InvalidInput,
            StoreError::Exists(_) => ErrorKind::Busy,
            StoreError::NotFound(_) => ErrorKind::NotFound,
            StoreError::Encode(_) => ErrorKind::Internal,
            StoreError::NotInitialised(_) => ErrorKind::TargetMissing,
            StoreError::BadMarker { .. } => ErrorKind::TargetFailing,
            StoreError::UnknownGroup(_) => ErrorKind::InvalidInput,
            StoreError::Symlink(_) => ErrorKind::TargetFailing,
            StoreError::Busy(_) => ErrorKind::Busy,
        }
    }

    /// The underlying I/O error, if any.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Logs and builds an I/O error on `path`.
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        tracing::debug!(path = %path.display(), "target: cannot {action}: {source}");
        StoreError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// A scratch folder for the store's unit tests: on tmpfs (`/dev/shm`) when there is one, so
/// that they stay off the disk and meet a file system that may refuse O_DIRECT.
#[cfg(test)]
pub(crate) fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("vmb-store-")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().expect("a temporary folder")
}
