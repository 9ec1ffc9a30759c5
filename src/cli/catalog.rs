//! `vm-backup catalog`: maintain the catalog on the share.

use vm_backup::config::Settings;
use vm_backup::store::catalog::Catalog;

use super::common::TargetArgs;

/// Arguments of `vm-backup catalog`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Rebuild the catalog from the backup-metadata.json files on the share.
    Rebuild,
    /// Open the catalog (rebuilding it if damaged) and index folders it does not know.
    Sync,
}

/// Runs `vm-backup catalog`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    match args.action {
        Action::Rebuild => {
            let report = Catalog::rebuild(&settings.target)?;
            if args.common.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!(
                    "catalog rebuilt: {} backups, {} failed runs",
                    report.backups, report.failures
                );
                for s in &report.skipped {
                    println!("skipped: {s}");
                }
            }
        }
        Action::Sync => {
            let catalog = Catalog::open(&settings.target)?;
            let (added, removed) = catalog.sync()?;
            println!(
                "catalog {}: {added} backups added, {removed} removed",
                catalog.path().display()
            );
        }
    }
    Ok(0)
}
