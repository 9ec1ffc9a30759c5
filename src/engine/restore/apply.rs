//! The acting half of a restore: carries out a [`RestorePlan`]. Every file is copied under a
//! temporary name first and checked against the backup's chunk manifest; the copied headers
//! are rebased onto the restored layers; only when everything is copied are the files renamed
//! into place; then the restored chains are checked, the domain defined (replacing a shut-off
//! definition when the plan says so) and started if asked.
//!
//! On any failure, files this restore created are removed (a guard), and a definition it
//! replaced is put back.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::plan::{normalize, RestorePlan};
use super::{RestoreError, RestoredDisk};
use crate::copier::{self, CopyOptions, HashMode};
use crate::hv::{qemu_img, xml, xml_edit, Hypervisor, Nvram};
use crate::progress::{CancelToken, Level, Progress};

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The UUID of the defined domain.
    pub uuid: String,
    /// Where each disk went.
    pub disks: Vec<RestoredDisk>,
    /// Whether a defined domain was replaced.
    pub replaced: bool,
    /// Whether the domain was started.
    pub started: bool,
}

/// Where a restore reads the backup's files from. The plan names them by their path in the
/// backup folder (`PlannedDisk::from`, …); a source turns that into bytes in a temporary file
/// that [`apply`] renames into place once every file is written and checked.
pub trait BackupSource {
    /// Writes the image `from` into `tmp` (created by the source, mode 0600), checking every
    /// chunk against `manifest` (unless `force`); `dest` names the final file in errors.
    /// Returns the image's logical size.
    #[allow(clippy::too_many_arguments)]
    fn image(
        &self,
        from: &Path,
        tmp: &Path,
        dest: &Path,
        manifest: &crate::copier::ChunkManifest,
        force: bool,
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<u64, RestoreError>;
    /// Copies the small file `from` (the NVRAM) to `to` (created with mode 0600).
    fn file(&self, from: &Path, to: &Path) -> Result<(), RestoreError>;
    /// Copies the folder `from` (appliance configurations) to `to`.
    fn tree(&self, from: &Path, to: &Path) -> Result<(), RestoreError>;
}

/// The backup folder on the target, read with the copier.
#[derive(Debug, Clone, Copy, Default)]
pub struct FolderSource;

impl BackupSource for FolderSource {
    fn image(
        &self,
        from: &Path,
        tmp: &Path,
        dest: &Path,
        manifest: &crate::copier::ChunkManifest,
        force: bool,
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<u64, RestoreError> {
        copy_image(from, tmp, dest, manifest, force, progress, cancel)
    }

    fn file(&self, from: &Path, to: &Path) -> Result<(), RestoreError> {
        copy_nofollow(from, to)
            .map(|_| ())
            .map_err(|source| RestoreError::Io {
                context: "cannot copy the NVRAM to",
                path: to.to_path_buf(),
                source,
            })
    }

    fn tree(&self, from: &Path, to: &Path) -> Result<(), RestoreError> {
        copy_tree(from, to)
    }
}

/// Carries out `plan`: `xml_text` is the backup's domain XML, rewritten with the plan's edits.
pub fn apply(
    plan: &RestorePlan,
    xml_text: &str,
    hv: &Hypervisor,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<Applied, RestoreError> {
    apply_from(plan, xml_text, hv, &FolderSource, progress, cancel)
}

/// [`apply`], reading the backup's files from `source`.
pub fn apply_from(
    plan: &RestorePlan,
    xml_text: &str,
    hv: &Hypervisor,
    source: &dyn BackupSource,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<Applied, RestoreError> {
    // The XML first: a document that cannot be rewritten stops the restore before any copy.
    let new_xml = xml_edit::rewrite(xml_text, &plan.edits)?;
    let uuid = xml::parse_domain(&new_xml)?.uuid;

    // Copy everything under temporary names, then rename into place.
    let mut created = CreatedFiles {
        files: Vec::new(),
        dirs: Vec::new(),
        armed: true,
    };
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut restored = Vec::new();
    for disk in &plan.disks {
        let tmp = staging_path(&disk.dest);
        ensure_dir(&disk.dest, &mut created)?;
        created.files.push(tmp.clone());
        progress.message(
            Level::Info,
            &format!("copying {} to {}", disk.record.file, disk.dest.display()),
        );
        let bytes = source.image(
            &disk.from,
            &tmp,
            &disk.dest,
            &disk.record.manifest,
            plan.force,
            progress,
            cancel,
        )?;
        hand_to_qemu(&tmp)?;
        drop_our_bitmaps(&tmp, &disk.record.format, progress);
        staged.push((tmp, disk.dest.clone()));
        for layer in &disk.layers {
            if layer.reuse {
                progress.message(
                    Level::Info,
                    &format!(
                        "{} is already in place with the backup's content: kept",
                        layer.dest.display()
                    ),
                );
                continue;
            }
            let tmp = staging_path(&layer.dest);
            ensure_dir(&layer.dest, &mut created)?;
            created.files.push(tmp.clone());
            progress.message(
                Level::Info,
                &format!("copying {} to {}", layer.record.file, layer.dest.display()),
            );
            source.image(
                &layer.from,
                &tmp,
                &layer.dest,
                &layer.record.manifest,
                plan.force,
                progress,
                cancel,
            )?;
            hand_to_qemu(&tmp)?;
            drop_our_bitmaps(&tmp, &layer.record.format, progress);
            staged.push((tmp, layer.dest.clone()));
        }
        restored.push(RestoredDisk {
            target: disk.record.target.clone(),
            path: disk.dest.clone(),
            bytes,
            backing_chain: disk.layers.iter().map(|l| l.dest.clone()).collect(),
        });
    }
    // Point every copied header at the restored layer below, on the staging copies.
    for rebase in plan.disks.iter().flat_map(|d| &d.rebases) {
        let Some((tmp, _)) = staged.iter().find(|(_, d)| *d == rebase.image) else {
            // A layer kept in place is never edited; the chain check below judges it.
            continue;
        };
        qemu_img::rebase_unsafe(tmp, &rebase.format, &rebase.backing, &rebase.backing_format)
            .map_err(|source| RestoreError::Rebase {
                image: rebase.image.clone(),
                backing: rebase.backing.clone(),
                source: Box::new(source),
            })?;
    }
    if let Some(nvram) = &plan.nvram {
        let tmp = staging_path(&nvram.to);
        ensure_dir(&nvram.to, &mut created)?;
        created.files.push(tmp.clone());
        source.file(&nvram.from, &tmp)?;
        staged.push((tmp, nvram.to.clone()));
    }
    if let Some(configs) = &plan.configs {
        let tmp = staging_path(&configs.to);
        created.dirs.push(tmp.clone());
        source.tree(&configs.from, &tmp)?;
        staged.push((tmp, configs.to.clone()));
    }
    if cancel.is_cancelled() {
        return Err(RestoreError::Cancelled);
    }
    for (tmp, dest) in &staged {
        let existed = dest.exists();
        if dest.is_dir() {
            let _ = fs::remove_dir_all(dest);
        }
        fs::rename(tmp, dest).map_err(|source| RestoreError::Io {
            context: "cannot rename into place",
            path: dest.clone(),
            source,
        })?;
        // From now on the guard removes the final file if the restore does not complete,
        // unless it existed before (then it was overwritten on purpose, with --force).
        created.files.retain(|f| f != tmp);
        created.dirs.retain(|f| f != tmp);
        if !existed {
            if dest.is_dir() {
                created.dirs.push(dest.clone());
            } else {
                created.files.push(dest.clone());
            }
        }
    }

    // Every restored chain is self-contained: exactly the restored files.
    for disk in &plan.disks {
        if !disk.layers.is_empty() {
            let layers: Vec<PathBuf> = disk.layers.iter().map(|l| l.dest.clone()).collect();
            check_chain(&disk.dest, &layers)?;
        }
    }

    // Define (replacing a shut-off domain with --force), start. The domain is looked at again
    // here: the copy took time, and a running domain is never touched.
    let existing = hv.find_domain(&plan.name)?;
    let mut old_xml = None;
    if let Some(old) = &existing {
        if old.is_active()? {
            return Err(RestoreError::Running(plan.name.clone()));
        }
        if !plan.force {
            return Err(RestoreError::Exists(plan.name.clone()));
        }
        old_xml = Some(old.xml(true)?);
        if old.uuid()? != uuid {
            old.undefine(Nvram::Keep)?;
        }
    }
    let domain = match hv.define(&plan.name, &new_xml) {
        Ok(d) => d,
        Err(e) => {
            if let Some(old) = &old_xml {
                if let Err(e2) = hv.define(&plan.name, old) {
                    tracing::error!(error = %e2, "could not put back the replaced definition");
                }
            }
            return Err(e.into());
        }
    };
    created.armed = false;
    let mut started = false;
    if plan.start {
        domain.start()?;
        started = true;
    }
    Ok(Applied {
        uuid,
        disks: restored,
        replaced: existing.is_some(),
        started,
    })
}

/// Checks with `qemu-img info -U --backing-chain` that the chain under `top` is exactly
/// `top` followed by `layers`.
fn check_chain(top: &Path, layers: &[PathBuf]) -> Result<(), RestoreError> {
    let chain =
        qemu_img::info_chain(top, None).map_err(|source| RestoreError::ChainUnreadable {
            path: top.to_path_buf(),
            source: Box::new(source),
        })?;
    let found: Vec<PathBuf> = chain.iter().map(|i| PathBuf::from(&i.filename)).collect();
    let expected: Vec<PathBuf> = std::iter::once(top.to_path_buf())
        .chain(layers.iter().cloned())
        .collect();
    let same = |a: &Path, b: &Path| {
        let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| normalize(p));
        canon(a) == canon(b)
    };
    if found.len() != expected.len() || !found.iter().zip(&expected).all(|(a, b)| same(a, b)) {
        return Err(RestoreError::Chain {
            path: top.to_path_buf(),
            expected,
            found,
        });
    }
    Ok(())
}

/// Copies one image of the backup to `tmp` with the copier, checking each chunk against the
/// backup's manifest (unless `force`). Returns the logical size.
fn copy_image(
    src: &Path,
    tmp: &Path,
    dest: &Path,
    manifest: &crate::copier::ChunkManifest,
    force: bool,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<u64, RestoreError> {
    let mut options = CopyOptions {
        hash: HashMode::Chunks,
        ..CopyOptions::default()
    };
    let comparable =
        manifest.chunk_size > 0 && manifest.chunk_size % options.buffer_size as u64 == 0;
    if comparable {
        options.chunk_size = manifest.chunk_size;
    }
    if fs::symlink_metadata(src).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(RestoreError::Io {
            context: "refusing to read through a symlink:",
            path: src.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::ELOOP),
        });
    }
    let report = copier::copy_file(src, tmp, &options, progress, cancel)?;
    if comparable {
        if let Some(m) = &report.manifest {
            if let Some(chunk) = m
                .digests
                .iter()
                .zip(&manifest.digests)
                .position(|(a, b)| a != b)
                .or((m.digests.len() != manifest.digests.len()).then_some(0))
            {
                if !force {
                    return Err(RestoreError::Mismatch {
                        path: dest.to_path_buf(),
                        chunk,
                    });
                }
            }
        }
    }
    Ok(report.logical_size)
}

/// A restored qcow2 image drops the checkpoint bitmaps (`vmb-*`) the backup copied from the
/// source (flagged `in-use` there): the restored VM starts clean. A failure is a warning.
fn drop_our_bitmaps(image: &Path, format: &str, progress: &dyn Progress) {
    if format != "qcow2" {
        return;
    }
    match qemu_img::remove_bitmaps(image, crate::hv::checkpoint::CHECKPOINT_PREFIX) {
        Ok(names) if !names.is_empty() => progress.message(
            Level::Info,
            &format!(
                "checkpoint bitmap(s) {} dropped from the restored image",
                names.join(", ")
            ),
        ),
        Ok(_) => {}
        Err(e) => progress.message(
            Level::Warning,
            &format!(
                "cannot drop the checkpoint bitmaps of {}: {e}",
                image.display()
            ),
        ),
    }
}

/// Removes the files a restore created if it does not complete.
struct CreatedFiles {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    armed: bool,
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for f in self.files.iter().rev() {
            let _ = fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// `<dir>/.<file>.vmb-restore`: the temporary name of a file being restored.
fn staging_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.vmb-restore"))
}

fn ensure_dir(dest: &Path, created: &mut CreatedFiles) -> Result<(), RestoreError> {
    let Some(parent) = dest.parent() else {
        return Ok(());
    };
    if let Some(top) = create_disk_dir(parent)? {
        created.dirs.push(top);
    }
    Ok(())
}

/// Creates the folder `dir` for restored disks, if missing, with every folder it creates
/// 0755 whatever the umask: QEMU (not root) must reach the images inside. Returns the topmost
/// folder it created (to remove it if the restore fails), `None` if `dir` existed.
pub fn create_disk_dir(dir: &Path) -> Result<Option<PathBuf>, RestoreError> {
    if dir.is_dir() {
        return Ok(None);
    }
    let mut top = dir.to_path_buf();
    while let Some(p) = top.parent() {
        if p.exists() {
            break;
        }
        top = p.to_path_buf();
    }
    fs::create_dir_all(dir).map_err(|source| RestoreError::Io {
        context: "cannot create",
        path: dir.to_path_buf(),
        source,
    })?;
    for d in dir.ancestors().take_while(|d| d.starts_with(&top)) {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(|source| {
            RestoreError::Io {
                context: "cannot set the mode of",
                path: d.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(Some(top))
}

/// Gives a restored image (or NVRAM) to the user QEMU runs as, mode 0600: private, yet
/// readable by libvirt's probe of the backing chain, which runs as that user before it
/// labels the images. Without such a user (QEMU as root), root keeps it.
pub(super) fn hand_to_qemu(path: &Path) -> Result<(), RestoreError> {
    let io = |source| RestoreError::Io {
        context: "cannot hand to the QEMU user",
        path: path.to_path_buf(),
        source,
    };
    if let Some((uid, gid)) = crate::hv::qemu_user() {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io)?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)
}

/// Copies the file `from` (never through a symlink at its name) to `to` (created with mode
/// 0600, or replaced).
pub(super) fn copy_nofollow(from: &Path, to: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)?;
    std::io::copy(&mut src, &mut dst)
}

fn copy_tree(src: &Path, dst: &Path) -> Result<(), RestoreError> {
    let io = |context, path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io {
            context,
            path,
            source,
        }
    };
    fs::create_dir_all(dst).map_err(io("cannot create", dst))?;
    for entry in fs::read_dir(src).map_err(io("cannot list", src))? {
        let entry = entry.map_err(io("cannot list", src))?;
        let to = dst.join(entry.file_name());
        let kind = entry
            .file_type()
            .map_err(io("cannot stat", &entry.path()))?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else {
            // A symlink in the backup is refused by the O_NOFOLLOW open, never followed.
            copy_nofollow(&entry.path(), &to).map_err(io("cannot copy to", &to))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_hidden_beside_the_destination() {
        assert_eq!(
            staging_path(Path::new("/r/web-vda.qcow2")),
            PathBuf::from("/r/.web-vda.qcow2.vmb-restore")
        );
    }
}
