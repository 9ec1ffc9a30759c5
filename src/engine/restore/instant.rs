//! Instant restore (`vm-backup restore <vm> <stamp> --instant`): the VM runs at once from the
//! backup, and its disks move to local storage while it runs.
//!
//! 1. The verify-on-read server ([`crate::engine::verifier`], a process of its own) serves
//!    each disk's image and its chain (incrementals: the parents' images) in a FUSE folder
//!    `<work>/layers/` (root only), every chunk checked against its manifest on its first
//!    read; `qemu-storage-daemon` (root, daemonized) opens those files **read-only**
//!    (`read-only=on`, `locking=off`, the chain given explicitly so the headers' recorded
//!    names are never followed), and exports the guest-visible disks over NBD on a unix
//!    socket in the work folder beside the restored disks. QEMU (not root) reaches the backup
//!    only through that socket, so libvirt never labels (chowns) a file of the backup, and
//!    every byte the guest or the block copy reads has been checked: a damaged chunk is an
//!    I/O error to the guest, fails the block copy, and is named (file and chunk) in the
//!    command's error.
//! 2. For each disk, a local qcow2 overlay (`<dest>.vmb-instant.qcow2`) whose backing file is
//!    the NBD export; the domain (renamed, new UUID and MACs with `--as`, as the folder
//!    restore plans it) is defined on the overlays and started.
//! 3. Each disk is block-copied (`virDomainBlockCopy`, full, not shallow: the whole chain is
//!    copied) into the destination image the folder restore would write (created beforehand
//!    without a backing file), and pivoted when the job is ready (the commit's readiness
//!    rule: `cur == end` or `<mirror ready='yes'>`). The definition is checked (and fixed) to
//!    name the destinations; then the server stops and the overlays are removed.
//!
//! The state is journaled under the restored domain's name (`<journal_dir>/journal/<name>.json`,
//! [`InstantRecord`], which names the work folder holding the FUSE mount and both servers'
//! pid files) before each step, under that name's lock. A failure before the domain runs
//! removes everything it created; a failure after leaves the domain running on its overlays
//! (block jobs aborted: never on a half-copied disk) with the servers up and the journal
//! kept; `vm-backup orphans` reports it and `orphans --cleanup` finishes it ([`repair`]: copy
//! and pivot when running, `qemu-img convert` of the overlay when shut off). A damaged chunk
//! met at any point (the guest's reads, the copy, the repair) abandons the restore: the
//! domain is stopped and undefined, the partial copies, overlays, mount and servers removed,
//! the journal cleared: a damaged backup never becomes a local disk.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::apply::{copy_nofollow, create_disk_dir, hand_to_qemu};
use super::{chain, plan, LiveHost, RestoreError, RestoreRequest, RestoredDisk};
use crate::engine::backup::journal::Journal;
use crate::engine::verifier;
use crate::format::metadata::BackupMetadata;
use crate::hv::export::{self, Layer};
use crate::hv::{qemu_img, xml, xml_edit, Dom, Hypervisor, LibvirtError};
use crate::progress::{CancelToken, Level, Progress, Transfer};
use crate::store::verified_read::{self, Damage, ServeSpec, ServedFile};

/// The suffix of an instant restore's overlay, beside its destination image.
pub const OVERLAY_SUFFIX: &str = ".vmb-instant.qcow2";

/// How long the block copies may take by default (a repair by `orphans --cleanup` too).
pub const DEFAULT_COPY_BOUND: Duration = Duration::from_secs(24 * 3600);

/// The environment variable that makes the restore wait this many seconds once the block
/// copies are started (a test hook: a test kills the command during the copy).
pub const DEBUG_STALL_ENV: &str = "VMB_TEST_INSTANT_STALL_SECS";

/// The environment variable that, set to `1`, serves the backup to QEMU **without** the
/// verify-on-read layer (a benchmark hook: `benches/lab-instant.sh` measures the layer's cost
/// on the block copy against it). Honoured only by a binary built with the cargo feature
/// `bench-unverified` (off by default), with a warning; any other binary ignores it and says so.
pub const UNVERIFIED_BENCH_ENV: &str = "VMB_BENCH_INSTANT_UNVERIFIED";

/// The sub-folder of the work folder where the verify-on-read FUSE folder is mounted.
const LAYERS_DIR: &str = "layers";

/// An instant restore to run.
#[derive(Debug, Clone)]
pub struct InstantRequest {
    /// Which backup, the new name (`--as`), the disk folder (`--disk-dir`), `force`, the URI.
    pub restore: RestoreRequest,
    /// The journal folder (the restore is journaled under the restored domain's name).
    pub journal_dir: PathBuf,
    /// How long the block copies may take to be ready.
    pub copy_bound: Duration,
    /// The program run as `PROGRAM verified-serve SPEC` (the `vm-backup` binary): the
    /// verify-on-read server every read of the backup goes through.
    pub helper: PathBuf,
}

