//! Restoring an incremental or differential backup: its disk images are qcow2 files holding
//! the changed blocks, whose backing files are the parent backup's images (`../<parent>/…`).
//! [`expand`] turns the metadata of such a backup into one whose disks carry the parents'
//! images as backing layers (files named relative to this folder), so the planner restores
//! the whole chain like any backing chain: each layer copied and checked against its
//! manifest, then rebased onto the restored layer below. In place, the layers go beside the
//! disk as `<image>.vmb-chain-<parent stamp>.<ext>`.

use std::path::{Path, PathBuf};

use crate::format::metadata::{BackingRecord, BackupMetadata};

use super::RestoreError;

/// The folders of the parents of `meta` (newest first), up to the full.
pub fn parent_dirs(dir: &Path, meta: &BackupMetadata) -> Result<Vec<PathBuf>, RestoreError> {
    let mut out = Vec::new();
    let mut parent = meta.chain.parent.clone();
    let base = dir.parent().unwrap_or(dir);
    while let Some(p) = parent {
        if out.len() > 1000 {
            return Err(RestoreError::NotFound(format!(
                "the chain of {} does not end in a full",
                dir.display()
            )));
        }
        let pdir = base.join(&p);
        let pmd = BackupMetadata::read(&pdir).map_err(|source| RestoreError::Unreadable {
            path: pdir.join(crate::format::layout::METADATA_FILE),
            source,
        })?;
        parent = pmd.chain.parent.clone();
        out.push(pdir);
    }
    Ok(out)
}

/// `meta` with every disk's parent images appended as backing layers (see the module).
pub fn expand(dir: &Path, meta: &BackupMetadata) -> Result<BackupMetadata, RestoreError> {
    if meta.chain.parent.is_none() {
        return Ok(meta.clone());
    }
    let parents = parent_dirs(dir, meta)?;
    let parents: Vec<BackupMetadata> = parents
        .iter()
        .map(|pdir| {
            BackupMetadata::read(pdir).map_err(|source| RestoreError::Unreadable {
                path: pdir.join(crate::format::layout::METADATA_FILE),
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    expand_with(meta, &parents)
}

/// [`expand`] with the parents' metadata given (newest first, up to the full), for a backup
/// that is not in a folder (the off-site restore reads them from its manifests).
pub fn expand_with(
    meta: &BackupMetadata,
    parents: &[BackupMetadata],
) -> Result<BackupMetadata, RestoreError> {
    let mut out = meta.clone();
    if meta.chain.parent.is_none() {
        return Ok(out);
    }
    for disk in &mut out.disks {
        if !meta.chain.disk_has_parent(&disk.target) {
            continue; // copied in full inside this incremental: its chain starts here
        }
        let mut depth = disk.backing_chain.len();
        for pmd in parents {
            let stamp = pmd.stamp.clone();
            let Some(pd) = pmd.disks.iter().find(|d| d.target == disk.target) else {
                return Err(RestoreError::NotFound(format!(
                    "disk {} is not in the parent backup {stamp}",
                    disk.target
                )));
            };
            let rel = |file: &str| format!("../{stamp}/{file}");
            let beside = |file: &str| {
                let src = Path::new(&disk.source);
                let ext = Path::new(file)
                    .extension()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "qcow2".into());
                src.with_file_name(format!(
                    "{}.vmb-chain-{stamp}-{}.{ext}",
                    src.file_name().unwrap_or_default().to_string_lossy(),
                    depth + 1
                ))
                .to_string_lossy()
                .into_owned()
            };
            let source = beside(&pd.file);
            depth += 1;
            disk.backing_chain.push(BackingRecord {
                depth,
                file: rel(&pd.file),
                source,
                format: pd.format.clone(),
                backing_named_as: None,
                virtual_size: pd.virtual_size,
                allocated_size: pd.allocated_size,
                file_size: pd.file_size,
                sha256: pd.sha256.clone(),
                manifest: pd.manifest.clone(),
                copy_seconds: pd.copy_seconds,
                backing_rewrite: None,
            });
            if pmd.chain.disk_has_parent(&disk.target) {
                continue;
            }
            // This disk's chain starts in `pmd` (a full, or a disk copied in full inside an
            // incremental): its own backing chain (copied unchanged) goes below, and no more.
            for b in &pd.backing_chain {
                depth += 1;
                disk.backing_chain.push(BackingRecord {
                    depth,
                    file: rel(&b.file),
                    ..b.clone()
                });
            }
            break;
        }
    }
    Ok(out)
}
