//! Cisco ASAv (and other agent-less appliances): `write memory` before the snapshot and
//! configuration capture over SSH after the copy.

use std::path::Path;

use crate::config::{Ssh, VmEntry};

/// Errors talking to an appliance. They are warnings for a backup (exit 3), never a lost backup.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Saves the running configuration to the startup configuration (`write memory`) before the
/// snapshot, so the disk image holds the current configuration.
pub fn write_memory(vm: &VmEntry, ssh: &Ssh) -> Result<(), ApplianceError> {
    let _ = (vm, ssh);
    Err(ApplianceError::NotImplemented("write memory"))
}

/// Captures running-config, startup-config, version and failover state into `configs_dir`;
/// returns the file names written, relative to `configs_dir`.
pub fn capture_configs(
    vm: &VmEntry,
    ssh: &Ssh,
    configs_dir: &Path,
) -> Result<Vec<String>, ApplianceError> {
    let _ = (vm, ssh, configs_dir);
    Err(ApplianceError::NotImplemented("configuration capture"))
}
