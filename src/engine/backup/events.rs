//! What a backup tells the world while it runs: [`BackupEvent`]s sent to the
//! [`BackupObserver`] each driver passes in.
//!
//! The engine does no reporting of its own (no Slack, no catalog, no metrics textfile): the
//! command line and the Bacula plugin hand [`super::run_backup`] an observer that does
//! (`ops::report::Reporter`), a test hands it a recorder, and [`NoObserver`] ignores
//! everything. Observers are called in the order below, and must not fail the backup:
//! whatever goes wrong inside one is its own business (log it). They are `Send + Sync`: the
//! events of the copy phase come from the threads that copy the disks (up to `[copy]
//! disk_parallel` at once), each naming its disk.
//!
//! ```text
//! Started ─► (PhaseStarted ─► [FrozenWindow] [DiskCopyStarted… DiskCopied…] [CommitPaused…] [Warning…] ─► PhaseFinished)… ─► Finished
//! ```

use std::sync::Arc;

use chrono::{DateTime, Local};

use super::{BackupOutcome, BackupRequest, Phase};

/// One thing that happened during a backup.
#[derive(Debug, Clone, Copy)]
pub enum BackupEvent<'e> {
    /// The run began (before the pre-checks).
    Started {
        /// What was asked for.
        request: &'e BackupRequest,
        /// When the run began.
        at: DateTime<Local>,
    },
    /// A phase began.
    PhaseStarted {
        /// The phase.
        phase: Phase,
    },
    /// A phase ended successfully after `seconds` (a failure ends the run instead).
    PhaseFinished {
        /// The phase.
        phase: Phase,
        /// Its wall time.
        seconds: f64,
    },
    /// The guest was frozen (quiesce) for this long: freeze, snapshot and thaw in one call.
    FrozenWindow {
        /// Milliseconds frozen.
        ms: f64,
    },
    /// The copy of a disk (its image, then its backing chain) begins. With several disks
    /// copied at once (`[copy] disk_parallel`), the events of different disks interleave:
    /// each names its disk, and a disk's `DiskCopyStarted` before another's `DiskCopied`
    /// means they were copied at the same time.
    DiskCopyStarted {
        /// The disk (`vda`).
        label: &'e str,
        /// The file name of its image in the backup folder.
        file: &'e str,
    },
    /// One image (a disk or an image of its backing chain) was copied and hashed.
    DiskCopied {
        /// The disk (`vda`) or `vda backing image 1`.
        label: &'e str,
        /// The file name in the backup folder.
        file: &'e str,
        /// Bytes written.
        bytes: u64,
        /// Wall time of the copy.
        seconds: f64,
        /// The SHA-256 of the copy.
        sha256: &'e str,
    },
    /// The block commit of a disk did not converge within `commit_seconds`: the guest was
    /// paused this long (at most `commit_pause_max_seconds`) so that it did, then resumed.
    CommitPaused {
        /// The disk.
        target: &'e str,
        /// Milliseconds paused.
        ms: f64,
    },
    /// A warning (the run will end with status 3 if it publishes).
    Warning {
        /// The warning, worded for the operator.
        text: &'e str,
    },
    /// The run ended, whatever its outcome; every acquired state has been released.
    Finished {
        /// What was asked for.
        request: &'e BackupRequest,
        /// When the run began.
        started: DateTime<Local>,
        /// What it produced.
        outcome: &'e BackupOutcome,
    },
}

/// Receives the [`BackupEvent`]s of a run. Implementations must be quick (the guest may be
/// frozen around [`BackupEvent::FrozenWindow`]'s phase) and never panic.
pub trait BackupObserver: Send + Sync {
    /// One event.
    fn on_event(&self, event: &BackupEvent<'_>);
}

/// An observer that ignores every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl BackupObserver for NoObserver {
    fn on_event(&self, _event: &BackupEvent<'_>) {}
}

/// Several observers, each told every event in order.
impl BackupObserver for [&dyn BackupObserver] {
    fn on_event(&self, event: &BackupEvent<'_>) {
        for o in self {
            o.on_event(event);
        }
    }
}

/// A [`BackupObserver`] held by a session: borrowed for one call ([`super::run_backup`]) or
/// shared (a session kept across calls, as the Bacula plugin's stream mode does).
#[derive(Clone)]
pub enum ObserverRef<'a> {
    /// Borrowed for the session's lifetime.
    Borrowed(&'a dyn BackupObserver),
    /// Shared ownership.
    Shared(Arc<dyn BackupObserver>),
}

impl ObserverRef<'_> {
    /// The observer.
    pub fn get(&self) -> &dyn BackupObserver {
        match self {
            ObserverRef::Borrowed(o) => *o,
            ObserverRef::Shared(o) => o.as_ref(),
        }
    }

    /// Tells the observer.
    pub fn emit(&self, event: BackupEvent<'_>) {
        self.get().on_event(&event);
    }
}

impl Default for ObserverRef<'_> {
    fn default() -> Self {
        ObserverRef::Borrowed(&NoObserver)
    }
}

impl<'a> From<&'a dyn BackupObserver> for ObserverRef<'a> {
    fn from(o: &'a dyn BackupObserver) -> Self {
        ObserverRef::Borrowed(o)
    }
}

impl From<Arc<dyn BackupObserver>> for ObserverRef<'_> {
    fn from(o: Arc<dyn BackupObserver>) -> Self {
        ObserverRef::Shared(o)
    }
}
