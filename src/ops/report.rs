//! After every backup run, whoever drives it (the CLI or the Bacula plugin): record the run in
//! the catalog on the share, alert Slack on a failure or a warning, and write the metrics
//! textfile. All of it is best effort: a problem here is a warning, never a failed backup.
//!
//! [`Reporter`] is the engine's [`BackupObserver`] that does it when the run is
//! [`BackupEvent::Finished`]; [`after_backup_run`] is the same work for one outcome.

use std::path::Path;

use chrono::{DateTime, Local};
use serde::Serialize;

use crate::config::Settings;
use crate::engine::backup::{self as engine, BackupEvent, BackupObserver, BackupRequest};
use crate::ops::notify::{self, Delivery};
use crate::ops::outcome::BackupOutcome;
use crate::progress::{Level, Progress};
use crate::store::catalog::FailedRun;

/// The observer the drivers pass to [`crate::engine::backup::run_backup`]: records the finished
/// run in the catalog, alerts Slack when it failed or warned, updates the metrics textfile,
/// and tells `progress` about anything that went wrong doing so.
pub struct Reporter<'p> {
    progress: &'p dyn Progress,
}

impl<'p> Reporter<'p> {
    /// A reporter whose own warnings go to `progress` (and to `tracing`).
    pub fn new(progress: &'p dyn Progress) -> Self {
        Self { progress }
    }
}

impl BackupObserver for Reporter<'_> {
    fn on_event(&self, event: &BackupEvent<'_>) {
        if let BackupEvent::Finished {
            request,
            started,
            outcome,
        } = event
        {
            after_run(request, outcome, *started, self.progress);
        }
    }
}

/// Reports one finished run; `started` is when the run began.
pub fn after_run(
    request: &BackupRequest,
    outcome: &engine::BackupOutcome,
    started: DateTime<Local>,
    progress: &dyn Progress,
) {
    let settings = &request.settings;
    let after = match (&outcome.metadata, &outcome.error) {
        (Some(meta), None) => after_backup_run(
            settings,
            &BackupOutcome::Published(meta),
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
            after_backup_run(settings, &BackupOutcome::Failed(&failed), None)
        }
    };
    for warning in after.warnings() {
        tracing::warn!(vm = %request.vm, "{warning}");
        progress.message(Level::Warning, &warning);
    }
    crate::ops::status::refresh_page(settings, progress);
}

/// What [`after_backup_run`] did; every part is best effort and none fails the backup.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AfterRun {
    /// The catalog error, if recording failed.
    pub catalog_error: Option<String>,
    /// The Slack alert.
    pub alert: Delivery,
    /// The metrics error, if writing the textfile failed (`None` also when not configured).
    pub metrics_error: Option<String>,
}

impl AfterRun {
    /// Warnings worth a line in the run's log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.catalog_error {
            out.push(format!("catalog not updated: {e}"));
        }
        if let Delivery::Failed { attempts, reason } = &self.alert {
            out.push(format!(
                "Slack alert not delivered after {attempts} attempt(s): {reason}"
            ));
        }
        if let Some(e) = &self.metrics_error {
            out.push(format!("metrics file not written: {e}"));
        }
        out
    }
}

/// Everything ops does after a backup run, in one call for the backup workflow (CLI and
/// plugin): records the run in the catalog on `settings.target` ([`crate::store::catalog::record_backup`]
/// or [`crate::store::catalog::record_failure`]), sends the Slack alert when the run failed or warned
/// ([`notify::alert_backup`]), and updates the Prometheus textfile when `settings.metrics_file` is set
/// ([`crate::ops::metrics::record_run`]). `backup_dir` is the published folder (for
/// [`BackupOutcome::Published`]). Never fails; bounded by the Slack budget.
pub fn after_backup_run(
    settings: &Settings,
    outcome: &BackupOutcome<'_>,
    backup_dir: Option<&Path>,
) -> AfterRun {
    let catalog_error = match outcome {
        BackupOutcome::Published(meta) => {
            let dir = backup_dir.map(Path::to_path_buf).unwrap_or_else(|| {
                settings
                    .target
                    .join(crate::format::layout::safe_component(&meta.host).unwrap_or_default())
                    .join(crate::format::layout::safe_component(&meta.vm_name).unwrap_or_default())
                    .join(&meta.stamp)
            });
            crate::store::catalog::record_backup(&settings.target, meta, &dir).err()
        }
        BackupOutcome::Failed(f) => {
            crate::store::catalog::record_failure(&settings.target, f).err()
        }
    }
    .map(|e| e.to_string());
    let metrics_error = settings
        .metrics_file
        .as_deref()
        .and_then(|path| crate::ops::metrics::record_run(path, outcome).err())
        .map(|e| e.to_string());
    let alert = notify::alert_backup(settings, outcome);
    let after = AfterRun {
        catalog_error,
        alert,
        metrics_error,
    };
    for w in after.warnings() {
        tracing::warn!("{w}");
    }
    after
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backup::{BackupOutcome as Outcome, Phase};
    use crate::ExitStatus;

    #[test]
    fn the_reporter_records_a_finished_failed_run_and_ignores_the_other_events() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("vm-backup.prom");
        let settings = Settings {
            target: dir.path().join("target"),
            hostname: Some("hv-test".into()),
            metrics_file: Some(metrics.clone()),
            ..Settings::default()
        };
        crate::store::FolderStore::init(&settings.target, None).unwrap();
        let request = BackupRequest::new("web01", settings);
        let outcome = Outcome {
            status: ExitStatus::PreCheckFailed,
            exit_code: 1,
            vm: "web01".into(),
            backup_dir: None,
            metadata: None,
            frozen_ms: None,
            seconds: 0.1,
            error: Some("VM \"web01\": checks failed: no domain".into()),
            failed_phase: Some(Phase::Checks),
            warnings: Vec::new(),
            failure: None,
        };
        let reporter = Reporter::new(&crate::progress::NoProgress);
        reporter.on_event(&BackupEvent::PhaseStarted {
            phase: Phase::Checks,
        });
        assert!(!metrics.exists(), "only the end of a run is reported");
        reporter.on_event(&BackupEvent::Finished {
            request: &request,
            started: Local::now(),
            outcome: &outcome,
        });
        let text = std::fs::read_to_string(&metrics).unwrap();
        assert!(
            text.contains("vm_backup_last_run_result{host=\"hv-test\",vm=\"web01\"} 1"),
            "{text}"
        );
        let failed = request
            .settings
            .target
            .join("metadata")
            .join(crate::store::catalog::FAILURES_DIR);
        assert!(failed.is_dir(), "failed run recorded in the catalog");
    }
}