/// One disk of an instant restore, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstantDisk {
    /// Guest device (`vda`).
    pub target: String,
    /// The backup's chain of this disk (top first), served read-only.
    pub layers: Vec<Layer>,
    /// The overlay the domain starts on.
    pub overlay: PathBuf,
    /// The final, standalone image.
    pub dest: PathBuf,
    /// Its format (the backup's).
    pub format: String,
    /// Virtual size, bytes.
    pub virtual_size: u64,
}

/// What an instant restore holds (in the journal of the restored domain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstantRecord {
    /// The backup folder.
    pub backup_dir: PathBuf,
    /// The restored domain.
    pub domain: String,
    /// The work folder (NBD socket, server pid file).
    pub workdir: PathBuf,
    /// The disks.
    pub disks: Vec<InstantDisk>,
    /// Whether this run defined the domain (a repair of a run that had not yet defined it
    /// removes the files instead).
    pub defined: bool,
    /// The NVRAM file this restore wrote, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<PathBuf>,
    /// The program serving the backup through the verify-on-read layer (its FUSE folder is
    /// `<workdir>/layers`); `None` only in the benchmark hook [`UNVERIFIED_BENCH_ENV`] and in
    /// journals written before the layer (their servers read the backup directly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier: Option<PathBuf>,
}

impl InstantRecord {
    fn socket(&self) -> PathBuf {
        self.workdir.join("nbd.sock")
    }
    fn pidfile(&self) -> PathBuf {
        self.workdir.join("qsd.pid")
    }
    fn server_pid(&self) -> Option<u32> {
        export::read_pid(&self.pidfile())
            .filter(|p| export::process_matches(*p, &self.workdir.to_string_lossy()))
    }

    /// The verify-on-read FUSE folder.
    fn layers_dir(&self) -> PathBuf {
        self.workdir.join(LAYERS_DIR)
    }

    /// The damaged chunks the verify-on-read server met so far.
    pub fn damage(&self) -> Vec<Damage> {
        verified_read::read_damage(&self.workdir.join(verified_read::DAMAGE_FILE))
    }

    /// Whether every server this restore needs runs.
    fn servers_alive(&self) -> bool {
        self.server_pid().is_some()
            && (self.verifier.is_none() || verifier::running(&self.workdir).is_some())
    }

    /// The name of layer `i` of disk `target` in the FUSE folder (parents of an incremental
    /// share their file names, so the folder names them by disk and depth).
    fn served_name(target: &str, i: usize, format: &str) -> String {
        format!("{target}-{i}.{format}")
    }

    /// What the verify-on-read server serves: each disk's layers with their chunk manifests,
    /// read from the backup's metadata (the chain of an incremental expanded).
    fn serve_spec(&self) -> Result<ServeSpec, RestoreError> {
        let meta =
            BackupMetadata::read(&self.backup_dir).map_err(|source| RestoreError::Unreadable {
                path: self.backup_dir.join(crate::format::layout::METADATA_FILE),
                source,
            })?;
        let meta = chain::expand(&self.backup_dir, &meta)?;
        let mut files = Vec::new();
        for d in &self.disks {
            let Some(disk) = meta.disks.iter().find(|x| x.target == d.target) else {
                return Err(RestoreError::NotFound(format!(
                    "disk {} is not in {}",
                    d.target,
                    self.backup_dir.display()
                )));
            };
            let mut recorded = vec![(self.backup_dir.join(&disk.file), &disk.manifest)];
            recorded.extend(
                disk.backing_chain
                    .iter()
                    .map(|b| (self.backup_dir.join(&b.file), &b.manifest)),
            );
            let paths: Vec<PathBuf> = recorded.iter().map(|(p, _)| p.clone()).collect();
            let layers: Vec<PathBuf> = d.layers.iter().map(|l| l.path.clone()).collect();
            if paths != layers {
                return Err(RestoreError::Chain {
                    path: d.overlay.clone(),
                    expected: layers,
                    found: paths,
                });
            }
            for (i, (layer, (_, m))) in d.layers.iter().zip(recorded).enumerate() {
                files.push(ServedFile {
                    name: Self::served_name(&d.target, i, &layer.format),
                    path: lexically_normal(&layer.path),
                    chunk_size: m.chunk_size,
                    file_size: m.file_size,
                    digests: m.digests.clone(),
                });
            }
        }
        Ok(ServeSpec {
            mountpoint: self.layers_dir(),
            damage_report: self.workdir.join(verified_read::DAMAGE_FILE),
            files,
        })
    }

