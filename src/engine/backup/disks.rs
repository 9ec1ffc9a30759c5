//! The copy phase of a direct-mode backup: every disk of the plan with its backing chain,
//! up to `[copy] disk_parallel` disks at once (issue 10).
//!
//! Each disk (its top image, then its backing chain, in order) is copied by one worker of a
//! [`std::thread::scope`]; a worker that finishes a disk takes the next one of the plan. The
//! copies in flight share one buffer budget: the queue depth of the copy options is split
//! between them, so the whole backup holds the buffers of one copy (the bound of issue 10:
//! ≤ 2 × queue × buffer + 32 MiB). With one worker (`disk_parallel = 1`, or a VM with one
//! disk) the disks are copied one after the other on the session's thread, as before.
//!
//! - Logs, progress and observer events are `Sync` ([`RunLog`] is a mutex, [`Progress`] and
//!   [`BackupObserver`] are `Send + Sync`) and name their disk; every disk announces its copy
//!   ([`BackupEvent::DiskCopyStarted`], a `copying …` line) before it begins. The first wave
//!   of workers all announce before any of them copies, so a run log of concurrent disks shows
//!   the overlap from the events themselves. The progress sink also gets an `all disks`
//!   transfer: the bytes of every disk, done and in all.
//! - The first disk that fails cancels the others (a [`CancelToken`] of the copy group, which
//!   the driver's token also cancels); every worker is joined before the error goes up, and the
//!   error reported is the first one that is not a cancellation. The `.partial` folder is then
//!   removed by the session's guard like after any other failure.
//! - The records come back in the plan's order, whatever order the disks finish in.
//!
//! Incremental and differential backups go through here too: `take_increment` points each
//! disk's source at its scratch file of changed blocks before the copy phase.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use crate::config::MAX_DISK_PARALLEL;
use crate::copier::{self, ChunkManifest, CopyOptions, HashMode, IoPath};
use crate::error::ErrorKind;
use crate::format::metadata::{self, BackingRecord, DiskRecord};
use crate::progress::{CancelToken, Level, Progress, Transfer};
use crate::store::PartialBackup;

use super::chain::{self, BackingImage};
use super::checks::FileStamp;
use super::{
    BackupError, BackupEvent, BackupObserver, BackupSession, Cause, Phase, RunLog, SessionDisk,
};

/// The `what` of the progress transfer that sums every disk of the copy phase.
pub const ALL_DISKS: &str = "all disks";

/// How often a worker group checks the driver's cancel token.
const CANCEL_POLL: Duration = Duration::from_millis(20);

