//! The C ABI declared in `include/vm_backup.h`: the contract between the Bacula plugin shim
//! (`c-shim/`) and the engine. Every entry point catches panics so that none crosses into C.
//!
//! ## Conventions of every `vmb_*` function
//!
//! - It returns a [`vmb_status`]; [`vmb_status::VMB_OK`] is 0. The only exceptions are calls
//!   that cannot fail: the destructors (`vmb_*_free`), `vmb_cancel_request`, and the getters
//!   and predicates that return their value (`vmb_version`, `vmb_abi_version`,
//!   `vmb_status_str`, `vmb_cancel_is_requested`, `vmb_is_our_command`, `vmb_is_our_path`,
//!   `vmb_plugin_date`, `vmb_plugin_description`).
//! - Its last parameter is `char **error`. When not NULL, `*error` is set to NULL on entry and,
//!   on failure, to a message allocated by Rust that the caller frees with `vmb_string_free`.
//! - Results come back through out-parameters, written only on success.
//! - Strings in are NUL-terminated UTF-8; a NULL where a value is required gives
//!   `VMB_ERR_NULL_ARGUMENT`, bytes that are not UTF-8 give `VMB_ERR_INVALID_ARGUMENT`.
//! - Progress and log lines reach the caller through a [`vmb_progress_fn`] and a `vmb_log_fn`
//!   with one `user_data` pointer; both may be NULL. They are never called concurrently, but
//!   may be called from an engine thread other than the caller's.
//! - A long call can be cancelled from any thread through a [`vmb_cancel`] handle.
//!
//! ## Adding entry points
//!
//! Write `pub unsafe extern "C" fn vmb_…(…, error: *mut *mut c_char) -> vmb_status` with
//! `#[no_mangle]`, and make its whole body one [`ffi_call`], using [`str_arg`]/[`path_arg`] for
//! strings, [`out_arg`]/[`opt_arg`] for pointers, [`CallbackSink`] for the callbacks and
//! [`cancel_token`] for the cancel handle. Errors become an [`FfiError`] (via `?` from any
//! engine error). Then regenerate the header: `VMB_BLESS=1 cargo test --test c_abi_header`.

// The names of this module are the C names of the header, so that both read alike.
#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod copy;
pub mod job;

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use crate::copier::CopyError;
use crate::progress::{CancelToken, Level, Progress, Transfer};

/// The version of the C ABI described by the header; bumped on every incompatible change
/// (2: the job functions return a `vmb_status` and fill `char **error`).
pub const VMB_ABI_VERSION: u32 = 2;

/// The result of every call of the C ABI. Values are stable; new ones are only appended.
/// cbindgen:rename-all=None
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vmb_status {
    /// Success.
    VMB_OK = 0,
    /// A required pointer argument was NULL.
    VMB_ERR_NULL_ARGUMENT = 1,
    /// An argument was invalid: not UTF-8, an unknown enum value, an impossible setting, a
    /// malformed manifest.
    VMB_ERR_INVALID_ARGUMENT = 2,
    /// An I/O error (open, read, write, sync, rename), named in the message with its path.
    VMB_ERR_IO = 3,
    /// Verification found data that does not match its manifest or checksum.
    VMB_ERR_VERIFY_MISMATCH = 4,
    /// The call was cancelled through its `vmb_cancel` handle; partial output was removed.
    VMB_ERR_CANCELLED = 5,
    /// The request cannot be served here (e.g. io_uring asked for but unavailable).
    VMB_ERR_UNSUPPORTED = 6,
    /// Any other failure of the engine, described by the message.
    VMB_ERR_FAILED = 7,
    /// A bug: the engine panicked. The message says where; the process state is intact.
    VMB_ERR_PANIC = 8,
}

impl vmb_status {
    /// A short, static description.
    pub fn describe(self) -> &'static CStr {
        match self {
            vmb_status::VMB_OK => c"success",
            vmb_status::VMB_ERR_NULL_ARGUMENT => c"a required argument was NULL",
            vmb_status::VMB_ERR_INVALID_ARGUMENT => c"invalid argument",
            vmb_status::VMB_ERR_IO => c"input/output error",
            vmb_status::VMB_ERR_VERIFY_MISMATCH => c"data does not match its manifest",
            vmb_status::VMB_ERR_CANCELLED => c"cancelled",
            vmb_status::VMB_ERR_UNSUPPORTED => c"not supported here",
            vmb_status::VMB_ERR_FAILED => c"failed",
            vmb_status::VMB_ERR_PANIC => c"internal error (panic)",
        }
    }
}

