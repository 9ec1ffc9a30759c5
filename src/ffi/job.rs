//! The job functions of the C ABI (`vmb_job_*`): one [`VmbJob`] per Bacula plugin instance,
//! driven by the File Daemon shim `c-shim/vm-backup-fd.c` event by event. The logic lives in
//! [`crate::bacula::Job`]; this module only converts C values and keeps panics out of C.
//!
//! Conventions (those of the whole ABI, see [`crate::ffi`]):
//! * Every `vmb_job_*` function except [`vmb_job_free`] returns a [`vmb_status`] and takes
//!   `char **error` last; on failure `*error` holds the message for the job log, starting with
//!   the plugin's name (`vm-backup: …`), which the shim sends as a fatal job message (M_FATAL).
//!   Values come back through out-parameters, written only on success.
//! * Progress and job-log lines (not failures) go through the [`VmbJobCallbacks`] message
//!   callback, on the thread that made the current call.
//! * Every call except [`vmb_job_cancel`] is made on the File Daemon's job thread.
//!   [`vmb_job_cancel`] may be called from any thread at any time before [`vmb_job_free`].

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, MutexGuard, OnceLock};

use super::{
    error_chain, ffi_call_prefixed, ffi_guard, opt_arg, out_arg, static_c_str, status_of_kind,
    str_arg, vmb_status, FfiError,
};
use crate::bacula::{
    CreateResult, FileKind, Job, MessageLevel, MessageSink, PluginError, PLUGIN_NAME,
};
use crate::progress::CancelToken;

/// Severity of a job-log line; the shim maps it onto Bacula's M_INFO, M_WARNING, M_ERROR, M_FATAL.
/// cbindgen:rename-all=None
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmbMessageLevel {
    /// Progress and events (M_INFO).
    VMB_MESSAGE_LEVEL_INFO = 0,
    /// Worth a look; the job still ends OK (M_WARNING).
    VMB_MESSAGE_LEVEL_WARNING = 1,
    /// Counted in JobErrors: the job ends "OK -- with warnings" (M_ERROR).
    VMB_MESSAGE_LEVEL_ERROR = 2,
    /// The job fails (M_FATAL).
    VMB_MESSAGE_LEVEL_FATAL = 3,
}

impl From<MessageLevel> for VmbMessageLevel {
    fn from(level: MessageLevel) -> Self {
        match level {
            MessageLevel::Info => VmbMessageLevel::VMB_MESSAGE_LEVEL_INFO,
            MessageLevel::Warning => VmbMessageLevel::VMB_MESSAGE_LEVEL_WARNING,
            MessageLevel::Error => VmbMessageLevel::VMB_MESSAGE_LEVEL_ERROR,
            MessageLevel::Fatal => VmbMessageLevel::VMB_MESSAGE_LEVEL_FATAL,
        }
    }
}

/// The message callback: `text` is a NUL-terminated UTF-8 line without a trailing newline,
/// valid only during the call.
pub type VmbMessageFn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, level: VmbMessageLevel, text: *const c_char)>;

/// What the driver gives a new job: where its messages go.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VmbJobCallbacks {
    /// Passed back unchanged to `message` (the shim passes its Bacula context).
    pub opaque: *mut c_void,
    /// Receives job-log lines; may be NULL to drop them.
    pub message: VmbMessageFn,
}

/// Which plugin command of the File Daemon is being forwarded.
/// cbindgen:rename-all=None
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmbCommand {
    /// bEventPluginCommand (FileSet transfer): check the string only.
    VMB_COMMAND_CHECK = 0,
    /// bEventBackupCommand: run or prepare the backup.
    VMB_COMMAND_BACKUP = 1,
    /// bEventEstimateCommand: list the files, touch nothing.
    VMB_COMMAND_ESTIMATE = 2,
}

/// A regular file, a folder, or the plugin's restore options.
/// cbindgen:rename-all=None
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmbFileKind {
    /// Regular file (FT_REG).
    VMB_FILE_KIND_REGULAR = 0,
    /// Folder (FT_DIREND); no data.
    VMB_FILE_KIND_DIRECTORY = 1,
    /// The restore options restore object (FT_PLUGIN_CONFIG): `path` is the object's name,
    /// `object`/`object_len` its body; no data.
    VMB_FILE_KIND_RESTORE_OPTIONS = 2,
}

