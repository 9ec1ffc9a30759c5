//! After every backup run, whoever drives it (the CLI or the Bacula plugin): record the run in
//! the catalog on the share, alert Slack on a failure or a warning, and write the metrics
//! textfile. All of it is best effort: a problem here is a warning, never a failed backup.

use chrono::{DateTime, Local};

use crate::ops::notify;
use crate::progress::{Level, Progress};
use crate::store::catalog::FailedRun;

use crate::engine::backup::{BackupOutcome, BackupRequest};

/// Reports one finished run; `started` is when the run began.
pub fn after_run(
    request: &BackupRequest,
    outcome: &BackupOutcome,
    started: DateTime<Local>,
    progress: &dyn Progress,
) {
    let settings = &request.settings;
    let after = match (&outcome.metadata, &outcome.error) {
        (Some(meta), None) => notify::after_backup_run(
            settings,
            &notify::BackupOutcome::Published(meta),
            outcome.backup_dir.as_deref(),
        ),
        _ => {
            let failed = FailedRun {
                host: settings.host(),
                vm: request.vm.clone(),
                stamp: crate::format::layout::stamp_for(started),
                started_at: started.to_rfc3339(),
                finished_at: Local::now().to_rfc3339(),
                result: outcome.status,
                error: outcome.error.clone().unwrap_or_default(),
                method: Some(request.method),
            };
            notify::after_backup_run(settings, &notify::BackupOutcome::Failed(&failed), None)
        }
    };
    for warning in after.warnings() {
        tracing::warn!(vm = %request.vm, "{warning}");
        progress.message(Level::Warning, &warning);
    }
    crate::ops::status::refresh_page(settings, progress);
}
