//! The acting half of a restore: carries out a [`RestorePlan`]. Every file is copied under a
//! temporary name first; the copy is the check of the backup's data (one read of each image):
//! every chunk is compared with the backup's chunk manifest and the whole-file SHA-256 with
//! the metadata's ([`crate::engine::verify::check_copy`]), and a mismatch stops the restore
//! with [`RestoreError::Damaged`] naming the file and the chunk (with `force`: a warning, and
//! the restore goes on). The copied headers are rebased onto the restored layers; only when
//! everything is copied and checked are the files renamed into place; then the restored
//! chains are checked, the domain defined (replacing a shut-off definition when the plan says
//! so) and started if asked.
//!
//! On any failure, files this restore created are removed (a guard), and a definition it
//! replaced is put back.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::plan::{normalize, RestorePlan};
use super::{RestoreError, RestoredDisk};
use crate::copier::{self, CopyOptions, HashMode};
use crate::engine::verify::{self, FileCheck};
use crate::hv::{qemu_img, xml, xml_edit, Hypervisor, Nvram};
use crate::progress::{CancelToken, Level, Progress};

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The UUID of the defined domain.
    pub uuid: String,
    /// Where each disk went.
    pub disks: Vec<RestoredDisk>,
    /// Whether a defined domain was replaced.
    pub replaced: bool,
    /// Whether the domain was started.
    pub started: bool,
    /// The checks of the images' data made while copying them, and of the layers left in
    /// place (not read), in copy order; `file` as the metadata names it.
    pub checks: Vec<FileCheck>,
    /// Bytes of images checked as they were copied.
    pub bytes_checked: u64,
    /// Wall time of those copies, seconds.
    pub copy_seconds: f64,
}

/// One image a [`BackupSource`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CopiedImage {
    /// Its logical size.
    pub size: u64,
    /// The verdict on its data, checked as it was copied, when the source reports one
    /// ([`copy_checked`]); [`apply`] stops on a fault unless `force`. `None` when the source
    /// refuses damaged data itself (the off-site store).
    pub check: Option<FileCheck>,
}

