//! `offsite verify`: downloads, decrypts and checks chunks against the SHA-256 their manifest
//! records (all, or a random sample), and names the backup, the file and the chunk of every
//! failure. A chunk shared by several backups is fetched once and reported for each.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::Rng;
use serde::Serialize;

use super::{backup_name, sha256_hex, OffsiteRunError};
use crate::progress::{CancelToken, Level, Progress};
use crate::store::offsite::{ChunkId, OffsiteStore};

/// Every (backup, file, chunk index, recorded SHA-256) that references one chunk.
type Refs = Vec<(String, String, u64, String)>;

/// One chunk that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChunkFault {
    /// `host/vm/stamp`.
    pub backup: String,
    /// The file.
    pub file: String,
    /// The chunk index in the file.
    pub chunk: u64,
    /// The chunk id (object name).
    pub id: String,
    /// What failed.
    pub reason: String,
}

impl std::fmt::Display for ChunkFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backup {}: {} chunk {} (object {}): {}",
            self.backup, self.file, self.chunk, self.id, self.reason
        )
    }
}

/// What `offsite verify` found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OffsiteVerifyReport {
    /// The backups whose manifest was read.
    pub backups: Vec<String>,
    /// Distinct chunks downloaded and checked.
    pub chunks_checked: u64,
    /// Bytes of plaintext checked.
    pub bytes_checked: u64,
    /// Every failure.
    pub faults: Vec<ChunkFault>,
}

impl OffsiteVerifyReport {
    /// Whether everything checked passed.
    pub fn ok(&self) -> bool {
        self.faults.is_empty()
    }
}

/// Verifies the backups `which` (host, vm, stamp; empty: every backup off-site), checking
/// each chunk with probability `sample_percent` / 100 (100: all).
pub fn verify(
    store: &OffsiteStore,
    which: &[(String, String, String)],
    sample_percent: f64,
    workers: usize,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<OffsiteVerifyReport, OffsiteRunError> {
    let backups = if which.is_empty() {
        store.backups()?
    } else {
        which.to_vec()
    };
    let mut report = OffsiteVerifyReport::default();
    // id → every (backup, file, chunk, sha256) that references it, for the sample.
    let mut wanted: HashMap<ChunkId, Refs> = HashMap::new();
    let mut rng = rand::thread_rng();
    for (host, vm, stamp) in &backups {
        let name = backup_name(host, vm, stamp);
        let m = match store.get_manifest(host, vm, stamp) {
            Ok(m) => m,
            Err(e @ crate::store::offsite::OffsiteError::Corrupt { .. })
            | Err(e @ crate::store::offsite::OffsiteError::Json { .. }) => {
                report.faults.push(ChunkFault {
                    backup: name.clone(),
                    file: "(manifest)".into(),
                    chunk: 0,
                    id: String::new(),
                    reason: e.to_string(),
                });
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        report.backups.push(name.clone());
        for f in &m.files {
            for (i, c) in f.chunks.iter().enumerate() {
                let Some(c) = c else { continue };
                if sample_percent < 100.0 && rng.gen_range(0.0..100.0) >= sample_percent {
                    continue;
                }
                let Some(id) = c.chunk_id() else {
                    report.faults.push(ChunkFault {
                        backup: name.clone(),
                        file: f.name.clone(),
                        chunk: i as u64,
                        id: c.id.clone(),
                        reason: "malformed chunk id in the manifest".into(),
                    });
                    continue;
                };
                wanted.entry(id).or_default().push((
                    name.clone(),
                    f.name.clone(),
                    i as u64,
                    c.sha256.clone(),
                ));
            }
        }
    }
    progress.message(
        Level::Info,
        &format!(
            "checking {} chunks of {} backups",
            wanted.len(),
            report.backups.len()
        ),
    );
    let queue: Mutex<Vec<(ChunkId, Refs)>> = Mutex::new(wanted.into_iter().collect());
    let results: Mutex<(u64, u64, Vec<ChunkFault>)> = Mutex::new((0, 0, Vec::new()));
    let fatal: Mutex<Option<OffsiteRunError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, 32) {
            scope.spawn(|| loop {
                if cancel.is_cancelled() {
                    return;
                }
                let Some((id, refs)) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                    return;
                };
                let outcome = store.get_chunk(&id);
                let mut faults = Vec::new();
                let mut bytes = 0;
                match outcome {
                    Ok(plain) => {
                        bytes = plain.len() as u64;
                        let sha = sha256_hex(&plain);
                        for (b, f, i, expected) in &refs {
                            if &sha != expected {
                                faults.push(ChunkFault {
                                    backup: b.clone(),
                                    file: f.clone(),
                                    chunk: *i,
                                    id: id.to_hex(),
                                    reason: format!("SHA-256 {sha}, expected {expected}"),
                                });
                            }
                        }
                    }
                    Err(
                        e @ (crate::store::offsite::OffsiteError::Corrupt { .. }
                        | crate::store::offsite::OffsiteError::Missing(_)),
                    ) => {
                        for (b, f, i, _) in &refs {
                            faults.push(ChunkFault {
                                backup: b.clone(),
                                file: f.clone(),
                                chunk: *i,
                                id: id.to_hex(),
                                reason: e.to_string(),
                            });
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = fatal.lock() {
                            f.get_or_insert(e.into());
                        }
                        return;
                    }
                }
                if let Ok(mut r) = results.lock() {
                    r.0 += 1;
                    r.1 += bytes;
                    r.2.extend(faults);
                }
            });
        }
    });
    if let Some(e) = fatal.into_inner().ok().flatten() {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(OffsiteRunError::Cancelled);
    }
    let (checked, bytes, mut faults) = results.into_inner().unwrap_or_default();
    faults.sort_by(|a, b| (&a.backup, &a.file, a.chunk).cmp(&(&b.backup, &b.file, b.chunk)));
    for f in &faults {
        progress.message(Level::Error, &f.to_string());
    }
    report.chunks_checked = checked;
    report.bytes_checked = bytes;
    report.faults.extend(faults);
    Ok(report)
}