impl BackupSession<'_> {
    /// The copy phase: every disk of the plan into the `.partial` folder, up to
    /// `settings.copy.disk_parallel` at once; fills `self.copied` in the plan's order.
    pub(super) fn copy_disks(&mut self) -> Result<(), BackupError> {
        self.phase_started(Phase::Copy);
        let t = Instant::now();
        let disks = self.plan.disks.clone();
        let parallel = workers(self.run.request.settings.copy.disk_parallel, disks.len());
        let base = CopyOptions {
            max_rate: self.run.request.settings.copy.max_rate.or(self
                .run
                .request
                .copy_options
                .max_rate),
            ..self.run.request.copy_options.clone()
        };
        let options = shared_options(&base, parallel);
        if let Some(rate) = base.max_rate {
            self.log(
                Level::Info,
                &format!(
                    "bandwidth limit: {:.1} MiB/s for the whole copy ([copy] max_rate)",
                    rate as f64 / (1u64 << 20) as f64
                ),
            );
        }
        if parallel > 1 {
            self.log(
                Level::Info,
                &format!(
                    "copying {} disks, {parallel} at once (queue depth {} each, {} in all)",
                    disks.len(),
                    options.queue_depth,
                    options.queue_depth * parallel
                ),
            );
        }
        let all = AllDisks::new(self.progress(), planned_bytes(&disks));
        let own = CancelToken::new();
        let group = CopyGroup {
            vm: &self.run.request.vm,
            log: &self.run.log,
            progress: if disks.len() > 1 {
                &all
            } else {
                self.progress()
            },
            observer: self.run.observer.get(),
            partial: self.partial_backup(Phase::Copy)?,
            options,
            cancel: if parallel > 1 { &own } else { &self.run.cancel },
            read_back: Mutex::new(BTreeMap::new()),
        };
        let copied = if parallel > 1 {
            group.concurrently(&disks, parallel, &self.run.cancel)
        } else {
            disks
                .iter()
                .map(|d| {
                    group.announce(d);
                    group.copy_disk(d)
                })
                .collect()
        };
        self.read_back = group
            .read_back
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        match copied {
            Ok(records) => self.copied = records,
            Err(e) => {
                self.log(Level::Error, &e.to_string());
                return Err(e);
            }
        }
        self.phase_finished(Phase::Copy, t.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Workers of the copy phase: `setting` (bounded to 1..=[`MAX_DISK_PARALLEL`]), never more
/// than there are disks.
fn workers(setting: usize, disks: usize) -> usize {
    setting.clamp(1, MAX_DISK_PARALLEL).min(disks).max(1)
}

/// The options of each copy when `parallel` run at once: both hashes, and the queue depth
/// split between them (at least one buffer each) so the buffers in flight stay those of one
/// copy. The chunk hashers are split the same way when the copier would pick their number
/// (one per core): the copies share the cores instead of each starting a worker per core.
/// A bandwidth limit is split too, so the copies together stay within it.
fn shared_options(base: &CopyOptions, parallel: usize) -> CopyOptions {
    let parallel = parallel.max(1);
    let hash_workers = if base.hash_workers == 0 && parallel > 1 {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        (cores / parallel).max(1)
    } else {
        base.hash_workers
    };
    CopyOptions {
        hash: HashMode::Both,
        queue_depth: (base.queue_depth / parallel).max(1),
        hash_workers,
        max_rate: base.max_rate.map(|r| (r / parallel as u64).max(1)),
        ..base.clone()
    }
}

/// Bytes the copy phase will read, as far as the file sizes tell (what the copier's transfers
/// count as their totals).
fn planned_bytes(disks: &[SessionDisk]) -> u64 {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    disks
        .iter()
        .map(|d| len(&d.source) + d.backing_chain.iter().map(|b| len(&b.path)).sum::<u64>())
        .sum()
}

/// What the workers of one copy phase share: all `Sync`, borrowed from the session.
struct CopyGroup<'s> {
    vm: &'s str,
    log: &'s RunLog,
    progress: &'s dyn Progress,
    observer: &'s dyn BackupObserver,
    partial: &'s PartialBackup,
    /// Both hashes, the queue depth already split between the workers.
    options: CopyOptions,
    /// Cancels this group: the driver's token with one worker, the group's own (which the
    /// driver's token cancels too) with several.
    cancel: &'s CancelToken,
    /// The image files whose every written block the copier read back from the share and
    /// found equal (and that nothing changed after their copy), with their stamp then.
    read_back: Mutex<BTreeMap<String, FileStamp>>,
}

impl CopyGroup<'_> {
    fn log(&self, level: Level, text: &str) {
        self.log.log(self.progress, level, text);
    }

    /// A failure of the copy phase (logged by whoever reports it).
    fn fail(&self, cause: impl Into<Cause>) -> BackupError {
        BackupError::failed(self.vm, Phase::Copy, cause)
    }

    /// Copies the disks with `parallel` workers; see the module documentation.
    fn concurrently(
        &self,
        disks: &[SessionDisk],
        parallel: usize,
        driver: &CancelToken,
    ) -> Result<Vec<DiskRecord>, BackupError> {
        let next = AtomicUsize::new(0);
        let records: Vec<Mutex<Option<DiskRecord>>> =
            disks.iter().map(|_| Mutex::new(None)).collect();
        let errors: Mutex<Vec<BackupError>> = Mutex::new(Vec::new());
        let finished = AtomicBool::new(false);
        // Every worker of the first wave announces its disk before any of them copies.
        let first_wave = Barrier::new(parallel);
        std::thread::scope(|s| {
            // The driver's cancel (a signal, a Bacula cancel) reaches the group's token.
            s.spawn(|| {
                while !finished.load(Ordering::SeqCst) {
                    if driver.is_cancelled() {
                        self.cancel.cancel();
                        break;
                    }
                    std::thread::sleep(CANCEL_POLL);
                }
            });
            let handles: Vec<_> = (0..parallel)
                .map(|_| {
                    s.spawn(|| {
                        let mut first = true;
                        loop {
                            // After a failure (or the driver's cancel) no new disk starts;
                            // the first wave always meets at the barrier.
                            if !first && self.cancel.is_cancelled() {
                                break;
                            }
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            let Some(d) = disks.get(i) else {
                                if first {
                                    first_wave.wait();
                                }
                                break;
                            };
                            self.announce(d);
                            if std::mem::take(&mut first) {
                                first_wave.wait();
                            }
                            match self.copy_disk(d) {
                                Ok(r) => {
                                    if let Ok(mut slot) = records[i].lock() {
                                        *slot = Some(r);
                                    }
                                }
                                Err(e) => {
                                    self.cancel.cancel();
                                    if let Ok(mut errs) = errors.lock() {
                                        errs.push(e);
                                    }
                                    break;
                                }
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                if h.join().is_err() {
                    self.cancel.cancel();
                    if let Ok(mut errs) = errors.lock() {
                        errs.push(self.fail(Cause::Internal("a disk copy thread panicked")));
                    }
                }
            }
            finished.store(true, Ordering::SeqCst);
        });
        let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.first_real(errors) {
            return Err(e);
        }
        records
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                // Disks left untouched because the group was cancelled between two disks.
                if self.cancel.is_cancelled() {
                    self.fail(Cause::Cancelled)
                } else {
                    self.fail(Cause::Internal("a disk was not copied"))
                }
            })
    }

    /// The error to report from the workers' errors (in the order they happened): the first
    /// that is not a cancellation (the others stopped because of it), else the first. The
    /// others are logged as what they are.
    fn first_real(&self, mut errors: Vec<BackupError>) -> Option<BackupError> {
        let pick = errors
            .iter()
            .position(|e| e.kind() != ErrorKind::Cancelled)
            .unwrap_or(0);
        if errors.is_empty() {
            return None;
        }
        let chosen = errors.remove(pick);
        for other in &errors {
            self.log(
                Level::Info,
                &format!("copy stopped after the first failure: {other}"),
            );
        }
        Some(chosen)
    }

    /// Says a disk's copy begins: the log line and [`BackupEvent::DiskCopyStarted`].
    fn announce(&self, d: &SessionDisk) {
        self.log(
            Level::Info,
            &format!(
                "copying {} ({}, {} bytes allocated, {} virtual) to {}",
                d.target,
                d.source.display(),
                d.allocated_size,
                d.virtual_size,
                d.file_name
            ),
        );
        self.observer.on_event(&BackupEvent::DiskCopyStarted {
            label: &d.target,
            file: &d.file_name,
        });
    }

    /// Copies one disk: its image, then every image of its backing chain.
    fn copy_disk(&self, d: &SessionDisk) -> Result<DiskRecord, BackupError> {
        let below = chain::layer_below(&d.backing_chain, 0, &d.format);
        let top = self.copy_image(&d.source, &d.file_name, &d.target, below)?;
        let mut backing_chain = Vec::new();
        for b in &d.backing_chain {
            self.log(
                Level::Info,
                &format!(
                    "copying {}'s backing image {} ({}, depth {}, {} bytes allocated) to {}",
                    d.target,
                    b.path.display(),
                    b.format,
                    b.depth,
                    b.allocated_size,
                    b.file_name
                ),
            );
            let label = format!("{} backing image {}", d.target, b.depth);
            let below = chain::layer_below(&d.backing_chain, b.depth, &b.format);
            let c = self.copy_image(&b.path, &b.file_name, &label, below)?;
            backing_chain.push(BackingRecord {
                depth: b.depth,
                file: b.file_name.clone(),
                source: b.path.to_string_lossy().into_owned(),
                format: b.format.clone(),
                backing_named_as: b.named_as.clone(),
                virtual_size: b.virtual_size,
                allocated_size: b.allocated_size,
                file_size: c.logical_size,
                sha256: c.sha256,
                manifest: c.manifest,
                copy_seconds: c.seconds,
                backing_rewrite: c.rewrite,
            });
        }
        Ok(DiskRecord {
            target: d.target.clone(),
            source: d.source.to_string_lossy().into_owned(),
            format: d.format.clone(),
            file: d.file_name.clone(),
            virtual_size: d.virtual_size,
            allocated_size: d.allocated_size,
            file_size: top.logical_size,
            sha256: top.sha256,
            manifest: top.manifest,
            copy_seconds: top.seconds,
            bytes_per_sec: top.bytes_per_sec,
            io_path: top.io_path.to_string(),
            backing_chain,
            backing_rewrite: top.rewrite,
        })
    }

    /// Copies one image into the `.partial` folder as `file_name` with both hashes; a qcow2
    /// image on a backing chain is pointed at `below`'s copy in the folder (see [`chain`]).
    fn copy_image(
        &self,
        src: &Path,
        file_name: &str,
        label: &str,
        below: Option<&BackingImage>,
    ) -> Result<CopiedImage, BackupError> {
        if self.cancel.is_cancelled() {
            return Err(self.fail(Cause::Cancelled));
        }
        let options = &self.options;
        let sink = self
            .partial
            .create_file(file_name, options.direct_write)
            .map_err(|e| self.fail(e))?;
        let report = match below.map(chain::rename_for) {
            Some(rename) => copier::copy_into_renaming_backing(
                src,
                Box::new(sink),
                options,
                &rename,
                self.progress,
                self.cancel,
            ),
            None => copier::copy_into(src, Box::new(sink), options, self.progress, self.cancel),
        }
        .map_err(|source| {
            self.fail(Cause::Copy {
                label: label.to_string(),
                source,
            })
        })?;
        for note in &report.notes {
            self.log(Level::Info, &format!("copier: {note}"));
        }
        let (Some(mut sha256), Some(mut manifest)) =
            (report.sha256.clone(), report.manifest.clone())
        else {
            return Err(self.fail(Cause::NoDigests {
                label: label.to_string(),
            }));
        };
        let mut rewrite = None;
        let mut proven =
            report.settings.read_back && report.bytes_read_back == report.bytes_written;
        if let (Some(below), Some(outcome)) = (below, &report.header_rewrite) {
            let copy = self.partial.path().join(file_name);
            let settled = chain::settle_rewrite(&copy, below, outcome, &manifest, self.cancel)
                .map_err(|e| self.fail(e))?;
            self.log(Level::Info, &format!("{label}: {}", settled.note));
            if let Some((s, m)) = settled.rehashed {
                (sha256, manifest) = (s, m);
                // The header was changed after the copy: its read-back proves nothing now.
                proven = false;
            }
            rewrite = Some(settled.record);
        }
        if proven {
            match FileStamp::of(&self.partial.path().join(file_name)) {
                Ok(stamp) => {
                    if let Ok(mut set) = self.read_back.lock() {
                        set.insert(file_name.to_string(), stamp);
                    }
                }
                // Without a stamp the post-checks re-read the image, as without read-back.
                Err(_) => proven = false,
            }
        }
        self.log(
            Level::Info,
            &format!(
                "{label} copied: {} bytes in {:.2} s ({:.1} MiB/s, {}), sha256 {}{}",
                report.logical_size,
                report.duration.as_secs_f64(),
                report.bytes_per_sec / (1 << 20) as f64,
                io_name(report.io_path),
                sha256,
                if proven {
                    format!(
                        ", every written byte read back from the share ({} bytes)",
                        report.bytes_read_back
                    )
                } else {
                    String::new()
                }
            ),
        );
        self.observer.on_event(&BackupEvent::DiskCopied {
            label,
            file: file_name,
            bytes: report.logical_size,
            seconds: report.duration.as_secs_f64(),
            sha256: &sha256,
        });
        Ok(CopiedImage {
            logical_size: report.logical_size,
            sha256,
            manifest,
            seconds: report.duration.as_secs_f64(),
            bytes_per_sec: report.bytes_per_sec,
            io_path: io_name(report.io_path),
            rewrite,
        })
    }
}

/// What [`CopyGroup::copy_image`] produced.
struct CopiedImage {
    logical_size: u64,
    sha256: String,
    manifest: ChunkManifest,
    seconds: f64,
    bytes_per_sec: f64,
    io_path: &'static str,
    rewrite: Option<metadata::BackingRewrite>,
}

fn io_name(io: IoPath) -> &'static str {
    match io {
        IoPath::Auto => "auto",
        IoPath::Uring => "uring",
        IoPath::Threads => "threads",
    }
}

/// The progress sink of a copy phase with several disks: passes each image's transfer on
/// (named as the copier names it) and adds the [`ALL_DISKS`] transfer, the bytes of every
/// disk, done and in all, whichever worker reports.
struct AllDisks<'p> {
    inner: &'p dyn Progress,
    planned: u64,
    start: Instant,
    /// Per transfer: bytes done and in all.
    seen: Mutex<HashMap<String, (u64, u64)>>,
}

impl<'p> AllDisks<'p> {
    fn new(inner: &'p dyn Progress, planned: u64) -> Self {
        Self {
            inner,
            planned,
            start: Instant::now(),
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl Progress for AllDisks<'_> {
    fn transfer(&self, what: &str, transfer: Transfer) {
        self.inner.transfer(what, transfer);
        let (done, total) = {
            let Ok(mut seen) = self.seen.lock() else {
                return;
            };
            seen.insert(what.to_string(), (transfer.done, transfer.total));
            seen.values()
                .fold((0u64, 0u64), |(d, t), (dd, tt)| (d + dd, t + tt))
        };
        let elapsed = self.start.elapsed();
        let secs = elapsed.as_secs_f64();
        self.inner.transfer(
            ALL_DISKS,
            Transfer {
                done,
                total: total.max(self.planned),
                bytes_per_sec: if secs > 0.0 { done as f64 / secs } else { 0.0 },
                elapsed,
            },
        );
    }

    fn message(&self, level: Level, text: &str) {
        self.inner.message(level, text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy group of the VM "vm" for the tests, its queue split `parallel` ways.
    fn test_group<'s>(
        log: &'s RunLog,
        progress: &'s dyn Progress,
        observer: &'s dyn BackupObserver,
        partial: &'s PartialBackup,
        cancel: &'s CancelToken,
        parallel: usize,
    ) -> CopyGroup<'s> {
        CopyGroup {
            vm: "vm",
            log,
            progress,
            observer,
            partial,
            options: shared_options(&CopyOptions::default(), parallel),
            cancel,
            read_back: Mutex::default(),
        }
    }

    #[test]
    fn workers_never_exceed_the_disks_and_the_queue_is_split() {
        assert_eq!(workers(2, 3), 2);
        assert_eq!(workers(2, 1), 1);
        assert_eq!(workers(0, 3), 1);
        assert_eq!(workers(4, 3), 3);
        assert_eq!(workers(1000, 100), MAX_DISK_PARALLEL);
        let base = CopyOptions {
            queue_depth: 16,
            hash: HashMode::None,
            ..CopyOptions::default()
        };
        let one = shared_options(&base, 1);
        assert_eq!((one.queue_depth, one.hash), (16, HashMode::Both));
        assert_eq!(shared_options(&base, 2).queue_depth, 8);
        // The copier picks the hashers of one copy; two copies share the cores.
        assert_eq!(one.hash_workers, 0);
        assert!(shared_options(&base, 2).hash_workers >= 1);
        let chosen = CopyOptions {
            hash_workers: 3,
            ..base.clone()
        };
        assert_eq!(shared_options(&chosen, 2).hash_workers, 3);
        assert_eq!(shared_options(&base, 3).queue_depth, 5);
        let tiny = CopyOptions {
            queue_depth: 1,
            ..base
        };
        assert_eq!(shared_options(&tiny, 4).queue_depth, 1);
        let limited = CopyOptions {
            max_rate: Some(100),
            ..CopyOptions::default()
        };
        assert_eq!(shared_options(&limited, 1).max_rate, Some(100));
        assert_eq!(shared_options(&limited, 3).max_rate, Some(33));
        assert_eq!(shared_options(&CopyOptions::default(), 2).max_rate, None);
    }

    /// Records the transfers it is told.
    #[derive(Default)]
    struct Transfers(Mutex<Vec<(String, u64, u64)>>);

    impl Progress for Transfers {
        fn transfer(&self, what: &str, t: Transfer) {
            self.0.lock().unwrap().push((what.into(), t.done, t.total));
        }
        fn message(&self, _: Level, _: &str) {}
    }

    #[test]
    fn the_all_disks_transfer_sums_every_disk_from_every_thread() {
        let sink = Transfers::default();
        let all = AllDisks::new(&sink, 300);
        let t = |done, total| Transfer {
            done,
            total,
            bytes_per_sec: 0.0,
            elapsed: Duration::ZERO,
        };
        std::thread::scope(|s| {
            s.spawn(|| all.transfer("vda", t(50, 100)));
            s.spawn(|| all.transfer("vdb", t(20, 200)));
        });
        all.transfer("vda", t(100, 100));
        all.transfer("vdb", t(200, 200));
        let seen = sink.0.lock().unwrap().clone();
        // Each disk's own transfer still goes through, named.
        assert!(seen.contains(&("vda".into(), 50, 100)));
        assert!(seen.contains(&("vdb".into(), 20, 200)));
        let totals: Vec<_> = seen.iter().filter(|(w, ..)| w == ALL_DISKS).collect();
        assert_eq!(totals.len(), 4);
        assert!(totals.iter().all(|(_, _, total)| *total == 300));
        assert_eq!(totals.last().map(|(_, d, _)| *d), Some(300));
        // The second concurrent report sums both disks, whichever came first.
        assert_eq!(totals[1].1, 70);
    }

    #[test]
    fn the_first_real_error_wins_over_the_cancellations_it_caused() {
        let (log, progress) = (RunLog::new(), crate::progress::NoProgress);
        let cancel = CancelToken::new();
        let dir = tempfile::tempdir().unwrap();
        let partial =
            PartialBackup::create(dir.path().join("s.partial"), dir.path().join("s")).unwrap();
        let group = test_group(
            &log,
            &progress,
            &super::super::NoObserver,
            &partial,
            &cancel,
            1,
        );
        let cancelled = || group.fail(Cause::Cancelled);
        let full = group.fail(Cause::Copy {
            label: "vdb".into(),
            source: copier::CopyError::NoSpace {
                path: "/t/vdb.qcow2".into(),
                offset: 0,
            },
        });
        let chosen = group
            .first_real(vec![cancelled(), full, cancelled()])
            .unwrap();
        assert_eq!(chosen.kind(), ErrorKind::TargetFull);
        assert_eq!(
            group.first_real(vec![cancelled()]).unwrap().kind(),
            ErrorKind::Cancelled
        );
        assert!(group.first_real(Vec::new()).is_none());
        assert_eq!(log.text().lines().count(), 2, "{}", log.text());
    }

    /// Records the copy events, in the order they were told (from any thread).
    #[derive(Default)]
    struct Events(Mutex<Vec<String>>);

    impl BackupObserver for Events {
        fn on_event(&self, event: &BackupEvent<'_>) {
            let line = match event {
                BackupEvent::DiskCopyStarted { label, .. } => format!("start {label}"),
                BackupEvent::DiskCopied { label, .. } => format!("end {label}"),
                _ => return,
            };
            self.0.lock().unwrap().push(line);
        }
    }

    fn raw_disk(dir: &Path, target: &str, mib: usize) -> SessionDisk {
        let source = dir.join(format!("{target}.raw"));
        if mib > 0 {
            let block: Vec<u8> = (0..1 << 20)
                .map(|i: u32| (i * 7 + mib as u32) as u8)
                .collect();
            let data: Vec<u8> = std::iter::repeat_n(&block, mib)
                .flatten()
                .copied()
                .collect();
            std::fs::write(&source, data).unwrap();
        }
        SessionDisk {
            target: target.into(),
            source,
            format: "raw".into(),
            virtual_size: (mib as u64) << 20,
            allocated_size: (mib as u64) << 20,
            file_name: format!("vm-{target}.raw"),
            backing_file: None,
            backing_chain: Vec::new(),
        }
    }

    #[test]
    fn real_copies_two_at_a_time_overlap_and_come_back_in_plan_order() {
        let dir = tempfile::tempdir().unwrap();
        let disks: Vec<SessionDisk> = [("vda", 6), ("vdb", 1), ("vdc", 3)]
            .iter()
            .map(|(t, m)| raw_disk(dir.path(), t, *m))
            .collect();
        let partial =
            PartialBackup::create(dir.path().join("s.partial"), dir.path().join("s")).unwrap();
        let (log, events, cancel, driver) = (
            RunLog::new(),
            Events::default(),
            CancelToken::new(),
            CancelToken::new(),
        );
        let sink = crate::progress::NoProgress;
        let all = AllDisks::new(&sink, planned_bytes(&disks));
        let group = test_group(&log, &all, &events, &partial, &cancel, 2);
        let records = group.concurrently(&disks, 2, &driver).unwrap();
        let targets: Vec<&str> = records.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["vda", "vdb", "vdc"]);
        for (r, d) in records.iter().zip(&disks) {
            let bytes = std::fs::read(&d.source).unwrap();
            assert_eq!(
                r.sha256,
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
            );
            assert_eq!(std::fs::read(partial.path().join(&r.file)).unwrap(), bytes);
        }
        let seen = events.0.lock().unwrap().clone();
        // The first wave (vda and vdb, in either order) both started before either ended.
        let mut wave = seen[..2].to_vec();
        wave.sort();
        assert_eq!(wave, ["start vda", "start vdb"], "{seen:?}");
        assert_eq!(seen.len(), 6, "{seen:?}");
    }

    #[test]
    fn the_first_failing_disk_cancels_the_others_and_its_error_goes_up() {
        let dir = tempfile::tempdir().unwrap();
        // vdb's image does not exist: its copy fails at once, vda's (large) is cancelled.
        let disks = vec![
            raw_disk(dir.path(), "vda", 48),
            raw_disk(dir.path(), "vdb", 0),
            raw_disk(dir.path(), "vdc", 1),
        ];
        let partial =
            PartialBackup::create(dir.path().join("s.partial"), dir.path().join("s")).unwrap();
        let (log, events, cancel, driver) = (
            RunLog::new(),
            Events::default(),
            CancelToken::new(),
            CancelToken::new(),
        );
        let progress = crate::progress::NoProgress;
        let group = test_group(&log, &progress, &events, &partial, &cancel, 2);
        let e = group.concurrently(&disks, 2, &driver).unwrap_err();
        assert_ne!(e.kind(), ErrorKind::Cancelled, "{e}");
        assert!(e.to_string().contains("vdb"), "{e}");
        assert!(cancel.is_cancelled());
        assert!(!driver.is_cancelled(), "the driver's token is left alone");
        // vdc never started: no disk begins after the failure.
        let seen = events.0.lock().unwrap().clone();
        assert!(!seen.contains(&"start vdc".to_string()), "{seen:?}");
    }

    #[test]
    fn the_drivers_cancel_reaches_every_copy() {
        let dir = tempfile::tempdir().unwrap();
        let disks = vec![
            raw_disk(dir.path(), "vda", 32),
            raw_disk(dir.path(), "vdb", 32),
        ];
        let partial =
            PartialBackup::create(dir.path().join("s.partial"), dir.path().join("s")).unwrap();
        let (log, cancel, driver) = (RunLog::new(), CancelToken::new(), CancelToken::new());
        let progress = crate::progress::NoProgress;
        let group = test_group(
            &log,
            &progress,
            &super::super::NoObserver,
            &partial,
            &cancel,
            2,
        );
        driver.cancel();
        let e = group.concurrently(&disks, 2, &driver).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    }
}
