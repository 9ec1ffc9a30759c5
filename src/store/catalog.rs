//! The catalog on the share: `<target>/metadata/backup-catalog.db` (SQLite) indexes every
//! backup (host, VM, stamp, method, size, duration, throughput, frozen window, result, verify and
//! test-restore verdicts, path) and every failed run, and `<target>/metadata/last-run-summary.json`
//! holds the latest run of each VM.
//!
//! The catalog is only an index: everything in it can be rebuilt from the files on the share,
//! the `backup-metadata.json` of every backup folder and the failure records written by
//! [`record_failure`] under `<target>/metadata/failed-runs/<host>/<vm>/<stamp>.json`. It is
//! rebuilt by `vm-backup catalog rebuild`, and automatically when it is missing or when
//! opening it fails (the damaged file is kept aside as `backup-catalog.db.damaged-<time>`).
//!
//! ## What the backup workflow calls
//!
//! - after a published backup: [`record_backup`]`(target, &metadata, backup_dir)`;
//! - after a failed run: [`record_failure`]`(target, &FailedRun)`.
//!
//! Both also update `last-run-summary.json`. Neither is allowed to fail a backup: log the
//! error as a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::format::layout::{self, METADATA_DIR};
use crate::format::metadata::{BackupMetadata, Method};
use crate::ExitStatus;

/// The catalog file name under `<target>/metadata/`.
pub const CATALOG_FILE: &str = "backup-catalog.db";
/// The summary of the latest runs under `<target>/metadata/`.
pub const SUMMARY_FILE: &str = "last-run-summary.json";
/// The folder of failure records under `<target>/metadata/`.
pub const FAILURES_DIR: &str = "failed-runs";
/// The schema version, stored as SQLite's `user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE backups (
    host TEXT NOT NULL,
    vm TEXT NOT NULL,
    stamp TEXT NOT NULL,
    path TEXT NOT NULL,
    method TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    total_bytes INTEGER NOT NULL,
    duration_seconds REAL NOT NULL,
    bytes_per_sec REAL NOT NULL,
    frozen_ms REAL,
    result TEXT NOT NULL,
    warnings TEXT NOT NULL,
    verify_ok INTEGER,
    verify_at TEXT,
    verify_detail TEXT,
    test_restore_ok INTEGER,
    test_restore_at TEXT,
    test_restore_detail TEXT,
    PRIMARY KEY (host, vm, stamp)
);
CREATE TABLE failed_runs (
    host TEXT NOT NULL,
    vm TEXT NOT NULL,
    stamp TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    result TEXT NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (host, vm, stamp)
);
PRAGMA user_version = 1;
";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite failed.
    #[error("catalog {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A file of the catalog or of the share could not be read or written.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The catalog file is not a catalog of this version.
    #[error("catalog {path} is damaged: {detail}")]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The layout of the share could not be read.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
    /// A file on the share could not be written.
    #[error(transparent)]
    Store(#[from] super::StoreError),
}

/// A run that published no backup: pre-check failed or backup failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedRun {
    /// Hypervisor host name.
    pub host: String,
    /// Domain name.
    pub vm: String,
    /// The stamp the backup would have had.
    pub stamp: String,
    /// Start time (RFC 3339).
    pub started_at: String,
    /// End time (RFC 3339).
    pub finished_at: String,
    /// Outcome (`pre-check-failed` or `failed`).
    pub result: ExitStatus,
    /// The error, worded for the operator.
    pub error: String,
    /// The method that was tried, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
}

/// One backup as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupRow {
    /// Hypervisor host name.
    pub host: String,
    /// Domain name.
    pub vm: String,
    /// Backup stamp.
    pub stamp: String,
    /// The backup folder, relative to the target (absolute when outside it).
    pub path: String,
    /// Method used.
    pub method: String,
    /// Start time (RFC 3339).
    pub started_at: String,
    /// End time (RFC 3339).
    pub finished_at: String,
    /// Bytes of disk images.
    pub total_bytes: u64,
    /// Wall time of the run, seconds.
    pub duration_seconds: f64,
    /// Throughput of the copy, bytes per second.
    pub bytes_per_sec: f64,
    /// Frozen window, milliseconds (quiesce only).
    pub frozen_ms: Option<f64>,
    /// Result of the run.
    pub result: String,
    /// Warnings raised.
    pub warnings: Vec<String>,
    /// `verify` verdict: passed, when, detail.
    pub verify: Option<crate::format::metadata::Verdict>,
    /// `test-restore` verdict.
    pub test_restore: Option<crate::format::metadata::Verdict>,
}

