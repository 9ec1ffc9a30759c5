//! Verification of published backups: every disk image and every layer of its backing chain
//! re-hashed against its chunk manifest
//! (through [`crate::copier::verify_file`], all disks in parallel), every other file against
//! `checksums.sha256`, and `qemu-img check` on qcow2 images.
//!
//! [`verify_backup`] reads and judges; [`record_verdict`] writes the verdict into the backup's
//! `backup-metadata.json` (`verify` field) and the catalog. `vm-backup verify` does both and
//! alerts on a fault. A restore reads each image once: it runs [`verify_backup`] without the
//! disk data ([`VerifyOptions::disk_data`] off: metadata, small files, `qemu-img check`, the
//! manifests) before it writes anything, then judges each image as it copies it
//! ([`check_copy`]: every chunk against the manifest, the whole-file SHA-256 against the
//! metadata).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::format::layout::CHECKSUMS_FILE;
use crate::format::metadata::{BackupMetadata, DiskRecord, Verdict};
use crate::progress::{CancelToken, Level, Progress};

/// Errors of this module: verification could not run (a fault found is not an error, it is
/// a verdict in the [`VerifyReport`]).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The backup's metadata cannot be read.
    #[error("cannot read the metadata of {dir}: {source}")]
    Metadata {
        /// The backup folder.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the verdict failed.
    #[error("cannot record the verdict in {dir}: {source}")]
    Record {
        /// The backup folder.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Verification was cancelled.
    #[error("verification of {0} cancelled")]
    Cancelled(PathBuf),
}

/// The result of checking one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileCheck {
    /// The file, relative to the backup folder.
    pub file: String,
    /// What was checked: `manifest`, `sha256`, `qemu-img check`.
    pub check: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, in words.
    pub detail: String,
    /// The first bad chunk (index, byte offset) for a manifest check.
    pub bad_chunk: Option<(u64, u64)>,
}

/// The verdict on one backup folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    /// The backup folder.
    pub dir: PathBuf,
    /// Host, VM and stamp from the metadata.
    pub host: String,
    /// Domain name.
    pub vm: String,
    /// Backup stamp.
    pub stamp: String,
    /// Every check made.
    pub checks: Vec<FileCheck>,
    /// True when every check passed.
    pub ok: bool,
    /// Bytes of disk images re-hashed.
    pub bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl VerifyReport {
    /// The first failed check, worded for the operator (names the file and the chunk).
    pub fn first_fault(&self) -> Option<String> {
        self.checks
            .iter()
            .find(|c| !c.ok)
            .map(|c| format!("{}: {}", c.file, c.detail))
    }

    /// A one-line summary: the first fault, or what passed.
    pub fn summary(&self) -> String {
        match self.first_fault() {
            Some(f) => {
                let more = self.checks.iter().filter(|c| !c.ok).count() - 1;
                if more > 0 {
                    format!("{f} (and {more} more fault(s))")
                } else {
                    f
                }
            }
            None => format!(
                "{} checks passed ({} of disk images re-hashed in {:.1} s)",
                self.checks.len(),
                crate::progress::human_bytes(self.bytes),
                self.seconds
            ),
        }
    }

    /// The verdict to record in the metadata.
    pub fn verdict(&self) -> Verdict {
        Verdict {
            at: chrono::Local::now().to_rfc3339(),
            ok: self.ok,
            detail: self.summary(),
        }
    }
}

/// Options of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Also run `qemu-img check` on qcow2 images.
    pub qemu_img_check: bool,
    /// Re-hash the disk images against their manifests. Without it only the cheap checks run
    /// on each image (present, a regular file of the manifest's size, the manifest well
    /// formed): a restore checks the data as it copies it ([`check_copy`]), in one read.
    pub disk_data: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            qemu_img_check: true,
            disk_data: true,
        }
    }
}

