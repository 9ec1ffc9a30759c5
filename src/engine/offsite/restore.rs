//! `offsite restore`: restores a VM from the off-site store without a staging copy.
//!
//! The backup's manifest (and, for an incremental, its parents' manifests) give the metadata,
//! the domain XML and the chunk list of every file. The restore is then the folder restore's
//! own plan and apply ([`crate::engine::restore::plan`], [`apply::apply_from`]), with the
//! off-site store as the [`BackupSource`]: each disk image is streamed chunk by chunk, in
//! order, straight into its temporary file beside its final path (`.<name>.vmb-restore`, the
//! same guard the folder restore uses): a few threads download, decrypt and check chunks
//! (the GCM tag, the keyed id, the SHA-256 the backup recorded), the writer puts them in
//! place in file order, with at most `2 × workers` chunks in memory, and hashes the whole file
//! on the way. A damaged or missing chunk, a cancel or any error stops the restore, and the
//! guard removes every temporary file and folder it created; the files are renamed into
//! place only after every chunk of every disk (and its backing layers) has been checked, and
//! the domain is defined after that. Nothing is written on the backup share, and there is
//! no second copy of the backup on the restore host.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::Digest;

use super::{backup_name, sha256_hex, OffsiteRunError};
use crate::engine::restore::apply::{self, BackupSource};
use crate::engine::restore::plan::{self, normalize, HostView, PlanInput};
use crate::engine::restore::{
    chain, LiveHost, RestoreError, RestoreOutcome, RestoreRequest, StampChoice,
};
use crate::engine::verify::{FileCheck, VerifyReport};
use crate::format::layout;
use crate::format::metadata::BackupMetadata;
use crate::hv::{xml, Hypervisor};
use crate::progress::{CancelToken, Level, Progress, Transfer};
use crate::store::offsite::{OffsiteError, OffsiteFile, OffsiteManifest, OffsiteStore};

/// The folder the plan names the off-site backup's files under. It never exists: a path
/// under it is only a key into the manifests (see [`OffsiteHost`]).
const VIRTUAL_ROOT: &str = "/.vm-backup-offsite";

/// What to restore from off-site, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsiteRestoreRequest {
    /// The hypervisor folder the backup is under.
    pub host: String,
    /// The VM.
    pub vm: String,
    /// Which backup.
    pub stamp: StampChoice,
    /// Restore under this name (`--as`).
    pub new_name: Option<String>,
    /// Put the disks here (`--disk-dir`; else where they were).
    pub disk_dir: Option<PathBuf>,
    /// Start the domain once defined.
    pub start: bool,
    /// The libvirt connection URI.
    pub libvirt_uri: String,
    /// Download threads (the chunks in memory are at most twice as many).
    pub workers: usize,
}

