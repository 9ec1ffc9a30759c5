//! The copier through the C ABI: `vmb_copy_options_default`, `vmb_copy_file` and
//! `vmb_verify_file`, with their option and result structures.

use std::ffi::{c_char, c_void};
use std::path::Path;

use super::{
    cancel_token, ffi_call, fill_c_buffer, opt_arg, opt_str_arg, out_arg, path_arg, vmb_cancel,
    vmb_log_fn, vmb_progress_fn, vmb_status, CallbackSink, FfiError,
};
use crate::copier::{self, ChunkManifest, CopyError, CopyOptions, HashMode, IoPath};

/// Which I/O engine copies the data (values of `vmb_copy_options.io_path`).
/// cbindgen:rename-all=None
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vmb_io_path {
    /// io_uring when the runtime probe allows it, otherwise the thread pool.
    VMB_IO_AUTO = 0,
    /// io_uring only (`VMB_ERR_UNSUPPORTED` when unavailable).
    VMB_IO_URING = 1,
    /// The pread/pwrite thread pool.
    VMB_IO_THREADS = 2,
}

/// What the copier hashes (values of `vmb_copy_options.hash_mode`).
/// cbindgen:rename-all=None
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vmb_hash_mode {
    /// Per-chunk digests (the manifest) and the whole-file SHA-256.
    VMB_HASH_BOTH = 0,
    /// Per-chunk digests only.
    VMB_HASH_CHUNKS = 1,
    /// The whole-file SHA-256 only.
    VMB_HASH_FILE = 2,
    /// No hashing.
    VMB_HASH_NONE = 3,
}

/// Settings of one copy; fill with `vmb_copy_options_default`, then change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct vmb_copy_options {
    /// A `vmb_io_path` value.
    pub io_path: u32,
    /// A `vmb_hash_mode` value.
    pub hash_mode: u32,
    /// Buffers in flight (at least 1).
    pub queue_depth: u32,
    /// Hashing threads (0: one per core).
    pub hash_workers: u32,
    /// Size of each buffer in bytes, a multiple of 4096.
    pub buffer_size: u64,
    /// Size of each hashed chunk in bytes, a multiple of `buffer_size`.
    pub chunk_size: u64,
    /// Open the source with O_DIRECT (falls back, and logs it, when refused).
    pub direct_read: bool,
    /// Open the destination with O_DIRECT (falls back, and logs it, when refused).
    pub direct_write: bool,
    /// Write allocated all-zero chunks as holes.
    pub zero_as_holes: bool,
}

/// What one copy did.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct vmb_copy_result {
    /// Logical size of the file in bytes.
    pub logical_size: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the destination.
    pub bytes_written: u64,
    /// Bytes of holes neither read nor written.
    pub holes_skipped: u64,
    /// Number of all-zero chunks.
    pub zero_chunks: u64,
    /// Wall time of the copy in seconds.
    pub seconds: f64,
    /// Logical bytes per second.
    pub bytes_per_sec: f64,
    /// The `vmb_io_path` that ran (`VMB_IO_URING` or `VMB_IO_THREADS`).
    pub io_path: u32,
    /// Whole-file SHA-256, lowercase hex, NUL-terminated; empty when not hashed.
    pub sha256: [c_char; 65],
    /// Root of the chunk manifest, lowercase hex, NUL-terminated; empty when not hashed.
    pub manifest_root: [c_char; 65],
}

/// What one verification found.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct vmb_verify_result {
    /// Size of the file now.
    pub file_size: u64,
    /// Size the manifest records.
    pub expected_size: u64,
    /// Chunks checked.
    pub chunks: u64,
    /// Number of chunks whose digest differs.
    pub bad_chunks: u64,
    /// Index of the first bad chunk (valid when `bad_chunks` > 0).
    pub first_bad_chunk: u64,
    /// Byte offset of the first bad chunk (valid when `bad_chunks` > 0).
    pub first_bad_offset: u64,
    /// Bytes read (holes are not read).
    pub bytes_read: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Whether the manifest's root matches its own digests.
    pub root_ok: bool,
    /// True when every chunk, the size and the root match.
    pub ok: bool,
}

