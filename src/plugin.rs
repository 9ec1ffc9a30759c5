//! The Bacula plugin string (`vm-backup: vm=… method=… target=… mode=… config=…`) and the per-job state behind the C ABI.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
