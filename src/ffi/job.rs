//! The job functions of the C ABI (`vmb_job_*`): one [`VmbJob`] per Bacula plugin instance,
//! driven by the File Daemon shim `c-shim/vm-backup-fd.c` event by event. The logic lives in
//! [`crate::bacula::Job`]; this module only converts C values and keeps panics out of C.
//!
//! Conventions:
//! * Functions returning `int` return 0 on success and -1 on failure. On failure a
//!   [`VmbMessageLevel::VMB_MESSAGE_LEVEL_FATAL`] message naming the cause has already been sent through the
//!   message callback, so the shim only has to return `bRC_Error`.
//! * Every call except [`vmb_job_cancel`] is made on the File Daemon's job thread.
//!   [`vmb_job_cancel`] may be called from any thread at any time before [`vmb_job_free`].
//! * Messages are delivered through the callback on the thread that made the current call.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

use crate::bacula::{CreateResult, FileKind, Job, MessageLevel, MessageSink, PluginError};
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

/// A regular file or a folder.
/// cbindgen:rename-all=None
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmbFileKind {
    /// Regular file (FT_REG).
    VMB_FILE_KIND_REGULAR = 0,
    /// Folder (FT_DIREND); no data.
    VMB_FILE_KIND_DIRECTORY = 1,
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
    /// True when no data is to be read (folders, estimates).
    pub no_read: bool,
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

/// Runs `body` on a job, turning errors and panics into a fatal message and -1.
fn with_job<T>(
    job: *mut VmbJob,
    failed: T,
    body: impl FnOnce(&mut Inner) -> Result<T, PluginError>,
) -> T {
    if job.is_null() {
        return failed;
    }
    // SAFETY: non-null pointers come from `vmb_job_new` and stay valid until `vmb_job_free`
    // (the shim's contract); only a shared reference is formed, the state is behind a mutex.
    let job = unsafe { &*job };
    let mut inner = job.lock();
    match catch_unwind(AssertUnwindSafe(|| body(&mut inner))) {
        Ok(Ok(value)) => value,
        Ok(Err(err)) => {
            let text = err.to_string();
            let text = if text.starts_with("vm-backup:") {
                text
            } else {
                format!("vm-backup: {text}")
            };
            inner.job.say(MessageLevel::Fatal, &text);
            failed
        }
        Err(_) => {
            inner.job.say(
                MessageLevel::Fatal,
                "vm-backup: internal error (panic); the job is failed",
            );
            failed
        }
    }
}

/// Reads a C string argument; NULL reads as "".
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

/// Creates the state of one job. Cheap, no side effects (the File Daemon creates a plugin
/// instance for every job and console command). Returns NULL only if `callbacks` is NULL.
///
/// # Safety
/// `callbacks` must point to a valid [`VmbJobCallbacks`]; its `opaque` must stay valid until
/// [`vmb_job_free`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_new(callbacks: *const VmbJobCallbacks) -> *mut VmbJob {
    if callbacks.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: checked non-null; valid per the contract.
    let callbacks = unsafe { *callbacks };
    let made = catch_unwind(|| {
        let cancel = CancelToken::new();
        Box::into_raw(Box::new(VmbJob {
            inner: Mutex::new(Inner {
                job: Job::new(Box::new(CallbackSink(callbacks)), cancel.clone()),
                path: CString::default(),
            }),
            cancel,
        }))
    });
    made.unwrap_or(std::ptr::null_mut())
}

/// Frees a job. Whatever it still holds is released here: a stream-mode snapshot is committed,
/// a partial restore folder removed. Accepts NULL.
///
/// # Safety
/// `job` must be NULL or come from [`vmb_job_new`], and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_free(job: *mut VmbJob) {
    if job.is_null() {
        return;
    }
    // SAFETY: from `vmb_job_new` (Box::into_raw), freed once.
    let boxed = unsafe { Box::from_raw(job) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(boxed)));
}

/// Requests cancellation; the engine stops at its next check and releases everything. Safe
/// from any thread.
///
/// # Safety
/// `job` must be NULL or a live job from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_cancel(job: *const VmbJob) {
    if job.is_null() {
        return;
    }
    // SAFETY: live per the contract; only the atomic flag is touched (no lock).
    let job = unsafe { &*job };
    job.cancel.cancel();
}

/// Event JobStart: `description` is `"JobId=N Job=<unique name>"`.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `description` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_start(job: *mut VmbJob, description: *const c_char) -> c_int {
    // SAFETY: per the contract.
    let description = unsafe { text(description) };
    with_job(job, -1, |inner| {
        inner.job.start(&description);
        Ok(0)
    })
}