/// The importance of a log line passed to a `vmb_log_fn`; maps onto Bacula's M_INFO,
/// M_WARNING and M_ERROR.
/// cbindgen:rename-all=None
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vmb_log_level {
    /// Progress and ordinary events.
    VMB_LOG_INFO = 0,
    /// Something the operator should look at; the call still succeeds.
    VMB_LOG_WARNING = 1,
    /// A failure.
    VMB_LOG_ERROR = 2,
}

impl From<Level> for vmb_log_level {
    fn from(level: Level) -> Self {
        match level {
            Level::Info => vmb_log_level::VMB_LOG_INFO,
            Level::Warning => vmb_log_level::VMB_LOG_WARNING,
            Level::Error => vmb_log_level::VMB_LOG_ERROR,
        }
    }
}

/// Progress of a transfer: `what` names it (a file or disk; valid during the call only),
/// `done` of `total` bytes, at an average `bytes_per_sec` since its start.
pub type vmb_progress_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        what: *const c_char,
        done: u64,
        total: u64,
        bytes_per_sec: f64,
    ),
>;

/// A log line for the operator; `text` is valid during the call only.
pub type vmb_log_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, level: vmb_log_level, text: *const c_char)>;

/// A cancellation handle: created by `vmb_cancel_new`, passed to long calls, requested from
/// any thread with `vmb_cancel_request`, freed with `vmb_cancel_free` once no call uses it.
pub struct vmb_cancel {
    token: CancelToken,
}

/// A failure to report through the C ABI: a status and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FfiError {
    /// The status returned to C.
    pub(crate) status: vmb_status,
    /// The message given to C through `char **error`.
    pub(crate) message: String,
}

impl FfiError {
    /// An error with a status and a message.
    pub(crate) fn new(status: vmb_status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A required pointer argument named `name` was NULL.
    pub(crate) fn null(name: &str) -> Self {
        Self::new(
            vmb_status::VMB_ERR_NULL_ARGUMENT,
            format!("argument `{name}` must not be NULL"),
        )
    }

    /// An argument was invalid.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(vmb_status::VMB_ERR_INVALID_ARGUMENT, message)
    }
}

/// The message of an error with its chain of causes, on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

impl From<CopyError> for FfiError {
    fn from(error: CopyError) -> Self {
        let status = copy::status_of(&error);
        Self::new(status, error_chain(&error))
    }
}

impl From<crate::Error> for FfiError {
    fn from(error: crate::Error) -> Self {
        use crate::Error as E;
        let status = match &error {
            E::Copy(e) => copy::status_of(e),
            E::Io { .. } => vmb_status::VMB_ERR_IO,
            E::Config(_) | E::Plugin(_) | E::Layout(_) => vmb_status::VMB_ERR_INVALID_ARGUMENT,
            _ => vmb_status::VMB_ERR_FAILED,
        };
        Self::new(status, error_chain(&error))
    }
}

