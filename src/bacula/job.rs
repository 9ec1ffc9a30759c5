//! The state of one Bacula job inside the plugin: the events the File Daemon sends, in order,
//! and what each does. The C ABI ([`crate::ffi::job`]) owns one [`Job`] per plugin instance.
//!
//! Threads: every method runs on the File Daemon's job thread, except cancellation, which is a
//! [`CancelToken`] the driver sets from the Director's connection thread. Long engine work runs on
//! a worker thread while the job thread forwards its messages to Bacula, so that only the job
//! thread ever calls back into the File Daemon and the engine never sees the `SIGUSR2`/`EINTR`
//! the File Daemon sends the job thread on cancel.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::engine::{self, DirectBackup};
use super::options::{self, RestoreOptions};
use super::stream::{self, StreamSession};
use super::{Mode, PluginArgs, PluginError, VirtualPath};
use crate::engine::{FileDigests, StreamHasher};
use crate::format::layout;
use crate::format::metadata::BackupMetadata;
use crate::progress::{CancelToken, Level, Progress, Transfer};
use crate::store::PartialBackup;
use crate::ExitStatus;

/// How important a message for the job log is; the shim maps it onto Bacula's message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub enum MessageLevel {
    /// `M_INFO`: progress and events.
    Info = 0,
    /// `M_WARNING`: worth a look; the job still ends OK.
    Warning = 1,
    /// `M_ERROR`: counted in JobErrors; the job ends "OK -- with warnings".
    Error = 2,
    /// `M_FATAL`: the job fails.
    Fatal = 3,
}

/// Where a job's messages go (the shim's JobMessage bridge, or a test's recorder).
pub trait MessageSink: Send {
    /// One line for the job log.
    fn message(&self, level: MessageLevel, text: &str);
}

/// What the File Daemon told the plugin about the job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobInfo {
    /// Bacula's JobId (0 for console pseudo-jobs).
    pub job_id: u32,
    /// The unique job name.
    pub job_name: String,
    /// The level letter: `F`, `I`, `D`… (`' '` for restores).
    pub level: char,
    /// For Incremental/Differential: the time of the previous backup (Unix seconds).
    pub since: i64,
}

impl JobInfo {
    /// Parses the JobStart value, `"JobId=N Job=<unique name>"`.
    pub fn parse_start(text: &str) -> Self {
        let mut info = JobInfo {
            level: 'F',
            ..JobInfo::default()
        };
        for word in text.split_whitespace() {
            if let Some(id) = word.strip_prefix("JobId=") {
                info.job_id = id.parse().unwrap_or(0);
            } else if let Some(name) = word.strip_prefix("Job=") {
                info.job_name = name.to_string();
            }
        }
        info
    }
}

/// A regular file or a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub enum FileKind {
    /// A regular file with data.
    Regular = 0,
    /// A folder (no data).
    Directory = 1,
    /// The plugin's restore options (a restore object, no data): the path is the object's
    /// name, the content its body.
    RestoreOptions = 2,
}

/// Where a virtual file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Small files held in memory (metadata, checksums, domain XML).
    Bytes(Vec<u8>),
    /// A file on disk (a disk image's unchanging base while the guest runs on the overlay).
    File(PathBuf),
    /// Listing only (estimate): never read.
    Listing,
    /// The job log of a direct backup while the engine runs on its worker thread: each read
    /// waits for the next lines, forwards them to the job log from the File Daemon's thread and
    /// hands them to Bacula as this file's data; it ends when the engine has finished.
    Live,
}

/// The name of the live job-log file of a direct backup (see [`Content::Live`]).
pub const PROGRESS_FILE: &str = "progress.log";

/// One file the plugin shows to Bacula.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualFile {
    /// The cataloged path, `/@vm-backup/<vm>/<stamp>/<file>`.
    pub path: String,
    /// Regular file or folder.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    /// Its bytes.
    pub content: Content,
}

impl VirtualFile {
    fn bytes(path: String, bytes: Vec<u8>, mtime: i64) -> Self {
        Self {
            path,
            kind: FileKind::Regular,
            size: bytes.len() as u64,
            mode: 0o600,
            mtime,
            content: Content::Bytes(bytes),
        }
    }
}

/// What the File Daemon should do with a file being restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub enum CreateResult {
    /// Data follows: open/write/close through the plugin.
    Extract = 0,
    /// Nothing to write (a folder): created.
    Created = 1,
    /// Skip this file.
    Skip = 2,
}

/// One plugin instance = one Bacula job.
pub struct Job {
    sink: Box<dyn MessageSink>,
    cancel: CancelToken,
    info: JobInfo,
    args: Option<PluginArgs>,
    state: State,
    /// The restore options the operator filled in (bEventRestoreObject), if any.
    restore_options: Option<RestoreOptions>,
}

enum State {
    /// Nothing asked of this plugin in this job (most jobs, console pseudo-jobs).
    Idle,
    /// Presenting files to Bacula.
    Backup(Box<BackupState>),
    /// Receiving files from Bacula.
    Restore(Box<RestoreState>),
}

struct BackupState {
    files: Vec<VirtualFile>,
    /// Index of the file handed out by the last `next_file`.
    current: Option<usize>,
    reader: Option<Reader>,
    /// Stream mode: the session whose guards commit the snapshot when dropped.
    session: Option<StreamSession>,
    /// Stream mode: the last disk has been read; finish the session after it.
    finished: bool,
    /// Stream mode: digests of the files sent so far.
    hashes: Vec<(String, FileDigests)>,
    /// Stream mode: the session's progress and log lines.
    messages: Option<Receiver<Event>>,
    /// Direct mode: the engine's run on its worker thread.
    live: Option<Live>,
    /// The restore options object is still to be sent after the last file (backups only).
    options_pending: bool,
}

/// A direct backup running on a worker thread while the File Daemon reads the live log.
struct Live {
    args: PluginArgs,
    /// The engine's lines and, last, its result.
    rx: Receiver<Event>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// Log bytes not yet handed to Bacula.
    pending: Vec<u8>,
    /// Lines at warning level forwarded so far (the reporter's own warnings come after the
    /// backup's status is decided).
    warnings: usize,
    /// The engine has finished (its result handled).
    finished: bool,
    mtime: i64,
}

