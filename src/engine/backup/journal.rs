//! The local journal of acquired states, and the per-VM lock.
//!
//! Before the engine acquires anything that must be released (an overlay, a frozen guest, a
//! `.partial` folder, a domain it shut down), it writes what it is about to acquire to
//! `<journal_dir>/journal/<vm>.json` (atomically, fsynced). When the run ends cleanly the
//! file is removed. A file left behind is the evidence `vm-backup orphans` and the start of
//! every backup use to repair what a `kill -9` or a host crash left: only overlays listed
//! here (and named like ours) are ever committed by the repair.
//!
//! `<journal_dir>/journal/<vm>.lock` is held with `flock` for the whole run, so two backups of
//! the same VM cannot run at once, and a repair never touches a VM whose backup is running.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::format::layout::safe_component;
use crate::format::metadata::Method;

/// The sub-folder of `journal_dir` holding journals and locks.
pub const JOURNAL_SUBDIR: &str = "journal";

/// One overlay the engine creates (or created) for a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayRecord {
    /// Target device (`vda`).
    pub target: String,
    /// The image the domain ran on before the snapshot, and must run on again.
    pub base: PathBuf,
    /// Its format (`qcow2`, `raw`).
    pub base_format: String,
    /// The overlay file (`<base>.vmb-overlay-<stamp>.qcow2`).
    pub overlay: PathBuf,
}

/// What one run has acquired or is about to acquire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// Domain name.
    pub vm: String,
    /// Domain UUID.
    pub uuid: String,
    /// Process id of the run.
    pub pid: u32,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// The backup stamp.
    pub stamp: String,
    /// The method in use.
    pub method: Option<Method>,
    /// The phase reached.
    pub phase: String,
    /// Overlays planned or created.
    pub overlays: Vec<OverlayRecord>,
    /// A quiesce may have frozen the guest (set just before the snapshot call).
    pub may_be_frozen: bool,
    /// The `.partial` folder planned or created.
    pub partial_dir: Option<PathBuf>,
    /// The engine shut the domain down and must start it again.
    pub shut_down_by_us: bool,
    /// A checkpoint (`vmb-<stamp>`) this run creates or created: deleted by a repair when
    /// the backup `stamp` was not published (its bitmap merges into its parent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// A push-mode backup job may run on the domain (incremental): aborted by a repair.
    #[serde(default)]
    pub backup_job: bool,
    /// The local scratch folder of an incremental (the job's target files): removed by a
    /// repair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_dir: Option<PathBuf>,
    /// An instant restore of this domain (`vm` is the restored name): what a repair finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instant: Option<crate::engine::restore::instant::InstantRecord>,
}

/// The journal file and lock of one VM.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// The current record (what is on disk).
    pub record: JournalRecord,
    _lock: VmLock,
    /// The VM's lock on the target, held as long as the journal (see [`Journal::hold`]).
    _target_lock: Option<crate::store::TargetLock>,
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another run holds the VM's lock.
    #[error("another vm-backup run holds the lock of VM {vm:?} ({lock}){holder}")]
    Busy {
        /// The VM.
        vm: String,
        /// The lock file.
        lock: PathBuf,
        /// ", pid N" when known.
        holder: String,
    },
    /// An I/O error on the journal.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The journal file does not parse.
    #[error("journal {path} is corrupt: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The folder of journals under a journal dir.
pub fn journal_folder(journal_dir: &Path) -> PathBuf {
    journal_dir.join(JOURNAL_SUBDIR)
}

/// The journal file of a VM.
pub fn journal_path(journal_dir: &Path, vm: &str) -> PathBuf {
    let name = safe_component(vm).unwrap_or_else(|_| "_".into());
    journal_folder(journal_dir).join(format!("{name}.json"))
}

fn lock_path(journal_dir: &Path, vm: &str) -> PathBuf {
    let name = safe_component(vm).unwrap_or_else(|_| "_".into());
    journal_folder(journal_dir).join(format!("{name}.lock"))
}

/// An exclusive `flock` on a VM's lock file, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct VmLock {
    file: Flock<File>,
    path: PathBuf,
}