/// The status for a failure of a kind (see [`crate::ErrorKind`]).
pub(crate) fn status_of_kind(kind: crate::ErrorKind) -> vmb_status {
    use crate::ErrorKind as K;
    match kind {
        K::InvalidInput | K::Config => vmb_status::VMB_ERR_INVALID_ARGUMENT,
        K::TargetMissing | K::TargetFull | K::TargetFailing | K::Io => vmb_status::VMB_ERR_IO,
        K::Corrupt => vmb_status::VMB_ERR_VERIFY_MISMATCH,
        K::Cancelled => vmb_status::VMB_ERR_CANCELLED,
        K::NotFound | K::Busy | K::GuestAgent | K::Libvirt | K::Tool | K::Internal => {
            vmb_status::VMB_ERR_FAILED
        }
    }
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Runs the body of the entry point `name`: clears `*error`, catches any panic, and turns a
/// failure into its status and a message stored in `*error`. Every entry point that returns a
/// status is one call of this.
///
/// `error` must be NULL or point to writable storage for one pointer (the C contract).
pub(crate) fn ffi_call<F>(name: &str, error: *mut *mut c_char, body: F) -> vmb_status
where
    F: FnOnce() -> Result<(), FfiError>,
{
    ffi_call_prefixed(name, "", error, body)
}

/// [`ffi_call`] whose failure messages start with `prefix: ` (the job functions name the
/// plugin, so that the shim sends their messages to the job log as they are).
pub(crate) fn ffi_call_prefixed<F>(
    name: &str,
    prefix: &str,
    error: *mut *mut c_char,
    body: F,
) -> vmb_status
where
    F: FnOnce() -> Result<(), FfiError>,
{
    // SAFETY: the caller of the entry point passes NULL or a valid `char **` (the header's
    // contract); store_error checks for NULL.
    unsafe { store_error(error, None) };
    // The body's captured state is not used again after a panic: we only report it, so
    // asserting unwind safety cannot expose a broken invariant.
    let outcome = panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        Err(FfiError::new(
            vmb_status::VMB_ERR_PANIC,
            format!(
                "internal error in {name}: the engine panicked: {}",
                panic_text(payload.as_ref())
            ),
        ))
    });
    match outcome {
        Ok(()) => vmb_status::VMB_OK,
        Err(mut e) => {
            if !prefix.is_empty() {
                e.message = format!("{prefix}: {}", e.message);
            }
            tracing::debug!(function = name, status = ?e.status, "{}", e.message);
            // SAFETY: as above.
            unsafe { store_error(error, Some(&e.message)) };
            e.status
        }
    }
}

/// Runs the body of an entry point that cannot report a status (a `void` or value-returning
/// function), returning `fallback` if it panics.
pub(crate) fn ffi_guard<T, F>(name: &str, fallback: T, body: F) -> T
where
    F: FnOnce() -> T,
{
    panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        tracing::error!(
            function = name,
            "the engine panicked: {}",
            panic_text(payload.as_ref())
        );
        fallback
    })
}

/// A C string allocated by Rust, to be freed with `vmb_string_free`. Interior NULs (which a
/// C string cannot hold) are replaced by spaces.
pub(crate) fn c_string(text: &str) -> *mut c_char {
    let bytes: Vec<u8> = text
        .bytes()
        .map(|b| if b == 0 { b' ' } else { b })
        .collect();
    CString::new(bytes).unwrap_or_default().into_raw()
}

/// A static C string for `text`, made once in `cell` (for the getters that return a string the
/// caller never frees).
pub(crate) fn static_c_str(cell: &'static OnceLock<CString>, text: &str) -> *const c_char {
    cell.get_or_init(|| CString::new(text.replace('\0', " ")).unwrap_or_default())
        .as_ptr()
}

/// Stores `message` (or NULL) into `*error` when `error` is not NULL.
///
/// # Safety
/// `error` must be NULL or valid for writing one pointer.
pub(crate) unsafe fn store_error(error: *mut *mut c_char, message: Option<&str>) {
    if error.is_null() {
        return;
    }
    let value = message.map_or(std::ptr::null_mut(), c_string);
    // SAFETY: `error` is not NULL and, by this function's contract, valid for writes.
    unsafe { error.write(value) };
}

/// Borrows a required NUL-terminated UTF-8 string argument named `name`.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, FfiError> {
    if ptr.is_null() {
        return Err(FfiError::null(name));
    }
    // SAFETY: not NULL, and NUL-terminated and alive for 'a by this function's contract.
    let c_str = unsafe { CStr::from_ptr(ptr) };
    c_str
        .to_str()
        .map_err(|e| FfiError::invalid(format!("argument `{name}` is not valid UTF-8: {e}")))
}

/// Borrows an optional string argument: NULL gives `None`.
///
/// # Safety
/// As [`str_arg`].
pub(crate) unsafe fn opt_str_arg<'a>(
    ptr: *const c_char,
    name: &str,
) -> Result<Option<&'a str>, FfiError> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: same contract as ours.
        unsafe { str_arg(ptr, name) }.map(Some)
    }
}

