//! Appliances (agent-less guests such as a Cisco ASAv, `appliance: asav` in the inventory): the
//! two steps of a backup that talk to the guest over the network, behind a hook the driver
//! passes in the [`super::BackupRequest`] (`ops::appliance::SshAppliance` does it over SSH).
//! The engine only decides when: `write memory` before the snapshot, the configuration capture
//! into the backup's `configs/` folder before it is published. Both only ever warn.

use std::path::Path;

use crate::config::{Ssh, VmEntry};

/// Why an appliance step failed; worded for the operator, it becomes a warning (exit 3).
pub type ApplianceFailure = Box<dyn std::error::Error + Send + Sync>;

/// The network side of an appliance backup.
pub trait ApplianceHook: Send + Sync + std::fmt::Debug {
    /// Saves the running configuration (`write memory`), so the disk image holds it.
    fn write_memory(&self, vm: &VmEntry, ssh: &Ssh) -> Result<(), ApplianceFailure>;

    /// Writes the configuration files into `dir` (created if needed); returns their names,
    /// relative to `dir`.
    fn capture_configs(
        &self,
        vm: &VmEntry,
        ssh: &Ssh,
        dir: &Path,
    ) -> Result<Vec<String>, ApplianceFailure>;
}

/// The appliance types the engine knows (`appliance:` in the inventory).
pub(crate) fn is_supported(entry: &VmEntry) -> bool {
    entry.appliance.as_deref() == Some("asav")
}