/// Restores a VM from the off-site store; see the module documentation.
pub fn restore(
    store: &OffsiteStore,
    request: &OffsiteRestoreRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<RestoreOutcome, OffsiteRunError> {
    let started = Instant::now();
    let host = layout::safe_component(&request.host)?;
    let vm = layout::safe_component(&request.vm)?;
    let stamp = match &request.stamp {
        StampChoice::Stamp(s) => s.clone(),
        StampChoice::Latest => store
            .backups()?
            .into_iter()
            .filter(|(h, v, _)| *h == host && *v == vm)
            .map(|(_, _, s)| s)
            .next_back()
            .ok_or_else(|| OffsiteRunError::NotFound(format!("of {host}/{vm}")))?,
    };
    let chain_manifests = manifests_of_chain(store, &host, &vm, &stamp)?;
    let metas = chain_manifests
        .iter()
        .map(metadata_of)
        .collect::<Result<Vec<_>, _>>()?;
    let top = &chain_manifests[0];
    let name = backup_name(&host, &vm, &stamp);
    progress.message(
        Level::Info,
        &format!("restoring {} from off-site {name}", metas[0].vm_name),
    );

    let source = OffsiteSource::new(store, &host, &vm, &chain_manifests, request.workers)?;
    let dir = source.root.join(&stamp);

    // The domain XML, small: read whole and checked.
    let xml_name = layout::xml_file_name(&metas[0].vm_name)?;
    let xml_bytes = source.read_small(&dir.join(&xml_name))?;
    let xml_text = String::from_utf8(xml_bytes).map_err(|e| OffsiteRunError::Damaged {
        backup: name.clone(),
        file: xml_name.clone(),
        chunk: 0,
        id: String::new(),
        reason: format!("not UTF-8: {e}"),
    })?;
    let domain = xml::parse_domain(&xml_text).map_err(|e| into_run(RestoreError::from(e)))?;
    let meta = chain::expand_with(&metas[0], &metas[1..]).map_err(into_run)?;
    for d in &meta.skipped_disks {
        progress.message(
            Level::Warning,
            &format!("disk {} was not backed up ({})", d.target, d.reason),
        );
    }

    // Plan against libvirt and the files as they are, as the folder restore does.
    let mut req = RestoreRequest::new(VIRTUAL_ROOT, &host, &vm, StampChoice::Stamp(stamp.clone()));
    req.backup_dir = Some(dir.clone());
    req.new_name = request.new_name.clone();
    req.disk_dir = request.disk_dir.clone();
    req.start = request.start;
    req.libvirt_uri = request.libvirt_uri.clone();
    plan::domain_name(&req, &domain).map_err(into_run)?;
    let hv = Hypervisor::connect(&req.libvirt_uri).map_err(|e| into_run(e.into()))?;
    let new_uuid = uuid::Uuid::new_v4().to_string();
    let input = PlanInput {
        request: &req,
        dir: &dir,
        meta: &meta,
        domain: &domain,
        new_uuid: &new_uuid,
    };
    let host_view = OffsiteHost {
        live: LiveHost { hv: &hv },
        source: &source,
    };
    let plan = plan::plan(&input, &host_view).map_err(into_run)?;
    for note in &plan.notes {
        progress.message(Level::Info, note);
    }

    // Apply: every file streamed from the store into its temporary name, then renamed.
    let applied =
        apply::apply_from(&plan, &xml_text, &hv, &source, progress, cancel).map_err(into_run)?;
    progress.message(
        Level::Info,
        &format!(
            "domain {} defined{}",
            plan.name,
            if applied.started { " and started" } else { "" }
        ),
    );
    let checks = source.checked.lock().map(|c| c.clone()).unwrap_or_default();
    let bytes = checks.iter().map(|(_, b)| *b).sum();
    Ok(RestoreOutcome {
        backup_dir: dir,
        stamp,
        domain: plan.name,
        uuid: applied.uuid,
        disks: applied.disks,
        nvram: plan.nvram.map(|f| f.to),
        configs: plan.configs.map(|f| f.to),
        replaced: applied.replaced,
        started: applied.started,
        verify: VerifyReport {
            dir: PathBuf::from(store.location()).join(OffsiteStore::manifest_key(
                &top.host, &top.vm, &top.stamp,
            )),
            host,
            vm: metas[0].vm_name.clone(),
            stamp: top.stamp.clone(),
            checks: checks
                .into_iter()
                .map(|(file, bytes)| FileCheck {
                    file,
                    check: "off-site chunks".into(),
                    ok: true,
                    detail: format!(
                        "{bytes} bytes: every chunk's tag, id and SHA-256, and the whole file's SHA-256"
                    ),
                    bad_chunk: None,
                })
                .collect(),
            ok: true,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        },
    })
}

/// The manifests of the backup and of its parents, newest first, up to the full.
fn manifests_of_chain(
    store: &OffsiteStore,
    host: &str,
    vm: &str,
    stamp: &str,
) -> Result<Vec<OffsiteManifest>, OffsiteRunError> {
    let mut chain = Vec::new();
    let mut next = Some(stamp.to_string());
    while let Some(s) = next.take() {
        if chain.len() > 1000 {
            return Err(OffsiteRunError::NotFound(format!(
                "the chain of {} does not end in a full",
                backup_name(host, vm, stamp)
            )));
        }
        let m = match store.get_manifest(host, vm, &s) {
            Ok(m) => m,
            Err(OffsiteError::Missing(_)) => {
                return Err(OffsiteRunError::NotFound(backup_name(host, vm, &s)))
            }
            Err(e) => return Err(e.into()),
        };
        next = m.parent();
        chain.push(m);
    }
    Ok(chain)
}

/// The backup's metadata, from its manifest; names checked as when read from a folder.
fn metadata_of(m: &OffsiteManifest) -> Result<BackupMetadata, OffsiteRunError> {
    let key = OffsiteStore::manifest_key(&m.host, &m.vm, &m.stamp);
    let meta: BackupMetadata =
        serde_json::from_str(&m.metadata_json).map_err(|source| OffsiteError::Json {
            action: "decode the metadata in",
            what: key,
            source,
        })?;
    meta.check_names()?;
    if meta.stamp != m.stamp {
        return Err(OffsiteRunError::NotFound(format!(
            "{}: its metadata is of the backup {}",
            backup_name(&m.host, &m.vm, &m.stamp),
            meta.stamp
        )));
    }
    Ok(meta)
}

/// A restore error as the off-site error it carries, if it carries one.
fn into_run(e: RestoreError) -> OffsiteRunError {
    match e {
        RestoreError::Source { error, kind } => match error.downcast::<OffsiteRunError>() {
            Ok(run) => *run,
            Err(error) => OffsiteRunError::Restore(Box::new(RestoreError::Source { kind, error })),
        },
        e => OffsiteRunError::Restore(Box::new(e)),
    }
}

/// An off-site error as the restore's.
fn into_restore(e: OffsiteRunError) -> RestoreError {
    match e {
        OffsiteRunError::Cancelled => RestoreError::Cancelled,
        e => RestoreError::Source {
            kind: e.kind(),
            error: Box::new(e),
        },
    }
}

/// One file of the chain: which backup, and its manifest entry.
struct Entry<'a> {
    manifest: &'a OffsiteManifest,
    file: &'a OffsiteFile,
}