/// Verifies one backup folder. A damaged file is a verdict (`ok == false`), not an error.
pub fn verify_backup(
    dir: &Path,
    options: &VerifyOptions,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let meta = BackupMetadata::read(dir).map_err(|source| VerifyError::Metadata {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut checks = Vec::new();

    // Disk images and every layer of their backing chains against their manifests, all in
    // parallel (the copier parallelises each one too).
    let images = images_of(&meta);
    let disk_checks: Vec<FileCheck> = if !options.disk_data {
        images
            .iter()
            .map(|image| check_manifest_shape(dir, &image.file, image.manifest))
            .collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = images
                .iter()
                .map(|image| {
                    scope.spawn(move || {
                        check_manifest(dir, &image.file, image.manifest, progress, cancel)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| FileCheck {
                        file: String::new(),
                        check: "manifest".into(),
                        ok: false,
                        detail: "the verifying thread panicked".into(),
                        bad_chunk: None,
                    })
                })
                .collect()
        })
    };
    if cancel.is_cancelled() {
        return Err(VerifyError::Cancelled(dir.to_path_buf()));
    }
    checks.extend(disk_checks);

    // checksums.sha256: other files re-hashed; disk lines must agree with the metadata.
    checks.extend(check_checksums(dir, &meta));

    if options.qemu_img_check {
        for image in images.iter().filter(|i| i.format == "qcow2") {
            checks.push(qemu_img_check(&dir.join(&image.file), &image.file));
        }
        // Each backing chain as a whole, opened inside the folder.
        for disk in meta.disks.iter().filter(|d| !d.backing_chain.is_empty()) {
            checks.push(chain_check(dir, disk));
        }
    }
    for c in checks.iter().filter(|c| !c.ok) {
        progress.message(Level::Error, &format!("{}: {}", c.file, c.detail));
    }
    let ok = checks.iter().all(|c| c.ok);
    Ok(VerifyReport {
        dir: dir.to_path_buf(),
        host: meta.host.clone(),
        vm: meta.vm_name.clone(),
        stamp: meta.stamp.clone(),
        ok,
        bytes: if options.disk_data {
            images.iter().map(|i| i.file_size).sum()
        } else {
            0
        },
        seconds: started.elapsed().as_secs_f64(),
        checks,
    })
}

/// One image file of a backup: a disk image or a layer of its backing chain.
struct ImageRef<'a> {
    file: String,
    format: &'a str,
    sha256: &'a str,
    file_size: u64,
    manifest: &'a crate::copier::ChunkManifest,
}

/// Every image file the metadata records: each disk, then its backing layers top to bottom.
fn images_of(meta: &BackupMetadata) -> Vec<ImageRef<'_>> {
    let mut out = Vec::new();
    for disk in &meta.disks {
        out.push(ImageRef {
            file: disk.file.clone(),
            format: &disk.format,
            sha256: &disk.sha256,
            file_size: disk.file_size,
            manifest: &disk.manifest,
        });
        for layer in &disk.backing_chain {
            out.push(ImageRef {
                file: layer.file.clone(),
                format: &layer.format,
                sha256: &layer.sha256,
                file_size: layer.file_size,
                manifest: &layer.manifest,
            });
        }
    }
    out
}

fn check_manifest(
    dir: &Path,
    file: &str,
    manifest: &crate::copier::ChunkManifest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> FileCheck {
    let path = dir.join(file);
    if !path.is_file() {
        return manifest_fault(file, "missing".into());
    }
    match crate::copier::verify_file(&path, manifest, progress, cancel) {
        Err(e) => manifest_fault(file, format!("cannot be verified: {e}")),
        Ok(report) => manifest_check(file, &report),
    }
}

fn manifest_fault(file: &str, detail: String) -> FileCheck {
    FileCheck {
        file: file.to_string(),
        check: "manifest".into(),
        ok: false,
        detail,
        bad_chunk: None,
    }
}

/// The verdict on one image from the copier's report of it against its manifest, worded for
/// the operator: the first bad chunk (index and byte offset) and how many there are, or the
/// size, or the manifest's root.
pub fn manifest_check(file: &str, report: &crate::copier::VerifyFileReport) -> FileCheck {
    let mut check = manifest_fault(file, String::new());
    if report.ok {
        check.ok = true;
        check.detail = format!("{} chunks match the manifest", report.chunks);
    } else if let Some(bad) = &report.first_bad {
        check.bad_chunk = Some((bad.index, bad.offset));
        check.detail = format!(
            "chunk {} (offset {}) does not match the manifest ({} bad chunk(s))",
            bad.index,
            bad.offset,
            report.bad_chunks.len()
        );
    } else if report.file_size != report.expected_size {
        check.detail = format!(
            "size is {} bytes, the manifest says {}",
            report.file_size, report.expected_size
        );
    } else if !report.root_ok {
        check.detail = "the manifest's root digest does not match its chunks".into();
    } else {
        check.detail = "does not match the manifest".into();
    }
    check
}

/// What is wrong with a chunk manifest ([`manifest_shape`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestShapeError {
    /// The digests do not cover the recorded size in the recorded chunks.
    #[error(
        "the manifest lists {listed} digests; a file of {file_size} bytes in chunks of \
         {chunk_size} has {expected}"
    )]
    Count {
        /// Digests listed.
        listed: usize,
        /// The recorded file size.
        file_size: u64,
        /// The recorded chunk size.
        chunk_size: u64,
        /// Digests such a file has.
        expected: u64,
    },
    /// A digest is not 32 bytes of hex.
    #[error("a manifest digest is not hex: {0}")]
    NotHex(#[from] hex::FromHexError),
    /// The root does not match the digests.
    #[error("the manifest's root digest does not match its chunks")]
    Root,
}

