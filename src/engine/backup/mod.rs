//! The backup workflow: pre-checks, freeze/snapshot, copy, commit, publish, post-checks;
//! guards, journal and orphan repair.
//!
//! ## The job as phases
//!
//! ```text
//! prepare:  lock + journal ─► repair what an earlier run left ─► pre-checks ─► method choice
//!           ─► [appliance: write memory] ─► [offline --shutdown: clean shutdown]
//!           ─► [quiesce|snapshot: ONE external, disk-only, atomic, no-metadata snapshot of all
//!               copied disks, with the quiesce flag for quiesce (freeze+snapshot+thaw in one
//!               libvirt call, timed as the frozen window)]
//! direct:   .partial folder ─► copy every base image and its backing chain (copier, SHA-256
//!           both ways) [offline: under QEMU-compatible image locks]
//! finish:   blockcommit --active --shallow + pivot per disk ─► overlays deleted ─► domain checked
//!           on its original images ─► [restart after --shutdown]
//! direct:   XML, NVRAM, configs, checksums.sha256, backup-metadata.json, backup.log
//!           ─► post-checks of the `.partial` folder re-read from the share (page cache
//!           dropped; a failure is exit 2 and nothing is published) ─► fsync ─► rename
//!           `<stamp>.partial` → `<stamp>` ─► domain check (exit 3 on a warning)
//! ```
//!
//! Every acquired state (overlay, possibly frozen guest, domain shut down by us, `.partial`
//! folder) is written to the local journal ([`journal`]) *before* it is acquired, and released
//! by [`BackupSession`]'s `Drop` on every error path (including SIGINT/SIGTERM through the
//! [`CancelToken`], which the copy polls). What a `kill -9` leaves is repaired by the next run
//! of the same VM or by `vm-backup orphans --cleanup` ([`orphans`]).
//!
//! ## Using it
//!
//! The command line and the C ABI's direct mode build a [`BackupRequest`] with
//! [`BackupRequest::from_inventory`] and call [`run_backup`], which returns a
//! [`BackupOutcome`] (exit status, folder, metadata, error naming VM, phase and cause) and
//! tells the driver's [`BackupObserver`] what happens ([`BackupEvent`]): the engine itself
//! sends no alert and writes no catalog or metrics. Appliances (`write memory`, configuration
//! capture) go through the request's [`ApplianceHook`].
//!
//! The Bacula plugin's stream mode drives the phases itself:
//!
//! ```no_run
//! use std::sync::Arc;
//! use vm_backup::engine::backup::{BackupRequest, BackupSession};
//! use vm_backup::progress::{CancelToken, NoProgress};
//!
//! let request = BackupRequest::new("web01", vm_backup::config::Settings::default());
//! let cancel = CancelToken::new();
//! let mut session = BackupSession::prepare(&request, Arc::new(NoProgress), cancel)?;
//! for disk in session.disks() {
//!     // read disk.source (the frozen base image, `disk.format`, `disk.allocated_size`
//!     // bytes allocated) and send it as `disk.file_name`; the guest writes into an overlay.
//!     let _ = (&disk.source, &disk.file_name);
//!     // ... and every image of its backing chain, each as its own file (BackingRecord).
//!     for b in &disk.backing_chain {
//!         let _ = (&b.path, &b.file_name, &b.format);
//!     }
//! }
//! let _xml: &str = session.domain_xml(); // send as `<vm>.xml`
//! let _nvram = session.nvram_path();     // send as `<vm>-nvram.fd` when Some
//! session.record_phase("copy", 12.5);    // the driver's own timing
//! session.finish()?;                     // commit + pivot, overlays deleted, restart if needed
//! // DiskRecords of what was sent (sha256 + manifest from the copier's hashing), other files:
//! let metadata = session.metadata_for(Vec::new(), vec!["web01.xml".into()]);
//! let _json = serde_json::to_string_pretty(&metadata);
//! let _problems = session.close();       // journal cleared, lock released
//! # Ok::<(), vm_backup::engine::backup::BackupError>(())
//! ```
//!
//! `prepare` takes the progress sink either borrowed (`&dyn Progress`, the session then lives
//! as long as the borrow) or shared (`Arc<dyn Progress>`, a `BackupSession<'static>` that can
//! be kept in the plugin's job state across File Daemon events; sessions are `Send`). The
//! [`CancelToken`] is polled during the copy, the shutdown wait and the debug pause; the
//! commit always runs to the end.
//!
//! Errors are [`BackupError`]s: VM, [`Phase`], a typed [`Cause`] (which decides the
//! [`crate::error::ErrorKind`]) and the exit status they mean (1 before the VM was touched,
//! 2 after). A guest that could not be thawed, a commit that did not converge (even with
//! the guest paused `commit_pause_max_seconds`) and a copy that failed its post-checks are
//! exit 2 and fatal. [`BackupOutcome::warnings`] (exit 3) are only problems that do not touch
//! the data of a published backup (appliance capture, the domain check, Slack).
//!
//! Dropping a session without [`BackupSession::finish`] (an error, a cancel) commits and
//! pivots the overlays, thaws, restarts a domain it shut down and removes its `.partial`
//! folder; [`BackupSession::close`] does the same and reports what could not be released.