/// Where a restore reads the backup's files from. The plan names them by their path in the
/// backup folder (`PlannedDisk::from`, …); a source turns that into bytes in a temporary file
/// that [`apply`] renames into place once every file is written and checked.
pub trait BackupSource {
    /// Writes the image `from` into `tmp` (created by the source, mode 0600), checking every
    /// chunk against `manifest` and the whole file against `sha256` (the metadata's) as it
    /// goes: the source either returns the verdict ([`CopiedImage::check`]) or fails on
    /// damage itself (unless `force`). `dest` names the final file in errors.
    #[allow(clippy::too_many_arguments)]
    fn image(
        &self,
        from: &Path,
        tmp: &Path,
        dest: &Path,
        manifest: &crate::copier::ChunkManifest,
        sha256: &str,
        force: bool,
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<CopiedImage, RestoreError>;
    /// Copies the small file `from` (the NVRAM) to `to` (created with mode 0600).
    fn file(&self, from: &Path, to: &Path) -> Result<(), RestoreError>;
    /// Copies the folder `from` (appliance configurations) to `to`.
    fn tree(&self, from: &Path, to: &Path) -> Result<(), RestoreError>;
}

/// The backup folder on the target, read once with the copier, which checks the data as it
/// copies it ([`copy_checked`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct FolderSource;

impl BackupSource for FolderSource {
    fn image(
        &self,
        from: &Path,
        tmp: &Path,
        _dest: &Path,
        manifest: &crate::copier::ChunkManifest,
        sha256: &str,
        _force: bool,
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<CopiedImage, RestoreError> {
        let file = from
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        copy_checked(from, tmp, &file, manifest, sha256, progress, cancel)
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
    let mut checked = Checked::default();
    for disk in &plan.disks {
        let tmp = staging_path(&disk.dest);
        ensure_dir(&disk.dest, &mut created)?;
        created.files.push(tmp.clone());
        progress.message(
            Level::Info,
            &format!("copying {} to {}", disk.record.file, disk.dest.display()),
        );
        let started = Instant::now();
        let copied = source.image(
            &disk.from,
            &tmp,
            &disk.dest,
            &disk.record.manifest,
            &disk.record.sha256,
            plan.force,
            progress,
            cancel,
        )?;
        checked.judge(
            plan,
            &disk.record.file,
            copied.check,
            copied.size,
            started,
            progress,
        )?;
        let bytes = copied.size;
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
                checked.checks.push(FileCheck {
                    file: layer.record.file.clone(),
                    check: "in place".into(),
                    ok: true,
                    detail: format!(
                        "already at {} with the backup's SHA-256: kept, not read from the backup",
                        layer.dest.display()
                    ),
                    bad_chunk: None,
                });
                continue;
            }
            let tmp = staging_path(&layer.dest);
            ensure_dir(&layer.dest, &mut created)?;
            created.files.push(tmp.clone());
            progress.message(
                Level::Info,
                &format!("copying {} to {}", layer.record.file, layer.dest.display()),
            );
            let started = Instant::now();
            let copied = source.image(
                &layer.from,
                &tmp,
                &layer.dest,
                &layer.record.manifest,
                &layer.record.sha256,
                plan.force,
                progress,
                cancel,
            )?;
            checked.judge(
                plan,
                &layer.record.file,
                copied.check,
                copied.size,
                started,
                progress,
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
        checks: checked.checks,
        bytes_checked: checked.bytes,
        copy_seconds: checked.seconds,
    })
}

/// The checks of a restore's copies so far.
#[derive(Default)]
struct Checked {
    checks: Vec<FileCheck>,
    bytes: u64,
    seconds: f64,
}

impl Checked {
    /// Records the verdict on the image `file` (the metadata's name, `size` bytes), copied
    /// since `started`:
    /// a fault stops the restore ([`RestoreError::Damaged`], naming the file and the chunk),
    /// or with `force` is a warning.
    fn judge(
        &mut self,
        plan: &RestorePlan,
        file: &str,
        check: Option<FileCheck>,
        size: u64,
        started: Instant,
        progress: &dyn Progress,
    ) -> Result<(), RestoreError> {
        self.seconds += started.elapsed().as_secs_f64();
        let Some(mut check) = check else {
            return Ok(());
        };
        check.file = file.to_string();
        if check.ok {
            self.bytes += size;
        } else {
            let detail = format!("{}: {}", check.file, check.detail);
            if !plan.force {
                return Err(RestoreError::Damaged {
                    dir: plan.backup_dir.clone(),
                    detail,
                });
            }
            progress.message(
                Level::Warning,
                &format!("backup is damaged ({detail}); restoring anyway (--force)"),
            );
        }
        self.checks.push(check);
        Ok(())
    }
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

/// Copies one image of the backup (`src`, named `file` in the verdict) to `tmp` with the
/// copier, in one read that is also its check: the chunk digests the copier computes are
/// compared with `manifest` and its whole-file SHA-256 with `sha256`
/// ([`verify::check_copy`]). A mismatch is a verdict in [`CopiedImage::check`], not an error.
///
/// The copier hashes in the manifest's chunks when their size is a multiple of 4096 (its
/// buffers are then sized to divide them). A manifest of other chunks is judged by the
/// whole-file SHA-256, and only when that differs is the backup's image read a second time
/// ([`copier::verify_file`]) to name the bad chunk.
pub fn copy_checked(
    src: &Path,
    tmp: &Path,
    file: &str,
    manifest: &crate::copier::ChunkManifest,
    sha256: &str,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<CopiedImage, RestoreError> {
    let mut options = CopyOptions {
        hash: HashMode::Both,
        ..CopyOptions::default()
    };
    let buffer = gcd(manifest.chunk_size, options.buffer_size as u64);
    let comparable = manifest.chunk_size > 0 && buffer % 4096 == 0;
    if comparable {
        options.chunk_size = manifest.chunk_size;
        options.buffer_size = usize::try_from(buffer).unwrap_or(options.buffer_size);
    }
    if fs::symlink_metadata(src).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(RestoreError::Io {
            context: "refusing to read through a symlink:",
            path: src.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::ELOOP),
        });
    }
    let report = copier::copy_file(src, tmp, &options, progress, cancel)?;
    let check = match (&report.manifest, comparable) {
        (Some(copied), true) => {
            verify::check_copy(file, manifest, sha256, copied, report.sha256.as_deref())
        }
        _ if !sha256.is_empty()
            && report
                .sha256
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case(sha256)) =>
        {
            FileCheck {
                file: file.to_string(),
                check: "manifest".into(),
                ok: true,
                detail: "the whole-file SHA-256 matches the metadata (checked as copied)".into(),
                bad_chunk: None,
            }
        }
        _ => {
            // Not comparable chunk by chunk and the whole file differs (or is not recorded):
            // name the chunk as `vm-backup verify` would, reading the backup again.
            let found = copier::verify_file(src, manifest, progress, cancel)?;
            verify::manifest_check(file, &found)
        }
    };
    Ok(CopiedImage {
        size: report.logical_size,
        check: Some(check),
    })
}

/// Greatest common divisor (0 with 0 is 0).
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
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

