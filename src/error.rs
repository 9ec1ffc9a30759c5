//! The crate-wide error type, the kinds of failure, and the exit statuses of the `backup`
//! command.
//!
//! Each room has its own error enum, and each of them says its [`ErrorKind`] through
//! `kind()`. The kind is the one place that decides what an operator is told to do
//! ([`ErrorKind::guidance`]) and the severity a Bacula job log gets ([`ErrorKind::severity`]);
//! exit codes are decided by [`ExitStatus`] (backup: by the phase that failed; every other
//! command: 2 on any error). [`Error`] gathers the rooms' errors
//! for the drivers (the command line, the C ABI) that handle any failure of the engine.

use std::fmt;

/// Any failure of the engine, as seen by the command line and the C ABI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The copier failed.
    #[error(transparent)]
    Copy(#[from] crate::copier::CopyError),
    /// A libvirt call failed.
    #[error(transparent)]
    Libvirt(#[from] crate::hv::LibvirtError),
    /// The backup workflow failed.
    #[error(transparent)]
    Backup(#[from] crate::engine::backup::BackupError),
    /// A restore failed.
    #[error(transparent)]
    Restore(#[from] crate::engine::restore::RestoreError),
    /// A file-level restore (mount, umount, files) failed.
    #[error(transparent)]
    Mount(#[from] crate::engine::mount::MountError),
    /// Verification found a fault or could not run.
    #[error(transparent)]
    Verify(#[from] crate::engine::verify::VerifyError),
    /// The configuration or inventory is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The layout on the target is invalid.
    #[error(transparent)]
    Layout(#[from] crate::format::layout::LayoutError),
    /// The catalog on the share failed.
    #[error(transparent)]
    Catalog(#[from] crate::store::catalog::CatalogError),
    /// The target refused an operation (not initialised, busy, a symlink…).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Retention planning or pruning failed.
    #[error(transparent)]
    Prune(#[from] crate::engine::prune::PruneError),
    /// The Bacula plugin string or job state is invalid.
    #[error(transparent)]
    Plugin(#[from] crate::bacula::PluginError),
    /// The off-site copy failed (push, verify, restore, prune, key).
    #[error(transparent)]
    Offsite(#[from] crate::engine::offsite::OffsiteRunError),
    /// The off-site store refused (server, credentials, key file).
    #[error(transparent)]
    OffsiteStore(#[from] crate::store::offsite::OffsiteError),
    /// An I/O error with the path it concerns.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else, already worded for the operator.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Copy(e) => e.kind(),
            Error::Libvirt(e) => e.kind(),
            Error::Backup(e) => e.kind(),
            Error::Restore(e) => e.kind(),
            Error::Mount(e) => e.kind(),
            Error::Verify(e) => e.kind(),
            Error::Config(e) => e.kind(),
            Error::Layout(e) => e.kind(),
            Error::Catalog(e) => e.kind(),
            Error::Store(e) => e.kind(),
            Error::Prune(e) => e.kind(),
            Error::Offsite(e) => e.kind(),
            Error::OffsiteStore(e) => e.kind(),
            Error::Plugin(e) => e.kind(),
            Error::Io { source, .. } => ErrorKind::from_io(source),
            Error::Other(_) => ErrorKind::Internal,
        }
    }

    /// One line telling the operator what to do about it.
    pub fn guidance(&self) -> &'static str {
        self.kind().guidance()
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The exit status of `vm-backup backup` (and of the C ABI's backup call), per DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitStatus {
    /// 0: the backup completed and every post-check passed.
    Success,
    /// 1: aborted before the VM was touched (a pre-check failed).
    PreCheckFailed,
    /// 2: failed; the VM was restored to normal and the partial backup removed.
    Failed,
    /// 3: completed, but a post-check warned.
    Warning,
}

impl ExitStatus {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::PreCheckFailed => 1,
            ExitStatus::Failed => 2,
            ExitStatus::Warning => 3,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            ExitStatus::Success => "success",
            ExitStatus::PreCheckFailed => "pre-check failed",
            ExitStatus::Failed => "failed",
            ExitStatus::Warning => "completed with warnings",
        };
        f.write_str(word)
    }
}

/// What kind of failure an error is: decides the guidance, the exit code of a command and the
/// severity of the Bacula job message, here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// A VM, a backup or a file that was asked for does not exist.
    NotFound,
    /// An argument, a plugin string or a name is malformed or not allowed.
    InvalidInput,
    /// The configuration file or the inventory is invalid.
    Config,
    /// Another run holds the lock, or the domain is in a state that forbids the operation.
    Busy,
    /// The backup target is not there, not mounted or not initialised.
    TargetMissing,
    /// The backup target is full.
    TargetFull,
    /// The backup target fails reads or writes (I/O errors, a vanished share).
    TargetFailing,
    /// Data does not match its recorded hashes, or a file of a backup is damaged.
    Corrupt,
    /// The QEMU guest agent did not answer or refused.
    GuestAgent,
    /// A libvirt call failed.
    Libvirt,
    /// An external tool (`qemu-img`, `ssh`) failed or is missing.
    Tool,
    /// The operator or Bacula cancelled the run.
    Cancelled,
    /// Another local I/O error (not on the target).
    Io,
    /// A bug or an unexpected state of vm-backup itself.
    Internal,
}

/// How serious a failure is for a job log (mapped to Bacula's message types by the plugin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth knowing; the data is fine.
    Warning,
    /// The operation failed; nothing else is at risk.
    Error,
    /// The job must end as failed at once.
    Fatal,
}

impl ErrorKind {
    /// One line telling the operator what to do about a failure of this kind.
    pub fn guidance(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "check the name with `virsh list --all` or `vm-backup list`",
            ErrorKind::InvalidInput => "correct the argument or the plugin string (see `vm-backup --help` and docs/bacula.md)",
            ErrorKind::Config => "correct the file at the line named (see docs/configuration.md)",
            ErrorKind::Busy => "wait for the other run to end, or see `vm-backup orphans` if none is running",
            ErrorKind::TargetMissing => "mount the backup share, or initialise the target with `vm-backup init`",
            ErrorKind::TargetFull => "free space on the backup share (`vm-backup prune`) or grow it",
            ErrorKind::TargetFailing => "check the backup share and its server (dmesg, NFS mount state)",
            ErrorKind::Corrupt => "do not restore from this backup; run `vm-backup verify` and take a new backup",
            ErrorKind::GuestAgent => "check that qemu-guest-agent runs in the guest, or use method=snapshot",
            ErrorKind::Libvirt => "check libvirtd (`systemctl status libvirtd`, `virsh list`)",
            ErrorKind::Tool => "check that qemu-img and the other tools are installed and work",
            ErrorKind::Cancelled => "run it again when wanted",
            ErrorKind::Io => "check the path named and the local disk",
            ErrorKind::Internal => "report this as a bug, with backup.log",
        }
    }

    /// The severity of a failure of this kind in a job log.
    pub fn severity(self) -> Severity {
        match self {
            ErrorKind::Cancelled => Severity::Error,
            _ => Severity::Fatal,
        }
    }

    /// The kind of an I/O error on the backup target.
    pub fn from_target_io(e: &std::io::Error) -> ErrorKind {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::TargetFull,
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => ErrorKind::TargetMissing,
            _ => ErrorKind::TargetFailing,
        }
    }

    /// The kind of a local I/O error.
    pub fn from_io(e: &std::io::Error) -> ErrorKind {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::TargetFull,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Config => "configuration",
            ErrorKind::Busy => "busy",
            ErrorKind::TargetMissing => "target missing",
            ErrorKind::TargetFull => "target full",
            ErrorKind::TargetFailing => "target failing",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::GuestAgent => "guest agent",
            ErrorKind::Libvirt => "libvirt",
            ErrorKind::Tool => "external tool",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Io => "I/O",
            ErrorKind::Internal => "internal",
        };
        f.write_str(word)
    }
}