/// The next file to save, filled by [`vmb_job_next_file`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VmbFileInfo {
    /// The cataloged path; valid until the next `vmb_job_next_file` or `vmb_job_free`.
    pub path: *const c_char,
    /// Regular file or folder.
    pub kind: VmbFileKind,
    /// Permission bits (no file type bits).
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    /// True when no data is to be read (folders, estimates, restore options).
    pub no_read: bool,
    /// The restore object's body (restore options only, else NULL); valid as `path`.
    pub object: *const c_char,
    /// Its length in bytes.
    pub object_len: usize,
}

/// What to do with a file being restored.
/// cbindgen:rename-all=None
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmbCreate {
    /// Data follows (CF_EXTRACT).
    VMB_CREATE_EXTRACT = 0,
    /// Nothing to write; done (CF_CREATED).
    VMB_CREATE_CREATED = 1,
    /// Skip it (CF_SKIP).
    VMB_CREATE_SKIP = 2,
}

/// One plugin instance: the state of one Bacula job. Opaque to C.
pub struct VmbJob {
    inner: Mutex<Inner>,
    cancel: CancelToken,
}

struct Inner {
    job: Job,
    /// Storage for the path handed out by `vmb_job_next_file`.
    path: CString,
    /// Storage for the restore object body handed out by `vmb_job_next_file`.
    object: CString,
}

/// Sends job-log lines to the C callback.
struct CallbackSink(VmbJobCallbacks);

// SAFETY: the shim's opaque pointer is its Bacula context, which lives as long as the job. The
// sink is only called on the thread that is inside a `vmb_job_*` call (engine threads send their
// lines through a channel that the calling thread drains), so the callback never runs
// concurrently and never on a thread Bacula does not know.
unsafe impl Send for CallbackSink {}

impl MessageSink for CallbackSink {
    fn message(&self, level: MessageLevel, text: &str) {
        let Some(f) = self.0.message else { return };
        // Bacula formats job messages into a 2000-byte buffer: send long text in pieces.
        for line in text.lines().flat_map(|l| split_utf8(l, 1800)) {
            let clean: String = line.chars().filter(|c| *c != '\0').collect();
            if let Ok(c) = CString::new(clean) {
                // SAFETY: `f` is the driver's callback; `c` is a valid NUL-terminated string
                // for the duration of the call.
                unsafe { f(self.0.opaque, level.into(), c.as_ptr()) };
            }
        }
    }
}