    /// A backup image of `len` bytes and its manifest and SHA-256, made by the copier.
    fn backup_image(dir: &Path, len: usize) -> (PathBuf, copier::ChunkManifest, String) {
        let src = dir.join("src.raw");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        fs::write(&src, data).unwrap();
        let backup = dir.join("backup.raw");
        let r = copier::copy_file(
            &src,
            &backup,
            &CopyOptions::default(),
            &crate::progress::NoProgress,
            &CancelToken::new(),
        )
        .unwrap();
        (backup, r.manifest.unwrap(), r.sha256.unwrap())
    }

    #[test]
    fn one_read_copy_names_the_flipped_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (backup, manifest, sha) = backup_image(dir.path(), 9 << 20);
        let copy = |name: &str| {
            copy_checked(
                &backup,
                &dir.path().join(name),
                "web-vda.raw",
                &manifest,
                &sha,
                &crate::progress::NoProgress,
                &CancelToken::new(),
            )
            .unwrap()
        };
        let good = copy("good");
        assert_eq!(good.size, 9 << 20);
        let check = good.check.unwrap();
        assert!(check.ok, "{check:?}");
        assert!(check.detail.contains("3 chunks match"), "{check:?}");

        let mut bytes = fs::read(&backup).unwrap();
        bytes[(9 << 20) / 2] ^= 0xff;
        fs::write(&backup, &bytes).unwrap();
        let check = copy("bad").check.unwrap();
        assert!(!check.ok);
        assert_eq!(check.bad_chunk, Some((1, 4 << 20)));
        assert_eq!(
            check.detail,
            "chunk 1 (offset 4194304) does not match the manifest (1 bad chunk(s))"
        );
        // The copy is there (the caller's guard removes it).
        assert_eq!(fs::read(dir.path().join("bad")).unwrap(), bytes);
    }

    #[test]
    fn a_manifest_of_odd_chunks_is_judged_by_the_whole_file_then_located() {
        let dir = tempfile::tempdir().unwrap();
        let (backup, _, sha) = backup_image(dir.path(), 3000);
        let data = fs::read(&backup).unwrap();
        // A manifest in 1000-byte chunks, which the copier cannot hash in.
        let digests: Vec<[u8; 32]> = data
            .chunks(1000)
            .map(|c| {
                use sha2::Digest;
                sha2::Sha256::digest(c).into()
            })
            .collect();
        let manifest = copier::ChunkManifest {
            chunk_size: 1000,
            file_size: 3000,
            digests: digests.iter().map(hex::encode).collect(),
            zero_chunks: Vec::new(),
            root: hex::encode(copier::root_digest(&digests)),
        };
        let run = |name: &str| {
            copy_checked(
                &backup,
                &dir.path().join(name),
                "odd.raw",
                &manifest,
                &sha,
                &crate::progress::NoProgress,
                &CancelToken::new(),
            )
            .unwrap()
            .check
            .unwrap()
        };
        assert!(run("good").ok);
        let mut bad = data.clone();
        bad[2500] ^= 1;
        fs::write(&backup, &bad).unwrap();
        let check = run("bad");
        assert!(!check.ok);
        assert_eq!(check.bad_chunk, Some((2, 2000)));
    }

    #[test]
    fn staging_names_are_hidden_beside_the_destination() {
        assert_eq!(
            staging_path(Path::new("/r/web-vda.qcow2")),
            PathBuf::from("/r/.web-vda.qcow2.vmb-restore")
        );
    }
}
