//! Restore a VM from a published backup, to its own name or beside the original.
//!
//! ## API (used by `vm-backup restore` and the Bacula plugin)
//!
//! ```no_run
//! use vm_backup::progress::{CancelToken, NoProgress};
//! use vm_backup::engine::restore::{restore, RestoreRequest, StampChoice};
//!
//! let mut request = RestoreRequest::new("/mnt/backup", "hv1", "web01", StampChoice::Latest);
//! request.new_name = Some("web01-restored".into()); // `--as`: a copy beside the original
//! request.start = true;                              // `--start`
//! // The plugin, which knows the folder from the metadata it stored, can name it directly:
//! // request.backup_dir = Some("/mnt/backup/hv1/web01/2026-11-21-120000".into());
//! let outcome = restore(&request, &NoProgress, &CancelToken::new())?;
//! println!("defined {} ({})", outcome.domain, outcome.uuid);
//! # Ok::<(), vm_backup::engine::restore::RestoreError>(())
//! ```
//!
//! [`RestoreRequest`] carries the target, host, VM and stamp (or [`StampChoice::Latest`]), or
//! an explicit `backup_dir`; an optional new name (`--as`), an optional disk folder
//! (`--disk-dir`), `start`, `force`, the libvirt URI and `strip_interfaces` (test restores).
//! [`restore`] returns a [`RestoreOutcome`] (domain, UUID, where each disk went, NVRAM,
//! configs, the verification report) or a [`RestoreError`] that names what stopped it.
//!
//! ## What it does, in order
//!
//! 1. Reads the backup's metadata and domain XML.
//! 2. Verifies the backup ([`crate::engine::verify::verify_backup`]: every disk against its chunk
//!    manifest in parallel, the other files against `checksums.sha256`, `qemu-img check`), and
//!    refuses a damaged backup, naming the file and chunk, unless `force`.
//! 3. Checks libvirt: a running domain of that name is never touched, even with `force`; a
//!    defined one is replaced only with `force`; no destination may be a disk of another
//!    domain; existing files are overwritten only with `force`.
//! 4. Copies the images back with the copier (to their original paths, or beside them under
//!    the new name with `--as`, or into `--disk-dir`), each into a temporary name first, and
//!    checks every copied chunk against the backup's manifest; then the NVRAM and `configs/`
//!    (appliances: copied beside the disks as `<name>-configs/`). Only when everything is
//!    copied are the files renamed into place.
//!    A disk's backing chain (`backing_chain` in the metadata) is copied the same way: in
//!    place to each layer's original path (a layer already there with the backup's SHA-256 is
//!    left untouched), otherwise beside the restored disk under new names that collide with
//!    nothing (`<name>-<target>.backing-<depth>.<ext>`, suffixed `-2`, `-3`, … when taken), so
//!    a backing file the original or another domain uses is never overwritten. The headers are
//!    then rebased top-down onto the restored layers ([`rebase_plan`], `qemu-img rebase -u`)
//!    and `qemu-img info --backing-chain` must list exactly the restored files.
//! 5. Rewrites the XML ([`xml`]): with `--as` a new name, UUID and MAC addresses, and file
//!    paths for disks, NVRAM and file-backed consoles; always without `<backingStore>`.
//! 6. Defines the domain (the `virt` crate) and starts it if asked.
//!
//! On any failure, files this restore created are removed (a guard), and a definition it
//! replaced is put back.

pub mod test_restore;
pub mod xml;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;
use virt::connect::Connect;
use virt::sys;

use crate::copier::{self, CopyOptions, HashMode};
use crate::engine::verify::{self, VerifyOptions, VerifyReport};
use crate::format::layout::{self, VmDir};
use crate::format::metadata::{BackingRecord, BackupMetadata, DiskRecord};
use crate::progress::{CancelToken, Level, Progress};

/// Where libvirt keeps NVRAM files of auto-selected firmware.
pub const DEFAULT_NVRAM_DIR: &str = "/var/lib/libvirt/qemu/nvram";

/// Which backup of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StampChoice {
    /// The newest whole backup.
    Latest,
    /// This stamp (`YYYY-MM-DD-HHMMSS`).
    Stamp(String),
}

impl std::str::FromStr for StampChoice {
    type Err = crate::format::layout::LayoutError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "latest" {
            Ok(StampChoice::Latest)
        } else {
            layout::parse_stamp(s)?;
            Ok(StampChoice::Stamp(s.to_string()))
        }
    }
}