/// Event Level: the level letter (`'F'`, `'I'`, `'D'`…).
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_set_level(job: *mut VmbJob, level: c_int) -> c_int {
    with_job(job, -1, |inner| {
        let letter = u8::try_from(level).map(char::from).unwrap_or('?');
        inner.job.set_level(letter);
        Ok(0)
    })
}

/// Event Since: the time of the previous backup, Unix seconds.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_set_since(job: *mut VmbJob, since: i64) -> c_int {
    with_job(job, -1, |inner| {
        inner.job.set_since(since);
        Ok(0)
    })
}

/// Whether `cmd` is addressed to this plugin (`vm-backup:` prefix).
///
/// # Safety
/// `cmd` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_is_our_command(cmd: *const c_char) -> bool {
    // SAFETY: per the contract.
    let cmd = unsafe { text(cmd) };
    cmd.trim_start()
        .strip_prefix(crate::bacula::PLUGIN_NAME)
        .is_some_and(|r| r.starts_with(':'))
}

/// Events PluginCommand, BackupCommand, EstimateCommand. Backup runs the whole direct-mode
/// backup (or prepares the stream-mode session) before returning; progress goes to the job log.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `cmd` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_command(
    job: *mut VmbJob,
    kind: VmbCommand,
    cmd: *const c_char,
) -> c_int {
    // SAFETY: per the contract.
    let cmd = unsafe { text(cmd) };
    with_job(job, -1, |inner| {
        match kind {
            VmbCommand::VMB_COMMAND_CHECK => inner.job.plugin_command(&cmd)?,
            VmbCommand::VMB_COMMAND_BACKUP => inner.job.backup_command(&cmd)?,
            VmbCommand::VMB_COMMAND_ESTIMATE => inner.job.estimate_command(&cmd)?,
        }
        Ok(0)
    })
}

/// startBackupFile: fills `out` with the next file. Returns 1 when a file was filled, 0 when
/// there is none, -1 on failure.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_next_file(job: *mut VmbJob, out: *mut VmbFileInfo) -> c_int {
    if out.is_null() {
        return -1;
    }
    with_job(job, -1, |inner| {
        let Some(file) = inner.job.next_file()? else {
            return Ok(0);
        };
        let info = (
            file.kind,
            file.mode,
            file.size,
            file.mtime,
            matches!(file.content, crate::bacula::Content::Listing)
                || file.kind == FileKind::Directory,
        );
        let path = CString::new(file.path.clone())
            .map_err(|_| PluginError::BadVirtualPath(file.path.clone()))?;
        inner.path = path;
        // SAFETY: `out` checked non-null, valid for writing per the contract.
        unsafe {
            *out = VmbFileInfo {
                path: inner.path.as_ptr(),
                kind: match info.0 {
                    FileKind::Regular => VmbFileKind::VMB_FILE_KIND_REGULAR,
                    FileKind::Directory => VmbFileKind::VMB_FILE_KIND_DIRECTORY,
                },
                mode: info.1,
                size: info.2,
                mtime: info.3,
                no_read: info.4,
            };
        }
        Ok(1)
    })
}

/// endBackupFile: 1 when more files follow, 0 when done, -1 on failure.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_end_file(job: *mut VmbJob) -> c_int {
    with_job(job, -1, |inner| Ok(c_int::from(inner.job.end_file()?)))
}

/// pluginIO OPEN of the current file: for reading on backup, for writing on restore.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_open(job: *mut VmbJob, for_write: bool) -> c_int {
    with_job(job, -1, |inner| {
        if for_write {
            inner.job.open_write()?;
        } else {
            inner.job.open_read()?;
        }
        Ok(0)
    })
}

/// pluginIO READ: up to `len` bytes into `buf`. Returns the count, 0 at the end, -1 on failure
/// (also once canceled).
///
/// # Safety
/// `job` from [`vmb_job_new`]; `buf` valid for `len` bytes of writing.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_read(job: *mut VmbJob, buf: *mut u8, len: usize) -> i64 {
    if buf.is_null() {
        return -1;
    }
    // SAFETY: per the contract.
    let buf = unsafe { std::slice::from_raw_parts_mut(buf, len) };
    with_job(job, -1, |inner| Ok(inner.job.read(buf)? as i64))
}