impl ManifestShapeError {
    /// What kind of failure this is: the backup's record is damaged.
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Corrupt
    }
}

/// Whether a manifest is well formed: a chunk size, one hex digest per chunk of the recorded
/// size, and a root over those digests. Returns the number of chunks.
pub fn manifest_shape(manifest: &crate::copier::ChunkManifest) -> Result<u64, ManifestShapeError> {
    use crate::copier::ChunkManifest;
    let count = ChunkManifest::chunk_count(manifest.file_size, manifest.chunk_size);
    if manifest.chunk_size == 0 || manifest.digests.len() as u64 != count {
        return Err(ManifestShapeError::Count {
            listed: manifest.digests.len(),
            file_size: manifest.file_size,
            chunk_size: manifest.chunk_size,
            expected: count,
        });
    }
    let digests: Vec<[u8; 32]> = manifest
        .digests
        .iter()
        .map(|d| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(d, &mut out).map(|()| out)
        })
        .collect::<Result<_, _>>()?;
    if hex::encode(crate::copier::root_digest(&digests)) != manifest.root {
        return Err(ManifestShapeError::Root);
    }
    Ok(count)
}

/// The cheap checks of one image, its data not read: a regular file (not a symlink) of the
/// manifest's size, and the manifest well formed.
fn check_manifest_shape(
    dir: &Path,
    file: &str,
    manifest: &crate::copier::ChunkManifest,
) -> FileCheck {
    let mut check = manifest_fault(file, String::new());
    check.check = "manifest (data not read)".into();
    match fs::symlink_metadata(dir.join(file)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => check.detail = "missing".into(),
        Err(e) => check.detail = format!("cannot be read: {e}"),
        Ok(m) if !m.file_type().is_file() => check.detail = "is not a regular file".into(),
        Ok(m) if m.len() != manifest.file_size => {
            check.detail = format!(
                "size is {} bytes, the manifest says {}",
                m.len(),
                manifest.file_size
            );
        }
        Ok(_) => match manifest_shape(manifest) {
            Err(e) => check.detail = e.to_string(),
            Ok(chunks) => {
                check.ok = true;
                check.detail = format!(
                    "present, {chunks} chunks in a well-formed manifest; data not read here"
                );
            }
        },
    }
    check
}

