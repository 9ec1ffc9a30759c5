//! The throughput harness behind `vm-backup bench`: test images, interleaved runs against baselines, medians and ratios.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
