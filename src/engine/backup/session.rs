//! [`BackupSession`]: the VM side of a backup (lock, journal, repair, pre-checks, shutdown,
//! snapshot, commit, restart) with a `Drop` guard that releases everything it acquired.
//!
//! A session is three parts: the [`Run`] every phase shares (request, connection, journal,
//! log, times, warnings), the [`Plan`] the pre-checks decided (method, disks), and what it
//! [`Held`]s, one guard per acquired thing ([`super::guards`]). Read the phases in order:
//!
//! 1. [`BackupSession::prepare`]: lock + journal, repair of an earlier run, pre-checks
//!    ([`Plan`], [`AgentTimeout`]), appliance `write memory`;
//! 2. `shut_down` ([`ShutDown`]) and `lock_images` ([`ImageLocks`]) for the offline method,
//!    or `take_snapshot` ([`Overlays`]) for quiesce and snapshot: the base images stop
//!    changing;
//! 3. the copy: by the driver (stream mode), or `run_direct` in `direct.rs`
//!    ([`PartialFolder`]);
//! 4. [`BackupSession::finish`]: image locks dropped, overlays committed back, the domain
//!    restarted, the agent timeout reset;
//! 5. direct mode: publish and post-checks (`direct.rs`);
//! 6. [`BackupSession::close`] (or `Drop`): whatever is still held is released, the journal
//!    cleared when that all worked.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Local};

use crate::config::VmEntry;
use crate::format::layout::{self, VmDir};
use crate::format::metadata::{BackupMetadata, DiskRecord, Method, SkippedDisk};
use crate::hv::image_lock::ImageLock;
use crate::hv::{Dom, DomState, Hypervisor};
use crate::progress::{CancelToken, Level, Progress};

use super::chain::BackingImage;
use super::checks::{self, PreCheck};
use super::commit;
use super::guards::PartialFolder;
use super::guards::{AgentTimeout, ImageLocks, MayBeFrozen, Overlays, ShutDown};
use super::journal::{Journal, OverlayRecord};
use super::{
    orphans, BackupError, BackupEvent, BackupRequest, Cause, ObserverRef, Phase, PhaseTimes,
    ProgressRef, RunLog, ToolError, OVERLAY_MARKER,
};

/// One disk the backup copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDisk {
    /// Target device (`vda`).
    pub target: String,
    /// The base image: what the domain runs on normally, and what to copy. Unchanging while
    /// the session holds its overlay (or while the domain is shut off).
    pub source: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Allocated bytes of the image on the host.
    pub allocated_size: u64,
    /// The file name inside the backup folder (`<vm>-<target>.<ext>`).
    pub file_name: String,
    /// The base image's own backing file, when it has one (the first of `backing_chain`).
    pub backing_file: Option<PathBuf>,
    /// Every image below the base (its backing file and theirs, top to bottom): copied too,
    /// each as its own file, so that the backup restores on its own. Unchanging during the
    /// backup like the base (nothing writes into backing files).
    pub backing_chain: Vec<BackingImage>,
}

/// What every phase of a session shares: the request, the connection, the journal (which
/// holds the VM's lock), the run's log, its phase times and warnings.
pub(super) struct Run<'a> {
    pub(super) progress: ProgressRef<'a>,
    pub(super) observer: ObserverRef<'a>,
    pub(super) cancel: CancelToken,
    pub(super) log: RunLog,
    pub(super) request: BackupRequest,
    pub(super) hv: Hypervisor,
    pub(super) dom: Dom,
    pub(super) journal: Journal,
    pub(super) uuid: String,
    pub(super) host: String,
    pub(super) stamp: String,
    pub(super) started_at: DateTime<Local>,
    pub(super) t0: Instant,
    pub(super) phases: PhaseTimes,
    pub(super) warnings: Vec<String>,
    /// How long the guest was frozen (quiesce), once the snapshot is taken.
    pub(super) frozen_ms: Option<f64>,
}