/// The verdict on one image checked as it was copied (a restore's single read): the chunk
/// digests the copy computed (`copied`) against the backup's `manifest`, worded as
/// [`manifest_check`] words a verify, then the copy's whole-file SHA-256 (`copied_sha256`)
/// against the one the metadata records (`sha256`, when it records one).
pub fn check_copy(
    file: &str,
    manifest: &crate::copier::ChunkManifest,
    sha256: &str,
    copied: &crate::copier::ChunkManifest,
    copied_sha256: Option<&str>,
) -> FileCheck {
    use crate::copier::{BadChunk, VerifyFileReport};
    let count = crate::copier::ChunkManifest::chunk_count(manifest.file_size, manifest.chunk_size);
    let bad_chunks: Vec<u64> = (0..count)
        .filter(|&i| {
            let i = i as usize;
            copied.digests.get(i) != manifest.digests.get(i)
        })
        .collect();
    let first_bad = bad_chunks.first().map(|&index| BadChunk {
        index,
        offset: index * manifest.chunk_size,
        expected: manifest
            .digests
            .get(index as usize)
            .cloned()
            .unwrap_or_default(),
        actual: copied
            .digests
            .get(index as usize)
            .cloned()
            .unwrap_or_default(),
    });
    let root_ok = manifest_shape(manifest).is_ok();
    let report = VerifyFileReport {
        file: PathBuf::from(file),
        file_size: copied.file_size,
        expected_size: manifest.file_size,
        chunks: count,
        ok: bad_chunks.is_empty() && root_ok && copied.file_size == manifest.file_size,
        bad_chunks,
        first_bad,
        root_ok,
        bytes_read: 0,
        duration: std::time::Duration::ZERO,
    };
    let mut check = manifest_check(file, &report);
    if !check.ok {
        return check;
    }
    match copied_sha256 {
        _ if sha256.is_empty() => {
            check.detail = format!("{} (checked as copied)", check.detail);
        }
        Some(actual) if actual.eq_ignore_ascii_case(sha256) => {
            check.detail = format!(
                "{} and the whole-file SHA-256 matches the metadata (checked as copied)",
                check.detail
            );
        }
        Some(actual) => {
            check.ok = false;
            check.detail =
                format!("whole-file SHA-256 of the copy is {actual}, the metadata says {sha256}");
        }
        None => {
            check.ok = false;
            check.detail = "the copy computed no whole-file SHA-256".into();
        }
    }
    check
}

fn check_checksums(dir: &Path, meta: &BackupMetadata) -> Vec<FileCheck> {
    let images = images_of(meta);
    let mut out = Vec::new();
    let text = match fs::read_to_string(dir.join(CHECKSUMS_FILE)) {
        Ok(t) => t,
        Err(e) => {
            out.push(FileCheck {
                file: CHECKSUMS_FILE.into(),
                check: "sha256".into(),
                ok: false,
                detail: format!("cannot be read: {e}"),
                bad_chunk: None,
            });
            return out;
        }
    };
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let Some((digest, name)) = line.split_once("  ").or_else(|| line.split_once(" *")) else {
            out.push(FileCheck {
                file: CHECKSUMS_FILE.into(),
                check: "sha256".into(),
                ok: false,
                detail: format!("line {} is not `<sha256>  <file>`", n + 1),
                bad_chunk: None,
            });
            continue;
        };
        let name = name.trim();
        let mut check = FileCheck {
            file: name.to_string(),
            check: "sha256".into(),
            ok: false,
            detail: String::new(),
            bad_chunk: None,
        };
        if name.starts_with('/') || name.split('/').any(|c| c == "..") {
            check.detail = "names a path outside the backup folder".into();
        } else if let Some(image) = images.iter().find(|i| i.file == name) {
            // The image itself was re-hashed chunk by chunk; the line must agree with the record.
            check.ok = image.sha256.eq_ignore_ascii_case(digest.trim());
            check.detail = if check.ok {
                "agrees with the metadata".into()
            } else {
                "differs from the digest in the metadata".into()
            };
        } else {
            match sha256_file(&dir.join(name)) {
                Ok(actual) if actual.eq_ignore_ascii_case(digest.trim()) => {
                    check.ok = true;
                    check.detail = "matches".into();
                }
                Ok(_) => check.detail = "SHA-256 does not match checksums.sha256".into(),
                Err(e) => check.detail = format!("cannot be read: {e}"),
            }
        }
        out.push(check);
    }
    // Every image and every other file the metadata names must be listed: a line cut away at a
    // line boundary leaves a well-formed but shorter list that `sha256sum -c` would pass.
    let named = images
        .iter()
        .map(|i| i.file.as_str())
        .chain(meta.files.iter().map(String::as_str));
    for name in named {
        if !out.iter().any(|c| c.file == name) {
            out.push(FileCheck {
                file: name.to_string(),
                check: "sha256".into(),
                ok: false,
                detail: "not listed in checksums.sha256".into(),
                bad_chunk: None,
            });
        }
    }
    out
}

