//! Finding and repairing what interrupted backups left behind (`vm-backup orphans`, and the
//! start of every backup of the same VM).
//!
//! Only state recorded in a journal is repaired: an overlay is committed back only when a
//! journal lists it *and* its name carries [`super::OVERLAY_MARKER`]; a guest is thawed only
//! when a journal says a quiesce may have frozen it, and the journal is kept until a thaw call
//! succeeds (a guest that cannot be thawed is a failed repair, never a warning). Overlays named like ours but in no
//! journal are reported, never touched, unless a run holding that VM's lock owns them (a
//! running backup is never reported). `.partial` folders are removed when no run of that VM
//! holds its lock.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Settings;
use crate::error::ErrorKind;
use crate::format::layout;
use crate::hv::{DomState, Hypervisor, LibvirtError};
use crate::progress::{Level, Progress};

use super::commit::{self, CommitBounds, CommitError};
use super::journal::{self, JournalError, JournalRecord, VmLock};
use super::thaw::{self, ThawError};
use super::{RunLog, OVERLAY_MARKER};

/// Why leftovers could not be found or repaired.
#[derive(Debug, thiserror::Error)]
pub enum OrphanError {
    /// A libvirt call failed.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The journals could not be read, or a VM's lock taken.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Committing an overlay back failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The guest may still be frozen: no thaw was confirmed (the journal is kept).
    #[error(transparent)]
    Thaw(#[from] ThawError),
    /// A journal lists an overlay not named like ours: it is never touched.
    #[error("journal lists {} which is not named like our overlays: not touched", .0.display())]
    NotOurs(PathBuf),
    /// After the repair the disk still runs on the overlay.
    #[error("{target}: still on {} after the repair", overlay.display())]
    StillOnOverlay {
        /// The disk.
        target: String,
        /// The overlay.
        overlay: PathBuf,
    },
    /// An interrupted instant restore could not be finished.
    #[error(transparent)]
    Instant(Box<crate::engine::restore::RestoreError>),
    /// An overlay or a partial folder could not be removed.
    #[error("cannot {what} {}: {source}", path.display())]
    Remove {
        /// `delete` (an overlay) or `remove` (a partial folder).
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl OrphanError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            OrphanError::Libvirt(e) => e.kind(),
            OrphanError::Journal(e) => e.kind(),
            OrphanError::Commit(e) => e.kind(),
            OrphanError::Thaw(e) => e.kind(),
            OrphanError::NotOurs(_) => ErrorKind::Busy,
            OrphanError::StillOnOverlay { .. } => ErrorKind::Libvirt,
            OrphanError::Remove { source, .. } => ErrorKind::from_io(source),
            OrphanError::Instant(e) => e.kind(),
        }
    }
}

/// One thing found.
#[derive(Debug, Clone, Serialize)]
pub struct Orphan {
    /// The VM concerned.
    pub vm: String,
    /// `journal`, `partial`, `unjournaled-overlay`, `busy`.
    pub kind: String,
    /// What it is.
    pub detail: String,
    /// With `--cleanup`: what was done, or why it failed.
    pub repair: Option<String>,
    /// Whether the repair succeeded (`None` without `--cleanup` or when not repairable).
    pub repaired: Option<bool>,
}

/// The result of a scan.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OrphanReport {
    /// Everything found.
    pub orphans: Vec<Orphan>,
}

impl OrphanReport {
    /// Whether a repair was attempted and failed.
    pub fn any_failed(&self) -> bool {
        self.orphans.iter().any(|o| o.repaired == Some(false))
    }
}