/// The status for a copier error.
pub(crate) fn status_of(error: &CopyError) -> vmb_status {
    use vmb_status::*;
    // A catch-all keeps new copier errors compiling; they are reported as plain failures
    // until classified here.
    #[allow(unreachable_patterns)]
    match error {
        CopyError::BadOptions(_) => VMB_ERR_INVALID_ARGUMENT,
        CopyError::SourceOpen { .. }
        | CopyError::SourceRead { .. }
        | CopyError::DestinationFolderMissing { .. }
        | CopyError::DestinationOpen { .. }
        | CopyError::DestinationWrite { .. }
        | CopyError::NoSpace { .. }
        | CopyError::Io { .. } => VMB_ERR_IO,
        CopyError::Cancelled { .. } => VMB_ERR_CANCELLED,
        CopyError::UringUnavailable(_) => VMB_ERR_UNSUPPORTED,
        _ => VMB_ERR_FAILED,
    }
}

impl From<&CopyOptions> for vmb_copy_options {
    fn from(options: &CopyOptions) -> Self {
        let io_path = match options.io {
            IoPath::Auto => vmb_io_path::VMB_IO_AUTO,
            IoPath::Uring => vmb_io_path::VMB_IO_URING,
            IoPath::Threads => vmb_io_path::VMB_IO_THREADS,
        };
        let hash_mode = match options.hash {
            HashMode::Both => vmb_hash_mode::VMB_HASH_BOTH,
            HashMode::Chunks => vmb_hash_mode::VMB_HASH_CHUNKS,
            HashMode::File => vmb_hash_mode::VMB_HASH_FILE,
            HashMode::None => vmb_hash_mode::VMB_HASH_NONE,
        };
        Self {
            io_path: io_path as u32,
            hash_mode: hash_mode as u32,
            queue_depth: u32::try_from(options.queue_depth).unwrap_or(u32::MAX),
            hash_workers: u32::try_from(options.hash_workers).unwrap_or(u32::MAX),
            buffer_size: options.buffer_size as u64,
            chunk_size: options.chunk_size,
            direct_read: options.direct_read,
            direct_write: options.direct_write,
            zero_as_holes: options.zero_as_holes,
        }
    }
}

/// The engine's options for C options, refusing unknown enum values and sizes that do not fit.
fn options_from_c(c: &vmb_copy_options) -> Result<CopyOptions, FfiError> {
    let io = match c.io_path {
        x if x == vmb_io_path::VMB_IO_AUTO as u32 => IoPath::Auto,
        x if x == vmb_io_path::VMB_IO_URING as u32 => IoPath::Uring,
        x if x == vmb_io_path::VMB_IO_THREADS as u32 => IoPath::Threads,
        other => return Err(FfiError::invalid(format!("unknown io_path {other}"))),
    };
    let hash = match c.hash_mode {
        x if x == vmb_hash_mode::VMB_HASH_BOTH as u32 => HashMode::Both,
        x if x == vmb_hash_mode::VMB_HASH_CHUNKS as u32 => HashMode::Chunks,
        x if x == vmb_hash_mode::VMB_HASH_FILE as u32 => HashMode::File,
        x if x == vmb_hash_mode::VMB_HASH_NONE as u32 => HashMode::None,
        other => return Err(FfiError::invalid(format!("unknown hash_mode {other}"))),
    };
    let buffer_size = usize::try_from(c.buffer_size)
        .map_err(|_| FfiError::invalid(format!("buffer_size {} too large", c.buffer_size)))?;
    Ok(CopyOptions {
        io,
        queue_depth: c.queue_depth as usize,
        buffer_size,
        hash,
        chunk_size: c.chunk_size,
        hash_workers: c.hash_workers as usize,
        direct_read: c.direct_read,
        direct_write: c.direct_write,
        zero_as_holes: c.zero_as_holes,
        // Not in the C struct (its layout is the ABI): the engine's backups ask for them.
        read_back: false,
        max_rate: None,
    })
}