/// SHA-256 of a whole (small) file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// `qemu-img check` of a qcow2 image: exit 0 is clean, 3 is leaked clusters only (harmless,
/// reported), anything else is a fault. The image is opened without its backing file: only
/// this file's own structure is checked ([`chain_check`] opens the chain as a whole).
pub fn qemu_img_check(path: &Path, name: &str) -> FileCheck {
    let (ok, detail) = match crate::hv::qemu_img::check(path) {
        Ok(r) if r.leaks == 0 => (true, "qemu-img check: no errors".to_string()),
        Ok(r) => (
            true,
            format!(
                "qemu-img check: {} leaked cluster(s), no corruption",
                r.leaks
            ),
        ),
        Err(e) => (false, e.to_string()),
    };
    FileCheck {
        file: name.to_string(),
        check: "qemu-img check".into(),
        ok,
        detail,
        bad_chunk: None,
    }
}

/// The backing chain of `disk` as a whole, inside the backup folder `dir`, never a file
/// outside it: first each qcow2 layer's own header (read without opening its backing file)
/// must name the next layer's file of the folder by its plain name, and the bottom layer
/// none, and every layer must be a regular file (no symlink); only then is the top opened
/// with its chain (`qemu-img info --backing-chain`: exactly the folder's layers, in order;
/// `qemu-img check` with the chain). A backup written before copies were rewritten (no
/// `backing_rewrite` in its metadata) names the original files: that is said, and passes
/// (each layer is checked on its own; a restore rebases the chain).
pub fn chain_check(dir: &Path, disk: &DiskRecord) -> FileCheck {
    let verdict = |ok: bool, detail: String| FileCheck {
        file: disk.file.clone(),
        check: "backing chain".into(),
        ok,
        detail,
        bad_chunk: None,
    };
    let layers: Vec<(&str, &str)> = std::iter::once((disk.file.as_str(), disk.format.as_str()))
        .chain(
            disk.backing_chain
                .iter()
                .map(|b| (b.file.as_str(), b.format.as_str())),
        )
        .collect();
    let rewritten = disk.backing_rewrite.is_some();
    for (i, (file, format)) in layers.iter().enumerate() {
        let path = dir.join(file);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => return verdict(false, format!("{file} is not a regular file")),
            Err(e) => return verdict(false, format!("{file}: {e}")),
        }
        if *format != "qcow2" {
            continue; // a raw layer has no header, hence no backing file
        }
        let named = match crate::hv::qemu_img::info(&path, format) {
            Ok(info) => info.backing_filename,
            Err(e) => return verdict(false, e.to_string()),
        };
        let expected = layers.get(i + 1).map(|(f, _)| *f);
        if named.as_deref() != expected {
            let what = named.as_deref().unwrap_or("no backing file");
            let want = expected.unwrap_or("no backing file");
            if !rewritten {
                return verdict(
                    true,
                    format!(
                        "written before backups named their own layers: {file} names {what}; \
                         each layer checked on its own, the chain as a whole is not (a restore \
                         rebases it)"
                    ),
                );
            }
            return verdict(
                false,
                format!("{file} names {what}, not {want}: the chain would leave the backup"),
            );
        }
    }
    let top = dir.join(disk.file.as_str());
    let chain = match crate::hv::qemu_img::info_chain(&top, Some(&disk.format)) {
        Ok(c) => c,
        Err(e) => return verdict(false, e.to_string()),
    };
    let found: Vec<PathBuf> = chain.iter().map(|i| PathBuf::from(&i.filename)).collect();
    let want: Vec<PathBuf> = layers.iter().map(|(f, _)| dir.join(f)).collect();
    let (ok, detail) = opened_chain_verdict(&top, &disk.format, &found, &want, "backup");
    verdict(ok, detail)
}

/// Writes the verdict into the backup's metadata (atomically) and the catalog. A catalog
/// failure is logged, not returned: the metadata file is the record.
pub fn record_verdict(target: &Path, report: &VerifyReport) -> Result<BackupMetadata, VerifyError> {
    let record = |source| VerifyError::Record {
        dir: report.dir.clone(),
        source,
    };
    let mut meta = BackupMetadata::read(&report.dir).map_err(record)?;
    meta.verify = Some(report.verdict());
    crate::store::write_metadata(&report.dir, &meta).map_err(|e| record(e.into()))?;
    // Keep checksums.sha256 untouched: the metadata is not listed in it.
    if let Err(e) = crate::store::catalog::record_verdict(target, &meta, &report.dir) {
        tracing::warn!(error = %e, "verify verdict not recorded in the catalog");
    }
    Ok(meta)
}

