//! `offsite push`: copies published backups off-site, chunk by chunk.
//!
//! For each backup not yet off-site (no manifest there), oldest first: every chunk of every
//! disk image is read from the primary target and its SHA-256 checked against the backup's
//! chunk manifest BEFORE anything is sent (a backup altered on the primary never propagates);
//! the other files are checked against `checksums.sha256`. A chunk whose keyed id is already
//! in the store is not sent again; an all-zero chunk is not stored at all. New chunks are
//! compressed, encrypted and uploaded by a few worker threads fed through a bounded queue, so
//! memory stays at about (workers × 2 + 1) chunks. The manifest is written last: until then
//! the backup is not listed, and a push killed half-way leaves only chunks, which the next
//! push finds present and does not send again.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use super::{backup_name, sha256_hex, OffsiteRunError};
use crate::format::layout::{self, VmDir};
use crate::format::metadata::BackupMetadata;
use crate::progress::{CancelToken, Level, Progress, Transfer};
use crate::store::offsite::manifest::{OffsiteChunk, MANIFEST_VERSION};
use crate::store::offsite::{
    lock, ChunkId, LockSupport, ObjectLock, OffsiteError, OffsiteFile, OffsiteManifest,
    OffsiteStore,
};
use crate::store::{FolderStore, LockMode};

/// The chunk size of files that have no chunk manifest (XML, NVRAM, configs).
const SMALL_FILE_CHUNK: u64 = 4 << 20;

/// Which VMs to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every VM of the host.
    All,
    /// These VMs.
    Vms(Vec<String>),
}

/// Settings of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOptions {
    /// Upload threads.
    pub workers: usize,
    /// Push only the newest backup of each VM (with its parents, for an incremental).
    pub latest_only: bool,
    /// Put every uploaded object under S3 Object Lock (COMPLIANCE) for this many days, and
    /// extend the retention of the chunks already there that a pushed backup references.
    /// The bucket's support is checked before anything is uploaded.
    pub object_lock_days: Option<u32>,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            workers: 4,
            latest_only: false,
            object_lock_days: None,
        }
    }
}

/// What the push did with one backup.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PushedBackup {
    /// `host/vm/stamp`.
    pub backup: String,
    /// Already off-site before this run (nothing done), or skipped (see `skipped`).
    pub already: bool,
    /// Why it was not pushed, when skipped (failed backup, failed verification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Chunks of its files.
    pub chunks: u64,
    /// Of which all zero (not stored).
    pub zero_chunks: u64,
    /// Of which already in the store (deduplicated).
    pub present_chunks: u64,
    /// Of which uploaded now.
    pub uploaded_chunks: u64,
    /// Logical bytes of its files.
    pub bytes: u64,
    /// Plaintext bytes of the chunks uploaded now.
    pub uploaded_plain_bytes: u64,
    /// Bytes sent for them (compressed and encrypted).
    pub uploaded_stored_bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PushReport {
    /// The off-site store.
    pub store: String,
    /// Every backup considered, oldest first per VM.
    pub backups: Vec<PushedBackup>,
}

impl PushReport {
    /// The backups pushed by this run.
    pub fn pushed(&self) -> impl Iterator<Item = &PushedBackup> {
        self.backups.iter().filter(|b| !b.already)
    }
}

