//! Incremental and differential backups: checkpoints, the level decision (with its
//! self-healing fallbacks to a full), the push-mode backup job of the changed blocks, and the
//! chain bookkeeping (checkpoints no longer needed, leftovers of a killed run).
//!
//! ```text
//! full:         checkpoint vmb-<stamp> (just before the snapshot) ─► the usual full backup
//! incremental:  parent = the newest backup on this target (it has a checkpoint)
//! differential: parent = the newest full on this target (it has a checkpoint)
//!   checks: domain running, every disk qcow2, no disk of the parent gone, the parent's
//!           files there (and its parents' up to a full), the checkpoint known to libvirt
//!   anything off ─► a full, the reason in `level_note` and the log
//!   per disk: added or resized, bitmap inconsistent, or refused by libvirt at the job
//!           start ─► that disk copied in full inside the incremental (`full_disks`)
//!   else: [freeze] backup-begin (push, <incremental>parent's checkpoint</incremental>, new
//!         checkpoint vmb-<stamp>) [thaw] ─► wait for the job ─► each target file rebased
//!         (header only) onto ../<parent>/<file> ─► copied into the folder like a full's disk
//! after publish: every vmb- checkpoint but the new one and the newest full's is deleted
//! ```
//!
//! Push mode writes only the changed clusters into a local scratch qcow2 (see
//! `docs/incremental.md` for why push and not pull); the copy into the backup folder then
//! goes through the copier (SHA-256, chunk manifest) like any disk.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::format::layout::VmDir;
use crate::format::metadata::{BackupLevel, BackupMetadata, ChainInfo, Method};
use crate::hv::checkpoint::{self, checkpoint_name};
use crate::hv::{qemu_img, Dom};
use crate::progress::Level;

use super::journal::JournalRecord;
use super::orphans::OrphanError;
use super::session::{Run, SessionDisk};
use super::{BackupSession, Cause, Phase};