impl VerifyError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            VerifyError::Metadata { .. } => ErrorKind::Corrupt,
            VerifyError::Record { .. } => ErrorKind::TargetFailing,
            VerifyError::Cancelled { .. } => ErrorKind::Cancelled,
        }
    }
}

/// Verifies a backup and, for an incremental or differential, its whole chain down to the
/// full: every parent folder checked like the backup itself (its files reported as
/// `../<stamp>/<file>`), each parent's recorded stamp and VM name as the child names them,
/// each increment's header naming exactly `../<parent stamp>/<parent's file>` (relative,
/// inside the VM's folder on the target), and every disk's chain opened as a whole
/// (`qemu-img info --backing-chain`: exactly the expected layers; `qemu-img check` with the
/// chain). A full verifies as with [`verify_backup`].
pub fn verify_chain(
    dir: &Path,
    options: &VerifyOptions,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let mut report = verify_backup(dir, options, progress, cancel)?;
    let meta = BackupMetadata::read(dir).map_err(|source| VerifyError::Metadata {
        dir: dir.to_path_buf(),
        source,
    })?;
    if meta.chain.parent.is_none() {
        return Ok(report);
    }
    let fault = |file: String, check: &str, detail: String| FileCheck {
        file,
        check: check.into(),
        ok: false,
        detail,
        bad_chunk: None,
    };
    let base = dir.parent().unwrap_or(dir);
    let mut folders: Vec<(PathBuf, BackupMetadata)> = vec![(dir.to_path_buf(), meta.clone())];
    let mut extra = Vec::new();
    let mut complete = true;
    let mut next = meta.chain.parent.clone();
    while let Some(p) = next.take() {
        let rel = format!("../{p}");
        if folders.len() > 1000 {
            extra.push(fault(
                rel,
                "chain",
                "the chain does not end in a full".into(),
            ));
            complete = false;
            break;
        }
        if p == ".."
            || crate::format::layout::safe_component(&p).ok().as_deref() != Some(p.as_str())
        {
            extra.push(fault(
                rel,
                "chain",
                "the recorded parent is not a folder name of this VM".into(),
            ));
            complete = false;
            break;
        }
        let pdir = base.join(&p);
        match fs::symlink_metadata(&pdir) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                extra.push(fault(rel, "chain", "the parent is not a folder".into()));
                complete = false;
                break;
            }
            Err(e) => {
                extra.push(fault(rel, "chain", format!("the parent is missing: {e}")));
                complete = false;
                break;
            }
        }
        let pmeta = match BackupMetadata::read(&pdir) {
            Ok(m) => m,
            Err(e) => {
                extra.push(fault(
                    rel,
                    "chain",
                    format!("the parent's metadata cannot be read: {e}"),
                ));
                complete = false;
                break;
            }
        };
        if pmeta.stamp != p || pmeta.vm_name != meta.vm_name {
            extra.push(fault(
                rel.clone(),
                "chain",
                format!(
                    "the parent records stamp {} of VM {:?}, the child names {p} of {:?}",
                    pmeta.stamp, pmeta.vm_name, meta.vm_name
                ),
            ));
        }
        progress.message(Level::Info, &format!("verifying the parent {p}"));
        let r = verify_backup(&pdir, options, progress, cancel)?;
        report.bytes += r.bytes;
        extra.extend(r.checks.into_iter().map(|mut c| {
            c.file = format!("{rel}/{}", c.file);
            c
        }));
        next = pmeta.chain.parent.clone();
        folders.push((pdir, pmeta));
    }
    // The links between the folders, and each disk's chain as a whole.
    for (i, (fdir, fmeta)) in folders.iter().enumerate() {
        let Some((_, pmeta)) = folders.get(i + 1) else {
            break;
        };
        let prefix = if i == 0 {
            String::new()
        } else {
            format!("../{}/", fmeta.stamp)
        };
        for disk in fmeta
            .disks
            .iter()
            .filter(|d| fmeta.chain.disk_has_parent(&d.target))
        {
            extra.push(link_check(fdir, &prefix, disk, pmeta));
        }
    }
    if complete && options.qemu_img_check {
        for disk in &meta.disks {
            extra.push(whole_chain_check(&folders, &disk.target));
        }
    }
    for c in extra.iter().filter(|c| !c.ok) {
        progress.message(Level::Error, &format!("{}: {}", c.file, c.detail));
    }
    report.checks.extend(extra);
    report.ok = report.checks.iter().all(|c| c.ok);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The header of an increment's image must name its parent's image of the same disk as
