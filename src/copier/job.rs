//! One copy from start to finish: check the options, pick the I/O engine, open both ends, run
//! the engine and the hashers side by side, and publish the destination atomically.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::buffer::Pool;
use super::dest::{self, Sink, TempFile};
use super::hashing::{self, HashResult, HashSettings, Item};
use super::header::{BackingRename, HeaderRewrite, Rewrite};
use super::plan::Planner;
use super::ticker::Ticker;
use super::{threads, uring, ChunkManifest, CopyError, CopyOptions, CopyReport, IoPath};
use crate::progress::{CancelToken, Level, Progress};

/// Environment variable that forces an I/O engine when the options say `auto`
/// (`threads` or `uring`).
pub const IO_ENV: &str = "VMB_IO";

/// What an I/O engine needs for one copy.
pub(crate) struct Job<'a> {
    /// The source.
    pub src: &'a File,
    /// Its path, for errors.
    pub src_path: &'a Path,
    /// The destination's temporary file.
    pub dst: &'a File,
    /// The final destination path, for errors.
    pub dst_path: &'a Path,
    /// Logical size.
    pub size: u64,
    /// Skip writing all-zero buffers.
    pub zero_as_holes: bool,
    /// The source is open with O_DIRECT: read lengths are rounded up to the alignment.
    pub direct_read: bool,
    /// The destination is open with O_DIRECT: writes are padded (and the file truncated after).
    pub direct_write: bool,
    /// Polled at least once per buffer.
    pub cancel: &'a CancelToken,
    /// The buffers.
    pub pool: &'a Pool,
    /// Number of pread/pwrite threads (thread-pool engine).
    pub io_threads: usize,
    /// Use registered buffers (io_uring engine).
    pub register_buffers: bool,
    /// The header rewrite to apply to the first block, when asked.
    pub rewrite: Option<&'a Rewrite>,
    /// The destination opened again with O_DIRECT, and the buffers to read into, when every
    /// written block is to be read back and compared (`CopyOptions::read_back`).
    pub read_back: Option<ReadBack<'a>>,
    /// Bandwidth limit of the source's reads, bytes per second (`CopyOptions::max_rate`).
    pub max_rate: Option<u64>,
}

/// What reading written blocks back needs: an O_DIRECT reader of the destination and one
/// aligned buffer per block in flight.
#[derive(Clone, Copy)]
pub(crate) struct ReadBack<'a> {
    /// The destination, open read-only with O_DIRECT.
    pub file: &'a File,
    /// As many buffers as the copy's own pool.
    pub pool: &'a Pool,
}

/// What an engine did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoStats {
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written (excluding O_DIRECT padding).
    pub bytes_written: u64,
    /// Hole bytes skipped.
    pub holes_skipped: u64,
    /// Allocated zero bytes not written.
    pub zero_bytes_skipped: u64,
    /// Written bytes read back from the destination and found equal.
    pub bytes_read_back: u64,
}

/// Signature shared by both engines.
pub(crate) type Engine =
    fn(&Job<'_>, Planner<'_>, Sender<Item>, &mut Vec<String>) -> Result<IoStats, CopyError>;

/// Validates the options and resolves `hash_workers = 0`.
pub(crate) fn validate(options: &CopyOptions) -> Result<CopyOptions, CopyError> {
    let mut o = options.clone();
    let bad = |m: String| Err(CopyError::BadOptions(m));
    if o.queue_depth == 0 || o.queue_depth > 1024 {
        return bad(format!(
            "queue depth {} is not within 1..=1024",
            o.queue_depth
        ));
    }
    if o.buffer_size == 0 || o.buffer_size % 4096 != 0 || o.buffer_size > 256 << 20 {
        return bad(format!(
            "buffer size {} is not a multiple of 4096 between 4 KiB and 256 MiB",
            o.buffer_size
        ));
    }
    if o.chunk_size == 0 || o.chunk_size % o.buffer_size as u64 != 0 {
        return bad(format!(
            "chunk size {} is not a multiple of the buffer size {}",
            o.chunk_size, o.buffer_size
        ));
    }
    if o.max_rate == Some(0) {
        return bad("a bandwidth limit of 0 bytes/s would never finish".to_string());
    }
    if o.hash_workers == 0 {
        o.hash_workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    }
    o.hash_workers = o.hash_workers.min(64);
    Ok(o)
}