/// Fills `out` with the defaults of the engine.
///
/// # Safety
/// `out` must be NULL or point to writable storage for a `vmb_copy_options`; `error` must be
/// NULL or point to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn vmb_copy_options_default(
    out: *mut vmb_copy_options,
    error: *mut *mut c_char,
) -> vmb_status {
    ffi_call("vmb_copy_options_default", error, || {
        // SAFETY: by the contract, a non-NULL `out` is valid for writes.
        let out = unsafe { out_arg(out, "out") }?;
        *out = vmb_copy_options::from(&CopyOptions::default());
        Ok(())
    })
}

/// Copies `src` to `dst` atomically (a temporary file beside `dst`, synced, then renamed),
/// hashing on the way; `dst` may also be an existing folder (the source's name is kept).
///
/// - `options`: NULL for the defaults.
/// - `manifest_path`: NULL, or where to write the chunk manifest as JSON (for
///   `vmb_verify_file`); needs a hash mode with chunks.
/// - `progress`, `log`, `user_data`: callbacks (each may be NULL), see the header's top.
/// - `cancel`: NULL, or a handle whose cancellation stops the copy (`VMB_ERR_CANCELLED`, the
///   temporary file removed).
/// - `out`: NULL, or filled on success.
///
/// # Safety
/// Pointers must be NULL or valid as described in the header: strings NUL-terminated, `options`
/// readable, `out` writable, `cancel` a live handle, `error` writable; all for the whole call.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // a flat C signature is what C callers expect
pub unsafe extern "C" fn vmb_copy_file(
    src: *const c_char,
    dst: *const c_char,
    options: *const vmb_copy_options,
    manifest_path: *const c_char,
    progress: vmb_progress_fn,
    log: vmb_log_fn,
    user_data: *mut c_void,
    cancel: *const vmb_cancel,
    out: *mut vmb_copy_result,
    error: *mut *mut c_char,
) -> vmb_status {
    ffi_call("vmb_copy_file", error, || {
        // SAFETY: each pointer is NULL or valid for the call, by the function's contract.
        let (src, dst, manifest_path, options, cancel, out) = unsafe {
            (
                path_arg(src, "src")?,
                path_arg(dst, "dst")?,
                opt_str_arg(manifest_path, "manifest_path")?.map(Path::new),
                opt_arg(options),
                cancel_token(cancel),
                out.as_mut(),
            )
        };
        let options = match options {
            Some(c) => options_from_c(c)?,
            None => CopyOptions::default(),
        };
        if manifest_path.is_some() && matches!(options.hash, HashMode::File | HashMode::None) {
            return Err(FfiError::invalid(
                "a manifest was asked for, but the hash mode computes no chunk digests",
            ));
        }
        let sink = CallbackSink::new(progress, log, user_data);
        let report = copier::copy_file(src, dst, &options, &sink, &cancel)?;
        if let Some(path) = manifest_path {
            let manifest = report.manifest.as_ref().ok_or_else(|| {
                FfiError::new(
                    vmb_status::VMB_ERR_FAILED,
                    "the copier produced no chunk manifest",
                )
            })?;
            copier::write_manifest(path, manifest)?;
        }
        if let Some(out) = out {
            out.logical_size = report.logical_size;
            out.bytes_read = report.bytes_read;
            out.bytes_written = report.bytes_written;
            out.holes_skipped = report.holes_skipped;
            out.zero_chunks = report.zero_chunks;
            out.seconds = report.duration.as_secs_f64();
            out.bytes_per_sec = report.bytes_per_sec;
            out.io_path = match report.io_path {
                IoPath::Uring => vmb_io_path::VMB_IO_URING,
                IoPath::Threads => vmb_io_path::VMB_IO_THREADS,
                IoPath::Auto => vmb_io_path::VMB_IO_AUTO,
            } as u32;
            fill_c_buffer(&mut out.sha256, report.sha256.as_deref());
            fill_c_buffer(
                &mut out.manifest_root,
                report.manifest.as_ref().map(|m| m.root.as_str()),
            );
        }
        Ok(())
    })
}