/// Why a full runs instead of the incremental or differential asked (recorded in
/// `level_note` and the log). Not a failure: the backup goes on as a full.
#[derive(Debug, thiserror::Error)]
pub enum FullReason {
    /// A full was asked.
    #[error("a full was asked")]
    Asked,
    /// Checkpoints need a running domain.
    #[error("the domain is not running (checkpoints need a running domain)")]
    NotRunning,
    /// No backup to build on.
    #[error("no {} backup of this VM on this target", if *full { "full" } else { "usable" })]
    NoParent {
        /// A full was looked for (differential).
        full: bool,
    },
    /// The parent has no checkpoint.
    #[error("the last {} backup {stamp} has no checkpoint", if *full { "full" } else { "usable" })]
    NoCheckpoint {
        /// The parent's stamp.
        stamp: String,
        /// A full was looked for (differential).
        full: bool,
    },
    /// A disk is not qcow2.
    #[error("disk {target} is {format} (checkpoints need qcow2)")]
    NotQcow2 {
        /// The disk.
        target: String,
        /// Its format.
        format: String,
    },
    /// A disk was added.
    #[error("disk {target} was added since {parent}")]
    DiskAdded {
        /// The disk.
        target: String,
        /// The parent's stamp.
        parent: String,
    },
    /// A disk was resized.
    #[error("disk {target} was resized ({before} → {after} bytes) since {parent}")]
    DiskResized {
        /// The disk.
        target: String,
        /// Size in the parent.
        before: u64,
        /// Size now.
        after: u64,
        /// The parent's stamp.
        parent: String,
    },
    /// A disk of the parent is no longer backed up.
    #[error("disk {target} of {parent} is no longer backed up")]
    DiskGone {
        /// The disk.
        target: String,
        /// The parent's stamp.
        parent: String,
    },
    /// A file of the chain is missing or has the wrong size.
    #[error("{}: {}", path.display(), parent_file_detail(*found, *expected, source.as_ref()))]
    ParentFile {
        /// The file.
        path: PathBuf,
        /// Its size, when it exists.
        found: Option<u64>,
        /// The size in the metadata.
        expected: u64,
        /// Why it could not be read.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A parent's metadata cannot be read.
    #[error("parent {stamp}: {source}")]
    ParentUnreadable {
        /// The parent's stamp.
        stamp: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The chain loops.
    #[error("the chain does not end in a full")]
    Endless,
    /// libvirt does not know the parent's checkpoint.
    #[error("checkpoint {checkpoint} of backup {stamp} is not known to libvirt (removed, VM restored or redefined)")]
    CheckpointUnknown {
        /// The checkpoint.
        checkpoint: String,
        /// The parent's stamp.
        stamp: String,
    },
    /// A disk image lacks the bitmap.
    #[error("disk {target}: bitmap {bitmap} is missing from {}", path.display())]
    BitmapMissing {
        /// The disk.
        target: String,
        /// The bitmap (checkpoint) name.
        bitmap: String,
        /// The image.
        path: PathBuf,
    },
    /// The bitmap was not saved cleanly.
    #[error("disk {target}: bitmap {bitmap} is inconsistent (QEMU stopped uncleanly)")]
    BitmapInconsistent {
        /// The disk.
        target: String,
        /// The bitmap (checkpoint) name.
        bitmap: String,
    },
    /// libvirt refused a disk's bitmap at the job start (missing or broken).
    #[error("disk {target}: libvirt refused its bitmap: {message}")]
    BitmapRefused {
        /// The disk.
        target: String,
        /// libvirt's message.
        message: String,
    },
    /// Every disk needs a full (each disk's reason, joined).
    #[error("every disk needs a full: {0}")]
    EveryDisk(String),
    /// libvirt failed (listing checkpoints), or refused the backup job.
    #[error("libvirt refused the backup job: {0}")]
    JobRefused(#[source] crate::hv::LibvirtError),
    /// libvirt failed.
    #[error(transparent)]
    Libvirt(#[from] crate::hv::LibvirtError),
    /// qemu-img failed reading the bitmaps.
    #[error(transparent)]
    QemuImg(#[from] qemu_img::QemuImgError),
    /// The layout of the target.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
}

fn parent_file_detail(found: Option<u64>, expected: u64, e: Option<&std::io::Error>) -> String {
    match (found, e) {
        (_, Some(e)) => e.to_string(),
        (Some(n), None) => format!("{n} bytes, its metadata says {expected}"),
        (None, None) => "missing".to_string(),
    }
}

impl FullReason {
    /// What kind of condition this is (none fails the backup: a full runs).
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            FullReason::Libvirt(e) | FullReason::JobRefused(e) => e.kind(),
            FullReason::QemuImg(e) => e.kind(),
            FullReason::Layout(e) => e.kind(),
            _ => crate::error::ErrorKind::NotFound,
        }
    }
}

/// The parent an incremental or differential is written on top of.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentChoice {
    /// The parent's stamp (folder name).
    pub stamp: String,
    /// The checkpoint the changed blocks are counted from.
    pub checkpoint: String,
    /// The parent's metadata.
    pub metadata: BackupMetadata,
}

/// Picks the parent of a `level` backup among the published backups of the VM (oldest
/// first): the newest backup for an incremental, the newest full for a differential; it
/// must carry a checkpoint. `Err` is why a full must run instead. Pure.
pub fn choose_parent(
    level: BackupLevel,
    backups: &[(String, BackupMetadata)],
) -> Result<ParentChoice, FullReason> {
    let usable = |m: &BackupMetadata| m.result != crate::ExitStatus::Failed;
    let candidate = match level {
        BackupLevel::Full => return Err(FullReason::Asked),
        BackupLevel::Incremental => backups.iter().rev().find(|(_, m)| usable(m)),
        BackupLevel::Differential => backups
            .iter()
            .rev()
            .find(|(_, m)| usable(m) && m.level() == BackupLevel::Full),
    };
    let Some((stamp, md)) = candidate else {
        return Err(FullReason::NoParent {
            full: level == BackupLevel::Differential,
        });
    };
    let Some(ck) = md.chain.checkpoint.clone() else {
        return Err(FullReason::NoCheckpoint {
            stamp: stamp.clone(),
            full: level == BackupLevel::Differential,
        });
    };
    Ok(ParentChoice {
        stamp: stamp.clone(),
        checkpoint: ck,
        metadata: md.clone(),
    })
}

/// Checks the disks to back up against the parent's: all qcow2, none of the parent's gone
/// (`Err`: why the whole backup must be a full). A disk added or resized since the parent
/// is copied in full inside the incremental: the map says which, and why. Pure.
pub fn disks_match(
    disks: &[SessionDisk],
    parent: &BackupMetadata,
) -> Result<BTreeMap<String, FullReason>, FullReason> {
    let mut full = BTreeMap::new();
    for d in disks {
        if d.format != "qcow2" {
            return Err(FullReason::NotQcow2 {
                target: d.target.clone(),
                format: d.format.clone(),
            });
        }
        match parent.disks.iter().find(|p| p.target == d.target) {
            None => {
                full.insert(
                    d.target.clone(),
                    FullReason::DiskAdded {
                        target: d.target.clone(),
                        parent: parent.stamp.clone(),
                    },
                );
            }
            Some(p) if p.virtual_size != d.virtual_size => {
                full.insert(
                    d.target.clone(),
                    FullReason::DiskResized {
                        target: d.target.clone(),
                        before: p.virtual_size,
                        after: d.virtual_size,
                        parent: parent.stamp.clone(),
                    },
                );
            }
            Some(_) => {}
        }
    }
    for p in &parent.disks {
        if !disks.iter().any(|d| d.target == p.target) {
            return Err(FullReason::DiskGone {
                target: p.target.clone(),
                parent: parent.stamp.clone(),
            });
        }
    }
    Ok(full)
}

/// Per-disk fallbacks decided: `Err` (a whole full) when every disk needs a full, with the
/// first disk's reason; else the disks to copy in full. Pure.
pub fn per_disk_or_whole(
    targets: &[String],
    full: BTreeMap<String, FullReason>,
) -> Result<BTreeMap<String, FullReason>, FullReason> {
    if !targets.is_empty() && targets.iter().all(|t| full.contains_key(t)) {
        let mut full = full;
        if targets.len() == 1 {
            if let Some(only) = full.remove(&targets[0]) {
                return Err(only);
            }
        }
        return Err(FullReason::EveryDisk(
            full.values()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    Ok(full)
}

/// The checkpoints to delete once a backup with checkpoint `new` is published: every one of
/// ours (`vmb-`) but `new` and `keep` (the newest full's, for differentials). Pure.
pub fn stale_checkpoints(all: &[String], new: &str, keep: Option<&str>) -> Vec<String> {
    all.iter()
        .filter(|c| checkpoint::is_ours(c) && c.as_str() != new && Some(c.as_str()) != keep)
        .cloned()
        .collect()
}

/// Every published backup of the VM with readable metadata, oldest first.
fn published(vm_dir: &VmDir) -> Vec<(String, BackupMetadata)> {
    vm_dir
        .complete_stamps()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| {
            BackupMetadata::read(&vm_dir.backup_dir(&s))
                .ok()
                .map(|m| (s, m))
        })
        .collect()
}

/// Checks that the parent's disk files and those of its own parents, down to a full, are
/// there with their recorded sizes. `Err` is why a full must run instead.
fn chain_present(vm_dir: &VmDir, parent: &ParentChoice) -> Result<(), FullReason> {
    let mut md = parent.metadata.clone();
    let mut seen = 0;
    loop {
        let dir = vm_dir.backup_dir(&md.stamp);
        for d in &md.disks {
            let path = dir.join(&d.file);
            match fs::metadata(&path) {
                Ok(m) if m.len() == d.file_size => {}
                Ok(m) => {
                    return Err(FullReason::ParentFile {
                        path,
                        found: Some(m.len()),
                        expected: d.file_size,
                        source: None,
                    })
                }
                Err(e) => {
                    return Err(FullReason::ParentFile {
                        path,
                        found: None,
                        expected: d.file_size,
                        source: Some(e),
                    })
                }
            }
        }
        let Some(p) = md.chain.parent.clone() else {
            return Ok(());
        };
        seen += 1;
        if seen > 1000 {
            return Err(FullReason::Endless);
        }
        md = BackupMetadata::read(&vm_dir.backup_dir(&p)).map_err(|source| {
            FullReason::ParentUnreadable {
                stamp: p.clone(),
                source,
            }
        })?;
    }
}

/// A checkpoint this session created, and (incremental) the scratch folder and the backup
/// job: on failure the job is aborted, the scratch removed and the checkpoint deleted (its
/// bitmap merges into its parent's, so no change is lost for the next incremental).
#[derive(Debug)]
pub(super) struct Checkpointed {
    pub(super) checkpoint: String,
    pub(super) scratch: Option<PathBuf>,
    pub(super) published: bool,
    /// Incremental: (target, the domain's image, its allocated bytes) of each disk whose
    /// session source now is a scratch file.
    pub(super) originals: Vec<(String, PathBuf, u64)>,
}

impl Checkpointed {
    /// Releases what is left: after publishing, only the scratch; else the job, the scratch
    /// and the checkpoint.
    pub(super) fn release(&mut self, run: &mut Run<'_>) -> Result<(), Cause> {
        if !self.published {
            if run.dom.has_job().unwrap_or(false) {
                run.dom.abort_domain_job()?;
                run.log(Level::Info, "backup job aborted");
            }
            run.journal.update(|r| r.backup_job = false)?;
            if run.dom.checkpoint_names()?.contains(&self.checkpoint) {
                run.dom.delete_checkpoint(&self.checkpoint)?;
                run.log(
                    Level::Info,
                    &format!("checkpoint {} deleted", self.checkpoint),
                );
            }
        }
        run.journal.update(|r| r.checkpoint = None)?;
        if let Some(s) = &self.scratch {
            remove_scratch(s).map_err(|source| Cause::Io {
                context: format!("removing {}", s.display()),
                source,
            })?;
            run.journal.update(|r| r.scratch_dir = None)?;
        }
        Ok(())
    }
}

fn remove_scratch(dir: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl BackupSession<'_> {
    /// Decides the level that runs (prepare, after the pre-checks): `Some(parent)` for an
    /// incremental or differential, `None` for a full (asked, or the fallback, with the
    /// reason in the metadata's `level_note` and the log).
    pub(super) fn decide_level(&mut self, live: bool) -> Option<ParentChoice> {
        let asked = self.run.request.level;
        self.plan.chain = ChainInfo {
            level: Some(BackupLevel::Full),
            ..ChainInfo::default()
        };
        if asked == BackupLevel::Full {
            return None;
        }
        match self.incremental_parent(asked, live) {
            Ok((p, full)) => {
                self.plan.chain.level = Some(asked);
                self.plan.chain.parent = Some(p.stamp.clone());
                for (target, why) in full {
                    self.disk_in_full(asked, target, why);
                }
                self.log(
                    Level::Info,
                    &format!(
                        "level {asked}: the blocks changed since checkpoint {} of backup {}",
                        p.checkpoint, p.stamp
                    ),
                );
                Some(p)
            }
            Err(why) => {
                self.full_instead(asked, why);
                None
            }
        }
    }

    /// Disk `target` is copied in full inside the incremental or differential: recorded in
    /// `full_disks` and `level_note`, said in the log.
    fn disk_in_full(&mut self, asked: BackupLevel, target: String, why: FullReason) {
        let note = format!("{target}: copied in full inside the {asked}: {why}");
        self.log(Level::Warning, &note);
        self.plan.chain.full_disks.insert(target, why.to_string());
        self.plan.chain.level_note = Some(format!(
            "{asked}; disk(s) copied in full: {}",
            self.plan
                .chain
                .full_disks
                .iter()
                .map(|(t, w)| format!("{t} ({w})"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }

    fn full_instead(&mut self, asked: BackupLevel, why: FullReason) {
        let note = format!("{asked} asked, full backup instead: {why}");
        self.log(Level::Warning, &note);
        self.plan.chain.level = Some(BackupLevel::Full);
        self.plan.chain.level_requested = Some(asked);
        self.plan.chain.level_note = Some(note);
        self.plan.chain.parent = None;
        self.plan.chain.full_disks.clear();
    }

    /// The parent, and the disks to copy in full inside the incremental (with why).
    fn incremental_parent(
        &self,
        asked: BackupLevel,
        live: bool,
    ) -> Result<(ParentChoice, BTreeMap<String, FullReason>), FullReason> {
        if !live || self.plan.method == Method::Offline {
            return Err(FullReason::NotRunning);
        }
        let vm_dir = VmDir::new(
            &self.run.request.settings.target,
            &self.run.host,
            &self.run.request.vm,
        )?;
        let parent = choose_parent(asked, &published(&vm_dir))?;
        let mut full = disks_match(&self.plan.disks, &parent.metadata)?;
        chain_present(&vm_dir, &parent)?;
        let names = self.run.dom.checkpoint_names()?;
        if !names.contains(&parent.checkpoint) {
            return Err(FullReason::CheckpointUnknown {
                checkpoint: parent.checkpoint.clone(),
                stamp: parent.stamp.clone(),
            });
        }
        for d in &self.plan.disks {
            if full.contains_key(&d.target) {
                continue;
            }
            // The image on disk lists the bitmaps QEMU loaded at start (and those stored at
            // a snapshot); one created since lives only in QEMU until it closes the image. So
            // a bitmap absent here proves nothing: libvirt checks presence at the job start
            // (`take_increment` retries with that disk in full when it refuses one).
            let bitmaps = qemu_img::bitmaps(&d.source)?;
            match bitmaps.iter().find(|b| b.name == parent.checkpoint) {
                Some(b) if b.is_inconsistent() => {
                    full.insert(
                        d.target.clone(),
                        FullReason::BitmapInconsistent {
                            target: d.target.clone(),
                            bitmap: parent.checkpoint.clone(),
                        },
                    );
                }
                _ => {}
            }
        }
        let targets: Vec<String> = self.plan.disks.iter().map(|d| d.target.clone()).collect();
        let full = per_disk_or_whole(&targets, full)?;
        Ok((parent, full))
    }

    /// Full backups of a running domain: creates the checkpoint `vmb-<stamp>` just before
    /// the snapshot (writes in between are counted by both, so the next incremental may
    /// copy a few blocks twice but never misses one). A failure is a warning: the backup is
    /// a full without a checkpoint, and the next incremental will be a full too.
    pub(super) fn checkpoint_for_full(&mut self) {
        if self.run.request.level == BackupLevel::Full && !self.run.request.checkpoint_full {
            return;
        }
        if self.plan.chain.level_note.is_some() {
            // A fallback: the old checkpoints may be broken; they are of no use any more.
            self.delete_our_checkpoints(None);
        }
        let name = checkpoint_name(&self.run.stamp);
        let targets: Vec<String> = self.plan.disks.iter().map(|d| d.target.clone()).collect();
        if targets.is_empty() || self.plan.disks.iter().any(|d| d.format != "qcow2") {
            self.log(
                Level::Info,
                "no checkpoint: a disk is not qcow2 (the next incremental will be a full)",
            );
            return;
        }
        let n = name.clone();
        if let Err(e) = self.run.journal.update(|r| r.checkpoint = Some(n)) {
            self.warn(format!("no checkpoint: {e}"));
            return;
        }
        match self.run.dom.create_checkpoint(&name, &targets, false) {
            Ok(()) => {
                self.log(Level::Info, &format!("checkpoint {name} created"));
                self.plan.chain.checkpoint = Some(name.clone());
                self.held.checkpointed = Some(Checkpointed {
                    checkpoint: name,
                    scratch: None,
                    published: false,
                    originals: Vec::new(),
                });
            }
            Err(e) => {
                let _ = self.run.journal.update(|r| r.checkpoint = None);
                self.warn(format!(
                    "no checkpoint (the next incremental will be a full): {e}"
                ));
            }
        }
    }

    /// Deletes our checkpoints except `keep` (best effort, logged).
    fn delete_our_checkpoints(&mut self, keep: Option<(&str, Option<&str>)>) {
        let names = match self.run.dom.checkpoint_names() {
            Ok(n) => n,
            Err(e) => {
                self.log(Level::Warning, &format!("cannot list checkpoints: {e}"));
                return;
            }
        };
        let stale = match keep {
            Some((new, full)) => stale_checkpoints(&names, new, full),
            None => stale_checkpoints(&names, "", None),
        };
        for c in stale {
            match self.run.dom.delete_checkpoint(&c) {
                Ok(()) => self.log(
                    Level::Info,
                    &format!("checkpoint {c} deleted (no longer needed)"),
                ),
                // Its bitmap is gone from a disk: libvirt refuses the delete; forget it.
                Err(e) if checkpoint::refused_bitmap_disk(&e.to_string()).is_some() => {
                    match self.run.dom.forget_checkpoint(&c) {
                        Ok(()) => self.log(
                            Level::Warning,
                            &format!(
                                "checkpoint {c} forgotten (a disk lost its bitmap: {e}); its \
                                 bitmaps on the other disks stay in their images"
                            ),
                        ),
                        Err(e) => self.log(
                            Level::Warning,
                            &format!("cannot delete checkpoint {c}: {e}"),
                        ),
                    }
                }
                Err(e) => self.log(
                    Level::Warning,
                    &format!("cannot delete checkpoint {c}: {e}"),
                ),
            }
        }
    }

    /// The incremental or differential itself: the push-mode backup job of the blocks
    /// changed since the parent's checkpoint into local scratch files (with the new
    /// checkpoint), the files rebased onto the parent's images; the session's disks then
    /// read from them. When libvirt refuses the job (a bitmap it finds broken), falls back
    /// to a full (`Ok(false)`: take the snapshot).
    pub(super) fn take_increment(
        &mut self,
        parent: &ParentChoice,
    ) -> Result<bool, super::BackupError> {
        self.phase_started(Phase::Snapshot);
        let t = Instant::now();
        let new = checkpoint_name(&self.run.stamp);
        let scratch = self
            .run
            .request
            .settings
            .journal_dir
            .join("scratch")
            .join(format!("{}.{}", self.run.request.vm, self.run.stamp));
        let (sc, ck) = (scratch.clone(), new.clone());
        self.run
            .journal
            .update(|r| {
                r.phase = "increment".into();
                r.scratch_dir = Some(sc);
                r.checkpoint = Some(ck);
                r.backup_job = true;
            })
            .map_err(|e| self.failed(Phase::Snapshot, e))?;
        self.held.checkpointed = Some(Checkpointed {
            checkpoint: new.clone(),
            scratch: Some(scratch.clone()),
            published: false,
            originals: Vec::new(),
        });
        make_scratch(&scratch).map_err(|source| {
            self.failed(
                Phase::Snapshot,
                Cause::Io {
                    context: format!("creating {}", scratch.display()),
                    source,
                },
            )
        })?;
        let files: Vec<(String, PathBuf)> = self
            .plan
            .disks
            .iter()
            .map(|d| (d.target.clone(), scratch.join(&d.file_name)))
            .collect();
        let jobs: Vec<(String, &Path)> = files
            .iter()
            .map(|(t, f)| (t.clone(), f.as_path()))
            .collect();
        let targets: Vec<String> = files.iter().map(|(t, _)| t.clone()).collect();
        let quiesce = self.plan.method == Method::Quiesce;
        let begun = loop {
            let full: Vec<String> = self.plan.chain.full_disks.keys().cloned().collect();
            let begun = self.begin_job(quiesce, parent, &jobs, &full, &new, &targets)?;
            let Err(e) = begun else { break Ok(()) };
            // A bitmap libvirt refuses (missing, broken): that disk in full, the others
            // still incrementally; a whole full only when no disk would be left.
            match checkpoint::refused_bitmap_disk(&e.to_string()) {
                Some(disk)
                    if targets.contains(&disk)
                        && !full.contains(&disk)
                        && full.len() + 1 < targets.len() =>
                {
                    let why = FullReason::BitmapRefused {
                        target: disk.clone(),
                        message: e.to_string(),
                    };
                    self.disk_in_full(self.run.request.level, disk, why);
                    // A refused start may leave its target files: the next one makes them.
                    for (_, f) in &files {
                        let _ = fs::remove_file(f);
                    }
                }
                _ => break Err(e),
            }
        };
        let full: Vec<String> = self.plan.chain.full_disks.keys().cloned().collect();
        if let Err(e) = begun {
            // Nothing started: no job, no new checkpoint. Heal with a full.
            let _ = self.run.journal.update(|r| {
                r.backup_job = false;
                r.checkpoint = None;
            });
            if let Some(mut c) = self.held.checkpointed.take() {
                c.published = true; // nothing to abort or delete; only the scratch
                let _ = c.release(&mut self.run);
            }
            self.full_instead(self.run.request.level, FullReason::JobRefused(e));
            self.phase_finished(Phase::Snapshot, t.elapsed().as_secs_f64());
            return Ok(false);
        }
        if let Some(ms) = self.run.frozen_ms {
            self.log(
                Level::Info,
                &format!("guest frozen for {ms:.0} ms around the backup job start"),
            );
        }
        self.plan.chain.checkpoint = Some(new.clone());
        let bound = Duration::from_secs(self.run.request.settings.timeouts.commit_seconds.max(60));
        let cancel = self.run.cancel.clone();
        self.run
            .dom
            .wait_job(bound, &|| cancel.is_cancelled())
            .map_err(|e| self.failed(Phase::Snapshot, e))?;
        self.run
            .journal
            .update(|r| r.backup_job = false)
            .map_err(|e| self.failed(Phase::Snapshot, e))?;
        for (i, (target, file)) in files.iter().enumerate() {
            let backing = if full.contains(target) {
                // Copied whole by the job: no backing file, this disk's chain starts here.
                None
            } else {
                let Some(p) = parent.metadata.disks.iter().find(|p| &p.target == target) else {
                    return Err(
                        self.failed(Phase::Snapshot, Cause::Internal("parent disk vanished"))
                    );
                };
                let backing = Path::new("..").join(&parent.stamp).join(&p.file);
                qemu_img::rebase_unsafe(file, "qcow2", &backing, "qcow2")
                    .map_err(|e| self.failed(Phase::Snapshot, e))?;
                Some(backing)
            };
            let size = fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            let disk = &mut self.plan.disks[i];
            if let Some(c) = self.held.checkpointed.as_mut() {
                c.originals
                    .push((target.clone(), disk.source.clone(), disk.allocated_size));
            }
            // The copy reads the changed blocks (a qcow2 on the parent's image), nothing else.
            disk.source = file.clone();
            disk.allocated_size = size;
            disk.backing_file = None;
            disk.backing_chain.clear();
            let text = match &backing {
                Some(b) => format!(
                    "{target}: {size} bytes of changed blocks (virtual {}), backing file {}",
                    self.plan.disks[i].virtual_size,
                    b.display()
                ),
                None => format!(
                    "{target}: copied in full ({size} bytes, virtual {}), no backing file",
                    self.plan.disks[i].virtual_size
                ),
            };
            self.log(Level::Info, &text);
        }
        self.phase_finished(Phase::Snapshot, t.elapsed().as_secs_f64());
        Ok(true)
    }

    /// One attempt at the job start: [freeze] backup-begin [thaw]. `Err` inside `Ok` is
    /// libvirt refusing the job (nothing started); the outer `Err` a failed thaw.
    fn begin_job(
        &mut self,
        quiesce: bool,
        parent: &ParentChoice,
        jobs: &[(String, &Path)],
        full: &[String],
        new: &str,
        targets: &[String],
    ) -> Result<Result<(), crate::hv::LibvirtError>, super::BackupError> {
        if !quiesce {
            return Ok(self.run.dom.begin_push_backup(
                &parent.checkpoint,
                jobs,
                full,
                Some((new, targets)),
            ));
        }
        let _ = self.run.journal.update(|r| r.may_be_frozen = true);
        let tf = Instant::now();
        let r = match self.run.dom.fs_freeze() {
            Ok(_) => {
                let r = self.run.dom.begin_push_backup(
                    &parent.checkpoint,
                    jobs,
                    full,
                    Some((new, targets)),
                );
                let thawed = self.run.dom.fs_thaw();
                self.run.frozen_ms = Some(tf.elapsed().as_secs_f64() * 1000.0);
                if let Err(e) = thawed {
                    return Err(self.failed(Phase::Snapshot, e));
                }
                r
            }
            Err(e) => Err(e),
        };
        let _ = self.run.journal.update(|r| r.may_be_frozen = false);
        Ok(r)
    }

    /// After the copy of an incremental: the records name the domain's images, not the
    /// scratch files the copy read.
    pub(super) fn increment_records(&mut self) {
        let Some(c) = self.held.checkpointed.as_ref() else {
            return;
        };
        for rec in &mut self.copied {
            if let Some((_, source, allocated)) =
                c.originals.iter().find(|(t, _, _)| *t == rec.target)
            {
                rec.source = source.to_string_lossy().into_owned();
                rec.allocated_size = *allocated;
            }
        }
    }

    /// Once the backup is published: its checkpoint is kept, the scratch removed, and every
    /// other checkpoint of ours deleted but the newest full's (for differentials).
    pub(super) fn chain_published(&mut self) {
        let Some(mut c) = self.held.checkpointed.take() else {
            return;
        };
        c.published = true;
        if let Err(e) = c.release(&mut self.run) {
            self.log(Level::Warning, &format!("cleanup after the backup: {e}"));
        }
        let full_ck = if self.plan.chain.level == Some(BackupLevel::Full) {
            None
        } else {
            VmDir::new(
                &self.run.request.settings.target,
                &self.run.host,
                &self.run.request.vm,
            )
            .ok()
            .and_then(|v| {
                published(&v)
                    .into_iter()
                    .rev()
                    .find(|(_, m)| m.level() == BackupLevel::Full && m.chain.checkpoint.is_some())
                    .and_then(|(_, m)| m.chain.checkpoint)
            })
        };
        let new = c.checkpoint.clone();
        self.delete_our_checkpoints(Some((&new, full_ck.as_deref())));
    }
}

/// Creates the scratch folder, traversable by QEMU (which writes the job's files).
fn make_scratch(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir)?;
    // QEMU (not root) writes the increment here: whatever the umask, it must reach the folder.
    // The journal folder above only needs to be traversable (0711: not listable).
    if let Some(journal_dir) = dir.parent().and_then(Path::parent) {
        fs::set_permissions(journal_dir, fs::Permissions::from_mode(0o711))?;
    }
    for d in [dir.parent(), Some(dir)].into_iter().flatten() {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Repairs what a killed incremental left (called by the orphan repair): aborts a backup
/// job still running, deletes the checkpoint of a backup that was never published, removes
/// the scratch folder.
pub(super) fn repair(
    dom: Option<&Dom>,
    rec: &JournalRecord,
    published: bool,
) -> Result<Vec<String>, OrphanError> {
    let mut actions = Vec::new();
    if let Some(dom) = dom {
        let live = dom.state()?.is_live();
        if live && rec.backup_job && dom.has_job()? {
            dom.abort_domain_job()?;
            actions.push("stale backup job aborted".to_string());
            // The abort is asynchronous: let it end before the checkpoint is deleted.
            let t = Instant::now();
            while dom.has_job()? && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(ck) = &rec.checkpoint {
            if !published && checkpoint::is_ours(ck) && dom.checkpoint_names()?.contains(ck) {
                dom.delete_checkpoint(ck)?;
                actions.push(format!(
                    "checkpoint {ck} of the unfinished backup deleted (its changes merge into its parent's)"
                ));
            }
        }
    }
    if let Some(s) = &rec.scratch_dir {
        if s.exists() {
            remove_scratch(s).map_err(|source| OrphanError::Remove {
                what: "remove",
                path: s.clone(),
                source,
            })?;
            actions.push(format!("scratch folder {} removed", s.display()));
        }
    }
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::metadata::DiskRecord;

    fn md(stamp: &str, level: BackupLevel, ck: Option<&str>) -> (String, BackupMetadata) {
        let mut m: BackupMetadata =
            serde_json::from_str(include_str!(
                "../../../tests/fixtures/backup-v0.1.0/fixturehost/fixture-vm/2026-11-29-123424/backup-metadata.json"
            ))
                .expect("fixture");
        m.stamp = stamp.into();
        m.chain.level = Some(level);
        m.chain.checkpoint = ck.map(String::from);
        (stamp.into(), m)
    }

    #[test]
    fn incremental_takes_the_newest_and_differential_the_newest_full() {
        let list = vec![
            md("2026-01-01-000000", BackupLevel::Full, Some("vmb-1")),
            md("2026-01-02-000000", BackupLevel::Incremental, Some("vmb-2")),
        ];
        let i = choose_parent(BackupLevel::Incremental, &list).unwrap();
        assert_eq!(
            (i.stamp.as_str(), i.checkpoint.as_str()),
            ("2026-01-02-000000", "vmb-2")
        );
        let d = choose_parent(BackupLevel::Differential, &list).unwrap();
        assert_eq!(d.checkpoint, "vmb-1");
    }

    #[test]
    fn no_parent_or_no_checkpoint_means_full() {
        assert!(choose_parent(BackupLevel::Incremental, &[]).is_err());
        let list = vec![md("2026-01-01-000000", BackupLevel::Full, None)];
        let e = choose_parent(BackupLevel::Incremental, &list).unwrap_err();
        assert!(matches!(e, FullReason::NoCheckpoint { .. }), "{e}");
        let list = vec![md(
            "2026-01-02-000000",
            BackupLevel::Incremental,
            Some("vmb-2"),
        )];
        assert!(choose_parent(BackupLevel::Differential, &list).is_err());
    }

    #[test]
    fn stale_checkpoints_spare_foreign_new_and_full() {
        let all: Vec<String> = ["vmb-1", "vmb-2", "vmb-3", "theirs"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            stale_checkpoints(&all, "vmb-3", Some("vmb-1")),
            vec!["vmb-2"]
        );
        assert_eq!(
            stale_checkpoints(&all, "vmb-3", None),
            vec!["vmb-1", "vmb-2"]
        );
    }

    #[test]
    fn disks_must_match_the_parent() {
        let (_, parent) = md("2026-01-01-000000", BackupLevel::Full, Some("vmb-1"));
        let rec: &DiskRecord = &parent.disks[0];
        let disk = SessionDisk {
            target: rec.target.clone(),
            source: PathBuf::from(&rec.source),
            format: "qcow2".into(),
            virtual_size: rec.virtual_size,
            allocated_size: 0,
            file_name: rec.file.clone(),
            backing_file: None,
            backing_chain: Vec::new(),
        };
        let mut p = parent.clone();
        p.disks.truncate(1);
        assert!(disks_match(std::slice::from_ref(&disk), &p)
            .unwrap()
            .is_empty());
        let mut bigger = disk.clone();
        bigger.virtual_size += 1;
        let m = disks_match(&[bigger], &p).unwrap();
        assert!(
            matches!(m.get(&disk.target), Some(FullReason::DiskResized { .. })),
            "{m:?}"
        );
        let mut added = disk.clone();
        added.target = "vdz".into();
        let m = disks_match(&[disk.clone(), added], &p).unwrap();
        assert_eq!(m.len(), 1, "{m:?}");
        let e = &m["vdz"];
        assert!(matches!(e, FullReason::DiskAdded { .. }), "{e}");
        assert!(e.to_string().contains("was added"), "{e}");
        // A disk of the parent gone: a whole full.
        let mut two = parent.clone();
        two.disks.truncate(2);
        if two.disks.len() == 2 {
            assert!(matches!(
                disks_match(std::slice::from_ref(&disk), &two),
                Err(FullReason::DiskGone { .. })
            ));
        }
        let mut raw = disk.clone();
        raw.format = "raw".into();
        assert!(matches!(
            disks_match(&[raw], &p),
            Err(FullReason::NotQcow2 { .. })
        ));
    }

    #[test]
    fn every_disk_full_means_a_whole_full() {
        let t = |s: &str| s.to_string();
        let reason = |s: &str| FullReason::DiskAdded {
            target: t(s),
            parent: t("p"),
        };
        let both: BTreeMap<_, _> = [(t("vda"), reason("vda")), (t("vdb"), reason("vdb"))].into();
        let e = per_disk_or_whole(&[t("vda"), t("vdb")], both).unwrap_err();
        assert!(matches!(e, FullReason::EveryDisk(_)), "{e}");
        assert!(
            e.to_string().contains("vda") && e.to_string().contains("vdb"),
            "{e}"
        );
        let one: BTreeMap<_, _> = [(t("vdb"), reason("vdb"))].into();
        let m = per_disk_or_whole(&[t("vda"), t("vdb")], one).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), vec!["vdb"]);
        assert!(per_disk_or_whole(&[t("vda")], BTreeMap::new())
            .unwrap()
            .is_empty());
    }
}
