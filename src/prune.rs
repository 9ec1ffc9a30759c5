//! Retention: a pure planner (keep-last, daily/weekly/monthly/yearly) and the pruning of a target.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
