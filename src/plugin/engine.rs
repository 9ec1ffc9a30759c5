//! The plugin's calls into the engine: the backup of `vm-backup backup` ([`run_backup`], direct
//! mode) and the restore of `vm-backup restore` ([`crate::restore::restore`]). Kept in one place
//! so the plugin never grows a second code path.

use std::path::PathBuf;

use super::{PluginArgs, PluginError};
use crate::backup::{run_backup, BackupRequest};
use crate::config::{Inventory, Settings};
use crate::metadata::{BackupMetadata, Method};
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

/// The engine's request for a plugin string, built as `vm-backup backup` builds it: the method
/// from the string, else from the inventory, else auto; the inventory entry for appliances.
pub fn request(args: &PluginArgs, settings: &Settings) -> Result<BackupRequest, PluginError> {
    let inventory = Inventory::load(&settings.inventory)
        .map_err(|e| PluginError::Engine(format!("vm-backup: {e}")))?;
    let entry = inventory.vm(&args.vm).cloned();
    let mut request = BackupRequest::new(&args.vm, settings.clone());
    request.method = args
        .method
        .or(entry.as_ref().map(|e| e.method))
        .unwrap_or(Method::Auto);
    request.vm_entry = entry;
    Ok(request)
}

/// Runs the engine's backup exactly as `vm-backup backup` does. Failures (exit 1 and 2) come back
/// as errors worded for the job log, naming the exit status, VM, phase and cause.
pub fn backup_direct(
    args: &PluginArgs,
    settings: &Settings,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<DirectBackup, PluginError> {
    let request = request(args, settings)?;
    let outcome = run_backup(&request, progress, cancel);
    match (outcome.status, outcome.backup_dir) {
        (ExitStatus::Success | ExitStatus::Warning, Some(dir)) => Ok(DirectBackup {
            status: outcome.status,
            dir,
            warnings: outcome.warnings,
        }),
        (status, _) => {
            if cancel.is_cancelled() {
                return Err(PluginError::Canceled);
            }
            Err(PluginError::Engine(format!(
                "vm-backup: backup of {} {} (exit {}): {}",
                args.vm,
                status,
                status.code(),
                outcome.error.unwrap_or_else(|| "no backup folder".into())
            )))
        }
    }
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