/// Resolves `auto` (and the environment override) into the engine to run.
pub(crate) fn choose_io(requested: IoPath, notes: &mut Vec<String>) -> Result<IoPath, CopyError> {
    let requested = match (requested, std::env::var(IO_ENV).ok().as_deref()) {
        (IoPath::Auto, Some("threads")) => {
            notes.push(format!("{IO_ENV}=threads: thread-pool engine forced"));
            IoPath::Threads
        }
        (IoPath::Auto, Some("uring")) => IoPath::Uring,
        (r, _) => r,
    };
    match requested {
        IoPath::Threads => Ok(IoPath::Threads),
        IoPath::Uring => uring::probe()
            .map(|()| IoPath::Uring)
            .map_err(CopyError::from),
        IoPath::Auto => match uring::probe() {
            Ok(()) => Ok(IoPath::Uring),
            Err(why) => {
                notes.push(format!(
                    "io_uring unavailable ({why}); using the thread pool"
                ));
                Ok(IoPath::Threads)
            }
        },
    }
}

/// The body of [`super::copy_file`]: the copier's own temporary file at `dst`, committed
/// when the copy is complete.
pub(crate) fn run(
    src: &Path,
    dst: &Path,
    options: &CopyOptions,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    validate(options)?;
    let dst = dest::resolve_destination(src, dst)?;
    let mut notes = Vec::new();
    let temp = TempFile::create(&dst, options.direct_write, dest::PRIVATE_MODE, &mut notes)?;
    tracing::debug!(
        "copying {} to {} via {}",
        src.display(),
        dst.display(),
        temp.temp_path().display()
    );
    fill(
        src,
        Box::new(temp),
        options,
        None,
        progress,
        cancel,
        notes,
        started,
    )
}

