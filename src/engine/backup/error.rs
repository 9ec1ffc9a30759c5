//! [`BackupError`]: which VM, which [`Phase`], what went wrong (a typed [`Cause`]) and the
//! exit status it means. The kind of failure (and so the operator's guidance and the Bacula
//! message level) comes from the cause, not from the phase.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::copier::CopyError;
use crate::error::ErrorKind;
use crate::format::layout::LayoutError;
use crate::hv::{DomState, LibvirtError};
use crate::ExitStatus;

use super::checks::CheckError;
use super::commit::CommitError;
use super::journal::JournalError;
use super::orphans::OrphanError;
use super::Phase;

/// A failed backup step: which VM, which phase, what happened, and the exit status it means.
#[derive(Debug, thiserror::Error)]
#[error("VM {vm:?}: {phase} failed: {cause}")]
pub struct BackupError {
    /// The domain name.
    pub vm: String,
    /// The phase that failed.
    pub phase: Phase,
    /// 1 (pre-check, VM untouched) or 2 (failed, VM restored).
    pub status: ExitStatus,
    /// What went wrong (boxed: the error stays small on every `Result` of the engine).
    #[source]
    pub cause: Box<Cause>,
}

impl BackupError {
    /// A pre-check failure (exit 1).
    pub fn pre(vm: &str, cause: impl Into<Cause>) -> Self {
        Self {
            vm: vm.to_string(),
            phase: Phase::Checks,
            status: ExitStatus::PreCheckFailed,
            cause: Box::new(cause.into()),
        }
    }

    /// A failure after the VM was touched (exit 2).
    pub fn failed(vm: &str, phase: Phase, cause: impl Into<Cause>) -> Self {
        Self {
            vm: vm.to_string(),
            phase,
            status: ExitStatus::Failed,
            cause: Box::new(cause.into()),
        }
    }

    /// What kind of failure this is: the cause's.
    pub fn kind(&self) -> ErrorKind {
        self.cause.kind()
    }
}

/// What went wrong in a backup step.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// A libvirt call failed.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// A pre-check refused the backup.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The local journal or the VM's lock.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A name is not allowed in the layout of the target.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Repairing what an earlier run left failed.
    #[error(transparent)]
    Repair(#[from] OrphanError),
    /// Committing an overlay back (or restarting the domain) failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// An external tool failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The guest may still be frozen: no thaw was confirmed.
    #[error(transparent)]
    Thaw(#[from] super::thaw::ThawError),
    /// The copy failed its post-checks (re-read from the share before publishing): nothing
    /// was published.
    #[error("the copy failed its post-checks and was not published (the `.partial` folder is removed): {0}")]
    PostCheck(super::Problems),
    /// The backup target refused a write, a rename or a delete.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Copying one image failed.
    #[error("disk {label}: {source}")]
    Copy {
        /// The disk (`vda`, `vda backing image 1`).
        label: String,
        /// The copier's error.
        #[source]
        source: CopyError,
    },
    /// The copier returned no digests (a bug).
    #[error("disk {label}: the copier returned no digests")]
    NoDigests {
        /// The disk.
        label: String,
    },
    /// Reading or writing the backup target failed.
    #[error("{context}: {source}")]
    Target {
        /// What was done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A local file (not on the target) could not be read or removed.
    #[error("{context}: {source}")]
    Io {
        /// What was done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The quiesced snapshot failed: the guest agent could not freeze (or libvirt failed).
    #[error("{source} (after {ms:.0} ms; the guest agent timeout is {timeout_seconds} s)")]
    Quiesce {
        /// libvirt's error.
        #[source]
        source: LibvirtError,
        /// How long the call took.
        ms: f64,
        /// The configured agent timeout.
        timeout_seconds: u64,
    },
    /// One of our overlays exists already.
    #[error("overlay {} already exists", .0.display())]
    OverlayExists(PathBuf),
    /// After the snapshot a disk is not on its overlay.
    #[error("after the snapshot, disk {target} is not on {}", overlay.display())]
    NotOnOverlay {
        /// The disk.
        target: String,
        /// The overlay it should run on.
        overlay: PathBuf,
    },
    /// The images could not be locked for the offline copy.
    #[error("cannot lock the images for the offline copy: {0}")]
    ImageLock(#[source] crate::hv::image_lock::ImageLockError),
    /// The shut-off domain was started before the offline copy began.
    #[error("the domain was started before the offline copy began (it is {0})")]
    StartedBeforeCopy(DomState),
    /// The shut-off domain was started during the offline copy.
    #[error(
        "the domain was started during the offline copy (it is {0}): the copy may be inconsistent"
    )]
    StartedDuringCopy(DomState),
    /// The operator or Bacula cancelled the run.
    #[error("cancelled")]
    Cancelled,
    /// A state the engine should never reach.
    #[error("internal: {0}")]
    Internal(&'static str),
}

impl Cause {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Cause::Libvirt(e) => e.kind(),
            Cause::Check(e) => e.kind(),
            Cause::Journal(e) => e.kind(),
            Cause::Layout(e) => e.kind(),
            Cause::Repair(e) => e.kind(),
            Cause::Commit(e) => e.kind(),
            Cause::Tool(e) => e.kind(),
            Cause::Thaw(e) => e.kind(),
            Cause::PostCheck(_) => ErrorKind::Corrupt,
            Cause::Store(e) => e.kind(),
            Cause::Copy { source, .. } => source.kind(),
            Cause::NoDigests { .. } | Cause::Internal(_) => ErrorKind::Internal,
            Cause::Target { source, .. } => ErrorKind::from_target_io(source),
            Cause::Io { source, .. } => ErrorKind::from_io(source),
            Cause::Quiesce { source, .. } => match source.kind() {
                ErrorKind::Cancelled => ErrorKind::Cancelled,
                _ => ErrorKind::GuestAgent,
            },
            Cause::OverlayExists(_)
            | Cause::ImageLock(_)
            | Cause::StartedBeforeCopy(_)
            | Cause::StartedDuringCopy(_) => ErrorKind::Busy,
            Cause::NotOnOverlay { .. } => ErrorKind::Libvirt,
            Cause::Cancelled => ErrorKind::Cancelled,
        }
    }

    /// A failure on the backup target, with what was done.
    pub fn target(context: impl fmt::Display, source: io::Error) -> Self {
        Cause::Target {
            context: context.to_string(),
            source,
        }
    }
}

/// `qemu-img` failed: hv's error, under the name the backup's causes use.
pub use crate::hv::qemu_img::QemuImgError as ToolError;