/// Repairs the leftovers of one journal record; returns what was done. The caller holds the
/// VM's lock.
pub(crate) fn repair_record(
    hv: &Hypervisor,
    rec: &JournalRecord,
    settings: &Settings,
    progress: &dyn Progress,
    log: &RunLog,
) -> Result<Vec<String>, OrphanError> {
    if let Some(instant) = &rec.instant {
        use crate::engine::restore::instant;
        return instant::repair(hv, instant, instant::DEFAULT_COPY_BOUND, progress)
            .map_err(|e| OrphanError::Instant(Box::new(e)));
    }
    let mut actions = Vec::new();
    let dom = match hv.domain(&rec.vm) {
        Ok(d) => Some(d),
        Err(LibvirtError::NoDomain(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(dom) = &dom {
        let live = dom.state()?.is_live();
        if rec.may_be_frozen && live {
            // A freeze queued in a hung agent may have run since: thaw until it is confirmed,
            // else keep the journal (a guest that could not be thawed is an error).
            let secs = settings.timeouts.agent_seconds.clamp(1, 3600) as u32;
            let _ = dom.set_agent_timeout(Some(secs));
            let thawed = thaw::thaw_confirmed(
                dom,
                thaw::thaw_bound(settings.timeouts.agent_seconds),
                progress,
                log,
            );
            let _ = dom.set_agent_timeout(None);
            let n = thawed?;
            actions.push(format!(
                "guest thaw confirmed ({n} filesystem(s) were frozen)"
            ));
        }
        let bounds = CommitBounds::of(settings);
        for o in &rec.overlays {
            if !o.overlay.to_string_lossy().contains(OVERLAY_MARKER) {
                return Err(OrphanError::NotOurs(o.overlay.clone()));
            }
            let on_overlay = commit::on_source(dom, &o.target, &o.overlay)?;
            if on_overlay {
                let live = dom.state()?.is_live();
                if live {
                    let done = commit::commit_live(dom, &o.target, &o.base, bounds, progress, log)?;
                    actions.push(format!(
                        "{}: overlay {} committed and pivoted back to {}{}",
                        o.target,
                        o.overlay.display(),
                        o.base.display(),
                        done.paused_ms
                            .map(|ms| format!(" (guest paused {ms:.0} ms so that it converged)"))
                            .unwrap_or_default()
                    ));
                } else {
                    commit::commit_offline(
                        hv,
                        dom,
                        &o.target,
                        &o.overlay,
                        &o.base,
                        &o.base_format,
                    )?;
                    actions.push(format!(
                        "{}: overlay {} committed offline into {} and the definition restored",
                        o.target,
                        o.overlay.display(),
                        o.base.display()
                    ));
                }
            } else if live {
                // Not on the overlay (pivot done, or snapshot never taken): a stale job?
                if let Ok(Some(job)) = dom.block_job(&o.target) {
                    dom.abort_job(&o.target)?;
                    actions.push(format!(
                        "{}: stale {} block job aborted",
                        o.target,
                        job.kind_name()
                    ));
                }
            }
            if commit::persistent_on_base(hv, dom, &o.target, &o.overlay, &o.base, &o.base_format)?
            {
                actions.push(format!(
                    "{}: the persistent definition named the overlay {}: pointed back at {}",
                    o.target,
                    o.overlay.display(),
                    o.base.display()
                ));
            }
            if o.overlay.exists() {
                if commit::on_source(dom, &o.target, &o.overlay)? {
                    return Err(OrphanError::StillOnOverlay {
                        target: o.target.clone(),
                        overlay: o.overlay.clone(),
                    });
                }
                fs::remove_file(&o.overlay).map_err(|source| OrphanError::Remove {
                    what: "delete",
                    path: o.overlay.clone(),
                    source,
                })?;
                actions.push(format!("overlay {} deleted", o.overlay.display()));
            }
        }
        if rec.shut_down_by_us && dom.state()? == DomState::ShutOff {
            dom.start()?;
            actions.push("domain shut down for an offline backup started again".into());
        }
    } else if !rec.overlays.is_empty() {
        log.log(
            progress,
            Level::Warning,
            &format!(
                "domain {:?} no longer exists: its overlays are left as they are",
                rec.vm
            ),
        );
    }
    let published = layout::VmDir::new(&settings.target, &settings.host(), &rec.vm)
        .is_ok_and(|v| !rec.stamp.is_empty() && v.backup_dir(&rec.stamp).exists());
    actions.extend(super::incremental::repair(dom.as_ref(), rec, published)?);
    if let Some(p) = &rec.partial_dir {
        let is_partial = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(layout::PARTIAL_SUFFIX));
        if is_partial && is_inside(p, &settings.target) && p.exists() {
            crate::store::remove_partial(p).map_err(|source| OrphanError::Remove {
                what: "remove",
                path: p.clone(),
                source: source.into(),
            })?;
            actions.push(format!("partial backup {} removed", p.display()));
        }
    }
    Ok(actions)
}

/// Scans journals, domains and the target for leftovers; with `cleanup`, repairs them.
pub fn scan(
    settings: &Settings,
    cleanup: bool,
    progress: &dyn Progress,
) -> Result<OrphanReport, OrphanError> {
    let log = RunLog::new();
    let mut report = OrphanReport::default();
    let hv = Hypervisor::connect(&settings.libvirt_uri)?;
    let mut journaled_overlays = std::collections::BTreeSet::new();
    let mut journaled_partials = std::collections::BTreeSet::new();

    // 1. Journals.
    for path in journal::list_journals(&settings.journal_dir)? {
        let rec = match journal::read_record(&path) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                report.orphans.push(Orphan {
                    vm: String::new(),
                    kind: "journal".into(),
                    detail: e.to_string(),
                    repair: None,
                    repaired: None,
                });
                continue;
            }
        };
        for o in &rec.overlays {
            journaled_overlays.insert(o.overlay.clone());
        }
        if let Some(p) = &rec.partial_dir {
            journaled_partials.insert(p.clone());
        }
        let lock = match VmLock::acquire(&settings.journal_dir, &rec.vm) {
            Ok(l) => l,
            Err(JournalError::Busy { .. }) => {
                report.orphans.push(Orphan {
                    vm: rec.vm.clone(),
                    kind: "busy".into(),
                    detail: format!("a backup of this VM is running (pid {})", rec.pid),
                    repair: None,
                    repaired: None,
                });
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut detail = format!(
            "interrupted run (pid {}, stamp {}, phase {})",
            rec.pid, rec.stamp, rec.phase
        );
        for o in &rec.overlays {
            let exists = o.overlay.exists();
            detail.push_str(&format!(
                "; {} overlay {}{}",
                o.target,
                o.overlay.display(),
                if exists { "" } else { " (file gone)" }
            ));
        }
        if rec.may_be_frozen {
            detail.push_str("; the guest may be frozen");
        }
        if let Some(i) = &rec.instant {
            detail.push_str(&format!(
                "; {}",
                crate::engine::restore::instant::describe(i)
            ));
        }
        if let Some(p) = &rec.partial_dir {
            if p.exists() {
                detail.push_str(&format!("; partial folder {}", p.display()));
            }
        }
        let mut orphan = Orphan {
            vm: rec.vm.clone(),
            kind: "journal".into(),
            detail,
            repair: None,
            repaired: None,
        };
        if cleanup {
            match repair_record(&hv, &rec, settings, progress, &log) {
                Ok(actions) => {
                    let _ = fs::remove_file(&path);
                    orphan.repair = Some(if actions.is_empty() {
                        "nothing left to repair; journal removed".into()
                    } else {
                        actions.join("; ")
                    });
                    orphan.repaired = Some(true);
                }
                Err(e) => {
                    orphan.repair = Some(e.to_string());
                    orphan.repaired = Some(false);
                }
            }
        }
        drop(lock);
        report.orphans.push(orphan);
    }

    // 2. Overlays named like ours that no journal lists: report only.
    for name in hv.domain_names()? {
        let Ok(dom) = hv.domain(&name) else { continue };
        let live = dom.state().is_ok_and(DomState::is_live);
        let Ok(parsed) = dom.parsed(!live) else {
            continue;
        };
        let mut running_backup: Option<bool> = None;
        for d in &parsed.disks {
            if let Some(src) = &d.source {
                if src.to_string_lossy().contains(OVERLAY_MARKER)
                    && !journaled_overlays.contains(src)
                {
                    // A run holding the VM's lock owns its overlays (it may have journaled
                    // them after we read its journal): never report a running backup.
                    let busy = *running_backup.get_or_insert_with(|| {
                        matches!(
                            VmLock::acquire(&settings.journal_dir, &name),
                            Err(JournalError::Busy { .. })
                        )
                    });
                    if busy {
                        continue;
                    }
                    report.orphans.push(Orphan {
                        vm: name.clone(),
                        kind: "unjournaled-overlay".into(),
                        detail: format!(
                            "disk {} runs on {}, named like a vm-backup overlay but in no journal of {}: not touched",
                            d.target,
                            src.display(),
                            journal::journal_folder(&settings.journal_dir).display()
                        ),
                        repair: None,
                        repaired: None,
                    });
                }
            }
        }
    }

    // 3. Partial folders on the target whose VM has no run holding its lock.
    if let Ok(vm_dirs) = layout::vm_dirs(&settings.target, &settings.host()) {
        for (name, vm_dir) in vm_dirs {
            let Ok(partials) = vm_dir.partial_dirs() else {
                continue;
            };
            if partials.is_empty() {
                continue;
            }
            let lock = match VmLock::acquire(&settings.journal_dir, &name) {
                Ok(l) => l,
                Err(_) => continue, // a backup is writing it
            };
            // The lock on the target too: a backup with another journal_dir holds only that.
            let Ok(target_lock) = crate::store::FolderStore::open(&settings.target)
                .and_then(|s| s.lock_dir(&vm_dir.path, crate::store::LockMode::Exclusive))
            else {
                continue;
            };
            for p in partials {
                if journaled_partials.contains(&p) {
                    continue; // reported (and repaired) with its journal
                }
                let mut orphan = Orphan {
                    vm: name.clone(),
                    kind: "partial".into(),
                    detail: format!("partial backup folder {}", p.display()),
                    repair: None,
                    repaired: None,
                };
                if cleanup {
                    match crate::store::remove_partial(&p) {
                        Ok(()) => {
                            orphan.repair = Some("removed".into());
                            orphan.repaired = Some(true);
                        }
                        Err(e) => {
                            orphan.repair = Some(format!("cannot remove: {e}"));
                            orphan.repaired = Some(false);
                        }
                    }
                }
                report.orphans.push(orphan);
            }
            drop(target_lock);
            drop(lock);
        }
    }
    // 4. Mount chains of killed `mount`/`files` commands (loop devices, servers, mounts).
    for m in crate::engine::mount::orphans(&settings.journal_dir, cleanup) {
        let (repair, repaired) = match m.repair {
            Some(crate::engine::mount::MountRepair::Done(actions)) => {
                (Some(actions.join("; ")), Some(true))
            }
            Some(crate::engine::mount::MountRepair::Failed(e)) => (Some(e), Some(false)),
            None => (None, None),
        };
        report.orphans.push(Orphan {
            vm: m.vm,
            kind: "mount".into(),
            detail: m.detail,
            repair,
            repaired,
        });
    }
    Ok(report)
}

/// Whether `path` is inside `dir` (lexically; both absolute).
pub fn is_inside(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
        && !path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
}
