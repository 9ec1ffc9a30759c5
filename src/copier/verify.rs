//! `verify_file`: re-hash a file in parallel, chunk by chunk, against a manifest. Worker threads
//! take chunk numbers from a shared counter, so the work spreads evenly; chunks that lie wholly
//! in a hole are not read (their digest is the precomputed zero digest).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use sha2::{Digest, Sha256};

use super::hashing::{root_digest, zero_digest};
use super::ticker::Ticker;
use super::{BadChunk, ChunkManifest, CopyError, VerifyFileReport};
use crate::progress::{CancelToken, Progress};

/// Size of each worker's read buffer.
const READ_SIZE: usize = 1 << 20;

/// The body of [`super::verify_file`].
pub(crate) fn run(
    path: &Path,
    manifest: &ChunkManifest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<VerifyFileReport, CopyError> {
    let started = Instant::now();
    let count = ChunkManifest::chunk_count(manifest.file_size, manifest.chunk_size);
    if manifest.chunk_size == 0 || manifest.digests.len() as u64 != count {
        return Err(CopyError::BadOptions(format!(
            "manifest lists {} digests; a file of {} bytes in chunks of {} has {count}",
            manifest.digests.len(),
            manifest.file_size,
            manifest.chunk_size
        )));
    }
    let expected: Vec<[u8; 32]> = manifest
        .digests
        .iter()
        .map(|d| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(d, &mut out).map(|()| out)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| CopyError::BadOptions(format!("manifest digest is not hex: {e}")))?;
    let root_ok = hex::encode(root_digest(&expected)) == manifest.root;

    let file = File::open(path).map_err(|source| CopyError::SourceOpen {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| CopyError::SourceOpen {
            path: path.to_owned(),
            source,
        })?
        .len();

    let ticker = Ticker::new(
        progress,
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        manifest.file_size,
    );
    let next = AtomicU64::new(0);
    let done_bytes = AtomicU64::new(0);
    let bytes_read = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let error: Mutex<Option<CopyError>> = Mutex::new(None);
    let bad: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let full_zero = (manifest.chunk_size, zero_digest(manifest.chunk_size));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut buf = vec![0u8; READ_SIZE];
                loop {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if cancel.is_cancelled() {
                        set_error(
                            &error,
                            &stop,
                            CopyError::Cancelled {
                                path: path.to_owned(),
                                offset: done_bytes.load(Ordering::Relaxed),
                            },
                        );
                        return;
                    }
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= count {
                        return;
                    }
                    let start = index * manifest.chunk_size;
                    let len = manifest.chunk_size.min(manifest.file_size - start);
                    let digest = match chunk_digest(
                        &file,
                        path,
                        start,
                        len,
                        size,
                        full_zero,
                        &mut buf,
                        cancel,
                        &bytes_read,
                    ) {
                        Ok(d) => d,
                        Err(e) => {
                            set_error(&error, &stop, e);
                            return;
                        }
                    };
                    if digest != expected[index as usize] {
                        if let Ok(mut b) = bad.lock() {
                            b.push(index);
                        }
                    }
                    let done = done_bytes.fetch_add(len, Ordering::Relaxed) + len;
                    ticker.tick(done);
                }
            });
        }
    });
    if let Some(e) = error.into_inner().ok().flatten() {
        return Err(e);
    }
    let mut bad_chunks = bad.into_inner().unwrap_or_default();
    bad_chunks.sort_unstable();
    let first_bad = bad_chunks.first().map(|&index| {
        let start = index * manifest.chunk_size;
        let len = manifest.chunk_size.min(manifest.file_size - start);
        let actual = chunk_digest(
            &file,
            path,
            start,
            len,
            size,
            full_zero,
            &mut vec![0u8; READ_SIZE],
            cancel,
            &AtomicU64::new(0),
        )
        .map(hex::encode)
        .unwrap_or_default();
        BadChunk {
            index,
            offset: start,
            expected: manifest.digests[index as usize].clone(),
            actual,
        }
    });
    ticker.finish(manifest.file_size);
    let ok = bad_chunks.is_empty() && root_ok && size == manifest.file_size;
    Ok(VerifyFileReport {
        file: path.to_owned(),
        file_size: size,
        expected_size: manifest.file_size,
        chunks: count,
        bad_chunks,
        first_bad,
        root_ok,
        bytes_read: bytes_read.into_inner(),
        duration: started.elapsed(),
        ok,
    })
}