/// pluginIO WRITE: `len` bytes from `buf`. Returns `len`, or -1 on failure.
///
/// # Safety
/// `job` from [`vmb_job_new`]; `buf` valid for `len` bytes of reading.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_write(job: *mut VmbJob, buf: *const u8, len: usize) -> i64 {
    if buf.is_null() {
        return -1;
    }
    // SAFETY: per the contract.
    let buf = unsafe { std::slice::from_raw_parts(buf, len) };
    with_job(job, -1, |inner| Ok(inner.job.write(buf)? as i64))
}

/// pluginIO CLOSE.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_close(job: *mut VmbJob) -> c_int {
    with_job(job, -1, |inner| {
        inner.job.close()?;
        Ok(0)
    })
}

/// Event RestoreCommand (before every restored file): the plugin string saved at backup time,
/// the restore's `where` and its `replace` letter (`'a'` always, `'n'` never…).
///
/// # Safety
/// `job` from [`vmb_job_new`]; strings NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_restore_command(
    job: *mut VmbJob,
    cmd: *const c_char,
    where_: *const c_char,
    replace: c_int,
) -> c_int {
    // SAFETY: per the contract.
    let (cmd, where_) = unsafe { (text(cmd), text(where_)) };
    with_job(job, -1, |inner| {
        inner
            .job
            .restore_command(&cmd, &where_, replace_letter(replace))?;
        Ok(0)
    })
}

fn replace_letter(replace: c_int) -> char {
    u8::try_from(replace).map(char::from).unwrap_or('a')
}

/// createFile: `ofname` is the name the File Daemon would write (`where` + cataloged path).
/// Fills `out`; returns 0, or -1 on failure.
///
/// # Safety
/// `job` from [`vmb_job_new`]; strings NULL or NUL-terminated; `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn vmb_job_create_file(
    job: *mut VmbJob,
    ofname: *const c_char,
    where_: *const c_char,
    replace: c_int,
    out: *mut VmbCreate,
) -> c_int {
    if out.is_null() {
        return -1;
    }
    // SAFETY: per the contract.
    let (ofname, where_) = unsafe { (text(ofname), text(where_)) };
    with_job(job, -1, |inner| {
        let result = inner
            .job
            .create_file(&ofname, &where_, replace_letter(replace))?;
        // SAFETY: checked non-null, valid per the contract.
        unsafe {
            *out = match result {
                CreateResult::Extract => VmbCreate::VMB_CREATE_EXTRACT,
                CreateResult::Created => VmbCreate::VMB_CREATE_CREATED,
                CreateResult::Skip => VmbCreate::VMB_CREATE_SKIP,
            };
        }
        Ok(0)
    })
}

/// endRestoreFile: after the last file of a backup (its metadata), restores the VM.
///
/// # Safety
/// `job` from [`vmb_job_new`].
#[no_mangle]
pub unsafe extern "C" fn vmb_job_end_restore_file(job: *mut VmbJob) -> c_int {
    with_job(job, -1, |inner| {
        inner.job.end_restore_file()?;
        Ok(0)
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

    #[test]
    fn bad_string_fails_with_a_fatal_message_naming_the_key() {
        let lines: Lines = Arc::default();
        let cb = VmbJobCallbacks {
            opaque: Arc::as_ptr(&lines) as *mut c_void,
            message: Some(record),
        };
        let cmd = CString::new("vm-backup: vm=a mode=tape").unwrap();
        // SAFETY: valid pointers for the duration of the test.
        unsafe {
            let job = vmb_job_new(&cb);
            assert!(!job.is_null());
            assert_eq!(vmb_job_start(job, c"JobId=7 Job=x".as_ptr()), 0);
            assert_eq!(
                vmb_job_command(job, VmbCommand::VMB_COMMAND_CHECK, cmd.as_ptr()),
                -1
            );
            vmb_job_cancel(job);
            vmb_job_free(job);
            assert!(vmb_is_our_command(cmd.as_ptr()));
            assert!(!vmb_is_our_command(c"bpipe:/x:a:b".as_ptr()));
        }
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].0, VmbMessageLevel::VMB_MESSAGE_LEVEL_FATAL);
        assert!(lines[0].1.contains("mode=\"tape\""), "{}", lines[0].1);
    }

    #[test]
    fn long_lines_are_split() {
        let s = "é".repeat(2000);
        let parts = split_utf8(&s, 1800);
        assert!(parts.iter().all(|p| p.len() <= 1800));
        assert_eq!(parts.concat(), s);
    }
}
