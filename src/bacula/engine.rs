//! The plugin's calls into the engine: the backup of `vm-backup backup` ([`run_backup`], direct
//! mode) and the restore of `vm-backup restore` ([`crate::engine::restore::restore`]). Kept in one place
//! so the plugin never grows a second code path.

use std::path::PathBuf;

use super::{PluginArgs, PluginError};
use crate::config::Settings;
use crate::engine::backup::{configured_inventory, run_backup, BackupRequest};
use crate::engine::restore::{restore, RestoreOutcome, RestoreRequest, StampChoice};
use crate::format::layout::VmDir;
use crate::format::metadata::BackupMetadata;
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
    /// The level that ran, and why when it is not the one asked (for the job log).
    pub level_report: String,
    /// The job report: VM, method and level, frozen window, bytes, duration, throughput, the
    /// published folder and the warnings, in one line for the job log.
    pub report: String,
}

/// The engine's request for a plugin string, built as `vm-backup backup` builds it: the method
/// from the string, else from the inventory, else auto; the inventory entry for appliances. A
/// missing inventory file means no inventory (as the command line), not an error.
pub fn request(args: &PluginArgs, settings: &Settings) -> Result<BackupRequest, PluginError> {
    let inventory = configured_inventory(settings)?;
    Ok(
        BackupRequest::from_inventory(&args.vm, settings.clone(), inventory.as_ref())
            .with_method(args.method)
            .with_appliance(std::sync::Arc::new(crate::ops::appliance::SshAppliance)),
    )
}

/// The disks a backup of the plugin string's VM would copy, with their allocated sizes, read
/// without touching the VM (the engine's [`crate::engine::backup::checks::estimate_disks`]).
pub fn estimate_disks(
    args: &PluginArgs,
    settings: &Settings,
) -> Result<Vec<crate::engine::backup::checks::EstimatedDisk>, PluginError> {
    let request = BackupRequest::new(&args.vm, settings.clone());
    crate::engine::backup::checks::estimate_disks(&request).map_err(|e| PluginError::Backup {
        vm: args.vm.clone(),
        status: e.status,
        source: std::sync::Arc::new(e),
        release_problems: Vec::new(),
    })
}

/// Runs the engine's backup exactly as `vm-backup backup` does. Failures (exit 1 and 2) come back
/// as errors worded for the job log, naming the exit status, VM, phase and cause.
pub fn backup_direct(
    args: &PluginArgs,
    settings: &Settings,
    level: crate::format::metadata::BackupLevel,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<DirectBackup, PluginError> {
    let mut request = request(args, settings)?;
    request.level = level;
    request.checkpoint_full = true;
    let reporter = crate::ops::report::Reporter::new(progress);
    let outcome = run_backup(&request, progress, &reporter, cancel);
    let level_report = match &outcome.metadata {
        Some(m) => match (&m.chain.level_note, &m.chain.parent) {
            (Some(note), Some(p)) => format!("level {} ran, on top of {p}: {note}", m.level()),
            (Some(note), None) => format!("level {} ran: {note}", m.level()),
            (None, Some(p)) => format!("level {} ran, on top of {p}", m.level()),
            (None, None) => format!("level {} ran", m.level()),
        },
        None => String::new(),
    };
    let report = job_report(&args.vm, &outcome);
    match (outcome.status, outcome.backup_dir) {
        (ExitStatus::Success | ExitStatus::Warning, Some(dir)) => Ok(DirectBackup {
            status: outcome.status,
            dir,
            warnings: outcome.warnings,
            level_report,
            report,
        }),
        (status, _) => {
            if cancel.is_cancelled() {
                return Err(PluginError::Canceled);
            }
            match outcome.failure {
                Some(source) => Err(PluginError::Backup {
                    vm: args.vm.clone(),
                    status,
                    source,
                    release_problems: outcome.warnings,
                }),
                None => Err(PluginError::Protocol(
                    "the engine's backup ended without a folder and without an error",
                )),
            }
        }
    }
}

/// The job report of a finished backup, one line: VM, method, level, frozen window, bytes,
/// duration, throughput, the published folder and the warnings.
pub fn job_report(vm: &str, outcome: &crate::engine::backup::BackupOutcome) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let Some(m) = &outcome.metadata else {
        return format!("vm-backup: job report: VM {vm}: {}", outcome.status);
    };
    let frozen = m.frozen_ms.map_or_else(
        || "not frozen".to_string(),
        |ms| format!("frozen {ms:.0} ms"),
    );
    let folder = outcome
        .backup_dir
        .as_ref()
        .map_or_else(|| "-".to_string(), |d| d.display().to_string());
    let warnings = if outcome.warnings.is_empty() {
        "none".to_string()
    } else {
        format!(
            "{} ({})",
            outcome.warnings.len(),
            outcome.warnings.join("; ")
        )
    };
    format!(
        "vm-backup: job report: VM {vm}, method {}, level {}, {frozen}, {:.1} MiB in {:.1} s ({:.1} MiB/s), folder {folder}, result {}, warnings: {warnings}",
        m.method,
        m.level(),
        m.total_bytes as f64 / MIB,
        outcome.seconds,
        m.bytes_per_sec / MIB,
        outcome.status,
    )
}