/// Copies `src` into a sink that its owner (the store) created, and commits it through
/// [`Sink::commit`] once the copy is complete; dropped on error (the owner removes it). The
/// speed path is [`super::copy_file`]'s, only the file comes from outside.
pub fn copy_into(
    src: &Path,
    sink: Box<dyn Sink + '_>,
    options: &CopyOptions,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<CopyReport, CopyError> {
    let mut notes = Vec::new();
    if let Some(note) = sink.note() {
        notes.push(note.to_string());
    }
    fill(
        src,
        sink,
        options,
        None,
        progress,
        cancel,
        notes,
        Instant::now(),
    )
}

/// [`copy_into`], rewriting the backing file name in the copy's qcow2 header on the way
/// (see [`super::header`]): the digests are those of the written file, and the report's
/// `header_rewrite` says whether the name was written (and, if not, why) and carries the
/// source's own first-chunk digest and manifest root. When the rewrite is refused the copy
/// is the source byte for byte; the caller decides what to do (rebase it after the copy).
pub fn copy_into_renaming_backing(
    src: &Path,
    sink: Box<dyn Sink + '_>,
    options: &CopyOptions,
    rename: &BackingRename,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<CopyReport, CopyError> {
    let mut notes = Vec::new();
    if let Some(note) = sink.note() {
        notes.push(note.to_string());
    }
    let rewrite = Rewrite::new(rename);
    fill(
        src,
        sink,
        options,
        Some(&rewrite),
        progress,
        cancel,
        notes,
        Instant::now(),
    )
}

/// Copies `src` into the sink's file (preallocated, then written by the chosen engine, the
/// O_DIRECT padding cut off), hashing on the way, and commits it.
#[allow(clippy::too_many_arguments)]
fn fill(
    src: &Path,
    sink: Box<dyn Sink + '_>,
    options: &CopyOptions,
    rewrite: Option<&Rewrite>,
    progress: &dyn Progress,
    cancel: &CancelToken,
    mut notes: Vec<String>,
    started: Instant,
) -> Result<CopyReport, CopyError> {
    let mut settings = validate(options)?;
    let dst = sink.path().to_owned();
    let io = choose_io(settings.io, &mut notes)?;
    settings.io = io;
    let source = dest::open_source(src, settings.direct_read, &mut notes)?;
    settings.direct_read = source.direct;
    let size = source.size;
    settings.direct_write = sink.is_direct();
    let dst_file = sink.file();
    tracing::debug!(
        "copying {} ({size} bytes) to {}",
        src.display(),
        dst.display()
    );
    dst_file
        .set_len(size)
        .map_err(|e| CopyError::write(&dst, 0, e))?;

    let pool = Pool::new(settings.queue_depth, settings.buffer_size);
    let back_reader = if settings.read_back {
        open_read_back(dst_file, &dst, settings.direct_write, &mut notes)
    } else {
        None
    };
    settings.read_back = back_reader.is_some();
    let back_pool = back_reader
        .as_ref()
        .map(|_| Pool::new(settings.queue_depth, settings.buffer_size));
    let job = Job {
        src: &source.file,
        src_path: src,
        dst: dst_file,
        dst_path: &dst,
        size,
        zero_as_holes: settings.zero_as_holes,
        direct_read: source.direct,
        direct_write: settings.direct_write,
        cancel,
        pool: &pool,
        io_threads: threads::io_threads(settings.queue_depth),
        register_buffers: true,
        rewrite,
        read_back: back_reader
            .as_ref()
            .zip(back_pool.as_ref())
            .map(|(file, pool)| ReadBack { file, pool }),
        max_rate: settings.max_rate,
    };
    let hash = HashSettings {
        mode: settings.hash,
        chunk_size: settings.chunk_size,
        workers: settings.hash_workers,
        size,
        hold: (settings.queue_depth / 2).max(1),
    };
    // The whole-file hasher may let go of blocks and read them back later only where that
    // read is cheap: a destination written through this host's page cache. Written with
    // O_DIRECT (every backup), the read would go back to the device or across the NFS link; the
    // hasher then keeps its blocks and paces the copy, which ends with it anyway
    // (docs/performance.md, section 9: 1.89 × faster on a sparse image).
    let reader = if settings.direct_write {
        None
    } else {
        reopen_for_reading(dst_file, &dst)
    };
    let reread = reader
        .as_ref()
        .map(|file| hashing::Reread { file, path: &dst });
    let what = src.file_name().map_or_else(
        || src.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let ticker = Ticker::new(progress, what, size);
    let engine: Engine = match io {
        IoPath::Uring => uring::run,
        _ => threads::run,
    };
    let planner = Planner::new(&source.file, size, settings.buffer_size);
    let (tx, rx) = crossbeam_channel::unbounded::<Item>();
    let (stats, hashes, flushed) = std::thread::scope(|s| {
        let hasher = s.spawn(|| hashing::consume(rx, hash, reread, &ticker));
        let stats = engine(&job, planner, tx, &mut notes);
        // Every write has completed; the hashers may still be behind (on a sparse image the
        // whole-file digest of the holes outlasts the copy). Flush the written data to the
        // device meanwhile, rather than after them: the commit's fsync then finds it clean.
        let flush =
            (stats.is_ok() && !settings.direct_write).then(|| s.spawn(|| dst_file.sync_data()));
        let hashes = match hasher.join() {
            Ok(h) => h,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let flushed = match flush.map(|f| f.join()) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
        };
        (stats, hashes, flushed)
    });
    let stats = stats?;
    flushed.map_err(|e| CopyError::write(&dst, size, e))?;
    if let Some(e) = hashes.error {
        return Err(e);
    }
    let hashes = HashResult {
        error: None,
        ..hashes
    };
    check_unchanged(&source.file, src, size)?;
    if cancel.is_cancelled() {
        return Err(CopyError::Cancelled {
            path: src.to_owned(),
            offset: size,
        });
    }
    if settings.direct_write && size % 4096 != 0 {
        // O_DIRECT writes were padded to the alignment: cut the padding off.
        dst_file
            .set_len(size)
            .map_err(|e| CopyError::write(&dst, size, e))?;
    }
    sink.commit().map_err(|e| CopyError::write(&dst, size, e))?;
    ticker.finish(size);
    let header_rewrite = rewrite.map(|r| rewrite_outcome(r, src, size, &settings, &hashes));
    for note in &notes {
        tracing::info!("{note}");
        progress.message(Level::Info, note);
    }
    let mut report = build_report(src, &dst, size, settings, io, stats, hashes, notes, started);
    report.header_rewrite = header_rewrite;
    Ok(report)
}

/// The destination opened again for reading (through `/proc/self/fd`, so it is the same file
/// whatever its name; without O_DIRECT, so a block whose write completed is read back from the
/// page cache or the share), for the whole-file hasher to read back blocks it let go. `None`
/// (with a debug line) when that is refused: the hasher then keeps every block it is handed.
fn reopen_for_reading(dst: &File, path: &Path) -> Option<File> {
    use std::os::fd::AsRawFd;
    match File::open(format!("/proc/self/fd/{}", dst.as_raw_fd())) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::debug!(
                "cannot open {} again for reading ({e}); the whole-file hasher keeps its blocks",
                path.display()
            );
            None
        }
    }
}

/// The destination opened again read-only with O_DIRECT (through `/proc/self/fd`), for
/// reading written blocks back from the share rather than from this host's page cache. `None`,
/// with a note, when the destination is not written with O_DIRECT (a buffered read-back would
/// prove nothing) or refuses an O_DIRECT reader: the caller then re-reads the file after the
/// copy, as without the option.
fn open_read_back(
    dst: &File,
    path: &Path,
    direct_write: bool,
    notes: &mut Vec<String>,
) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if !direct_write {
        notes.push(format!(
            "{}: no read-back during the copy (the destination is written through the page \
             cache, which would answer it)",
            path.display()
        ));
        return None;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", dst.as_raw_fd()))
    {
        Ok(f) => Some(f),
        Err(e) => {
            notes.push(format!(
                "{}: no read-back during the copy (O_DIRECT reader refused: {e})",
                path.display()
            ));
            None
        }
    }
}

/// What became of a header rewrite; when it was applied and chunks were hashed, the source's
/// own first-chunk digest (read again from the source: at most one chunk) and manifest root.
fn rewrite_outcome(
    rewrite: &Rewrite,
    src: &Path,
    size: u64,
    settings: &CopyOptions,
    hashes: &HashResult,
) -> HeaderRewrite {
    let new_name = rewrite.new_name().to_string();
    let done = match rewrite.take() {
        Ok(done) => done,
        Err(why) => {
            return HeaderRewrite {
                applied: false,
                old_name: None,
                new_name,
                reason: why.to_string(),
                source_chunk0: None,
                source_root: None,
            }
        }
    };
    let mut out = HeaderRewrite {
        applied: true,
        old_name: Some(done.old_name),
        new_name,
        reason: String::new(),
        source_chunk0: None,
        source_root: None,
    };
    if let Some(chunks) = hashes.chunks.as_ref().filter(|c| !c.is_empty()) {
        let len = settings.chunk_size.min(size);
        match first_chunk_digest(src, len) {
            Ok(d) => {
                let mut digests: Vec<[u8; 32]> = chunks.iter().map(|c| c.digest).collect();
                digests[0] = d;
                out.source_chunk0 = Some(hex::encode(d));
                out.source_root = Some(hex::encode(hashing::root_digest(&digests)));
            }
            Err(e) => tracing::warn!(
                "cannot read the first chunk of {} again for its own digest: {e}",
                src.display()
            ),
        }
    }
    out
}

/// SHA-256 of the first `len` bytes of `path` (holes read as zeros, like the hashers see them).
fn first_chunk_digest(path: &Path, len: u64) -> std::io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path)?.take(len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
        h.update(&buf[..n]);
    }
    if got != len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    Ok(h.finalize().into())
}