/// Borrows a required, non-empty path argument.
///
/// # Safety
/// As [`str_arg`].
pub(crate) unsafe fn path_arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a Path, FfiError> {
    // SAFETY: same contract as ours.
    let text = unsafe { str_arg(ptr, name) }?;
    if text.is_empty() {
        return Err(FfiError::invalid(format!(
            "argument `{name}` is an empty path"
        )));
    }
    Ok(Path::new(text))
}

/// Borrows a required output argument.
///
/// # Safety
/// `ptr` must be NULL or valid for reads and writes of a `T`, not aliased during `'a`.
pub(crate) unsafe fn out_arg<'a, T>(ptr: *mut T, name: &str) -> Result<&'a mut T, FfiError> {
    // SAFETY: by this function's contract, a non-NULL `ptr` is valid and unaliased.
    unsafe { ptr.as_mut() }.ok_or_else(|| FfiError::null(name))
}

/// Borrows an optional input argument: NULL gives `None`.
///
/// # Safety
/// `ptr` must be NULL or valid for reads of a `T` during `'a`.
pub(crate) unsafe fn opt_arg<'a, T>(ptr: *const T) -> Option<&'a T> {
    // SAFETY: by this function's contract, a non-NULL `ptr` is valid.
    unsafe { ptr.as_ref() }
}

/// The engine's token for a cancel handle; NULL gives a token nobody cancels.
///
/// # Safety
/// `cancel` must be NULL or a handle from `vmb_cancel_new` not yet freed.
pub(crate) unsafe fn cancel_token(cancel: *const vmb_cancel) -> CancelToken {
    // SAFETY: by this function's contract, a non-NULL handle is alive.
    match unsafe { cancel.as_ref() } {
        Some(handle) => handle.token.clone(),
        None => CancelToken::new(),
    }
}

/// Copies `text` (ASCII, e.g. a hex digest) into a fixed C buffer, NUL-terminated, truncating
/// if needed; an empty string when `text` is `None`.
pub(crate) fn fill_c_buffer<const N: usize>(buffer: &mut [c_char; N], text: Option<&str>) {
    buffer.fill(0);
    if let Some(text) = text {
        for (slot, byte) in buffer
            .iter_mut()
            .zip(text.bytes().take(N.saturating_sub(1)))
        {
            *slot = byte as c_char;
        }
    }
}

/// The C caller's callbacks as the engine's [`Progress`] sink.
pub(crate) struct CallbackSink {
    progress: vmb_progress_fn,
    log: vmb_log_fn,
    user_data: *mut c_void,
    /// Serialises the calls so that C never sees two at once.
    lock: Mutex<()>,
}

impl CallbackSink {
    /// Wraps the callbacks (either may be NULL) and their user data.
    pub(crate) fn new(progress: vmb_progress_fn, log: vmb_log_fn, user_data: *mut c_void) -> Self {
        Self {
            progress,
            log,
            user_data,
            lock: Mutex::new(()),
        }
    }
}

// SAFETY: the header documents that the callbacks may be called from an engine thread, never
// concurrently (the mutex above serialises them); the C caller guarantees that `user_data` may
// be used that way. The sink only lives for the duration of one call.
unsafe impl Send for CallbackSink {}
// SAFETY: as for Send; every use of the raw pointer happens under `lock`.
unsafe impl Sync for CallbackSink {}

impl Progress for CallbackSink {
    fn transfer(&self, what: &str, transfer: Transfer) {
        let Some(callback) = self.progress else {
            return;
        };
        let what = CString::new(what.replace('\0', " ")).unwrap_or_default();
        let _serial = self
            .lock
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        // SAFETY: the callback and user_data come from the caller, who guarantees they are valid
        // for the duration of the call; `what` outlives the call.
        unsafe {
            callback(
                self.user_data,
                what.as_ptr(),
                transfer.done,
                transfer.total,
                transfer.bytes_per_sec,
            )
        };
    }

    fn message(&self, level: Level, text: &str) {
        let Some(callback) = self.log else {
            return;
        };
        let text = CString::new(text.replace('\0', " ")).unwrap_or_default();
        let _serial = self
            .lock
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        // SAFETY: as in `transfer`.
        unsafe { callback(self.user_data, level.into(), text.as_ptr()) };
    }
}