/// Restores the VM of a direct-mode backup from the target named in the plugin string (or the
/// configuration), with the engine's restore (`vm-backup restore`): to its own name when
/// `where_` is empty (refused while that domain runs; an existing shut-off definition is
/// replaced only with `force`, Bacula's `replace=always`), else its disks go into `where_` and
/// the domain is defined as `<vm>-restored`. Returns a line for the job log.
pub fn restore_direct(
    settings: &Settings,
    meta: &BackupMetadata,
    where_: &str,
    force: bool,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<String, PluginError> {
    let mut request = RestoreRequest::new(
        &settings.target,
        &meta.host,
        &meta.vm_name,
        StampChoice::Stamp(meta.stamp.clone()),
    );
    request.libvirt_uri = settings.libvirt_uri.clone();
    request.force = force;
    crate::store::FolderStore::open(&settings.target)?;
    request.backup_dir =
        Some(VmDir::new(&settings.target, &meta.host, &meta.vm_name)?.backup_dir(&meta.stamp));
    if let Some(dir) = super::where_dir(where_) {
        crate::engine::restore::apply::create_disk_dir(dir).map_err(|source| {
            PluginError::Restore {
                vm: meta.vm_name.clone(),
                source: Box::new(source),
            }
        })?;
        request.disk_dir = Some(dir.to_path_buf());
        request.new_name = Some(super::restored_name(&meta.vm_name));
    }
    finish_restore(restore(&request, progress, cancel), &meta.vm_name, cancel)
}

/// Words a restore's result for the job log.
pub fn finish_restore(
    result: Result<RestoreOutcome, crate::engine::restore::RestoreError>,
    vm: &str,
    cancel: &CancelToken,
) -> Result<String, PluginError> {
    match result {
        Ok(out) => Ok(format!(
            "restored backup {} of {vm} as domain {} ({}; disks: {})",
            out.stamp,
            out.domain,
            if out.replaced {
                "replaced the old definition"
            } else {
                "defined"
            },
            out.disks
                .iter()
                .map(|d| format!("{}={}", d.target, d.path.display()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(_) if cancel.is_cancelled() => Err(PluginError::Canceled),
        Err(source) => Err(PluginError::Restore {
            vm: vm.to_string(),
            source: Box::new(source),
        }),
    }
}

/// The `vm-backup` program the verify-on-read layer runs as `vm-backup verified-serve`:
/// `$VMB_PROGRAM`, else `/usr/bin/vm-backup`, else the one built beside this library (the
/// cargo target folder, as the shim's default library path).
fn helper_program() -> PathBuf {
    if let Some(p) = std::env::var_os("VMB_PROGRAM").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let installed = PathBuf::from("/usr/bin/vm-backup");
    if installed.exists() {
        return installed;
    }
    PathBuf::from(env!("VMB_BUILD_PROGRAM"))
}

/// What [`extract_guest_files`] returns: the files layer's warnings, and a report per path.
pub type GuestFilesReport = (
    Vec<String>,
    Vec<(String, crate::engine::files::ExtractReport)>,
);

/// Extracts each guest path of the restore options from `vm`'s backup `stamp` (or the folder
/// `backup_dir`) into `dest` with owner, mode and times, through the engine's `files extract`
/// (every byte checked against the chunk manifest). Stops at the first path that fails,
/// naming it. Returns the warnings of the files layer (a journal not replayed) and a report
/// per path.
#[allow(clippy::too_many_arguments)]
pub fn extract_guest_files(
    settings: &Settings,
    host: &str,
    vm: &str,
    stamp: &str,
    backup_dir: Option<PathBuf>,
    opts: &super::options::RestoreOptions,
    dest: &std::path::Path,
    cancel: &CancelToken,
) -> Result<GuestFilesReport, PluginError> {
    use crate::engine::files::Browse;
    use crate::engine::mount::MountRequest;
    let mut req = MountRequest::new(
        &settings.target,
        host,
        vm,
        StampChoice::Stamp(stamp.to_string()),
        &settings.journal_dir,
        helper_program(),
    );
    req.backup.backup_dir = backup_dir;
    req.disk = opts.disk.clone();
    let first = opts.files.first().cloned().unwrap_or_default();
    let browse = Browse::open(&req).map_err(|e| PluginError::FileRestore {
        path: first,
        source: Box::new(e),
    })?;
    let mut reports = Vec::new();
    for path in &opts.files {
        if cancel.is_cancelled() {
            return Err(PluginError::Canceled);
        }
        let r = browse
            .extract(path, dest)
            .map_err(|e| PluginError::FileRestore {
                path: path.clone(),
                source: Box::new(e),
            })?;
        reports.push((path.clone(), r));
    }
    Ok((browse.state().warnings.clone(), reports))
}
