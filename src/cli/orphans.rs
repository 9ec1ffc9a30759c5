//! `vm-backup orphans`.

use vm_backup::engine::backup::orphans;

use super::common::{self, TargetArgs};

/// Arguments of `vm-backup orphans`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Repair what is found: commit our overlays back, thaw, abort stale block jobs, remove
    /// partial folders, start domains shut down for a backup, finish interrupted instant
    /// restores.
    #[arg(long, alias = "repair")]
    cleanup: bool,
    #[command(flatten)]
    common: TargetArgs,
}

/// Runs `vm-backup orphans`. Exit 0: nothing found or everything repaired; 3: leftovers found
/// (without --cleanup); 2: a repair failed.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings = super::backup::settings(&args.common)?;
    let progress = common::LineProgress::new(!args.common.json);
    let report = orphans::scan(&settings, args.cleanup, &progress)
        .map_err(|e| vm_backup::Error::Other(e.to_string()))?;
    if args.common.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| vm_backup::Error::Other(format!("cannot print JSON: {e}")))?;
        println!("{text}");
    } else if report.orphans.is_empty() {
        println!("no leftovers found");
    } else {
        for o in &report.orphans {
            println!("{} [{}]: {}", o.vm, o.kind, o.detail);
            if let Some(r) = &o.repair {
                println!(
                    "  {}: {r}",
                    if o.repaired == Some(true) {
                        "repaired"
                    } else {
                        "NOT repaired"
                    }
                );
            }
        }
    }
    let repairable = report.orphans.iter().any(|o| o.kind != "busy");
    Ok(if report.any_failed() {
        2
    } else if !args.cleanup && repairable {
        3
    } else {
        0
    })
}