fn split_utf8(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

impl VmbJob {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl From<PluginError> for FfiError {
    fn from(error: PluginError) -> Self {
        let status = status_of_kind(error.kind());
        Self::new(status, error_chain(&error))
    }
}

/// Runs the body of the job entry point `name` on `job` under the ABI's convention: a NULL job
/// is `VMB_ERR_NULL_ARGUMENT`, a failure or a panic becomes its status and a message for the
/// job log, prefixed with the plugin's name, in `*error`.
fn job_call(
    name: &str,
    job: *mut VmbJob,
    error: *mut *mut c_char,
    body: impl FnOnce(&mut Inner) -> Result<(), FfiError>,
) -> vmb_status {
    ffi_call_prefixed(name, PLUGIN_NAME, error, || {
        // SAFETY: non-null pointers come from `vmb_job_new` and stay valid until `vmb_job_free`
        // (the header's contract); only a shared reference is formed, the state is behind a
        // mutex.
        let job = unsafe { job.as_ref() }.ok_or_else(|| FfiError::null("job"))?;
        let mut inner = job.lock();
        body(&mut inner)
    })
}

/// Reads a C string argument; NULL reads as "" (the File Daemon may pass no `where`).
///
/// # Safety
/// `s` must be NULL or a valid NUL-terminated string.
unsafe fn text<'a>(s: *const c_char) -> std::borrow::Cow<'a, str> {
    if s.is_null() {
        return std::borrow::Cow::Borrowed("");
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(s) }.to_string_lossy()
}

/// Creates the state of one job into `*job_out`. Cheap, no side effects (the File Daemon
/// creates a plugin instance for every job and console command).
///
/// # Safety
/// `callbacks` must be NULL or point to a valid [`VmbJobCallbacks`] whose `opaque` stays valid
/// until [`vmb_job_free`]; `job_out` must be NULL or valid for writing; `error` as everywhere.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_new(
    callbacks: *const VmbJobCallbacks,
    job_out: *mut *mut VmbJob,
    error: *mut *mut c_char,
) -> vmb_status {
    ffi_call_prefixed("vmb_job_new", PLUGIN_NAME, error, || {
        // SAFETY: NULL or valid for reading, per the contract.
        let callbacks =
            *unsafe { opt_arg(callbacks) }.ok_or_else(|| FfiError::null("callbacks"))?;
        // SAFETY: NULL or valid for writing, per the contract.
        let out = unsafe { out_arg(job_out, "job_out") }?;
        let cancel = CancelToken::new();
        *out = Box::into_raw(Box::new(VmbJob {
            inner: Mutex::new(Inner {
                job: Job::new(Box::new(CallbackSink(callbacks)), cancel.clone()),
                path: CString::default(),
                object: CString::default(),
            }),
            cancel,
        }));
        Ok(())
    })
}

/// Frees a job. Whatever it still holds is released here: a stream-mode snapshot is committed,
/// a partial restore folder removed. Accepts NULL. Like the ABI's other destructors it returns
/// nothing: it cannot fail in a way the caller could act on.
///
/// # Safety
/// `job` must be NULL or come from [`vmb_job_new`], and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_free(job: *mut VmbJob) {
    ffi_guard("vmb_job_free", (), || {
        if !job.is_null() {
            // SAFETY: from `vmb_job_new` (Box::into_raw), freed once, per the contract.
            drop(unsafe { Box::from_raw(job) });
        }
    })
}

/// Requests cancellation; the engine stops at its next check and releases everything. Safe
/// from any thread while another call runs on the job.
///
/// # Safety
/// `job` must be NULL or a live job from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_cancel(job: *const VmbJob, error: *mut *mut c_char) -> vmb_status {
    ffi_call_prefixed("vmb_job_cancel", PLUGIN_NAME, error, || {
        // SAFETY: live per the contract; only the atomic flag is touched (no lock).
        let job = unsafe { job.as_ref() }.ok_or_else(|| FfiError::null("job"))?;
        job.cancel.cancel();
        Ok(())
    })
}

/// Event JobStart: `description` is `"JobId=N Job=<unique name>"` (NULL reads as "").
///
/// # Safety
/// `job` from [`vmb_job_new`]; `description` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_start(
    job: *mut VmbJob,
    description: *const c_char,
    error: *mut *mut c_char,
) -> vmb_status {
    // SAFETY: per the contract.
    let description = unsafe { text(description) };
    job_call("vmb_job_start", job, error, |inner| {
        inner.job.start(&description);
        Ok(())
    })
}

/// Event Level: the level letter (`'F'`, `'I'`, `'D'`…).
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_set_level(
    job: *mut VmbJob,
    level: c_int,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_set_level", job, error, |inner| {
        let letter = u8::try_from(level).map(char::from).unwrap_or('?');
        inner.job.set_level(letter);
        Ok(())
    })
}

/// Event Since: the time of the previous backup, Unix seconds.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_set_since(
    job: *mut VmbJob,
    since: i64,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_set_since", job, error, |inner| {
        inner.job.set_since(since);
        Ok(())
    })
}

/// Whether `cmd` is addressed to this plugin (`vm-backup:`, leading blanks allowed); false for
/// NULL. The rule [`crate::bacula::PluginArgs::parse`] applies.
///
/// # Safety
/// `cmd` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_is_our_command(cmd: *const c_char) -> bool {
    ffi_guard("vmb_is_our_command", false, || {
        // SAFETY: per the contract.
        !cmd.is_null() && crate::bacula::is_our_command(&unsafe { text(cmd) })
    })
}