impl BackupRow {
    /// The row for a backup from its metadata and its folder.
    pub fn from_metadata(target: &Path, meta: &BackupMetadata, dir: &Path) -> Self {
        let path = dir
            .strip_prefix(target)
            .unwrap_or(dir)
            .to_string_lossy()
            .into_owned();
        Self {
            host: meta.host.clone(),
            vm: meta.vm_name.clone(),
            stamp: meta.stamp.clone(),
            path,
            method: meta.method.to_string(),
            started_at: meta.started_at.clone(),
            finished_at: meta.finished_at.clone(),
            total_bytes: meta.total_bytes,
            duration_seconds: run_seconds(&meta.started_at, &meta.finished_at, &meta.phases),
            bytes_per_sec: meta.bytes_per_sec,
            frozen_ms: meta.frozen_ms,
            result: enum_word(&meta.result),
            warnings: meta.warnings.clone(),
            verify: meta.verify.clone(),
            test_restore: meta.test_restore.clone(),
        }
    }

    /// The backup folder, absolute.
    pub fn dir(&self, target: &Path) -> PathBuf {
        target.join(&self.path)
    }
}

/// The serde word of a unit enum variant (`success`, `pre-check-failed`…).
fn enum_word<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Wall time between two RFC 3339 times; the sum of the phases when they do not parse.
pub fn run_seconds(started: &str, finished: &str, phases: &BTreeMap<String, f64>) -> f64 {
    match (
        chrono::DateTime::parse_from_rfc3339(started),
        chrono::DateTime::parse_from_rfc3339(finished),
    ) {
        (Ok(a), Ok(b)) => ((b - a).num_milliseconds() as f64 / 1000.0).max(0.0),
        _ => phases.values().sum(),
    }
}

/// What a rebuild found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RebuildReport {
    /// Backups indexed.
    pub backups: usize,
    /// Failure records indexed.
    pub failures: usize,
    /// Folders or records skipped, with why.
    pub skipped: Vec<String>,
}

/// An open catalog.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
    target: PathBuf,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

/// The catalog file of a target.
pub fn catalog_path(target: &Path) -> PathBuf {
    target.join(METADATA_DIR).join(CATALOG_FILE)
}

impl Catalog {
    /// Opens the catalog of `target`, rebuilding it from the share when it is missing or
    /// cannot be opened (the damaged file is moved aside, never deleted).
    pub fn open(target: &Path) -> Result<Self, CatalogError> {
        super::target::read_marker(target)?;
        let path = catalog_path(target);
        let dir = target.join(METADATA_DIR);
        super::target::ensure_dir(target, &dir)?
            .refuse_symlink(std::ffi::OsStr::new(CATALOG_FILE))?;
        if !path.exists() {
            tracing::info!(path = %path.display(), "catalog missing: rebuilding it from the share");
            Self::rebuild(target)?;
        }
        match Self::open_checked(target, &path) {
            Ok(catalog) => Ok(catalog),
            Err(e) => {
                let aside = path.with_extension(format!(
                    "db.damaged-{}",
                    chrono::Local::now().format(layout::STAMP_FORMAT)
                ));
                tracing::warn!(error = %e, aside = %aside.display(), "catalog unusable: rebuilding it from the share");
                fs::rename(&path, &aside).map_err(|source| CatalogError::Io {
                    context: "cannot move aside the damaged catalog",
                    path: path.clone(),
                    source,
                })?;
                for suffix in ["-journal", "-wal", "-shm"] {
                    let _ = fs::remove_file(format!("{}{suffix}", path.display()));
                }
                Self::rebuild(target)?;
                Self::open_checked(target, &path)
            }
        }
    }