impl Run<'_> {
    /// Logs a line into the run's log and the progress sink.
    pub(super) fn log(&self, level: Level, text: &str) {
        self.log.log(self.progress.get(), level, text);
    }

    /// Records a warning (the run ends with status 3) and tells the observer.
    pub(super) fn warn(&mut self, text: String) {
        self.log(Level::Warning, &text);
        self.observer.emit(BackupEvent::Warning { text: &text });
        self.warnings.push(text);
    }

    /// A failure of `phase` (status 2), logged.
    pub(super) fn failed(&self, phase: Phase, cause: impl Into<Cause>) -> BackupError {
        let e = BackupError::failed(&self.request.vm, phase, cause);
        self.log(Level::Error, &e.to_string());
        e
    }

    /// After libvirtd restarted (the connection no longer answers): reconnects within
    /// [`super::guards::RECONNECT_BOUND`] and looks the domain up again.
    pub(super) fn reconnect_if_dropped(&mut self) -> Result<(), crate::hv::LibvirtError> {
        if self.hv.is_alive() {
            return Ok(());
        }
        self.log(
            Level::Warning,
            "the connection to libvirt dropped (libvirtd restarted?): reconnecting",
        );
        self.hv.reconnect(super::guards::RECONNECT_BOUND)?;
        self.dom = self.hv.domain(&self.request.vm)?;
        self.log(Level::Info, "reconnected to libvirt");
        Ok(())
    }

    /// The guest was paused `ms` so that the commit of `target` converged: logged, added to
    /// `commit-pause` in the phases of the metadata, told to the observer.
    pub(super) fn record_commit_pause(&mut self, target: &str, ms: f64) {
        *self.phases.entry("commit-pause".into()).or_insert(0.0) += ms / 1000.0;
        self.log(
            Level::Warning,
            &format!("{target}: the guest was paused {ms:.0} ms so that the commit converged"),
        );
        self.observer.emit(BackupEvent::CommitPaused { target, ms });
    }

    /// Tells the observer a phase begins.
    pub(super) fn phase_started(&self, phase: Phase) {
        self.observer.emit(BackupEvent::PhaseStarted { phase });
    }

    /// Records a phase's time (in `phases` of the metadata) and tells the observer it ended.
    pub(super) fn phase_finished(&mut self, phase: Phase, seconds: f64) {
        self.phases.insert(phase.to_string(), seconds);
        self.observer
            .emit(BackupEvent::PhaseFinished { phase, seconds });
    }
}

/// What the pre-checks decided: the method and what to copy.
pub(super) struct Plan {
    pub(super) method: Method,
    pub(super) method_note: Option<String>,
    pub(super) disks: Vec<SessionDisk>,
    pub(super) skipped: Vec<SkippedDisk>,
    pub(super) inactive_xml: String,
    pub(super) nvram: Option<PathBuf>,
    /// Level, parent and checkpoint of this backup (`incremental.rs`).
    pub(super) chain: crate::format::metadata::ChainInfo,
}

/// The guards a session holds, in the order the phases acquire them (see [`super::guards`]).
/// Released in the reverse order by [`BackupSession::finish`] (the VM's) and
/// [`BackupSession::close`] or `Drop` (everything).
#[derive(Debug, Default)]
pub(super) struct Held {
    pub(super) agent_timeout: Option<AgentTimeout>,
    pub(super) shut_down: Option<ShutDown>,
    pub(super) image_locks: Option<ImageLocks>,
    pub(super) overlays: Option<Overlays>,
    pub(super) frozen: Option<MayBeFrozen>,
    pub(super) partial: Option<PartialFolder>,
    /// The checkpoint (and, incremental, backup job and scratch) of this run.
    pub(super) checkpointed: Option<super::incremental::Checkpointed>,
}

/// A backup in progress. See the module documentation of [`crate::engine::backup`] for the
/// phases; each phase holds a guard of what it acquired (`guards.rs`), released on every
/// error path.
pub struct BackupSession<'a> {
    pub(super) run: Run<'a>,
    pub(super) plan: Plan,
    pub(super) held: Held,
    /// Direct mode: what the copy phase wrote.
    pub(super) copied: Vec<DiskRecord>,
    /// Direct mode: the image files the copy read back from the share block by block
    /// (`CopyOptions::read_back`), with their stamp then: the post-checks need not re-read
    /// them while the stamp is unchanged.
    pub(super) read_back: std::collections::BTreeMap<String, super::checks::FileStamp>,
    /// Direct mode: the published metadata and folder.
    pub(super) published: Option<(BackupMetadata, PathBuf)>,
    closed: bool,
}

impl std::fmt::Debug for BackupSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession")
            .field("vm", &self.run.request.vm)
            .field("stamp", &self.run.stamp)
            .field("method", &self.plan.method)
            .field("held", &self.held)
            .finish()
    }
}

