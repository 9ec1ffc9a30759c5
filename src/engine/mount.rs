//! `vm-backup mount` / `umount`: a backup's filesystems, read-only, under a folder.
//!
//! The chain of one mount, each piece recorded before it exists so that `umount`, `orphans`
//! and the next mount can take down what a killed command left:
//!
//! 1. the verify-on-read server ([`crate::store::verified_read`], a process of its own)
//!    serves the disk's backup files in `<work>/layers/`, checking each chunk against the
//!    manifest on its first read;
//! 2. `qemu-storage-daemon` opens those files read-only (the qcow2 chain given explicitly) and
//!    exports the guest-visible disk as the FUSE file `<work>/disk.raw`, through a throwaway
//!    writable qcow2 overlay `<work>/overlay.qcow2` whose backing node is that read-only chain;
//! 3. a writable loop device with partition scan, plus one loop slice per linear LVM volume;
//! 4. the filesystems, mounted read-only the normal way under `DIR/<volume>` (or `DIR` itself
//!    when the disk holds one filesystem): the kernel replays an ext3/4 journal or an XFS log
//!    into the overlay, so a crash-consistent backup (a live filesystem, its last metadata
//!    still in the journal) reads as the guest would see it after a reboot.
//!
//! When a mount with replay fails, the whole chain is taken down and built again read-only
//! (no overlay, a read-only loop device, `noload` / `norecovery`), and the state carries a
//! warning: recently written files may then be missing or unreadable.
//!
//! The state lives in `<journal_dir>/mounts/<id>.json` and the pieces in
//! `<journal_dir>/mounts/<id>/`. Nothing is ever opened for writing in the backup folder: the
//! overlay holds what a replay writes (a few MiB at most), and goes with the chain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::restore::{self, RestoreError, RestoreRequest, StampChoice};
use crate::format::metadata::{BackupMetadata, DiskRecord};
use crate::hv::export::{self, ExportError, Layer};
use crate::store::verified_read::{self, Damage, ServeSpec, ServedFile, VerifiedReadError};

/// The sub-folder of the journal folder holding mount states and their pieces.
pub const MOUNTS_SUBDIR: &str = "mounts";

/// What the hidden server command is called (`vm-backup verified-serve SPEC`).
pub const SERVE_COMMAND: &str = crate::engine::verifier::SERVE_COMMAND;

/// Errors of mount, umount and the file operations.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The backup could not be found or read.
    #[error(transparent)]
    Locate(#[from] RestoreError),
    /// No such disk in the backup, or no such volume or path in it.
    #[error("{0}")]
    NotFound(String),
    /// The folder is not usable (not empty, already mounted).
    #[error("{0}")]
    Busy(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// A tool of the chain failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The verify-on-read layer refused to serve.
    #[error(transparent)]
    Verified(#[from] VerifiedReadError),
    /// The verify-on-read server did not come up.
    #[error("the verify-on-read server did not start: {0}")]
    Server(String),
    /// A read met a damaged chunk of the backup.
    #[error("reading {path} failed: the backup is damaged: {}", damage.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Damaged {
        /// What was being read (inside the backup's filesystems).
        path: String,
        /// The damaged chunks, file and chunk named.
        damage: Vec<Damage>,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl MountError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            MountError::Locate(e) => e.kind(),
            MountError::NotFound(_) => ErrorKind::NotFound,
            MountError::Busy(_) => ErrorKind::Busy,
            MountError::Invalid(_) => ErrorKind::InvalidInput,
            MountError::Export(e) => e.kind(),
            MountError::Verified(e) => e.kind(),
            MountError::Server(_) => ErrorKind::Tool,
            MountError::Damaged { .. } => ErrorKind::Corrupt,
            MountError::Io { source, .. } => ErrorKind::from_io(source),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        MountError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Which backup, which disk, and who serves the verified files.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// Locates the backup (target, host, VM, stamp or backup folder).
    pub backup: RestoreRequest,
    /// The disk (`vda`); the first disk when `None`.
    pub disk: Option<String>,
    /// The journal folder (mount states go under `mounts/`).
    pub journal_dir: PathBuf,
    /// The program run as `PROGRAM verified-serve SPEC` (the `vm-backup` binary).
    pub helper: PathBuf,
}

impl MountRequest {
    /// A request for `vm`'s backup `stamp` under `target/host`.
    pub fn new(
        target: impl Into<PathBuf>,
        host: impl Into<String>,
        vm: impl Into<String>,
        stamp: StampChoice,
        journal_dir: impl Into<PathBuf>,
        helper: impl Into<PathBuf>,
    ) -> Self {
        Self {
            backup: RestoreRequest::new(target, host, vm, stamp),
            disk: None,
            journal_dir: journal_dir.into(),
            helper: helper.into(),
        }
    }
}

/// Why the chain exists: a `mount` (kept after the command) or a `files` run (taken down at
/// its end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountKind {
    /// `vm-backup mount`.
    Mount,
    /// `vm-backup files`.
    Files,
}

/// One filesystem of the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// `part1`, `vg-lv`, or empty for a disk that is one filesystem.
    pub name: String,
    /// The block device (a loop device or one of its partitions).
    pub device: String,
    /// Filesystem type.
    pub fstype: String,
    /// Where it is mounted.
    pub path: PathBuf,
    /// Whether it was mounted on the overlay, its journal replayed as the kernel mounted it
    /// (false: left unreplayed).
    #[serde(default)]
    pub replayed: bool,
}