/// Whether `path` is one of the virtual files this plugin shows to Bacula
/// (`/@vm-backup/…`); false for NULL. Accurate mode asks about files it did not see: these are
/// never "deleted".
///
/// # Safety
/// `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_is_our_path(path: *const c_char) -> bool {
    ffi_guard("vmb_is_our_path", false, || {
        // SAFETY: per the contract.
        !path.is_null() && crate::bacula::is_virtual_path(&unsafe { text(path) })
    })
}

/// The date of this version of the plugin, `YYYY-MM-DD`, as the File Daemon shows it; a static
/// string, never freed.
#[no_mangle]
pub extern "C" fn vmb_plugin_date() -> *const c_char {
    static DATE: OnceLock<CString> = OnceLock::new();
    ffi_guard("vmb_plugin_date", c"unknown".as_ptr(), || {
        static_c_str(&DATE, crate::bacula::PLUGIN_DATE)
    })
}

/// The one-line description of the plugin the File Daemon shows (its FileSet syntax); a
/// static string, never freed.
#[no_mangle]
pub extern "C" fn vmb_plugin_description() -> *const c_char {
    static DESCRIPTION: OnceLock<CString> = OnceLock::new();
    ffi_guard("vmb_plugin_description", c"vm-backup".as_ptr(), || {
        static_c_str(&DESCRIPTION, &crate::bacula::plugin_description())
    })
}

/// Events PluginCommand, BackupCommand, EstimateCommand. Backup runs the whole direct-mode
/// backup (or prepares the stream-mode session) before returning; progress goes to the job log.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `cmd` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_command(
    job: *mut VmbJob,
    kind: VmbCommand,
    cmd: *const c_char,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_command", job, error, |inner| {
        // SAFETY: per the contract.
        let cmd = unsafe { str_arg(cmd, "cmd") }?;
        match kind {
            VmbCommand::VMB_COMMAND_CHECK => inner.job.plugin_command(cmd)?,
            VmbCommand::VMB_COMMAND_BACKUP => inner.job.backup_command(cmd)?,
            VmbCommand::VMB_COMMAND_ESTIMATE => inner.job.estimate_command(cmd)?,
        }
        Ok(())
    })
}

/// startBackupFile: sets `*found` and, when a file follows, fills `*out` with it.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `out` and `found` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_next_file(
    job: *mut VmbJob,
    out: *mut VmbFileInfo,
    found: *mut bool,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_next_file", job, error, |inner| {
        // SAFETY: NULL or valid for writing, per the contract.
        let (out, found) = unsafe { (out_arg(out, "out")?, out_arg(found, "found")?) };
        let Some(file) = inner.job.next_file()? else {
            *found = false;
            return Ok(());
        };
        let info = VmbFileInfo {
            path: std::ptr::null(),
            kind: match file.kind {
                FileKind::Regular => VmbFileKind::VMB_FILE_KIND_REGULAR,
                FileKind::Directory => VmbFileKind::VMB_FILE_KIND_DIRECTORY,
                FileKind::RestoreOptions => VmbFileKind::VMB_FILE_KIND_RESTORE_OPTIONS,
            },
            mode: file.mode,
            size: file.size,
            mtime: file.mtime,
            no_read: matches!(file.content, crate::bacula::Content::Listing)
                || file.kind != FileKind::Regular,
            object: std::ptr::null(),
            object_len: 0,
        };
        let object = match (&file.kind, &file.content) {
            (FileKind::RestoreOptions, crate::bacula::Content::Bytes(b)) => Some(
                CString::new(b.clone())
                    .map_err(|_| PluginError::Protocol("restore options with a NUL byte"))?,
            ),
            _ => None,
        };
        let path = CString::new(file.path.clone())
            .map_err(|_| PluginError::BadVirtualPath(file.path.clone()))?;
        inner.path = path;
        let (object, object_len) = match object {
            Some(o) => {
                inner.object = o;
                (inner.object.as_ptr(), inner.object.as_bytes().len())
            }
            None => (std::ptr::null(), 0),
        };
        *out = VmbFileInfo {
            path: inner.path.as_ptr(),
            object,
            object_len,
            ..info
        };
        *found = true;
        Ok(())
    })
}