/// What to restore, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreRequest {
    /// The backup target (`/mnt/backup`).
    pub target: PathBuf,
    /// The hypervisor folder the backup is under.
    pub host: String,
    /// The VM (domain) name the backup was taken of.
    pub vm: String,
    /// Which backup.
    pub stamp: StampChoice,
    /// The backup folder itself; overrides target/host/vm/stamp when given.
    pub backup_dir: Option<PathBuf>,
    /// Restore under this name, beside the original (`--as`).
    pub new_name: Option<String>,
    /// Put the disks (and NVRAM, configs) in this folder (`--disk-dir`).
    pub disk_dir: Option<PathBuf>,
    /// Start the domain once defined.
    pub start: bool,
    /// Restore a damaged backup, replace a defined (shut off) domain, overwrite files.
    pub force: bool,
    /// Remove every `<interface>` (test restores run isolated).
    pub strip_interfaces: bool,
    /// The libvirt connection URI.
    pub libvirt_uri: String,
}

impl RestoreRequest {
    /// A request for `vm`'s backup under `target/host`, with defaults: same name, original
    /// paths, not started, no force, `qemu:///system`.
    pub fn new(
        target: impl Into<PathBuf>,
        host: impl Into<String>,
        vm: impl Into<String>,
        stamp: StampChoice,
    ) -> Self {
        Self {
            target: target.into(),
            host: host.into(),
            vm: vm.into(),
            stamp,
            backup_dir: None,
            new_name: None,
            disk_dir: None,
            start: false,
            force: false,
            strip_interfaces: false,
            libvirt_uri: "qemu:///system".into(),
        }
    }
}