/// The recorded state of one mount chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountState {
    /// Mount or files.
    pub kind: MountKind,
    /// The command that made it, and its start time (ticks since boot), to tell it from a
    /// recycled pid.
    pub owner_pid: u32,
    /// See `owner_pid`.
    pub owner_start: u64,
    /// Whether the whole chain is in place.
    pub complete: bool,
    /// The VM.
    pub vm: String,
    /// The backup stamp.
    pub stamp: String,
    /// The disk (`vda`).
    pub disk: String,
    /// The backup folder.
    pub backup_dir: PathBuf,
    /// Where the filesystems are mounted.
    pub dir: PathBuf,
    /// The folder of the pieces (`<journal_dir>/mounts/<id>`).
    pub workdir: PathBuf,
    /// Loop devices made, in order.
    pub loops: Vec<String>,
    /// Folders we created under `dir` (removed at teardown when empty).
    pub created_dirs: Vec<PathBuf>,
    /// Mount points, recorded before each mount.
    pub mountpoints: Vec<PathBuf>,
    /// The filesystems mounted.
    pub volumes: Vec<Volume>,
    /// What was found but not mounted, and why.
    pub skipped: Vec<(String, String)>,
    /// The throwaway overlay journal replays write into, recorded before it is created (none
    /// when the chain is read-only).
    #[serde(default)]
    pub overlay: Option<PathBuf>,
    /// What the operator should know (a journal that could not be replayed).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl MountState {
    fn layers_dir(&self) -> PathBuf {
        self.workdir.join("layers")
    }
    fn export_file(&self) -> PathBuf {
        self.workdir.join("disk.raw")
    }
    fn overlay_file(&self) -> PathBuf {
        self.workdir.join("overlay.qcow2")
    }
    fn state_file(&self) -> PathBuf {
        self.workdir.with_extension("json")
    }
    /// The damage report of the verify-on-read server.
    pub fn damage_report(&self) -> PathBuf {
        self.workdir.join(verified_read::DAMAGE_FILE)
    }

    fn save(&self) -> Result<(), MountError> {
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| MountError::io("cannot encode the mount state", e.into()))?;
        crate::store::write_atomic(&self.state_file(), &text).map_err(|e| {
            MountError::io(
                format!("cannot write {}", self.state_file().display()),
                e.into(),
            )
        })
    }

    /// The damaged chunks the server reported so far.
    pub fn damage(&self) -> Vec<Damage> {
        verified_read::read_damage(&self.damage_report())
    }

    /// Whether the process that made this chain is still running.
    pub fn owner_alive(&self) -> bool {
        proc_start(self.owner_pid) == Some(self.owner_start)
    }

    /// Whether the servers of the chain are running.
    pub fn servers_alive(&self) -> bool {
        let hint = self.workdir.to_string_lossy();
        let pid = |f: &str| export::read_pid(&self.workdir.join(f));
        pid("qsd.pid").is_some_and(|p| export::process_matches(p, &hint))
            && pid("verifier.pid").is_some_and(|p| export::process_matches(p, &hint))
    }
}

/// The start time of a process (field 22 of `/proc/PID/stat`).
fn proc_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// The folder of mount states.
pub fn mounts_folder(journal_dir: &Path) -> PathBuf {
    journal_dir.join(MOUNTS_SUBDIR)
}