impl Live {
    /// Waits for the worker (it ends soon once canceled) so that nothing of the job outlives it.
    fn join(&mut self) -> Result<(), PluginError> {
        match self.worker.take().map(std::thread::JoinHandle::join) {
            Some(Err(_)) => Err(PluginError::WorkerPanicked),
            _ => Ok(()),
        }
    }
}

struct Reader {
    source: Box<dyn Read + Send>,
    name: String,
    done: u64,
    total: u64,
    started: Instant,
    last_report: Instant,
    hasher: Option<StreamHasher>,
}

struct RestoreState {
    where_: String,
    replace: char,
    incoming: Option<Incoming>,
    /// Stream mode: the folder the files of each backup are written into.
    staging: HashMap<(String, String), PartialBackup>,
    /// Direct mode: small files received, by virtual path.
    received: HashMap<String, Vec<u8>>,
}

impl RestoreState {
    /// Direct mode: the backup metadata the restore received at `vp`, decoded.
    fn received_metadata(&self, vp: &VirtualPath) -> Result<BackupMetadata, PluginError> {
        let data = self
            .received
            .get(&vp.to_path())
            .map(Vec::as_slice)
            .unwrap_or_default();
        serde_json::from_slice(data).map_err(|source| PluginError::BadMetadata {
            path: vp.to_path(),
            source,
        })
    }
}

enum Incoming {
    Memory(VirtualPath, Vec<u8>),
    File(VirtualPath, fs::File, PathBuf),
}

impl Job {
    /// A job with nothing asked of it yet. Cheap and free of side effects: the File Daemon creates
    /// one for every job, estimate and console command.
    pub fn new(sink: Box<dyn MessageSink>, cancel: CancelToken) -> Self {
        Self {
            sink,
            cancel,
            info: JobInfo {
                level: 'F',
                ..JobInfo::default()
            },
            args: None,
            state: State::Idle,
            restore_options: None,
        }
    }

    /// The job's cancellation flag.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// What the File Daemon said about the job so far.
    pub fn info(&self) -> &JobInfo {
        &self.info
    }

    /// Event JobStart: `"JobId=N Job=<name>"`.
    /// Sets the umask to 0o077 (the store sets every mode explicitly; this keeps anything
    /// else the job creates private too).
    pub fn start(&mut self, description: &str) {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let level = self.info.level;
        let since = self.info.since;
        self.info = JobInfo::parse_start(description);
        self.info.level = level;
        self.info.since = since;
    }

    /// Event Level.
    pub fn set_level(&mut self, level: char) {
        self.info.level = level;
    }

    /// Event Since.
    pub fn set_since(&mut self, since: i64) {
        self.info.since = since;
    }

    /// Sends a line to the job log.
    pub fn say(&self, level: MessageLevel, text: &str) {
        self.sink.message(level, text);
    }

    fn parse_args(&mut self, cmd: &str) -> Result<PluginArgs, PluginError> {
        let args = PluginArgs::parse(cmd)?;
        self.args = Some(args.clone());
        Ok(args)
    }

    /// Event PluginCommand (FileSet transfer): checks the string early so a malformed one fails
    /// the job before anything is touched.
    pub fn plugin_command(&mut self, cmd: &str) -> Result<(), PluginError> {
        self.parse_args(cmd).map(|_| ())
    }

    /// Event BackupCommand: runs the backup (direct) or prepares the session (stream), and
    /// queues the virtual files.
    pub fn backup_command(&mut self, cmd: &str) -> Result<(), PluginError> {
        let args = self.parse_args(cmd)?;
        let settings = super::settings_for(&args)?;
        let level = match self.info.level {
            'I' | 'i' => crate::format::metadata::BackupLevel::Incremental,
            'D' | 'd' => crate::format::metadata::BackupLevel::Differential,
            _ => crate::format::metadata::BackupLevel::Full,
        };
        if !matches!(self.info.level, 'F' | 'f') && args.mode == Mode::Stream {
            self.say(
                MessageLevel::Info,
                &format!(
                    "vm-backup: level {} requested; stream mode makes Full backups only (use mode=direct for incrementals), running a Full backup of {}",
                    level_name(self.info.level),
                    args.vm
                ),
            );
        }
        if args.mode == Mode::Stream && args.max_rate.is_some() {
            self.say(
                MessageLevel::Info,
                "vm-backup: max_rate= applies to mode=direct; in mode=stream the disks go through Bacula, whose Maximum Bandwidth Per Job is the limit to set",
            );
        }
        self.say(
            MessageLevel::Info,
            &format!(
                "vm-backup: backing up {} (method {}, mode {}, target {})",
                args.vm,
                args.method
                    .map_or_else(|| "from inventory or auto".to_string(), |m| m.to_string()),
                args.mode,
                settings.target.display()
            ),
        );
        let mtime = chrono::Utc::now().timestamp();
        let state = match args.mode {
            Mode::Direct => {
                // The engine runs on a worker thread; this event returns at once, and the File
                // Daemon's thread then reads the live log (Content::Live), forwarding the
                // engine's lines as they come (see docs/bacula.md, "Live progress").
                let cancel = self.cancel.clone();
                let (tx, rx) = crossbeam_channel::unbounded();
                let worker_args = args.clone();
                let worker = std::thread::Builder::new()
                    .name(format!("vmb-job-{}", self.info.job_id))
                    .spawn(move || {
                        let progress = ChannelProgress::new(tx.clone());
                        let result = engine::backup_direct(
                            &worker_args,
                            &settings,
                            level,
                            &progress,
                            &cancel,
                        );
                        let _ = tx.send(Event::Done(Box::new(result)));
                    })
                    .map_err(|e| PluginError::io("start the backup's worker thread", e))?;
                let vm = layout::safe_component(&args.vm)?;
                let stamp = layout::stamp_for(chrono::Local::now());
                BackupState {
                    files: vec![VirtualFile {
                        path: VirtualPath::new(&vm, &stamp, PROGRESS_FILE).to_path(),
                        kind: FileKind::Regular,
                        size: 0,
                        mode: 0o600,
                        mtime,
                        content: Content::Live,
                    }],
                    current: None,
                    reader: None,
                    session: None,
                    finished: true,
                    hashes: Vec::new(),
                    messages: None,
                    options_pending: true,
                    live: Some(Live {
                        args,
                        rx,
                        worker: Some(worker),
                        pending: Vec::new(),
                        warnings: 0,
                        finished: false,
                        mtime,
                    }),
                }
            }
            Mode::Stream => {
                let cancel = self.cancel.clone();
                let (tx, rx) = crossbeam_channel::unbounded();
                let progress: Arc<dyn Progress> = Arc::new(ChannelProgress::new(tx));
                let session = self.pump_on(&rx, || {
                    StreamSession::prepare(&args, &settings, progress, &cancel)
                })?;
                let files = session.files(mtime)?;
                BackupState {
                    files,
                    current: None,
                    reader: None,
                    session: Some(session),
                    finished: false,
                    hashes: Vec::new(),
                    messages: Some(rx),
                    live: None,
                    options_pending: true,
                }
            }
        };
        self.state = State::Backup(Box::new(state));
        Ok(())
    }