impl<'a> BackupSession<'a> {
    /// Checks, repairs leftovers, chooses the method and brings the domain into a state where
    /// its base images can be read: after this returns, [`Self::disks`] lists images that do
    /// not change until [`Self::finish`] (the guest writes into overlays, or is shut off).
    ///
    /// Errors: status 1 (pre-check; nothing was touched) or 2 (the snapshot or shutdown
    /// failed; whatever was acquired has been released).
    pub fn prepare(
        request: &BackupRequest,
        progress: impl Into<ProgressRef<'a>>,
        cancel: CancelToken,
    ) -> Result<Self, BackupError> {
        Self::prepare_observed(request, progress, ObserverRef::default(), cancel)
    }

    /// [`Self::prepare`], telling `observer` the phases, the frozen window, the copies and
    /// the warnings of this session as they happen (see [`BackupEvent`]).
    pub fn prepare_observed(
        request: &BackupRequest,
        progress: impl Into<ProgressRef<'a>>,
        observer: impl Into<ObserverRef<'a>>,
        cancel: CancelToken,
    ) -> Result<Self, BackupError> {
        let progress = progress.into();
        let observer = observer.into();
        observer.emit(BackupEvent::PhaseStarted {
            phase: Phase::Checks,
        });
        let log = RunLog::new();
        let vm = request.vm.as_str();
        let settings = &request.settings;
        let t0 = Instant::now();
        let started_at = Local::now();
        log.log(
            progress.get(),
            Level::Info,
            &format!(
                "backup of VM {vm:?} starting: method {} requested, target {}, vm-backup {}",
                request.method,
                settings.target.display(),
                crate::VERSION
            ),
        );
        let host = settings.host();
        let vm_dir =
            VmDir::new(&settings.target, &host, vm).map_err(|e| BackupError::pre(vm, e))?;
        let store = crate::store::FolderStore::open(&settings.target)
            .map_err(|e| BackupError::pre(vm, Cause::Store(e)))?;
        let hv = Hypervisor::connect(&settings.libvirt_uri).map_err(|e| BackupError::pre(vm, e))?;
        let dom = hv.domain(vm).map_err(|e| BackupError::pre(vm, e))?;
        let (mut journal, previous) =
            Journal::open(&settings.journal_dir, vm).map_err(|e| BackupError::pre(vm, e))?;
        let target_lock = store
            .lock_vm(&host, vm, crate::store::LockMode::Exclusive)
            .map_err(|e| BackupError::pre(vm, Cause::Store(e)))?;
        journal.hold(target_lock);

        // Repair what an interrupted run left, before looking at anything else.
        if let Some(prev) = previous {
            log.log(
                progress.get(),
                Level::Warning,
                &format!(
                    "an earlier run (pid {}, stamp {}, phase {}) did not finish: repairing its leftovers",
                    prev.pid, prev.stamp, prev.phase
                ),
            );
            let actions = orphans::repair_record(&hv, &prev, settings, progress.get(), &log)
                .map_err(|cause| {
                    // A guest still frozen or stranded on an overlay is a failure (exit 2),
                    // not a refused pre-check.
                    let status = match cause {
                        orphans::OrphanError::Thaw(_)
                        | orphans::OrphanError::Commit(_)
                        | orphans::OrphanError::StillOnOverlay { .. } => crate::ExitStatus::Failed,
                        _ => crate::ExitStatus::PreCheckFailed,
                    };
                    let e = BackupError {
                        vm: vm.to_string(),
                        phase: Phase::Repair,
                        status,
                        cause: Box::new(cause.into()),
                    };
                    log.log(progress.get(), Level::Error, &e.to_string());
                    e
                })?;
            for a in actions {
                log.log(progress.get(), Level::Info, &format!("repaired: {a}"));
            }
            journal.clear().map_err(|e| BackupError::pre(vm, e))?;
        }
        // `.partial` folders of this VM: we hold its lock, so no run is writing them.
        if let Ok(partials) = vm_dir.partial_dirs() {
            for p in partials {
                match crate::store::remove_partial(&p) {
                    Ok(()) => log.log(
                        progress.get(),
                        Level::Warning,
                        &format!(
                            "removed the partial backup {} left by an interrupted run",
                            p.display()
                        ),
                    ),
                    Err(e) => return Err(BackupError::pre(vm, Cause::Store(e))),
                }
            }
        }

        let pre: PreCheck =
            checks::pre_check(&dom, request).map_err(|e| BackupError::pre(vm, e))?;
        for note in &pre.notes {
            log.log(progress.get(), Level::Info, note);
        }
        log.log(
            progress.get(),
            Level::Info,
            &format!(
                "pre-checks passed: domain {}, method {}{}, {} disk(s) to copy ({} bytes allocated), {} skipped, target has {} bytes free",
                pre.state,
                pre.method,
                pre.method_note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
                pre.disks.len(),
                pre.disks.iter().map(|d| d.allocated_size).sum::<u64>(),
                pre.skipped.len(),
                pre.free_bytes
            ),
        );
        for s in &pre.skipped {
            log.log(
                progress.get(),
                Level::Info,
                &format!("disk {} skipped: {}", s.target, s.reason),
            );
        }
        for d in &pre.disks {
            if !d.backing_chain.is_empty() {
                log.log(
                    progress.get(),
                    Level::Info,
                    &format!(
                        "disk {} ({}) has a backing chain of {} image(s), copied too: {}",
                        d.target,
                        d.source.display(),
                        d.backing_chain.len(),
                        d.backing_chain
                            .iter()
                            .map(|b| format!(
                                "{} ({}) as {}",
                                b.path.display(),
                                b.format,
                                b.file_name
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }

        let stamp = unique_stamp(&vm_dir);
        journal
            .update(|r| {
                r.vm = vm.to_string();
                r.uuid = pre.uuid.clone();
                r.pid = std::process::id();
                r.started_at = started_at.to_rfc3339();
                r.stamp = stamp.clone();
                r.method = Some(pre.method);
                r.phase = "prepare".into();
            })
            .map_err(|e| BackupError::pre(vm, e))?;

        let mut phases = PhaseTimes::new();
        phases.insert("checks".into(), t0.elapsed().as_secs_f64());
        observer.emit(BackupEvent::PhaseFinished {
            phase: Phase::Checks,
            seconds: t0.elapsed().as_secs_f64(),
        });
        let mut session = BackupSession {
            run: Run {
                progress,
                observer,
                cancel,
                log,
                request: request.clone(),
                hv,
                dom,
                journal,
                uuid: pre.uuid,
                host,
                stamp,
                started_at,
                t0,
                phases,
                warnings: Vec::new(),
                frozen_ms: None,
            },
            plan: Plan {
                method: pre.method,
                method_note: pre.method_note,
                disks: pre.disks,
                skipped: pre.skipped,
                inactive_xml: pre.inactive_xml,
                nvram: pre.nvram,
                chain: Default::default(),
            },
            held: Held {
                agent_timeout: pre.agent_timeout_set.then_some(AgentTimeout),
                ..Held::default()
            },
            copied: Vec::new(),
            read_back: Default::default(),
            published: None,
            closed: false,
        };
        // From here on, Drop releases whatever is acquired.
        session.appliance_write_memory();
        match session.plan.method {
            Method::Offline => {
                session.decide_level(false);
                if pre.state.is_live() {
                    session.shut_down(pre.agent_connected)?;
                }
                session.lock_images()?;
            }
            Method::Quiesce | Method::Snapshot => {
                let parent = session.decide_level(pre.state.is_live());
                let increment = match parent {
                    Some(p) => session.take_increment(&p)?,
                    None => false,
                };
                if !increment {
                    session.checkpoint_for_full();
                    session.take_snapshot()?;
                }
            }
            Method::Auto => {
                return Err(BackupError::pre(vm, Cause::Internal("no method chosen")));
            }
        }
        Ok(session)
    }

    /// The domain name.
    pub fn vm(&self) -> &str {
        &self.run.request.vm
    }

    /// The domain UUID.
    pub fn uuid(&self) -> &str {
        &self.run.uuid
    }

    /// The backup stamp (`YYYY-MM-DD-HHMMSS`).
    pub fn stamp(&self) -> &str {
        &self.run.stamp
    }

    /// The method in use (never `auto`).
    pub fn method(&self) -> Method {
        self.plan.method
    }

    /// Why a weaker method than asked is used, if so.
    pub fn method_note(&self) -> Option<&str> {
        self.plan.method_note.as_deref()
    }

    /// How long the guest was frozen (quiesce), milliseconds.
    pub fn frozen_ms(&self) -> Option<f64> {
        self.run.frozen_ms
    }

    /// The disks to copy, in order.
    pub fn disks(&self) -> &[SessionDisk] {
        &self.plan.disks
    }

    /// The disks not copied, with the reason.
    pub fn skipped_disks(&self) -> &[SkippedDisk] {
        &self.plan.skipped
    }

    /// The inactive domain XML with security info, as defined before the snapshot (`<vm>.xml`).
    pub fn domain_xml(&self) -> &str {
        &self.plan.inactive_xml
    }

    /// The UEFI NVRAM file, when the domain has one (`<vm>-nvram.fd`).
    pub fn nvram_path(&self) -> Option<&Path> {
        self.plan.nvram.as_deref()
    }

    /// The inventory entry of the VM, if any.
    pub fn vm_entry(&self) -> Option<&VmEntry> {
        self.run.request.vm_entry.as_ref()
    }

    /// Warnings so far.
    pub fn warnings(&self) -> &[String] {
        &self.run.warnings
    }

    /// The run's log so far (what `backup.log` holds).
    pub fn log_text(&self) -> String {
        self.run.log.text()
    }

    /// Logs a line into the run's log and the progress sink (drivers may add their own).
    pub fn log(&self, level: Level, text: &str) {
        self.run.log(level, text);
    }

    /// Records a warning (the run ends with status 3).
    pub fn warn(&mut self, text: String) {
        self.run.warn(text);
    }

    pub(super) fn progress(&self) -> &dyn Progress {
        self.run.progress.get()
    }

    pub(super) fn phase_started(&self, phase: Phase) {
        self.run.phase_started(phase);
    }

    pub(super) fn phase_finished(&mut self, phase: Phase, seconds: f64) {
        self.run.phase_finished(phase, seconds);
    }

    pub(super) fn failed(&self, phase: Phase, cause: impl Into<Cause>) -> BackupError {
        self.run.failed(phase, cause)
    }

    /// Releases the VM: commits and pivots every overlay back into its base, deletes the
    /// overlays, checks the domain runs on its original images, and starts a domain shut
    /// down for the backup. Call once the base images have been read. Status 2 on failure
    /// (the journal keeps what is left for `vm-backup orphans`).
    pub fn finish(&mut self) -> Result<(), BackupError> {
        if let Some(locks) = self.held.image_locks.take() {
            // The locks kept QEMU off the images; make sure nothing else changed the domain.
            let state = self
                .run
                .dom
                .state()
                .map_err(|e| self.failed(Phase::Copy, e))?;
            drop(locks);
            if state != DomState::ShutOff {
                return Err(self.failed(Phase::Copy, Cause::StartedDuringCopy(state)));
            }
            self.log(Level::Info, "image locks released");
        }
        if let Some(overlays) = &mut self.held.overlays {
            self.run.phase_started(Phase::Commit);
            let t = Instant::now();
            self.run.log(
                Level::Info,
                "committing the overlays back into the base images",
            );
            overlays
                .release(&mut self.run)
                .map_err(|c| self.run.failed(Phase::Commit, c))?;
            self.held.overlays = None;
            self.phase_finished(Phase::Commit, t.elapsed().as_secs_f64());
        }
        if let Some(shut_down) = &mut self.held.shut_down {
            self.run.phase_started(Phase::Restart);
            let t = Instant::now();
            shut_down
                .release(&mut self.run)
                .map_err(|c| self.run.failed(Phase::Restart, c))?;
            self.held.shut_down = None;
            self.phase_finished(Phase::Restart, t.elapsed().as_secs_f64());
        }
        if let Some(timeout) = self.held.agent_timeout.take() {
            timeout.release(&self.run.dom);
        }
        Ok(())
    }

    /// Releases everything still held (overlays, frozen guest, shut-down domain, `.partial`
    /// folder, journal) and returns what could not be released. Dropping the session does
    /// the same, silently.
    pub fn close(mut self) -> Vec<String> {
        self.release_all()
    }

    /// Releases every guard still held, in the reverse order of acquisition; clears the
    /// journal when all went well, else keeps it for `vm-backup orphans`.
    fn release_all(&mut self) -> Vec<String> {
        if self.closed {
            return Vec::new();
        }
        self.closed = true;
        let held = &mut self.held;
        let run = &mut self.run;
        held.image_locks = None;
        let mut problems = Vec::new();
        if let Some(frozen) = &mut held.frozen {
            // The failed snapshot's undo already retried within the bound: one more call.
            match frozen.release(run, Duration::ZERO) {
                Ok(()) => held.frozen = None,
                Err(e) => problems.push(format!("thaw: {e}")),
            }
        }
        if let Some(overlays) = &mut held.overlays {
            match overlays.release(run) {
                Ok(()) => held.overlays = None,
                Err(e) => problems.push(format!("commit: {e}")),
            }
        }
        if let Some(shut_down) = &mut held.shut_down {
            match shut_down.release(run) {
                Ok(()) => held.shut_down = None,
                Err(e) => problems.push(format!("restart: {e}")),
            }
        }
        if let Some(timeout) = held.agent_timeout.take() {
            timeout.release(&run.dom);
        }
        if let Some(c) = &mut held.checkpointed {
            match c.release(run) {
                Ok(()) => held.checkpointed = None,
                Err(e) => problems.push(format!("checkpoint: {e}")),
            }
        }
        if let Some(partial) = &mut held.partial {
            match partial.release(run) {
                Ok(()) => held.partial = None,
                Err(e) => problems.push(e.to_string()),
            }
        }
        if problems.is_empty() {
            if let Err(e) = run.journal.clear() {
                problems.push(e.to_string());
            }
        } else {
            for p in &problems {
                run.log(
                    Level::Error,
                    &format!(
                        "could not release: {p} (recorded in {}; run `vm-backup orphans --cleanup`)",
                        run.journal.path().display()
                    ),
                );
            }
        }
        problems
    }

    fn appliance_write_memory(&mut self) {
        let Some(entry) = self.run.request.vm_entry.clone() else {
            return;
        };
        if !super::appliance::is_supported(&entry) {
            return;
        }
        let Some(hook) = self.run.request.appliance.clone() else {
            self.warn("appliance: no appliance support in this driver: write memory and configuration capture skipped".to_string());
            return;
        };
        self.log(Level::Info, "appliance: write memory before the snapshot");
        if let Err(e) = hook.write_memory(&entry, &self.run.request.settings.ssh) {
            self.warn(format!("appliance write memory failed: {e}"));
        }
    }

    fn shut_down(&mut self, agent: bool) -> Result<(), BackupError> {
        self.phase_started(Phase::Shutdown);
        let t = Instant::now();
        let bound = Duration::from_secs(self.run.request.settings.timeouts.shutdown_seconds);
        self.run
            .journal
            .update(|r| {
                r.phase = "shutdown".into();
                r.shut_down_by_us = true;
            })
            .map_err(|e| self.failed(Phase::Shutdown, e))?;
        self.held.shut_down = Some(ShutDown);
        self.log(
            Level::Info,
            &format!(
                "shutting the domain down cleanly ({}; at most {} s)",
                if agent {
                    "guest agent, then ACPI"
                } else {
                    "ACPI"
                },
                bound.as_secs()
            ),
        );
        self.run
            .dom
            .request_shutdown(agent)
            .map_err(|e| self.failed(Phase::Shutdown, e))?;
        let cancel = self.run.cancel.clone();
        self.run
            .dom
            .wait_shut_off(bound, &|| cancel.is_cancelled())
            .map_err(|e| self.failed(Phase::Shutdown, e))?;
        self.phase_finished(Phase::Shutdown, t.elapsed().as_secs_f64());
        self.log(
            Level::Info,
            &format!("domain shut off after {:.1} s", t.elapsed().as_secs_f64()),
        );
        Ok(())
    }

    /// Offline method: takes QEMU-compatible shared locks on every image to copy (disks and
    /// backing chains), then checks the domain is still shut off. A `virsh start` meanwhile
    /// fails with QEMU's `Failed to get "write" lock` until [`Self::finish`] releases them.
    fn lock_images(&mut self) -> Result<(), BackupError> {
        let paths: Vec<PathBuf> = self
            .plan
            .disks
            .iter()
            .flat_map(|d| {
                std::iter::once(d.source.clone())
                    .chain(d.backing_chain.iter().map(|b| b.path.clone()))
            })
            .collect();
        let mut locks = Vec::new();
        for p in &paths {
            match ImageLock::acquire(p) {
                Ok(l) => locks.push(l),
                Err(e) => return Err(self.failed(Phase::Copy, Cause::ImageLock(e))),
            }
        }
        let locks = ImageLocks(locks);
        let state = self
            .run
            .dom
            .state()
            .map_err(|e| self.failed(Phase::Copy, e))?;
        if state != DomState::ShutOff {
            drop(locks);
            return Err(self.failed(Phase::Copy, Cause::StartedBeforeCopy(state)));
        }
        let count = locks.0.len();
        self.held.image_locks = Some(locks);
        self.log(
            Level::Info,
            &format!(
                "{} image(s) locked for the offline copy (shared QEMU-style locks: the domain cannot start until the copy is done)",
                count
            ),
        );
        Ok(())
    }

    fn take_snapshot(&mut self) -> Result<(), BackupError> {
        self.phase_started(Phase::Snapshot);
        let t = Instant::now();
        let quiesce = self.plan.method == Method::Quiesce;
        let records: Vec<OverlayRecord> = self
            .plan
            .disks
            .iter()
            .map(|d| OverlayRecord {
                target: d.target.clone(),
                base: d.source.clone(),
                base_format: d.format.clone(),
                overlay: overlay_path(&d.source, &self.run.stamp),
            })
            .collect();
        for o in &records {
            if o.overlay.exists() {
                return Err(self.failed(Phase::Snapshot, Cause::OverlayExists(o.overlay.clone())));
            }
        }
        let journaled = records.clone();
        self.run
            .journal
            .update(|r| {
                r.phase = "snapshot".into();
                r.overlays = journaled;
                r.may_be_frozen = quiesce;
            })
            .map_err(|e| self.failed(Phase::Snapshot, e))?;
        self.held.overlays = Some(Overlays(records));
        if quiesce {
            self.held.frozen = Some(MayBeFrozen);
        }
        // Create the overlays before the call (REUSE_EXT): libvirt then only switches the
        // disks inside the freeze, instead of also formatting every overlay while the guest
        // is frozen (measured in the lab: 3 disks frozen 620 ms → 260 ms).
        for d in self.plan.disks.clone() {
            let Some(o) = self.overlay_of(&d.target) else {
                continue;
            };
            if let Err(e) = create_overlay(&d, &o) {
                let err = self.failed(Phase::Snapshot, e);
                if let Err(thaw) = self.undo_failed_snapshot() {
                    return Err(self.failed(Phase::Snapshot, thaw));
                }
                return Err(err);
            }
        }
        let overlays = self.held.overlays.as_ref().map_or(&[][..], |o| &o.0[..]);
        let xml = snapshot_xml(&self.run.stamp, overlays, &self.plan.skipped);
        self.log(
            Level::Info,
            &format!(
                "taking one external disk-only snapshot of {} disk(s){}",
                self.plan.disks.len(),
                if quiesce {
                    " with quiesce (freeze, snapshot, thaw in one libvirt call)"
                } else {
                    " (crash-consistent, no freeze)"
                }
            ),
        );
        let call = Instant::now();
        let result = self.run.dom.snapshot_external(&xml, quiesce);
        let call_ms = call.elapsed().as_secs_f64() * 1000.0;
        if let Err(e) = result {
            let cause = if quiesce {
                Cause::Quiesce {
                    source: e,
                    ms: call_ms,
                    timeout_seconds: self.run.request.settings.timeouts.agent_seconds,
                }
            } else {
                Cause::Libvirt(e)
            };
            let err = self.failed(Phase::Snapshot, cause);
            if let Err(thaw) = self.undo_failed_snapshot() {
                return Err(self.failed(Phase::Snapshot, thaw));
            }
            return Err(err);
        }
        if quiesce {
            self.run.frozen_ms = Some(call_ms);
            self.run
                .observer
                .emit(BackupEvent::FrozenWindow { ms: call_ms });
        }
        // libvirt thawed inside the call that succeeded.
        self.held.frozen = None;
        let _ = self.run.journal.update(|r| {
            r.may_be_frozen = false;
            r.phase = "copy".into();
        });
        self.log(
            Level::Info,
            &format!(
                "snapshot taken in {call_ms:.1} ms{}; the guest now writes into the overlays",
                if quiesce { " (the frozen window)" } else { "" }
            ),
        );
        // The domain must now run on our overlays.
        for d in &self.plan.disks {
            let Some(o) = self.overlay_of(&d.target) else {
                continue;
            };
            match commit::on_source(&self.run.dom, &d.target, &o) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(self.failed(
                        Phase::Snapshot,
                        Cause::NotOnOverlay {
                            target: d.target.clone(),
                            overlay: o,
                        },
                    ))
                }
                Err(e) => return Err(self.failed(Phase::Snapshot, e)),
            }
        }
        self.phase_finished(Phase::Snapshot, t.elapsed().as_secs_f64());
        Ok(())
    }

    /// After a failed snapshot call: thaws until confirmed (libvirt may not have thawed, and
    /// a freeze queued in a hung agent may run later; retried within
    /// [`super::thaw::thaw_bound`]), removes overlay files the domain is not on and forgets
    /// them in the journal. A thaw not confirmed is returned: the guard stays held and the
    /// journal keeps `may_be_frozen`.
    fn undo_failed_snapshot(&mut self) -> Result<(), Cause> {
        let mut thaw = Ok(());
        if let Some(frozen) = &mut self.held.frozen {
            let bound = super::thaw::thaw_bound(self.run.request.settings.timeouts.agent_seconds);
            self.run.log(
                Level::Warning,
                &format!(
                    "the quiesced snapshot failed: thawing the guest until confirmed (at most {} s)",
                    bound.as_secs()
                ),
            );
            thaw = frozen.release(&mut self.run, bound);
            if thaw.is_ok() {
                self.held.frozen = None;
            }
        }
        let mut all_clear = true;
        let overlays = self.held.overlays.as_ref().map_or(&[][..], |o| &o.0[..]);
        for o in overlays {
            match commit::on_source(&self.run.dom, &o.target, &o.overlay) {
                Ok(false) => {
                    if o.overlay.exists() {
                        let _ = fs::remove_file(&o.overlay);
                    }
                }
                _ => all_clear = false,
            }
        }
        if all_clear {
            self.held.overlays = None;
            let _ = self.run.journal.update(|r| r.overlays.clear());
        }
        thaw
    }

    /// The overlay of disk `target` while the snapshot is active.
    fn overlay_of(&self, target: &str) -> Option<PathBuf> {
        let overlays = self.held.overlays.as_ref()?;
        overlays.of(target).map(|o| o.overlay.clone())
    }
}

impl Drop for BackupSession<'_> {
    fn drop(&mut self) {
        let _ = self.release_all();
    }
}

/// The overlay of `base` for a stamp: `<base>.vmb-overlay-<stamp>.qcow2`, next to the base.
pub(crate) fn overlay_path(base: &Path, stamp: &str) -> PathBuf {
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{OVERLAY_MARKER}{stamp}.qcow2"));
    base.with_file_name(name)
}

/// Creates the qcow2 overlay `overlay` on top of `disk.source` (absolute backing path and
/// format recorded in the header; `-u`: the base is in use, its size is given).
fn create_overlay(disk: &SessionDisk, overlay: &Path) -> Result<(), ToolError> {
    crate::hv::qemu_img::create_overlay(&disk.source, &disk.format, overlay, disk.virtual_size)
}

/// The `<domainsnapshot>` XML: every copied disk external into its overlay, every skipped
/// disk excluded.
pub(crate) fn snapshot_xml(
    stamp: &str,
    overlays: &[OverlayRecord],
    skipped: &[SkippedDisk],
) -> String {
    use crate::hv::xml::escape_attr;
    let mut xml = format!(
        "<domainsnapshot><name>vmb-{}</name><description>vm-backup {}</description><disks>",
        escape_attr(stamp),
        crate::VERSION
    );
    for o in overlays {
        xml.push_str(&format!(
            "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
            escape_attr(&o.target),
            escape_attr(&o.overlay.to_string_lossy())
        ));
    }
    for s in skipped {
        xml.push_str(&format!(
            "<disk name='{}' snapshot='no'/>",
            escape_attr(&s.target)
        ));
    }
    xml.push_str("</disks></domainsnapshot>");
    xml
}

/// A stamp for now whose folders do not exist yet (waits for the next second if needed).
fn unique_stamp(vm_dir: &VmDir) -> String {
    loop {
        let stamp = layout::stamp_for(Local::now());
        if !vm_dir.backup_dir(&stamp).exists() && !vm_dir.partial_dir(&stamp).exists() {
            return stamp;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_names_are_recognisable_and_next_to_the_base() {
        let o = overlay_path(Path::new("/var/lib/img/web 01.qcow2"), "2026-11-22-030000");
        assert_eq!(
            o,
            Path::new("/var/lib/img/web 01.qcow2.vmb-overlay-2026-11-22-030000.qcow2")
        );
        assert!(o.to_string_lossy().contains(OVERLAY_MARKER));
    }

    #[test]
    fn snapshot_xml_covers_copied_and_skipped_disks() {
        let disks = vec![OverlayRecord {
            target: "vda".into(),
            base: "/i/a'b.qcow2".into(),
            base_format: "qcow2".into(),
            overlay: "/i/a'b.qcow2.vmb-overlay-s.qcow2".into(),
        }];
        let skipped = vec![SkippedDisk {
            target: "hdc".into(),
            reason: "cdrom device".into(),
        }];
        let xml = snapshot_xml("s", &disks, &skipped);
        let doc = crate::hv::xml::parse_tree(&xml).unwrap();
        let d: Vec<_> = doc.child("disks").unwrap().children_named("disk").collect();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].attribute("snapshot"), Some("external"));
        let src = d[0].child("source").unwrap();
        assert_eq!(
            src.attribute("file"),
            Some("/i/a'b.qcow2.vmb-overlay-s.qcow2")
        );
        assert_eq!(d[1].attribute("name"), Some("hdc"));
        assert_eq!(d[1].attribute("snapshot"), Some("no"));
    }
}
