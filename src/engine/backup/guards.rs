//! What a [`super::BackupSession`] holds on the VM and the target, one guard per thing
//! acquired, in the order the phases acquire them:
//!
//! | phase | guard | journaled (before acquiring) | released by |
//! | --- | --- | --- | --- |
//! | prepare | [`AgentTimeout`] (agent response bound, set by the pre-checks) | — | reset to the default |
//! | shutdown (offline `--shutdown`) | [`ShutDown`] | `shut_down_by_us` | starting the domain again |
//! | lock (offline) | [`ImageLocks`] (QEMU-style shared locks) | — | dropping them |
//! | snapshot (quiesce, snapshot) | [`Overlays`] (the guest may be frozen inside the one snapshot call: `may_be_frozen`) | `overlays`, `may_be_frozen` | block commit + pivot, overlays deleted |
//! | copy (direct mode) | [`PartialFolder`] | `partial_dir` | removing it, or publishing it |
//!
//! A guard leaves its slot only when its release succeeded: a failed release is tried again
//! when the session is closed or dropped, and what still fails stays in the journal for
//! `vm-backup orphans --cleanup` and the next run of the same VM.

use std::fs;
use std::time::{Duration, Instant};

use crate::hv::image_lock::ImageLock;
use crate::hv::{Dom, DomState};
use crate::progress::Level;

use super::commit::{self, CommitError};
use super::journal::OverlayRecord;
use super::session::Run;
use super::Cause;

/// The pre-checks set the domain's guest agent response timeout; reset it at the end.
#[derive(Debug)]
pub(super) struct AgentTimeout;

impl AgentTimeout {
    /// Resets the agent timeout of a running domain to libvirt's default (best effort).
    pub(super) fn release(self, dom: &Dom) {
        if dom.state().is_ok_and(DomState::is_live) {
            let _ = dom.set_agent_timeout(None);
        }
    }
}

/// Offline `--shutdown`: the engine shut the domain down and must start it again.
#[derive(Debug)]
pub(super) struct ShutDown;

impl ShutDown {
    /// Starts the domain again if it is still shut off, and clears `shut_down_by_us`.
    pub(super) fn release(&mut self, run: &mut Run<'_>) -> Result<(), CommitError> {
        match run.dom.state()? {
            DomState::ShutOff => {
                run.log(Level::Info, "starting the domain again");
                run.dom.start()?;
            }
            other => run.log(
                Level::Warning,
                &format!("not starting the domain again: it is {other}"),
            ),
        }
        run.journal.update(|r| r.shut_down_by_us = false)?;
        Ok(())
    }
}

/// Offline method: shared locks on every image to copy, so that the domain cannot be
/// started on images being read.
#[derive(Debug)]
pub(super) struct ImageLocks(pub(super) Vec<ImageLock>);

/// Quiesce and snapshot: the disks run on our overlays until they are committed back.
#[derive(Debug)]
pub(super) struct Overlays(pub(super) Vec<OverlayRecord>);

impl Overlays {
    /// The overlay of disk `target`, if it has one.
    pub(super) fn of(&self, target: &str) -> Option<&OverlayRecord> {
        self.0.iter().find(|o| o.target == target)
    }

    /// Commits every disk still on one of our overlays back into its base (live: active
    /// shallow block commit and pivot; shut off: `qemu-img commit` and a redefinition),
    /// deletes the overlays, records it in the journal and checks that no block job remains.
    pub(super) fn release(&mut self, run: &mut Run<'_>) -> Result<(), CommitError> {
        let bound = Duration::from_secs(run.request.settings.timeouts.commit_seconds);
        let live = run.dom.state()?.is_live();
        let mut problems: Vec<CommitError> = Vec::new();
        for o in &self.0 {
            let on_overlay = match commit::on_source(&run.dom, &o.target, &o.overlay) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(e.into());
                    continue;
                }
            };
            if on_overlay {
                let t = Instant::now();
                let r = if live {
                    commit::commit_live(
                        &run.dom,
                        &o.target,
                        &o.base,
                        bound,
                        run.progress.get(),
                        &run.log,
                    )
                } else {
                    commit::commit_offline(
                        &run.hv,
                        &run.dom,
                        &o.target,
                        &o.overlay,
                        &o.base,
                        &o.base_format,
                    )
                };
                match r {
                    Ok(()) => run.log(
                        Level::Info,
                        &format!(
                            "{}: committed and pivoted back to {} in {:.2} s",
                            o.target,
                            o.base.display(),
                            t.elapsed().as_secs_f64()
                        ),
                    ),
                    Err(e) => {
                        problems.push(e);
                        continue;
                    }
                }
            }
            if let Err(e) = fs::remove_file(&o.overlay) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(CommitError::DeleteOverlay {
                        path: o.overlay.clone(),
                        source: e,
                    });
                    continue;
                }
            }
        }
        if problems.len() == 1 {
            return Err(problems.remove(0));
        } else if !problems.is_empty() {
            return Err(CommitError::Several(problems));
        }
        run.journal.update(|r| {
            r.overlays.clear();
            r.phase = "committed".into();
        })?;
        // No block job may remain on a copied disk.
        if live {
            for o in &self.0 {
                if let Ok(Some(job)) = run.dom.block_job(&o.target) {
                    return Err(CommitError::JobRemains {
                        target: o.target.clone(),
                        job: job.kind_name().to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Direct mode: the `<stamp>.partial` folder on the target, until it is published (renamed)
/// or removed.
#[derive(Debug)]
pub(super) struct PartialFolder(pub(super) crate::store::PartialBackup);

impl PartialFolder {
    /// Removes the folder through the store (gone already is fine).
    pub(super) fn release(&mut self, run: &Run<'_>) -> Result<(), Cause> {
        self.0.discard()?;
        run.log(
            Level::Info,
            &format!("removed the partial backup {}", self.0.path().display()),
        );
        Ok(())
    }
}