/// The version of the library, e.g. "0.1.0"; a static string, never freed.
#[no_mangle]
pub extern "C" fn vmb_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    ffi_guard("vmb_version", c"unknown".as_ptr(), || VERSION.as_ptr())
}

/// The ABI version of the library; compare with `VMB_ABI_VERSION` from the header.
#[no_mangle]
pub extern "C" fn vmb_abi_version() -> u32 {
    ffi_guard("vmb_abi_version", VMB_ABI_VERSION, || VMB_ABI_VERSION)
}

/// A short static description of a status (never NULL, never freed).
#[no_mangle]
pub extern "C" fn vmb_status_str(status: vmb_status) -> *const c_char {
    ffi_guard("vmb_status_str", c"unknown status".as_ptr(), || {
        status.describe().as_ptr()
    })
}

/// Frees a string returned by the library (an error message); NULL is ignored.
///
/// # Safety
/// `text` must be NULL or a string allocated by this library, not freed before.
#[no_mangle]
pub unsafe extern "C" fn vmb_string_free(text: *mut c_char) {
    ffi_guard("vmb_string_free", (), || {
        if !text.is_null() {
            // SAFETY: by the contract, `text` came from CString::into_raw in this library and
            // is freed once.
            drop(unsafe { CString::from_raw(text) });
        }
    })
}

/// A new cancellation handle (not cancelled), or NULL if it cannot be allocated.
#[no_mangle]
pub extern "C" fn vmb_cancel_new() -> *mut vmb_cancel {
    ffi_guard("vmb_cancel_new", std::ptr::null_mut(), || {
        Box::into_raw(Box::new(vmb_cancel {
            token: CancelToken::new(),
        }))
    })
}

/// Requests cancellation of every call using `cancel`; safe from any thread, including a
/// signal-free monitoring thread while a call runs. NULL is ignored.
///
/// # Safety
/// `cancel` must be NULL or a handle from `vmb_cancel_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn vmb_cancel_request(cancel: *const vmb_cancel) {
    ffi_guard("vmb_cancel_request", (), || {
        // SAFETY: by the contract, a non-NULL handle is alive.
        if let Some(handle) = unsafe { cancel.as_ref() } {
            handle.token.cancel();
        }
    })
}

/// Whether cancellation was requested on `cancel` (false for NULL).
///
/// # Safety
/// As `vmb_cancel_request`.
#[no_mangle]
pub unsafe extern "C" fn vmb_cancel_is_requested(cancel: *const vmb_cancel) -> bool {
    ffi_guard("vmb_cancel_is_requested", false, || {
        // SAFETY: by the contract, a non-NULL handle is alive.
        unsafe { cancel.as_ref() }.is_some_and(|handle| handle.token.is_cancelled())
    })
}

