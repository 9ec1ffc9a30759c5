//! The plugin's two calls into the engine: the backup of `vm-backup backup` (direct mode) and the
//! restore of `vm-backup restore`. Kept in one place so the plugin never grows a second code path.

use std::path::PathBuf;

use super::{PluginArgs, PluginError};
use crate::config::Settings;
use crate::metadata::BackupMetadata;
use crate::progress::{CancelToken, Progress};
use crate::ExitStatus;

/// A direct-mode backup that reached the target.
#[derive(Debug, Clone)]
pub struct DirectBackup {
    /// Success or Warning (post-check warnings).
    pub status: ExitStatus,
    /// The published backup folder.
    pub dir: PathBuf,
    /// Post-check warnings.
    pub warnings: Vec<String>,
}

/// Runs the engine's backup exactly as `vm-backup backup` does. Failures (exit 1 and 2) come back
/// as errors worded for the job log.
pub fn backup_direct(
    args: &PluginArgs,
    settings: &Settings,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<DirectBackup, PluginError> {
    let _ = (args, settings, progress, cancel);
    Err(PluginError::Engine(
        "vm-backup: the backup engine is not built into this library yet".into(),
    ))
}

/// Restores the VM of a direct-mode backup from the target named in the plugin string (or the
/// configuration): to its own name when `where_` is empty, else under a new name with its disks
/// in `where_`. Returns a line for the job log.
pub fn restore_direct(
    settings: &Settings,
    meta: &BackupMetadata,
    where_: &str,
    force: bool,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<String, PluginError> {
    let _ = (settings, meta, where_, force, progress, cancel);
    Err(PluginError::Engine(
        "vm-backup: restore is not built into this library yet".into(),
    ))
}