mod appliance;
pub mod chain;
pub mod checks;
mod commit;
mod direct;
mod disks;
mod error;
mod events;
mod guards;
pub mod incremental;
pub mod journal;
pub mod orphans;
mod problem;
mod runlog;
mod session;
mod thaw;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::config::{ConfigError, Inventory, Settings, VmEntry};
use crate::copier::CopyOptions;
use crate::format::metadata::{BackupLevel, BackupMetadata, Method};
use crate::progress::{CancelToken, Progress};
use crate::ExitStatus;

pub use appliance::{ApplianceFailure, ApplianceHook};
pub use commit::DEBUG_COMMIT_BANDWIDTH_ENV;
pub use error::{BackupError, Cause, ToolError};
pub use events::{BackupEvent, BackupObserver, NoObserver, ObserverRef};
pub use problem::{Problem, ProblemKind, Problems};
pub use runlog::RunLog;
pub use session::{BackupSession, SessionDisk};
pub use thaw::ThawError;

/// The environment variable that makes the engine pause (polling cancellation) for this many
/// milliseconds after the snapshot and the `.partial` folder exist, before the copy. A test
/// hook for crash and full-target tests; never set in production.
pub const DEBUG_PAUSE_ENV: &str = "VMB_DEBUG_PAUSE_BEFORE_COPY_MS";

/// The environment variable that makes the engine pause this many milliseconds once the
/// `.partial` folder is complete, before its post-checks (a test hook to corrupt a copy;
/// never set in production).
pub const DEBUG_PAUSE_POSTCHECK_ENV: &str = "VMB_DEBUG_PAUSE_BEFORE_POSTCHECK_MS";

/// The environment variable that makes the pre-checks pause this many milliseconds right
/// after the guest agent answered its ping, before the quiesced snapshot (a test hook to hang
/// the agent between the ping and the freeze; never set in production).
pub const DEBUG_PAUSE_AFTER_PING_ENV: &str = "VMB_DEBUG_PAUSE_AFTER_PING_MS";

/// The marker in the file names of the overlays this engine creates.
pub const OVERLAY_MARKER: &str = ".vmb-overlay-";

/// The phases of a backup, as named in errors and in `phases` of the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connection, lock, repair of leftovers, pre-checks.
    Checks,
    /// Repair of what an earlier run left behind.
    Repair,
    /// Clean shutdown for an offline backup of a running domain.
    Shutdown,
    /// The external snapshot (with freeze for quiesce).
    Snapshot,
    /// Copying disk images.
    Copy,
    /// Block commit and pivot back to the base images.
    Commit,
    /// Writing XML, NVRAM, configs, checksums, metadata and renaming the folder.
    Publish,
    /// Post-checks of the published backup and the domain.
    PostChecks,
    /// Starting again a domain shut down for the backup.
    Restart,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Checks => "checks",
            Phase::Repair => "repair",
            Phase::Shutdown => "shutdown",
            Phase::Snapshot => "snapshot",
            Phase::Copy => "copy",
            Phase::Commit => "commit",
            Phase::Publish => "publish",
            Phase::PostChecks => "post-checks",
            Phase::Restart => "restart",
        })
    }
}

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// Domain name.
    pub vm: String,
    /// Method asked for (`auto` picks per domain).
    pub method: Method,
    /// Site settings (target, host name, journal folder, timeouts, libvirt URI).
    pub settings: Settings,
    /// The VM's inventory entry, if listed (appliance capture).
    pub vm_entry: Option<VmEntry>,
    /// Offline method on a running domain: shut it down cleanly and start it again after.
    pub shutdown: bool,
    /// When quiesce is impossible (agent hung or absent), take a crash-consistent snapshot
    /// instead of failing (recorded in `method_note`).
    pub crash_consistent_fallback: bool,
    /// Copier settings (hashing is always both per-chunk and whole-file).
    pub copy_options: CopyOptions,
    /// Full, incremental or differential (see [`incremental`]).
    pub level: BackupLevel,
    /// Start a chain with a full: create the checkpoint `vmb-<stamp>` the next incremental
    /// counts from. Off by default (a plain full leaves the domain as it was); `--level` and
    /// the Bacula plugin in direct mode set it. Incrementals and differentials always do.
    pub checkpoint_full: bool,
    /// What talks to an appliance listed in the inventory (`write memory`, configuration
    /// capture); without it an appliance is backed up like any VM, with a warning.
    pub appliance: Option<Arc<dyn ApplianceHook>>,
}

