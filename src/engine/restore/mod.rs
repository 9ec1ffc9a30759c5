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
//! 2. Checks the backup without reading its disk data
//!    ([`crate::engine::verify::verify_backup`] with [`VerifyOptions::disk_data`] off, on the
//!    backup and every parent of an incremental: the metadata, the other files against
//!    `checksums.sha256`, `qemu-img check` (qcow2 metadata only), each image present with a
//!    well-formed manifest of its size), and refuses a damaged backup unless `force`. The
//!    data itself is checked in step 4, as it is copied: each image is read once.
//! 3. Checks libvirt: a running domain of that name is never touched, even with `force`; a
//!    defined one is replaced only with `force`; no destination may be a disk of another
//!    domain; existing files are overwritten only with `force`.
//! 4. Copies the images back with the copier (to their original paths, or beside them under
//!    the new name with `--as`, or into `--disk-dir`), each into a temporary name first, and
//!    checks every chunk against the backup's manifest and the whole-file SHA-256 against the
//!    metadata as it copies ([`crate::engine::verify::check_copy`]): a mismatch stops the
//!    restore before anything is renamed into place or defined ([`RestoreError::Damaged`],
//!    naming the file and the chunk), or with `force` is a warning and the restore goes on.
//!    Then the NVRAM and `configs/` (appliances: copied beside the disks as
//!    `<name>-configs/`). Only when everything is copied are the files renamed into place.
//!    A disk's backing chain (`backing_chain` in the metadata) is copied the same way: in
//!    place to each layer's original path (a layer already there with the backup's SHA-256 is
//!    left untouched and not read from the backup), otherwise beside the restored disk under
//!    new names that collide with nothing (`<name>-<target>.backing-<depth>.<ext>`, suffixed
//!    `-2`, `-3`, … when taken), so a backing file the original or another domain uses is
//!    never overwritten. The headers are then rebased top-down onto the restored layers
//!    ([`rebase_plan`], `qemu-img rebase -u`) and `qemu-img info --backing-chain` must list
//!    exactly the restored files.
//! 5. Rewrites the XML ([`crate::hv::xml_edit`]): with `--as` a new name, UUID and MAC
//!    addresses, and file paths for disks, NVRAM and file-backed consoles; always without
//!    `<backingStore>`.
//! 6. Defines the domain ([`crate::hv`]) and starts it if asked.
//!
//! On any failure, files this restore created are removed (a guard), and a definition it
//! replaced is put back.
//!
//! ## Plan, then apply
//!
//! Steps 3 to 5 are decided first, without changing anything: [`plan::plan`] returns a
//! [`plan::RestorePlan`] (every destination, the backing layers kept or renamed, the rebases,
//! the XML edits), asking the host only read-only questions through [`plan::HostView`].
//! [`apply::apply`] then carries it out. [`restore`] checks, plans and applies; its
//! [`RestoreOutcome::verify`] lists the checks made up front and those made by the copy.

pub mod apply;
pub mod chain;
pub mod instant;
pub mod plan;
pub mod test_restore;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::engine::verify::{self, VerifyOptions, VerifyReport};
use crate::format::layout::{self, VmDir};
use crate::format::metadata::BackupMetadata;
use crate::hv::{qemu_img, xml, DomainXml, Hypervisor, LibvirtError, QemuImgError, XmlError};
use crate::progress::{CancelToken, Level, Progress};

