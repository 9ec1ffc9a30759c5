//! The copy engine: one file from a source to a destination folder, at the speed of the slowest
//! of disk, network and hashing, with every byte SHA-256 hashed in the same pass.
//!
//! This file holds the public interface (options, report, manifest, errors) that the rest of
//! the engine, the C ABI and the benchmark harness use. The I/O paths live in submodules.
//!
//! ## How a copy runs
//!
//! ```text
//!  plan (SEEK_DATA/SEEK_HOLE) ──► I/O engine ──────────────► temporary destination file
//!        holes: no read, no write   │  uring: one ring, reads ahead / writes behind
//!                                   │  threads: pread/pwrite workers
//!                                   ▼ every block, as soon as it is read (any order)
//!                    in-order stage: reorders, progress ──► whole-file SHA-256 (own thread,
//!                                   │                         holes as zeros; over buffered
//!                                   │                         writes holds ≤ half the buffers
//!                                   │                         and reads let-go blocks back from
//!                                   │                         the page cache; over O_DIRECT
//!                                   │                         ones keeps them, pacing the copy)
//!                                   │ pieces routed by chunk (chunk % workers)
//!                                   ▼
//!                    chunk workers: per-chunk SHA-256, zero chunks from a precomputed digest
//! ```
//!
//! | module | responsibility |
//! | --- | --- |
//! | `plan` | lazy walk of the source's data extents and holes, in blocks of one buffer |
//! | `buffer` | the fixed pool of aligned buffers that bounds memory |
//! | `uring` | the io_uring engine and the runtime probe (the only `unsafe` here) |
//! | `threads` | the pread/pwrite fallback engine |
//! | `pace` | the bandwidth limit (`max_rate`): when the next read may start |
//! | `hashing` | the in-order stage and the chunk-hashing pool |
//! | `header` | the qcow2 backing-name rewrite of the first block, when asked |
//! | `dest` | opening the source; the [`Sink`] a copy writes into, and the copier's own temporary file for a copy to a path |
//! | `job` | one copy from options to report |
//! | `verify` | parallel re-hash of a file against a manifest |
//!
//! Both engines produce byte-identical files, digests and manifests; the tests run both.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::progress::{CancelToken, Progress};

mod buffer;
mod dest;
mod hashing;
pub mod header;
mod job;
mod pace;
mod plan;
mod threads;
mod ticker;
mod uring;
mod verify;

pub use dest::{write_manifest, Sink};
pub use hashing::{root_digest, zero_digest, FileDigests, StreamHasher};
pub use header::{BackingRename, HeaderRewrite};
pub use job::{copy_into, copy_into_renaming_backing, IO_ENV};
pub use uring::probe as probe_uring;
pub use uring::ProbeError;

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
    /// Read every written block back from the destination with O_DIRECT once its write has
    /// completed, and compare it with the bytes that were hashed: proof of what the share holds,
    /// taken during the copy instead of in a second pass after it. Needs `direct_write` (a
    /// buffered read-back would be answered by this host's page cache and prove nothing): without
    /// it, or where the destination refuses an O_DIRECT reader, it is off and a note says so.
    #[serde(default)]
    pub read_back: bool,
    /// Bandwidth limit: at most this many bytes read from the source per second, on average
    /// (`None`: as fast as the devices go). Holes are free.
    #[serde(default)]
    pub max_rate: Option<u64>,
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
            read_back: false,
            max_rate: None,
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
    /// Bytes of allocated all-zero data not written (`zero_as_holes`).
    #[serde(default)]
    pub zero_bytes_skipped: u64,
    /// What became of the backing-name rewrite, when one was asked for
    /// ([`copy_into_renaming_backing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_rewrite: Option<HeaderRewrite>,
    /// Bytes read back from the destination with O_DIRECT and found equal to what was written
    /// (`read_back`); equal to `bytes_written` when every written block was proven.
    #[serde(default)]
    pub bytes_read_back: u64,
}

/// Which side of a copy an error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The file being read.
    Source,
    /// The file being written.
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "reading source",
            Side::Destination => "writing destination",
        })
    }
}