/// The copier settings of a backup: O_DIRECT on both ends (the frozen base is read without
/// filling this host's page cache, the share is written without dirtying it), and every
/// written block read back from the share as soon as its write completes and compared with
/// what was hashed, so that the post-checks need not read the images a second time
/// (docs/performance.md, section 8). Where a filesystem refuses O_DIRECT the copier falls back
/// and says so, and the post-checks then re-read that image as before.
pub fn backup_copy_options() -> CopyOptions {
    CopyOptions {
        direct_read: true,
        direct_write: true,
        read_back: true,
        ..CopyOptions::default()
    }
}

impl BackupRequest {
    /// A request with the defaults: method auto, no shutdown, no fallback.
    pub fn new(vm: &str, settings: Settings) -> Self {
        Self {
            vm: vm.to_string(),
            method: Method::Auto,
            settings,
            vm_entry: None,
            shutdown: false,
            crash_consistent_fallback: false,
            copy_options: backup_copy_options(),
            level: BackupLevel::Full,
            checkpoint_full: false,
            appliance: None,
        }
    }

    /// Sets what talks to appliances (see [`ApplianceHook`]).
    pub fn with_appliance(mut self, hook: Arc<dyn ApplianceHook>) -> Self {
        self.appliance = Some(hook);
        self
    }

    /// The request every driver builds (the command line and the Bacula plugin): the VM's
    /// inventory entry when it is listed (appliance capture) and its method, else `auto`. A
    /// driver's own method (`--method`, `method=` in the plugin string) goes on top with
    /// [`Self::with_method`]. `None` (no inventory) is the same as an inventory without the VM.
    pub fn from_inventory(vm: &str, settings: Settings, inventory: Option<&Inventory>) -> Self {
        let entry = inventory.and_then(|i| i.vm(vm)).cloned();
        let mut request = Self::new(vm, settings);
        request.method = entry.as_ref().map_or(Method::Auto, |e| e.method);
        request.vm_entry = entry;
        request
    }

    /// Overrides the method when `method` is given (the driver's choice beats the inventory).
    pub fn with_method(mut self, method: Option<Method>) -> Self {
        if let Some(m) = method {
            self.method = m;
        }
        self
    }
}

/// The inventory named in the settings (`inventory:`), or `None` when that file does not
/// exist: a site without an inventory backs VMs up with method `auto` and no appliance
/// capture. A file that exists but does not parse is an error. (What `vm-backup backup` does
/// without `--inventory`; the Bacula plugin does the same.)
pub fn configured_inventory(settings: &Settings) -> Result<Option<Inventory>, ConfigError> {
    if settings.inventory.exists() {
        Inventory::load(&settings.inventory).map(Some)
    } else {
        Ok(None)
    }
}

/// What a backup run produced; what the CLI prints with `--json` and the C ABI returns.
#[derive(Debug, Clone, Serialize)]
pub struct BackupOutcome {
    /// The exit status (0/1/2/3).
    pub status: ExitStatus,
    /// The process exit code for `status`.
    pub exit_code: i32,
    /// The domain name.
    pub vm: String,
    /// The published folder (also set for status 3).
    pub backup_dir: Option<PathBuf>,
    /// The metadata written into the folder.
    pub metadata: Option<BackupMetadata>,
    /// Top-level copy of `metadata.frozen_ms` for readers of `--json`.
    pub frozen_ms: Option<f64>,
    /// Seconds of the whole run.
    pub seconds: f64,
    /// The error (VM, phase, cause) when the backup did not complete.
    pub error: Option<String>,
    /// The failed phase.
    pub failed_phase: Option<Phase>,
    /// Warnings (post-checks, appliance capture…).
    pub warnings: Vec<String>,
    /// The error itself, for drivers that report it typed (the Bacula plugin).
    #[serde(skip)]
    pub failure: Option<std::sync::Arc<BackupError>>,
}

