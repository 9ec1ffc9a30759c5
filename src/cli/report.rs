//! `vm-backup report --weekly`: post the summary of the last 7 days to the reports webhook.

use vm_backup::config::Settings;
use vm_backup::ops::notify::{self, Delivery};
use vm_backup::store::catalog::Catalog;

use super::common::TargetArgs;

/// Arguments of `vm-backup report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// The summary of the last 7 days (the only report so far).
    #[arg(long, required = true)]
    weekly: bool,
    /// Print the report and post nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Runs `vm-backup report`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let _ = args.weekly;
    let catalog = Catalog::open(&settings.target)?;
    catalog.sync()?;
    let text = notify::weekly_report(
        &catalog.backups(None)?,
        &catalog.failures(None)?,
        chrono::Local::now(),
    );
    if args.dry_run {
        println!("{text}");
        return Ok(0);
    }
    let delivery = notify::send_report(&settings, &text);
    if args.common.json {
        println!("{}", serde_json::to_string(&delivery).unwrap_or_default());
    }
    match delivery {
        Delivery::Sent { attempts } => {
            eprintln!("report sent ({attempts} attempt(s))");
            Ok(0)
        }
        Delivery::NotConfigured | Delivery::NotNeeded => {
            println!("{text}");
            eprintln!("no reports webhook configured (slack.reports_webhook): report printed only");
            Ok(0)
        }
        Delivery::Failed { attempts, reason } => {
            eprintln!("vm-backup: report not delivered after {attempts} attempt(s): {reason}");
            Ok(1)
        }
    }
}
