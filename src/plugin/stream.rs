//! Stream mode: the disk images, the domain XML and the NVRAM travel through Bacula as virtual
//! files, read from the engine's backup session (the unchanging base images while the guest
//! runs on the overlay), which is finished (snapshot committed) after the last disk.

use std::path::Path;

use super::job::VirtualFile;
use super::{PluginArgs, PluginError};
use crate::config::Settings;
use crate::progress::{CancelToken, Progress};

/// An open backup session of the engine; dropping it commits the snapshot.
pub struct StreamSession {
    _private: (),
}

impl StreamSession {
    /// Prepares the session (checks, freeze/snapshot).
    pub fn prepare(
        args: &PluginArgs,
        settings: &Settings,
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<Self, PluginError> {
        let _ = (args, settings, progress, cancel);
        Err(PluginError::Engine(
            "vm-backup: mode=stream is not built into this library yet".into(),
        ))
    }

    /// The files to send, disks first.
    pub fn files(&self, mtime: i64) -> Vec<VirtualFile> {
        let _ = mtime;
        Vec::new()
    }

    /// Commits the snapshot and returns the checksum and metadata files.
    pub fn finish(
        self,
        progress: &dyn Progress,
        cancel: &CancelToken,
        mtime: i64,
    ) -> Result<Vec<VirtualFile>, PluginError> {
        let _ = (progress, cancel, mtime);
        Ok(Vec::new())
    }
}

/// What a stream backup would send, without touching the VM.
pub fn estimate(
    args: &PluginArgs,
    settings: &Settings,
    stamp: &str,
    mtime: i64,
) -> Result<Vec<VirtualFile>, PluginError> {
    let _ = (args, settings, stamp, mtime);
    Ok(Vec::new())
}

/// Restores the VM from a backup folder rebuilt from the streamed files.
pub fn restore_staged(
    settings: &Settings,
    staged: &Path,
    where_: &str,
    force: bool,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<String, PluginError> {
    let _ = (settings, staged, where_, force, progress, cancel);
    Err(PluginError::Engine(
        "vm-backup: stream restore is not built into this library yet".into(),
    ))
}