/// The state id of a mount on `dir`.
fn mount_id(dir: &Path) -> String {
    let h = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    format!("mount-{}", &hex::encode(h)[..16])
}

/// Every recorded state.
pub fn list_states(journal_dir: &Path) -> Vec<MountState> {
    let Ok(rd) = std::fs::read_dir(mounts_folder(journal_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<MountState> = rd
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    out.sort_by(|a, b| a.workdir.cmp(&b.workdir));
    out
}

/// Finds the backup and the disk's record.
fn locate(req: &MountRequest) -> Result<(PathBuf, String, BackupMetadata, DiskRecord), MountError> {
    let (dir, stamp) = restore::locate(&req.backup)?;
    let meta = BackupMetadata::read(&dir)
        .map_err(|e| MountError::io(format!("cannot read the metadata of {}", dir.display()), e))?;
    // An incremental's images hold the changed blocks: its parents' images go below them.
    let meta = restore::chain::expand(&dir, &meta)?;
    let disk = match &req.disk {
        None => meta.disks.first().cloned(),
        Some(t) => meta.disks.iter().find(|d| &d.target == t).cloned(),
    }
    .ok_or_else(|| {
        MountError::NotFound(format!(
            "backup {} has no disk {}{}",
            dir.display(),
            req.disk.as_deref().unwrap_or("(none at all)"),
            if meta.disks.is_empty() {
                String::new()
            } else {
                format!(
                    " (disks: {})",
                    meta.disks
                        .iter()
                        .map(|d| d.target.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ))
    })?;
    Ok((dir, stamp, meta, disk))
}

/// Mounts the backup's filesystems read-only under `dir` and leaves them mounted.
pub fn mount(req: &MountRequest, dir: &Path) -> Result<MountState, MountError> {
    let dir = std::path::absolute(dir)
        .map_err(|e| MountError::io(format!("cannot resolve {}", dir.display()), e))?;
    let meta = std::fs::metadata(&dir)
        .map_err(|e| MountError::io(format!("cannot use {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(MountError::Invalid(format!(
            "{} is not a folder",
            dir.display()
        )));
    }
    let id = mount_id(&dir);
    let state_file = mounts_folder(&req.journal_dir).join(format!("{id}.json"));
    if let Ok(bytes) = std::fs::read(&state_file) {
        if let Ok(old) = serde_json::from_slice::<MountState>(&bytes) {
            if (old.complete && old.servers_alive()) || old.owner_alive() {
                return Err(MountError::Busy(format!(
                    "{} is already a mount of {} {} (use `vm-backup umount {}`)",
                    dir.display(),
                    old.vm,
                    old.stamp,
                    dir.display()
                )));
            }
            tracing::warn!(
                "taking down what an interrupted mount on {} left",
                dir.display()
            );
            teardown(&old, true)?;
        }
    }
    let non_empty = std::fs::read_dir(&dir)
        .map_err(|e| MountError::io(format!("cannot read {}", dir.display()), e))?
        .next()
        .is_some();
    if non_empty || export::is_mounted(&dir) {
        return Err(MountError::Busy(format!(
            "{} is not empty or is a mount point",
            dir.display()
        )));
    }
    build(req, MountKind::Mount, &id, &dir)
}

/// Builds the chain for `kind`, recording each piece; on failure takes down what was built.
pub(crate) fn build(
    req: &MountRequest,
    kind: MountKind,
    id: &str,
    dir: &Path,
) -> Result<MountState, MountError> {
    let (backup_dir, stamp, _meta, disk) = locate(req)?;
    let workdir = mounts_folder(&req.journal_dir).join(id);
    let me = std::process::id();
    let fresh = |warnings: Vec<String>| -> Result<MountState, MountError> {
        for d in [&workdir, &dir.to_path_buf()] {
            std::fs::create_dir_all(d)
                .map_err(|e| MountError::io(format!("cannot create {}", d.display()), e))?;
        }
        let state = MountState {
            kind,
            owner_pid: me,
            owner_start: proc_start(me).unwrap_or(0),
            complete: false,
            vm: req.backup.vm.clone(),
            stamp: stamp.clone(),
            disk: disk.target.clone(),
            backup_dir: backup_dir.clone(),
            dir: dir.to_path_buf(),
            workdir: workdir.clone(),
            loops: Vec::new(),
            created_dirs: Vec::new(),
            mountpoints: Vec::new(),
            volumes: Vec::new(),
            skipped: Vec::new(),
            overlay: None,
            warnings,
        };
        state.save()?;
        Ok(state)
    };
    let mut state = fresh(Vec::new())?;
    // The overlay needs the disk's size; metadata without it gets today's read-only chain.
    let replay = disk.virtual_size > 0;
    let mut replay_failed = None;
    let mut result = build_chain(req, &mut state, &disk, replay, &mut replay_failed);
    if let (Err(e), Some(what)) = (&result, replay_failed) {
        let warning = format!(
            "the journal of {what} could not be replayed ({e}): mounted without replay, \
             files written shortly before the backup may be missing or unreadable"
        );
        tracing::warn!("{warning}");
        // Start again from nothing with a read-only chain: what the failed replay wrote in
        // the overlay goes with it.
        teardown(&state, true)?;
        state = fresh(vec![warning])?;
        result = build_chain(req, &mut state, &disk, false, &mut None);
    }
    match result {
        Ok(()) => {
            state.complete = true;
            state.save()?;
            Ok(state)
        }
        Err(e) => {
            // Whatever failed (qemu-storage-daemon reading the header, a mount reading the
            // superblock), a damaged chunk behind it is what the operator must be told.
            let damage = state.damage();
            let e = if damage.is_empty() || matches!(e, MountError::Damaged { .. }) {
                e
            } else {
                MountError::Damaged {
                    path: format!("disk {}", state.disk),
                    damage,
                }
            };
            if let Err(t) = teardown(&state, true) {
                tracing::error!("teardown after a failed mount: {t}");
            }
            Err(e)
        }
    }
}

/// Builds the chain; with `replay`, through the overlay, the journals replayed as the
/// filesystems mount. A mount that fails with `replay` names its volume in `replay_failed`.
fn build_chain(
    req: &MountRequest,
    state: &mut MountState,
    disk: &DiskRecord,
    replay: bool,
    replay_failed: &mut Option<String>,
) -> Result<(), MountError> {
    // 1. The verify-on-read server.
    let mut files = vec![served(&state.backup_dir, &disk.file, &disk.manifest)];
    let mut formats = vec![disk.format.clone()];
    for b in &disk.backing_chain {
        files.push(served(&state.backup_dir, &b.file, &b.manifest));
        formats.push(b.format.clone());
    }
    let layers_dir = state.layers_dir();
    std::fs::create_dir_all(&layers_dir)
        .map_err(|e| MountError::io(format!("cannot create {}", layers_dir.display()), e))?;
    let spec = ServeSpec {
        mountpoint: layers_dir.clone(),
        damage_report: state.damage_report(),
        files,
    };
    start_server(req, state, &spec)?;

    // 2. qemu-storage-daemon exporting the guest-visible disk.
    let export_file = state.export_file();
    std::fs::write(&export_file, b"")
        .map_err(|e| MountError::io(format!("cannot create {}", export_file.display()), e))?;
    let layers: Vec<Layer> = spec
        .files
        .iter()
        .zip(formats)
        .map(|(f, format)| Layer {
            path: layers_dir.join(&f.name),
            format,
        })
        .collect();
    let overlay = replay.then(|| state.overlay_file());
    if let Some(ov) = &overlay {
        state.overlay = Some(ov.clone());
        state.save()?;
        export::create_overlay(ov, disk.virtual_size)?;
    }
    export::start_qsd(
        &layers,
        overlay.as_deref(),
        &export_file,
        &state.workdir.join("qsd.pid"),
    )?;

    // 3. Block devices and what is on them (writable over the overlay only).
    let main = export::attach_loop(&export_file, replay)?;
    state.loops.push(main.clone());
    state.save()?;
    // Test hook: hold here so a test can kill the command with the chain half built.
    if let Some(secs) = std::env::var("VMB_TEST_MOUNT_STALL_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_secs(secs));
    }
    let mut candidates: Vec<(String, String)> = Vec::new(); // (name, device)
    let mut pvs = Vec::new();
    if export::has_partition_table(&main) {
        for (i, p) in export::partitions(&main).into_iter().enumerate() {
            let n = p
                .rsplit_once('p')
                .map(|(_, n)| n.to_string())
                .unwrap_or_else(|| (i + 1).to_string());
            candidates.push((format!("part{n}"), p));
        }
    } else {
        candidates.push((String::new(), main.clone()));
    }
    let mut found = Vec::new();
    for (name, dev) in candidates {
        let fstype = export::probe(&dev)?;
        if fstype == "LVM2_member" {
            pvs.push(dev);
        } else if export::mountable(&fstype) {
            found.push((name, dev, fstype));
        } else {
            let shown = if name.is_empty() { "the disk" } else { &name };
            state.skipped.push((
                shown.to_string(),
                if fstype.is_empty() {
                    "no filesystem recognised".into()
                } else {
                    format!("{fstype}: not a filesystem that is mounted")
                },
            ));
        }
    }
    if !pvs.is_empty() {
        let (lvs, skipped) = export::logical_volumes(&pvs)?;
        state.skipped.extend(skipped);
        for lv in lvs {
            let slice = export::attach_slice(&lv.pv, lv.offset, lv.size, replay)?;
            state.loops.push(slice.clone());
            state.save()?;
            let name = format!("{}-{}", lv.vg, lv.lv);
            let fstype = export::probe(&slice)?;
            if export::mountable(&fstype) {
                found.push((name, slice, fstype));
            } else {
                state.skipped.push((
                    name,
                    format!("{fstype:?}: not a filesystem that is mounted"),
                ));
            }
        }
    }
    // A probe that met a damaged chunk sees "no filesystem": never hide a volume that way.
    let damage = state.damage();
    if !damage.is_empty() {
        return Err(MountError::Damaged {
            path: format!("disk {}", disk.target),
            damage,
        });
    }
    if found.is_empty() {
        return Err(MountError::NotFound(format!(
            "no filesystem to mount on disk {} of {} ({})",
            disk.target,
            state.backup_dir.display(),
            state
                .skipped
                .iter()
                .map(|(n, w)| format!("{n}: {w}"))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }

    // 4. The filesystems.
    let single = found.len() == 1 && found[0].0.is_empty();
    for (name, dev, fstype) in found {
        let path = if single {
            state.dir.clone()
        } else {
            let p = state.dir.join(&name);
            if !p.exists() {
                std::fs::create_dir(&p)
                    .map_err(|e| MountError::io(format!("cannot create {}", p.display()), e))?;
                state.created_dirs.push(p.clone());
            }
            p
        };
        state.mountpoints.push(path.clone());
        state.save()?;
        export::mount_ro(&dev, &fstype, &path, replay).map_err(|e| {
            // A damaged chunk under the superblock shows as a mount failure: name it.
            let damage = state.damage();
            if damage.is_empty() {
                if replay {
                    *replay_failed = Some(if name.is_empty() {
                        format!("the {fstype} filesystem")
                    } else {
                        format!("{name} ({fstype})")
                    });
                }
                MountError::Export(e)
            } else {
                MountError::Damaged {
                    path: if name.is_empty() {
                        "/".into()
                    } else {
                        name.clone()
                    },
                    damage,
                }
            }
        })?;
        state.volumes.push(Volume {
            name,
            device: dev,
            fstype,
            path,
            replayed: replay,
        });
        state.save()?;
    }
    Ok(())
}

fn served(backup_dir: &Path, file: &str, manifest: &crate::copier::ChunkManifest) -> ServedFile {
    // A parent's image (`../<stamp>/<file>`, an incremental's chain) shares its file name with
    // the image above it: it is served as `<stamp>-<file>`, and named without the `..`.
    let (name, path) = match file.strip_prefix("../").and_then(|r| r.split_once('/')) {
        Some((stamp, f)) => (
            format!("{stamp}-{f}"),
            backup_dir
                .parent()
                .unwrap_or(backup_dir)
                .join(stamp)
                .join(f),
        ),
        None => (file.to_string(), backup_dir.join(file)),
    };
    ServedFile {
        name,
        path,
        chunk_size: manifest.chunk_size,
        file_size: manifest.file_size,
        digests: manifest.digests.clone(),
    }
}

/// Starts the verify-on-read server and waits for its "ready" line.
fn start_server(
    req: &MountRequest,
    state: &MountState,
    spec: &ServeSpec,
) -> Result<(), MountError> {
    use crate::engine::verifier::{self, VerifierError};
    verifier::start(&req.helper, &state.workdir, spec)
        .map(drop)
        .map_err(|e| match e {
            VerifierError::Io { context, source } => MountError::Io { context, source },
            VerifierError::Start(log) => MountError::Server(log),
        })
}

/// What `umount` and `orphans --cleanup` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Teardown {
    /// One line per action.
    pub actions: Vec<String>,
}

/// Takes down a chain, piece by piece from the top; every step tolerates a piece already gone.
/// `force` detaches busy or dead mounts lazily instead of failing.
pub fn teardown(state: &MountState, force: bool) -> Result<Teardown, MountError> {
    let mut done = Teardown::default();
    for mp in state.mountpoints.iter().rev() {
        if export::is_mounted(mp) {
            export::unmount(mp, false).or_else(|e| {
                if force {
                    export::unmount(mp, true)
                } else {
                    Err(e)
                }
            })?;
            done.actions.push(format!("unmounted {}", mp.display()));
        }
    }
    for d in state.created_dirs.iter().rev() {
        if !export::is_mounted(d) {
            let _ = std::fs::remove_dir(d);
        }
    }
    let export_file = state.export_file();
    let mut loops: Vec<String> = state.loops.iter().rev().cloned().collect();
    for l in export::loops_backed_by(&export_file.to_string_lossy()) {
        // Slices of its partitions first, then the device itself.
        for p in export::partitions(&l) {
            for s in export::loops_backed_by(&p) {
                if !loops.contains(&s) {
                    loops.insert(0, s);
                }
            }
        }
        if !loops.contains(&l) {
            loops.push(l);
        }
    }
    for l in &loops {
        if Path::new(&format!(
            "/sys/block/{}/loop",
            l.trim_start_matches("/dev/")
        ))
        .exists()
        {
            export::detach_loop(l)?;
            done.actions.push(format!("loop device {l} detached"));
        }
    }
    let hint = state.workdir.to_string_lossy().into_owned();
    if let Some(pid) = export::read_pid(&state.workdir.join("qsd.pid")) {
        if export::stop_process(pid, &hint, Duration::from_secs(5)) {
            done.actions
                .push(format!("qemu-storage-daemon {pid} stopped"));
        }
    }
    if export::is_mounted(&export_file) {
        export::unmount(&export_file, true)?;
        done.actions
            .push(format!("stale export {} unmounted", export_file.display()));
    }
    let layers = state.layers_dir();
    if export::is_mounted(&layers) {
        export::unmount(&layers, false).or_else(|_| export::unmount(&layers, true))?;
        done.actions.push(format!(
            "verify-on-read folder {} unmounted",
            layers.display()
        ));
    }
    if let Some(pid) = export::read_pid(&state.workdir.join("verifier.pid")) {
        if export::stop_process(pid, &hint, Duration::from_secs(5)) {
            done.actions
                .push(format!("verify-on-read server {pid} stopped"));
        }
    }
    if let Some(ov) = state.overlay.as_ref().filter(|ov| ov.exists()) {
        std::fs::remove_file(ov)
            .map_err(|e| MountError::io(format!("cannot remove {}", ov.display()), e))?;
        done.actions
            .push(format!("overlay {} removed", ov.display()));
    }
    if export::mounts()
        .iter()
        .any(|(m, _)| m.starts_with(&state.workdir))
    {
        return Err(MountError::Busy(format!(
            "{} still has mounts: not removed",
            state.workdir.display()
        )));
    }
    if state.workdir.exists() {
        std::fs::remove_dir_all(&state.workdir)
            .map_err(|e| MountError::io(format!("cannot remove {}", state.workdir.display()), e))?;
    }
    let sf = state.state_file();
    if sf.exists() {
        std::fs::remove_file(&sf)
            .map_err(|e| MountError::io(format!("cannot remove {}", sf.display()), e))?;
    }
    Ok(done)
}

/// Unmounts what `mount` put on `dir`.
pub fn umount(journal_dir: &Path, dir: &Path) -> Result<Teardown, MountError> {
    let dir = std::path::absolute(dir)
        .map_err(|e| MountError::io(format!("cannot resolve {}", dir.display()), e))?;
    let state_file = mounts_folder(journal_dir).join(format!("{}.json", mount_id(&dir)));
    let bytes = std::fs::read(&state_file).map_err(|_| {
        MountError::NotFound(format!(
            "{} is not a vm-backup mount (no {})",
            dir.display(),
            state_file.display()
        ))
    })?;
    let state: MountState = serde_json::from_slice(&bytes).map_err(|e| {
        MountError::io(
            format!("cannot read {}", state_file.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    teardown(&state, false)
}

/// A leftover chain: what `orphans` reports and, with `cleanup`, takes down.
#[derive(Debug, Clone, Serialize)]
pub struct MountOrphan {
    /// The VM of the backup.
    pub vm: String,
    /// What it is.
    pub detail: String,
    /// With `cleanup`: what was done, or why it failed.
    pub repair: Option<MountRepair>,
}

/// What `orphans --cleanup` did to one leftover chain.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountRepair {
    /// Taken down: the steps done.
    Done(Vec<String>),
    /// Not taken down: the error, worded for the operator.
    Failed(String),
}

/// Chains left by killed commands (`files`, an unfinished `mount`) or whose servers died. A
/// complete mount whose servers run is not a leftover; nor is a chain whose command runs.
pub fn orphans(journal_dir: &Path, cleanup: bool) -> Vec<MountOrphan> {
    let mut out = Vec::new();
    for st in list_states(journal_dir) {
        if st.owner_alive() {
            continue;
        }
        let why = match (st.kind, st.complete, st.servers_alive()) {
            (MountKind::Mount, true, true) => continue,
            (MountKind::Mount, true, false) => "a mount whose servers are gone",
            (MountKind::Mount, false, _) => "an interrupted mount",
            (MountKind::Files, _, _) => "an interrupted `files` run",
        };
        let detail = format!(
            "{why} of {} {} disk {} on {} (pieces in {}, {} loop device(s), {} mount point(s))",
            st.vm,
            st.stamp,
            st.disk,
            st.dir.display(),
            st.workdir.display(),
            st.loops.len(),
            st.mountpoints.len()
        );
        let repair = cleanup.then(|| match teardown(&st, true) {
            Ok(t) => MountRepair::Done(t.actions),
            Err(e) => MountRepair::Failed(e.to_string()),
        });
        out.push(MountOrphan {
            vm: st.vm.clone(),
            detail,
            repair,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_id_is_stable_per_folder() {
        assert_eq!(mount_id(Path::new("/a/b")), mount_id(Path::new("/a/b")));
        assert_ne!(mount_id(Path::new("/a/b")), mount_id(Path::new("/a/c")));
    }

    #[test]
    fn this_process_is_alive_and_a_stale_owner_is_not() {
        let me = std::process::id();
        let start = proc_start(me).unwrap();
        let mut st = MountState {
            kind: MountKind::Files,
            owner_pid: me,
            owner_start: start,
            complete: true,
            vm: "v".into(),
            stamp: "s".into(),
            disk: "vda".into(),
            backup_dir: "/nonexistent".into(),
            dir: "/nonexistent/d".into(),
            workdir: "/nonexistent/w".into(),
            loops: vec![],
            created_dirs: vec![],
            mountpoints: vec![],
            volumes: vec![],
            skipped: vec![],
            overlay: None,
            warnings: vec![],
        };
        assert!(st.owner_alive());
        st.owner_start += 1;
        assert!(!st.owner_alive());
        assert!(!st.servers_alive());
    }

    #[test]
    fn leftover_states_are_reported_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let folder = mounts_folder(dir.path());
        let work = folder.join("files-1");
        std::fs::create_dir_all(&work).unwrap();
        let st = MountState {
            kind: MountKind::Files,
            owner_pid: u32::MAX - 1,
            owner_start: 1,
            complete: true,
            vm: "web".into(),
            stamp: "2026-01-01-000000".into(),
            disk: "vda".into(),
            backup_dir: "/nonexistent".into(),
            dir: work.join("fs"),
            workdir: work.clone(),
            loops: vec![],
            created_dirs: vec![],
            mountpoints: vec![],
            volumes: vec![],
            skipped: vec![],
            overlay: Some(work.join("overlay.qcow2")),
            warnings: vec![],
        };
        st.save().unwrap();
        std::fs::write(work.join("overlay.qcow2"), b"replayed").unwrap();
        let found = orphans(dir.path(), false);
        assert_eq!(found.len(), 1);
        assert!(found[0].detail.contains("interrupted `files` run"));
        let cleaned = orphans(dir.path(), true);
        match &cleaned[0].repair {
            Some(MountRepair::Done(steps)) => {
                assert!(steps.iter().any(|s| s.contains("overlay")), "{steps:?}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!work.exists());
        assert!(list_states(dir.path()).is_empty());
    }
}