    /// Opens an existing catalog and checks that it is sound and of this schema.
    fn open_checked(target: &Path, path: &Path) -> Result<Self, CatalogError> {
        let sql = |source| CatalogError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(sql)?;
        if check != "ok" {
            return Err(CatalogError::Damaged {
                path: path.to_path_buf(),
                detail: check,
            });
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        if version != SCHEMA_VERSION {
            return Err(CatalogError::Damaged {
                path: path.to_path_buf(),
                detail: format!("schema version {version}, expected {SCHEMA_VERSION}"),
            });
        }
        conn.query_row(
            "SELECT count(*) FROM backups, failed_runs LIMIT 1",
            [],
            |_| Ok(()),
        )
        .map_err(sql)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
            target: target.to_path_buf(),
        })
    }

    /// Rebuilds the catalog of `target` from the metadata files on the share, into a new file
    /// that replaces the old one only when complete.
    pub fn rebuild(target: &Path) -> Result<RebuildReport, CatalogError> {
        super::target::read_marker(target)?;
        let meta_dir = super::target::ensure_dir(target, &target.join(METADATA_DIR))?;
        let path = catalog_path(target);
        let tmp = path.with_extension(format!("db.rebuild-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let sql = |source| CatalogError::Sqlite {
            path: tmp.clone(),
            source,
        };
        let result = (|| {
            let mut conn = Connection::open_with_flags(
                &tmp,
                OpenFlags::default() | OpenFlags::SQLITE_OPEN_NOFOLLOW,
            )
            .map_err(sql)?;
            conn.execute_batch(SCHEMA).map_err(sql)?;
            let mut report = RebuildReport::default();
            let tx = conn.transaction().map_err(sql)?;
            for (dir, meta) in scan_backups(target, &mut report.skipped)? {
                insert_backup(&tx, &BackupRow::from_metadata(target, &meta, &dir)).map_err(sql)?;
                report.backups += 1;
            }
            for failure in scan_failures(target, &mut report.skipped) {
                insert_failure(&tx, &failure).map_err(sql)?;
                report.failures += 1;
            }
            tx.commit().map_err(sql)?;
            conn.close().map_err(|(_, e)| sql(e))?;
            let (mode, _) = meta_dir.modes();
            let tmp_name = tmp.file_name().unwrap_or_default();
            meta_dir.set_file_mode(tmp_name, mode)?;
            meta_dir
                .rename(tmp_name, std::ffi::OsStr::new(CATALOG_FILE))
                .map_err(|source| CatalogError::Io {
                    context: "cannot install the rebuilt catalog",
                    path: path.clone(),
                    source,
                })?;
            Ok(report)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> CatalogError {
        CatalogError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Adds or replaces the row of a backup.
    pub fn upsert_backup(&self, row: &BackupRow) -> Result<(), CatalogError> {
        insert_backup(&self.conn, row).map_err(|e| self.sql(e))
    }

    /// Adds or replaces a failure record (in the database only; see [`record_failure`]).
    pub fn upsert_failure(&self, failure: &FailedRun) -> Result<(), CatalogError> {
        insert_failure(&self.conn, failure).map_err(|e| self.sql(e))
    }

    /// Removes the row of a backup (after pruning it).
    pub fn remove_backup(&self, host: &str, vm: &str, stamp: &str) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "DELETE FROM backups WHERE host = ?1 AND vm = ?2 AND stamp = ?3",
                params![host, vm, stamp],
            )
            .map(|_| ())
            .map_err(|e| self.sql(e))
    }

    /// Every backup, optionally of one VM, ordered by host, VM and stamp.
    pub fn backups(&self, vm: Option<&str>) -> Result<Vec<BackupRow>, CatalogError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT host, vm, stamp, path, method, started_at, finished_at, total_bytes,
                        duration_seconds, bytes_per_sec, frozen_ms, result, warnings,
                        verify_ok, verify_at, verify_detail,
                        test_restore_ok, test_restore_at, test_restore_detail
                 FROM backups WHERE ?1 IS NULL OR vm = ?1 ORDER BY host, vm, stamp",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params![vm], |r| {
                let verdict = |ok: Option<bool>, at: Option<String>, detail: Option<String>| {
                    ok.map(|ok| crate::format::metadata::Verdict {
                        ok,
                        at: at.unwrap_or_default(),
                        detail: detail.unwrap_or_default(),
                    })
                };
                let warnings: String = r.get(12)?;
                Ok(BackupRow {
                    host: r.get(0)?,
                    vm: r.get(1)?,
                    stamp: r.get(2)?,
                    path: r.get(3)?,
                    method: r.get(4)?,
                    started_at: r.get(5)?,
                    finished_at: r.get(6)?,
                    total_bytes: r.get::<_, i64>(7)?.max(0) as u64,
                    duration_seconds: r.get(8)?,
                    bytes_per_sec: r.get(9)?,
                    frozen_ms: r.get(10)?,
                    result: r.get(11)?,
                    warnings: serde_json::from_str(&warnings).unwrap_or_default(),
                    verify: verdict(r.get(13)?, r.get(14)?, r.get(15)?),
                    test_restore: verdict(r.get(16)?, r.get(17)?, r.get(18)?),
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

    /// Every failed run, optionally of one VM, ordered by host, VM and stamp.
    pub fn failures(&self, vm: Option<&str>) -> Result<Vec<FailedRun>, CatalogError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT host, vm, stamp, started_at, finished_at, result, error
                 FROM failed_runs WHERE ?1 IS NULL OR vm = ?1 ORDER BY host, vm, stamp",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params![vm], |r| {
                let result: String = r.get(5)?;
                Ok(FailedRun {
                    host: r.get(0)?,
                    vm: r.get(1)?,
                    stamp: r.get(2)?,
                    started_at: r.get(3)?,
                    finished_at: r.get(4)?,
                    result: serde_json::from_value(serde_json::Value::String(result))
                        .unwrap_or(ExitStatus::Failed),
                    error: r.get(6)?,
                    method: None,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.sql(e))
    }

    /// The error of the latest run of a VM when that run failed (no backup published after it).
    pub fn latest_failure(&self, host: &str, vm: &str) -> Result<Option<String>, CatalogError> {
        let newest_backup: Option<String> = self
            .conn
            .query_row(
                "SELECT max(stamp) FROM backups WHERE host = ?1 AND vm = ?2",
                params![host, vm],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        let newest_failure: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT stamp, error FROM failed_runs WHERE host = ?1 AND vm = ?2
                 ORDER BY stamp DESC LIMIT 1",
                params![host, vm],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        Ok(match (newest_failure, newest_backup) {
            (Some((f, err)), Some(b)) if f > b => Some(err),
            (Some((_, err)), None) => Some(err),
            _ => None,
        })
    }

    /// Brings the index in line with the share without a full rebuild: indexes backup folders
    /// it does not know and drops rows whose folder is gone. Returns (added, removed).
    pub fn sync(&self) -> Result<(usize, usize), CatalogError> {
        let known: BTreeSet<String> = self.backups(None)?.into_iter().map(|r| r.path).collect();
        let mut on_disk = BTreeSet::new();
        let mut added = 0;
        for dir in backup_dirs(&self.target)? {
            let rel = dir
                .strip_prefix(&self.target)
                .unwrap_or(&dir)
                .to_string_lossy()
                .into_owned();
            if !known.contains(&rel) {
                if let Ok(meta) = BackupMetadata::read(&dir) {
                    self.upsert_backup(&BackupRow::from_metadata(&self.target, &meta, &dir))?;
                    added += 1;
                }
            }
            on_disk.insert(rel);
        }
        let mut removed = 0;
        for gone in known.difference(&on_disk) {
            removed += self
                .conn
                .execute("DELETE FROM backups WHERE path = ?1", params![gone])
                .map_err(|e| self.sql(e))?;
        }
        Ok((added, removed))
    }
}

fn insert_backup(conn: &Connection, row: &BackupRow) -> rusqlite::Result<()> {
    let warnings = serde_json::to_string(&row.warnings).unwrap_or_else(|_| "[]".into());
    conn.execute(
        "INSERT OR REPLACE INTO backups (host, vm, stamp, path, method, started_at, finished_at,
            total_bytes, duration_seconds, bytes_per_sec, frozen_ms, result, warnings,
            verify_ok, verify_at, verify_detail, test_restore_ok, test_restore_at,
            test_restore_detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
        params![
            row.host,
            row.vm,
            row.stamp,
            row.path,
            row.method,
            row.started_at,
            row.finished_at,
            row.total_bytes as i64,
            row.duration_seconds,
            row.bytes_per_sec,
            row.frozen_ms,
            row.result,
            warnings,
            row.verify.as_ref().map(|v| v.ok),
            row.verify.as_ref().map(|v| v.at.clone()),
            row.verify.as_ref().map(|v| v.detail.clone()),
            row.test_restore.as_ref().map(|v| v.ok),
            row.test_restore.as_ref().map(|v| v.at.clone()),
            row.test_restore.as_ref().map(|v| v.detail.clone()),
        ],
    )
    .map(|_| ())
}

fn insert_failure(conn: &Connection, f: &FailedRun) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO failed_runs (host, vm, stamp, started_at, finished_at, result, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            f.host,
            f.vm,
            f.stamp,
            f.started_at,
            f.finished_at,
            enum_word(&f.result),
            f.error
        ],
    )
    .map(|_| ())
}

/// Every whole backup folder under the target (`<target>/<host>/<vm>/<stamp>/`).
pub fn backup_dirs(target: &Path) -> Result<Vec<PathBuf>, CatalogError> {
    super::target::read_marker(target)?;
    let mut out = Vec::new();
    for host in host_names(target)? {
        for (_, vm_dir) in layout::vm_dirs(target, &host)? {
            for stamp in vm_dir.complete_stamps()? {
                out.push(vm_dir.backup_dir(&stamp));
            }
        }
    }
    Ok(out)
}

/// The host folders under the target (every folder but `metadata` and hidden ones).
pub fn host_names(target: &Path) -> Result<Vec<String>, CatalogError> {
    let read = match fs::read_dir(target) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CatalogError::Io {
                context: "cannot list",
                path: target.to_path_buf(),
                source,
            })
        }
    };
    let mut hosts: Vec<String> = read
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != METADATA_DIR && !n.starts_with('.') && n != "lost+found")
        .collect();
    hosts.sort();
    Ok(hosts)
}

