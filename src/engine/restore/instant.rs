//! Instant restore (`vm-backup restore <vm> <stamp> --instant`): the VM runs at once from the
//! backup, and its disks move to local storage while it runs.
//!
//! 1. `qemu-storage-daemon` (root, daemonized) opens each disk's image in the backup folder and
//!    its chain (incrementals: the parents' images) **read-only** (`read-only=on`,
//!    `locking=off`, the chain given explicitly so the headers' recorded names are never
//!    followed), and exports the guest-visible disks over NBD on a unix socket in a work
//!    folder beside the restored disks. QEMU (not root) reaches the backup only through that
//!    socket, so libvirt never labels (chowns) a file of the backup.
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
//! [`InstantRecord`]) before each step, under that name's lock. A failure before the domain
//! runs removes everything it created; a failure after leaves the domain running on its
//! overlays (block jobs aborted: never on a half-copied disk) with the server up and the
//! journal kept; `vm-backup orphans` reports it and `orphans --cleanup` finishes it
//! ([`repair`]: copy and pivot when running, `qemu-img convert` of the overlay when shut off).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::apply::{copy_nofollow, create_disk_dir, hand_to_qemu};
use super::{chain, plan, LiveHost, RestoreError, RestoreRequest, RestoredDisk};
use crate::engine::backup::journal::Journal;
use crate::engine::verify::{self, VerifyOptions, VerifyReport};
use crate::hv::export::{self, Layer};
use crate::hv::{qemu_img, xml, xml_edit, Dom, Hypervisor, LibvirtError};
use crate::progress::{CancelToken, Level, Progress, Transfer};

/// The suffix of an instant restore's overlay, beside its destination image.
pub const OVERLAY_SUFFIX: &str = ".vmb-instant.qcow2";

/// How long the block copies may take by default (a repair by `orphans --cleanup` too).
pub const DEFAULT_COPY_BOUND: Duration = Duration::from_secs(24 * 3600);

/// The environment variable that makes the restore wait this many seconds once the block
/// copies are started (a test hook: a test kills the command during the copy).
pub const DEBUG_STALL_ENV: &str = "VMB_TEST_INSTANT_STALL_SECS";

/// An instant restore to run.
#[derive(Debug, Clone)]
pub struct InstantRequest {
    /// Which backup, the new name (`--as`), the disk folder (`--disk-dir`), `force`, the URI.
    pub restore: RestoreRequest,
    /// The journal folder (the restore is journaled under the restored domain's name).
    pub journal_dir: PathBuf,
    /// How long the block copies may take to be ready.
    pub copy_bound: Duration,
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

    /// Starts the NBD server of the backup (read-only), unless it runs already.
    fn serve(&self) -> Result<(), RestoreError> {
        if self.server_pid().is_some() {
            return Ok(());
        }
        let _ = fs::remove_file(self.socket());
        let disks: Vec<(String, Vec<Layer>)> = self
            .disks
            .iter()
            .map(|d| (d.target.clone(), d.layers.clone()))
            .collect();
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

    /// Stops the server and removes the overlays and the work folder.
    fn take_down(&self) -> Vec<String> {
        let mut done = Vec::new();
        if let Some(pid) = self.server_pid() {
            export::stop_process(pid, &self.workdir.to_string_lossy(), Duration::from_secs(5));
            done.push(format!("backup server (pid {pid}) stopped"));
        }
        for d in &self.disks {
            if fs::remove_file(&d.overlay).is_ok() {
                done.push(format!("overlay {} removed", d.overlay.display()));
            }
        }
        let _ = fs::remove_dir_all(&self.workdir);
        done
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
    /// The verification of the backup made while the domain ran.
    pub verify: VerifyReport,
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
            rec.take_down();
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
    let parents = chain::parent_dirs(&backup.dir, &backup.meta)?;
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
    };
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
            undo.run();
            return Err(e);
        }
    };
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

    // From here on a failure leaves the domain running on its overlays, journaled.
    let keep = |e: RestoreError| RestoreError::Unfinished {
        domain: plan.name.clone(),
        detail: e.to_string(),
    };
    // The backup is verified (every chunk against its manifest, the chain included) while the
    // domain already runs; a damaged backup is never made the domain's standalone disk.
    let mut report =
        verify::verify_backup(&backup.dir, &VerifyOptions::default(), progress, cancel)
            .map_err(|e| keep(e.into()))?;
    for p in &parents {
        let r = verify::verify_backup(p, &VerifyOptions::default(), progress, cancel)
            .map_err(|e| keep(e.into()))?;
        if !r.ok {
            report = r;
            break;
        }
    }
    if !report.ok && !req.force {
        return Err(keep(RestoreError::Damaged {
            dir: backup.dir.clone(),
            detail: report.summary(),
        }));
    }
    journal
        .update(|r| r.phase = "instant-copying".into())
        .map_err(|e| keep(e.into()))?;
    let tc = Instant::now();
    copy_and_pivot(&dom, &record, request.copy_bound, progress, cancel).map_err(keep)?;
    let copy_seconds = tc.elapsed().as_secs_f64();
    settle_definition(&hv, &dom, &record).map_err(keep)?;
    for line in record.take_down() {
        progress.message(Level::Info, &line);
    }
    journal.clear()?;
    progress.message(
        Level::Info,
        &format!(
            "domain {} now runs on local, standalone disks ({copy_seconds:.1} s of copy)",
            plan.name
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
        verify: report,
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
    format!(
        "instant restore of {} from {} (backup server {server}); disks: {}",
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
    let mut actions = Vec::new();
    let dom = hv.find_domain(&rec.domain)?;
    let Some(dom) = dom.filter(|_| rec.defined) else {
        for d in &rec.disks {
            let _ = fs::remove_file(&d.dest);
        }
        if let Some(n) = &rec.nvram {
            let _ = fs::remove_file(n);
        }
        actions.extend(rec.take_down());
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
    actions.extend(rec.take_down());
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