/// A [`Progress`] sink held by a session: borrowed for one call ([`run_backup`]) or shared
/// (the C ABI keeps a session across calls).
#[derive(Clone)]
pub enum ProgressRef<'a> {
    /// Borrowed for the session's lifetime.
    Borrowed(&'a dyn Progress),
    /// Shared ownership.
    Shared(Arc<dyn Progress>),
}

impl ProgressRef<'_> {
    /// The sink.
    pub fn get(&self) -> &dyn Progress {
        match self {
            ProgressRef::Borrowed(p) => *p,
            ProgressRef::Shared(p) => p.as_ref(),
        }
    }
}

impl<'a> From<&'a dyn Progress> for ProgressRef<'a> {
    fn from(p: &'a dyn Progress) -> Self {
        ProgressRef::Borrowed(p)
    }
}

impl<P: Progress + 'static> From<Arc<P>> for ProgressRef<'_> {
    fn from(p: Arc<P>) -> Self {
        ProgressRef::Shared(p)
    }
}

impl From<Arc<dyn Progress>> for ProgressRef<'_> {
    fn from(p: Arc<dyn Progress>) -> Self {
        ProgressRef::Shared(p)
    }
}

/// Runs a whole backup in direct mode (the engine writes the folder on the target): what
/// `vm-backup backup` and the plugin's `mode=direct` do. Never panics on bad input; every
/// acquired state is released before it returns. `observer` is told every [`BackupEvent`],
/// ending with [`BackupEvent::Finished`] once everything is released: the drivers pass the
/// observer that records the run in the catalog, alerts Slack and writes the metrics
/// (`ops::report::Reporter`); the engine itself reports nothing.
pub fn run_backup(
    request: &BackupRequest,
    progress: &dyn Progress,
    observer: &dyn BackupObserver,
    cancel: &CancelToken,
) -> BackupOutcome {
    let started = chrono::Local::now();
    observer.on_event(&BackupEvent::Started {
        request,
        at: started,
    });
    let outcome = run_session(request, progress, observer, cancel);
    observer.on_event(&BackupEvent::Finished {
        request,
        started,
        outcome: &outcome,
    });
    outcome
}

/// [`run_backup`] between its first and its last event.
fn run_session(
    request: &BackupRequest,
    progress: &dyn Progress,
    observer: &dyn BackupObserver,
    cancel: &CancelToken,
) -> BackupOutcome {
    let t0 = std::time::Instant::now();
    let mut session =
        match BackupSession::prepare_observed(request, progress, observer, cancel.clone()) {
            Ok(s) => s,
            Err(e) => return outcome_from_error(request, e, t0, Vec::new()),
        };
    match session.run_direct() {
        Ok(()) => {
            let (metadata, backup_dir) = session.published();
            let warnings = metadata
                .as_ref()
                .map(|m| m.warnings.clone())
                .unwrap_or_default();
            let status = if warnings.is_empty() {
                ExitStatus::Success
            } else {
                ExitStatus::Warning
            };
            let frozen_ms = metadata.as_ref().and_then(|m| m.frozen_ms);
            drop(session);
            BackupOutcome {
                status,
                exit_code: status.code(),
                vm: request.vm.clone(),
                backup_dir,
                metadata,
                frozen_ms,
                seconds: t0.elapsed().as_secs_f64(),
                error: None,
                failed_phase: None,
                warnings,
                failure: None,
            }
        }
        Err(e) => {
            // Release everything now (commit, thaw, restart, remove the partial folder) and
            // report anything that could not be released along with the error.
            let mut release_problems = session.close();
            let mut warnings = Vec::new();
            warnings.append(&mut release_problems);
            outcome_from_error(request, e, t0, warnings)
        }
    }
}

fn outcome_from_error(
    request: &BackupRequest,
    e: BackupError,
    t0: std::time::Instant,
    warnings: Vec<String>,
) -> BackupOutcome {
    let mut error = e.to_string();
    if !warnings.is_empty() {
        error.push_str(&format!(" (and while releasing: {})", warnings.join("; ")));
    }
    BackupOutcome {
        status: e.status,
        exit_code: e.status.code(),
        vm: request.vm.clone(),
        backup_dir: None,
        metadata: None,
        frozen_ms: None,
        seconds: t0.elapsed().as_secs_f64(),
        error: Some(error),
        failed_phase: Some(e.phase),
        warnings,
        failure: Some(std::sync::Arc::new(e)),
    }
}

