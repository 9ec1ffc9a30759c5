//! `vm-backup status [--json] [--html FILE]`: every VM of the inventory with its last backup,
//! its verdicts and what needs attention first. Exit 0 when nothing is critical, 1 otherwise.

use std::path::PathBuf;

use vm_backup::config::Settings;
use vm_backup::ops::status::{self, Rules, StatusError, Urgency};

use super::common::TargetArgs;

/// Arguments of `vm-backup status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// Also write the status page (one self-contained HTML file) to FILE.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Flag a VM whose newest backup is older than this many days.
    #[arg(long, value_name = "DAYS", default_value_t = Rules::default().stale_after_days)]
    stale_days: i64,
}

fn to_error(e: StatusError) -> vm_backup::Error {
    match e {
        StatusError::Catalog(e) => e.into(),
        StatusError::Write { path, source } => vm_backup::Error::Io {
            context: format!("cannot write the status page {}", path.display()),
            source,
        },
    }
}

/// Runs `vm-backup status`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let rules = Rules {
        stale_after_days: args.stale_days,
        ..Rules::default()
    };
    let status = status::collect(&settings, rules, chrono::Local::now()).map_err(to_error)?;
    if let Some(path) = &args.html {
        status::write_page(path, &status).map_err(to_error)?;
    }
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", status::render_text(&status));
        if let Some(path) = &args.html {
            println!("\nstatus page written to {}", path.display());
        }
    }
    let critical = status
        .attention
        .iter()
        .any(|a| a.urgency == Urgency::Critical);
    Ok(if critical { 1 } else { 0 })
}