fn scan_backups(
    target: &Path,
    skipped: &mut Vec<String>,
) -> Result<Vec<(PathBuf, BackupMetadata)>, CatalogError> {
    let mut out = Vec::new();
    for dir in backup_dirs(target)? {
        match BackupMetadata::read(&dir) {
            Ok(meta) => out.push((dir, meta)),
            Err(e) => skipped.push(format!("{}: {e}", dir.display())),
        }
    }
    Ok(out)
}

fn scan_failures(target: &Path, skipped: &mut Vec<String>) -> Vec<FailedRun> {
    let root = target.join(METADATA_DIR).join(FAILURES_DIR);
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let Ok(read) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in read.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                match fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str::<FailedRun>(&t).map_err(|e| e.to_string()))
                {
                    Ok(f) => out.push(f),
                    Err(e) => skipped.push(format!("{}: {e}", path.display())),
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.host, &a.vm, &a.stamp).cmp(&(&b.host, &b.vm, &b.stamp)));
    out
}

/// The latest run of one VM, as kept in `last-run-summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Hypervisor host name.
    pub host: String,
    /// Domain name.
    pub vm: String,
    /// Backup stamp.
    pub stamp: String,
    /// Result word (`success`, `warning`, `failed`, `pre-check-failed`).
    pub result: String,
    /// Method used (or tried).
    pub method: Option<String>,
    /// Bytes of disk images.
    pub total_bytes: u64,
    /// Wall time, seconds.
    pub duration_seconds: f64,
    /// Throughput of the copy, bytes per second.
    pub bytes_per_sec: f64,
    /// Frozen window, milliseconds.
    pub frozen_ms: Option<f64>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// The error of a failed run.
    pub error: Option<String>,
    /// The backup folder relative to the target, when one was published.
    pub path: Option<String>,
    /// When the run ended (RFC 3339).
    pub finished_at: String,
}