/// `../<parent stamp>/<file>`: relative, inside the VM's folder, the parent as recorded.
fn link_check(dir: &Path, prefix: &str, disk: &DiskRecord, parent: &BackupMetadata) -> FileCheck {
    let file = format!("{prefix}{}", disk.file);
    let verdict = |ok: bool, detail: String| FileCheck {
        file: file.clone(),
        check: "chain link".into(),
        ok,
        detail,
        bad_chunk: None,
    };
    let Some(pd) = parent.disks.iter().find(|d| d.target == disk.target) else {
        return verdict(
            false,
            format!("disk {} is not in the parent {}", disk.target, parent.stamp),
        );
    };
    let want = format!("../{}/{}", parent.stamp, pd.file);
    match crate::hv::qemu_img::info(&dir.join(&disk.file), &disk.format) {
        Ok(info) if info.backing_filename.as_deref() == Some(want.as_str()) => {
            verdict(true, format!("names its parent's image {want}"))
        }
        Ok(info) => verdict(
            false,
            format!(
                "names {}, not the parent's image {want}",
                info.backing_filename
                    .as_deref()
                    .unwrap_or("no backing file")
            ),
        ),
        Err(e) => verdict(false, e.to_string()),
    }
}

/// The layers disk `target` of `folders[0]` must open, top to bottom: its image in each
/// folder of the chain while it is an increment there, then the base folder's own backing
/// chain (absolute paths).
fn expected_layers(folders: &[(PathBuf, BackupMetadata)], target: &str) -> Option<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (dir, meta) in folders {
        let disk = meta.disks.iter().find(|d| d.target == target)?;
        out.push(dir.join(&disk.file));
        if !meta.chain.disk_has_parent(target) {
            out.extend(disk.backing_chain.iter().map(|b| dir.join(&b.file)));
            return Some(out);
        }
    }
    None
}

/// Disk `target`'s chain opened as a whole from the top folder: exactly the expected layers
/// (compared after resolving `..`), then `qemu-img check` with the chain.
fn whole_chain_check(folders: &[(PathBuf, BackupMetadata)], target: &str) -> FileCheck {
    let (dir, meta) = &folders[0];
    let disk = meta.disks.iter().find(|d| d.target == target);
    let file = disk.map(|d| d.file.clone()).unwrap_or_default();
    let verdict = |ok: bool, detail: String| FileCheck {
        file: file.clone(),
        check: "whole chain".into(),
        ok,
        detail,
        bad_chunk: None,
    };
    let (Some(disk), Some(want)) = (disk, expected_layers(folders, target)) else {
        return verdict(
            false,
            format!("disk {target}: the chain does not reach its base"),
        );
    };
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let top = dir.join(&disk.file);
    let found = match crate::hv::qemu_img::info_chain(&top, Some(&disk.format)) {
        Ok(c) => c,
        Err(e) => return verdict(false, e.to_string()),
    };
    let found: Vec<PathBuf> = found
        .iter()
        .map(|i| canon(Path::new(&i.filename)))
        .collect();
    let want: Vec<PathBuf> = want.iter().map(|p| canon(p)).collect();
    let (ok, detail) = opened_chain_verdict(&top, &disk.format, &found, &want, "target");
    verdict(ok, detail)
}