    /// The two virtual files of a direct backup, read from the published folder.
    fn direct_files(
        say: &mut dyn FnMut(MessageLevel, &str),
        args: &PluginArgs,
        outcome: &DirectBackup,
        mtime: i64,
    ) -> Result<Vec<VirtualFile>, PluginError> {
        let dir = &outcome.dir;
        let stamp = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or(PluginError::Protocol(
                "the engine published a folder without a name",
            ))?;
        let vm = layout::safe_component(&args.vm)?;
        match outcome.status {
            ExitStatus::Warning => {
                for w in &outcome.warnings {
                    say(MessageLevel::Warning, &format!("vm-backup: {w}"));
                }
                say(
                    MessageLevel::Error,
                    &format!(
                        "vm-backup: backup of {} completed with post-check warnings (exit 3): {}",
                        args.vm,
                        outcome.warnings.join("; ")
                    ),
                );
            }
            _ => say(
                MessageLevel::Info,
                &format!(
                    "vm-backup: backup of {} written to {}",
                    args.vm,
                    dir.display()
                ),
            ),
        }
        let mut files = Vec::new();
        for name in [layout::CHECKSUMS_FILE, layout::METADATA_FILE] {
            let path = dir.join(name);
            let bytes = fs::read(&path)
                .map_err(|e| PluginError::io(format!("read {}", path.display()), e))?;
            files.push(VirtualFile::bytes(
                VirtualPath::new(&vm, &stamp, name).to_path(),
                bytes,
                mtime,
            ));
        }
        Ok(files)
    }

    /// Event EstimateCommand: lists what a backup would send, touching nothing.
    pub fn estimate_command(&mut self, cmd: &str) -> Result<(), PluginError> {
        let args = self.parse_args(cmd)?;
        let settings = super::settings_for(&args)?;
        let stamp = layout::stamp_for(chrono::Local::now());
        let vm = layout::safe_component(&args.vm)?;
        let mtime = chrono::Utc::now().timestamp();
        let mut files: Vec<VirtualFile> = Vec::new();
        // Each disk and its allocated size, read from the domain's XML and the images (both
        // modes: in direct mode the engine copies them to the target, in stream mode they go
        // to Bacula). Best effort: a VM that cannot be inspected still gets its listing.
        match engine::estimate_disks(&args, &settings) {
            Ok(disks) => {
                for d in disks {
                    self.say(
                        MessageLevel::Info,
                        &format!(
                            "vm-backup: estimate: {} would copy disk {} ({}, {} bytes allocated)",
                            args.vm,
                            d.target,
                            d.source.display(),
                            d.allocated_size
                        ),
                    );
                    files.push(VirtualFile {
                        path: VirtualPath::new(&vm, &stamp, &d.file_name).to_path(),
                        kind: FileKind::Regular,
                        size: d.allocated_size,
                        mode: 0o600,
                        mtime,
                        content: Content::Listing,
                    });
                }
            }
            Err(e) => self.say(
                MessageLevel::Warning,
                &format!(
                    "vm-backup: estimate: cannot list the disks of {}: {e}",
                    args.vm
                ),
            ),
        }
        if args.mode == Mode::Stream {
            files.extend(stream::estimate(&args, &settings, &stamp, mtime)?);
        }
        for name in [layout::CHECKSUMS_FILE, layout::METADATA_FILE] {
            files.push(VirtualFile {
                path: VirtualPath::new(&vm, &stamp, name).to_path(),
                kind: FileKind::Regular,
                size: 0,
                mode: 0o600,
                mtime,
                content: Content::Listing,
            });
        }
        self.state = State::Backup(Box::new(BackupState {
            files,
            current: None,
            reader: None,
            session: None,
            finished: true,
            hashes: Vec::new(),
            messages: None,
            live: None,
            options_pending: false,
        }));
        Ok(())
    }