/// endBackupFile: sets `*more` when more files follow.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `more` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_end_file(
    job: *mut VmbJob,
    more: *mut bool,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_end_file", job, error, |inner| {
        // SAFETY: NULL or valid for writing, per the contract.
        let more = unsafe { out_arg(more, "more") }?;
        *more = inner.job.end_file()?;
        Ok(())
    })
}

/// pluginIO OPEN of the current file: for reading on backup, for writing on restore.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_open(
    job: *mut VmbJob,
    for_write: bool,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_open", job, error, |inner| {
        if for_write {
            inner.job.open_write()?;
        } else {
            inner.job.open_read()?;
        }
        Ok(())
    })
}

/// pluginIO READ: up to `len` bytes into `buf`; `*count` is the number read, 0 at the end.
/// Fails with `VMB_ERR_CANCELLED` once the job is cancelled.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `buf` valid for `len` bytes of writing; `count` valid for
/// writing.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_read(
    job: *mut VmbJob,
    buf: *mut u8,
    len: usize,
    count: *mut usize,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_read", job, error, |inner| {
        if buf.is_null() {
            return Err(FfiError::null("buf"));
        }
        // SAFETY: NULL or valid for writing, per the contract.
        let count = unsafe { out_arg(count, "count") }?;
        // SAFETY: not NULL, valid for `len` bytes of writing per the contract.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        *count = inner.job.read(buf)?;
        Ok(())
    })
}

/// pluginIO WRITE: all `len` bytes of `buf`, or a failure.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `buf` valid for `len` bytes of reading.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_write(
    job: *mut VmbJob,
    buf: *const u8,
    len: usize,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_write", job, error, |inner| {
        if buf.is_null() {
            return Err(FfiError::null("buf"));
        }
        // SAFETY: not NULL, valid for `len` bytes of reading per the contract.
        let buf = unsafe { std::slice::from_raw_parts(buf, len) };
        inner.job.write(buf)?;
        Ok(())
    })
}

/// pluginIO CLOSE.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_close(job: *mut VmbJob, error: *mut *mut c_char) -> vmb_status {
    job_call("vmb_job_close", job, error, |inner| {
        Ok(inner.job.close()?)
    })
}

/// Event RestoreCommand (before every restored file): the plugin string saved at backup time,
/// the restore's `where` (NULL reads as "") and its `replace` letter (`'a'` always, `'n'`
/// never…).
///
/// # Safety
/// `job` from [`vmb_job_new`]; `cmd` NUL-terminated; `where_` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_restore_command(
    job: *mut VmbJob,
    cmd: *const c_char,
    where_: *const c_char,
    replace: c_int,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_restore_command", job, error, |inner| {
        // SAFETY: per the contract.
        let (cmd, where_) = unsafe { (str_arg(cmd, "cmd")?, text(where_)) };
        inner
            .job
            .restore_command(cmd, &where_, replace_letter(replace))?;
        Ok(())
    })
}

fn replace_letter(replace: c_int) -> char {
    u8::try_from(replace).map(char::from).unwrap_or('a')
}

/// createFile: `ofname` is the name the File Daemon would write (`where` + cataloged path).
/// Sets `*out` to what the File Daemon should do with the file.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `ofname` NUL-terminated; `where_` NULL or NUL-terminated;
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_create_file(
    job: *mut VmbJob,
    ofname: *const c_char,
    where_: *const c_char,
    replace: c_int,
    out: *mut VmbCreate,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_create_file", job, error, |inner| {
        // SAFETY: per the contract.
        let (ofname, where_, out) = unsafe {
            (
                str_arg(ofname, "ofname")?,
                text(where_),
                out_arg(out, "out")?,
            )
        };
        let result = inner
            .job
            .create_file(ofname, &where_, replace_letter(replace))?;
        *out = match result {
            CreateResult::Extract => VmbCreate::VMB_CREATE_EXTRACT,
            CreateResult::Created => VmbCreate::VMB_CREATE_CREATED,
            CreateResult::Skip => VmbCreate::VMB_CREATE_SKIP,
        };
        Ok(())
    })
}

