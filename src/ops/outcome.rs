//! The outcome of one backup run as ops sees it: what the catalog, the Slack alert and the
//! metrics textfile are built from. A leaf of `ops` (notify and metrics both read it).

use crate::format::metadata::BackupMetadata;
use crate::store::catalog::FailedRun;

/// The outcome of one backup run, as the backup workflow knows it.
#[derive(Debug, Clone, Copy)]
pub enum BackupOutcome<'a> {
    /// A backup was published (success or warning).
    Published(&'a BackupMetadata),
    /// The run failed and published nothing.
    Failed(&'a FailedRun),
}