/// Where one disk went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoredDisk {
    /// Guest device (`vda`).
    pub target: String,
    /// The restored image.
    pub path: PathBuf,
    /// Bytes copied.
    pub bytes: u64,
    /// The restored backing chain under `path`, top to bottom (empty when it has none).
    pub backing_chain: Vec<PathBuf>,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestoreOutcome {
    /// The backup folder restored from.
    pub backup_dir: PathBuf,
    /// Its stamp.
    pub stamp: String,
    /// The domain defined.
    pub domain: String,
    /// Its UUID.
    pub uuid: String,
    /// The disks.
    pub disks: Vec<RestoredDisk>,
    /// The NVRAM file, if any.
    pub nvram: Option<PathBuf>,
    /// The appliance configurations, if any.
    pub configs: Option<PathBuf>,
    /// Whether a defined domain was replaced.
    pub replaced: bool,
    /// Whether the domain was started.
    pub started: bool,
    /// The verification made before copying.
    pub verify: VerifyReport,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No such backup.
    #[error("no backup found: {0}")]
    NotFound(String),
    /// The layout on the target is invalid.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
    /// The backup's metadata or XML cannot be read.
    #[error("cannot read {path}: {detail}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The domain XML cannot be used.
    #[error(transparent)]
    Xml(#[from] xml::XmlError),
    /// The backup failed verification.
    #[error("backup {dir} is damaged: {detail} (use --force to restore it anyway)")]
    Damaged {
        /// The backup folder.
        dir: PathBuf,
        /// The first fault: file and chunk.
        detail: String,
    },
    /// Verification could not run.
    #[error(transparent)]
    Verify(#[from] crate::engine::verify::VerifyError),
    /// A domain of that name is running: never touched.
    #[error("domain {0} is running: a running domain is never replaced (shut it down first)")]
    Running(String),
    /// A domain of that name is defined.
    #[error("domain {0} is already defined: use --force to replace it, or --as <new-name>")]
    Exists(String),
    /// A destination file exists.
    #[error("{0} exists: use --force to overwrite it, or --disk-dir")]
    FileExists(PathBuf),
    /// A destination file is a disk of another domain.
    #[error("{path} is a disk of domain {domain}: refusing to overwrite it")]
    InUse {
        /// The file.
        path: PathBuf,
        /// The domain using it.
        domain: String,
    },
    /// The new name is not usable.
    #[error("bad domain name {0:?}: use letters, digits, '-', '_', '.', '+' or '@'")]
    BadName(String),
    /// A libvirt call failed.
    #[error("libvirt: {0}")]
    Libvirt(String),
    /// Copying an image failed.
    #[error(transparent)]
    Copy(#[from] crate::copier::CopyError),
    /// A restored image differs from the backup's manifest.
    #[error("restored {path} does not match the backup at chunk {chunk}")]
    Mismatch {
        /// The restored file.
        path: PathBuf,
        /// The first differing chunk.
        chunk: usize,
    },
    /// A file operation failed.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A folder the restored domain needs is unusable (e.g. not traversable by QEMU).
    #[error("{0}")]
    Unusable(String),
    /// A restored backing chain is not self-contained or could not be rebased.
    #[error("backing chain of {path}: {detail}")]
    Chain {
        /// The restored disk image.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Cancelled; nothing was left behind.
    #[error("restore cancelled")]
    Cancelled,
}

fn lv(e: virt::error::Error) -> RestoreError {
    RestoreError::Libvirt(e.message().to_string())
}

/// Opens a libvirt connection without libvirt's default error printing on stderr.
pub fn connect(uri: &str) -> Result<Connect, RestoreError> {
    virt::error::clear_error_callback();
    Connect::open(Some(uri)).map_err(lv)
}

/// Finds the backup folder of a request.
pub fn locate(request: &RestoreRequest) -> Result<(PathBuf, String), RestoreError> {
    if let Some(dir) = &request.backup_dir {
        let stamp = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !dir.join(layout::METADATA_FILE).is_file() {
            return Err(RestoreError::NotFound(format!(
                "{} has no {}",
                dir.display(),
                layout::METADATA_FILE
            )));
        }
        return Ok((dir.clone(), stamp));
    }
    let vm_dir = VmDir::new(&request.target, &request.host, &request.vm)?;
    let stamp = match &request.stamp {
        StampChoice::Stamp(s) => s.clone(),
        StampChoice::Latest => vm_dir.latest()?.ok_or_else(|| {
            RestoreError::NotFound(format!(
                "no backup of {} under {}",
                request.vm,
                vm_dir.path.display()
            ))
        })?,
    };
    let dir = vm_dir.backup_dir(&stamp);
    if !dir.join(layout::METADATA_FILE).is_file() {
        return Err(RestoreError::NotFound(format!(
            "{} (no such backup)",
            dir.display()
        )));
    }
    Ok((dir, stamp))
}

/// The planned destination of every file of a restore.
#[derive(Debug, Clone)]
struct Plan {
    disks: Vec<(crate::format::metadata::DiskRecord, PathBuf)>,
    /// The backing layers of each disk (same order as `disks`), top to bottom.
    chains: Vec<Vec<PlannedLayer>>,
    /// True when the disks go back to their original paths.
    in_place: bool,
    nvram: Option<(PathBuf, PathBuf)>,
    configs: Option<(PathBuf, PathBuf)>,
    edits: xml::XmlEdits,
}

/// One backing layer to restore.
#[derive(Debug, Clone)]
struct PlannedLayer {
    record: BackingRecord,
    dest: PathBuf,
    /// In place, the file is already there with the backup's content: left untouched.
    reuse: bool,
}

/// One `qemu-img rebase -u` of a restore: point `image`'s header at `backing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rebase {
    /// The restored image whose header is rewritten.
    pub image: PathBuf,
    /// Its format.
    pub format: String,
    /// The restored image below it.
    pub backing: PathBuf,
    /// The format of that one.
    pub backing_format: String,
}

impl Rebase {
    /// The arguments of `qemu-img` for this rebase, applied to `file` (the image itself or
    /// its staging copy).
    pub fn args(&self, file: &Path) -> Vec<std::ffi::OsString> {
        vec![
            "rebase".into(),
            "-u".into(),
            "-f".into(),
            self.format.clone().into(),
            "-b".into(),
            self.backing.clone().into_os_string(),
            "-F".into(),
            self.backing_format.clone().into(),
            file.as_os_str().to_owned(),
        ]
    }
}

/// The rebases that make a restored disk's chain self-contained: for each layer from the top
/// down, its header is pointed at the restored layer below. `top` is where the disk image was
/// restored, `layers[i]` where `disk.backing_chain[i]` was. In an in-place restore a layer
/// whose header already names the right file (its `backing_named_as`, resolved against its
/// own folder) is skipped. Pure: runs nothing.
pub fn rebase_plan(
    disk: &DiskRecord,
    top: &Path,
    layers: &[PathBuf],
    in_place: bool,
) -> Vec<Rebase> {
    let mut out = Vec::new();
    for (i, (record, below)) in disk.backing_chain.iter().zip(layers).enumerate() {
        let (image, format) = if i == 0 {
            (top.to_path_buf(), disk.format.clone())
        } else {
            (
                layers[i - 1].clone(),
                disk.backing_chain[i - 1].format.clone(),
            )
        };
        if in_place {
            if let Some(named) = &record.backing_named_as {
                let base = image.parent().unwrap_or(Path::new("/"));
                if normalize(&base.join(named)) == normalize(below) {
                    continue;
                }
            }
        }
        out.push(Rebase {
            image,
            format,
            backing: below.clone(),
            backing_format: record.format.clone(),
        });
    }
    out
}

/// Lexical normalisation: drops `.`, resolves `..` against the preceding component.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Checks with `qemu-img info -U --backing-chain` that the chain under `top` is exactly
/// `top` followed by `layers`.
fn check_chain(top: &Path, layers: &[PathBuf]) -> Result<(), RestoreError> {
    let fail = |detail: String| RestoreError::Chain {
        path: top.to_path_buf(),
        detail,
    };
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(top)
        .output()
        .map_err(|e| fail(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "qemu-img info failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("qemu-img info printed no JSON: {e}")))?;
    let found: Vec<PathBuf> = json
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i.get("filename").and_then(|f| f.as_str()))
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    let expected: Vec<&Path> = std::iter::once(top)
        .chain(layers.iter().map(PathBuf::as_path))
        .collect();
    let same = |a: &Path, b: &Path| {
        let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| normalize(p));
        canon(a) == canon(b)
    };
    if found.len() != expected.len() || !found.iter().zip(&expected).all(|(a, b)| same(a, b)) {
        return Err(fail(format!(
            "expected {} image(s) {:?}, qemu-img sees {:?}",
            expected.len(),
            expected,
            found
        )));
    }
    Ok(())
}

/// Every image file in the backing chains of the other domains' disks (`qemu-img info -U
/// --backing-chain`), with the domain using it.
fn chain_files_of(others: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for (disk, domain) in others {
        let Ok(o) = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--backing-chain", "--output=json"])
            .arg(disk)
            .output()
        else {
            continue;
        };
        let json: serde_json::Value =
            serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
        for f in json
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("filename").and_then(|f| f.as_str()))
        {
            let p = PathBuf::from(f);
            let p = fs::canonicalize(&p).unwrap_or(p);
            out.insert(p, domain.clone());
        }
    }
    out
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

/// Restores a VM from a backup; see the module documentation.
pub fn restore(
    request: &RestoreRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<RestoreOutcome, RestoreError> {
    let (dir, stamp) = locate(request)?;
    let meta = BackupMetadata::read(&dir).map_err(|e| RestoreError::Unreadable {
        path: dir.join(layout::METADATA_FILE),
        detail: e.to_string(),
    })?;
    let xml_path = dir.join(layout::xml_file_name(&meta.vm_name)?);
    let xml_text = fs::read_to_string(&xml_path).map_err(|e| RestoreError::Unreadable {
        path: xml_path.clone(),
        detail: e.to_string(),
    })?;
    let domain_xml = xml::inspect(&xml_text)?;
    progress.message(
        Level::Info,
        &format!("restoring {} from {}", meta.vm_name, dir.display()),
    );

    for d in &meta.skipped_disks {
        progress.message(
            Level::Warning,
            &format!(
                "disk {} was not backed up ({}): {}",
                d.target,
                d.reason,
                if request.new_name.is_some() {
                    "removed from the copy unless it is a cdrom or floppy"
                } else {
                    "the restored domain keeps its original source"
                }
            ),
        );
    }

    // 1. Verify.
    let report = verify::verify_backup(&dir, &VerifyOptions::default(), progress, cancel)?;
    if !report.ok {
        let detail = report.summary();
        if !request.force {
            return Err(RestoreError::Damaged { dir, detail });
        }
        progress.message(
            Level::Warning,
            &format!("backup is damaged ({detail}); restoring anyway (--force)"),
        );
    }
    if cancel.is_cancelled() {
        return Err(RestoreError::Cancelled);
    }

    // 2. Libvirt checks.
    let name = request
        .new_name
        .clone()
        .unwrap_or_else(|| domain_xml.name.clone());
    if name.is_empty() || layout::safe_component(&name).ok().as_deref() != Some(name.as_str()) {
        return Err(RestoreError::BadName(name));
    }
    let conn = connect(&request.libvirt_uri)?;
    let existing = match conn.lookup_domain_by_name(&name) {
        Ok(d) => Some(d),
        Err(e) if e.code() == virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain) => {
            None
        }
        Err(e) => return Err(lv(e)),
    };
    let mut old_xml = None;
    if let Some(d) = &existing {
        if d.is_active().map_err(lv)? {
            return Err(RestoreError::Running(name));
        }
        if !request.force {
            return Err(RestoreError::Exists(name));
        }
        old_xml = Some(
            d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
                .map_err(lv)?,
        );
    }

    // 3. Plan the destinations and check them.
    let plan = plan(request, &dir, &meta, &domain_xml, &name)?;
    let others = disks_of_other_domains(&conn, &name)?;
    let mut plan = plan;
    let mut seen = BTreeSet::new();
    let dests = plan
        .disks
        .iter()
        .map(|(_, p)| p.clone())
        .chain(plan.nvram.iter().map(|(_, p)| p.clone()));
    for dest in dests {
        if let Some(domain) = others.get(&dest) {
            return Err(RestoreError::InUse {
                path: dest,
                domain: domain.clone(),
            });
        }
        if dest.exists() && !request.force {
            return Err(RestoreError::FileExists(dest));
        }
        if !seen.insert(dest.clone()) {
            return Err(RestoreError::FileExists(dest));
        }
    }
    if let Some((_, configs)) = &plan.configs {
        if configs.exists() && !request.force {
            return Err(RestoreError::FileExists(configs.clone()));
        }
    }
    check_layers(
        &mut plan,
        &others,
        &mut seen,
        &name,
        request.force,
        progress,
    )?;

    // 4. Copy everything under temporary names, then rename into place.
    let mut created = CreatedFiles {
        files: Vec::new(),
        dirs: Vec::new(),
        armed: true,
    };
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut restored = Vec::new();
    for ((disk, dest), chain) in plan.disks.iter().zip(&plan.chains) {
        let tmp = staging_path(dest);
        ensure_dir(dest, &mut created)?;
        created.files.push(tmp.clone());
        progress.message(
            Level::Info,
            &format!("copying {} to {}", disk.file, dest.display()),
        );
        let bytes = copy_image(
            &dir.join(&disk.file),
            &tmp,
            dest,
            &disk.manifest,
            request.force,
            progress,
            cancel,
        )?;
        staged.push((tmp, dest.clone()));
        for layer in chain {
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
            copy_image(
                &dir.join(&layer.record.file),
                &tmp,
                &layer.dest,
                &layer.record.manifest,
                request.force,
                progress,
                cancel,
            )?;
            staged.push((tmp, layer.dest.clone()));
        }
        restored.push(RestoredDisk {
            target: disk.target.clone(),
            path: dest.clone(),
            bytes,
            backing_chain: chain.iter().map(|l| l.dest.clone()).collect(),
        });
    }
    // Point every copied header at the restored layer below, on the staging copies.
    for ((disk, dest), chain) in plan.disks.iter().zip(&plan.chains) {
        let layers: Vec<PathBuf> = chain.iter().map(|l| l.dest.clone()).collect();
        for rebase in rebase_plan(disk, dest, &layers, plan.in_place) {
            let Some((tmp, _)) = staged.iter().find(|(_, d)| *d == rebase.image) else {
                // A layer kept in place is never edited; the chain check below judges it.
                continue;
            };
            let out = std::process::Command::new("qemu-img")
                .args(rebase.args(tmp))
                .output()
                .map_err(|source| RestoreError::Io {
                    context: "cannot run qemu-img rebase on",
                    path: tmp.clone(),
                    source,
                })?;
            if !out.status.success() {
                return Err(RestoreError::Chain {
                    path: dest.clone(),
                    detail: format!(
                        "qemu-img rebase of {} onto {} failed: {}",
                        rebase.image.display(),
                        rebase.backing.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
    }
    if let Some((src, dest)) = &plan.nvram {
        let tmp = staging_path(dest);
        ensure_dir(dest, &mut created)?;
        created.files.push(tmp.clone());
        fs::copy(src, &tmp).map_err(|source| RestoreError::Io {
            context: "cannot copy the NVRAM to",
            path: tmp.clone(),
            source,
        })?;
        staged.push((tmp, dest.clone()));
    }
    if let Some((src, dest)) = &plan.configs {
        let tmp = staging_path(dest);
        created.dirs.push(tmp.clone());
        copy_tree(src, &tmp)?;
        staged.push((tmp, dest.clone()));
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
    for ((_, dest), chain) in plan.disks.iter().zip(&plan.chains) {
        if !chain.is_empty() {
            let layers: Vec<PathBuf> = chain.iter().map(|l| l.dest.clone()).collect();
            check_chain(dest, &layers)?;
        }
    }

    // 5. The XML.
    let new_xml = xml::rewrite(&xml_text, &plan.edits)?;
    let uuid = xml::inspect(&new_xml)?.uuid.unwrap_or_default();

    // 6. Define (replacing a shut-off domain with --force), start.
    let replaced = existing.is_some();
    if let Some(old) = &existing {
        let same_uuid = old.uuid_string().map_err(lv)? == uuid;
        if !same_uuid {
            old.undefine_flags(
                sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
                    | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                    | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
            )
            .map_err(lv)?;
        }
    }
    let domain = match conn.define_domain_xml(&new_xml) {
        Ok(d) => d,
        Err(e) => {
            if let Some(old) = &old_xml {
                if let Err(e2) = conn.define_domain_xml(old) {
                    tracing::error!(error = %e2.message(), "could not put back the replaced definition");
                }
            }
            return Err(lv(e));
        }
    };
    created.armed = false;
    let mut started = false;
    if request.start {
        domain.create().map_err(lv)?;
        started = true;
    }
    progress.message(
        Level::Info,
        &format!(
            "domain {name} defined{}",
            if started { " and started" } else { "" }
        ),
    );
    Ok(RestoreOutcome {
        backup_dir: dir,
        stamp,
        domain: name,
        uuid,
        disks: restored,
        nvram: plan.nvram.map(|(_, p)| p),
        configs: plan.configs.map(|(_, p)| p),
        replaced,
        started,
        verify: report,
    })
}

/// Decides where every file goes and what changes in the XML.
fn plan(
    request: &RestoreRequest,
    dir: &Path,
    meta: &BackupMetadata,
    domain_xml: &xml::DomainXml,
    name: &str,
) -> Result<Plan, RestoreError> {
    let renamed = request.new_name.is_some();
    let mut edits = xml::XmlEdits::default();
    if renamed {
        edits.name = Some(name.to_string());
        edits.uuid = Some(uuid::Uuid::new_v4().to_string());
        edits.new_macs = true;
    }
    edits.strip_interfaces = request.strip_interfaces;

    let in_place = request.disk_dir.is_none() && !renamed;
    let mut disks = Vec::new();
    let mut chains = Vec::new();
    for disk in &meta.disks {
        let file = layout::disk_file_name(name, &disk.target, &disk.format)?;
        let original = PathBuf::from(&disk.source);
        let dest = match (&request.disk_dir, renamed) {
            (Some(d), _) => d.join(&file),
            (None, true) => original
                .parent()
                .map(|p| p.join(&file))
                .unwrap_or_else(|| PathBuf::from(&file)),
            (None, false) => original,
        };
        if !dest.is_absolute() {
            return Err(RestoreError::NotFound(format!(
                "no absolute destination for disk {} (use --disk-dir)",
                disk.target
            )));
        }
        edits
            .disk_sources
            .insert(disk.target.clone(), dest.display().to_string());
        // In place: each layer to its original path. Otherwise beside the disk; the final,
        // non-colliding names are chosen when the destinations are checked.
        let chain = disk
            .backing_chain
            .iter()
            .map(|record| {
                let dest = if in_place {
                    PathBuf::from(&record.source)
                } else {
                    dest.with_file_name(backing_file_name(name, &disk.target, record, 1))
                };
                PlannedLayer {
                    record: record.clone(),
                    dest,
                    reuse: false,
                }
            })
            .collect::<Vec<_>>();
        if in_place {
            if let Some(l) = chain.iter().find(|l| !l.dest.is_absolute()) {
                return Err(RestoreError::NotFound(format!(
                    "no absolute original path for {} (use --disk-dir)",
                    l.record.file
                )));
            }
        }
        chains.push(chain);
        disks.push((disk.clone(), dest));
    }

    // A copy beside the original must not share a writable disk that was not backed up.
    if renamed {
        for d in &domain_xml.disks {
            let restored = meta.disks.iter().any(|m| m.target == d.target);
            let read_only_media = matches!(d.device.as_str(), "cdrom" | "floppy");
            if !restored && !read_only_media {
                edits.drop_disks.insert(d.target.clone());
            }
        }
    }

    // NVRAM: the backup's copy goes where the (renamed) domain will look for it.
    let nvram_src = dir.join(layout::nvram_file_name(&meta.vm_name)?);
    let nvram = if nvram_src.is_file() {
        let vars = format!("{name}_VARS.fd");
        let dest = match (&request.disk_dir, &domain_xml.nvram, renamed) {
            (Some(d), _, _) => d.join(&vars),
            (None, Some(p), true) => Path::new(p)
                .parent()
                .unwrap_or(Path::new(DEFAULT_NVRAM_DIR))
                .join(&vars),
            (None, Some(p), false) => PathBuf::from(p),
            (None, None, _) => Path::new(DEFAULT_NVRAM_DIR).join(&vars),
        };
        if domain_xml.nvram.is_some() {
            edits.nvram = Some(dest.display().to_string());
        } else if request.disk_dir.is_some() || renamed {
            edits.add_nvram = Some(dest.display().to_string());
        }
        Some((nvram_src, dest))
    } else {
        None
    };

    // Appliance configurations beside the first disk.
    let configs_src = dir.join(layout::CONFIGS_DIR);
    let configs = if configs_src.is_dir() {
        let base = request.disk_dir.clone().or_else(|| {
            disks
                .first()
                .and_then(|(_, p)| p.parent().map(Path::to_path_buf))
        });
        base.map(|b| (configs_src, b.join(format!("{name}-configs"))))
    } else {
        None
    };

    // File-backed consoles of a copy must not share the original's file.
    if renamed {
        let base = request.disk_dir.clone().or_else(|| {
            disks
                .first()
                .and_then(|(_, p)| p.parent().map(Path::to_path_buf))
        });
        if let Some(base) = base {
            for kind in ["serial", "console"] {
                for i in 0..4 {
                    edits.char_files.insert(
                        format!("{kind}{i}"),
                        base.join(format!("{name}.{kind}{i}.log"))
                            .display()
                            .to_string(),
                    );
                }
            }
        }
    }
    Ok(Plan {
        disks,
        chains,
        in_place,
        nvram,
        configs,
        edits,
    })
}

/// `<name>-<target>.backing-<depth>.<ext>`, or with `-<n>` after the depth for `n > 1`.
fn backing_file_name(name: &str, target: &str, record: &BackingRecord, n: usize) -> String {
    let ext = if record.format == "qcow2" {
        "qcow2"
    } else {
        "raw"
    };
    let safe = |s: &str| layout::safe_component(s).unwrap_or_else(|_| "disk".into());
    if n > 1 {
        format!(
            "{}-{}.backing-{}-{n}.{ext}",
            safe(name),
            safe(target),
            record.depth
        )
    } else {
        format!(
            "{}-{}.backing-{}.{ext}",
            safe(name),
            safe(target),
            record.depth
        )
    }
}

/// Checks (and, beside the original, chooses) the destinations of the backing layers.
/// In place: a layer already there with the backup's SHA-256 is kept; a different one is
/// overwritten only with `force`, and never when another domain's chain uses it. Elsewhere:
/// a name that exists or is planned already is never overwritten, the next free one is taken.
fn check_layers(
    plan: &mut Plan,
    others: &BTreeMap<PathBuf, String>,
    seen: &mut BTreeSet<PathBuf>,
    name: &str,
    force: bool,
    progress: &dyn Progress,
) -> Result<(), RestoreError> {
    let mut other_chains: Option<BTreeMap<PathBuf, String>> = None;
    let in_place = plan.in_place;
    for ((disk, _), chain) in plan.disks.iter().zip(plan.chains.iter_mut()) {
        for layer in chain.iter_mut() {
            if in_place {
                if let Some(domain) = others.get(&layer.dest) {
                    return Err(RestoreError::InUse {
                        path: layer.dest.clone(),
                        domain: domain.clone(),
                    });
                }
                if layer.dest.exists() {
                    let same = verify::sha256_file(&layer.dest)
                        .map(|d| d.eq_ignore_ascii_case(&layer.record.sha256))
                        .unwrap_or(false);
                    if same {
                        layer.reuse = true;
                    } else if !force {
                        return Err(RestoreError::FileExists(layer.dest.clone()));
                    } else {
                        let chains = other_chains.get_or_insert_with(|| chain_files_of(others));
                        let canon =
                            fs::canonicalize(&layer.dest).unwrap_or_else(|_| layer.dest.clone());
                        if let Some(domain) = chains.get(&canon) {
                            return Err(RestoreError::InUse {
                                path: layer.dest.clone(),
                                domain: domain.clone(),
                            });
                        }
                    }
                }
                if !layer.reuse && !seen.insert(layer.dest.clone()) {
                    return Err(RestoreError::FileExists(layer.dest.clone()));
                }
            } else {
                let mut n = 1;
                while layer.dest.exists()
                    || seen.contains(&layer.dest)
                    || others.contains_key(&layer.dest)
                {
                    n += 1;
                    layer.dest = layer.dest.with_file_name(backing_file_name(
                        name,
                        &disk.target,
                        &layer.record,
                        n,
                    ));
                }
                if n > 1 {
                    progress.message(
                        Level::Info,
                        &format!("backing file name taken: using {}", layer.dest.display()),
                    );
                }
                seen.insert(layer.dest.clone());
            }
        }
    }
    Ok(())
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
    if parent.is_dir() {
        return Ok(());
    }
    // Remember the topmost folder we create, to remove it on failure.
    let mut top = parent.to_path_buf();
    while let Some(p) = top.parent() {
        if p.exists() {
            break;
        }
        top = p.to_path_buf();
    }
    fs::create_dir_all(parent).map_err(|source| RestoreError::Io {
        context: "cannot create",
        path: parent.to_path_buf(),
        source,
    })?;
    created.dirs.push(top);
    Ok(())
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
        if entry
            .file_type()
            .map_err(io("cannot stat", &entry.path()))?
            .is_dir()
        {
            copy_tree(&entry.path(), &to)?;
        } else {
            fs::copy(entry.path(), &to).map_err(io("cannot copy to", &to))?;
        }
    }
    Ok(())
}

/// Every disk and NVRAM file of every domain but `except`, with the domain using it.
fn disks_of_other_domains(
    conn: &Connect,
    except: &str,
) -> Result<BTreeMap<PathBuf, String>, RestoreError> {
    let mut out = BTreeMap::new();
    for d in conn.list_all_domains(0).map_err(lv)? {
        let name = d.name().map_err(lv)?;
        if name == except {
            continue;
        }
        // A domain that vanished meanwhile is not in the way.
        let Ok(text) = d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE) else {
            continue;
        };
        if let Ok(info) = xml::inspect(&text) {
            for disk in info.disks {
                if let Some(s) = disk.source {
                    out.insert(PathBuf::from(s), name.clone());
                }
            }
            if let Some(n) = info.nvram {
                out.insert(PathBuf::from(n), name.clone());
            }
        }
    }
    Ok(out)
}

impl RestoreError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            RestoreError::NotFound { .. } => ErrorKind::NotFound,
            RestoreError::Layout(e) => e.kind(),
            RestoreError::Unreadable { .. } => ErrorKind::Corrupt,
            RestoreError::Xml { .. } => ErrorKind::Corrupt,
            RestoreError::Damaged { .. } => ErrorKind::Corrupt,
            RestoreError::Verify(e) => e.kind(),
            RestoreError::Running { .. } => ErrorKind::Busy,
            RestoreError::Exists { .. } => ErrorKind::Busy,
            RestoreError::FileExists { .. } => ErrorKind::Busy,
            RestoreError::InUse { .. } => ErrorKind::Busy,
            RestoreError::BadName { .. } => ErrorKind::InvalidInput,
            RestoreError::Libvirt { .. } => ErrorKind::Libvirt,
            RestoreError::Copy(e) => e.kind(),
            RestoreError::Mismatch { .. } => ErrorKind::Corrupt,
            RestoreError::Io { .. } => ErrorKind::Io,
            RestoreError::Unusable { .. } => ErrorKind::Corrupt,
            RestoreError::Chain { .. } => ErrorKind::Corrupt,
            RestoreError::Cancelled => ErrorKind::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copier::ChunkManifest;

    fn manifest() -> ChunkManifest {
        ChunkManifest {
            chunk_size: 0,
            file_size: 0,
            digests: Vec::new(),
            zero_chunks: Vec::new(),
            root: String::new(),
        }
    }

    fn layer(depth: usize, source: &str, format: &str, named: &str) -> BackingRecord {
        BackingRecord {
            depth,
            file: format!("web-vdb.backing-{depth}.{format}"),
            source: source.into(),
            format: format.into(),
            backing_named_as: Some(named.into()),
            virtual_size: 0,
            allocated_size: 0,
            file_size: 0,
            sha256: String::new(),
            manifest: manifest(),
            copy_seconds: 0.0,
        }
    }

    /// vdb.qcow2 -> base.qcow2 (named relatively) -> golden.raw (named absolutely).
    fn disk() -> DiskRecord {
        DiskRecord {
            target: "vdb".into(),
            source: "/img/vdb.qcow2".into(),
            format: "qcow2".into(),
            file: "web-vdb.qcow2".into(),
            virtual_size: 0,
            allocated_size: 0,
            file_size: 0,
            sha256: String::new(),
            manifest: manifest(),
            copy_seconds: 0.0,
            bytes_per_sec: 0.0,
            io_path: String::new(),
            backing_chain: vec![
                layer(1, "/img/base.qcow2", "qcow2", "base.qcow2"),
                layer(2, "/gold/golden.raw", "raw", "/gold/golden.raw"),
            ],
        }
    }

    #[test]
    fn rebase_plan_points_each_layer_at_the_restored_one_below() {
        let top = PathBuf::from("/r/copy-vdb.qcow2");
        let layers = vec![
            PathBuf::from("/r/copy-vdb.backing-1.qcow2"),
            PathBuf::from("/r/copy-vdb.backing-2.raw"),
        ];
        let plan = rebase_plan(&disk(), &top, &layers, false);
        assert_eq!(
            plan,
            vec![
                Rebase {
                    image: top.clone(),
                    format: "qcow2".into(),
                    backing: layers[0].clone(),
                    backing_format: "qcow2".into(),
                },
                Rebase {
                    image: layers[0].clone(),
                    format: "qcow2".into(),
                    backing: layers[1].clone(),
                    backing_format: "raw".into(),
                },
            ]
        );
        let args: Vec<String> = plan[1]
            .args(Path::new("/r/.tmp"))
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-b",
                "/r/copy-vdb.backing-2.raw",
                "-F",
                "raw",
                "/r/.tmp"
            ]
        );
        // A disk without a chain needs nothing.
        let mut flat = disk();
        flat.backing_chain.clear();
        assert!(rebase_plan(&flat, &top, &[], false).is_empty());
    }

    #[test]
    fn rebase_plan_in_place_skips_headers_that_already_name_the_right_file() {
        let d = disk();
        let top = PathBuf::from(&d.source);
        let layers: Vec<PathBuf> = d
            .backing_chain
            .iter()
            .map(|l| l.source.clone().into())
            .collect();
        assert!(rebase_plan(&d, &top, &layers, true).is_empty());
        // A relative name that resolves elsewhere (`../`) is rebased even in place.
        let mut moved = d.clone();
        moved.backing_chain[0].backing_named_as = Some("../other/base.qcow2".into());
        let plan = rebase_plan(&moved, &top, &layers, true);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].image, top);
        assert_eq!(plan[0].backing, layers[0]);
        // `./` and `x/../` spellings of the same file are recognised.
        moved.backing_chain[0].backing_named_as = Some("./sub/../base.qcow2".into());
        assert!(rebase_plan(&moved, &top, &layers, true).is_empty());
    }

    #[test]
    fn backing_names_beside_the_copy_are_numbered_when_taken() {
        let l = layer(2, "/x", "raw", "/x");
        assert_eq!(backing_file_name("c", "vdb", &l, 1), "c-vdb.backing-2.raw");
        assert_eq!(
            backing_file_name("c", "vdb", &l, 3),
            "c-vdb.backing-2-3.raw"
        );
    }
}