/// Pushes the selected VMs' published backups on `host` from `primary` to `store`.
pub fn push(
    primary: &FolderStore,
    host: &str,
    selection: &Selection,
    store: &OffsiteStore,
    options: &PushOptions,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<PushReport, OffsiteRunError> {
    // Object Lock: refused before anything (even the push's lock object) is uploaded.
    let retention = match options.object_lock_days {
        None => None,
        Some(days) => match store.client().object_lock_support()? {
            LockSupport::Enabled => Some(ObjectLock::days_from_now(days.max(1))),
            LockSupport::Unavailable(detail) => {
                return Err(OffsiteError::NoObjectLock {
                    location: store.location(),
                    detail,
                }
                .into())
            }
        },
    };
    let _lock = lock::acquire(store.client(), "push")?;
    let vm_dirs: Vec<(String, VmDir)> = match selection {
        Selection::All => layout::vm_dirs(primary.root(), host)?,
        Selection::Vms(vms) => vms
            .iter()
            .map(|vm| Ok((layout::safe_component(vm)?, primary.vm_dir(host, vm)?)))
            .collect::<Result<_, OffsiteRunError>>()?,
    };
    let host_c = layout::safe_component(host)?;
    let present = Mutex::new(store.chunk_ids()?.into_iter().collect::<HashSet<ChunkId>>());
    let mut report = PushReport {
        store: store.location(),
        backups: Vec::new(),
    };
    for (vm_c, vm_dir) in vm_dirs {
        // No prune of this VM on the primary while its backups are read.
        let _vm_lock = primary.lock_dir(&vm_dir.path, LockMode::Shared)?;
        let mut stamps = vm_dir.complete_stamps()?;
        if stamps.is_empty() {
            progress.message(
                Level::Warning,
                &format!(
                    "no published backup of {vm_c} under {}",
                    vm_dir.path.display()
                ),
            );
        }
        if options.latest_only {
            stamps = latest_with_parents(&vm_dir, stamps);
        }
        for stamp in stamps {
            if cancel.is_cancelled() {
                return Err(OffsiteRunError::Cancelled);
            }
            let name = backup_name(&host_c, &vm_c, &stamp);
            if store.has_manifest(&host_c, &vm_c, &stamp)? {
                report.backups.push(PushedBackup {
                    backup: name,
                    already: true,
                    ..Default::default()
                });
                continue;
            }
            let dir = vm_dir.backup_dir(&stamp);
            let meta = BackupMetadata::read(&dir)
                .map_err(|e| OffsiteRunError::io("read the metadata of", &dir, e))?;
            if let Some(why) = not_pushable(&meta) {
                progress.message(Level::Warning, &format!("{name}: not pushed: {why}"));
                report.backups.push(PushedBackup {
                    backup: name,
                    already: true,
                    skipped: Some(why),
                    ..Default::default()
                });
                continue;
            }
            progress.message(Level::Info, &format!("pushing {name}"));
            let pushed = push_backup(
                &dir,
                &host_c,
                &vm_c,
                &stamp,
                &meta,
                store,
                &present,
                options,
                retention.as_ref(),
                progress,
                cancel,
            )?;
            progress.message(
                Level::Info,
                &format!(
                    "{name}: {} chunks, {} uploaded ({} MiB → {} MiB stored), {} already there, {} zero",
                    pushed.chunks,
                    pushed.uploaded_chunks,
                    pushed.uploaded_plain_bytes >> 20,
                    pushed.uploaded_stored_bytes >> 20,
                    pushed.present_chunks,
                    pushed.zero_chunks
                ),
            );
            report.backups.push(pushed);
        }
    }
    Ok(report)
}

/// The newest stamp and the parents it needs.
fn latest_with_parents(vm_dir: &VmDir, stamps: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = stamps.last().cloned();
    while let Some(s) = next.take() {
        if out.contains(&s) || !stamps.contains(&s) {
            break;
        }
        next = BackupMetadata::read(&vm_dir.backup_dir(&s))
            .ok()
            .and_then(|m| m.chain.parent);
        out.push(s);
    }
    out.reverse();
    out
}

/// Why a published backup is not copied off-site, if it is not.
fn not_pushable(meta: &BackupMetadata) -> Option<String> {
    if meta.result == crate::ExitStatus::Failed || meta.result == crate::ExitStatus::PreCheckFailed
    {
        return Some(format!("the backup's result is {}", meta.result));
    }
    if let Some(v) = &meta.verify {
        if !v.ok {
            return Some(format!("its verification failed ({})", v.detail));
        }
    }
    None
}

/// One file to push: its name, size, chunk size and the SHA-256 expected of each chunk
/// (`None`: no chunk manifest; then the whole file's SHA-256 is checked).
struct Source {
    name: String,
    size: u64,
    chunk_size: u64,
    chunk_digests: Option<Vec<String>>,
    whole_sha256: Option<String>,
}

/// The files of a backup to push: images with their chunk manifests, then every other file
/// `checksums.sha256` names, then `checksums.sha256` itself.
fn sources(dir: &Path, meta: &BackupMetadata) -> Result<Vec<Source>, OffsiteRunError> {
    let sums_path = dir.join(layout::CHECKSUMS_FILE);
    let sums_text = std::fs::read_to_string(&sums_path)
        .map_err(|e| OffsiteRunError::io("read", &sums_path, e))?;
    let mut sums: BTreeMap<String, String> = BTreeMap::new();
    for line in sums_text.lines() {
        if let Some((sha, name)) = line.split_once("  ") {
            sums.insert(name.trim_start_matches('*').to_string(), sha.to_lowercase());
        }
    }
    let mut out = Vec::new();
    let mut images = Vec::new();
    for d in &meta.disks {
        images.push((d.file.clone(), d.manifest.clone()));
        for b in &d.backing_chain {
            images.push((b.file.clone(), b.manifest.clone()));
        }
    }
    for (file, m) in images {
        if out.iter().any(|s: &Source| s.name == file) {
            continue;
        }
        out.push(Source {
            whole_sha256: sums.get(&file).cloned(),
            name: file,
            size: m.file_size,
            chunk_size: m.chunk_size,
            chunk_digests: Some(m.digests),
        });
    }
    for (name, sha) in &sums {
        if out.iter().any(|s| &s.name == name) {
            continue;
        }
        for part in name.split('/') {
            layout::plain_file_name(part)?;
        }
        let path = dir.join(name);
        let size = std::fs::symlink_metadata(&path)
            .map_err(|e| OffsiteRunError::io("read", &path, e))?
            .len();
        out.push(Source {
            name: name.clone(),
            size,
            chunk_size: SMALL_FILE_CHUNK,
            chunk_digests: None,
            whole_sha256: Some(sha.clone()),
        });
    }
    out.push(Source {
        name: layout::CHECKSUMS_FILE.into(),
        size: sums_text.len() as u64,
        chunk_size: SMALL_FILE_CHUNK,
        chunk_digests: None,
        whole_sha256: Some(sha256_hex(sums_text.as_bytes())),
    });
    Ok(out)
}

/// A chunk read, on its way to a worker.
struct Job {
    file: usize,
    index: u64,
    data: Vec<u8>,
    expected: Option<String>,
}

/// What a worker made of a chunk.
struct Done {
    file: usize,
    index: u64,
    chunk: Option<OffsiteChunk>,
    len: u64,
    uploaded: Option<u64>,
    present: bool,
}

#[allow(clippy::too_many_arguments)]
fn push_backup(
    dir: &Path,
    host: &str,
    vm: &str,
    stamp: &str,
    meta: &BackupMetadata,
    store: &OffsiteStore,
    present: &Mutex<HashSet<ChunkId>>,
    options: &PushOptions,
    retention: Option<&ObjectLock>,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<PushedBackup, OffsiteRunError> {
    let started = Instant::now();
    let name = backup_name(host, vm, stamp);
    let sources = sources(dir, meta)?;
    let total: u64 = sources.iter().map(|s| s.size).sum();
    let metadata_path = dir.join(layout::METADATA_FILE);
    let metadata_json = std::fs::read_to_string(&metadata_path)
        .map_err(|e| OffsiteRunError::io("read", &metadata_path, e))?;
    let mut chunks: Vec<Vec<Option<Option<OffsiteChunk>>>> = sources
        .iter()
        .map(|s| vec![None; s.size.div_ceil(s.chunk_size.max(1)) as usize])
        .collect();
    let workers = options.workers.clamp(1, 32);
    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(workers);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Result<Done, OffsiteRunError>>();
    let abort = AtomicBool::new(false);
    let done_bytes = AtomicU64::new(0);
    let mut first_error: Option<OffsiteRunError> = None;
    let mut out = PushedBackup {
        backup: name.clone(),
        bytes: total,
        ..Default::default()
    };

    std::thread::scope(|scope| {
        // The reader: one chunk at a time from the primary target, into the bounded queue.
        let reader_done = done_tx.clone();
        let sources_ref = &sources;
        let abort_ref = &abort;
        scope.spawn(move || {
            if let Err(e) = read_all(dir, sources_ref, &job_tx, abort_ref, cancel) {
                let _ = reader_done.send(Err(e));
            }
            drop(job_tx);
        });
        for _ in 0..workers {
            let rx = job_rx.clone();
            let tx = done_tx.clone();
            let abort_ref = &abort;
            let name = &name;
            let sources_ref = &sources;
            scope.spawn(move || {
                for job in rx.iter() {
                    if abort_ref.load(Ordering::Relaxed) {
                        continue;
                    }
                    let r = work(job, store, present, name, sources_ref, retention);
                    if r.is_err() {
                        abort_ref.store(true, Ordering::Relaxed);
                    }
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(job_rx);
        for r in done_rx.iter() {
            match r {
                Ok(d) => {
                    out.chunks += 1;
                    match (&d.chunk, d.present, d.uploaded) {
                        (None, _, _) => out.zero_chunks += 1,
                        (Some(_), true, _) => out.present_chunks += 1,
                        (Some(_), false, Some(stored)) => {
                            out.uploaded_chunks += 1;
                            out.uploaded_plain_bytes += d.len;
                            out.uploaded_stored_bytes += stored;
                        }
                        (Some(_), false, None) => {}
                    }
                    chunks[d.file][d.index as usize] = Some(d.chunk);
                    let done = done_bytes.fetch_add(d.len, Ordering::Relaxed) + d.len;
                    let elapsed = started.elapsed();
                    progress.transfer(
                        &name,
                        Transfer {
                            done,
                            total,
                            bytes_per_sec: done as f64 / elapsed.as_secs_f64().max(1e-3),
                            elapsed,
                        },
                    );
                }
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    if first_error.is_none() {
                        first_error = Some(e);
                    }
                }
            }
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(OffsiteRunError::Cancelled);
    }
    let mut files = Vec::new();
    for (s, c) in sources.iter().zip(chunks) {
        let chunks: Option<Vec<Option<OffsiteChunk>>> = c.into_iter().collect();
        let Some(chunks) = chunks else {
            // A chunk without a result: only when the run stopped early.
            return Err(OffsiteRunError::Cancelled);
        };
        files.push(OffsiteFile {
            name: s.name.clone(),
            size: s.size,
            chunk_size: s.chunk_size,
            sha256: s.whole_sha256.clone(),
            chunks,
        });
    }
    let manifest = OffsiteManifest {
        format_version: MANIFEST_VERSION,
        host: host.to_string(),
        vm: vm.to_string(),
        stamp: stamp.to_string(),
        pushed_at: chrono::Local::now().to_rfc3339(),
        metadata_json,
        files,
    };
    // The commit point: only now is the backup listed off-site.
    store.put_manifest_locked(&manifest, retention)?;
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Reads every chunk of every source into the queue; checks whole-file digests of the files
/// without a chunk manifest on the way (their chunks are sent only once the file matched).
fn read_all(
    dir: &Path,
    sources: &[Source],
    tx: &crossbeam_channel::Sender<Job>,
    abort: &AtomicBool,
    cancel: &CancelToken,
) -> Result<(), OffsiteRunError> {
    for (fi, s) in sources.iter().enumerate() {
        let path = dir.join(&s.name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| OffsiteRunError::io("open", &path, e))?;
        let n = s.size.div_ceil(s.chunk_size.max(1));
        if let Some(d) = &s.chunk_digests {
            if d.len() as u64 != n {
                return Err(OffsiteRunError::Altered {
                    backup: dir.display().to_string(),
                    file: s.name.clone(),
                    chunk: d.len() as u64,
                    expected: format!("{} chunks", d.len()),
                    actual: format!("{n} chunks of {} bytes", s.size),
                });
            }
        }
        // Small files: read whole, checked against checksums.sha256, then chunked.
        let whole = if s.chunk_digests.is_none() {
            let data = read_at(&file, &path, 0, s.size)?;
            let actual = sha256_hex(&data);
            if let Some(expected) = &s.whole_sha256 {
                if &actual != expected {
                    return Err(OffsiteRunError::Altered {
                        backup: dir.display().to_string(),
                        file: s.name.clone(),
                        chunk: 0,
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            Some(data)
        } else {
            None
        };
        for i in 0..n {
            if abort.load(Ordering::Relaxed) || cancel.is_cancelled() {
                return Ok(());
            }
            let off = i * s.chunk_size;
            let len = s.chunk_size.min(s.size - off);
            let (data, expected) = match (&whole, &s.chunk_digests) {
                (Some(w), _) => (w[off as usize..(off + len) as usize].to_vec(), None),
                (None, Some(d)) => (
                    read_at(&file, &path, off, len)?,
                    Some(d[i as usize].clone()),
                ),
                (None, None) => unreachable!("a source has a chunk manifest or is read whole"),
            };
            let job = Job {
                file: fi,
                index: i,
                data,
                expected,
            };
            if tx.send(job).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn read_at(file: &File, path: &Path, off: u64, len: u64) -> Result<Vec<u8>, OffsiteRunError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, off)
        .map_err(|e| OffsiteRunError::io("read", path, e))?;
    Ok(buf)
}

/// Checks one chunk against its recorded digest, then stores it unless it is all zero or
/// already present.
fn work(
    job: Job,
    store: &OffsiteStore,
    present: &Mutex<HashSet<ChunkId>>,
    backup: &str,
    sources: &[Source],
    retention: Option<&ObjectLock>,
) -> Result<Done, OffsiteRunError> {
    let sha = sha256_hex(&job.data);
    if let Some(expected) = &job.expected {
        if &sha != expected {
            return Err(OffsiteRunError::Altered {
                backup: backup.to_string(),
                file: sources[job.file].name.clone(),
                chunk: job.index,
                expected: expected.clone(),
                actual: sha,
            });
        }
    }
    let len = job.data.len() as u64;
    if job.data.iter().all(|&b| b == 0) {
        return Ok(Done {
            file: job.file,
            index: job.index,
            chunk: None,
            len,
            uploaded: None,
            present: false,
        });
    }
    let id = store.chunk_id(&job.data);
    // Claimed before the upload, so two workers never send the same new chunk; a failed
    // upload fails the whole push (no manifest is written), so the claim cannot mislead one.
    let is_new = present.lock().map(|mut p| p.insert(id)).unwrap_or(true);
    let uploaded = if is_new {
        Some(store.put_chunk_locked(&id, &job.data, retention)?)
    } else {
        // Deduplicated: it must stay locked as long as this backup's manifest.
        if let Some(r) = retention {
            store.extend_chunk_retention(&id, r)?;
        }
        None
    };
    Ok(Done {
        file: job.file,
        index: job.index,
        chunk: Some(OffsiteChunk {
            id: id.to_hex(),
            sha256: sha,
        }),
        len,
        uploaded,
        present: !is_new,
    })
}