    /// Runs engine work on a worker thread, forwarding its messages and progress to the job log
    /// from this (the File Daemon's) thread.
    fn pump<T: Send>(
        &self,
        work: impl FnOnce(&dyn Progress) -> Result<T, PluginError> + Send,
    ) -> Result<T, PluginError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || {
                let progress = ChannelProgress::new(tx);
                work(&progress)
            });
            forward(&rx, self.sink.as_ref());
            match handle.join() {
                Ok(result) => result,
                Err(_) => Err(PluginError::WorkerPanicked),
            }
        })
    }

    /// Like [`Self::pump`], for work whose progress sink is already connected to `rx` (the
    /// stream session's): forwards until the work is done.
    fn pump_on<T: Send>(
        &self,
        rx: &Receiver<Event>,
        work: impl FnOnce() -> Result<T, PluginError> + Send,
    ) -> Result<T, PluginError> {
        std::thread::scope(|scope| {
            let handle = scope.spawn(work);
            while !handle.is_finished() {
                if let Ok(Event::Line(level, text)) = rx.recv_timeout(Duration::from_millis(200)) {
                    self.sink.message(level, &text);
                }
            }
            for event in rx.try_iter() {
                if let Event::Line(level, text) = event {
                    self.sink.message(level, &text);
                }
            }
            match handle.join() {
                Ok(result) => result,
                Err(_) => Err(PluginError::WorkerPanicked),
            }
        })
    }

    /// startBackupFile: the next file, or `None` when there is none.
    pub fn next_file(&mut self) -> Result<Option<&VirtualFile>, PluginError> {
        let State::Backup(state) = &mut self.state else {
            return Err(PluginError::Protocol(
                "startBackupFile before a backup command",
            ));
        };
        let next = state.current.map_or(0, |i| i + 1);
        if next >= state.files.len() {
            return Ok(None);
        }
        state.current = Some(next);
        Ok(state.files.get(next))
    }

    /// endBackupFile: whether more files follow. In stream mode, after the last disk, the
    /// session is finished (snapshot committed) before the metadata files are sent. After the
    /// last file of a backup comes the restore options object
    /// ([`super::options::serialized`]).
    pub fn end_file(&mut self) -> Result<bool, PluginError> {
        let more = self.end_file_inner()?;
        if !more {
            if let State::Backup(state) = &mut self.state {
                if state.options_pending {
                    state.options_pending = false;
                    let body = options::serialized().into_bytes();
                    state.files.push(VirtualFile {
                        path: options::RESTORE_OPTIONS_NAME.to_string(),
                        kind: FileKind::RestoreOptions,
                        size: body.len() as u64,
                        mode: 0o600,
                        mtime: chrono::Utc::now().timestamp(),
                        content: Content::Bytes(body),
                    });
                    return Ok(true);
                }
            }
        }
        Ok(more)
    }

    /// Event RestoreObject: keeps the plugin's filled restore options; ignores other objects
    /// (the unfilled item table, other plugins' objects).
    pub fn restore_object(
        &mut self,
        name: &str,
        object_type: i32,
        body: &str,
    ) -> Result<(), PluginError> {
        if name != options::RESTORE_OPTIONS_NAME || object_type != options::FT_PLUGIN_CONFIG_FILLED
        {
            return Ok(());
        }
        if body.starts_with('\0') {
            return Err(PluginError::RestoreOptionsLost(body.len()));
        }
        let opts = options::RestoreOptions::parse(body)?;
        if opts.extracts_files() {
            self.say(
                MessageLevel::Info,
                &format!(
                    "vm-backup: plugin restore options: extract guest path(s) {} from disk {} instead of restoring the VM",
                    opts.files.join(", "),
                    opts.disk.as_deref().unwrap_or("(the first)")
                ),
            );
        }
        self.restore_options = Some(opts);
        Ok(())
    }

    fn end_file_inner(&mut self) -> Result<bool, PluginError> {
        let State::Backup(state) = &mut self.state else {
            return Ok(false);
        };
        state.reader = None;
        let next = state.current.map_or(0, |i| i + 1);
        let more = next < state.files.len();
        let next_is_metadata = state
            .files
            .get(next)
            .is_some_and(|f| f.path.ends_with(layout::CHECKSUMS_FILE));
        if !state.finished && (next_is_metadata || !more) {
            state.finished = true;
            if let Some(session) = state.session.take() {
                let hashes = std::mem::take(&mut state.hashes);
                let rx = state.messages.take();
                let files = self.finish_stream(session, hashes, rx)?;
                if let State::Backup(state) = &mut self.state {
                    state.files.truncate(next);
                    state.files.extend(files);
                    return Ok(next < state.files.len());
                }
            }
        }
        Ok(more)
    }

    fn finish_stream(
        &self,
        session: StreamSession,
        hashes: Vec<(String, FileDigests)>,
        rx: Option<Receiver<Event>>,
    ) -> Result<Vec<VirtualFile>, PluginError> {
        let mtime = chrono::Utc::now().timestamp();
        let rx = rx.unwrap_or_else(crossbeam_channel::never);
        self.pump_on(&rx, move || session.finish(&hashes, mtime))
    }

    /// pluginIO OPEN for reading (backup) of the current file.
    pub fn open_read(&mut self) -> Result<(), PluginError> {
        let State::Backup(state) = &mut self.state else {
            return Err(PluginError::Protocol("open outside a backup"));
        };
        let file = state
            .current
            .and_then(|i| state.files.get(i))
            .ok_or(PluginError::Protocol("open without a file"))?;
        let source: Box<dyn Read + Send> = match &file.content {
            Content::Bytes(b) => Box::new(std::io::Cursor::new(b.clone())),
            Content::File(p) => Box::new(
                fs::File::open(p)
                    .map_err(|e| PluginError::io(format!("open {}", p.display()), e))?,
            ),
            Content::Listing | Content::Live => Box::new(std::io::empty()),
        };
        let now = Instant::now();
        let hasher = state.session.is_some().then(stream::hasher);
        state.reader = Some(Reader {
            source,
            name: file.path.rsplit('/').next().unwrap_or_default().to_string(),
            done: 0,
            total: file.size,
            started: now,
            last_report: now,
            hasher,
        });
        Ok(())
    }

    /// pluginIO READ: fills `buf`, returns the count (0 at the end). Retries reads interrupted
    /// by the File Daemon's signals; stops with [`PluginError::Canceled`] once canceled.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, PluginError> {
        if self.cancel.is_cancelled() {
            return Err(PluginError::Canceled);
        }
        let State::Backup(state) = &mut self.state else {
            return Err(PluginError::Protocol("read outside a backup"));
        };
        let live_file = state
            .current
            .and_then(|i| state.files.get(i))
            .is_some_and(|f| f.content == Content::Live);
        if live_file {
            return self.read_live(buf);
        }
        let reader = state
            .reader
            .as_mut()
            .ok_or(PluginError::Protocol("read before open"))?;
        let n = loop {
            match reader.source.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(PluginError::io(format!("read {}", reader.name), e)),
            }
        };
        reader.done += n as u64;
        if let Some(h) = reader.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        if n == 0 {
            if let Some(h) = reader.hasher.take() {
                state.hashes.push((reader.name.clone(), h.finish()));
            }
        }
        if let Some(rx) = &state.messages {
            for event in rx.try_iter() {
                if let Event::Line(level, text) = event {
                    self.sink.message(level, &text);
                }
            }
        }
        let now = Instant::now();
        let big = reader.total >= 16 << 20;
        if big
            && (now.duration_since(reader.last_report) >= REPORT_EVERY
                || (n == 0 && reader.done > 0))
        {
            reader.last_report = now;
            let line = transfer_line(
                &reader.name,
                Transfer {
                    done: reader.done,
                    total: reader.total,
                    bytes_per_sec: rate(reader.done, now.duration_since(reader.started)),
                    elapsed: now.duration_since(reader.started),
                },
            );
            self.sink.message(MessageLevel::Info, &line);
        }
        Ok(n)
    }

    /// pluginIO READ of the live log: hands out the log bytes not yet read; when there are none,
    /// waits for the engine's next lines (forwarding each to the job log from this thread, where
    /// the File Daemon sends it to the Director at once) or its result. 0 once the engine has
    /// finished and everything is read; its failure is this read's error.
    fn read_live(&mut self, buf: &mut [u8]) -> Result<usize, PluginError> {
        let level_letter = self.info.level;
        let sink = self.sink.as_ref();
        let cancel = &self.cancel;
        let State::Backup(state) = &mut self.state else {
            return Err(PluginError::Protocol("read outside a backup"));
        };
        let live = state
            .live
            .as_mut()
            .ok_or(PluginError::Protocol("live log without a running backup"))?;
        loop {
            if !live.pending.is_empty() {
                let n = buf.len().min(live.pending.len());
                buf[..n].copy_from_slice(&live.pending[..n]);
                live.pending.drain(..n);
                return Ok(n);
            }
            if live.finished {
                return Ok(0);
            }
            if cancel.is_cancelled() {
                return Err(PluginError::Canceled);
            }
            let event = match live.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    live.finished = true;
                    live.join()?;
                    return Err(PluginError::Protocol(
                        "the backup's worker ended without a result",
                    ));
                }
            };
            let warnings = std::cell::Cell::new(live.warnings);
            let pending = &mut live.pending;
            let mut say = |level: MessageLevel, text: &str| {
                sink.message(level, text);
                if level == MessageLevel::Warning {
                    warnings.set(warnings.get() + 1);
                }
                let stamp = chrono::Local::now().format("%H:%M:%S");
                pending.extend_from_slice(format!("{stamp} {text}\n").as_bytes());
            };
            match event {
                Event::Line(level, text) => {
                    say(level, &text);
                    live.warnings = warnings.get();
                }
                Event::Done(result) => {
                    let outcome = match *result {
                        Ok(outcome) => outcome,
                        Err(e) => {
                            live.finished = true;
                            live.join()?;
                            return Err(e);
                        }
                    };
                    if !outcome.level_report.is_empty() {
                        say(
                            MessageLevel::Info,
                            &format!(
                                "vm-backup: {} requested: {}",
                                level_name(level_letter),
                                outcome.level_report
                            ),
                        );
                    }
                    let files = Self::direct_files(&mut say, &live.args, &outcome, live.mtime)?;
                    say(MessageLevel::Info, &outcome.report);
                    // Warnings after the status was decided (Slack, catalog, metrics): the job
                    // ends "OK -- with warnings" (an M_ERROR line; M_WARNING alone does not).
                    if outcome.status == ExitStatus::Success && warnings.get() > 0 {
                        let n = warnings.get();
                        say(
                            MessageLevel::Error,
                            &format!(
                                "vm-backup: backup of {} completed; {n} warning(s) that do not touch the backup (see above)",
                                live.args.vm
                            ),
                        );
                    }
                    live.warnings = warnings.get();
                    live.finished = true;
                    live.join()?;
                    state.files.extend(files);
                }
            }
        }
    }

    /// pluginIO CLOSE.
    pub fn close(&mut self) -> Result<(), PluginError> {
        match &mut self.state {
            State::Backup(state) => {
                state.reader = None;
                Ok(())
            }
            // Restore: the file is synced and handled in endRestoreFile (CLOSE comes after
            // setFileAttributes and before endRestoreFile).
            State::Restore(_) | State::Idle => Ok(()),
        }
    }

    /// Event RestoreCommand (once per file): the plugin string saved at backup time.
    pub fn restore_command(
        &mut self,
        cmd: &str,
        where_: &str,
        replace: char,
    ) -> Result<(), PluginError> {
        self.parse_args(cmd)?;
        if !matches!(self.state, State::Restore(_)) {
            self.state = State::Restore(Box::new(RestoreState {
                where_: where_.to_string(),
                replace,
                incoming: None,
                staging: HashMap::new(),
                received: HashMap::new(),
            }));
        }
        Ok(())
    }

    /// createFile: decides what to do with a file Bacula restores.
    pub fn create_file(
        &mut self,
        ofname: &str,
        where_: &str,
        replace: char,
    ) -> Result<CreateResult, PluginError> {
        let args = self
            .args
            .clone()
            .ok_or(PluginError::Protocol("createFile before RestoreCommand"))?;
        if !matches!(self.state, State::Restore(_)) {
            self.restore_command_state(where_, replace);
        }
        let Some(vp) = VirtualPath::parse_restored(ofname, where_)? else {
            return Ok(CreateResult::Created);
        };
        if vp.file == PROGRESS_FILE {
            // The job log of a direct backup: kept in Bacula's catalog, nothing to restore.
            return Ok(CreateResult::Skip);
        }
        if vp.file.contains('/')
            || layout::safe_component(&vp.file).ok().as_deref() != Some(&vp.file)
        {
            return Err(PluginError::BadVirtualPath(ofname.to_string()));
        }
        let incoming = match args.mode {
            Mode::Direct => Incoming::Memory(vp, Vec::new()),
            Mode::Stream => {
                let staging = self.staging(&args, &vp)?;
                let path = staging.path().join(&vp.file);
                let file = staging.create_stream(&vp.file)?;
                Incoming::File(vp, file, path)
            }
        };
        if let State::Restore(state) = &mut self.state {
            state.incoming = Some(incoming);
        }
        Ok(CreateResult::Extract)
    }

    fn restore_command_state(&mut self, where_: &str, replace: char) {
        self.state = State::Restore(Box::new(RestoreState {
            where_: where_.to_string(),
            replace,
            incoming: None,
            staging: HashMap::new(),
            received: HashMap::new(),
        }));
    }

    /// The folder a streamed backup is rebuilt in: `<where>/<vm>/<stamp>.partial`, or with an
    /// empty `where` `<target>/<host>/<vm>/<stamp>.partial` (the backup as it would have been on
    /// the target). Renamed without `.partial` once complete.
    fn staging(
        &mut self,
        args: &PluginArgs,
        vp: &VirtualPath,
    ) -> Result<&PartialBackup, PluginError> {
        let State::Restore(state) = &mut self.state else {
            return Err(PluginError::Protocol("not restoring"));
        };
        let key = (vp.vm.clone(), vp.stamp.clone());
        if state.staging.contains_key(&key) {
            return state
                .staging
                .get(&key)
                .ok_or(PluginError::Protocol("nothing staged"));
        }
        let base = match super::where_dir(&state.where_) {
            Some(w) => w.join(&vp.vm),
            None => {
                let settings = super::settings_for(args)?;
                crate::store::FolderStore::open(&settings.target)?;
                layout::VmDir::new(&settings.target, &settings.host(), &vp.vm)?.path
            }
        };
        let dir = base.join(format!("{}{}", vp.stamp, layout::PARTIAL_SUFFIX));
        if base.join(&vp.stamp).exists() {
            return Err(PluginError::AlreadyExists(base.join(&vp.stamp)));
        }
        let staged = PartialBackup::create(dir, base.join(&vp.stamp))?;
        Ok(state.staging.entry(key).or_insert(staged))
    }

    /// pluginIO OPEN for writing (restore).
    pub fn open_write(&mut self) -> Result<(), PluginError> {
        match &self.state {
            State::Restore(state) if state.incoming.is_some() => Ok(()),
            _ => Err(PluginError::Protocol("open for write without createFile")),
        }
    }

    /// pluginIO WRITE.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, PluginError> {
        if self.cancel.is_cancelled() {
            return Err(PluginError::Canceled);
        }
        let State::Restore(state) = &mut self.state else {
            return Err(PluginError::Protocol("write outside a restore"));
        };
        match &mut state.incoming {
            Some(Incoming::Memory(vp, data)) => {
                if data.len() + buf.len() > MAX_SMALL_FILE {
                    return Err(PluginError::TooLarge {
                        path: vp.to_path(),
                        limit: MAX_SMALL_FILE,
                    });
                }
                data.extend_from_slice(buf);
            }
            Some(Incoming::File(_, file, path)) => file
                .write_all(buf)
                .map_err(|e| PluginError::io(format!("write {}", path.display()), e))?,
            None => return Err(PluginError::Protocol("write without createFile")),
        }
        Ok(buf.len())
    }

    /// endRestoreFile: when the metadata of a backup has arrived (it is sent last), restores
    /// the VM.
    pub fn end_restore_file(&mut self) -> Result<(), PluginError> {
        let State::Restore(state) = &mut self.state else {
            return Ok(());
        };
        let (vp, is_metadata) = match state.incoming.take() {
            Some(Incoming::Memory(vp, data)) => {
                let meta = vp.file == layout::METADATA_FILE;
                state.received.insert(vp.to_path(), data);
                (vp, meta)
            }
            Some(Incoming::File(vp, file, path)) => {
                file.sync_all()
                    .map_err(|e| PluginError::io(format!("sync {}", path.display()), e))?;
                let meta = vp.file == layout::METADATA_FILE;
                (vp, meta)
            }
            None => return Ok(()),
        };
        if !is_metadata {
            return Ok(());
        }
        let args = self
            .args
            .clone()
            .ok_or(PluginError::Protocol("restore without plugin string"))?;
        let where_ = state.where_.clone();
        let force = state.replace == 'a';
        if let Some(opts) = self.restore_options.clone().filter(|o| o.extracts_files()) {
            let dest = super::where_dir(&where_)
                .ok_or(PluginError::FileRestoreNeedsWhere)?
                .to_path_buf();
            let settings = super::settings_for(&args)?;
            match args.mode {
                Mode::Direct => {
                    let meta = state.received_metadata(&vp)?;
                    self.extract_files(
                        &settings,
                        &meta.host,
                        &meta.vm_name,
                        &meta.stamp,
                        None,
                        &opts,
                        &dest,
                    )?;
                }
                Mode::Stream => {
                    let key = (vp.vm.clone(), vp.stamp.clone());
                    // Dropped at the end of this block: the staged copy is removed.
                    let staged = state
                        .staging
                        .remove(&key)
                        .ok_or(PluginError::Protocol("nothing staged"))?;
                    let dir = staged.path().to_path_buf();
                    self.extract_files(
                        &settings,
                        &settings.host(),
                        &vp.vm,
                        &vp.stamp,
                        Some(dir),
                        &opts,
                        &dest,
                    )?;
                    drop(staged);
                }
            }
            return Ok(());
        }
        match args.mode {
            Mode::Direct => {
                let meta = state.received_metadata(&vp)?;
                let settings = super::settings_for(&args)?;
                let cancel = self.cancel.clone();
                self.say(
                    MessageLevel::Info,
                    &format!(
                        "vm-backup: restoring {} from backup {} on {}",
                        meta.vm_name,
                        meta.stamp,
                        settings.target.display()
                    ),
                );
                let done = self.pump(|progress| {
                    engine::restore_direct(&settings, &meta, &where_, force, progress, &cancel)
                })?;
                self.say(MessageLevel::Info, &format!("vm-backup: {done}"));
            }
            Mode::Stream => {
                let key = (vp.vm.clone(), vp.stamp.clone());
                let staged = state
                    .staging
                    .remove(&key)
                    .ok_or(PluginError::Protocol("nothing staged"))?;
                let settings = super::settings_for(&args)?;
                let cancel = self.cancel.clone();
                let done = self.pump(|progress| {
                    stream::restore_staged(&settings, staged, &where_, force, progress, &cancel)
                })?;
                self.say(MessageLevel::Info, &format!("vm-backup: {done}"));
            }
        }
        Ok(())
    }
}