/// endRestoreFile: after the last file of a backup (its metadata), restores the VM.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_end_restore_file(
    job: *mut VmbJob,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_end_restore_file", job, error, |inner| {
        Ok(inner.job.end_restore_file()?)
    })
}

/// bEventRestoreObject: one restore object of the job being restored (`name`, Bacula's
/// `FT_*` type, `len` bytes of `data`). The plugin's filled restore options are kept for the
/// restore; other objects are ignored.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `name` a C string; `data` valid for `len` bytes (or NULL with 0).
#[no_mangle]
pub unsafe extern "C" fn vmb_job_restore_object(
    job: *mut VmbJob,
    name: *const c_char,
    object_type: i32,
    data: *const c_char,
    len: usize,
    error: *mut *mut c_char,
) -> vmb_status {
    job_call("vmb_job_restore_object", job, error, |inner| {
        // SAFETY: a C string per the contract (NULL is refused by str_arg).
        let name = unsafe { str_arg(name, "name") }?;
        let body = if data.is_null() || len == 0 {
            &[][..]
        } else {
            // SAFETY: valid for `len` bytes per the contract.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }
        };
        Ok(inner
            .job
            .restore_object(name, object_type, &String::from_utf8_lossy(body))?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    type Lines = Arc<Mutex<Vec<(VmbMessageLevel, String)>>>;

    unsafe extern "C" fn record(opaque: *mut c_void, level: VmbMessageLevel, text: *const c_char) {
        // SAFETY: the tests pass a `Lines` pointer as opaque, and a valid string.
        let lines = unsafe { &*(opaque as *const Mutex<Vec<(VmbMessageLevel, String)>>) };
        let text = unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned();
        lines.lock().unwrap().push((level, text));
    }

    /// Takes the message out of an error out-parameter, freeing it.
    fn take_error(error: *mut c_char) -> String {
        assert!(!error.is_null(), "a failure fills *error");
        // SAFETY: test: `error` came from the library.
        let text = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: freed once.
        unsafe { crate::ffi::vmb_string_free(error) };
        text
    }

    #[test]
    fn bad_string_fails_with_a_status_and_a_message_naming_the_key() {
        let lines: Lines = Arc::default();
        let cb = VmbJobCallbacks {
            opaque: Arc::as_ptr(&lines) as *mut c_void,
            message: Some(record),
        };
        let cmd = CString::new("vm-backup: vm=a mode=tape").unwrap();
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid pointers for the duration of the test.
        unsafe {
            let mut job: *mut VmbJob = std::ptr::null_mut();
            assert_eq!(vmb_job_new(&cb, &mut job, &mut error), vmb_status::VMB_OK);
            assert!(!job.is_null() && error.is_null());
            assert_eq!(
                vmb_job_start(job, c"JobId=7 Job=x".as_ptr(), &mut error),
                vmb_status::VMB_OK
            );
            assert_eq!(
                vmb_job_command(job, VmbCommand::VMB_COMMAND_CHECK, cmd.as_ptr(), &mut error),
                vmb_status::VMB_ERR_INVALID_ARGUMENT
            );
            let message = take_error(error);
            assert!(
                message.starts_with("vm-backup: plugin string: "),
                "{message}"
            );
            assert!(message.contains("mode=\"tape\""), "{message}");
            assert_eq!(
                vmb_job_cancel(job, std::ptr::null_mut()),
                vmb_status::VMB_OK
            );
            vmb_job_free(job);
            assert!(vmb_is_our_command(cmd.as_ptr()));
            assert!(!vmb_is_our_command(c"bpipe:/x:a:b".as_ptr()));
            assert!(!vmb_is_our_command(std::ptr::null()));
        }
        // Failures go to *error, not through the message callback.
        assert!(lines.lock().unwrap().is_empty());
    }

    #[test]
    fn null_arguments_and_out_of_order_calls_are_statuses() {
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: test: NULL where the contract allows it to be checked, live pointers else.
        unsafe {
            assert_eq!(
                vmb_job_start(std::ptr::null_mut(), std::ptr::null(), &mut error),
                vmb_status::VMB_ERR_NULL_ARGUMENT
            );
            assert!(take_error(error).contains("`job`"));
            let mut job: *mut VmbJob = std::ptr::null_mut();
            assert_eq!(
                vmb_job_new(std::ptr::null(), &mut job, &mut error),
                vmb_status::VMB_ERR_NULL_ARGUMENT
            );
            take_error(error);
            let cb = VmbJobCallbacks {
                opaque: std::ptr::null_mut(),
                message: None,
            };
            assert_eq!(vmb_job_new(&cb, &mut job, &mut error), vmb_status::VMB_OK);
            let mut info = std::mem::MaybeUninit::<VmbFileInfo>::uninit();
            let mut found = true;
            assert_eq!(
                vmb_job_next_file(job, info.as_mut_ptr(), &mut found, &mut error),
                vmb_status::VMB_ERR_FAILED
            );
            assert!(take_error(error).contains("before a backup command"));
            let mut count = 7usize;
            assert_eq!(
                vmb_job_read(job, std::ptr::null_mut(), 16, &mut count, &mut error),
                vmb_status::VMB_ERR_NULL_ARGUMENT
            );
            assert!(take_error(error).contains("`buf`"));
            assert_eq!(count, 7, "out-parameters are written only on success");
            vmb_job_free(job);
            vmb_job_free(std::ptr::null_mut());
        }
    }

    #[test]
    fn estimate_lists_files_through_the_abi() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = CString::new(format!(
            "vm-backup: vm=web01 target={}",
            dir.path().display()
        ))
        .unwrap();
        let cb = VmbJobCallbacks {
            opaque: std::ptr::null_mut(),
            message: None,
        };
        let mut error: *mut c_char = std::ptr::null_mut();
        let mut names = Vec::new();
        // SAFETY: test: live pointers for the duration of the calls.
        unsafe {
            let mut job: *mut VmbJob = std::ptr::null_mut();
            assert_eq!(vmb_job_new(&cb, &mut job, &mut error), vmb_status::VMB_OK);
            assert_eq!(
                vmb_job_command(
                    job,
                    VmbCommand::VMB_COMMAND_ESTIMATE,
                    cmd.as_ptr(),
                    &mut error
                ),
                vmb_status::VMB_OK
            );
            loop {
                let mut info = std::mem::MaybeUninit::<VmbFileInfo>::uninit();
                let mut found = false;
                assert_eq!(
                    vmb_job_next_file(job, info.as_mut_ptr(), &mut found, &mut error),
                    vmb_status::VMB_OK
                );
                if !found {
                    break;
                }
                let info = info.assume_init();
                assert!(info.no_read);
                names.push(CStr::from_ptr(info.path).to_string_lossy().into_owned());
                let mut more = false;
                assert_eq!(
                    vmb_job_end_file(job, &mut more, &mut error),
                    vmb_status::VMB_OK
                );
                if !more {
                    break;
                }
            }
            vmb_job_free(job);
            assert!(vmb_is_our_path(
                CString::new(names[0].clone()).unwrap().as_ptr()
            ));
            assert!(!vmb_is_our_path(c"/etc/passwd".as_ptr()));
            assert_eq!(
                CStr::from_ptr(vmb_plugin_date()).to_str().unwrap(),
                crate::bacula::PLUGIN_DATE
            );
            assert!(CStr::from_ptr(vmb_plugin_description())
                .to_str()
                .unwrap()
                .starts_with("vm-backup: "));
        }
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[1].ends_with("/backup-metadata.json"), "{names:?}");
    }

    #[test]
    fn long_lines_are_split() {
        let s = "é".repeat(2000);
        let parts = split_utf8(&s, 1800);
        assert!(parts.iter().all(|p| p.len() <= 1800));
        assert_eq!(parts.concat(), s);
    }
}
