//! Exclusion between pushes and garbage collection, with lock objects under `locks/`.
//!
//! A push writes `locks/push-<uuid>`, then looks for a `gc-` lock; a garbage collection writes
//! `locks/gc-<uuid>`, then looks for any other lock. S3 lists what was written before (strong
//! read-after-write consistency, which AWS and the servers we test give), so of a push and a
//! collection that start together at least one sees the other and backs off: a collection
//! never deletes a chunk that a running push has found present and will reference. Pushes run
//! side by side. A lock whose process is gone (same host, pid not alive) or older than
//! [`STALE_AFTER`] is stale and ignored: a killed push does not block collection for ever.

use serde::{Deserialize, Serialize};

use super::{OffsiteError, S3Client};

/// A lock older than this is ignored (the longest push we expect, with a wide margin).
pub const STALE_AFTER: chrono::Duration = chrono::Duration::hours(48);

/// The content of a lock object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// `push` or `gc`.
    pub kind: String,
    /// The host that took it.
    pub host: String,
    /// The process that took it.
    pub pid: u32,
    /// When (RFC 3339).
    pub started_at: String,
}

impl LockInfo {
    /// Whether the lock no longer protects anything.
    pub fn is_stale(&self) -> bool {
        if self.host == crate::format::layout::this_host() {
            let alive = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                None::<nix::sys::signal::Signal>,
            )
            .is_ok();
            if !alive {
                return true;
            }
        }
        match chrono::DateTime::parse_from_rfc3339(&self.started_at) {
            Ok(t) => chrono::Local::now().signed_duration_since(t) > STALE_AFTER,
            Err(_) => false,
        }
    }
}

/// A lock held; removed when dropped.
#[derive(Debug)]
pub struct HeldLock<'a> {
    client: &'a S3Client,
    key: String,
}

impl Drop for HeldLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.client.delete(&self.key) {
            tracing::warn!(lock = %self.key, "cannot remove the off-site lock: {e}");
        }
    }
}

/// Takes a lock of `kind` (`push` or `gc`); fails with [`OffsiteError::Busy`] when a
/// conflicting live lock is there (push: a gc; gc: anything).
pub fn acquire<'a>(client: &'a S3Client, kind: &str) -> Result<HeldLock<'a>, OffsiteError> {
    let name = format!("{kind}-{}", uuid::Uuid::new_v4());
    let key = format!("locks/{name}");
    let info = LockInfo {
        kind: kind.to_string(),
        host: crate::format::layout::this_host(),
        pid: std::process::id(),
        started_at: chrono::Local::now().to_rfc3339(),
    };
    let bytes = serde_json::to_vec(&info).map_err(|source| OffsiteError::Json {
        action: "encode",
        what: key.clone(),
        source,
    })?;
    client.put(&key, &bytes)?;
    let held = HeldLock { client, key };
    for other in client.list("locks/")? {
        let Some(other_name) = other.key.strip_prefix("locks/") else {
            continue;
        };
        if other_name == name {
            continue;
        }
        let conflicts = kind == "gc" || other_name.starts_with("gc-");
        if !conflicts {
            continue;
        }
        let Some(bytes) = client.get(&other.key)? else {
            continue; // removed meanwhile
        };
        match serde_json::from_slice::<LockInfo>(&bytes) {
            Ok(i) if i.is_stale() => {
                tracing::info!(lock = %other.key, "ignoring a stale off-site lock");
            }
            Ok(i) => {
                return Err(OffsiteError::Busy(format!(
                    "a {} runs on {} (pid {}, since {}): {}",
                    i.kind, i.host, i.pid, i.started_at, other.key
                )))
            }
            Err(_) => {
                return Err(OffsiteError::Busy(format!(
                    "unreadable lock {} (remove it if nothing runs)",
                    other.key
                )))
            }
        }
    }
    Ok(held)
}
