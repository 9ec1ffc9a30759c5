//! What a [`super::BackupSession`] holds on the VM and the target, one guard per thing
//! acquired, in the order the phases acquire them:
//!
//! | phase | guard | journaled (before acquiring) | released by |
//! | --- | --- | --- | --- |
//! | prepare | [`AgentTimeout`] (agent response bound, set by the pre-checks) | — | reset to the default |
//! | shutdown (offline `--shutdown`) | [`ShutDown`] | `shut_down_by_us` | starting the domain again |
//! | lock (offline) | [`ImageLocks`] (QEMU-style shared locks) | — | dropping them |
//! | snapshot (quiesce, snapshot) | [`Overlays`] | `overlays` | block commit + pivot (the guest paused at most `commit_pause_max_seconds` if it does not converge), overlays deleted |
//! | snapshot (quiesce) | [`MayBeFrozen`] (the guest may be frozen inside the one snapshot call, and after it when the call failed) | `may_be_frozen` | the snapshot call succeeding, or a thaw call succeeding (retried within a bound) |
//! | copy (direct mode) | [`PartialFolder`] | `partial_dir` | removing it, or publishing it |
//!
//! A guard leaves its slot only when its release succeeded: a failed release is tried again
//! when the session is closed or dropped, and what still fails stays in the journal for
//! `vm-backup orphans --cleanup` and the next run of the same VM.
//!
//! libvirtd restarting meanwhile drops the connection: the VM's guards reconnect (within
//! [`RECONNECT_BOUND`]) and look the domain up again before they give up.

use std::fs;
use std::time::{Duration, Instant};

use crate::hv::image_lock::ImageLock;
use crate::hv::{Dom, DomState};
use crate::progress::Level;

use super::commit::{self, CommitBounds, CommitError};
use super::journal::OverlayRecord;
use super::session::Run;
use super::thaw::{self, ThawError};
use super::Cause;

/// How long a guard waits for libvirtd to answer again after the connection dropped.
pub(super) const RECONNECT_BOUND: Duration = Duration::from_secs(60);

/// Quiesce: the guest may be frozen (journaled as `may_be_frozen`) until a thaw is confirmed.
#[derive(Debug)]
pub(super) struct MayBeFrozen;

impl MayBeFrozen {
    /// Thaws until a thaw call succeeds (at most `bound`; one call when zero), then clears
    /// `may_be_frozen` in the journal. On failure the guard stays held and the journal keeps it.
    pub(super) fn release(&mut self, run: &mut Run<'_>, bound: Duration) -> Result<(), Cause> {
        run.reconnect_if_dropped()?;
        let n = thaw::thaw_confirmed(&run.dom, bound, run.progress.get(), &run.log)
            .map_err(|e: ThawError| Cause::Thaw(e))?;
        run.journal.update(|r| r.may_be_frozen = false)?;
        run.log(
            Level::Info,
            &format!("the guest is thawed ({n} filesystem(s) were still frozen)"),
        );
        Ok(())
    }
}

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
        match self.release_once(run) {
            Err(CommitError::Libvirt(e)) if !run.hv.is_alive() => {
                run.log(
                    Level::Warning,
                    &format!("the connection to libvirt dropped ({e}): reconnecting"),
                );
                run.reconnect_if_dropped()?;
                self.release_once(run)
            }
            other => other,
        }
    }

    fn release_once(&mut self, run: &mut Run<'_>) -> Result<(), CommitError> {
        run.reconnect_if_dropped()?;
        let bounds = CommitBounds::of(&run.request.settings);
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
                        bounds,
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
                    .map(|()| commit::Committed::default())
                };
                match r {
                    Ok(done) => {
                        run.log(
                            Level::Info,
                            &format!(
                                "{}: committed and pivoted back to {} in {:.2} s",
                                o.target,
                                o.base.display(),
                                t.elapsed().as_secs_f64()
                            ),
                        );
                        if let Some(ms) = done.paused_ms {
                            run.record_commit_pause(&o.target, ms);
                        }
                    }
                    Err(e) => {
                        problems.push(e);
                        continue;
                    }
                }
            }
            if live {
                match commit::persistent_on_base(
                    &run.hv,
                    &run.dom,
                    &o.target,
                    &o.overlay,
                    &o.base,
                    &o.base_format,
                ) {
                    Ok(true) => run.log(
                        Level::Warning,
                        &format!(
                            "{}: the persistent definition still named the overlay after the pivot: pointed back at {}",
                            o.target,
                            o.base.display()
                        ),
                    ),
                    Ok(false) => {}
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