/// Errors of the copier; each names what failed, the path and, for data errors, the offset.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The options are inconsistent (sizes not aligned, zero queue depth…).
    #[error("bad copy options: {0}")]
    BadOptions(String),
    /// The source could not be opened (missing, permission, not a file).
    #[error("cannot open source {path}: {source}")]
    SourceOpen {
        /// The source path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the source failed.
    #[error("reading source {path} failed at offset {offset}: {source}")]
    SourceRead {
        /// The source path.
        path: PathBuf,
        /// Byte offset of the failed read.
        offset: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The source changed under the copy (shrank, truncated, grew).
    #[error("source {path} changed during the copy at offset {offset}: {detail}")]
    SourceChanged {
        /// The source path.
        path: PathBuf,
        /// Where the change was seen.
        offset: u64,
        /// What was seen.
        detail: String,
    },
    /// The folder that should receive the destination does not exist.
    #[error("destination folder {path} does not exist")]
    DestinationFolderMissing {
        /// The missing folder.
        path: PathBuf,
    },
    /// The destination (its temporary file) could not be created.
    #[error("cannot create destination {path}: {source}")]
    DestinationOpen {
        /// The destination path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing, syncing or renaming the destination failed.
    #[error("writing destination {path} failed at offset {offset}: {source}")]
    DestinationWrite {
        /// The destination path.
        path: PathBuf,
        /// Byte offset of the failed write.
        offset: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The destination filesystem is full (ENOSPC or EDQUOT).
    #[error("no space left writing destination {path} at offset {offset}")]
    NoSpace {
        /// The destination path.
        path: PathBuf,
        /// Byte offset of the failed write.
        offset: u64,
    },
    /// The device reported an I/O error (EIO).
    #[error("I/O error (EIO) {side} {path} at offset {offset}")]
    Io {
        /// Which file failed.
        side: Side,
        /// Its path.
        path: PathBuf,
        /// Byte offset of the failed operation.
        offset: u64,
    },
    /// A block read back from the destination (O_DIRECT, after its write completed) differs
    /// from the bytes written: the share does not hold what it acknowledged.
    #[error(
        "read-back of destination {path} at offset {offset} differs from the {len} bytes written"
    )]
    ReadBackMismatch {
        /// The destination path.
        path: PathBuf,
        /// Byte offset of the block.
        offset: u64,
        /// Length of the block.
        len: usize,
    },
    /// The copy was cancelled; nothing was left behind.
    #[error("copy of {path} cancelled at offset {offset}")]
    Cancelled {
        /// The source path.
        path: PathBuf,
        /// How far the copy had gone.
        offset: u64,
    },
    /// io_uring was asked for explicitly but is not available here.
    #[error("io_uring is not available: {0}")]
    UringUnavailable(#[from] ProbeError),
    /// The io_uring instance itself failed (not a file error).
    #[error("io_uring failed: {0}")]
    Uring(#[source] std::io::Error),
}

impl CopyError {
    /// Classifies a failed read of the source.
    pub(crate) fn read(path: &Path, offset: u64, err: std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EIO) => CopyError::Io {
                side: Side::Source,
                path: path.to_owned(),
                offset,
            },
            _ => CopyError::SourceRead {
                path: path.to_owned(),
                offset,
                source: err,
            },
        }
    }

    /// Classifies a failed write (or sync) of the destination.
    pub(crate) fn write(path: &Path, offset: u64, err: std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => CopyError::NoSpace {
                path: path.to_owned(),
                offset,
            },
            Some(libc::EIO) => CopyError::Io {
                side: Side::Destination,
                path: path.to_owned(),
                offset,
            },
            _ => CopyError::DestinationWrite {
                path: path.to_owned(),
                offset,
                source: err,
            },
        }
    }

    /// A short read: the source ended before its recorded size.
    pub(crate) fn shrank(path: &Path, offset: u64, size: u64) -> Self {
        CopyError::SourceChanged {
            path: path.to_owned(),
            offset,
            detail: format!("end of file reached before the expected size of {size} bytes"),
        }
    }
}

/// Copies `src` to `dst` atomically, hashing on the way.
///
/// `dst` is a file path in an existing folder, or an existing folder (then the source's file
/// name is used). The data goes to a temporary file beside the destination
/// (`.<name>.vmb-tmp-<pid>`), which is synced and renamed only when complete; on any error or
/// cancellation it is removed. Holes of the source (SEEK_DATA/SEEK_HOLE) are neither read nor
/// written; the destination keeps them. Memory stays within `queue_depth × buffer_size` plus a
/// small constant whatever the file size.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    options: &CopyOptions,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<CopyReport, CopyError> {
    job::run(src, dst, options, progress, cancel)
}