impl Job {
    /// Extracts the restore options' guest paths from a backup (on the target, or the staged
    /// folder `backup_dir`) into `dest`, each logged; a missing path fails the job naming it.
    #[allow(clippy::too_many_arguments)]
    fn extract_files(
        &self,
        settings: &crate::config::Settings,
        host: &str,
        vm: &str,
        stamp: &str,
        backup_dir: Option<PathBuf>,
        opts: &options::RestoreOptions,
        dest: &std::path::Path,
    ) -> Result<(), PluginError> {
        self.say(
            MessageLevel::Info,
            &format!(
                "vm-backup: extracting {} guest path(s) of {vm} backup {stamp} into {} (the VM is not restored)",
                opts.files.len(),
                dest.display()
            ),
        );
        fs::create_dir_all(dest)
            .map_err(|e| PluginError::io(format!("create {}", dest.display()), e))?;
        let cancel = self.cancel.clone();
        let (warnings, reports) = self.pump(|_progress| {
            engine::extract_guest_files(settings, host, vm, stamp, backup_dir, opts, dest, &cancel)
        })?;
        for w in &warnings {
            self.say(MessageLevel::Warning, &format!("vm-backup: {w}"));
        }
        for (path, r) in reports {
            self.say(
                MessageLevel::Info,
                &format!(
                    "vm-backup: extracted {path} to {}: {} file(s), {} folder(s), {} symlink(s), {} bytes",
                    r.dest.display(),
                    r.files,
                    r.dirs,
                    r.symlinks,
                    r.bytes
                ),
            );
            for skipped in &r.skipped {
                self.say(
                    MessageLevel::Warning,
                    &format!("vm-backup: {path}: skipped {skipped}"),
                );
            }
        }
        Ok(())
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Direct mode: a backup still running when the job ends (a failure elsewhere, cancel)
        // is canceled; its guards clean up before the File Daemon frees the plugin.
        if let State::Backup(state) = &mut self.state {
            if let Some(live) = state.live.as_mut() {
                if !live.finished {
                    self.cancel.cancel();
                }
                let _ = live.join();
            }
        }
        // Stream mode: a session still open (error, cancel) is dropped here, and its guards
        // commit the snapshot. Partial staging folders of a failed restore are removed.
        if let State::Restore(state) = &mut self.state {
            state.incoming = None;
            state.staging.clear(); // each guard removes its `.partial` folder
        }
    }
}

