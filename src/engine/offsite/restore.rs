//! `offsite restore`: fetches a backup (and, for an incremental, its parents) chunk by chunk
//! straight into a staging folder on the restore host (beside the disks, never on the backup
//! share), checking every chunk's id and SHA-256 on the way, then hands the staged backup to
//! the folder restore ([`crate::engine::restore::restore`]), which verifies it again, copies
//! the images into place and defines the domain. The staging folder is removed afterwards,
//! whatever happened.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{backup_name, sha256_hex, OffsiteRunError};
use crate::engine::restore::{self as folder_restore, RestoreOutcome, RestoreRequest, StampChoice};
use crate::format::layout;
use crate::progress::{CancelToken, Level, Progress, Transfer};
use crate::store::offsite::{OffsiteManifest, OffsiteStore};

/// What to restore from off-site, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsiteRestoreRequest {
    /// The hypervisor folder the backup is under.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// Which backup.
    pub stamp: StampChoice,
    /// Restore under this name (`--as`).
    pub new_name: Option<String>,
    /// Put the disks here (`--disk-dir`).
    pub disk_dir: Option<PathBuf>,
    /// Where the chunks are assembled before the restore (default: the disk folder).
    pub staging_dir: PathBuf,
    /// Start the domain once defined.
    pub start: bool,
    /// The libvirt connection URI.
    pub libvirt_uri: String,
}

/// Removes the staging folder when dropped.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), "cannot remove the off-site staging folder: {e}");
        }
    }
}

/// Restores a VM from the off-site store; see the module documentation.
pub fn restore(
    store: &OffsiteStore,
    request: &OffsiteRestoreRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<RestoreOutcome, OffsiteRunError> {
    let host = layout::safe_component(&request.host)?;
    let vm = layout::safe_component(&request.vm)?;
    let stamp = match &request.stamp {
        StampChoice::Stamp(s) => s.clone(),
        StampChoice::Latest => store
            .backups()?
            .into_iter()
            .filter(|(h, v, _)| *h == host && *v == vm)
            .map(|(_, _, s)| s)
            .next_back()
            .ok_or_else(|| OffsiteRunError::NotFound(format!("of {host}/{vm}")))?,
    };
    let mut chain = Vec::new();
    let mut next = Some(stamp.clone());
    while let Some(s) = next.take() {
        if chain.len() > 1000 {
            return Err(OffsiteRunError::NotFound(format!(
                "the chain of {} does not end in a full",
                backup_name(&host, &vm, &stamp)
            )));
        }
        let m = match store.get_manifest(&host, &vm, &s) {
            Ok(m) => m,
            Err(crate::store::offsite::OffsiteError::Missing(_)) => {
                return Err(OffsiteRunError::NotFound(backup_name(&host, &vm, &s)))
            }
            Err(e) => return Err(e.into()),
        };
        next = m.parent();
        chain.push(m);
    }

    std::fs::create_dir_all(&request.staging_dir)
        .map_err(|e| OffsiteRunError::io("create", &request.staging_dir, e))?;
    let root = request
        .staging_dir
        .join(format!(".vm-backup-offsite-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&root).map_err(|e| OffsiteRunError::io("create", &root, e))?;
    let staging = Staging(root);
    for m in &chain {
        if cancel.is_cancelled() {
            return Err(OffsiteRunError::Cancelled);
        }
        materialise(store, m, &staging.0.join(&m.stamp), progress, cancel)?;
    }
    let mut req = RestoreRequest::new(&staging.0, &host, &vm, StampChoice::Stamp(stamp.clone()));
    req.backup_dir = Some(staging.0.join(&stamp));
    req.new_name = request.new_name.clone();
    req.disk_dir = request.disk_dir.clone();
    req.start = request.start;
    req.libvirt_uri = request.libvirt_uri.clone();
    let outcome = folder_restore::restore(&req, progress, cancel).map_err(Box::new)?;
    Ok(outcome)
}

/// Writes the backup `m` into `dir` as the folder restore expects it: every file rebuilt
/// from its chunks (holes left for zero chunks), `backup-metadata.json` from the manifest.
fn materialise(
    store: &OffsiteStore,
    m: &OffsiteManifest,
    dir: &Path,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<(), OffsiteRunError> {
    let name = backup_name(&m.host, &m.vm, &m.stamp);
    progress.message(Level::Info, &format!("fetching {name} from off-site"));
    std::fs::create_dir_all(dir).map_err(|e| OffsiteRunError::io("create", dir, e))?;
    let total = m.bytes();
    let mut done = 0u64;
    let started = std::time::Instant::now();
    for f in &m.files {
        let mut path = dir.to_path_buf();
        for part in f.name.split('/') {
            path.push(layout::plain_file_name(part)?);
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| OffsiteRunError::io("create", parent, e))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| OffsiteRunError::io("create", &path, e))?;
        file.set_len(f.size)
            .map_err(|e| OffsiteRunError::io("size", &path, e))?;
        for (i, c) in f.chunks.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(OffsiteRunError::Cancelled);
            }
            let off = i as u64 * f.chunk_size;
            let len = f.chunk_size.min(f.size.saturating_sub(off));
            let Some(c) = c else {
                done += len;
                continue; // a hole: set_len left zeros
            };
            let damaged = |reason: String| OffsiteRunError::Damaged {
                backup: name.clone(),
                file: f.name.clone(),
                chunk: i as u64,
                id: c.id.clone(),
                reason,
            };
            let id = c
                .chunk_id()
                .ok_or_else(|| damaged("malformed chunk id".into()))?;
            let plain = match store.get_chunk(&id) {
                Ok(p) => p,
                Err(
                    e @ (crate::store::offsite::OffsiteError::Corrupt { .. }
                    | crate::store::offsite::OffsiteError::Missing(_)),
                ) => return Err(damaged(e.to_string())),
                Err(e) => return Err(e.into()),
            };
            let sha = sha256_hex(&plain);
            if sha != c.sha256 || plain.len() as u64 != len {
                return Err(damaged(format!(
                    "SHA-256 {sha} ({} bytes), expected {} ({len} bytes)",
                    plain.len(),
                    c.sha256
                )));
            }
            file.write_all_at(&plain, off)
                .map_err(|e| OffsiteRunError::io("write", &path, e))?;
            done += len;
            let elapsed = started.elapsed();
            progress.transfer(
                &name,
                Transfer {
                    done,
                    total,
                    bytes_per_sec: done as f64 / elapsed.as_secs_f64().max(1e-3),
                    elapsed,
                },
            );
        }
        file.sync_all()
            .map_err(|e| OffsiteRunError::io("sync", &path, e))?;
        if let Some(expected) = &f.sha256 {
            let actual = crate::engine::verify::sha256_file(&path)
                .map_err(|e| OffsiteRunError::io("read", &path, e))?;
            if &actual != expected {
                return Err(OffsiteRunError::Damaged {
                    backup: name.clone(),
                    file: f.name.clone(),
                    chunk: 0,
                    id: String::new(),
                    reason: format!("whole-file SHA-256 {actual}, expected {expected}"),
                });
            }
        }
    }
    let md = dir.join(layout::METADATA_FILE);
    std::fs::write(&md, m.metadata_json.as_bytes())
        .map_err(|e| OffsiteRunError::io("write", &md, e))?;
    Ok(())
}