impl VmLock {
    /// Takes the lock of `vm` without waiting.
    pub fn acquire(journal_dir: &Path, vm: &str) -> Result<Self, JournalError> {
        let folder = journal_folder(journal_dir);
        fs::create_dir_all(&folder).map_err(io_err(&folder))?;
        let path = lock_path(journal_dir, vm);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .map(|pid| format!(", pid {pid}"))
                    .unwrap_or_default();
                return Err(JournalError::Busy {
                    vm: vm.to_string(),
                    lock: path,
                    holder,
                });
            }
            Err((_, errno)) => {
                return Err(JournalError::Io {
                    path,
                    source: io::Error::from(errno),
                })
            }
        };
        file.set_len(0).map_err(io_err(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err(&path))?;
        Ok(Self { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// Reads a journal file, if present.
pub fn read_record(path: &Path) -> Result<Option<JournalRecord>, JournalError> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| JournalError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(JournalError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Every journal file in a journal dir.
pub fn list_journals(journal_dir: &Path) -> Result<Vec<PathBuf>, JournalError> {
    let folder = journal_folder(journal_dir);
    let read = match fs::read_dir(&folder) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(JournalError::Io {
                path: folder,
                source,
            })
        }
    };
    let mut out: Vec<PathBuf> = read
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    out.sort();
    Ok(out)
}

impl Journal {
    /// Opens the journal of a VM under its lock. `previous` is what an earlier, interrupted
    /// run left (to repair before anything else).
    pub fn open(
        journal_dir: &Path,
        vm: &str,
    ) -> Result<(Self, Option<JournalRecord>), JournalError> {
        let lock = VmLock::acquire(journal_dir, vm)?;
        let path = journal_path(journal_dir, vm);
        let previous = read_record(&path)?;
        Ok((
            Self {
                path,
                record: JournalRecord::default(),
                _lock: lock,
                _target_lock: None,
            },
            previous,
        ))
    }

    /// Keeps the VM's lock on the target for as long as the journal lives (the local lock
    /// alone does not exclude a run with another `journal_dir`).
    pub fn hold(&mut self, lock: crate::store::TargetLock) {
        self._target_lock = Some(lock);
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the record and writes it (atomically, fsynced) before the caller acts on it.
    pub fn update(&mut self, f: impl FnOnce(&mut JournalRecord)) -> Result<(), JournalError> {
        f(&mut self.record);
        let text = serde_json::to_vec_pretty(&self.record).map_err(|e| JournalError::Io {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        crate::store::write_atomic(&self.path, &text).map_err(|e| io_err(&self.path)(e.into()))
    }

    /// Removes the journal file: nothing is held any more.
    pub fn clear(&mut self) -> Result<(), JournalError> {
        self.record = JournalRecord::default();
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

impl JournalError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            JournalError::Busy { .. } => ErrorKind::Busy,
            JournalError::Io { .. } => ErrorKind::Io,
            JournalError::Corrupt { .. } => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_journal_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, previous) = Journal::open(dir.path(), "Prüf VM/1").unwrap();
        assert!(previous.is_none());
        let busy = Journal::open(dir.path(), "Prüf VM/1").unwrap_err();
        assert!(matches!(busy, JournalError::Busy { .. }), "{busy}");
        assert!(busy.to_string().contains("Prüf VM/1"));
        j.update(|r| {
            r.vm = "Prüf VM/1".into();
            r.overlays.push(OverlayRecord {
                target: "vda".into(),
                base: "/b.qcow2".into(),
                base_format: "qcow2".into(),
                overlay: "/b.qcow2.vmb-overlay-x.qcow2".into(),
            });
        })
        .unwrap();
        assert!(j.path().starts_with(dir.path().join(JOURNAL_SUBDIR)));
        assert!(!j.path().to_string_lossy().contains("VM/1"));
        drop(j);
        // The lock is free again and the record is what a new run finds.
        let (mut j2, previous) = Journal::open(dir.path(), "Prüf VM/1").unwrap();
        let previous = previous.unwrap();
        assert_eq!(previous.overlays.len(), 1);
        assert_eq!(list_journals(dir.path()).unwrap().len(), 1);
        j2.clear().unwrap();
        assert!(list_journals(dir.path()).unwrap().is_empty());
    }
}