/// Largest metadata/checksum file accepted in memory on restore.
const MAX_SMALL_FILE: usize = 64 << 20;
/// How often progress lines reach the job log (at the latest).
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// A progress line also every this many percent…
const REPORT_STEP_PERCENT: f64 = 5.0;
/// …but not more often than this.
const REPORT_MIN_GAP: Duration = Duration::from_secs(2);

fn level_name(level: char) -> String {
    match level {
        'F' | 'f' => "Full".into(),
        'I' | 'i' => "Incremental".into(),
        'D' | 'd' => "Differential".into(),
        other => format!("{other:?}"),
    }
}

fn rate(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs
    } else {
        0.0
    }
}

fn percent(t: Transfer) -> f64 {
    if t.total > 0 {
        (t.done as f64 * 100.0 / t.total as f64).min(100.0)
    } else {
        100.0
    }
}

/// The progress line of a transfer, e.g.
/// `vda: 42% (108 of 256 MiB, 95.3 MiB/s, ETA 2 s)`.
pub fn transfer_line(what: &str, t: Transfer) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let pct = percent(t);
    let left = t.total.saturating_sub(t.done);
    let eta = if left == 0 {
        "done".to_string()
    } else if t.bytes_per_sec > 0.0 {
        let secs = (left as f64 / t.bytes_per_sec).round() as u64;
        if secs >= 60 {
            format!("ETA {}m{:02}s", secs / 60, secs % 60)
        } else {
            format!("ETA {secs} s")
        }
    } else {
        "ETA unknown".to_string()
    };
    format!(
        "vm-backup: {what}: {pct:.0}% ({:.0} of {:.0} MiB, {:.1} MiB/s, {eta})",
        t.done as f64 / MIB,
        t.total as f64 / MIB,
        t.bytes_per_sec / MIB
    )
}