/// Re-hashes `file` and compares it with the chunk manifest in `manifest_path` (JSON, as
/// written by `vmb_copy_file` or `vm-backup copy --manifest`).
///
/// Returns `VMB_OK` when every chunk, the size and the root match, and
/// `VMB_ERR_VERIFY_MISMATCH` with a message naming the first bad chunk and its byte offset when
/// not; `out` (may be NULL) is filled in both cases.
///
/// # Safety
/// As `vmb_copy_file`.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // a flat C signature is what C callers expect
pub unsafe extern "C" fn vmb_verify_file(
    file: *const c_char,
    manifest_path: *const c_char,
    progress: vmb_progress_fn,
    log: vmb_log_fn,
    user_data: *mut c_void,
    cancel: *const vmb_cancel,
    out: *mut vmb_verify_result,
    error: *mut *mut c_char,
) -> vmb_status {
    ffi_call("vmb_verify_file", error, || {
        // SAFETY: each pointer is NULL or valid for the call, by the function's contract.
        let (file, manifest_path, cancel, out) = unsafe {
            (
                path_arg(file, "file")?,
                path_arg(manifest_path, "manifest_path")?,
                cancel_token(cancel),
                out.as_mut(),
            )
        };
        let manifest = read_manifest(manifest_path)?;
        let sink = CallbackSink::new(progress, log, user_data);
        let report = copier::verify_file(file, &manifest, &sink, &cancel)?;
        if let Some(out) = out {
            *out = vmb_verify_result {
                file_size: report.file_size,
                expected_size: report.expected_size,
                chunks: report.chunks,
                bad_chunks: report.bad_chunks.len() as u64,
                first_bad_chunk: report.first_bad.as_ref().map_or(0, |b| b.index),
                first_bad_offset: report.first_bad.as_ref().map_or(0, |b| b.offset),
                bytes_read: report.bytes_read,
                seconds: report.duration.as_secs_f64(),
                root_ok: report.root_ok,
                ok: report.ok,
            };
        }
        if report.ok {
            return Ok(());
        }
        let mut problems = Vec::new();
        if report.file_size != report.expected_size {
            problems.push(format!(
                "its size is {} bytes, the manifest records {}",
                report.file_size, report.expected_size
            ));
        }
        if let Some(bad) = &report.first_bad {
            problems.push(format!(
                "first bad chunk {} at byte offset {} (expected sha256 {}, found {}); \
                 {} of {} chunks differ",
                bad.index,
                bad.offset,
                bad.expected,
                bad.actual,
                report.bad_chunks.len(),
                report.chunks
            ));
        }
        if !report.root_ok {
            problems.push("the manifest's root does not match its own digests".to_owned());
        }
        if problems.is_empty() {
            problems.push("verification failed".to_owned());
        }
        Err(FfiError::new(
            vmb_status::VMB_ERR_VERIFY_MISMATCH,
            format!(
                "{} does not match manifest {}: {}",
                file.display(),
                manifest_path.display(),
                problems.join("; ")
            ),
        ))
    })
}