pub use plan::{rebase_plan, Rebase};

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
    /// What was checked: the up-front checks (data not read), then each image's data as it
    /// was copied (`bytes`: the images checked that way) and the layers left in place.
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
    /// The target is not initialised, or the VM's lock is held by a backup or prune.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The backup's metadata or XML cannot be read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The domain XML cannot be used.
    #[error(transparent)]
    Xml(#[from] XmlError),
    /// The backup failed verification (up front, or an image as it was copied).
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
    Libvirt(#[from] LibvirtError),
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
    /// A folder the restored domain needs is not traversable by the QEMU user.
    #[error(
        "{} is not traversable by the QEMU user (mode {mode:o}): choose another \
         test_restore.dir or --work-dir",
        dir.display()
    )]
    NotTraversable {
        /// The folder.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A restored header could not be pointed at the restored layer below.
    #[error("cannot rebase {} onto {}: {source}", image.display(), backing.display())]
    Rebase {
        /// The restored image.
        image: PathBuf,
        /// The layer below it.
        backing: PathBuf,
        /// The cause.
        #[source]
        source: Box<QemuImgError>,
    },
    /// The backing chain of a restored disk cannot be read.
    #[error("backing chain of {path}: {source}")]
    ChainUnreadable {
        /// The restored disk image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<QemuImgError>,
    },
    /// A restored backing chain is not self-contained.
    #[error("backing chain of {path}: expected {} image(s) {expected:?}, qemu-img sees {found:?}", expected.len())]
    Chain {
        /// The restored disk image.
        path: PathBuf,
        /// The files the chain should be, top first.
        expected: Vec<PathBuf>,
        /// The files qemu-img sees.
        found: Vec<PathBuf>,
    },
    /// Cancelled; nothing was left behind.
    #[error("restore cancelled")]
    Cancelled,
    /// The journal of the restored name could not be written, or its lock is held.
    #[error(transparent)]
    Journal(#[from] crate::engine::backup::journal::JournalError),
    /// The read-only server of the backup (instant restore) could not be started.
    #[error("serving the backup: {0}")]
    Export(#[from] crate::hv::export::ExportError),
    /// `qemu-img` failed (instant restore: an overlay or a destination image).
    #[error(transparent)]
    QemuImg(#[from] QemuImgError),
    /// An interrupted instant restore of this name must be repaired first.
    #[error("{0}")]
    Interrupted(String),
    /// A read of the backup met chunks that differ from their manifest (verify-on-read): the
    /// instant restore was abandoned, never copied from damaged data.
    #[error(
        "backup {} is damaged: {}{}",
        dir.display(),
        damage.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        if undone.is_empty() { String::new() } else { format!("; {undone}") }
    )]
    DamagedChunks {
        /// The backup folder.
        dir: PathBuf,
        /// The damaged chunks, file and chunk named.
        damage: Vec<crate::store::verified_read::Damage>,
        /// What was undone (empty when the caller decides).
        undone: String,
    },
    /// The verify-on-read server of the backup could not be started.
    #[error(transparent)]
    Verifier(#[from] crate::engine::verifier::VerifierError),
    /// A folder is still mounted where it should be gone.
    #[error("{} is still mounted: not removed", .0.display())]
    StillMounted(PathBuf),
    /// An instant restore stopped after its domain started: the domain keeps running on
    /// its overlays (never on a half-copied disk) and the journal keeps the state.
    #[error(
        "instant restore of {domain} not finished: {detail}; the domain keeps running on its \
         overlays over the backup: `vm-backup orphans --cleanup` finishes the copy"
    )]
    Unfinished {
        /// The restored domain.
        domain: String,
        /// What stopped it.
        detail: String,
    },
    /// A [`apply::BackupSource`] other than the backup folder (the off-site store) failed:
    /// its own error, with its own kind (the caller may downcast it back).
    #[error("{error}")]
    Source {
        /// What kind of failure it is.
        kind: crate::error::ErrorKind,
        /// The source's error.
        error: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
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

/// A backup folder read for a restore: its metadata and domain XML.
#[derive(Debug, Clone)]
struct Backup {
    dir: PathBuf,
    stamp: String,
    meta: BackupMetadata,
    xml_text: String,
    domain: DomainXml,
}

fn read_backup(request: &RestoreRequest) -> Result<Backup, RestoreError> {
    let (dir, stamp) = locate(request)?;
    let meta = BackupMetadata::read(&dir).map_err(|source| RestoreError::Unreadable {
        path: dir.join(layout::METADATA_FILE),
        source,
    })?;
    if request.backup_dir.is_none() && meta.vm_name != request.vm {
        return Err(RestoreError::NotFound(format!(
            "{} is a backup of VM {:?}, not of {:?}",
            dir.display(),
            meta.vm_name,
            request.vm
        )));
    }
    let xml_path = dir.join(layout::xml_file_name(&meta.vm_name)?);
    let xml_text = read_nofollow(&xml_path).map_err(|source| RestoreError::Unreadable {
        path: xml_path.clone(),
        source,
    })?;
    let domain = xml::parse_domain(&xml_text)?;
    Ok(Backup {
        dir,
        stamp,
        meta,
        xml_text,
        domain,
    })
}

/// Reads a text file of a backup without following a symlink at its name.
fn read_nofollow(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Restores a VM from a backup; see the module documentation.
pub fn restore(
    request: &RestoreRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<RestoreOutcome, RestoreError> {
    // The VM's lock on the target, shared: no backup or prune of it meanwhile.
    let _lock = match &request.backup_dir {
        Some(_) => None,
        None => Some(crate::store::FolderStore::open(&request.target)?.lock_vm(
            &request.host,
            &request.vm,
            crate::store::LockMode::Shared,
        )?),
    };
    let mut backup = read_backup(request)?;
    // An incremental or differential: its parents' images become backing layers.
    let parents = chain::parent_dirs(&backup.dir, &backup.meta)?;
    backup.meta = chain::expand(&backup.dir, &backup.meta)?;
    let Backup { dir, meta, .. } = &backup;
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

    // 1. Check what is cheap (the whole chain), before anything is written; the disk data is
    //    checked as it is copied, in one read.
    let upfront = VerifyOptions {
        disk_data: false,
        ..VerifyOptions::default()
    };
    let mut report = verify::verify_backup(dir, &upfront, progress, cancel)?;
    for p in &parents {
        progress.message(Level::Info, &format!("checking the parent {}", p.display()));
        let r = verify::verify_backup(p, &upfront, progress, cancel)?;
        if !r.ok {
            report = r;
            break;
        }
    }
    if !report.ok {
        let detail = report.summary();
        if !request.force {
            return Err(RestoreError::Damaged {
                dir: dir.clone(),
                detail,
            });
        }
        progress.message(
            Level::Warning,
            &format!("backup is damaged ({detail}); restoring anyway (--force)"),
        );
    }
    if cancel.is_cancelled() {
        return Err(RestoreError::Cancelled);
    }

    // 2. Plan, against libvirt and the files as they are.
    plan::domain_name(request, &backup.domain)?;
    let hv = Hypervisor::connect(&request.libvirt_uri)?;
    let new_uuid = uuid::Uuid::new_v4().to_string();
    let input = plan::PlanInput {
        request,
        dir,
        meta,
        domain: &backup.domain,
        new_uuid: &new_uuid,
    };
    let plan = plan::plan(&input, &LiveHost { hv: &hv })?;
    for note in &plan.notes {
        progress.message(Level::Info, note);
    }

    // 3. Apply: copy (checking each image's data), rename, define.
    let applied = apply::apply(&plan, &backup.xml_text, &hv, progress, cancel)?;
    report.checks.extend(applied.checks.iter().cloned());
    report.ok = report.checks.iter().all(|c| c.ok);
    report.bytes += applied.bytes_checked;
    report.seconds += applied.copy_seconds;
    progress.message(
        Level::Info,
        &format!(
            "domain {} defined{}",
            plan.name,
            if applied.started { " and started" } else { "" }
        ),
    );
    Ok(RestoreOutcome {
        backup_dir: backup.dir,
        stamp: backup.stamp,
        domain: plan.name,
        uuid: applied.uuid,
        disks: applied.disks,
        nvram: plan.nvram.map(|f| f.to),
        configs: plan.configs.map(|f| f.to),
        replaced: applied.replaced,
        started: applied.started,
        verify: report,
    })
}

/// The host as it is: files on this machine, domains in libvirt.
pub struct LiveHost<'a> {
    /// The libvirt connection asked about domains.
    pub hv: &'a Hypervisor,
}

impl plan::HostView for LiveHost<'_> {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn sha256(&self, path: &Path) -> Option<String> {
        verify::sha256_file(path).ok()
    }

    fn canonical(&self, path: &Path) -> PathBuf {
        fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
    }

    fn domain_active(&self, name: &str) -> Result<Option<bool>, RestoreError> {
        match self.hv.find_domain(name)? {
            Some(d) => Ok(Some(d.is_active()?)),
            None => Ok(None),
        }
    }

    fn disks_of_other_domains(
        &self,
        except: &str,
    ) -> Result<BTreeMap<PathBuf, String>, RestoreError> {
        let mut out = BTreeMap::new();
        for (name, text) in self.hv.inactive_xmls()? {
            if name == except {
                continue;
            }
            if let Ok(info) = xml::parse_domain(&text) {
                for disk in info.disks {
                    if let Some(s) = disk.source {
                        out.insert(s, name.clone());
                    }
                }
                if let Some(n) = info.nvram {
                    out.insert(n, name.clone());
                }
            }
        }
        Ok(out)
    }

    fn chain_files_of(&self, disks: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        for (disk, domain) in disks {
            // A disk qemu-img cannot open is no chain of ours to protect.
            let Ok(chain) = qemu_img::info_chain(disk, None) else {
                continue;
            };
            for image in chain {
                let p = PathBuf::from(image.filename);
                out.insert(self.canonical(&p), domain.clone());
            }
        }
        out
    }
}

impl RestoreError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            RestoreError::NotFound { .. } => ErrorKind::NotFound,
            RestoreError::Layout(e) => e.kind(),
            RestoreError::Store(e) => e.kind(),
            RestoreError::Unreadable { .. } => ErrorKind::Corrupt,
            RestoreError::Xml { .. } => ErrorKind::Corrupt,
            RestoreError::Damaged { .. } => ErrorKind::Corrupt,
            RestoreError::Verify(e) => e.kind(),
            RestoreError::Running { .. } => ErrorKind::Busy,
            RestoreError::Exists { .. } => ErrorKind::Busy,
            RestoreError::FileExists { .. } => ErrorKind::Busy,
            RestoreError::InUse { .. } => ErrorKind::Busy,
            RestoreError::BadName { .. } => ErrorKind::InvalidInput,
            RestoreError::Libvirt(e) => e.kind(),
            RestoreError::Copy(e) => e.kind(),
            RestoreError::Mismatch { .. } => ErrorKind::Corrupt,
            RestoreError::Io { .. } => ErrorKind::Io,
            RestoreError::NotTraversable { .. } => ErrorKind::InvalidInput,
            RestoreError::Rebase { source, .. } => source.kind(),
            RestoreError::ChainUnreadable { source, .. } => source.kind(),
            RestoreError::Chain { .. } => ErrorKind::Corrupt,
            RestoreError::Cancelled => ErrorKind::Cancelled,
            RestoreError::Journal(e) => e.kind(),
            RestoreError::Export(e) => e.kind(),
            RestoreError::QemuImg(e) => e.kind(),
            RestoreError::Interrupted(_) => ErrorKind::Busy,
            RestoreError::Unfinished { .. } => ErrorKind::Libvirt,
            RestoreError::Source { kind, .. } => *kind,
            RestoreError::DamagedChunks { .. } => ErrorKind::Corrupt,
            RestoreError::Verifier(e) => e.kind(),
            RestoreError::StillMounted(_) => ErrorKind::Busy,
        }
    }
}