enum Event {
    Line(MessageLevel, String),
    /// Direct mode: the engine's result (last).
    Done(Box<Result<DirectBackup, PluginError>>),
}

/// The engine's [`Progress`] sink on the worker thread: lines go into a channel, transfers are
/// thinned to one line per disk every [`REPORT_EVERY`] or every [`REPORT_STEP_PERCENT`] (at most
/// one per [`REPORT_MIN_GAP`]), plus the first and the last.
struct ChannelProgress {
    tx: Sender<Event>,
    /// Per transfer: when its last line went out, and its percent then.
    last: Mutex<HashMap<String, (Instant, f64)>>,
}

impl ChannelProgress {
    fn new(tx: Sender<Event>) -> Self {
        Self {
            tx,
            last: Mutex::new(HashMap::new()),
        }
    }
}

impl Progress for ChannelProgress {
    fn transfer(&self, what: &str, transfer: Transfer) {
        let finished = transfer.done >= transfer.total;
        let now = Instant::now();
        let pct = percent(transfer);
        let due = {
            let Ok(mut last) = self.last.lock() else {
                return;
            };
            let due = match last.get(what) {
                None => true,
                Some((t, p)) => {
                    let gap = now.duration_since(*t);
                    finished
                        || gap >= REPORT_EVERY
                        || (pct - p >= REPORT_STEP_PERCENT && gap >= REPORT_MIN_GAP)
                }
            };
            if due {
                last.insert(what.to_string(), (now, pct));
            }
            due
        };
        if due {
            let _ = self.tx.send(Event::Line(
                MessageLevel::Info,
                transfer_line(what, transfer),
            ));
        }
    }