/// Reads a chunk manifest written as JSON.
fn read_manifest(path: &Path) -> Result<ChunkManifest, FfiError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        FfiError::new(
            vmb_status::VMB_ERR_IO,
            format!("cannot read manifest {}: {e}", path.display()),
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| FfiError::invalid(format!("bad manifest {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn take_error(error: *mut c_char) -> String {
        assert!(!error.is_null(), "an error message was expected");
        // SAFETY: test: a message from store_error, freed once.
        unsafe {
            let text = CStr::from_ptr(error).to_string_lossy().into_owned();
            super::super::vmb_string_free(error);
            text
        }
    }

    #[test]
    fn defaults_round_trip_through_c_options() {
        let mut c = std::mem::MaybeUninit::<vmb_copy_options>::uninit();
        // SAFETY: test: `c` is writable, error may be NULL.
        let status = unsafe { vmb_copy_options_default(c.as_mut_ptr(), std::ptr::null_mut()) };
        assert_eq!(status, vmb_status::VMB_OK);
        // SAFETY: initialised by the call above.
        let c = unsafe { c.assume_init() };
        assert_eq!(options_from_c(&c).unwrap(), CopyOptions::default());
        assert_eq!(c.hash_mode, vmb_hash_mode::VMB_HASH_BOTH as u32);
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        let mut c = vmb_copy_options::from(&CopyOptions::default());
        c.io_path = 7;
        let e = options_from_c(&c).unwrap_err();
        assert_eq!(e.status, vmb_status::VMB_ERR_INVALID_ARGUMENT);
        assert!(e.message.contains("io_path 7"));
        c.io_path = 0;
        c.hash_mode = 4;
        assert!(options_from_c(&c).is_err());
    }

    #[test]
    fn null_and_bad_arguments_give_status_and_message() {
        let mut error: *mut c_char = std::ptr::null_mut();
        let null = std::ptr::null();
        // SAFETY: test: valid literals, NULLs where the contract allows them or the test wants
        // them refused.
        let status = unsafe {
            vmb_copy_file(
                null,
                c"/tmp/x".as_ptr(),
                std::ptr::null(),
                null,
                None,
                None,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null_mut(),
                &mut error,
            )
        };
        assert_eq!(status, vmb_status::VMB_ERR_NULL_ARGUMENT);
        assert!(take_error(error).contains("`src`"));

        // SAFETY: as above; the destination is not UTF-8.
        let status = unsafe {
            vmb_verify_file(
                c"/tmp/x".as_ptr(),
                c"/tmp/\xfe.json".as_ptr(),
                None,
                None,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null_mut(),
                &mut error,
            )
        };
        assert_eq!(status, vmb_status::VMB_ERR_INVALID_ARGUMENT);
        assert!(take_error(error).contains("manifest_path"));

        // SAFETY: as above.
        let status = unsafe { vmb_copy_options_default(std::ptr::null_mut(), &mut error) };
        assert_eq!(status, vmb_status::VMB_ERR_NULL_ARGUMENT);
        assert!(take_error(error).contains("`out`"));
    }

    #[test]
    fn manifest_needs_chunk_hashes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("src"), b"data").unwrap();
        let src = std::ffi::CString::new(dir.path().join("src").to_str().unwrap()).unwrap();
        let dst = std::ffi::CString::new(dir.path().join("dst").to_str().unwrap()).unwrap();
        let mut options = vmb_copy_options::from(&CopyOptions::default());
        options.hash_mode = vmb_hash_mode::VMB_HASH_FILE as u32;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: test: valid strings and options.
        let status = unsafe {
            vmb_copy_file(
                src.as_ptr(),
                dst.as_ptr(),
                &options,
                c"m.json".as_ptr(),
                None,
                None,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null_mut(),
                &mut error,
            )
        };
        assert_eq!(status, vmb_status::VMB_ERR_INVALID_ARGUMENT);
        assert!(take_error(error).contains("manifest"));
        assert!(!dir.path().join("dst").exists());
    }

    #[test]
    fn malformed_manifest_is_an_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, b"{\"chunk_size\": 1").unwrap();
        let e = read_manifest(&path).unwrap_err();
        assert_eq!(e.status, vmb_status::VMB_ERR_INVALID_ARGUMENT);
        let e = read_manifest(&dir.path().join("missing.json")).unwrap_err();
        assert_eq!(e.status, vmb_status::VMB_ERR_IO);
    }

    #[test]
    fn manifest_is_written_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let manifest = ChunkManifest {
            chunk_size: 4,
            file_size: 6,
            digests: vec!["aa".into(), "bb".into()],
            zero_chunks: vec![],
            root: "cc".into(),
        };
        copier::write_manifest(&path, &manifest).unwrap();
        assert_eq!(read_manifest(&path).unwrap(), manifest);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