fn set_error(slot: &Mutex<Option<CopyError>>, stop: &AtomicBool, e: CopyError) {
    if let Ok(mut s) = slot.lock() {
        if s.is_none() {
            *s = Some(e);
        }
    }
    stop.store(true, Ordering::SeqCst);
}

/// SHA-256 of `len` bytes at `start` (bytes past the file's end count as missing: the digest
/// then covers only what exists, which cannot match).
#[allow(clippy::too_many_arguments)]
fn chunk_digest(
    file: &File,
    path: &Path,
    start: u64,
    len: u64,
    size: u64,
    full_zero: (u64, [u8; 32]),
    buf: &mut [u8],
    cancel: &CancelToken,
    bytes_read: &AtomicU64,
) -> Result<[u8; 32], CopyError> {
    let end = (start + len).min(size);
    if end == start + len && in_hole(file, start, end) {
        let (full_len, full_digest) = full_zero;
        return Ok(if len == full_len {
            full_digest
        } else {
            zero_digest(len)
        });
    }
    let mut h = Sha256::new();
    let mut pos = start;
    while pos < end {
        if cancel.is_cancelled() {
            return Err(CopyError::Cancelled {
                path: path.to_owned(),
                offset: pos,
            });
        }
        let want = ((end - pos) as usize).min(buf.len());
        let n = match file.read_at(&mut buf[..want], pos) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::read(path, pos, e)),
        };
        h.update(&buf[..n]);
        bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        pos += n as u64;
    }
    Ok(h.finalize().into())
}

/// Whether `[start, end)` holds no data (SEEK_DATA finds none before `end`).
fn in_hole(file: &File, start: u64, end: u64) -> bool {
    match lseek(file.as_raw_fd(), start as i64, Whence::SeekData) {
        Ok(data) => data as u64 >= end,
        Err(Errno::ENXIO) => true,
        Err(_) => false,
    }
}

/// Hashes `path` sequentially: the whole-file SHA-256 and a chunk manifest of `chunk_size`
/// chunks (all-zero chunks listed). A plain single pass with one buffer, for the rare file
/// changed after its copy (a header rebased because a rewrite on the way did not fit).
pub(crate) fn hash_whole(
    path: &Path,
    chunk_size: u64,
    cancel: &CancelToken,
) -> Result<(String, ChunkManifest), CopyError> {
    use std::io::Read;
    let open = |source| CopyError::SourceOpen {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(open)?;
    let size = f.metadata().map_err(open)?.len();
    let chunk_size = chunk_size.max(1);
    let mut whole = Sha256::new();
    let mut digests: Vec<[u8; 32]> = Vec::new();
    let mut zero_chunks = Vec::new();
    let mut buf = vec![0u8; chunk_size.min(1 << 20) as usize];
    let mut at = 0u64;
    while at < size {
        if cancel.is_cancelled() {
            return Err(CopyError::Cancelled {
                path: path.to_owned(),
                offset: at,
            });
        }
        let len = chunk_size.min(size - at);
        let mut chunk = Sha256::new();
        let mut zero = true;
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            let n = f
                .read(&mut buf[..want])
                .map_err(|e| CopyError::read(path, at + done, e))?;
            if n == 0 {
                return Err(CopyError::shrank(path, at + done, size));
            }
            zero = zero && buf[..n].iter().all(|&b| b == 0);
            whole.update(&buf[..n]);
            chunk.update(&buf[..n]);
            done += n as u64;
        }
        if zero {
            zero_chunks.push(digests.len() as u64);
        }
        digests.push(chunk.finalize().into());
        at += len;
    }
    let manifest = ChunkManifest {
        chunk_size,
        file_size: size,
        digests: digests.iter().map(hex::encode).collect(),
        zero_chunks,
        root: hex::encode(root_digest(&digests)),
    };
    Ok((hex::encode(whole.finalize()), manifest))
}