/// The off-site store as the source of a restore: the files of the backup and its parents,
/// named by their (virtual) path in the backup folder.
struct OffsiteSource<'a> {
    store: &'a OffsiteStore,
    root: PathBuf,
    files: BTreeMap<PathBuf, Entry<'a>>,
    workers: usize,
    /// Every file written so far, with its size (for the report).
    checked: std::sync::Mutex<Vec<(String, u64)>>,
}

impl<'a> OffsiteSource<'a> {
    fn new(
        store: &'a OffsiteStore,
        host: &str,
        vm: &str,
        chain: &'a [OffsiteManifest],
        workers: usize,
    ) -> Result<Self, OffsiteRunError> {
        let root = Path::new(VIRTUAL_ROOT).join(host).join(vm);
        let mut files = BTreeMap::new();
        for m in chain {
            for f in &m.files {
                let mut path = root.join(layout::parse_stamp(&m.stamp).map(|_| &m.stamp)?);
                for part in f.name.split('/') {
                    path.push(layout::plain_file_name(part)?);
                }
                files.insert(
                    path,
                    Entry {
                        manifest: m,
                        file: f,
                    },
                );
            }
        }
        Ok(Self {
            store,
            root,
            files,
            workers: workers.clamp(1, 32),
            checked: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn entry(&self, from: &Path) -> Result<&Entry<'a>, OffsiteRunError> {
        self.files.get(&normalize(from)).ok_or_else(|| {
            OffsiteRunError::NotFound(format!(
                "{} (not in the off-site manifests)",
                from.strip_prefix(&self.root).unwrap_or(from).display()
            ))
        })
    }

    /// A small file (XML, NVRAM, a configuration), read whole and checked.
    fn read_small(&self, from: &Path) -> Result<Vec<u8>, OffsiteRunError> {
        let e = self.entry(from)?;
        let mut out = Vec::with_capacity(e.file.size as usize);
        for i in 0..e.file.chunks.len() {
            out.extend_from_slice(&fetch(self.store, e, i)?);
        }
        let name = backup_name(&e.manifest.host, &e.manifest.vm, &e.manifest.stamp);
        check_whole(&name, e.file, &sha256_hex(&out))?;
        Ok(out)
    }

    /// Writes a small file to `to` (mode 0600, never through a symlink).
    fn write_small(&self, from: &Path, to: &Path) -> Result<(), OffsiteRunError> {
        let bytes = self.read_small(from)?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(to)
            .map_err(|e| OffsiteRunError::io("create", to, e))?;
        file.write_all_at(&bytes, 0)
            .and_then(|_| file.sync_all())
            .map_err(|e| OffsiteRunError::io("write", to, e))
    }

    /// Streams an image into `tmp`: see the module documentation.
    #[allow(clippy::too_many_arguments)]
    fn stream_image(
        &self,
        from: &Path,
        tmp: &Path,
        manifest: &crate::copier::ChunkManifest,
        force: bool,
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<u64, OffsiteRunError> {
        let e = self.entry(from)?;
        let f = e.file;
        let name = backup_name(&e.manifest.host, &e.manifest.vm, &e.manifest.stamp);
        let chunk_len = |i: usize| f.chunk_size.min(f.size - i as u64 * f.chunk_size);
        if f.chunk_size == 0 || f.size.div_ceil(f.chunk_size) != f.chunks.len() as u64 {
            return Err(damaged(
                &name,
                f,
                0,
                "",
                "the manifest's chunk list does not cover the file".into(),
            ));
        }
        // The off-site manifest must agree with the backup's own chunk manifest.
        if !force && manifest.chunk_size == f.chunk_size && manifest.file_size == f.size {
            let zero = sha256_hex(&vec![0u8; f.chunk_size as usize]);
            for (i, (c, d)) in f.chunks.iter().zip(&manifest.digests).enumerate() {
                let mine = match c {
                    Some(c) => c.sha256.clone(),
                    None if chunk_len(i) == f.chunk_size => zero.clone(),
                    None => sha256_hex(&vec![0u8; chunk_len(i) as usize]),
                };
                if !mine.eq_ignore_ascii_case(d) {
                    return Err(damaged(
                        &name,
                        f,
                        i,
                        c.as_ref().map(|c| c.id.as_str()).unwrap_or(""),
                        format!("the manifest records SHA-256 {mine}, the backup's metadata {d}"),
                    ));
                }
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
            .map_err(|e| OffsiteRunError::io("create", tmp, e))?;
        file.set_len(f.size)
            .map_err(|e| OffsiteRunError::io("size", tmp, e))?;

        let n = f.chunks.len();
        let window = 2 * self.workers;
        let abort = AtomicBool::new(false);
        let started = Instant::now();
        let mut whole = sha2::Sha256::new();
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<usize>();
        let (res_tx, res_rx) =
            crossbeam_channel::unbounded::<(usize, Result<Vec<u8>, OffsiteRunError>)>();
        let result = std::thread::scope(|scope| {
            for _ in 0..self.workers {
                let (rx, tx, abort) = (job_rx.clone(), res_tx.clone(), &abort);
                scope.spawn(move || {
                    for i in rx.iter() {
                        if abort.load(Ordering::Relaxed) {
                            continue;
                        }
                        if tx.send((i, fetch(self.store, e, i))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(res_tx);
            let mut write = || -> Result<(), OffsiteRunError> {
                let mut pending: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
                let (mut next_dispatch, mut next_write) = (0usize, 0usize);
                let mut zeros: Vec<u8> = Vec::new();
                while next_write < n {
                    if cancel.is_cancelled() {
                        return Err(OffsiteRunError::Cancelled);
                    }
                    // At most `window` chunks between the writer and the downloads.
                    while next_dispatch < n && next_dispatch < next_write + window {
                        if f.chunks[next_dispatch].is_some() {
                            job_tx
                                .send(next_dispatch)
                                .map_err(|_| OffsiteRunError::Cancelled)?;
                        }
                        next_dispatch += 1;
                    }
                    let off = next_write as u64 * f.chunk_size;
                    let len = chunk_len(next_write);
                    if f.chunks[next_write].is_none() {
                        // A hole: set_len left zeros; the whole-file hash still counts them.
                        zeros.resize(len as usize, 0);
                        whole.update(&zeros);
                    } else if let Some(data) = pending.remove(&next_write) {
                        file.write_all_at(&data, off)
                            .map_err(|e| OffsiteRunError::io("write", tmp, e))?;
                        whole.update(&data);
                    } else {
                        match res_rx.recv_timeout(Duration::from_millis(500)) {
                            Ok((i, r)) => {
                                pending.insert(i, r?);
                            }
                            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                                return Err(OffsiteRunError::Cancelled)
                            }
                        }
                        continue;
                    }
                    next_write += 1;
                    let done = off + len;
                    let elapsed = started.elapsed();
                    progress.transfer(
                        &format!("{name}/{}", f.name),
                        Transfer {
                            done,
                            total: f.size,
                            bytes_per_sec: done as f64 / elapsed.as_secs_f64().max(1e-3),
                            elapsed,
                        },
                    );
                }
                Ok(())
            };
            let r = write();
            abort.store(true, Ordering::Relaxed);
            drop(job_tx);
            r
        });
        result?;
        file.sync_all()
            .map_err(|e| OffsiteRunError::io("sync", tmp, e))?;
        check_whole(&name, f, &hex::encode(whole.finalize()))?;
        if let Ok(mut c) = self.checked.lock() {
            c.push((format!("{}/{}", e.manifest.stamp, f.name), f.size));
        }
        Ok(f.size)
    }
}

/// Downloads, decrypts and checks chunk `i` of the file `e`: its id (inside
/// [`OffsiteStore::get_chunk`]), its length and the SHA-256 the backup recorded.
fn fetch(store: &OffsiteStore, e: &Entry<'_>, i: usize) -> Result<Vec<u8>, OffsiteRunError> {
    let f = e.file;
    let name = backup_name(&e.manifest.host, &e.manifest.vm, &e.manifest.stamp);
    let len = f
        .chunk_size
        .min(f.size.saturating_sub(i as u64 * f.chunk_size));
    let Some(c) = &f.chunks[i] else {
        return Ok(vec![0u8; len as usize]);
    };
    let id = c
        .chunk_id()
        .ok_or_else(|| damaged(&name, f, i, &c.id, "malformed chunk id".into()))?;
    let plain = match store.get_chunk(&id) {
        Ok(p) => p,
        Err(e @ (OffsiteError::Corrupt { .. } | OffsiteError::Missing(_))) => {
            return Err(damaged(&name, f, i, &c.id, e.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    let sha = sha256_hex(&plain);
    if sha != c.sha256 || plain.len() as u64 != len {
        return Err(damaged(
            &name,
            f,
            i,
            &c.id,
            format!(
                "SHA-256 {sha} ({} bytes), expected {} ({len} bytes)",
                plain.len(),
                c.sha256
            ),
        ));
    }
    Ok(plain)
}

fn damaged(
    backup: &str,
    f: &OffsiteFile,
    chunk: usize,
    id: &str,
    reason: String,
) -> OffsiteRunError {
    OffsiteRunError::Damaged {
        backup: backup.to_string(),
        file: f.name.clone(),
        chunk: chunk as u64,
        id: id.to_string(),
        reason,
    }
}

/// Checks a whole file's SHA-256 against the one its backup recorded, when it recorded one.
fn check_whole(backup: &str, f: &OffsiteFile, actual: &str) -> Result<(), OffsiteRunError> {
    match &f.sha256 {
        Some(expected) if !expected.eq_ignore_ascii_case(actual) => Err(OffsiteRunError::Damaged {
            backup: backup.to_string(),
            file: f.name.clone(),
            chunk: 0,
            id: String::new(),
            reason: format!("whole-file SHA-256 {actual}, expected {expected}"),
        }),
        _ => Ok(()),
    }
}

impl BackupSource for OffsiteSource<'_> {
    fn image(
        &self,
        from: &Path,
        tmp: &Path,
        _dest: &Path,
        manifest: &crate::copier::ChunkManifest,
        _sha256: &str,
        force: bool,
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<apply::CopiedImage, RestoreError> {
        // The stream checks every chunk and the whole file itself, and fails on damage.
        let size = self
            .stream_image(from, tmp, manifest, force, progress, cancel)
            .map_err(into_restore)?;
        Ok(apply::CopiedImage { size, check: None })
    }

    fn file(&self, from: &Path, to: &Path) -> Result<(), RestoreError> {
        self.write_small(from, to).map_err(into_restore)
    }

    fn tree(&self, from: &Path, to: &Path) -> Result<(), RestoreError> {
        let from = normalize(from);
        let mut made = BTreeSet::new();
        for path in self
            .files
            .keys()
            .filter(|p| p.starts_with(&from) && **p != from)
        {
            let rel = path.strip_prefix(&from).unwrap_or(path);
            let dest = to.join(rel);
            if let Some(parent) = dest.parent() {
                if made.insert(parent.to_path_buf()) {
                    std::fs::create_dir_all(parent).map_err(|source| RestoreError::Io {
                        context: "cannot create",
                        path: parent.to_path_buf(),
                        source,
                    })?;
                }
            }
            self.write_small(path, &dest).map_err(into_restore)?;
        }
        Ok(())
    }
}

/// The host as the plan sees it: paths under the virtual backup folder are answered from the
/// manifests, everything else by the live host.
struct OffsiteHost<'a, 'b> {
    live: LiveHost<'a>,
    source: &'a OffsiteSource<'b>,
}

impl OffsiteHost<'_, '_> {
    fn is_virtual(&self, path: &Path) -> bool {
        path.starts_with(&self.source.root)
    }
}

impl HostView for OffsiteHost<'_, '_> {
    fn exists(&self, path: &Path) -> bool {
        if self.is_virtual(path) {
            return self.is_file(path) || self.is_dir(path);
        }
        self.live.exists(path)
    }

    fn is_file(&self, path: &Path) -> bool {
        if self.is_virtual(path) {
            return self.source.files.contains_key(&normalize(path));
        }
        self.live.is_file(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        if self.is_virtual(path) {
            let p = normalize(path);
            return self
                .source
                .files
                .keys()
                .any(|k| k.starts_with(&p) && *k != p);
        }
        self.live.is_dir(path)
    }

    fn sha256(&self, path: &Path) -> Option<String> {
        self.live.sha256(path)
    }

    fn canonical(&self, path: &Path) -> PathBuf {
        self.live.canonical(path)
    }

    fn domain_active(&self, name: &str) -> Result<Option<bool>, RestoreError> {
        self.live.domain_active(name)
    }

    fn disks_of_other_domains(
        &self,
        except: &str,
    ) -> Result<BTreeMap<PathBuf, String>, RestoreError> {
        self.live.disks_of_other_domains(except)
    }

    fn chain_files_of(&self, disks: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
        self.live.chain_files_of(disks)
    }
}