    fn message(&self, level: Level, text: &str) {
        let level = match level {
            Level::Info => MessageLevel::Info,
            Level::Warning => MessageLevel::Warning,
            // The engine's errors are reported; whether the job fails is decided by the result.
            Level::Error => MessageLevel::Warning,
        };
        let _ = self
            .tx
            .send(Event::Line(level, format!("vm-backup: {text}")));
    }
}

/// Forwards lines until the worker drops its sender.
fn forward(rx: &Receiver<Event>, sink: &dyn MessageSink) {
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Line(level, text)) => sink.message(level, &text),
            Ok(Event::Done(_)) | Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(MessageLevel, String)>>>);
    impl MessageSink for Recorder {
        fn message(&self, level: MessageLevel, text: &str) {
            self.0.lock().unwrap().push((level, text.to_string()));
        }
    }

    #[test]
    fn job_start_is_parsed() {
        let info = JobInfo::parse_start("JobId=42 Job=BackupWeb.2026-11-21_12.00.00_03");
        assert_eq!(info.job_id, 42);
        assert_eq!(info.job_name, "BackupWeb.2026-11-21_12.00.00_03");
    }

    #[test]
    fn malformed_string_fails_before_anything_runs() {
        let rec = Recorder::default();
        let mut job = Job::new(Box::new(rec.clone()), CancelToken::new());
        let err = job.backup_command("vm-backup: vm=a speed=max").unwrap_err();
        assert!(err.to_string().contains("speed"), "{err}");
        assert!(job.next_file().is_err());
        assert!(rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn estimate_lists_metadata_files_without_touching_anything() {
        let rec = Recorder::default();
        let mut job = Job::new(Box::new(rec), CancelToken::new());
        let dir = tempfile::tempdir().unwrap();
        let cmd = format!("vm-backup: vm=web01 target={}", dir.path().display());
        job.estimate_command(&cmd).unwrap();
        let mut names = Vec::new();
        while let Some(f) = job.next_file().unwrap() {
            names.push(f.path.clone());
            if !job.end_file().unwrap() {
                break;
            }
        }
        assert_eq!(names.len(), 2);
        assert!(names[0].starts_with("/@vm-backup/web01/"), "{names:?}");
        assert!(names[1].ends_with("/backup-metadata.json"), "{names:?}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn only_the_filled_restore_options_are_kept_and_a_lost_object_is_named() {
        let mut job = Job::new(Box::new(Recorder::default()), CancelToken::new());
        // The item table saved at backup (type 27) and other objects are ignored.
        job.restore_object("RestoreOptions", 27, &options::serialized())
            .unwrap();
        job.restore_object("other", 28, "files=/x").unwrap();
        assert_eq!(job.restore_options, None);
        job.restore_object("RestoreOptions", 28, "# c\nfiles=\"/a,/b\"\n\n")
            .unwrap();
        let o = job.restore_options.clone().unwrap();
        assert_eq!(o.files, vec!["/a", "/b"]);
        assert!(matches!(
            job.restore_object("RestoreOptions", 28, "\0estoreOptions\0obId=2"),
            Err(PluginError::RestoreOptionsLost(21))
        ));
    }

    #[test]
    fn progress_lines_are_thinned() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let p = ChannelProgress::new(tx);
        let t = |done| Transfer {
            done,
            total: 100,
            bytes_per_sec: 1.0,
            elapsed: Duration::from_secs(1),
        };
        p.transfer("vda", t(1));
        p.transfer("vda", t(2));
        p.transfer("vda", t(100));
        p.message(Level::Warning, "agent slow");
        drop(p);
        let lines: Vec<String> = rx
            .iter()
            .filter_map(|e| match e {
                Event::Line(_, s) => Some(s),
                Event::Done(_) => None,
            })
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("vda: 1%"), "{lines:?}");
        assert!(lines[1].contains("vda: 100%"), "{lines:?}");
        assert_eq!(lines[2], "vm-backup: agent slow");
    }

    #[test]
    fn transfer_lines_carry_percent_rate_and_eta() {
        let mib = 1024 * 1024;
        let t = |done: u64| Transfer {
            done: done * mib,
            total: 700 * mib,
            bytes_per_sec: 5.0 * mib as f64,
            elapsed: Duration::from_secs(10),
        };
        assert_eq!(
            transfer_line("vda", t(350)),
            "vm-backup: vda: 50% (350 of 700 MiB, 5.0 MiB/s, ETA 1m10s)"
        );
        assert!(transfer_line("vda", t(690)).ends_with("ETA 2 s)"));
        assert!(transfer_line("vda", t(700)).ends_with("done)"));
    }

    #[test]
    fn progress_lines_follow_five_percent_steps_but_not_too_often() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let p = ChannelProgress::new(tx);
        let t = |done| Transfer {
            done,
            total: 100,
            bytes_per_sec: 1.0,
            elapsed: Duration::from_secs(1),
        };
        p.transfer("vda", t(1));
        // 50 % more, but within REPORT_MIN_GAP of the first line: thinned.
        p.transfer("vda", t(51));
        drop(p);
        assert_eq!(rx.iter().count(), 1);
    }

    #[test]
    fn cancel_stops_reads() {
        let rec = Recorder::default();
        let token = CancelToken::new();
        let mut job = Job::new(Box::new(rec), token.clone());
        job.estimate_command("vm-backup: vm=a target=/nonexistent-vmb")
            .unwrap();
        job.next_file().unwrap();
        job.open_read().unwrap();
        token.cancel();
        assert!(matches!(
            job.read(&mut [0u8; 16]),
            Err(PluginError::Canceled)
        ));
    }
}
