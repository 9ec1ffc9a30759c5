//! The copy engine: one file from a source to a destination folder, at the speed of the slowest
//! of disk, network and hashing, with every byte SHA-256 hashed in the same pass.
//!
//! This file holds the public interface (options, report, manifest, errors) that the rest of
//! the engine, the C ABI and the benchmark harness use. The I/O paths live in submodules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::progress::{CancelToken, Progress};

/// Default size of one I/O buffer.
pub const DEFAULT_BUFFER_SIZE: usize = 1 << 20;
/// Default number of buffers in flight.
pub const DEFAULT_QUEUE_DEPTH: usize = 16;
/// Default size of one hashed chunk, recorded in the manifest.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// Which I/O engine copies the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IoPath {
    /// io_uring when the runtime probe allows it, otherwise the thread pool.
    #[default]
    Auto,
    /// io_uring only (an error when it is unavailable).
    Uring,
    /// The pread/pwrite thread pool.
    Threads,
}

/// What the copier hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HashMode {
    /// Per-chunk digests (the manifest) and the whole-file digest.
    #[default]
    Both,
    /// Per-chunk digests only.
    Chunks,
    /// The whole-file digest only.
    File,
    /// No hashing.
    None,
}

/// Settings of one copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyOptions {
    /// Which I/O engine to use.
    pub io: IoPath,
    /// Buffers in flight.
    pub queue_depth: usize,
    /// Size of each buffer, a multiple of 4096.
    pub buffer_size: usize,
    /// What to hash.
    pub hash: HashMode,
    /// Size of each hashed chunk, a multiple of `buffer_size`.
    pub chunk_size: u64,
    /// Hashing threads (0: one per core).
    pub hash_workers: usize,
    /// Open the source with O_DIRECT (falls back, and says so, when refused).
    pub direct_read: bool,
    /// Open the destination with O_DIRECT (falls back, and says so, when refused).
    pub direct_write: bool,
    /// Write allocated all-zero chunks as holes.
    pub zero_as_holes: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            io: IoPath::Auto,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            buffer_size: DEFAULT_BUFFER_SIZE,
            hash: HashMode::Both,
            chunk_size: DEFAULT_CHUNK_SIZE,
            hash_workers: 0,
            direct_read: false,
            direct_write: false,
            zero_as_holes: false,
        }
    }
}

/// The per-chunk digests of a file: what `verify` checks and what the metadata's root names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkManifest {
    /// Size of each chunk; the last one may be shorter.
    pub chunk_size: u64,
    /// Logical size of the file.
    pub file_size: u64,
    /// SHA-256 of each chunk, lowercase hex, in file order.
    pub digests: Vec<String>,
    /// Indexes of chunks that were all zero (holes included).
    pub zero_chunks: Vec<u64>,
    /// SHA-256 over the concatenated binary chunk digests, lowercase hex.
    pub root: String,
}

/// What one copy did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyReport {
    /// Source path.
    pub source: PathBuf,
    /// Final destination path.
    pub destination: PathBuf,
    /// Logical size of the file.
    pub logical_size: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the destination.
    pub bytes_written: u64,
    /// Bytes of holes neither read nor written.
    pub holes_skipped: u64,
    /// Number of all-zero chunks.
    pub zero_chunks: u64,
    /// Whole-file SHA-256, lowercase hex, when hashed.
    pub sha256: Option<String>,
    /// The chunk manifest, when hashed.
    pub manifest: Option<ChunkManifest>,
    /// Wall time of the copy.
    #[serde(with = "duration_secs")]
    pub duration: Duration,
    /// Logical bytes per second.
    pub bytes_per_sec: f64,
    /// The I/O engine that ran (`uring` or `threads`).
    pub io_path: IoPath,
    /// The settings used (after fallbacks).
    pub settings: CopyOptions,
    /// Fallbacks taken (O_DIRECT refused, io_uring unavailable…), for the log.
    pub notes: Vec<String>,
}

/// Errors of the copier; each names what failed, the path and, for data errors, the offset.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Copies `src` to `dst` (a file path in an existing folder) atomically, hashing on the way.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    options: &CopyOptions,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<CopyReport, CopyError> {
    let _ = (src, dst, options, progress, cancel);
    Err(CopyError::NotImplemented("copy_file"))
}

/// Serialises a [`Duration`] as fractional seconds.
pub mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes seconds as an f64.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    /// Reads seconds from an f64.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Ok(Duration::from_secs_f64(secs.max(0.0)))
    }
}
