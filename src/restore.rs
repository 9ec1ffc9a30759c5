//! Restore a VM from a published backup, to its own name or beside the original.
//!
//! ## API (used by `vm-backup restore` and the Bacula plugin)
//!
//! ```no_run
//! use vm_backup::progress::{CancelToken, NoProgress};
//! use vm_backup::restore::{restore, RestoreRequest, StampChoice};
//!
//! let mut request = RestoreRequest::new("/mnt/backup", "hv1", "web01", StampChoice::Latest);
//! request.new_name = Some("web01-restored".into()); // `--as`: a copy beside the original
//! request.start = true;                              // `--start`
//! // The plugin, which knows the folder from the metadata it stored, can name it directly:
//! // request.backup_dir = Some("/mnt/backup/hv1/web01/2026-11-21-120000".into());
//! let outcome = restore(&request, &NoProgress, &CancelToken::new())?;
//! println!("defined {} ({})", outcome.domain, outcome.uuid);
//! # Ok::<(), vm_backup::restore::RestoreError>(())
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
//! 2. Verifies the backup ([`crate::verify::verify_backup`]: every disk against its chunk
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
use crate::layout::{self, VmDir};
use crate::metadata::BackupMetadata;
use crate::progress::{CancelToken, Level, Progress};
use crate::verify::{self, VerifyOptions, VerifyReport};

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
    type Err = crate::layout::LayoutError;
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
    Layout(#[from] crate::layout::LayoutError),
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
    Verify(#[from] crate::verify::VerifyError),
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
    disks: Vec<(crate::metadata::DiskRecord, PathBuf)>,
    nvram: Option<(PathBuf, PathBuf)>,
    configs: Option<(PathBuf, PathBuf)>,
    edits: xml::XmlEdits,
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

    // 4. Copy everything under temporary names, then rename into place.
    let mut created = CreatedFiles {
        files: Vec::new(),
        dirs: Vec::new(),
        armed: true,
    };
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut restored = Vec::new();
    for (disk, dest) in &plan.disks {
        let tmp = staging_path(dest);
        ensure_dir(dest, &mut created)?;
        created.files.push(tmp.clone());
        let mut options = CopyOptions {
            hash: HashMode::Chunks,
            ..CopyOptions::default()
        };
        let comparable = disk.manifest.chunk_size > 0
            && disk.manifest.chunk_size % options.buffer_size as u64 == 0;
        if comparable {
            options.chunk_size = disk.manifest.chunk_size;
        }
        progress.message(
            Level::Info,
            &format!("copying {} to {}", disk.file, dest.display()),
        );
        let report = copier::copy_file(&dir.join(&disk.file), &tmp, &options, progress, cancel)?;
        if comparable {
            if let Some(m) = &report.manifest {
                if let Some(chunk) = m
                    .digests
                    .iter()
                    .zip(&disk.manifest.digests)
                    .position(|(a, b)| a != b)
                    .or((m.digests.len() != disk.manifest.digests.len()).then_some(0))
                {
                    if !request.force {
                        return Err(RestoreError::Mismatch {
                            path: dest.clone(),
                            chunk,
                        });
                    }
                }
            }
        }
        restored.push(RestoredDisk {
            target: disk.target.clone(),
            path: dest.clone(),
            bytes: report.logical_size,
        });
        staged.push((tmp, dest.clone()));
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

    let mut disks = Vec::new();
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
        nvram,
        configs,
        edits,
    })
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