    /// Starts the servers of the backup (the verify-on-read folder, then the NBD server
    /// reading its files), unless they run already; a half left by a crash is taken down
    /// first.
    fn serve(&self) -> Result<(), RestoreError> {
        if self.servers_alive() {
            return Ok(());
        }
        self.stop_servers()?;
        let _ = fs::remove_file(self.socket());
        let disks: Vec<(String, Vec<Layer>)> = match &self.verifier {
            Some(helper) => {
                let spec = self.serve_spec()?;
                let dir = self.layers_dir();
                fs::create_dir_all(&dir).map_err(|source| RestoreError::Io {
                    context: "cannot create",
                    path: dir.clone(),
                    source,
                })?;
                verifier::start(helper, &self.workdir, &spec)?;
                self.disks
                    .iter()
                    .map(|d| {
                        let layers = d
                            .layers
                            .iter()
                            .enumerate()
                            .map(|(i, l)| Layer {
                                path: dir.join(Self::served_name(&d.target, i, &l.format)),
                                format: l.format.clone(),
                            })
                            .collect();
                        (d.target.clone(), layers)
                    })
                    .collect()
            }
            None => self
                .disks
                .iter()
                .map(|d| (d.target.clone(), d.layers.clone()))
                .collect(),
        };
        export::start_qsd_nbd(&disks, &self.socket(), &self.pidfile())?;
        // QEMU runs as its own user: the socket is handed to it (connect needs write access).
        if let Some((uid, gid)) = crate::hv::qemu_user() {
            std::os::unix::fs::lchown(self.socket(), Some(uid), Some(gid)).map_err(|source| {
                RestoreError::Io {
                    context: "cannot hand to the QEMU user",
                    path: self.socket(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Stops the NBD server, then unmounts the verify-on-read folder and stops its server.
    fn stop_servers(&self) -> Result<Vec<String>, RestoreError> {
        let mut done = Vec::new();
        if let Some(pid) = self.server_pid() {
            export::stop_process(pid, &self.workdir.to_string_lossy(), Duration::from_secs(5));
            done.push(format!("backup server (pid {pid}) stopped"));
        }
        done.extend(verifier::stop(&self.workdir, &self.layers_dir())?);
        Ok(done)
    }

    /// Stops the servers and removes the overlays and the work folder (only once nothing is
    /// mounted under it).
    fn take_down(&self) -> Result<Vec<String>, RestoreError> {
        let mut done = self.stop_servers()?;
        for d in &self.disks {
            if fs::remove_file(&d.overlay).is_ok() {
                done.push(format!("overlay {} removed", d.overlay.display()));
            }
        }
        if let Some(m) = verifier::mounts_under(&self.workdir).into_iter().next() {
            return Err(RestoreError::StillMounted(m));
        }
        let _ = fs::remove_dir_all(&self.workdir);
        Ok(done)
    }

    /// Abandons a restore from a damaged backup: block jobs aborted, the domain stopped and
    /// undefined, its NVRAM, partial copies and overlays removed, the servers taken down.
    fn abandon(&self, hv: &Hypervisor) -> Result<Vec<String>, RestoreError> {
        let mut done = Vec::new();
        if let Some(dom) = hv.find_domain(&self.domain)?.filter(|_| self.defined) {
            for d in &self.disks {
                let _ = dom.abort_job(&d.target);
            }
            if dom.is_active()? {
                dom.destroy()?;
                done.push(format!("domain {} stopped", self.domain));
            }
            dom.undefine(crate::hv::Nvram::Keep)?;
            done.push(format!("domain {} undefined", self.domain));
        }
        if let Some(n) = &self.nvram {
            let _ = fs::remove_file(n);
        }
        for d in &self.disks {
            if fs::remove_file(&d.dest).is_ok() {
                done.push(format!("partial copy {} removed", d.dest.display()));
            }
        }
        done.extend(self.take_down()?);
        Ok(done)
    }
}

/// `path` with its `..` folded (a parent's image is named `<backup>/../<stamp>/<file>`; the
/// target has no symlinks, so the folded name is the same file, and reads better in errors).
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The error of a restore abandoned because the backup is damaged, with what was undone.
fn damaged(rec: &InstantRecord, damage: Vec<Damage>, undone: String) -> RestoreError {
    RestoreError::DamagedChunks {
        dir: rec.backup_dir.clone(),
        damage,
        undone,
    }
}

/// What an instant restore did.
#[derive(Debug, Clone, Serialize)]
pub struct InstantOutcome {
    /// The backup folder restored from.
    pub backup_dir: PathBuf,
    /// Its stamp.
    pub stamp: String,
    /// The domain defined and running.
    pub domain: String,
    /// Its UUID.
    pub uuid: String,
    /// Where each disk is now (standalone images).
    pub disks: Vec<RestoredDisk>,
    /// Seconds from the command to the domain started on its overlays.
    pub started_after_seconds: f64,
    /// Seconds the block copies took (start to the last pivot).
    pub copy_seconds: f64,
    /// Whether every read of the backup went through the verify-on-read layer (always, but
    /// for the benchmark hook [`UNVERIFIED_BENCH_ENV`]).
    pub verified: bool,
}

/// Removes what a failed run created before its domain ran (server, overlays, work folder,
/// destination images, NVRAM, created folders) and the journal.
struct Undo<'a> {
    record: Option<InstantRecord>,
    dests: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    journal: &'a mut Journal,
    armed: bool,
}

impl Undo<'_> {
    fn run(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        if let Some(rec) = &self.record {
            if let Err(e) = rec.take_down() {
                tracing::error!("taking down the instant restore's servers: {e}");
            }
            if let Some(n) = &rec.nvram {
                let _ = fs::remove_file(n);
            }
        }
        for f in &self.dests {
            let _ = fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = fs::remove_dir_all(d);
        }
        let _ = self.journal.clear();
    }
}

/// Restores a VM from a backup and runs it at once; see the module documentation.
pub fn restore_instant(
    request: &InstantRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<InstantOutcome, RestoreError> {
    let t0 = Instant::now();
    let req = &request.restore;
    let target_lock = match &req.backup_dir {
        Some(_) => None,
        None => Some(crate::store::FolderStore::open(&req.target)?.lock_vm(
            &req.host,
            &req.vm,
            crate::store::LockMode::Shared,
        )?),
    };
    let mut backup = super::read_backup(req)?;
    backup.meta = chain::expand(&backup.dir, &backup.meta)?;
    let name = plan::domain_name(req, &backup.domain)?;

    // The lock of the restored name, and its journal: an interrupted one is repaired first.
    let (mut journal, previous) = Journal::open(&request.journal_dir, &name)?;
    if let Some(prev) = previous {
        return Err(RestoreError::Interrupted(format!(
            "an interrupted run left state for domain {name} (pid {}, phase {}): run \
             `vm-backup orphans --cleanup` first",
            prev.pid, prev.phase
        )));
    }
    if let Some(lock) = target_lock {
        journal.hold(lock);
    }

    let hv = Hypervisor::connect(&req.libvirt_uri)?;
    let new_uuid = uuid::Uuid::new_v4().to_string();
    let mut plan_req = req.clone();
    plan_req.start = false;
    let input = plan::PlanInput {
        request: &plan_req,
        dir: &backup.dir,
        meta: &backup.meta,
        domain: &backup.domain,
        new_uuid: &new_uuid,
    };
    let plan = plan::plan(&input, &LiveHost { hv: &hv })?;
    if plan.replaces {
        // An instant restore never replaces a definition: the copy lands beside it.
        return Err(RestoreError::Exists(plan.name.clone()));
    }
    for note in &plan.notes {
        progress.message(Level::Info, note);
    }
    let Some(first) = plan.disks.first() else {
        return Err(RestoreError::NotFound(format!(
            "{} holds no disk image to run from",
            backup.dir.display()
        )));
    };
    let dest_dir = first
        .dest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut record = InstantRecord {
        backup_dir: backup.dir.clone(),
        domain: plan.name.clone(),
        workdir: dest_dir.join(format!(".{}.vmb-instant", plan.name)),
        disks: Vec::new(),
        defined: false,
        nvram: plan.nvram.as_ref().map(|f| f.to.clone()),
        verifier: Some(request.helper.clone()),
    };
    if std::env::var(UNVERIFIED_BENCH_ENV).is_ok_and(|v| v == "1") {
        // A production binary cannot skip verification: the hook exists only in a build with
        // the `bench-unverified` feature.
        if cfg!(feature = "bench-unverified") {
            record.verifier = None;
            progress.message(
                Level::Warning,
                &format!(
                    "{UNVERIFIED_BENCH_ENV}=1: the backup is served WITHOUT the verify-on-read \
                     layer (benchmark hook)"
                ),
            );
        } else {
            progress.message(
                Level::Warning,
                &format!(
                    "{UNVERIFIED_BENCH_ENV}=1 ignored: this binary was built without the \
                     `bench-unverified` feature; every read is verified"
                ),
            );
        }
    }
    for d in &plan.disks {
        let mut layers = vec![Layer {
            path: d.from.clone(),
            format: d.record.format.clone(),
        }];
        layers.extend(d.layers.iter().map(|l| Layer {
            path: l.from.clone(),
            format: l.record.format.clone(),
        }));
        let mut overlay = d.dest.clone().into_os_string();
        overlay.push(OVERLAY_SUFFIX);
        record.disks.push(InstantDisk {
            target: d.record.target.clone(),
            layers,
            overlay: PathBuf::from(overlay),
            dest: d.dest.clone(),
            format: d.record.format.clone(),
            virtual_size: d.record.virtual_size,
        });
    }
    for d in &record.disks {
        if d.overlay.exists() && !req.force {
            return Err(RestoreError::FileExists(d.overlay.clone()));
        }
    }
    let stamp = backup.stamp.clone();
    let me = std::process::id();
    journal.update(|r| {
        r.vm = plan.name.clone();
        r.uuid = new_uuid.clone();
        r.pid = me;
        r.started_at = chrono::Utc::now().to_rfc3339();
        r.stamp = stamp.clone();
        r.phase = "instant-serving".into();
        r.instant = Some(record.clone());
    })?;
    progress.message(
        Level::Info,
        &format!(
            "instant restore of {} from {} as {}",
            backup.meta.vm_name,
            backup.dir.display(),
            plan.name
        ),
    );

    // Until the domain runs, a failure removes everything.
    let mut undo = Undo {
        record: Some(record.clone()),
        dests: Vec::new(),
        dirs: Vec::new(),
        journal: &mut journal,
        armed: true,
    };
    let started = (|| -> Result<(Dom, String), RestoreError> {
        for d in &record.disks {
            if let Some(parent) = d.dest.parent() {
                if let Some(top) = create_disk_dir(parent)? {
                    undo.dirs.push(top);
                }
            }
        }
        let io = |context, path: &Path| {
            let path = path.to_path_buf();
            move |source| RestoreError::Io {
                context,
                path,
                source,
            }
        };
        fs::create_dir_all(&record.workdir).map_err(io("cannot create", &record.workdir))?;
        fs::set_permissions(&record.workdir, fs::Permissions::from_mode(0o711))
            .map_err(io("cannot set the mode of", &record.workdir))?;
        record.serve()?;
        for d in &record.disks {
            let url = export::nbd_url(&d.target, &record.socket());
            qemu_img::create_overlay(Path::new(&url), "raw", &d.overlay, d.virtual_size)?;
            hand_to_qemu(&d.overlay)?;
        }
        if let Some(nvram) = &plan.nvram {
            copy_nofollow(&nvram.from, &nvram.to)
                .map_err(io("cannot copy the NVRAM to", &nvram.to))?;
            hand_to_qemu(&nvram.to)?;
        }
        let mut text = xml_edit::rewrite(&backup.xml_text, &plan.edits)?;
        for d in &record.disks {
            text =
                xml_edit::point_disk_at(&text, &d.target, &d.overlay.to_string_lossy(), "qcow2")?;
        }
        let uuid = xml::parse_domain(&text)?.uuid;
        if cancel.is_cancelled() {
            return Err(RestoreError::Cancelled);
        }
        let dom = hv.define(&plan.name, &text)?;
        record.defined = true;
        undo.journal.update(|r| {
            r.phase = "instant-defined".into();
            r.instant = Some(record.clone());
        })?;
        if let Err(e) = dom.start() {
            let _ = dom.undefine(crate::hv::Nvram::Keep);
            return Err(e.into());
        }
        Ok((dom, uuid))
    })();
    let (dom, uuid) = match started {
        Ok(v) => v,
        Err(e) => {
            // Whatever failed (the server reading a header, the domain's start), a damaged
            // chunk behind it is what the operator must be told.
            let damage = record.damage();
            undo.run();
            if damage.is_empty() {
                return Err(e);
            }
            return Err(damaged(
                &record,
                damage,
                "nothing was restored: everything this run created is removed".into(),
            ));
        }
    };
    let created_dirs = std::mem::take(&mut undo.dirs);
    undo.armed = false;
    let started_after = t0.elapsed().as_secs_f64();
    progress.message(
        Level::Info,
        &format!(
            "domain {} runs from the backup ({started_after:.1} s); moving its disks to local storage",
            plan.name
        ),
    );
    journal.update(|r| r.phase = "instant-running".into())?;

    // From here on a failure leaves the domain running on its overlays, journaled; but a
    // damaged chunk met by the guest or the copy abandons the restore.
    let keep = |e: RestoreError| RestoreError::Unfinished {
        domain: plan.name.clone(),
        detail: e.to_string(),
    };
    journal
        .update(|r| r.phase = "instant-copying".into())
        .map_err(|e| keep(e.into()))?;
    let tc = Instant::now();
    let copied = copy_and_pivot(&dom, &record, request.copy_bound, progress, cancel)
        .and_then(|()| settle_definition(&hv, &dom, &record));
    if let Err(e) = copied {
        let damage = record.damage();
        if damage.is_empty() {
            return Err(keep(e));
        }
        for d in &damage {
            progress.message(Level::Error, &format!("damaged backup chunk: {d}"));
        }
        let undone = match record.abandon(&hv) {
            Ok(done) => {
                for d in created_dirs.iter().rev() {
                    let _ = fs::remove_dir(d);
                }
                journal.clear()?;
                format!(
                    "the restore is abandoned, nothing was restored ({})",
                    done.join("; ")
                )
            }
            Err(a) => format!(
                "the restore could not be abandoned ({a}): `vm-backup orphans --cleanup` \
                 finishes it"
            ),
        };
        return Err(damaged(&record, damage, undone));
    }
    let copy_seconds = tc.elapsed().as_secs_f64();
    let damage = record.damage();
    for line in record.take_down().map_err(keep)? {
        progress.message(Level::Info, &line);
    }
    journal.clear()?;
    for d in &damage {
        // Met by the guest only, in a region it then overwrote: the local disk never needed
        // it, but the guest saw an I/O error there.
        progress.message(
            Level::Warning,
            &format!("the guest met a damaged backup chunk (not on the local disk): {d}"),
        );
    }
    progress.message(
        Level::Info,
        &format!(
            "domain {} now runs on local, standalone disks ({copy_seconds:.1} s of copy{})",
            plan.name,
            if record.verifier.is_some() {
                ", every chunk read checked against the manifest"
            } else {
                ", UNVERIFIED"
            }
        ),
    );
    Ok(InstantOutcome {
        backup_dir: backup.dir,
        stamp: backup.stamp,
        domain: plan.name,
        uuid,
        disks: record
            .disks
            .iter()
            .map(|d| RestoredDisk {
                target: d.target.clone(),
                path: d.dest.clone(),
                bytes: d.virtual_size,
                backing_chain: Vec::new(),
            })
            .collect(),
        started_after_seconds: started_after,
        copy_seconds,
        verified: record.verifier.is_some(),
    })
}

/// Block-copies every disk still on its overlay into its destination and pivots each when
/// ready. On failure or cancellation the jobs not yet pivoted are aborted: those disks stay
/// on their overlays (never on a half-copied image).
fn copy_and_pivot(
    dom: &Dom,
    rec: &InstantRecord,
    bound: Duration,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<(), RestoreError> {
    let check_damage = || {
        let damage = rec.damage();
        if damage.is_empty() {
            Ok(())
        } else {
            Err(damaged(rec, damage, String::new()))
        }
    };
    check_damage()?;
    let mut pending: Vec<&InstantDisk> = Vec::new();
    for d in &rec.disks {
        if on_source(dom, &d.target, &d.dest)? {
            continue;
        }
        match dom.block_job(&d.target)? {
            Some(job) if job.is_copy() => {
                progress.message(
                    Level::Info,
                    &format!("{}: the block copy already runs", d.target),
                );
            }
            Some(job) => {
                return Err(RestoreError::Libvirt(LibvirtError::Call {
                    vm: rec.domain.clone(),
                    op: format!("copying {}", d.target),
                    message: format!("a {} block job runs on it", job.kind_name()),
                }))
            }
            None => {
                // A fresh destination: whatever an interrupted copy wrote is discarded.
                let _ = fs::remove_file(&d.dest);
                qemu_img::create(&d.dest, &d.format, d.virtual_size)?;
                hand_to_qemu(&d.dest)?;
                dom.start_block_copy(&d.target, &d.dest, &d.format)?;
            }
        }
        pending.push(d);
    }
    if let Some(secs) = std::env::var(DEBUG_STALL_ENV)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        progress.message(
            Level::Warning,
            &format!("{DEBUG_STALL_ENV}={secs}: holding before the pivot (test hook)"),
        );
        std::thread::sleep(Duration::from_secs(secs));
    }
    let t0 = Instant::now();
    let abort_rest = |rest: &[&InstantDisk]| {
        for d in rest {
            let _ = dom.abort_job(&d.target);
        }
    };
    let mut last_pivot_error: Option<LibvirtError> = None;
    while !pending.is_empty() {
        if cancel.is_cancelled() {
            abort_rest(&pending);
            return Err(RestoreError::Cancelled);
        }
        if let Err(e) = check_damage() {
            abort_rest(&pending);
            return Err(e);
        }
        let mut still = Vec::new();
        for d in pending {
            let job = match dom.block_job(&d.target) {
                Ok(j) => j,
                Err(e) => {
                    abort_rest(&[d]);
                    return Err(e.into());
                }
            };
            let Some(job) = job else {
                if on_source(dom, &d.target, &d.dest)? {
                    continue;
                }
                return Err(RestoreError::Libvirt(LibvirtError::Call {
                    vm: rec.domain.clone(),
                    op: format!("copying {}", d.target),
                    message: "the block copy ended by itself and the disk is not on its \
                              destination"
                        .into(),
                }));
            };
            let elapsed = t0.elapsed();
            progress.transfer(
                &format!("copy {}", d.target),
                Transfer {
                    done: job.cur,
                    total: job.end,
                    bytes_per_sec: job.cur as f64 / elapsed.as_secs_f64().max(1e-3),
                    elapsed,
                },
            );
            // The commit's readiness rule: cur == end, or QEMU's READY in the live XML.
            let ready = (job.end > 0 && job.cur == job.end) || dom.block_job_ready(&d.target)?;
            if ready {
                match dom.pivot(&d.target) {
                    Ok(()) => {
                        progress.message(
                            Level::Info,
                            &format!("{}: pivoted to {}", d.target, d.dest.display()),
                        );
                        continue;
                    }
                    Err(e) => last_pivot_error = Some(e),
                }
            }
            still.push(d);
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if t0.elapsed() > bound {
            abort_rest(&pending);
            return Err(RestoreError::Libvirt(LibvirtError::Timeout {
                what: format!(
                    "the block copy of {}{}",
                    pending
                        .iter()
                        .map(|d| d.target.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    last_pivot_error
                        .map(|e| format!(" (last pivot error: {e})"))
                        .unwrap_or_default()
                ),
                seconds: bound.as_secs(),
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every disk is on its destination, which stands alone.
    for d in &rec.disks {
        if !on_source(dom, &d.target, &d.dest)? {
            return Err(RestoreError::Libvirt(LibvirtError::Call {
                vm: rec.domain.clone(),
                op: format!("pivoting {}", d.target),
                message: format!("the disk is not on {}", d.dest.display()),
            }));
        }
        standalone(&d.dest)?;
    }
    Ok(())
}

/// Checks that `image` has no backing file.
fn standalone(image: &Path) -> Result<(), RestoreError> {
    let chain =
        qemu_img::info_chain(image, None).map_err(|source| RestoreError::ChainUnreadable {
            path: image.to_path_buf(),
            source: Box::new(source),
        })?;
    if chain.len() != 1 {
        return Err(RestoreError::Chain {
            path: image.to_path_buf(),
            expected: vec![image.to_path_buf()],
            found: chain.iter().map(|i| PathBuf::from(&i.filename)).collect(),
        });
    }
    Ok(())
}

/// Makes the persistent definition name the destinations (a transient block job may leave
/// it on the overlays).
fn settle_definition(hv: &Hypervisor, dom: &Dom, rec: &InstantRecord) -> Result<(), RestoreError> {
    let mut text = dom.xml(true)?;
    let parsed = xml::parse_domain(&text)?;
    let mut changed = false;
    for d in &rec.disks {
        let ok = parsed
            .disks
            .iter()
            .any(|x| x.target == d.target && x.source.as_deref() == Some(d.dest.as_path()));
        if !ok {
            text = xml_edit::point_disk_at(&text, &d.target, &d.dest.to_string_lossy(), &d.format)?;
            changed = true;
        }
    }
    if changed {
        hv.define(dom.name(), &text)?;
    }
    Ok(())
}

/// Whether the live (running) or persistent (shut off) definition has `target` on `path`.
fn on_source(dom: &Dom, target: &str, path: &Path) -> Result<bool, RestoreError> {
    let live = dom.state()?.is_live();
    let parsed = dom.parsed(!live)?;
    Ok(parsed
        .disks
        .iter()
        .any(|d| d.target == target && d.source.as_deref() == Some(path)))
}

/// One line describing an interrupted instant restore (for `vm-backup orphans`).
pub fn describe(rec: &InstantRecord) -> String {
    let server = if rec.server_pid().is_some() {
        "serving"
    } else {
        "not running"
    };
    let verified = match &rec.verifier {
        Some(_) if export::is_mounted(&rec.layers_dir()) => format!(
            ", verify-on-read folder {} mounted",
            rec.layers_dir().display()
        ),
        Some(_) => ", verify-on-read folder not mounted".to_string(),
        None => ", unverified".to_string(),
    };
    format!(
        "instant restore of {} from {} (backup server {server}{verified}); disks: {}",
        rec.domain,
        rec.backup_dir.display(),
        rec.disks
            .iter()
            .map(|d| format!(
                "{} overlay {} -> {}",
                d.target,
                d.overlay.display(),
                d.dest.display()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Finishes (or cleans up) an interrupted instant restore; the caller holds the lock of the
/// restored name. A running domain gets its disks copied and pivoted; a shut-off one gets
/// each overlay flattened into its destination (`qemu-img convert`) and its definition
/// pointed there; a domain never defined gets its files removed. Returns what was done.
pub fn repair(
    hv: &Hypervisor,
    rec: &InstantRecord,
    copy_bound: Duration,
    progress: &dyn Progress,
) -> Result<Vec<String>, RestoreError> {
    match finish(hv, rec, copy_bound, progress) {
        Ok(actions) => Ok(actions),
        Err(e) => {
            let damage = rec.damage();
            if damage.is_empty() {
                return Err(e);
            }
            // A damaged backup never becomes the domain's disk: the restore is abandoned.
            let mut actions = vec![format!(
                "the backup is damaged ({}): the instant restore of {} is abandoned, nothing \
                 was restored",
                damage
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
                rec.domain
            )];
            actions.extend(rec.abandon(hv)?);
            Ok(actions)
        }
    }
}

/// [`repair`] on an undamaged backup.
fn finish(
    hv: &Hypervisor,
    rec: &InstantRecord,
    copy_bound: Duration,
    progress: &dyn Progress,
) -> Result<Vec<String>, RestoreError> {
    let mut actions = Vec::new();
    let dom = hv.find_domain(&rec.domain)?;
    let Some(dom) = dom.filter(|_| rec.defined) else {
        for d in &rec.disks {
            let _ = fs::remove_file(&d.dest);
        }
        if let Some(n) = &rec.nvram {
            let _ = fs::remove_file(n);
        }
        actions.extend(rec.take_down()?);
        actions.push(format!(
            "domain {} was never defined: its files removed",
            rec.domain
        ));
        return Ok(actions);
    };
    let on_overlay = rec
        .disks
        .iter()
        .map(|d| on_source(&dom, &d.target, &d.overlay))
        .collect::<Result<Vec<_>, _>>()?;
    if on_overlay.iter().any(|b| *b) {
        rec.serve()?;
        if dom.state()?.is_live() {
            copy_and_pivot(&dom, rec, copy_bound, progress, &CancelToken::new())?;
            actions.push(format!(
                "block copy of {} finished and pivoted to local disks",
                rec.domain
            ));
        } else {
            let mut text = dom.xml(true)?;
            for (d, on) in rec.disks.iter().zip(&on_overlay) {
                if !on {
                    continue;
                }
                let _ = fs::remove_file(&d.dest);
                qemu_img::convert_flat(&d.overlay, &d.dest, &d.format)?;
                hand_to_qemu(&d.dest)?;
                standalone(&d.dest)?;
                text = xml_edit::point_disk_at(
                    &text,
                    &d.target,
                    &d.dest.to_string_lossy(),
                    &d.format,
                )?;
                actions.push(format!(
                    "{}: overlay flattened offline into {}",
                    d.target,
                    d.dest.display()
                ));
            }
            hv.define(&rec.domain, &text)?;
        }
    }
    settle_definition(hv, &dom, rec)?;
    for d in &rec.disks {
        if on_source(&dom, &d.target, &d.overlay)? {
            return Err(RestoreError::Unfinished {
                domain: rec.domain.clone(),
                detail: format!("{} is still on {}", d.target, d.overlay.display()),
            });
        }
    }
    actions.extend(rec.take_down()?);
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_names_its_socket_in_the_workdir() {
        let rec = InstantRecord {
            backup_dir: "/t/h/web/2026-11-29-120000".into(),
            domain: "web-now".into(),
            workdir: "/r/.web-now.vmb-instant".into(),
            disks: vec![InstantDisk {
                target: "vda".into(),
                layers: vec![Layer {
                    path: "/t/h/web/2026-11-29-120000/web-vda.qcow2".into(),
                    format: "qcow2".into(),
                }],
                overlay: "/r/web-now-vda.qcow2.vmb-instant.qcow2".into(),
                dest: "/r/web-now-vda.qcow2".into(),
                format: "qcow2".into(),
                virtual_size: 1 << 30,
            }],
            defined: false,
            nvram: None,
            verifier: Some("/usr/bin/vm-backup".into()),
        };
        let text = serde_json::to_string(&rec).unwrap();
        let back: InstantRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, rec);
        assert_eq!(
            back.socket(),
            PathBuf::from("/r/.web-now.vmb-instant/nbd.sock")
        );
        assert!(describe(&rec).contains("vda overlay /r/web-now-vda.qcow2.vmb-instant.qcow2"));
        // No server runs for a folder that does not exist.
        assert!(rec.server_pid().is_none());
    }

    #[test]
    fn a_parents_image_is_named_without_dot_dot() {
        assert_eq!(
            lexically_normal(Path::new(
                "/t/h/vm/2026-01-02-000000/../2026-01-01-000000/vm-vda.qcow2"
            )),
            PathBuf::from("/t/h/vm/2026-01-01-000000/vm-vda.qcow2")
        );
        assert_eq!(lexically_normal(Path::new("/a/./b")), PathBuf::from("/a/b"));
    }

    #[test]
    fn the_nbd_server_exports_each_chain_read_only() {
        let layers = vec![
            Layer {
                path: "/b/inc.qcow2".into(),
                format: "qcow2".into(),
            },
            Layer {
                path: "/b/full.qcow2".into(),
                format: "qcow2".into(),
            },
        ];
        let args = export::qsd_nbd_args(
            &[("vda".into(), layers)],
            Path::new("/w/nbd.sock"),
            Path::new("/w/qsd.pid"),
        );
        let all = args.join(" ");
        assert!(all.contains(r#""backing":"d0n1""#), "{all}");
        assert!(all.contains(r#""writable":false"#), "{all}");
        assert!(!all.contains(r#""read-only":false"#), "{all}");
        assert_eq!(all.matches(r#""read-only":true"#).count(), 4, "{all}");
        assert_eq!(
            export::nbd_url("vda", Path::new("/w/nbd.sock")),
            "nbd+unix:///vda?socket=/w/nbd.sock"
        );
    }
}