/// The verdict on a chain qemu-img opened from `top`: exactly the `want` layers (`found`, in
/// order), then `qemu-img check` with the chain. `scope` names where the layers must lie.
fn opened_chain_verdict(
    top: &Path,
    format: &str,
    found: &[PathBuf],
    want: &[PathBuf],
    scope: &str,
) -> (bool, String) {
    if found != want {
        return (
            false,
            format!("qemu-img opens {found:?} as the chain, expected {want:?}"),
        );
    }
    match crate::hv::qemu_img::check_chain(top, format) {
        Ok(r) => (
            true,
            format!(
                "{} layer(s) open inside the {scope}; qemu-img check with the chain: {}",
                want.len(),
                if r.leaks == 0 {
                    "no errors".to_string()
                } else {
                    format!("{} leaked cluster(s), no corruption", r.leaks)
                }
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copier::{root_digest, ChunkManifest};

    /// The manifest of `data` in chunks of `chunk` bytes, and its whole-file SHA-256.
    fn manifest_of(data: &[u8], chunk: usize) -> (ChunkManifest, String) {
        let digests: Vec<[u8; 32]> = data
            .chunks(chunk)
            .map(|c| Sha256::digest(c).into())
            .collect();
        let manifest = ChunkManifest {
            chunk_size: chunk as u64,
            file_size: data.len() as u64,
            digests: digests.iter().map(hex::encode).collect(),
            zero_chunks: Vec::new(),
            root: hex::encode(root_digest(&digests)),
        };
        (manifest, hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn a_copy_checked_against_its_manifest_names_the_first_bad_chunk() {
        let good: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (manifest, sha) = manifest_of(&good, 4096);
        assert_eq!(manifest_shape(&manifest), Ok(3));

        let c = check_copy("a.raw", &manifest, &sha, &manifest, Some(&sha));
        assert!(c.ok, "{c:?}");
        assert!(c.detail.contains("3 chunks match the manifest"), "{c:?}");
        assert!(c.detail.contains("whole-file SHA-256 matches"), "{c:?}");

        let mut bad = good.clone();
        bad[5000] ^= 0xff;
        let (copied, copied_sha) = manifest_of(&bad, 4096);
        let c = check_copy("a.raw", &manifest, &sha, &copied, Some(&copied_sha));
        assert!(!c.ok);
        assert_eq!(c.bad_chunk, Some((1, 4096)));
        assert_eq!(
            c.detail,
            "chunk 1 (offset 4096) does not match the manifest (1 bad chunk(s))"
        );

        // Chunks that match a manifest whose whole-file digest the metadata contradicts.
        let c = check_copy("a.raw", &manifest, &copied_sha, &manifest, Some(&sha));
        assert!(!c.ok && c.detail.contains("whole-file SHA-256"), "{c:?}");

        // A shorter copy: the tail chunks differ, the first of them is named.
        let (short, short_sha) = manifest_of(&good[..4096], 4096);
        let c = check_copy("a.raw", &manifest, &sha, &short, Some(&short_sha));
        assert!(
            !c.ok && c.detail.starts_with("chunk 1 (offset 4096)"),
            "{c:?}"
        );
    }

    #[test]
    fn a_manifest_of_the_wrong_shape_is_named() {
        let (mut m, _) = manifest_of(&[7u8; 9000], 4096);
        m.digests.pop();
        assert!(manifest_shape(&m)
            .unwrap_err()
            .to_string()
            .contains("lists 2 digests"));
        let (mut m, _) = manifest_of(&[7u8; 9000], 4096);
        m.digests[0] = "zz".into();
        assert!(manifest_shape(&m)
            .unwrap_err()
            .to_string()
            .contains("not hex"));
        let (mut m, _) = manifest_of(&[7u8; 9000], 4096);
        m.root = "00".repeat(32);
        assert!(manifest_shape(&m)
            .unwrap_err()
            .to_string()
            .contains("root digest"));
    }

    #[test]
    fn up_front_checks_read_no_data_but_catch_a_cut_image() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![3u8; 9000];
        let (m, _) = manifest_of(&data, 4096);
        fs::write(dir.path().join("a.raw"), &data).unwrap();
        let c = check_manifest_shape(dir.path(), "a.raw", &m);
        assert!(c.ok && c.detail.contains("data not read"), "{c:?}");
        // Another byte flipped is not seen here (the copy sees it) …
        fs::write(dir.path().join("a.raw"), vec![4u8; 9000]).unwrap();
        assert!(check_manifest_shape(dir.path(), "a.raw", &m).ok);
        // … a size that differs is.
        fs::write(dir.path().join("a.raw"), vec![3u8; 8000]).unwrap();
        let c = check_manifest_shape(dir.path(), "a.raw", &m);
        assert!(!c.ok && c.detail.contains("size is 8000 bytes"), "{c:?}");
        assert_eq!(
            check_manifest_shape(dir.path(), "b.raw", &m).detail,
            "missing"
        );
    }
}