/// Seconds per phase, in the order they ran.
pub(crate) type PhaseTimes = BTreeMap<String, f64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_can_move_between_threads_and_errors_name_vm_and_phase() {
        fn assert_send<T: Send>() {}
        assert_send::<BackupSession<'static>>();
        assert_send::<BackupOutcome>();
        let e = BackupError::failed(
            "Prüf VM",
            Phase::Copy,
            Cause::Copy {
                label: "vda".into(),
                source: crate::copier::CopyError::NoSpace {
                    path: "/t/vda.qcow2".into(),
                    offset: 0,
                },
            },
        );
        assert_eq!(e.kind(), crate::error::ErrorKind::TargetFull);
        assert_eq!(e.status, ExitStatus::Failed);
        let text = e.to_string();
        assert!(text.contains("\"Prüf VM\"") && text.contains("copy") && text.contains("no space"));
        let pre = BackupError::pre("x", Cause::Cancelled);
        assert_eq!(pre.status.code(), 1);
        assert_eq!(pre.kind(), crate::error::ErrorKind::Cancelled);
    }

    #[test]
    fn the_request_takes_method_and_entry_from_the_inventory_and_the_driver_wins() {
        let inventory = Inventory::parse(
            "vms:\n  - name: fw01\n    method: offline\n    appliance: asav\n",
            std::path::Path::new("vm-list.yaml"),
        )
        .unwrap();
        let listed = BackupRequest::from_inventory("fw01", Settings::default(), Some(&inventory));
        assert_eq!(listed.method, Method::Offline);
        assert_eq!(
            listed
                .vm_entry
                .as_ref()
                .and_then(|e| e.appliance.as_deref()),
            Some("asav")
        );
        let ours = listed.with_method(Some(Method::Snapshot));
        assert_eq!(ours.method, Method::Snapshot);
        for inv in [Some(&inventory), None] {
            let r =
                BackupRequest::from_inventory("web01", Settings::default(), inv).with_method(None);
            assert_eq!(r.method, Method::Auto);
            assert!(r.vm_entry.is_none());
        }
        let settings = Settings {
            inventory: "/nonexistent/vm-list.yaml".into(),
            ..Settings::default()
        };
        assert!(configured_inventory(&settings).unwrap().is_none());
    }

    /// Records the events it is told, by name.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<String>>);

    impl BackupObserver for Recorder {
        fn on_event(&self, event: &BackupEvent<'_>) {
            let name = match event {
                BackupEvent::Started { .. } => "started".to_string(),
                BackupEvent::PhaseStarted { phase } => format!("{phase} started"),
                BackupEvent::PhaseFinished { phase, .. } => format!("{phase} finished"),
                BackupEvent::FrozenWindow { .. } => "frozen".to_string(),
                BackupEvent::DiskCopyStarted { file, .. } => format!("copying {file}"),
                BackupEvent::DiskCopied { file, .. } => format!("copied {file}"),
                BackupEvent::Warning { .. } => "warning".to_string(),
                BackupEvent::CommitPaused { target, .. } => format!("commit of {target} paused"),
                BackupEvent::Finished { outcome, .. } => format!("finished {}", outcome.status),
            };
            self.0.lock().unwrap().push(name);
        }
    }

    #[test]
    fn a_refused_backup_tells_the_observer_it_started_and_finished() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            target: dir.path().to_path_buf(),
            journal_dir: dir.path().join("journal"),
            // Nothing answers there: the pre-checks fail at the connection.
            libvirt_uri: format!(
                "qemu+unix:///system?socket={}",
                dir.path().join("none").display()
            ),
            ..Settings::default()
        };
        let request = BackupRequest::new("vmb-test", settings);
        let recorder = Recorder::default();
        let outcome = run_backup(
            &request,
            &crate::progress::NoProgress,
            &recorder,
            &CancelToken::new(),
        );
        assert_eq!(outcome.status, ExitStatus::PreCheckFailed);
        let events = recorder.0.lock().unwrap().clone();
        assert_eq!(
            events,
            ["started", "checks started", "finished pre-check failed"]
        );
    }
}
