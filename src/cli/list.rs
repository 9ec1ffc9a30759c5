//! `vm-backup list`: the backups on the target, from the catalog (kept in line with the share).

use vm_backup::config::Settings;
use vm_backup::ops::notify::{human_bytes, human_rate, verdict_word};
use vm_backup::store::catalog::Catalog;

use super::common::TargetArgs;

/// Arguments of `vm-backup list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: TargetArgs,
    /// Only this VM.
    vm: Option<String>,
}

/// Runs `vm-backup list`.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let settings =
        Settings::load_with_target(args.common.config.as_deref(), args.common.target.as_deref())?;
    let catalog = Catalog::open(&settings.target)?;
    catalog.sync()?;
    let rows = catalog.backups(args.vm.as_deref())?;
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no backups under {}", settings.target.display());
        return Ok(0);
    }
    println!(
        "{:<12} {:<20} {:<18} {:<32} {:<9} {:>10} {:>9} {:>12} {:>9} {:<9} {:<7} {:<12}",
        "HOST",
        "VM",
        "STAMP",
        "LEVEL (PARENT)",
        "METHOD",
        "SIZE",
        "DURATION",
        "THROUGHPUT",
        "FROZEN",
        "RESULT",
        "VERIFY",
        "TEST-RESTORE"
    );
    for r in rows {
        println!(
            "{:<12} {:<20} {:<18} {:<32} {:<9} {:>10} {:>8.1}s {:>12} {:>9} {:<9} {:<7} {:<12}",
            r.host,
            r.vm,
            r.stamp,
            level_of(std::path::Path::new(&r.path)),
            r.method,
            human_bytes(r.total_bytes),
            r.duration_seconds,
            human_rate(r.bytes_per_sec),
            r.frozen_ms
                .map_or("-".to_string(), |f| format!("{f:.0} ms")),
            r.result,
            verdict_word(r.verify.as_ref()),
            verdict_word(r.test_restore.as_ref()),
        );
    }
    Ok(0)
}

/// `full`, or `incremental (<parent>)` / `differential (<parent>)`, from the folder's metadata
/// (`-` when it cannot be read).
fn level_of(dir: &std::path::Path) -> String {
    match vm_backup::format::metadata::BackupMetadata::read(dir) {
        Ok(m) => match &m.chain.parent {
            Some(p) => format!("{} ({p})", m.level()),
            None => m.level().to_string(),
        },
        Err(_) => "-".into(),
    }
}