/// `last-run-summary.json`: the latest run overall and per VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LastRuns {
    /// The most recently recorded run.
    pub last: Option<RunSummary>,
    /// The latest run of each VM, keyed `host/vm`.
    pub vms: BTreeMap<String, RunSummary>,
}

impl RunSummary {
    /// The summary of a published backup.
    pub fn of_backup(row: &BackupRow) -> Self {
        Self {
            host: row.host.clone(),
            vm: row.vm.clone(),
            stamp: row.stamp.clone(),
            result: row.result.clone(),
            method: Some(row.method.clone()),
            total_bytes: row.total_bytes,
            duration_seconds: row.duration_seconds,
            bytes_per_sec: row.bytes_per_sec,
            frozen_ms: row.frozen_ms,
            warnings: row.warnings.clone(),
            error: None,
            path: Some(row.path.clone()),
            finished_at: row.finished_at.clone(),
        }
    }

    /// The summary of a failed run.
    pub fn of_failure(f: &FailedRun) -> Self {
        Self {
            host: f.host.clone(),
            vm: f.vm.clone(),
            stamp: f.stamp.clone(),
            result: enum_word(&f.result),
            method: f.method.map(|m| m.to_string()),
            total_bytes: 0,
            duration_seconds: run_seconds(&f.started_at, &f.finished_at, &BTreeMap::new()),
            bytes_per_sec: 0.0,
            frozen_ms: None,
            warnings: Vec::new(),
            error: Some(f.error.clone()),
            path: None,
            finished_at: f.finished_at.clone(),
        }
    }
}

