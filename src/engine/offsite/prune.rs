//! `offsite prune`: the off-site copy's own retention (grandfather-father-son, planned by the
//! same pure planner as the primary's prune: a parent is kept while a kept backup needs it),
//! then garbage collection of the chunks no remaining manifest references.
//!
//! Manifests are removed first, so a backup disappears whole. The collection takes the `gc`
//! lock ([`crate::store::offsite::lock`]): while a push runs it is skipped (reported, not an
//! error), and no push starts while it runs, so it never deletes a chunk that a push found
//! present and is about to reference.
//!
//! On a bucket with S3 Object Lock, a manifest or chunk whose retention has not expired is
//! skipped (reported), not deleted: a delete there would only hide the locked version
//! behind a delete marker. A skipped manifest keeps its chunks referenced.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{backup_name, OffsiteRunError};
use crate::config::Retention;
use crate::engine::prune::{plan, BackupState, Candidate, Decision};
use crate::progress::{Level, Progress};
use crate::store::offsite::{lock, LockSupport, OffsiteError, OffsiteStore};

/// Settings of an off-site prune.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneOptions {
    /// The retention.
    pub retention: Retention,
    /// Decide and report, remove nothing.
    pub dry_run: bool,
    /// Skip the garbage collection.
    pub no_gc: bool,
}

/// What an off-site prune did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PruneReport {
    /// The decision for every backup, per `host/vm`.
    pub decisions: BTreeMap<String, Vec<Decision>>,
    /// The backups removed (`host/vm/stamp`).
    pub removed: Vec<String>,
    /// Chunks referenced by the remaining manifests.
    pub chunks_referenced: u64,
    /// Chunks deleted by the collection.
    pub chunks_deleted: u64,
    /// Backups the retention would remove, kept because Object Lock still retains them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retained: Vec<String>,
    /// Unreferenced chunks kept because Object Lock still retains them.
    pub chunks_retained: u64,
    /// Why the collection did not run, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc_skipped: Option<String>,
}

/// Prunes the off-site store; see the module documentation.
pub fn prune(
    store: &OffsiteStore,
    options: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport, OffsiteRunError> {
    let mut report = PruneReport::default();
    // Only a bucket with Object Lock needs the retention of each object asked (HEAD).
    let locked = matches!(
        store.client().object_lock_support(),
        Ok(LockSupport::Enabled)
    );
    let now = chrono::Utc::now();
    let retained = |key: &str| -> Result<bool, OffsiteError> {
        Ok(locked
            && store
                .client()
                .retained_until(key)?
                .is_some_and(|until| until > now))
    };
    let mut groups: BTreeMap<(String, String), Vec<Candidate>> = BTreeMap::new();
    for (host, vm, stamp) in store.backups()? {
        let m = store.get_manifest(&host, &vm, &stamp);
        let (state, parent) = match &m {
            Ok(m) => (BackupState::Usable { verified: false }, m.parent()),
            Err(e) => (BackupState::Unreadable(e.to_string()), None),
        };
        if let Some(c) = Candidate::new(&stamp, state) {
            groups
                .entry((host, vm))
                .or_default()
                .push(c.with_parent(parent));
        }
    }
    for ((host, vm), candidates) in groups {
        let decisions = plan(&candidates, &options.retention, None);
        for d in &decisions {
            if d.keep {
                continue;
            }
            let name = backup_name(&host, &vm, &d.stamp);
            if retained(&OffsiteStore::manifest_key(&host, &vm, &d.stamp))? {
                progress.message(
                    Level::Info,
                    &format!("{name} kept: still under Object Lock retention"),
                );
                report.retained.push(name);
                continue;
            }
            if !options.dry_run {
                store.delete_manifest(&host, &vm, &d.stamp)?;
                progress.message(
                    Level::Info,
                    &format!("removed {name} ({})", d.reasons.join("; ")),
                );
            }
            report.removed.push(name);
        }
        report.decisions.insert(format!("{host}/{vm}"), decisions);
    }
    if options.no_gc || options.dry_run {
        return Ok(report);
    }
    let _gc = match lock::acquire(store.client(), "gc") {
        Ok(l) => l,
        Err(OffsiteError::Busy(why)) => {
            progress.message(
                Level::Warning,
                &format!("garbage collection skipped: {why}"),
            );
            report.gc_skipped = Some(why);
            return Ok(report);
        }
        Err(e) => return Err(e.into()),
    };
    let mut referenced = BTreeSet::new();
    for (host, vm, stamp) in store.backups()? {
        // A manifest that does not open keeps everything: never collect on a guess.
        let m = store.get_manifest(&host, &vm, &stamp).map_err(|e| {
            OffsiteRunError::Store(OffsiteError::Busy(format!(
                "garbage collection stopped: the manifest of {} does not open ({e})",
                backup_name(&host, &vm, &stamp)
            )))
        })?;
        referenced.extend(m.chunk_ids());
    }
    report.chunks_referenced = referenced.len() as u64;
    for id in store.chunk_ids()? {
        if !referenced.contains(&id) {
            if retained(&OffsiteStore::chunk_key(&id))? {
                report.chunks_retained += 1;
                continue;
            }
            store.delete_chunk(&id)?;
            report.chunks_deleted += 1;
        }
    }
    progress.message(
        Level::Info,
        &format!(
            "garbage collection: {} chunks deleted, {} referenced",
            report.chunks_deleted, report.chunks_referenced
        ),
    );
    Ok(report)
}
