//! Pre-checks (before the VM is touched: failure means exit 1) and post-checks (of a
//! published backup and of the domain: failure means exit 3), also behind `vm-backup check`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::ErrorKind;
use crate::format::layout::{self, LayoutError};
use crate::format::metadata::{BackupMetadata, Method, SkippedDisk};
use crate::hv::{self, AgentChannel, Dom, DomState, Hypervisor, LibvirtError};
use crate::progress::{CancelToken, Progress};

use super::chain::ChainError;
use super::journal::JournalError;
use super::problem::{Problem, ProblemKind, Problems};
use super::{BackupError, BackupRequest, SessionDisk, OVERLAY_MARKER};

/// Why the pre-checks refuse a backup (nothing was touched: exit 1), or a check could not run.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A libvirt call failed.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A name is not allowed in the layout.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The target is not an initialised target (or its marker is unreadable).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A disk's backing chain cannot be backed up.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The domain is neither running, paused nor shut off.
    #[error("domain is {0}: it must be running, paused or shut off")]
    DomainState(DomState),
    /// An offline backup of a running domain without `--shutdown`.
    #[error("domain is {0}: an offline backup needs it shut off (or --shutdown to shut it down cleanly and start it again)")]
    NeedsShutOff(DomState),
    /// A live method on a shut-off domain.
    #[error("domain is shut off: method {0} needs it running (use --method offline or auto)")]
    NeedsRunning(Method),
    /// Quiesce is impossible (agent absent, disconnected or hung) and no fallback applies.
    #[error("{0}: cannot quiesce")]
    CannotQuiesce(AgentProblem),
    /// The inactive XML does not parse.
    #[error("cannot parse the inactive domain XML: {0}")]
    InactiveXml(#[source] crate::hv::xml::XmlError),
    /// A disk runs on an overlay of ours that no journal lists.
    #[error(
        "disk {target} runs on {}, an overlay left by an earlier vm-backup run that the journal in {} does not list; \
         commit it back by hand (virsh blockcommit {vm} {target} --active --pivot) before backing up",
        source_file.display(),
        journal_folder.display()
    )]
    UnknownOverlay {
        /// The VM.
        vm: String,
        /// The disk.
        target: String,
        /// The overlay it runs on.
        source_file: PathBuf,
        /// Where the journals are.
        journal_folder: PathBuf,
    },
    /// A disk has a block job running.
    #[error("disk {target} has a running {job} block job ({cur} of {end}): wait for it or abort it first")]
    BlockJob {
        /// The disk.
        target: String,
        /// The job's kind.
        job: String,
        /// Progress.
        cur: u64,
        /// Total.
        end: u64,
    },
    /// A disk that is not a file.
    #[error("disk {target} is a {kind} disk: only file-backed disks can be backed up")]
    NotFileBacked {
        /// The disk.
        target: String,
        /// Its type (`block`, `network`…).
        kind: String,
    },
    /// A disk image (or a backing image) cannot be read.
    #[error("disk {target}: {what}{}: {source}", path.display())]
    Unreadable {
        /// The disk.
        target: String,
        /// `""`, `"cannot read "` or `"cannot read its backing image "`.
        what: &'static str,
        /// The image.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A disk image is not a regular file.
    #[error("disk {target}: {} is not a regular file", path.display())]
    NotAFile {
        /// The disk.
        target: String,
        /// The image.
        path: PathBuf,
    },
    /// Every disk is skipped.
    #[error("the domain has no disk to back up")]
    NoDisks,
    /// The NVRAM file cannot be read.
    #[error("NVRAM {}: {source}", path.display())]
    Nvram {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The target is missing, unreadable or not writable.
    #[error("target {}{what}: {source}", path.display())]
    Target {
        /// The target folder.
        path: PathBuf,
        /// `""` or `" is not writable"`.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// statvfs of the target failed.
    #[error("target {}: statvfs: {source}", path.display())]
    Statvfs {
        /// The target folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// The target is not a folder.
    #[error("target {} is not a folder", .0.display())]
    TargetNotFolder(PathBuf),
    /// The target has not enough free space.
    #[error("target {} has {} MiB free, the backup needs about {} MiB (allocated size of the disks and their backing chains plus a margin)", path.display(), free >> 20, needed.div_ceil(1 << 20))]
    TargetFull {
        /// The target folder.
        path: PathBuf,
        /// Bytes free.
        free: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// An earlier run left state that the journal records.
    #[error("an earlier run (pid {pid}, stamp {stamp}, phase {phase}) left state behind: `vm-backup orphans --cleanup` or the next backup repairs it")]
    LeftState {
        /// Its process.
        pid: u32,
        /// Its stamp.
        stamp: String,
        /// Its phase.
        phase: String,
    },
    /// `check --post`: the VM has no backup.
    #[error("no backup of this VM in {}", .0.display())]
    NoBackup(PathBuf),
    /// `check --post`: the metadata of the newest backup cannot be read.
    #[error("{}: {source}", path.display())]
    Metadata {
        /// The backup folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl CheckError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CheckError::Libvirt(e) => e.kind(),
            CheckError::Journal(e) => e.kind(),
            CheckError::Layout(e) => e.kind(),
            CheckError::Chain(e) => e.kind(),
            CheckError::DomainState(_)
            | CheckError::NeedsShutOff(_)
            | CheckError::NeedsRunning(_)
            | CheckError::UnknownOverlay { .. }
            | CheckError::BlockJob { .. }
            | CheckError::LeftState { .. } => ErrorKind::Busy,
            CheckError::CannotQuiesce(_) => ErrorKind::GuestAgent,
            CheckError::InactiveXml(_) => ErrorKind::Libvirt,
            CheckError::NotFileBacked { .. }
            | CheckError::NotAFile { .. }
            | CheckError::NoDisks => ErrorKind::InvalidInput,
            CheckError::Unreadable { source, .. } | CheckError::Nvram { source, .. } => {
                ErrorKind::from_io(source)
            }
            CheckError::Target { source, .. } => ErrorKind::from_target_io(source),
            CheckError::Statvfs { .. } => ErrorKind::TargetFailing,
            CheckError::Store(e) => e.kind(),
            CheckError::TargetNotFolder(_) => ErrorKind::TargetMissing,
            CheckError::TargetFull { .. } => ErrorKind::TargetFull,
            CheckError::NoBackup(_) => ErrorKind::NotFound,
            CheckError::Metadata { source, .. } => ErrorKind::from_target_io(source),
        }
    }
}

/// Why the guest agent cannot quiesce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentProblem {
    /// No agent channel.
    #[error("no guest agent channel in the domain")]
    Absent,
    /// A channel, nobody connected.
    #[error("the guest agent is not connected")]
    Disconnected,
    /// It did not answer (libvirt's words).
    #[error("the guest agent {0}")]
    Hung(String),
}

/// Bytes kept free on the target beyond the allocated size of the disks.
pub const SPACE_MARGIN: u64 = 16 << 20;

/// What the pre-checks found, and what the backup will do.
#[derive(Debug, Clone, Serialize)]
pub struct PreCheck {
    /// Domain state.
    #[serde(serialize_with = "display")]
    pub state: DomState,
    /// Domain UUID.
    pub uuid: String,
    /// The method chosen (never auto).
    pub method: Method,
    /// Why a weaker method than asked, if so.
    pub method_note: Option<String>,
    /// The disks to copy.
    #[serde(skip)]
    pub disks: Vec<SessionDisk>,
    /// Targets of the disks to copy.
    pub disk_targets: Vec<String>,
    /// Disks skipped, with reasons.
    pub skipped: Vec<SkippedDisk>,
    /// The inactive XML with security info.
    #[serde(skip)]
    pub inactive_xml: String,
    /// The NVRAM file, if any.
    pub nvram: Option<PathBuf>,
    /// The live XML says the agent is connected (and it answered, when quiesce was chosen).
    pub agent_connected: bool,
    /// We set the domain's agent response timeout (to restore afterwards).
    #[serde(skip)]
    pub agent_timeout_set: bool,
    /// Bytes the backup needs on the target (estimate).
    pub needed_bytes: u64,
    /// Bytes free on the target.
    pub free_bytes: u64,
    /// Notes for the log.
    pub notes: Vec<String>,
}

fn display<S: serde::Serializer>(v: &DomState, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// What the pre-checks learnt about the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// No agent channel in the domain.
    Absent,
    /// A channel, but no agent connected to it.
    Disconnected,
    /// The agent answered a ping within the bound.
    Answers,
    /// The agent did not answer within the bound (the cause).
    Hung(String),
}

/// Chooses the method: `auto` gives quiesce (running, agent answers), snapshot (running, no
/// agent channel or agent not connected) or offline (shut off). `probe` is asked about the
/// agent only when quiesce is possible. A hung agent fails quiesce and auto unless
/// `fallback` allows a crash-consistent snapshot (recorded in the note).
pub fn choose_method(
    requested: Method,
    state: DomState,
    shutdown: bool,
    fallback: bool,
    probe: &mut dyn FnMut() -> AgentState,
) -> Result<(Method, Option<String>), CheckError> {
    let live = state.is_live();
    match (requested, live) {
        (Method::Offline | Method::Auto, false) => Ok((Method::Offline, None)),
        (Method::Offline, true) if shutdown => Ok((Method::Offline, None)),
        (Method::Offline, true) => Err(CheckError::NeedsShutOff(state)),
        (Method::Quiesce | Method::Snapshot, false) => Err(CheckError::NeedsRunning(requested)),
        (Method::Snapshot, true) => Ok((Method::Snapshot, None)),
        (Method::Quiesce | Method::Auto, true) => {
            let (why, auto_may_fall_back) = match probe() {
                AgentState::Answers => return Ok((Method::Quiesce, None)),
                AgentState::Absent => (AgentProblem::Absent, true),
                AgentState::Disconnected => (AgentProblem::Disconnected, true),
                AgentState::Hung(cause) => (AgentProblem::Hung(cause), false),
            };
            if requested == Method::Auto && auto_may_fall_back {
                Ok((
                    Method::Snapshot,
                    Some(format!("{why}: crash-consistent snapshot")),
                ))
            } else if fallback {
                Ok((
                    Method::Snapshot,
                    Some(format!("{why}: crash-consistent fallback as configured")),
                ))
            } else {
                Err(CheckError::CannotQuiesce(why))
            }
        }
    }
}

/// Runs every pre-check on `dom` for `request`. Read-only except for setting the domain's
/// agent response timeout (a runtime setting).
pub fn pre_check(dom: &Dom, request: &BackupRequest) -> Result<PreCheck, CheckError> {
    let vm = request.vm.as_str();
    let settings = &request.settings;
    let state = dom.state()?;
    match state {
        DomState::Running | DomState::Paused | DomState::ShutOff => {}
        other => return Err(CheckError::DomainState(other)),
    }
    let uuid = dom.uuid()?;
    let inactive_xml = dom.xml(true)?;
    let current = dom.parsed(!state.is_live())?;
    let inactive = hv::xml::parse_domain(&inactive_xml).map_err(CheckError::InactiveXml)?;
    let mut notes: Vec<String> = Vec::new();

    // Leftovers of an earlier run that the journal did not explain.
    for d in current.disks.iter().chain(inactive.disks.iter()) {
        if let Some(src) = &d.source {
            if src.to_string_lossy().contains(OVERLAY_MARKER) {
                return Err(CheckError::UnknownOverlay {
                    vm: vm.to_string(),
                    target: d.target.clone(),
                    source_file: src.clone(),
                    journal_folder: super::journal::journal_folder(&settings.journal_dir),
                });
            }
        }
    }
    if state.is_live() {
        for d in current.disks.iter().filter(|d| d.device == "disk") {
            if let Some(job) = dom.block_job(&d.target)? {
                return Err(CheckError::BlockJob {
                    target: d.target.clone(),
                    job: job.kind_name().to_string(),
                    cur: job.cur,
                    end: job.end,
                });
            }
        }
    }
    if let Ok(snaps) = dom.snapshot_names() {
        if !snaps.is_empty() {
            notes.push(format!(
                "the domain has libvirt snapshots with metadata ({}); they are not ours and are left alone",
                snaps.join(", ")
            ));
        }
    }

    // Method.
    let mut agent_timeout_set = false;
    let agent_connected = current.agent.connected();
    let agent = current.agent.clone();
    let mut probe = || -> AgentState {
        match &agent {
            AgentChannel::Absent => return AgentState::Absent,
            a if !a.connected() => return AgentState::Disconnected,
            _ => {}
        }
        let secs = settings.timeouts.agent_seconds.clamp(1, u32::MAX as u64) as u32;
        if let Err(e) = dom.set_agent_timeout(Some(secs)) {
            return AgentState::Hung(e.to_string());
        }
        agent_timeout_set = true;
        let t = std::time::Instant::now();
        match dom.agent_ping() {
            Ok(()) => {
                notes.push(format!(
                    "guest agent answered in {:.0} ms",
                    t.elapsed().as_secs_f64() * 1000.0
                ));
                debug_pause_after_ping();
                AgentState::Answers
            }
            Err(e) => AgentState::Hung(format!("does not answer within {secs} s ({e})")),
        }
    };
    let chosen = choose_method(
        request.method,
        state,
        request.shutdown,
        request.crash_consistent_fallback,
        &mut probe,
    );
    let (method, method_note) = match chosen {
        Ok(v) => v,
        Err(e) => {
            if agent_timeout_set {
                let _ = dom.set_agent_timeout(None);
            }
            return Err(e);
        }
    };

    // Disks.
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    for d in &current.disks {
        if let Some(reason) = d.skip_reason() {
            skipped.push(SkippedDisk {
                target: d.target.clone(),
                reason,
            });
            continue;
        }
        if d.kind != "file" {
            return Err(CheckError::NotFileBacked {
                target: d.target.clone(),
                kind: d.kind.clone(),
            });
        }
        let source = d.source.clone().unwrap_or_default();
        let unreadable = |what, path: &Path| {
            let (target, path) = (d.target.clone(), path.to_path_buf());
            move |source| CheckError::Unreadable {
                target,
                what,
                path,
                source,
            }
        };
        let meta = fs::metadata(&source).map_err(unreadable("", &source))?;
        if !meta.is_file() {
            return Err(CheckError::NotAFile {
                target: d.target.clone(),
                path: source,
            });
        }
        fs::File::open(&source).map_err(unreadable("cannot read ", &source))?;
        let format = d.format.clone().unwrap_or_else(|| "raw".into());
        let (virtual_size, allocated_size) = match dom.block_sizes(&d.target) {
            Ok(v) => v,
            Err(_) => {
                use std::os::unix::fs::MetadataExt;
                (meta.len(), meta.blocks() * 512)
            }
        };
        let backing_chain = super::chain::backing_chain(&source, &format, vm, &d.target)?;
        for b in &backing_chain {
            fs::File::open(&b.path)
                .map_err(unreadable("cannot read its backing image ", &b.path))?;
        }
        disks.push(SessionDisk {
            target: d.target.clone(),
            source,
            file_name: layout::disk_file_name(vm, &d.target, &format)?,
            format,
            virtual_size,
            allocated_size,
            backing_file: backing_chain.first().map(|b| b.path.clone()),
            backing_chain,
        });
    }
    if disks.is_empty() {
        return Err(CheckError::NoDisks);
    }

    // NVRAM.
    let nvram = current
        .nvram
        .clone()
        .or_else(|| inactive.nvram.clone())
        .or_else(|| {
            let p = hv::default_nvram_path(vm);
            (current.efi && p.is_file()).then_some(p)
        });
    let mut nvram_size = 0;
    if let Some(p) = &nvram {
        match fs::metadata(p) {
            Ok(m) => nvram_size = m.len(),
            Err(e) if state == DomState::ShutOff && e.kind() == std::io::ErrorKind::NotFound => {
                notes.push(format!(
                    "NVRAM {} does not exist yet (created at first start): not copied",
                    p.display()
                ));
            }
            Err(source) => {
                return Err(CheckError::Nvram {
                    path: p.clone(),
                    source,
                })
            }
        }
    }
    let nvram = nvram.filter(|p| p.is_file());

    // Target.
    let target = &settings.target;
    let meta = fs::metadata(target).map_err(|source| CheckError::Target {
        path: target.clone(),
        what: "",
        source,
    })?;
    if !meta.is_dir() {
        return Err(CheckError::TargetNotFolder(target.clone()));
    }
    crate::store::FolderStore::open(target)?
        .check_writable()
        .map_err(|source| CheckError::Target {
            path: target.clone(),
            what: " is not writable",
            source: source.into(),
        })?;
    let st =
        nix::sys::statvfs::statvfs(target.as_path()).map_err(|source| CheckError::Statvfs {
            path: target.clone(),
            source,
        })?;
    let free_bytes = st.blocks_available() as u64 * st.fragment_size() as u64;
    let needed_bytes = disks
        .iter()
        .map(|d| {
            d.allocated_size
                + d.backing_chain
                    .iter()
                    .map(|b| b.allocated_size)
                    .sum::<u64>()
        })
        .sum::<u64>()
        + nvram_size
        + SPACE_MARGIN;
    if free_bytes < needed_bytes {
        return Err(CheckError::TargetFull {
            path: target.clone(),
            free: free_bytes,
            needed: needed_bytes,
        });
    }

    Ok(PreCheck {
        state,
        uuid,
        method,
        method_note,
        disk_targets: disks.iter().map(|d| d.target.clone()).collect(),
        disks,
        skipped,
        inactive_xml,
        nvram,
        agent_connected,
        agent_timeout_set,
        needed_bytes,
        free_bytes,
        notes,
    })
}

/// Test hook: sleeps [`super::DEBUG_PAUSE_AFTER_PING_ENV`] milliseconds after the agent
/// answered its ping (so that a test can hang the agent before the freeze).
fn debug_pause_after_ping() {
    if let Some(ms) = std::env::var(super::DEBUG_PAUSE_AFTER_PING_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!(
            "{}={ms}: pausing after the agent ping (test hook)",
            super::DEBUG_PAUSE_AFTER_PING_ENV
        );
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// `vm-backup check VM --pre`: connects, runs the pre-checks, restores the agent timeout.
pub fn run_pre_checks(request: &BackupRequest) -> Result<PreCheck, BackupError> {
    let vm = request.vm.as_str();
    layout::safe_component(vm).map_err(|e| BackupError::pre(vm, e))?;
    let hv =
        Hypervisor::connect(&request.settings.libvirt_uri).map_err(|e| BackupError::pre(vm, e))?;
    let dom = hv.domain(vm).map_err(|e| BackupError::pre(vm, e))?;
    if let Some(rec) = super::journal::read_record(&super::journal::journal_path(
        &request.settings.journal_dir,
        vm,
    ))
    .map_err(|e| BackupError::pre(vm, e))?
    {
        return Err(BackupError::pre(
            vm,
            CheckError::LeftState {
                pid: rec.pid,
                stamp: rec.stamp,
                phase: rec.phase,
            },
        ));
    }
    let pre = pre_check(&dom, request).map_err(|e| BackupError::pre(vm, e))?;
    if pre.agent_timeout_set {
        let _ = dom.set_agent_timeout(None);
    }
    Ok(pre)
}

/// One disk a backup would copy, as an estimate lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EstimatedDisk {
    /// Target device (`vda`).
    pub target: String,
    /// The file name inside the backup folder.
    pub file_name: String,
    /// The image on the host.
    pub source: PathBuf,
    /// Bytes allocated on the host (what the copy reads).
    pub allocated_size: u64,
}

/// The disks a backup of `request.vm` would copy, for an estimate: read from the domain's XML
/// and the image files' sizes only (no agent, no snapshot, nothing written).
pub fn estimate_disks(request: &BackupRequest) -> Result<Vec<EstimatedDisk>, BackupError> {
    use std::os::unix::fs::MetadataExt;
    let vm = request.vm.as_str();
    let pre = |e: CheckError| BackupError::pre(vm, e);
    let hv =
        Hypervisor::connect(&request.settings.libvirt_uri).map_err(|e| BackupError::pre(vm, e))?;
    let dom = hv.domain(vm).map_err(|e| BackupError::pre(vm, e))?;
    let state = dom.state().map_err(|e| BackupError::pre(vm, e))?;
    let current = dom
        .parsed(!state.is_live())
        .map_err(|e| BackupError::pre(vm, e))?;
    let mut disks = Vec::new();
    for d in &current.disks {
        let (None, "file", Some(source)) = (d.skip_reason(), d.kind.as_str(), d.source.clone())
        else {
            continue;
        };
        let meta = fs::metadata(&source).map_err(|e| {
            pre(CheckError::Unreadable {
                target: d.target.clone(),
                what: "",
                path: source.clone(),
                source: e,
            })
        })?;
        let format = d.format.clone().unwrap_or_else(|| "raw".into());
        disks.push(EstimatedDisk {
            target: d.target.clone(),
            file_name: layout::disk_file_name(vm, &d.target, &format)
                .map_err(|e| BackupError::pre(vm, e))?,
            source,
            allocated_size: meta.blocks() * 512,
        });
    }
    Ok(disks)
}

/// Flushes `path` to the share and drops its pages from the local page cache
/// (`fsync`, then `posix_fadvise(DONTNEED)`), so that the next read comes from the share and
/// not from what this host wrote.
pub fn drop_cached_pages(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(path)?;
    file.sync_all()?;
    nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(std::io::Error::from)
}

/// Checks a backup folder (the `.partial` one before it is published, or a published one):
/// every file of the metadata is present with its size,
/// every disk re-hashed against its chunk manifest (in parallel), every line of
/// `checksums.sha256` matches, and `qemu-img check` passes on qcow2 copies. Returns the
/// problems found (empty: all good).
pub fn post_check_folder(
    dir: &Path,
    md: &BackupMetadata,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Problems {
    post_check_folder_after_copy(dir, md, &BTreeMap::new(), progress, cancel)
}

/// What a file looked like when its copy was read back: size, inode and change times. A file
/// written to since (by anything) has another modification or change time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// The stamp of `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path)?;
        Ok(Self {
            len: m.len(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// [`post_check_folder`] right after this process copied the images: the image files named in
/// `read_back` were already read back from the share block by block during their copy
/// (O_DIRECT, after each write completed, compared with the bytes hashed into the manifest;
/// see `CopyOptions::read_back`) and are not re-hashed as long as nothing wrote to them since
/// (their [`FileStamp`] is unchanged); every other check runs on them, and every other image,
/// or one written to after its copy, is re-read as usual.
pub fn post_check_folder_after_copy(
    dir: &Path,
    md: &BackupMetadata,
    read_back: &BTreeMap<String, FileStamp>,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Problems {
    let mut problems = Problems::default();
    // Read what the share holds, not what this host's page cache remembers writing.
    let cached = std::iter::once(layout::CHECKSUMS_FILE)
        .chain(md.files.iter().map(String::as_str))
        .chain(md.disks.iter().flat_map(|d| {
            std::iter::once(d.file.as_str()).chain(d.backing_chain.iter().map(|b| b.file.as_str()))
        }));
    for name in cached {
        let path = dir.join(name);
        if let Err(e) = drop_cached_pages(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(Problem::file(name, ProblemKind::Unflushed, e.to_string()));
            }
        }
    }
    // checksums.sha256
    let sums_path = dir.join(layout::CHECKSUMS_FILE);
    let sums = match fs::read_to_string(&sums_path) {
        Ok(s) => s,
        Err(e) => {
            problems.push(Problem::io(sums_path.display().to_string(), &e));
            String::new()
        }
    };
    let mut listed = std::collections::BTreeMap::new();
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        match line.split_once("  ") {
            Some((sum, name)) => {
                listed.insert(name.to_string(), sum.to_string());
            }
            None => problems.push(Problem::file(
                layout::CHECKSUMS_FILE,
                ProblemKind::MalformedLine,
                format!("{line:?}"),
            )),
        }
    }
    // Every image file: the disks and the images of their backing chains.
    let images: Vec<ImageFile<'_>> = md
        .disks
        .iter()
        .flat_map(|d| {
            std::iter::once(ImageFile {
                file: &d.file,
                file_size: d.file_size,
                sha256: &d.sha256,
                manifest: &d.manifest,
                format: &d.format,
            })
            .chain(d.backing_chain.iter().map(|b| ImageFile {
                file: &b.file,
                file_size: b.file_size,
                sha256: &b.sha256,
                manifest: &b.manifest,
                format: &b.format,
            }))
        })
        .collect();
    let disk_names: std::collections::BTreeSet<&str> = images.iter().map(|d| d.file).collect();
    for (name, sum) in &listed {
        if disk_names.contains(name.as_str()) {
            continue; // checked against the manifest below
        }
        match crate::engine::verify::sha256_file(&dir.join(name)) {
            Ok(actual) if &actual == sum => {}
            Ok(actual) => problems.push(Problem::file(
                name,
                ProblemKind::ChecksumMismatch,
                format!("SHA-256 {actual} does not match checksums.sha256 ({sum})"),
            )),
            Err(e) => problems.push(Problem::file(name, ProblemKind::Unreadable, e.to_string())),
        }
    }
    for f in &md.files {
        if !dir.join(f).is_file() {
            problems.push(Problem::file(f, ProblemKind::Missing, ""));
        }
        // A line cut away at a line boundary leaves a well-formed but shorter list: every
        // file the metadata names must be in it, or `sha256sum -c` would skip that file.
        if !listed.contains_key(f) {
            problems.push(Problem::file(f, ProblemKind::NotListed, ""));
        }
    }
    // Each backing chain as a whole, opened inside the folder only.
    for d in md.disks.iter().filter(|d| !d.backing_chain.is_empty()) {
        let c = crate::engine::verify::chain_check(dir, d);
        if !c.ok {
            problems.push(Problem::file(c.file, ProblemKind::BackingChain, c.detail));
        }
    }
    // Disk images, in parallel.
    let disk_problems: Vec<Vec<Problem>> = std::thread::scope(|s| {
        let handles: Vec<_> = images
            .iter()
            .map(|d| {
                let listed = listed.get(d.file).cloned();
                s.spawn(move || {
                    let mut p = Vec::new();
                    let path = dir.join(d.file);
                    match fs::metadata(&path) {
                        Ok(m) if m.len() == d.file_size => {}
                        Ok(m) => p.push(Problem::file(
                            d.file,
                            ProblemKind::SizeMismatch,
                            format!("size {} differs from the recorded {}", m.len(), d.file_size),
                        )),
                        Err(e) => {
                            p.push(Problem::io(d.file, &e));
                            return p;
                        }
                    }
                    if listed.as_deref() != Some(d.sha256) {
                        p.push(Problem::file(
                            d.file,
                            ProblemKind::ChecksumMismatch,
                            "checksums.sha256 does not list the recorded SHA-256",
                        ));
                    }
                    let untouched = read_back
                        .get(d.file)
                        .is_some_and(|stamp| FileStamp::of(&path).ok().as_ref() == Some(stamp));
                    let verified = if untouched {
                        Ok(None) // proven block by block during the copy
                    } else {
                        crate::copier::verify_file(&path, d.manifest, progress, cancel).map(Some)
                    };
                    match verified {
                        Ok(None) => {}
                        Ok(Some(r)) if r.ok => {}
                        Ok(Some(r)) => p.push(Problem::file(
                            d.file,
                            ProblemKind::ChunkMismatch,
                            format!(
                                "{} chunk(s) differ from the manifest{}",
                                r.bad_chunks.len(),
                                r.first_bad
                                    .as_ref()
                                    .map(|b| format!(" (first at offset {})", b.offset))
                                    .unwrap_or_default()
                            ),
                        )),
                        Err(e) => p.push(Problem::file(
                            d.file,
                            ProblemKind::VerifyFailed,
                            e.to_string(),
                        )),
                    }
                    if d.format == "qcow2" {
                        if let Err(e) = crate::hv::qemu_img::check(&path) {
                            p.push(Problem::file(
                                d.file,
                                ProblemKind::ImageCheck,
                                e.to_string(),
                            ));
                        }
                    }
                    p
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![Problem::general(
                        ProblemKind::CheckFailed,
                        "a verification thread panicked",
                    )]
                })
            })
            .collect()
    });
    problems.extend(disk_problems.into_iter().flatten());
    problems
}

/// Whether the metadata `md` names the domain `name` with UUID `uuid` (unknown: not compared).
fn identity_problems(name: &str, uuid: Option<&str>, md: &BackupMetadata) -> Problems {
    let mut problems = Problems::default();
    if md.vm_name != name {
        problems.push(Problem::general(
            ProblemKind::Identity,
            format!("the backup is of VM {:?}, not of {name:?}", md.vm_name),
        ));
    }
    if let Some(uuid) = uuid {
        if !md.vm_uuid.is_empty() && !md.vm_uuid.eq_ignore_ascii_case(uuid) {
            problems.push(Problem::general(
                ProblemKind::Identity,
                format!(
                    "the backup is of the domain with UUID {}, {name:?} has UUID {uuid}",
                    md.vm_uuid
                ),
            ));
        }
    }
    problems
}

/// One image file of a backup, as the post-checks see it.
struct ImageFile<'a> {
    file: &'a str,
    file_size: u64,
    sha256: &'a str,
    manifest: &'a crate::copier::ChunkManifest,
    format: &'a str,
}

/// Checks the backup is of this domain (the VM name and UUID the metadata records), and that
/// the domain runs on the images the backup recorded (`md.disks[].source`), with no overlay of
/// ours and no block job. Returns the problems found.
pub fn post_check_domain(dom: &Dom, md: &BackupMetadata) -> Problems {
    let mut problems = identity_problems(dom.name(), dom.uuid().ok().as_deref(), md);
    let cannot = |e: LibvirtError| {
        Problems(vec![Problem::general(
            ProblemKind::CheckFailed,
            e.to_string(),
        )])
    };
    let state = match dom.state() {
        Ok(s) => s,
        Err(e) => return cannot(e),
    };
    let parsed = match dom.parsed(!state.is_live()) {
        Ok(p) => p,
        Err(e) => return cannot(e),
    };
    for d in &md.disks {
        let cur = parsed.disks.iter().find(|x| x.target == d.target);
        match cur.and_then(|c| c.source.as_ref()) {
            Some(src) if src == Path::new(&d.source) => {}
            Some(src) => problems.push(Problem::general(
                ProblemKind::Domain,
                format!(
                    "disk {} runs on {}, not on its original image {}",
                    d.target,
                    src.display(),
                    d.source
                ),
            )),
            None => problems.push(Problem::general(
                ProblemKind::Domain,
                format!("disk {} is gone from the domain", d.target),
            )),
        }
        if state.is_live() {
            if let Ok(Some(job)) = dom.block_job(&d.target) {
                problems.push(Problem::general(
                    ProblemKind::Domain,
                    format!("disk {} has a {} block job", d.target, job.kind_name()),
                ));
            }
        }
    }
    problems
}

/// `vm-backup check VM --post`: the newest backup of the VM and the domain. Returns the
/// folder checked and the problems found.
pub fn run_post_checks(
    request: &BackupRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<(PathBuf, Problems), BackupError> {
    let vm = request.vm.as_str();
    let settings = &request.settings;
    let vm_dir = layout::VmDir::new(&settings.target, &settings.host(), vm)
        .map_err(|e| BackupError::pre(vm, e))?;
    let stamp = vm_dir
        .latest()
        .map_err(|e| BackupError::pre(vm, e))?
        .ok_or_else(|| BackupError::pre(vm, CheckError::NoBackup(vm_dir.path.clone())))?;
    let dir = vm_dir.backup_dir(&stamp);
    let md = BackupMetadata::read(&dir).map_err(|source| {
        BackupError::pre(
            vm,
            CheckError::Metadata {
                path: dir.clone(),
                source,
            },
        )
    })?;
    let mut problems = post_check_folder(&dir, &md, progress, cancel);
    let hv = Hypervisor::connect(&settings.libvirt_uri).map_err(|e| BackupError::pre(vm, e))?;
    match hv.domain(vm) {
        Ok(dom) => problems.extend(post_check_domain(&dom, &md)),
        Err(e) => problems.push(Problem::general(ProblemKind::CheckFailed, e.to_string())),
    }
    Ok((dir, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(
        requested: Method,
        state: DomState,
        agent: AgentState,
        shutdown: bool,
        fallback: bool,
    ) -> (Result<(Method, Option<String>), CheckError>, bool) {
        let mut asked = false;
        let r = choose_method(requested, state, shutdown, fallback, &mut || {
            asked = true;
            agent.clone()
        });
        (r, asked)
    }

    /// (requested, state, agent, shutdown, fallback, expected method or error fragment)
    type Case = (
        Method,
        DomState,
        AgentState,
        bool,
        bool,
        Result<Method, &'static str>,
    );

    #[test]
    fn the_post_check_compares_the_vm_name_and_uuid_of_the_metadata() {
        let md: BackupMetadata = serde_json::from_str(
            r#"{"schema_version": 1, "tool_version": "0", "vm_name": "web",
                "vm_uuid": "0f8fad5b-d9cb-469f-a165-70867728950e", "host": "hv1",
                "stamp": "2026-11-21-120000", "method_requested": "auto", "method": "offline",
                "started_at": "t0", "finished_at": "t1", "phases": {}, "disks": [],
                "skipped_disks": [], "files": [], "total_bytes": 0, "bytes_per_sec": 0.0,
                "result": "success"}"#,
        )
        .unwrap();
        let uuid = "0F8FAD5B-D9CB-469F-A165-70867728950E";
        assert!(identity_problems("web", Some(uuid), &md).is_empty());
        assert!(identity_problems("web", None, &md).is_empty());
        let other = identity_problems("web 01", Some(uuid), &md);
        assert_eq!(other.len(), 1, "{other:?}");
        let recreated = identity_problems("web", Some("7c9e6679-7425-40de-944b-e07fc1f90ae7"), &md);
        let first = recreated.iter().next().expect("a problem");
        assert_eq!(first.kind, ProblemKind::Identity);
        assert!(first.to_string().contains("UUID"), "{recreated:?}");
    }

    #[test]
    fn a_file_cut_out_of_checksums_sha256_is_a_post_check_problem() {
        let dir = tempfile::tempdir().unwrap();
        let xml = "<domain/>\n";
        fs::write(dir.path().join("web.xml"), xml).unwrap();
        let md: BackupMetadata = serde_json::from_str(
            r#"{"schema_version": 1, "tool_version": "0", "vm_name": "web", "vm_uuid": "0f8fad5b-d9cb-469f-a165-70867728950e", "host": "hv1",
                "stamp": "2026-11-21-120000", "method_requested": "auto", "method": "offline",
                "started_at": "t0", "finished_at": "t1", "phases": {}, "disks": [],
                "skipped_disks": [], "files": ["web.xml"], "total_bytes": 0,
                "bytes_per_sec": 0.0, "result": "success"}"#,
        )
        .unwrap();
        let cancel = CancelToken::new();
        let sums = dir.path().join(layout::CHECKSUMS_FILE);
        let line = format!("{}  web.xml\n", {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(xml.as_bytes()))
        });
        fs::write(&sums, &line).unwrap();
        let whole = post_check_folder(dir.path(), &md, &crate::progress::NoProgress, &cancel);
        assert!(whole.is_empty(), "{whole:?}");
        // The same list with its only line removed at the line boundary: still well formed.
        fs::write(&sums, "").unwrap();
        let cut = post_check_folder(dir.path(), &md, &crate::progress::NoProgress, &cancel);
        assert!(
            cut.iter().any(|p| p.file.as_deref() == Some("web.xml")
                && p.kind == ProblemKind::NotListed
                && p.to_string() == "web.xml: not listed in checksums.sha256"),
            "{cut:?}"
        );
    }

    #[test]
    fn method_table() {
        use AgentState::*;
        use DomState::*;
        let hung = || Hung("does not answer within 3 s".into());
        // (requested, state, agent, shutdown, fallback) -> method or error
        let cases: Vec<Case> = vec![
            (
                Method::Auto,
                Running,
                Answers,
                false,
                false,
                Ok(Method::Quiesce),
            ),
            (
                Method::Auto,
                Running,
                Absent,
                false,
                false,
                Ok(Method::Snapshot),
            ),
            (
                Method::Auto,
                Running,
                Disconnected,
                false,
                false,
                Ok(Method::Snapshot),
            ),
            (
                Method::Auto,
                Running,
                hung(),
                false,
                false,
                Err("cannot quiesce"),
            ),
            (
                Method::Auto,
                Running,
                hung(),
                false,
                true,
                Ok(Method::Snapshot),
            ),
            (
                Method::Auto,
                ShutOff,
                Answers,
                false,
                false,
                Ok(Method::Offline),
            ),
            (
                Method::Quiesce,
                Running,
                Answers,
                false,
                false,
                Ok(Method::Quiesce),
            ),
            (
                Method::Quiesce,
                Running,
                Absent,
                false,
                false,
                Err("no guest agent"),
            ),
            (
                Method::Quiesce,
                Running,
                Absent,
                false,
                true,
                Ok(Method::Snapshot),
            ),
            (
                Method::Quiesce,
                ShutOff,
                Answers,
                false,
                false,
                Err("needs it running"),
            ),
            (
                Method::Snapshot,
                Running,
                hung(),
                false,
                false,
                Ok(Method::Snapshot),
            ),
            (
                Method::Snapshot,
                ShutOff,
                Absent,
                false,
                false,
                Err("needs it running"),
            ),
            (
                Method::Offline,
                ShutOff,
                Absent,
                false,
                false,
                Ok(Method::Offline),
            ),
            (
                Method::Offline,
                Running,
                Answers,
                false,
                false,
                Err("--shutdown"),
            ),
            (
                Method::Offline,
                Running,
                Answers,
                true,
                false,
                Ok(Method::Offline),
            ),
        ];
        for (req, state, agent, shutdown, fallback, want) in cases {
            let label = format!("{req} {state} {agent:?} shutdown={shutdown} fallback={fallback}");
            let (got, asked) = choose(req, state, agent, shutdown, fallback);
            match (got, want) {
                (Ok((m, note)), Ok(w)) => {
                    assert_eq!(m, w, "{label}");
                    // A weaker method than asked always says why.
                    if m == Method::Snapshot && req != Method::Snapshot {
                        assert!(note.is_some(), "{label}");
                    }
                }
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{label}: {e}"),
                (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
            }
            // The agent is only asked when quiesce is possible.
            if !state.is_live() || req == Method::Snapshot || req == Method::Offline {
                assert!(!asked, "{label}: agent probed needlessly");
            }
        }
    }
}
