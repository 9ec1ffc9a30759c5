//! `vm-backup prune`: apply the retention of the inventory to the backups of this host.

use std::path::PathBuf;

use vm_backup::config::{Inventory, Retention, Settings};
use vm_backup::engine::prune;
use vm_backup::format::layout::{self, safe_component};
use vm_backup::store::catalog::Catalog;
use vm_backup::store::{FolderStore, LockMode};

use super::common::TargetArgs;

/// Arguments of `vm-backup prune`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// Print what would be kept and removed, and remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Only this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// The inventory with the retention of each VM (overrides the configuration file).
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
}

/// The plan of one VM, for `--json`.
#[derive(serde::Serialize)]
struct VmPlan {
    host: String,
    vm: String,
    retention: Retention,
    decisions: Vec<prune::Decision>,
    removed: Vec<PathBuf>,
}

/// Runs `vm-backup prune`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let inventory = Inventory::load(args.inventory.as_deref().unwrap_or(&settings.inventory))?;
    let host = settings.host();
    let store = FolderStore::open(&settings.target)?;
    let catalog = Catalog::open(&settings.target)?;
    catalog.sync()?;
    let mut plans = Vec::new();
    for (dir_name, vm_dir) in layout::vm_dirs(&settings.target, &host)? {
        let entry = inventory
            .vms
            .iter()
            .find(|v| safe_component(&v.name).ok().as_deref() == Some(dir_name.as_str()));
        let vm_name = entry.map_or(dir_name.clone(), |e| e.name.clone());
        if args
            .vm
            .as_deref()
            .is_some_and(|w| w != vm_name && w != dir_name)
        {
            continue;
        }
        let retention = entry.map(|e| e.retention.clone()).unwrap_or_default();
        // The VM's lock, exclusive: no backup, verify or restore of it meanwhile.
        let _lock = match store.lock_dir(&vm_dir.path, LockMode::Exclusive) {
            Ok(lock) => lock,
            Err(e) if e.kind() == vm_backup::error::ErrorKind::Busy => {
                eprintln!("vm-backup: skipping {vm_name}: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let candidates = prune::scan_vm(&vm_dir)?;
        let failure = catalog.latest_failure(&host, &vm_name)?;
        let decisions = prune::plan(&candidates, &retention, failure.as_deref());
        let removed = if args.dry_run {
            Vec::new()
        } else {
            let removed = prune::apply(&vm_dir, &decisions)?;
            for d in decisions.iter().filter(|d| !d.keep && !d.partial) {
                catalog.remove_backup(&host, &vm_name, &d.stamp)?;
            }
            removed
        };
        plans.push(VmPlan {
            host: host.clone(),
            vm: vm_name,
            retention,
            decisions,
            removed,
        });
    }
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plans).unwrap_or_default()
        );
        return Ok(0);
    }
    if plans.is_empty() {
        println!(
            "no backups of this host ({host}) under {}",
            settings.target.display()
        );
    }
    for p in &plans {
        for d in &p.decisions {
            let verb = match (d.keep, args.dry_run) {
                (true, _) => "keep",
                (false, true) => "would remove",
                (false, false) => "removed",
            };
            let name = if d.partial {
                format!("{}{}", d.stamp, layout::PARTIAL_SUFFIX)
            } else {
                d.stamp.clone()
            };
            println!("{}: {verb:<12} {name:<26} {}", p.vm, d.reasons.join("; "));
        }
    }
    Ok(0)
}
