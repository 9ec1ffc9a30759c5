//! `vm-backup backup`.

use std::path::PathBuf;

use vm_backup::config::{Inventory, Settings};
use vm_backup::engine::backup::{configured_inventory, run_backup, BackupRequest};
use vm_backup::format::metadata::Method;
use vm_backup::ops::appliance::SshAppliance;
use vm_backup::ops::report::Reporter;

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup backup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The domain to back up (libvirt name).
    vm: String,
    /// Consistency method (default: the inventory's, else auto).
    #[arg(long, value_name = "auto|quiesce|snapshot|offline")]
    method: Option<Method>,
    /// Backup level: a full (with a checkpoint), or only the blocks changed since the last
    /// backup (incremental) or the last full (differential) on this target. Falls back to a
    /// full, saying why, when the chain cannot be continued.
    /// Without it, a full backup as before, with no checkpoint (no chain to continue).
    #[arg(long, value_name = "full|incremental|differential")]
    level: Option<vm_backup::format::metadata::BackupLevel>,
    /// The inventory (vm-list.yaml), for the VM's method and appliance type.
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// With the offline method: shut a running domain down cleanly and start it again after.
    #[arg(long)]
    shutdown: bool,
    /// When quiesce is impossible, take a crash-consistent snapshot instead of failing.
    #[arg(long)]
    allow_crash_consistent: bool,
    /// Disks of the VM copied at once, sharing one queue of buffers (1: one after the other;
    /// overrides `[copy] disk_parallel`, default 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=vm_backup::config::MAX_DISK_PARALLEL as i64))]
    disk_parallel: Option<u16>,
    /// Bandwidth limit of the copy, bytes read per second from the disks, shared by the
    /// disks copied at once (e.g. 200M; overrides `[copy] max_rate`; default no limit).
    #[arg(long, value_name = "RATE", value_parser = vm_backup::config::parse_rate)]
    max_rate: Option<u64>,
    /// Write the Prometheus textfile here after the run (overrides `metrics_file`).
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<PathBuf>,
    #[command(flatten)]
    common: TargetArgs,
}

/// Loads the settings with the `--config` and `--target` overrides.
pub fn settings(common: &TargetArgs) -> Result<Settings, vm_backup::Error> {
    Ok(common.settings()?)
}

/// Runs `vm-backup backup`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let mut settings = settings(&args.common)?;
    if let Some(path) = &args.metrics_file {
        settings.metrics_file = Some(path.clone());
    }
    if let Some(n) = args.disk_parallel {
        settings.copy.disk_parallel = usize::from(n);
    }
    if let Some(rate) = args.max_rate {
        settings.copy.max_rate = Some(rate);
    }
    // An explicit --inventory must exist; the configured one may be absent (no inventory).
    let inventory = match &args.inventory {
        Some(path) => Some(Inventory::load(path)?),
        None => configured_inventory(&settings)?,
    };
    let mut request = BackupRequest::from_inventory(&args.vm, settings, inventory.as_ref())
        .with_method(args.method)
        .with_appliance(std::sync::Arc::new(SshAppliance));
    request.shutdown = args.shutdown;
    if let Some(level) = args.level {
        request.level = level;
        request.checkpoint_full = true;
    }
    request.crash_consistent_fallback = args.allow_crash_consistent;
    let cancel = common::cancel_on_signals();
    let progress = common::LineProgress::new(!args.common.json);
    let reporter = Reporter::new(&progress);
    let outcome = run_backup(&request, &progress, &reporter, &cancel);
    if args.common.json {
        let text = serde_json::to_string_pretty(&outcome)
            .map_err(|e| vm_backup::Error::Other(format!("cannot print JSON: {e}")))?;
        println!("{text}");
    } else {
        match (&outcome.error, &outcome.backup_dir) {
            (Some(err), _) => eprintln!("vm-backup: {}: {err}", outcome.status),
            (None, Some(dir)) => {
                println!(
                    "backup of {:?} {}: {} ({}method {}{}, {:.1} s)",
                    outcome.vm,
                    outcome.status,
                    dir.display(),
                    outcome
                        .metadata
                        .as_ref()
                        .map(|m| match &m.chain.parent {
                            Some(p) => format!("level {} on {p}, ", m.level()),
                            None => format!("level {}, ", m.level()),
                        })
                        .unwrap_or_default(),
                    outcome
                        .metadata
                        .as_ref()
                        .map(|m| m.method.to_string())
                        .unwrap_or_default(),
                    outcome
                        .frozen_ms
                        .map(|ms| format!(", frozen {ms:.0} ms"))
                        .unwrap_or_default(),
                    outcome.seconds
                );
                for w in &outcome.warnings {
                    println!("warning: {w}");
                }
            }
            (None, None) => {}
        }
    }
    Ok(outcome.exit_code)
}