/// Reads `last-run-summary.json` (empty when missing or unreadable).
pub fn read_last_runs(target: &Path) -> LastRuns {
    fs::read_to_string(target.join(METADATA_DIR).join(SUMMARY_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn write_last_run(target: &Path, summary: RunSummary) -> Result<(), CatalogError> {
    let path = target.join(METADATA_DIR).join(SUMMARY_FILE);
    let mut runs = read_last_runs(target);
    runs.vms
        .insert(format!("{}/{}", summary.host, summary.vm), summary.clone());
    runs.last = Some(summary);
    let text = serde_json::to_string_pretty(&runs).unwrap_or_default();
    Ok(super::write_atomic(&path, text.as_bytes())?)
}

/// Indexes a published backup and updates `last-run-summary.json`. Called by the backup
/// workflow after publishing, and by `verify` / `test-restore` after recording a verdict.
pub fn record_backup(
    target: &Path,
    meta: &BackupMetadata,
    backup_dir: &Path,
) -> Result<(), CatalogError> {
    let row = BackupRow::from_metadata(target, meta, backup_dir);
    let catalog = Catalog::open(target)?;
    catalog.upsert_backup(&row)?;
    write_last_run(target, RunSummary::of_backup(&row))
}

/// Updates the row of a backup after a verdict, without touching `last-run-summary.json`.
pub fn record_verdict(
    target: &Path,
    meta: &BackupMetadata,
    backup_dir: &Path,
) -> Result<(), CatalogError> {
    let row = BackupRow::from_metadata(target, meta, backup_dir);
    Catalog::open(target)?.upsert_backup(&row)
}

/// Records a failed run: a JSON record on the share (so that a rebuild finds it), the catalog
/// row and `last-run-summary.json`.
pub fn record_failure(target: &Path, failure: &FailedRun) -> Result<(), CatalogError> {
    super::target::read_marker(target)?;
    let dir = target
        .join(METADATA_DIR)
        .join(FAILURES_DIR)
        .join(layout::safe_component(&failure.host)?)
        .join(layout::safe_component(&failure.vm)?);
    super::target::ensure_dir(target, &dir)?;
    let file = dir.join(format!("{}.json", layout::safe_component(&failure.stamp)?));
    let text = serde_json::to_string_pretty(failure).unwrap_or_default();
    super::write_atomic(&file, text.as_bytes())?;
    let catalog = Catalog::open(target)?;
    catalog.upsert_failure(failure)?;
    write_last_run(target, RunSummary::of_failure(failure))
}

impl CatalogError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            CatalogError::Sqlite { .. } => ErrorKind::TargetFailing,
            CatalogError::Io { .. } => ErrorKind::TargetFailing,
            CatalogError::Damaged { .. } => ErrorKind::Corrupt,
            CatalogError::Layout(e) => e.kind(),
            CatalogError::Store(e) => e.kind(),
        }
    }
}