/// The source must still have the size it had at the start.
fn check_unchanged(file: &File, path: &Path, size: u64) -> Result<(), CopyError> {
    let meta = file
        .metadata()
        .map_err(|e| CopyError::read(path, size, e))?;
    if meta.is_file() && meta.len() != size {
        return Err(CopyError::SourceChanged {
            path: path.to_owned(),
            offset: meta.len().min(size),
            detail: format!("size changed from {size} to {} bytes", meta.len()),
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    src: &Path,
    dst: &Path,
    size: u64,
    settings: CopyOptions,
    io: IoPath,
    stats: IoStats,
    hashes: HashResult,
    notes: Vec<String>,
    started: Instant,
) -> CopyReport {
    let duration = started.elapsed();
    let manifest = hashes.chunks.as_ref().map(|chunks| {
        let digests: Vec<[u8; 32]> = chunks.iter().map(|c| c.digest).collect();
        ChunkManifest {
            chunk_size: settings.chunk_size,
            file_size: size,
            digests: digests.iter().map(hex::encode).collect(),
            zero_chunks: chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.zero)
                .map(|(i, _)| i as u64)
                .collect(),
            root: hex::encode(hashing::root_digest(&digests)),
        }
    });
    let secs = duration.as_secs_f64();
    CopyReport {
        source: src.to_owned(),
        destination: dst.to_owned(),
        logical_size: size,
        bytes_read: stats.bytes_read,
        bytes_written: stats.bytes_written,
        holes_skipped: stats.holes_skipped,
        zero_chunks: manifest.as_ref().map_or(0, |m| m.zero_chunks.len() as u64),
        sha256: hashes.file.map(hex::encode),
        manifest,
        duration,
        bytes_per_sec: if secs > 0.0 { size as f64 / secs } else { 0.0 },
        io_path: io,
        settings,
        notes,
        zero_bytes_skipped: stats.zero_bytes_skipped,
        header_rewrite: None,
        bytes_read_back: stats.bytes_read_back,
    }
}