/// Re-hashes `file` in parallel and compares it with `manifest`.
///
/// A mismatch is not an error: the report names the first bad chunk and its byte offset.
/// Errors are reserved for files that cannot be read, and for cancellation.
pub fn verify_file(
    file: &Path,
    manifest: &ChunkManifest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<VerifyFileReport, CopyError> {
    verify::run(file, manifest, progress, cancel)
}

/// Hashes `file` again in one sequential pass: its whole-file SHA-256 and its chunk manifest
/// (`chunk_size` chunks), as a copy would have recorded them. For a file changed after its
/// copy (a qcow2 header rebased because the rewrite on the way did not fit).
pub fn hash_file(
    file: &Path,
    chunk_size: u64,
    cancel: &CancelToken,
) -> Result<(String, ChunkManifest), CopyError> {
    verify::hash_whole(file, chunk_size, cancel)
}

/// A chunk manifest file that [`ChunkManifest::read_json`] could not read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read manifest {path}: {source}")]
    Read {
        /// The manifest file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a manifest.
    #[error("bad manifest {path}: {source}")]
    Parse {
        /// The manifest file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
}

impl ManifestError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            ManifestError::Read { source, .. } => crate::error::ErrorKind::from_io(source),
            ManifestError::Parse { .. } => crate::error::ErrorKind::InvalidInput,
        }
    }
}

impl ChunkManifest {
    /// Reads a manifest written as JSON (by `vm-backup copy --manifest`).
    pub fn read_json(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ManifestError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The number of chunks a file of `file_size` bytes has.
    pub fn chunk_count(file_size: u64, chunk_size: u64) -> u64 {
        if chunk_size == 0 {
            0
        } else {
            file_size.div_ceil(chunk_size)
        }
    }
}

/// What [`verify_file`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyFileReport {
    /// The file checked.
    pub file: PathBuf,
    /// Its size now.
    pub file_size: u64,
    /// The size the manifest records.
    pub expected_size: u64,
    /// Chunks checked.
    pub chunks: u64,
    /// Indexes of chunks whose digest differs (a size change makes the tail chunks differ).
    pub bad_chunks: Vec<u64>,
    /// The first bad chunk, with its byte offset.
    pub first_bad: Option<BadChunk>,
    /// Whether the manifest's root matches its own digests.
    pub root_ok: bool,
    /// Bytes actually read (holes are not read).
    pub bytes_read: u64,
    /// Wall time.
    #[serde(with = "duration_secs")]
    pub duration: Duration,
    /// True when every chunk, the size and the root match.
    pub ok: bool,
}

/// A chunk whose digest does not match the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadChunk {
    /// Chunk index.
    pub index: u64,
    /// Byte offset of the chunk's first byte.
    pub offset: u64,
    /// The digest the manifest records.
    pub expected: String,
    /// The digest of the file now.
    pub actual: String,
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

impl CopyError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            CopyError::BadOptions { .. } => ErrorKind::InvalidInput,
            CopyError::SourceOpen { .. } => ErrorKind::NotFound,
            CopyError::SourceRead { .. } => ErrorKind::Io,
            CopyError::SourceChanged { .. } => ErrorKind::Corrupt,
            CopyError::DestinationFolderMissing { .. } => ErrorKind::TargetMissing,
            CopyError::DestinationOpen { .. } => ErrorKind::TargetFailing,
            CopyError::DestinationWrite { .. } => ErrorKind::TargetFailing,
            CopyError::NoSpace { .. } => ErrorKind::TargetFull,
            CopyError::Io { .. } => ErrorKind::Io,
            CopyError::ReadBackMismatch { .. } => ErrorKind::TargetFailing,
            CopyError::Cancelled { .. } => ErrorKind::Cancelled,
            CopyError::UringUnavailable { .. } => ErrorKind::Internal,
            CopyError::Uring { .. } => ErrorKind::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_errno_and_side() {
        let p = Path::new("/x");
        let e = |n| std::io::Error::from_raw_os_error(n);
        assert!(matches!(
            CopyError::read(p, 8, e(libc::EIO)),
            CopyError::Io {
                side: Side::Source,
                offset: 8,
                ..
            }
        ));
        assert!(matches!(
            CopyError::read(p, 8, e(libc::EISDIR)),
            CopyError::SourceRead { offset: 8, .. }
        ));
        assert!(matches!(
            CopyError::write(p, 9, e(libc::EIO)),
            CopyError::Io {
                side: Side::Destination,
                offset: 9,
                ..
            }
        ));
        assert!(matches!(
            CopyError::write(p, 9, e(libc::ENOSPC)),
            CopyError::NoSpace { offset: 9, .. }
        ));
        assert!(matches!(
            CopyError::write(p, 9, e(libc::EBADF)),
            CopyError::DestinationWrite { offset: 9, .. }
        ));
        assert_eq!(
            CopyError::write(p, 4096, e(libc::EIO)).to_string(),
            "I/O error (EIO) writing destination /x at offset 4096"
        );
    }
}