/// Frees a cancellation handle; NULL is ignored. Only once no call uses it any more.
///
/// # Safety
/// `cancel` must be NULL or a handle from `vmb_cancel_new`, freed once.
#[no_mangle]
pub unsafe extern "C" fn vmb_cancel_free(cancel: *mut vmb_cancel) {
    ffi_guard("vmb_cancel_free", (), || {
        if !cancel.is_null() {
            // SAFETY: by the contract, `cancel` came from Box::into_raw in vmb_cancel_new and is
            // freed once.
            drop(unsafe { Box::from_raw(cancel) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Takes a message out of an error out-parameter, freeing it.
    fn take_error(error: *mut c_char) -> Option<String> {
        if error.is_null() {
            return None;
        }
        // SAFETY: test: `error` came from store_error.
        let text = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: freed once.
        unsafe { vmb_string_free(error) };
        Some(text)
    }

    #[test]
    fn panic_becomes_status_and_message() {
        let mut error: *mut c_char = std::ptr::null_mut();
        let status = ffi_call("vmb_test", &mut error, || panic!("boom {}", 42));
        assert_eq!(status, vmb_status::VMB_ERR_PANIC);
        let message = take_error(error).expect("message");
        assert!(
            message.contains("vmb_test") && message.contains("boom 42"),
            "{message}"
        );
    }

    #[test]
    fn success_clears_a_stale_error_pointer() {
        let mut error: *mut c_char = std::ptr::dangling_mut::<c_char>();
        let status = ffi_call("vmb_test", &mut error, || Ok(()));
        assert_eq!(status, vmb_status::VMB_OK);
        assert!(error.is_null());
    }

    #[test]
    fn failure_without_error_pointer_still_returns_status() {
        let status = ffi_call("vmb_test", std::ptr::null_mut(), || {
            Err(FfiError::invalid("nope"))
        });
        assert_eq!(status, vmb_status::VMB_ERR_INVALID_ARGUMENT);
    }

    #[test]
    fn string_arguments_are_checked() {
        // SAFETY: test: NULL and valid NUL-terminated literals.
        unsafe {
            let null = str_arg(std::ptr::null(), "src").unwrap_err();
            assert_eq!(null.status, vmb_status::VMB_ERR_NULL_ARGUMENT);
            assert!(null.message.contains("`src`"));
            let bad = str_arg(c"a\xffb".as_ptr(), "dst").unwrap_err();
            assert_eq!(bad.status, vmb_status::VMB_ERR_INVALID_ARGUMENT);
            assert!(bad.message.contains("UTF-8"));
            assert_eq!(str_arg(c"/x/y".as_ptr(), "p").unwrap(), "/x/y");
            assert!(path_arg(c"".as_ptr(), "p").is_err());
            assert_eq!(opt_str_arg(std::ptr::null(), "m").unwrap(), None);
        }
    }

    #[test]
    fn fixed_buffers_are_terminated_and_truncated() {
        let mut buffer = [1 as c_char; 5];
        fill_c_buffer(&mut buffer, Some("abcdefgh"));
        assert_eq!(buffer, [97, 98, 99, 100, 0]);
        fill_c_buffer(&mut buffer, None);
        assert_eq!(buffer, [0; 5]);
    }

    #[test]
    fn cancel_handle_reaches_the_engine_token() {
        let handle = vmb_cancel_new();
        // SAFETY: test: a live handle, freed once at the end.
        unsafe {
            let token = cancel_token(handle);
            assert!(!vmb_cancel_is_requested(handle));
            let other = handle as usize;
            std::thread::spawn(move || vmb_cancel_request(other as *const vmb_cancel))
                .join()
                .unwrap();
            assert!(token.is_cancelled());
            assert!(vmb_cancel_is_requested(handle));
            vmb_cancel_free(handle);
            assert!(!cancel_token(std::ptr::null()).is_cancelled());
        }
    }

    #[test]
    fn version_and_status_strings_are_static() {
        // SAFETY: test: static NUL-terminated strings.
        unsafe {
            assert_eq!(
                CStr::from_ptr(vmb_version()).to_str().unwrap(),
                crate::VERSION
            );
            assert_eq!(
                CStr::from_ptr(vmb_status_str(vmb_status::VMB_ERR_CANCELLED))
                    .to_str()
                    .unwrap(),
                "cancelled"
            );
        }
        assert_eq!(vmb_abi_version(), VMB_ABI_VERSION);
    }

    static CALLS: AtomicU64 = AtomicU64::new(0);

    unsafe extern "C" fn count_progress(
        user_data: *mut c_void,
        what: *const c_char,
        done: u64,
        total: u64,
        _rate: f64,
    ) {
        // SAFETY: test: user_data is the &AtomicU64 below, `what` a valid C string.
        let counter = unsafe { &*(user_data as *const AtomicU64) };
        let what = unsafe { CStr::from_ptr(what) }.to_str().unwrap();
        assert_eq!((what, done, total), ("disk a b", 5, 10));
        counter.fetch_add(1, Ordering::SeqCst);
        CALLS.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn callback_sink_forwards_progress_and_ignores_null_log() {
        let counter = AtomicU64::new(0);
        let sink = CallbackSink::new(
            Some(count_progress),
            None,
            &counter as *const AtomicU64 as *mut c_void,
        );
        let transfer = Transfer {
            done: 5,
            total: 10,
            bytes_per_sec: 1.0,
            elapsed: std::time::Duration::from_secs(1),
        };
        sink.transfer("disk a\0b", transfer);
        sink.message(Level::Warning, "not delivered");
        assert_eq!(counter.load(Ordering::SeqCst), 1);
    }
}
